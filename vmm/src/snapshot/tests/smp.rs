//! Two vCPUs, each saved on its own thread: vCPU 0 counting, vCPU 1 an application processor
//! still waiting for INIT/SIPI, which must stay asleep after the restore (not start running
//! from whatever its registers hold).

use std::sync::Arc;
use std::time::Duration;

use kvm_bindings::KVM_MP_STATE_UNINITIALIZED;
use vm_memory::{Bytes, GuestAddress};

use super::guest::*;
use super::{expected_first_exit, tempdir, ITERATIONS, PAUSE_TIMEOUT};
use crate::snapshot::*;

#[test]
fn two_vcpus_with_an_ap_waiting_for_sipi() {
    let dir = tempdir("smp").join("snap");
    let t = new_vm(None);
    let fds = [boot_payload(&t, Payload::Count, ITERATIONS), add_ap(&t, 1)];
    let handles = [PauseHandle::new(0), PauseHandle::new(1)];
    let logs = [Arc::new(ExitLog::default()), Arc::new(ExitLog::default())];
    let threads: Vec<_> = fds
        .into_iter()
        .zip(handles.iter().zip(logs.iter()))
        .map(|(fd, (h, l))| spawn(fd, t.mem.clone(), h.clone(), l.clone()))
        .collect();
    logs[0]
        .wait_for(2, Duration::from_secs(5))
        .expect("vCPU 0 counts");
    std::thread::sleep(Duration::from_millis(4));

    PauseHandle::pause_all(&handles, PAUSE_TIMEOUT).unwrap();
    let caps = Arc::new(KvmCaps::new(&t.kvm, &t.vm).unwrap());
    let vcpus: Vec<_> = handles.iter().map(|h| h.save(&caps).unwrap()).collect();
    let state = SnapshotState::new(
        capture_vm(&t.vm).unwrap(),
        vcpus,
        serde_json::json!({}),
        serde_json::json!({}),
    );
    save(&dir, &state, &t.mem).unwrap();
    let c0: u64 = t.mem.read_obj(GuestAddress(CNT)).unwrap();
    for h in &handles {
        h.exit();
    }
    for th in threads {
        th.join().unwrap();
    }
    drop(t);
    assert_eq!(state.vcpus[1].mp_state.mp_state, KVM_MP_STATE_UNINITIALIZED);
    assert!(logs[1].wait_for(1, Duration::ZERO).is_none() && logs[1].failure().is_none());

    let snap = load(&dir).unwrap();
    assert_eq!(snap.state.vcpus.len(), 2);
    let t2 = new_vm(Some(snap.map_memory().unwrap()));
    let caps = Arc::new(KvmCaps::new(&t2.kvm, &t2.vm).unwrap());
    let handles = [PauseHandle::new(0), PauseHandle::new(1)];
    let logs = [Arc::new(ExitLog::default()), Arc::new(ExitLog::default())];
    let mut threads = Vec::new();
    for (i, v) in snap.state.vcpus.iter().enumerate() {
        let fd = t2.vm.create_vcpu(i as u64).unwrap();
        restore_vcpu(&fd, v, &caps).unwrap();
        threads.push((fd, i));
    }
    restore_vm(&t2.vm, &snap.state.vm).unwrap();
    let threads: Vec<_> = threads
        .into_iter()
        .map(|(fd, i)| spawn(fd, t2.mem.clone(), handles[i].clone(), logs[i].clone()))
        .collect();
    let exits = logs[0]
        .wait_for(2, Duration::from_secs(5))
        .expect("restored vCPU 0 counts");
    let (want, _) = expected_first_exit(&state.vcpus[0].regs, c0);
    assert_eq!(exits[0].counter, want);
    assert_eq!(exits[1].counter, want + ITERATIONS);
    // vCPU 1 is still asleep, as saved.
    PauseHandle::pause_all(&handles, PAUSE_TIMEOUT).unwrap();
    let ap = handles[1].save(&caps).unwrap();
    assert_eq!(ap.mp_state.mp_state, KVM_MP_STATE_UNINITIALIZED);
    assert!(logs[1].wait_for(1, Duration::ZERO).is_none() && logs[1].failure().is_none());
    for h in &handles {
        h.exit();
    }
    for th in threads {
        th.join().unwrap();
    }
    std::fs::remove_dir_all(dir.parent().unwrap()).unwrap();
}
