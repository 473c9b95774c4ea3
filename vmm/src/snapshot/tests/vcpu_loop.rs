//! The same save/restore through microvm's own vCPU loop (vcpu.rs): `Vcpu::with_pause`,
//! port I/O dispatched by the real bus; a paused VM is resumed once, then saved and restored.

use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use devices::bus::BusDevice;
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress};

use super::guest::*;
use super::{expected_first_exit, tempdir, ITERATIONS, PAUSE_TIMEOUT};
use crate::bus::Bus;
use crate::exit::{ExitReason, ExitSignal};
use crate::memory::GuestMemoryMmap;
use crate::snapshot::*;
use crate::vcpu::Vcpu;

/// Port 0x10: logs the counter guest's `out`s with the counter in memory.
struct CounterPort {
    mem: GuestMemoryMmap,
    log: Arc<ExitLog>,
}

impl BusDevice for CounterPort {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        let counter = self.mem.read_obj(GuestAddress(CNT)).unwrap_or(u64::MAX);
        let value = data.first().copied().unwrap_or(0);
        self.log.push(OutExit {
            port: PORT_COUNT,
            value,
            rip: 0,
            r12: 0,
            counter,
            at: Instant::now(),
        });
    }
}

struct Running {
    handle: Arc<PauseHandle>,
    log: Arc<ExitLog>,
    exit: Arc<ExitSignal>,
    thread: JoinHandle<()>,
}

fn run(mem: &GuestMemoryMmap, fd: VcpuFd) -> Running {
    let log = Arc::new(ExitLog::default());
    let mut pio = Bus::default();
    pio.insert(
        u64::from(PORT_COUNT),
        1,
        Arc::new(Mutex::new(CounterPort {
            mem: mem.clone(),
            log: log.clone(),
        })),
    )
    .unwrap();
    let exit = Arc::new(ExitSignal::new().unwrap());
    let handle = PauseHandle::new(0);
    let thread = Vcpu::restored(0, fd)
        .with_pause(handle.clone())
        .spawn(
            mem.clone(),
            Arc::new(pio),
            Arc::new(Bus::default()),
            exit.clone(),
            Arc::new(crate::symbols::Symbols::new(None)),
        )
        .unwrap();
    Running {
        handle,
        log,
        exit,
        thread,
    }
}

impl Running {
    fn wait_for(&self, n: usize) -> Vec<OutExit> {
        self.log
            .wait_for(n, Duration::from_secs(5))
            .unwrap_or_else(|| panic!("no exit {n}: {:?}", self.exit.get()))
    }

    fn stop(self) {
        self.exit.set(ExitReason::Signal(0));
        self.handle.exit();
        self.thread.join().unwrap();
    }
}

#[test]
fn pause_resume_save_restore_on_microvms_vcpu_loop() {
    let dir = tempdir("vcpuloop").join("snap");
    let t = new_vm(None);
    let fd = boot_payload(&t, Payload::Count, ITERATIONS);
    let vm1 = run(&t.mem, fd);
    vm1.wait_for(2);

    // Pause and resume: the guest goes on counting.
    PauseHandle::pause_all(std::slice::from_ref(&vm1.handle), PAUSE_TIMEOUT).unwrap();
    assert!(vm1.handle.is_paused());
    let n = vm1.wait_for(0).len();
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(vm1.wait_for(0).len(), n, "a paused vCPU ran on");
    vm1.handle.resume();
    let exits = vm1.wait_for(n + 2);
    for w in exits.windows(2) {
        assert_eq!(w[1].counter, w[0].counter + ITERATIONS, "{w:?}");
    }

    // Pause mid-chunk, save, stop.
    std::thread::sleep((exits[n + 1].at - exits[n].at) / 3);
    PauseHandle::pause_all(std::slice::from_ref(&vm1.handle), PAUSE_TIMEOUT).unwrap();
    let caps = Arc::new(KvmCaps::new(&t.kvm, &t.vm).unwrap());
    let vcpu = vm1.handle.save(&caps).unwrap();
    let state = SnapshotState::new(
        capture_vm(&t.vm).unwrap(),
        vec![vcpu],
        serde_json::json!({}),
        serde_json::json!({}),
    );
    save(&dir, &state, &t.mem).unwrap();
    let c0: u64 = t.mem.read_obj(GuestAddress(CNT)).unwrap();
    vm1.stop();
    drop(t);

    let snap = load(&dir).unwrap();
    let t2 = new_vm(Some(snap.map_memory().unwrap()));
    let caps = KvmCaps::new(&t2.kvm, &t2.vm).unwrap();
    let fd = t2.vm.create_vcpu(0).unwrap();
    restore_vcpu(&fd, &snap.state.vcpus[0], &caps).unwrap();
    restore_vm(&t2.vm, &snap.state.vm).unwrap();
    let vm2 = run(&t2.mem, fd);
    let exits = vm2.wait_for(2);
    let (want, _) = expected_first_exit(&state.vcpus[0].regs, c0);
    assert_eq!(
        exits[0].counter, want,
        "saved at rip {:#x}, rbx {}",
        state.vcpus[0].regs.rip, state.vcpus[0].regs.rbx
    );
    assert_eq!(exits[1].counter, want + ITERATIONS);
    vm2.stop();
    std::fs::remove_dir_all(dir.parent().unwrap()).unwrap();
}
