//! vCPUs: boot state, and one host thread per vCPU (`vcpu-N`) running KVM_RUN and routing
//! port I/O and MMIO exits to the buses.

use std::sync::Arc;
use std::thread::JoinHandle;

use kvm_bindings::{kvm_msr_entry, Msrs, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress};

use crate::boot::regs;
use crate::bus::Bus;
use crate::exit::{ExitReason, ExitSignal};
use crate::memory::GuestMemoryMmap;
use crate::snapshot::pause::{PauseHandle, Resume};
use crate::seccomp::ThreadKind;
use crate::symbols::Symbols;

const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MISC_ENABLE_FAST_STRING: u64 = 1;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MTRR_ENABLE_WRITEBACK: u64 = (1 << 11) | 6;
const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

#[derive(Debug, Error)]
pub enum VcpuError {
    #[error("cannot create vCPU {index}")]
    Create {
        index: u8,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("cannot set up vCPU {index}: {what}")]
    Setup {
        index: u8,
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Starting the thread, or its seccomp filter, failed.
    #[error("cannot spawn the thread for vCPU {index}")]
    Spawn {
        index: u8,
        #[source]
        source: crate::seccomp::SeccompError,
    },
}

pub struct Vcpu {
    index: u8,
    fd: VcpuFd,
    /// Lets the VMM stop this vCPU outside KVM_RUN, save it and resume it (`with_pause`).
    pause: Option<Arc<PauseHandle>>,
}

impl Vcpu {
    /// Creates vCPU `index` of `count` and puts it in the 64-bit boot state at `entry`.
    pub fn new(
        kvm: &Kvm,
        vm: &VmFd,
        index: u8,
        count: u8,
        entry: GuestAddress,
    ) -> Result<Self, VcpuError> {
        let fd = vm
            .create_vcpu(u64::from(index))
            .map_err(|source| VcpuError::Create { index, source })?;
        let setup = |what| move |source| VcpuError::Setup { index, what, source };

        let mut cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(setup("KVM_GET_SUPPORTED_CPUID"))?;
        crate::cpuid::fix_topology(&mut cpuid, index, count);
        fd.set_cpuid2(&cpuid).map_err(setup("KVM_SET_CPUID2"))?;

        let msrs = boot_msrs();
        fd.set_msrs(&msrs).map_err(setup("KVM_SET_MSRS"))?;

        let sregs = fd.get_sregs().map_err(setup("KVM_GET_SREGS"))?;
        fd.set_sregs(&regs::long_mode_sregs(sregs))
            .map_err(setup("KVM_SET_SREGS"))?;
        fd.set_regs(&regs::boot_regs(entry.0))
            .map_err(setup("KVM_SET_REGS"))?;
        fd.set_fpu(&regs::boot_fpu()).map_err(setup("KVM_SET_FPU"))?;

        // LINT0 = ExtINT (the 8259), LINT1 = NMI, as firmware would leave them.
        let mut lapic = fd.get_lapic().map_err(setup("KVM_GET_LAPIC"))?;
        set_lvt_mode(&mut lapic.regs, APIC_LVT0, APIC_MODE_EXTINT);
        set_lvt_mode(&mut lapic.regs, APIC_LVT1, APIC_MODE_NMI);
        fd.set_lapic(&lapic).map_err(setup("KVM_SET_LAPIC"))?;

        Ok(Vcpu { index, fd, pause: None })
    }

    /// A vCPU whose state was loaded from a snapshot (`snapshot::restore_vcpu`).
    pub fn restored(index: u8, fd: VcpuFd) -> Self {
        Vcpu { index, fd, pause: None }
    }

    /// Makes the vCPU pausable through `handle` (see snapshot::pause).
    pub fn with_pause(mut self, handle: Arc<PauseHandle>) -> Self {
        self.pause = Some(handle);
        self
    }

    /// Runs the vCPU on its own thread until the VM exits. The thread installs its seccomp
    /// filter (when on) before the first KVM_RUN; the call returns once it is installed.
    pub fn spawn(
        self,
        mem: GuestMemoryMmap,
        pio: Arc<Bus>,
        mmio: Arc<Bus>,
        exit: Arc<ExitSignal>,
        symbols: Arc<Symbols>,
    ) -> Result<JoinHandle<()>, VcpuError> {
        let index = self.index;
        crate::debug::install_kick_handler();
        crate::seccomp::spawn_confined(ThreadKind::Vcpu, format!("vcpu-{index}"), move || {
            self.run(&mem, &pio, &mmio, &exit, &symbols)
        })
        .map_err(|source| VcpuError::Spawn { index, source })
    }

