//! Tiny guests for the snapshot tests (no kernel): a ring-3 counter and two ring-0 timer
//! loops, assembled by hand (GNU as listings beside the bytes), plus a VM harness that runs
//! one vCPU on its own thread with a `PauseHandle`, the way a VMM would.

use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_pit_config, kvm_segment, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use vm_memory::{Bytes, GuestAddress};

use crate::layout::KVM_TSS_ADDR;
use crate::memory::GuestMemoryMmap;
use crate::snapshot::pause::{PauseHandle, Resume};

pub const MEM_SIZE: usize = 32 << 20;
pub const CODE_COUNT: u64 = 0x1_0000;
pub const CODE_PIT: u64 = 0x2_0000;
pub const CODE_LAPIC: u64 = 0x2_1000;
/// Ring-3 loop counter; PIT ticks; LAPIC ticks.
pub const CNT: u64 = 0x3_0000;
pub const TICKS_PIT: u64 = 0x3_0008;
pub const TICKS_LAPIC: u64 = 0x3_0010;
pub const PORT_COUNT: u16 = 0x10;
pub const PORT_PIT: u16 = 0x11;
pub const PORT_LAPIC: u16 = 0x12;

/// ```text
///  0: 4c 89 eb              loop: mov %r13,%rbx          (rbx = iterations per chunk)
///  3: 48 ff 04 25 00 00 03 00  inc: incq 0x30000
///  b: 48 ff cb              dec:  dec %rbx
///  e: 75 f3                 jnz:  jne inc
/// 10: 49 ff c4              after: inc %r12              (r12 = chunks done)
/// 13: 48 8b 04 25 00 00 03 00  mov 0x30000,%rax
/// 1b: e6 10                 out:  out %al,$0x10
/// 1d: eb e1                 jmp:  jmp loop
/// ```
pub const COUNT_CODE: &[u8] = &[
    0x4c, 0x89, 0xeb, 0x48, 0xff, 0x04, 0x25, 0x00, 0x00, 0x03, 0x00, 0x48, 0xff, 0xcb, 0x75, 0xf3,
    0x49, 0xff, 0xc4, 0x48, 0x8b, 0x04, 0x25, 0x00, 0x00, 0x03, 0x00, 0xe6, 0x10, 0xeb, 0xe1,
];
pub mod count_at {
    pub const INC: u64 = 0x3;
    pub const DEC: u64 = 0xb;
    pub const JNZ: u64 = 0xe;
    pub const AFTER: u64 = 0x10;
    pub const MOV: u64 = 0x13;
    pub const OUT: u64 = 0x1b;
}

/// ```text
/// 00: PIC init: ICW1 0x11 to 0x20/0xa0, ICW2 0x20/0x28, ICW3 4/2, ICW4 1, mask all but IRQ0
/// 24: PIT ch0 mode 2 (0x34 to 0x43), count 0xe90b (20 Hz) to 0x40
/// 30: sti
/// 31: hlt                   hlt: hlt
/// 32: eb fd                      jmp hlt
/// 80: isr: incq 0x30008; push %rax; EOI (0x20 to 0x20); mov 0x30008,%rax; out %al,$0x11;
///          pop %rax; iretq
/// ```
pub const PIT_CODE: &[u8] = &[
    0xb0, 0x11, 0xe6, 0x20, 0xe6, 0xa0, 0xb0, 0x20, 0xe6, 0x21, 0xb0, 0x28, 0xe6, 0xa1, 0xb0, 0x04,
    0xe6, 0x21, 0xb0, 0x02, 0xe6, 0xa1, 0xb0, 0x01, 0xe6, 0x21, 0xe6, 0xa1, 0xb0, 0xfe, 0xe6, 0x21,
    0xb0, 0xff, 0xe6, 0xa1, 0xb0, 0x34, 0xe6, 0x43, 0xb0, 0x0b, 0xe6, 0x40, 0xb0, 0xe9, 0xe6, 0x40,
    0xfb, 0xf4, 0xeb, 0xfd,
];
pub const PIT_ISR: &[u8] = &[
    0x48, 0xff, 0x04, 0x25, 0x08, 0x00, 0x03, 0x00, 0x50, 0xb0, 0x20, 0xe6, 0x20, 0x48, 0x8b, 0x04,
    0x25, 0x08, 0x00, 0x03, 0x00, 0xe6, 0x11, 0x58, 0x48, 0xcf,
];

