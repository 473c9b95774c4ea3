//! kill -9 during a save, for real: a child process (this test binary, re-run on the
//! `crash_child` test) saves snapshots of changing memory to DIR in a loop and is killed at
//! varied moments. Afterwards DIR must be absent or a complete snapshot whose memory is the
//! one its state describes, never something half-written that loads.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};

use super::guest::*;
use super::tempdir;
use crate::memory::GuestMemoryMmap;
use crate::snapshot::*;

const CHILD_ENV: &str = "MICROVM_SNAPSHOT_CRASH_CHILD_DIR";
const RANDOM_BYTES: usize = 8 << 20;

fn memory_crc(mem: &GuestMemoryMmap) -> u32 {
    let mut h = crc32fast::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    for region in mem.iter() {
        let mut off = 0u64;
        while off < region.len() {
            let n = (region.len() - off).min(buf.len() as u64) as usize;
            region
                .get_slice(MemoryRegionAddress(off), n)
                .unwrap()
                .copy_to(&mut buf[..n]);
            h.update(&buf[..n]);
            off += n as u64;
        }
    }
    h.finalize()
}

/// Not a test on its own: the body of the child process (does nothing without CHILD_ENV).
#[test]
#[ignore = "run by kill_9_during_save_never_leaves_a_damaged_snapshot"]
fn crash_child() {
    let Some(dir) = std::env::var_os(CHILD_ENV) else {
        return;
    };
    let t = new_vm(None);
    let fd = boot_payload(&t, Payload::Count, 1);
    let caps = KvmCaps::new(&t.kvm, &t.vm).unwrap();
    let vcpu = capture_vcpu(&fd, &caps).unwrap();
    let vm = capture_vm(&t.vm).unwrap();
    let mut x = u64::from(std::process::id()) | 1;
    let mut data = vec![0u8; RANDOM_BYTES];
    for round in 0u64.. {
        for b in data.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            b.copy_from_slice(&x.to_le_bytes());
        }
        t.mem.write_slice(&data, GuestAddress(1 << 20)).unwrap();
        let config = serde_json::json!({ "round": round, "mem_crc": memory_crc(&t.mem) });
        let state = SnapshotState::new(
            vm.clone(),
            vec![vcpu.clone()],
            config,
            serde_json::json!({}),
        );
        save(Path::new(&dir), &state, &t.mem).unwrap();
        println!("saved round {round}");
    }
}

#[test]
fn kill_9_during_save_never_leaves_a_damaged_snapshot() {
    let root = tempdir("crash");
    let dir = root.join("snap");
    let mut complete = 0;
    let mut kills = 0;
    // Fixed moments, then (on a loaded machine) longer ones until some save completed.
    let delays = [1u64, 15, 40, 80, 130, 200, 300, 450, 700, 1000, 2000]
        .into_iter()
        .chain((0..4).map(|i| 3000 << i));
    for delay_ms in delays {
        if kills >= 11 && complete > 0 {
            break;
        }
        kills += 1;
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "snapshot::tests::crash::crash_child",
                "--exact",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, &dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(delay_ms));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        match load(&dir) {
            Ok(snap) => {
                let mem = snap.map_memory().unwrap();
                let want = snap.state.config["mem_crc"].as_u64().unwrap();
                assert_eq!(
                    u64::from(memory_crc(&mem)),
                    want,
                    "killed after {delay_ms} ms: memory does not match its state"
                );
                complete += 1;
            }
            Err(SnapshotError::Missing { .. }) => {}
            Err(e) => panic!("killed after {delay_ms} ms: {}", devices::error_chain(&e)),
        }
    }
    assert!(
        complete > 0,
        "no save ever completed: the kills prove nothing"
    );
    // The next save removes the temporary directories the killed children left.
    let t = new_vm(None);
    let fd = boot_payload(&t, Payload::Count, 1);
    let caps = KvmCaps::new(&t.kvm, &t.vm).unwrap();
    let state = SnapshotState::new(
        capture_vm(&t.vm).unwrap(),
        vec![capture_vcpu(&fd, &caps).unwrap()],
        serde_json::json!({}),
        serde_json::json!({}),
    );
    save(&dir, &state, &t.mem).unwrap();
    let names: Vec<_> = std::fs::read_dir(&root)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("snap")]);
    eprintln!("[crash] {complete} of {kills} kills found a complete snapshot, the others none");
    std::fs::remove_dir_all(&root).unwrap();
}