    fn run(mut self, mem: &GuestMemoryMmap, pio: &Bus, mmio: &Bus, exit: &ExitSignal, symbols: &Symbols) {
        let pause = self.pause.take();
        let _attached = pause.as_deref().map(|p| p.attach(&mut self.fd));
        while !exit.is_set() {
            if crate::debug::take_dump_request(self.index) {
                crate::debug::print_state(self.index, &self.fd, symbols);
                crate::debug::dump_done(self.index);
            }
            let result = match self.fd.run() {
                Ok(VcpuExit::IoIn(port, data)) => {
                    pio.read(u64::from(port), data);
                    None
                }
                Ok(VcpuExit::IoOut(port, data)) => {
                    pio.write(u64::from(port), data);
                    None
                }
                Ok(VcpuExit::MmioRead(addr, data)) => {
                    if !mmio.read(addr, data) {
                        tracing::trace!("unclaimed MMIO read at {addr:#x}");
                    }
                    None
                }
                Ok(VcpuExit::MmioWrite(addr, data)) => {
                    if !mmio.write(addr, data) {
                        tracing::trace!("unclaimed MMIO write at {addr:#x}");
                    }
                    None
                }
                Ok(VcpuExit::Shutdown) => Some(ExitReason::Reset("triple fault")),
                Ok(VcpuExit::SystemEvent(kind, _)) => {
                    Some(ExitReason::Reset(if kind == kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN {
                        "shutdown"
                    } else {
                        "system reset"
                    }))
                }
                Ok(VcpuExit::Hlt) => Some(ExitReason::Reset("halt")),
                Ok(VcpuExit::InternalError) => Some(ExitReason::Fault(self.internal_error(mem, symbols))),
                Ok(VcpuExit::FailEntry(reason, cpu)) => Some(ExitReason::Fault(format!(
                    "vCPU {} failed to enter the guest (hardware reason {reason:#x}, cpu {cpu})",
                    self.index
                ))),
                Ok(VcpuExit::Intr) => None,
                Ok(other) => {
                    tracing::warn!(vcpu = self.index, "unhandled exit {other:?}");
                    None
                }
                Err(e) if e.errno() == libc::EINTR => {
                    if pause.as_deref().is_some_and(|p| p.on_interrupted(&mut self.fd) == Resume::Exit) {
                        break;
                    }
                    None
                }
                Err(e) if e.errno() == libc::EAGAIN => None,
                Err(e) => Some(ExitReason::Fault(format!("vCPU {}: KVM_RUN failed: {e}", self.index))),
            };
            if let Some(reason) = result {
                exit.set(reason);
            }
        }
    }

    /// Describes a KVM_EXIT_INTERNAL_ERROR: suberror, RIP, and the instruction bytes there
    /// (on PVM hosts: an instruction the ring-0 emulator cannot run).
    fn internal_error(&mut self, mem: &GuestMemoryMmap, symbols: &Symbols) -> String {
        // SAFETY: the last exit was KVM_EXIT_INTERNAL_ERROR, so `internal` is the active
        // member of the kvm_run exit union.
        let suberror = unsafe { self.fd.get_kvm_run().__bindgen_anon_1.internal.suberror };
        let mut msg = format!(
            "vCPU {} stopped: KVM internal error (suberror {suberror}{})",
            self.index,
            if suberror == 1 { ", emulation failure" } else { "" }
        );
        if let Ok(r) = self.fd.get_regs() {
            msg.push_str(&format!(" at RIP {:#018x}{}", r.rip, symbols.describe(r.rip)));
            if let Ok(t) = self.fd.translate_gva(r.rip) {
                let mut bytes = [0u8; 16];
                if t.valid != 0 && mem.read_slice(&mut bytes, GuestAddress(t.physical_address)).is_ok() {
                    let hex: Vec<String> = bytes.iter().map(|b| format!("{b:02x}")).collect();
                    msg.push_str(&format!(", instruction bytes: {}", hex.join(" ")));
                }
            }
        }
        msg
    }
}

fn boot_msrs() -> Msrs {
    let entry = |index, data| kvm_msr_entry { index, data, ..Default::default() };
    let entries = [
        entry(MSR_IA32_SYSENTER_CS, 0),
        entry(MSR_IA32_SYSENTER_ESP, 0),
        entry(MSR_IA32_SYSENTER_EIP, 0),
        entry(MSR_STAR, 0),
        entry(MSR_CSTAR, 0),
        entry(MSR_KERNEL_GS_BASE, 0),
        entry(MSR_SYSCALL_MASK, 0),
        entry(MSR_LSTAR, 0),
        entry(MSR_IA32_TSC, 0),
        entry(MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        entry(MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WRITEBACK),
    ];
    // The list is far below the FAM capacity, so this cannot fail.
    Msrs::from_entries(&entries).unwrap_or_else(|_| Msrs::new(0).expect("empty Msrs"))
}

fn set_lvt_mode(regs: &mut [std::os::raw::c_char; 1024], offset: usize, mode: u32) {
    let mut b = [0u8; 4];
    for (i, x) in b.iter_mut().enumerate() {
        *x = regs[offset + i] as u8;
    }
    let v = (u32::from_le_bytes(b) & !0x700) | (mode << 8);
    for (i, x) in v.to_le_bytes().iter().enumerate() {
        regs[offset + i] = *x as std::os::raw::c_char;
    }
}