/// ```text
/// 00: SVR (0xfee000f0) = 0x1ff; divide (0xfee003e0) = 0xb (by 1);
///     LVTT (0xfee00320) = 0x20040 (periodic, vector 0x40); TMICT (0xfee00380) = 50e6 (50 ms)
/// 2c: sti
/// 2d: hlt                   hlt: hlt
/// 2e: eb fd                      jmp hlt
/// 80: isr: incq 0x30010; push %rax; push %rdi; EOI (0 to 0xfee000b0); mov 0x30010,%rax;
///          out %al,$0x12; pop %rdi; pop %rax; iretq
/// ```
pub const LAPIC_CODE: &[u8] = &[
    0xbf, 0xf0, 0x00, 0xe0, 0xfe, 0xc7, 0x07, 0xff, 0x01, 0x00, 0x00, 0xbf, 0xe0, 0x03, 0xe0, 0xfe,
    0xc7, 0x07, 0x0b, 0x00, 0x00, 0x00, 0xbf, 0x20, 0x03, 0xe0, 0xfe, 0xc7, 0x07, 0x40, 0x00, 0x02,
    0x00, 0xbf, 0x80, 0x03, 0xe0, 0xfe, 0xc7, 0x07, 0x80, 0xf0, 0xfa, 0x02, 0xfb, 0xf4, 0xeb, 0xfd,
];
pub const LAPIC_ISR: &[u8] = &[
    0x48, 0xff, 0x04, 0x25, 0x10, 0x00, 0x03, 0x00, 0x50, 0x57, 0xbf, 0xb0, 0x00, 0xe0, 0xfe, 0xc7,
    0x07, 0x00, 0x00, 0x00, 0x00, 0x48, 0x8b, 0x04, 0x25, 0x10, 0x00, 0x03, 0x00, 0xe6, 0x12, 0x5f,
    0x58, 0x48, 0xcf,
];
pub const ISR_OFFSET: u64 = 0x80;
pub const PIT_HLT: u64 = CODE_PIT + 0x31;
pub const LAPIC_HLT: u64 = CODE_LAPIC + 0x2d;

const GDT: u64 = 0x500;
const IDT: u64 = 0x1000;
const PML4: u64 = 0x2000;
const PDPT: u64 = 0x3000;
const PD: u64 = 0x4000;
const PD_HIGH: u64 = 0x5000;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Payload {
    Count,
    Pit,
    Lapic,
}

/// A VM as microvm builds one (TSS, in-kernel irqchip, PIT), with RAM already registered.
pub struct TestVm {
    pub kvm: Kvm,
    pub vm: VmFd,
    pub mem: GuestMemoryMmap,
}

pub fn new_vm(mem: Option<GuestMemoryMmap>) -> TestVm {
    let kvm = Kvm::new().expect("/dev/kvm");
    let vm = kvm.create_vm().unwrap();
    vm.set_tss_address(KVM_TSS_ADDR as usize).unwrap();
    vm.create_irq_chip().unwrap();
    vm.create_pit2(kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    })
    .unwrap();
    let mem = mem
        .unwrap_or_else(|| GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap());
    crate::snapshot::memory::register(&vm, &mem).unwrap();
    TestVm { kvm, vm, mem }
}

/// Page tables, GDT, IDT and the payloads in guest memory; vCPU 0 set up to run `payload`.
pub fn boot_payload(t: &TestVm, payload: Payload, iterations: u64) -> VcpuFd {
    let m = &t.mem;
    let gdt: [u64; 5] = [
        0,
        0x00af_9b00_0000_ffff,
        0x00cf_9300_0000_ffff,
        0x00cf_f300_0000_ffff,
        0x00af_fb00_0000_ffff,
    ];
    for (i, e) in gdt.iter().enumerate() {
        m.write_obj(*e, GuestAddress(GDT + 8 * i as u64)).unwrap();
    }
    // 2 MiB user page at 0, and the LAPIC page (uncached) in the 3-4 GiB directory.
    m.write_obj(PDPT | 7, GuestAddress(PML4)).unwrap();
    m.write_obj(PD | 7, GuestAddress(PDPT)).unwrap();
    m.write_obj(0x87u64, GuestAddress(PD)).unwrap();
    m.write_obj(PD_HIGH | 3, GuestAddress(PDPT + 3 * 8))
        .unwrap();
    m.write_obj(0xfee0_0000u64 | 0x9b, GuestAddress(PD_HIGH + 0x1f7 * 8))
        .unwrap();
    m.write_slice(COUNT_CODE, GuestAddress(CODE_COUNT)).unwrap();
    m.write_slice(PIT_CODE, GuestAddress(CODE_PIT)).unwrap();
    m.write_slice(PIT_ISR, GuestAddress(CODE_PIT + ISR_OFFSET))
        .unwrap();
    m.write_slice(LAPIC_CODE, GuestAddress(CODE_LAPIC)).unwrap();
    m.write_slice(LAPIC_ISR, GuestAddress(CODE_LAPIC + ISR_OFFSET))
        .unwrap();
    for (vector, isr) in [
        (0x20u64, CODE_PIT + ISR_OFFSET),
        (0x40, CODE_LAPIC + ISR_OFFSET),
    ] {
        // 64-bit interrupt gate, selector 0x08, present, DPL 0.
        let low = (isr & 0xffff) | (0x08 << 16) | (0x8e << 40) | (((isr >> 16) & 0xffff) << 48);
        m.write_obj(low, GuestAddress(IDT + vector * 16)).unwrap();
        m.write_obj(isr >> 32, GuestAddress(IDT + vector * 16 + 8))
            .unwrap();
    }

    let fd = t.vm.create_vcpu(0).unwrap();
    fd.set_cpuid2(&t.kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).unwrap())
        .unwrap();
    let mut s = fd.get_sregs().unwrap();
    s.cr3 = PML4;
    s.cr4 = 1 << 5;
    s.cr0 = 0x8005_0033;
    s.efer = 0x500;
    s.gdt.base = GDT;
    s.gdt.limit = 39;
    s.idt.base = IDT;
    s.idt.limit = 0xfff;
    let ring3 = payload == Payload::Count;
    let seg = |selector: u16, type_: u8, l: u8, db: u8| kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: if ring3 { 3 } else { 0 },
        db,
        s: 1,
        l,
        g: 1,
        ..Default::default()
    };
    s.cs = if ring3 {
        seg(0x23, 11, 1, 0)
    } else {
        seg(0x08, 11, 1, 0)
    };
    let data = if ring3 {
        seg(0x1b, 3, 0, 1)
    } else {
        seg(0x10, 3, 0, 1)
    };
    (s.ds, s.es, s.fs, s.gs, s.ss) = (data, data, data, data, data);
    fd.set_sregs(&s).unwrap();
    let mut r = kvm_bindings::kvm_regs {
        rflags: 2,
        rsp: 0x8000,
        ..Default::default()
    };
    match payload {
        Payload::Count => {
            r.rip = CODE_COUNT;
            r.rflags = 0x3002; // IOPL 3: ring 3 may use `out`; IF=0
            r.r13 = iterations;
        }
        Payload::Pit => r.rip = CODE_PIT,
        Payload::Lapic => r.rip = CODE_LAPIC,
    }
    fd.set_regs(&r).unwrap();
    fd
}

