//! vCPU and VM state: read from KVM on a paused VM, written back into a fresh one.
//!
//! The order of the SET ioctls matters (the reasons are Firecracker's and the KVM API
//! documentation's, checked on this host by ../shared/probes/snapshot_restore.c):
//! CPUID first (later ioctls depend on the CPU model); REGS before VCPU_EVENTS (SET_REGS
//! drops a pending exception that the events restore); SREGS before LAPIC (SREGS carries the
//! APIC base); LAPIC before MSRs (the TSC-deadline MSR only sticks with the LAPIC set up);
//! MSR_IA32_TSC before MSR_IA32_TSC_DEADLINE; VCPU_EVENTS last. On the VM: PIT and irqchips,
//! then the clock, as late as possible.
//!
//! KVM_GET/SET_SREGS, not SREGS2: kvm-ioctls 0.25 has no SREGS2, whose only addition is the
//! PAE PDPTRs of a 32-bit PAE guest; a 64-bit kernel in long mode does not use them.

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_fpu, kvm_irqchip, kvm_lapic_state,
    kvm_mp_state, kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs,
    kvm_xsave, CpuId, Msrs, Xsave, KVM_CLOCK_TSC_STABLE, KVM_IRQCHIP_IOAPIC,
    KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_MAX_CPUID_ENTRIES, KVM_MAX_MSR_ENTRIES,
    KVM_VCPUEVENT_VALID_SIPI_VECTOR,
};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

use super::{kvm_err, pod, SnapshotError};

const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;
/// Bound on saved MSRs (KVM lists ~40-100); a state file claiming more is damaged.
const MAX_MSRS: usize = 4 * KVM_MAX_MSR_ENTRIES;
/// Bound on the XSAVE area: 4 KiB legacy, AMX makes it ~11 KiB; 64 KiB is far beyond any CPU.
const MAX_XSAVE_BYTES: usize = 64 << 10;
const XSAVE_LEGACY_WORDS: usize = std::mem::size_of::<kvm_xsave>() / 4;
/// TSC frequencies closer than this (parts per million) count as equal: hosts calibrate
/// their TSC at boot with that much jitter (QEMU and Firecracker use the same tolerance).
const TSC_KHZ_TOLERANCE_PPM: u64 = 250;

/// What the host's KVM says about state that varies by host: which MSRs to save and how
/// big the XSAVE area is. Read once per VM; shared with the vCPU threads.
#[derive(Clone, Debug)]
pub struct KvmCaps {
    /// KVM_GET_MSR_INDEX_LIST: the MSRs KVM wants saved.
    pub msr_indices: Vec<u32>,
    /// Bytes KVM_GET_XSAVE2 fills (KVM_CAP_XSAVE2), or 4096 where only KVM_GET_XSAVE exists.
    pub xsave_size: usize,
    pub xsave2: bool,
}

impl KvmCaps {
    pub fn new(kvm: &Kvm, vm: &VmFd) -> Result<Self, SnapshotError> {
        let list = kvm
            .get_msr_index_list()
            .map_err(kvm_err("KVM_GET_MSR_INDEX_LIST"))?;
        let xsave2 = vm.check_extension_int(Cap::Xsave2);
        let legacy = std::mem::size_of::<kvm_xsave>();
        Ok(KvmCaps {
            msr_indices: list.as_slice().to_vec(),
            xsave_size: if xsave2 > 0 {
                (xsave2 as usize).max(legacy)
            } else {
                legacy
            },
            xsave2: xsave2 > 0,
        })
    }

    fn xsave_words(&self) -> usize {
        self.xsave_size.div_ceil(4)
    }
}

/// kvm_fpu has no byte view in kvm-bindings, so it gets a serde mirror.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Fpu {
    pub fpr: [[u8; 16]; 8],
    pub fcw: u16,
    pub fsw: u16,
    pub ftwx: u8,
    pub last_opcode: u16,
    pub last_ip: u64,
    pub last_dp: u64,
    pub xmm: [[u8; 16]; 16],
    pub mxcsr: u32,
}

