//! Snapshot/restore with real KVM (run as root, like the other vmm tests): tiny guests are
//! paused, saved to a directory, and a second VM built from it must continue exactly.

mod crash;
mod damage;
mod guest;
mod smp;
mod vcpu_loop;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvm_bindings::KVM_MP_STATE_HALTED;
use vm_memory::{Bytes, GuestAddress};

use self::guest::*;
use super::*;

pub(crate) const ITERATIONS: u64 = 20_000_000;
pub(crate) const PAUSE_TIMEOUT: Duration = Duration::from_secs(2);

pub(crate) fn tempdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("microvm-snap-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A running VM with its vCPU thread.
struct Running {
    t: TestVm,
    handle: Arc<PauseHandle>,
    log: Arc<ExitLog>,
    thread: std::thread::JoinHandle<kvm_ioctls::VcpuFd>,
}

impl Running {
    fn wait_for(&self, n: usize, what: &str) -> Vec<OutExit> {
        self.log
            .wait_for(n, Duration::from_secs(5))
            .unwrap_or_else(|| panic!("{what}: no exit {n} ({:?})", self.log.failure()))
    }

    /// Pauses, captures every piece of state and writes the snapshot to `dir`.
    fn snapshot(&self, dir: &Path, tag: &str) -> (SnapshotState, format::SaveStats) {
        let t0 = Instant::now();
        PauseHandle::pause_all(std::slice::from_ref(&self.handle), PAUSE_TIMEOUT).unwrap();
        let paused = t0.elapsed();
        let t1 = Instant::now();
        let caps = Arc::new(KvmCaps::new(&self.t.kvm, &self.t.vm).unwrap());
        let vcpu = self.handle.save(&caps).unwrap();
        let vm = capture_vm(&self.t.vm).unwrap();
        let captured = t1.elapsed();
        let state = SnapshotState::new(
            vm,
            vec![vcpu],
            serde_json::json!({ "test": tag }),
            serde_json::json!({}),
        );
        let stats = save(dir, &state, &self.t.mem).unwrap();
        eprintln!(
            "[{tag}] pause {:?}, capture {captured:?} ({} MSRs), write {:?} ({} of {} KiB written, state {} bytes), fsync+rename {:?}",
            paused,
            state.vcpus[0].msrs.len(),
            stats.write,
            stats.memory.written >> 10,
            stats.memory.size >> 10,
            stats.state_bytes,
            stats.sync
        );
        (state, stats)
    }

    fn stop(self) {
        self.handle.exit();
        self.thread.join().unwrap();
    }
}

fn start(payload: Payload) -> Running {
    let t = new_vm(None);
    let fd = boot_payload(&t, payload, ITERATIONS);
    let handle = PauseHandle::new(0);
    let log = Arc::new(ExitLog::default());
    let thread = spawn(fd, t.mem.clone(), handle.clone(), log.clone());
    Running {
        t,
        handle,
        log,
        thread,
    }
}

/// Builds a VM from `dir` the way `microvm --restore` will, and starts its vCPU.
fn restore(dir: &Path, tag: &str) -> Running {
    let t0 = Instant::now();
    let snap = load(dir).unwrap();
    let loaded = t0.elapsed();
    let mem = snap.map_memory().unwrap();
    let t = new_vm(Some(mem));
    let created = t0.elapsed();
    let caps = KvmCaps::new(&t.kvm, &t.vm).unwrap();
    let fd = t.vm.create_vcpu(0).unwrap();
    restore_vcpu(&fd, &snap.state.vcpus[0], &caps).unwrap();
    restore_vm(&t.vm, &snap.state.vm).unwrap();
    eprintln!(
        "[{tag}] restore to first KVM_RUN {:?} (load+check {loaded:?}, VM+memory slot {:?}, vCPU/VM state {:?})",
        t0.elapsed(),
        created - loaded,
        t0.elapsed() - created
    );
    let handle = PauseHandle::new(0);
    let log = Arc::new(ExitLog::default());
    let thread = spawn(fd, t.mem.clone(), handle.clone(), log.clone());
    Running {
        t,
        handle,
        log,
        thread,
    }
}

/// Counter and r12 at the counter guest's next `out`, from the registers it was saved with
/// and the counter in memory then.
pub(crate) fn expected_first_exit(saved: &kvm_bindings::kvm_regs, c0: u64) -> (u64, u64) {
    use guest::count_at::*;
    match saved.rip - CODE_COUNT {
        INC | JNZ => (c0 + saved.rbx, saved.r12 + 1),
        DEC => (c0 + saved.rbx - 1, saved.r12 + 1),
        AFTER => (c0, saved.r12 + 1),
        MOV | OUT => (c0, saved.r12),
        // At the loop head, or past the `out` (PVM reports RIP after it at a port exit).
        _ => (c0 + ITERATIONS, saved.r12 + 1),
    }
}

#[test]
fn ring3_counter_continues_exactly_after_restore() {
    let dir = tempdir("count").join("snap");
    let vm1 = start(Payload::Count);
    let exits = vm1.wait_for(3, "VM1");
    for e in &exits {
        assert_eq!(e.port, PORT_COUNT);
        assert_eq!(
            e.counter,
            e.r12 * ITERATIONS,
            "VM1 counter invariant: {e:?}"
        );
    }
    let chunk = exits[2].at - exits[1].at;
    // Pause in the middle of a chunk, asynchronously.
    std::thread::sleep(chunk * 2 / 5);
    let (state, _) = vm1.snapshot(&dir, "count");
    let saved = state.vcpus[0].regs;
    let c0: u64 = vm1.t.mem.read_obj(GuestAddress(CNT)).unwrap();
    let vm1_exit_rip = vm1
        .log
        .wait_for(1, Duration::ZERO)
        .unwrap()
        .last()
        .unwrap()
        .rip;
    vm1.stop();

    let (want_counter, want_r12) = expected_first_exit(&saved, c0);
    let at = saved.rip - CODE_COUNT;
    eprintln!(
        "[count] paused at +{at:#x} rbx={} r12={} counter={c0}",
        saved.rbx, saved.r12
    );

    // Two restores of one snapshot at once: each continues exactly, neither disturbs the
    // other or the snapshot (MAP_PRIVATE: their writes are their own copies).
    let restored = [restore(&dir, "count"), restore(&dir, "count")];
    for (n, vm) in restored.iter().enumerate() {
        let exits = vm.wait_for(3, "restored VM");
        assert_eq!(
            (exits[0].counter, exits[0].r12),
            (want_counter, want_r12),
            "restore {n}: first exit (paused at +{at:#x}, rbx {}, counter {c0})",
            saved.rbx
        );
        assert_eq!(
            exits[0].rip, vm1_exit_rip,
            "restore {n} exits where VM1 did"
        );
        for (i, e) in exits.iter().enumerate() {
            assert_eq!(e.counter, want_counter + i as u64 * ITERATIONS);
            assert_eq!(e.counter, e.r12 * ITERATIONS);
        }
    }
    for vm in restored {
        vm.stop();
    }
    let file: u64 = {
        use std::os::unix::fs::FileExt;
        let mut b = [0u8; 8];
        std::fs::File::open(dir.join(format::MEMORY_FILE))
            .unwrap()
            .read_exact_at(&mut b, CNT)
            .unwrap();
        u64::from_le_bytes(b)
    };
    assert_eq!(file, c0, "the memory file changed");
    std::fs::remove_dir_all(dir.parent().unwrap()).unwrap();
}

fn halted_vcpu_wakes_on_timer(payload: Payload) {
    let (tag, port, ticks_at, hlt) = match payload {
        Payload::Pit => ("pit", PORT_PIT, TICKS_PIT, PIT_HLT),
        _ => ("lapic", PORT_LAPIC, TICKS_LAPIC, LAPIC_HLT),
    };
    let dir = tempdir(tag).join("snap");
    let vm1 = start(payload);
    let exits = vm1.wait_for(3, "VM1 ticks");
    assert!(exits.iter().all(|e| e.port == port), "{exits:?}");
    // 20 ms after a tick (period 50 ms) the vCPU sits in `hlt`; on a loaded host the pause
    // may still catch it in the interrupt handler: then let it run on and try again.
    std::thread::sleep(Duration::from_millis(20));
    for _ in 0..5 {
        PauseHandle::pause_all(std::slice::from_ref(&vm1.handle), PAUSE_TIMEOUT).unwrap();
        let mp = vm1.handle.run_on_vcpu(|fd| fd.get_mp_state()).unwrap().unwrap();
        if mp.mp_state == KVM_MP_STATE_HALTED {
            break;
        }
        vm1.handle.resume();
        std::thread::sleep(Duration::from_millis(20));
    }
    let (state, _) = vm1.snapshot(&dir, tag);
    let ticks: u64 = vm1.t.mem.read_obj(GuestAddress(ticks_at)).unwrap();
    vm1.stop();
    let v = &state.vcpus[0];
    assert_eq!(
        v.mp_state.mp_state, KVM_MP_STATE_HALTED,
        "vCPU halted when saved (rip {:#x})",
        v.regs.rip
    );
    // PVM reports RIP after the hlt; VMX/SVM at it or after it.
    assert!(
        (hlt..=hlt + 1).contains(&v.regs.rip),
        "rip {:#x}, hlt at {hlt:#x}",
        v.regs.rip
    );

    let t = Instant::now();
    let vm2 = restore(&dir, tag);
    let exits = vm2.wait_for(3, "VM2 ticks");
    eprintln!("[{tag}] first tick {:?} after restore", exits[0].at - t);
    for (i, e) in exits.iter().enumerate() {
        assert_eq!(e.port, port);
        assert_eq!(
            u64::from(e.value),
            (ticks + 1 + i as u64) & 0xff,
            "tick {i} after restore (saved at {ticks} ticks)"
        );
        if i > 0 {
            let gap = e.at - exits[i - 1].at;
            assert!(
                gap < Duration::from_secs(1),
                "tick {i} came {gap:?} after the previous one"
            );
        }
    }
    vm2.stop();
    std::fs::remove_dir_all(dir.parent().unwrap()).unwrap();
}

#[test]
fn halted_vcpu_woken_by_pit_after_restore() {
    halted_vcpu_wakes_on_timer(Payload::Pit);
}

#[test]
fn halted_vcpu_woken_by_lapic_timer_after_restore() {
    halted_vcpu_wakes_on_timer(Payload::Lapic);
}

/// The size and speed claims of the format: a 128 MiB guest that touched 30 MiB saves
/// ~30 MiB of disk, and mapping it back is lazy (no read of the file up front).
#[test]
fn sparse_memory_file_for_a_128mib_guest() {
    let dir = tempdir("sparse128").join("snap");
    let mem = crate::memory::GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 128 << 20)]).unwrap();
    let t = new_vm(Some(mem));
    let fd = boot_payload(&t, Payload::Count, 1);
    // 30 MiB of non-zero data in 1 MiB pieces spread over the guest.
    let piece = vec![0x5au8; 1 << 20];
    for i in 0..30u64 {
        t.mem
            .write_slice(&piece, GuestAddress((2 + i * 4) << 20))
            .unwrap();
    }
    let caps = KvmCaps::new(&t.kvm, &t.vm).unwrap();
    let state = SnapshotState::new(
        capture_vm(&t.vm).unwrap(),
        vec![capture_vcpu(&fd, &caps).unwrap()],
        serde_json::json!({}),
        serde_json::json!({}),
    );
    let start = Instant::now();
    let stats = save(&dir, &state, &t.mem).unwrap();
    let took = start.elapsed();
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(dir.join(format::MEMORY_FILE)).unwrap();
    let on_disk = meta.blocks() * 512;
    eprintln!(
        "[sparse128] save {took:?} (write {:?}, fsync+rename {:?}): {} MiB written, {} KiB on disk, file {} MiB, state {} bytes",
        stats.write,
        stats.sync,
        stats.memory.written >> 20,
        on_disk >> 10,
        meta.len() >> 20,
        stats.state_bytes
    );
    assert_eq!(meta.len(), 128 << 20);
    // The payload pages (page tables, GDT, code) are a few more pages.
    assert!(
        (30 << 20..31 << 20).contains(&stats.memory.written),
        "{}",
        stats.memory.written
    );
    assert!(on_disk < 31 << 20, "{on_disk} bytes on disk");

    let start = Instant::now();
    let snap = load(&dir).unwrap();
    let mem = snap.map_memory().unwrap();
    let mapped = start.elapsed();
    let mut piece_back = vec![0u8; 1 << 20];
    mem.read_slice(&mut piece_back, GuestAddress(2 << 20))
        .unwrap();
    assert!(piece_back.iter().all(|b| *b == 0x5a));
    eprintln!("[sparse128] load + map {mapped:?}");
    std::fs::remove_dir_all(dir.parent().unwrap()).unwrap();
}