/// One port-0x10..0x12 write seen by the vCPU thread.
#[derive(Clone, Copy, Debug)]
pub struct OutExit {
    pub port: u16,
    /// The byte written (the timer payloads write their tick count).
    pub value: u8,
    pub rip: u64,
    pub r12: u64,
    /// The counter (qword at CNT) when the `out` happened.
    pub counter: u64,
    pub at: Instant,
}

#[derive(Default)]
pub struct ExitLog {
    exits: Mutex<(Vec<OutExit>, Option<String>)>,
    cond: Condvar,
}

impl ExitLog {
    /// Waits until `n` exits were logged; None on timeout or vCPU failure (the reason is
    /// in `failure()`).
    pub fn wait_for(&self, n: usize, timeout: Duration) -> Option<Vec<OutExit>> {
        let deadline = Instant::now() + timeout;
        let mut g = self.exits.lock().unwrap();
        loop {
            if g.0.len() >= n {
                return Some(g.0.clone());
            }
            let now = Instant::now();
            if g.1.is_some() || now >= deadline {
                return None;
            }
            g = self.cond.wait_timeout(g, deadline - now).unwrap().0;
        }
    }

    pub fn failure(&self) -> Option<String> {
        self.exits.lock().unwrap().1.clone()
    }

    pub fn push(&self, e: OutExit) {
        self.exits.lock().unwrap().0.push(e);
        self.cond.notify_all();
    }

    fn fail(&self, why: String) {
        self.exits.lock().unwrap().1 = Some(why);
        self.cond.notify_all();
    }
}

/// Runs `fd` on its own thread until `handle.exit()`; returns the fd when done.
pub fn spawn(
    mut fd: VcpuFd,
    mem: GuestMemoryMmap,
    handle: Arc<PauseHandle>,
    log: Arc<ExitLog>,
) -> JoinHandle<VcpuFd> {
    std::thread::spawn(move || {
        let attached = handle.attach(&mut fd);
        loop {
            match fd.run() {
                Ok(VcpuExit::IoOut(port, data)) => {
                    let value = data.first().copied().unwrap_or(0);
                    let r = fd.get_regs().unwrap();
                    let counter = mem.read_obj(GuestAddress(CNT)).unwrap();
                    log.push(OutExit {
                        port,
                        value,
                        rip: r.rip,
                        r12: r.r12,
                        counter,
                        at: Instant::now(),
                    });
                }
                Ok(other) => {
                    let other = format!("{other:?}");
                    let rip = fd.get_regs().map(|r| r.rip).unwrap_or(0);
                    log.fail(format!("unexpected exit {other} at rip {rip:#x}"));
                    // Park until told to exit: the test reads the state.
                    handle.request_pause();
                }
                Err(e) if e.errno() == libc::EINTR => {
                    if handle.on_interrupted(&mut fd) == Resume::Exit {
                        break;
                    }
                }
                Err(e) => {
                    log.fail(format!("KVM_RUN: {e}"));
                    handle.request_pause();
                }
            }
        }
        drop(attached);
        fd
    })
}

/// vCPU `index` of 2 as KVM creates an application processor: CPUID set, waiting for
/// INIT/SIPI (its KVM_RUN blocks until then).
pub fn add_ap(t: &TestVm, index: u8) -> VcpuFd {
    let fd = t.vm.create_vcpu(u64::from(index)).unwrap();
    let mut cpuid = t.kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).unwrap();
    crate::cpuid::fix_topology(&mut cpuid, index, 2);
    fd.set_cpuid2(&cpuid).unwrap();
    fd
}