impl From<&kvm_fpu> for Fpu {
    fn from(f: &kvm_fpu) -> Self {
        Fpu {
            fpr: f.fpr,
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm,
            mxcsr: f.mxcsr,
        }
    }
}

impl From<&Fpu> for kvm_fpu {
    fn from(f: &Fpu) -> Self {
        kvm_fpu {
            fpr: f.fpr,
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm,
            mxcsr: f.mxcsr,
            ..Default::default()
        }
    }
}

/// One vCPU's architectural state.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VcpuState {
    #[serde(with = "pod::vec")]
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// (index, value) of every MSR of KVM_GET_MSR_INDEX_LIST that this vCPU could read.
    pub msrs: Vec<(u32, u64)>,
    #[serde(with = "pod")]
    pub regs: kvm_regs,
    #[serde(with = "pod")]
    pub sregs: kvm_sregs,
    pub fpu: Fpu,
    /// The whole kvm_xsave area (legacy 4 KiB region plus the KVM_GET_XSAVE2 extension).
    #[serde(with = "pod::vec")]
    pub xsave: Vec<u32>,
    #[serde(with = "pod")]
    pub xcrs: kvm_xcrs,
    #[serde(with = "pod")]
    pub debugregs: kvm_debugregs,
    #[serde(with = "pod")]
    pub lapic: kvm_lapic_state,
    #[serde(with = "pod")]
    pub events: kvm_vcpu_events,
    #[serde(with = "pod")]
    pub mp_state: kvm_mp_state,
    /// KVM_GET_TSC_KHZ; 0 when this host's KVM could not say.
    pub tsc_khz: u32,
}

impl VcpuState {
    /// Bounds the lists a damaged or hostile state file could make huge.
    pub fn validate(&self) -> Result<(), String> {
        if self.cpuid.len() > KVM_MAX_CPUID_ENTRIES {
            return Err(format!(
                "{} CPUID entries (at most {KVM_MAX_CPUID_ENTRIES})",
                self.cpuid.len()
            ));
        }
        if self.msrs.len() > MAX_MSRS {
            return Err(format!("{} MSRs (at most {MAX_MSRS})", self.msrs.len()));
        }
        if self.xsave.len() < XSAVE_LEGACY_WORDS || self.xsave.len() * 4 > MAX_XSAVE_BYTES {
            return Err(format!("XSAVE area of {} bytes", self.xsave.len() * 4));
        }
        Ok(())
    }
}

/// The VM-wide interrupt controllers, PIT and kvmclock.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VmState {
    #[serde(with = "pod")]
    pub pit: kvm_pit_state2,
    #[serde(with = "pod")]
    pub clock: kvm_clock_data,
    #[serde(with = "pod")]
    pub pic_master: kvm_irqchip,
    #[serde(with = "pod")]
    pub pic_slave: kvm_irqchip,
    #[serde(with = "pod")]
    pub ioapic: kvm_irqchip,
}

impl VmState {
    pub fn validate(&self) -> Result<(), String> {
        for (chip, id) in [
            (&self.pic_master, KVM_IRQCHIP_PIC_MASTER),
            (&self.pic_slave, KVM_IRQCHIP_PIC_SLAVE),
            (&self.ioapic, KVM_IRQCHIP_IOAPIC),
        ] {
            if chip.chip_id != id {
                return Err(format!("irqchip {} where {id} belongs", chip.chip_id));
            }
        }
        Ok(())
    }
}

/// Reads a paused vCPU's state. Call it on the vCPU's own thread (see `PauseHandle::save`),
/// after KVM_RUN returned EINTR with `immediate_exit` set, so that a pending port or MMIO read
/// has been completed into the registers.
pub fn capture_vcpu(fd: &VcpuFd, caps: &KvmCaps) -> Result<VcpuState, SnapshotError> {
    // MP_STATE first: reading it makes KVM process pending INIT/SIPI, which changes other state.
    let mp_state = fd.get_mp_state().map_err(kvm_err("KVM_GET_MP_STATE"))?;
    let regs = fd.get_regs().map_err(kvm_err("KVM_GET_REGS"))?;
    let sregs = fd.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
    let fpu = Fpu::from(&fd.get_fpu().map_err(kvm_err("KVM_GET_FPU"))?);
    let xsave = get_xsave(fd, caps)?;
    let xcrs = fd.get_xcrs().map_err(kvm_err("KVM_GET_XCRS"))?;
    let debugregs = fd.get_debug_regs().map_err(kvm_err("KVM_GET_DEBUGREGS"))?;
    let lapic = fd.get_lapic().map_err(kvm_err("KVM_GET_LAPIC"))?;
    let tsc_khz = fd.get_tsc_khz().unwrap_or_else(|e| {
        tracing::warn!(
            "KVM_GET_TSC_KHZ failed ({e}): the snapshot will not check the TSC frequency"
        );
        0
    });
    let mut cpuid = fd
        .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_err("KVM_GET_CPUID2"))?
        .as_slice()
        .to_vec();
    // KVM_GET_CPUID2 leaves nent alone: trailing all-zero entries are padding.
    cpuid.retain(|e| !(e.function == 0 && e.index == 0 && e.flags == 0 && e.eax == 0));
    let msrs = read_msrs(fd, &caps.msr_indices)?;
    // Last: the other GETs may have changed what is pending.
    let events = fd
        .get_vcpu_events()
        .map_err(kvm_err("KVM_GET_VCPU_EVENTS"))?;
    Ok(VcpuState {
        cpuid,
        msrs,
        regs,
        sregs,
        fpu,
        xsave,
        xcrs,
        debugregs,
        lapic,
        events,
        mp_state,
        tsc_khz,
    })
}

/// Loads `state` into a freshly created vCPU (not yet run). Refuses a snapshot whose TSC
/// frequency or XSAVE size differs from this host's before changing anything.
pub fn restore_vcpu(fd: &VcpuFd, state: &VcpuState, caps: &KvmCaps) -> Result<(), SnapshotError> {
    check_tsc_khz(fd, state.tsc_khz)?;
    if state.xsave.len() != caps.xsave_words() {
        return Err(SnapshotError::XsaveSize {
            snapshot: state.xsave.len() * 4,
            host: caps.xsave_size,
        });
    }
    let cpuid = CpuId::from_entries(&state.cpuid).map_err(|_| SnapshotError::Corrupt {
        path: "state".into(),
        reason: format!("{} CPUID entries", state.cpuid.len()),
    })?;
    fd.set_cpuid2(&cpuid).map_err(kvm_err("KVM_SET_CPUID2"))?;
    fd.set_mp_state(state.mp_state)
        .map_err(kvm_err("KVM_SET_MP_STATE"))?;
    fd.set_regs(&state.regs).map_err(kvm_err("KVM_SET_REGS"))?;
    fd.set_sregs(&state.sregs)
        .map_err(kvm_err("KVM_SET_SREGS"))?;
    fd.set_fpu(&kvm_fpu::from(&state.fpu))
        .map_err(kvm_err("KVM_SET_FPU"))?;
    set_xsave(fd, &state.xsave)?;
    fd.set_xcrs(&state.xcrs).map_err(kvm_err("KVM_SET_XCRS"))?;
    fd.set_debug_regs(&state.debugregs)
        .map_err(kvm_err("KVM_SET_DEBUGREGS"))?;
    fd.set_lapic(&state.lapic)
        .map_err(kvm_err("KVM_SET_LAPIC"))?;
    let (deferred, first): (Vec<_>, Vec<_>) = state
        .msrs
        .iter()
        .partition(|(i, _)| *i == MSR_IA32_TSC_DEADLINE);
    write_msrs(fd, &first)?;
    write_msrs(fd, &deferred)?;
    let mut events = state.events;
    events.flags |= KVM_VCPUEVENT_VALID_SIPI_VECTOR;
    fd.set_vcpu_events(&events)
        .map_err(kvm_err("KVM_SET_VCPU_EVENTS"))?;
    kvmclock_ctrl(fd);
    Ok(())
}

/// Tells a guest using kvmclock that it was stopped, so its soft-lockup watchdog does not
/// fire on the jump in time. EINVAL when the guest has no kvmclock: not an error.
pub fn kvmclock_ctrl(fd: &VcpuFd) {
    if let Err(e) = fd.kvmclock_ctrl() {
        tracing::debug!("KVM_KVMCLOCK_CTRL: {e} (the guest may not use kvmclock)");
    }
}

/// Reads the VM-wide state. Every vCPU must be paused.
pub fn capture_vm(vm: &VmFd) -> Result<VmState, SnapshotError> {
    let pit = vm.get_pit2().map_err(kvm_err("KVM_GET_PIT2"))?;
    let mut clock = vm.get_clock().map_err(kvm_err("KVM_GET_CLOCK"))?;
    // Older kernels refuse KVM_SET_CLOCK with this (output-only) flag set.
    clock.flags &= !KVM_CLOCK_TSC_STABLE;
    let chip = |chip_id| -> Result<kvm_irqchip, SnapshotError> {
        let mut c = kvm_irqchip {
            chip_id,
            ..Default::default()
        };
        vm.get_irqchip(&mut c).map_err(kvm_err("KVM_GET_IRQCHIP"))?;
        Ok(c)
    };
    Ok(VmState {
        pit,
        clock,
        pic_master: chip(KVM_IRQCHIP_PIC_MASTER)?,
        pic_slave: chip(KVM_IRQCHIP_PIC_SLAVE)?,
        ioapic: chip(KVM_IRQCHIP_IOAPIC)?,
    })
}

/// Loads the VM-wide state into a VM that has its irqchip and PIT created (as at boot).
/// Call it after every vCPU is restored and just before they run: the clock goes last.
pub fn restore_vm(vm: &VmFd, state: &VmState) -> Result<(), SnapshotError> {
    vm.set_pit2(&state.pit).map_err(kvm_err("KVM_SET_PIT2"))?;
    vm.set_irqchip(&state.pic_master)
        .map_err(kvm_err("KVM_SET_IRQCHIP (PIC master)"))?;
    vm.set_irqchip(&state.pic_slave)
        .map_err(kvm_err("KVM_SET_IRQCHIP (PIC slave)"))?;
    vm.set_irqchip(&state.ioapic)
        .map_err(kvm_err("KVM_SET_IRQCHIP (IOAPIC)"))?;
    vm.set_clock(&state.clock)
        .map_err(kvm_err("KVM_SET_CLOCK"))?;
    Ok(())
}

fn check_tsc_khz(fd: &VcpuFd, snapshot: u32) -> Result<(), SnapshotError> {
    let host = match fd.get_tsc_khz() {
        Ok(h) => h,
        Err(e) => {
            tracing::warn!(
                "KVM_GET_TSC_KHZ failed ({e}): cannot check the snapshot's TSC frequency"
            );
            return Ok(());
        }
    };
    if snapshot == 0 {
        tracing::warn!("the snapshot does not record a TSC frequency: not checked");
        return Ok(());
    }
    let diff = u64::from(host.abs_diff(snapshot));
    if diff * 1_000_000 > u64::from(snapshot) * TSC_KHZ_TOLERANCE_PPM {
        return Err(SnapshotError::TscKhz { snapshot, host });
    }
    Ok(())
}

/// Reads `indices` in chunks KVM accepts. KVM_GET_MSRS stops at the first MSR it cannot read
/// and returns how many it read: that MSR is skipped and the rest read on.
fn read_msrs(fd: &VcpuFd, indices: &[u32]) -> Result<Vec<(u32, u64)>, SnapshotError> {
    let mut out = Vec::with_capacity(indices.len());
    let mut rest = indices;
    while !rest.is_empty() {
        let chunk = &rest[..rest.len().min(KVM_MAX_MSR_ENTRIES)];
        let entries: Vec<kvm_msr_entry> = chunk
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs =
            Msrs::from_entries(&entries).map_err(|_| SnapshotError::TooMany { what: "MSRs" })?;
        let n = fd
            .get_msrs(&mut msrs)
            .map_err(kvm_err("KVM_GET_MSRS"))?
            .min(chunk.len());
        out.extend(msrs.as_slice()[..n].iter().map(|e| (e.index, e.data)));
        if n < chunk.len() {
            tracing::debug!(
                "MSR {:#x} is listed by KVM but not readable: not saved",
                chunk[n]
            );
            rest = &rest[n + 1..];
        } else {
            rest = &rest[n..];
        }
    }
    Ok(out)
}

fn write_msrs(fd: &VcpuFd, msrs: &[&(u32, u64)]) -> Result<(), SnapshotError> {
    for chunk in msrs.chunks(KVM_MAX_MSR_ENTRIES) {
        let entries: Vec<kvm_msr_entry> = chunk
            .iter()
            .map(|&&(index, data)| kvm_msr_entry {
                index,
                data,
                ..Default::default()
            })
            .collect();
        let msrs =
            Msrs::from_entries(&entries).map_err(|_| SnapshotError::TooMany { what: "MSRs" })?;
        let n = fd.set_msrs(&msrs).map_err(kvm_err("KVM_SET_MSRS"))?;
        if n < entries.len() {
            return Err(SnapshotError::MsrRejected {
                index: entries[n].index,
            });
        }
    }
    Ok(())
}

fn get_xsave(fd: &VcpuFd, caps: &KvmCaps) -> Result<Vec<u32>, SnapshotError> {
    if !caps.xsave2 {
        return Ok(fd
            .get_xsave()
            .map_err(kvm_err("KVM_GET_XSAVE"))?
            .region
            .to_vec());
    }
    let mut xsave = new_xsave(caps.xsave_words())?;
    // SAFETY: `xsave` holds caps.xsave_size bytes (rounded up to whole u32s), the size
    // KVM_CHECK_EXTENSION(KVM_CAP_XSAVE2) reported for this VM, so the kernel writes within it.
    unsafe { fd.get_xsave2(&mut xsave) }.map_err(kvm_err("KVM_GET_XSAVE2"))?;
    let mut words = xsave.as_fam_struct_ref().xsave.region.to_vec();
    words.extend_from_slice(xsave.as_slice());
    Ok(words)
}

/// `words` was checked against this host's XSAVE size by the caller.
fn set_xsave(fd: &VcpuFd, words: &[u32]) -> Result<(), SnapshotError> {
    let mut xsave = new_xsave(words.len())?;
    let (region, extra) = words.split_at(XSAVE_LEGACY_WORDS);
    // SAFETY: only the fixed region array is written, not the FAM length field, so the
    // wrapper's length invariant still holds.
    unsafe { xsave.as_mut_fam_struct() }
        .xsave
        .region
        .copy_from_slice(region);
    xsave.as_mut_slice().copy_from_slice(extra);
    // SAFETY: `xsave` holds exactly `words.len()` u32s, which equals this host's
    // KVM_CAP_XSAVE2 size (or 4096 bytes without it), so KVM reads within the buffer.
    unsafe { fd.set_xsave2(&xsave) }.map_err(kvm_err("KVM_SET_XSAVE"))
}

fn new_xsave(words: usize) -> Result<Xsave, SnapshotError> {
    let extra = words.saturating_sub(XSAVE_LEGACY_WORDS);
    Xsave::new(extra).map_err(|_| SnapshotError::TooMany {
        what: "XSAVE words",
    })
}
