//! Damaged, foreign and half-written snapshots are refused with one clear line, and a save
//! killed before its rename leaves nothing that loads.

use std::path::{Path, PathBuf};

use super::guest::*;
use super::tempdir;
use crate::snapshot::format::{
    encode_state, parse_state, write_tmp, HEADER_LEN, MEMORY_FILE, STATE_FILE,
};
use crate::snapshot::*;

/// A real snapshot of a configured (never run) one-vCPU VM in `root/name`.
fn make_snapshot(root: &Path, name: &str) -> (PathBuf, SnapshotState) {
    let t = new_vm(None);
    let fd = boot_payload(&t, Payload::Count, 1);
    let caps = KvmCaps::new(&t.kvm, &t.vm).unwrap();
    let vcpu = capture_vcpu(&fd, &caps).unwrap();
    let state = SnapshotState::new(
        capture_vm(&t.vm).unwrap(),
        vec![vcpu],
        serde_json::json!({}),
        serde_json::json!({}),
    );
    let dir = root.join(name);
    save(&dir, &state, &t.mem).unwrap();
    let state = load(&dir).unwrap().state;
    (dir, state)
}

/// `load` fails with a usage error whose message is one line containing `want`.
fn refused(dir: &Path, want: &str) -> String {
    let e = load(dir).expect_err("damaged snapshot loaded");
    let msg = devices::error_chain(&e);
    assert!(e.is_usage(), "{msg}");
    assert!(!msg.contains('\n'), "{msg}");
    assert!(msg.contains(want), "'{msg}' does not say '{want}'");
    msg
}

fn copy_dir(from: &Path, to: &Path) {
    let _ = std::fs::remove_dir_all(to);
    std::fs::create_dir(to).unwrap();
    for f in [STATE_FILE, MEMORY_FILE] {
        std::fs::copy(from.join(f), to.join(f)).unwrap();
    }
}

#[test]
fn damaged_snapshots_are_refused() {
    let root = tempdir("damage");
    let (good, state) = make_snapshot(&root, "good");
    let bytes = std::fs::read(good.join(STATE_FILE)).unwrap();
    let bad = root.join("bad");
    let with_state = |b: &[u8]| {
        copy_dir(&good, &bad);
        std::fs::write(bad.join(STATE_FILE), b).unwrap();
    };

    // Truncated anywhere: in the magic, in the header, in the body, one byte short.
    for (len, want) in [
        (0, "bad magic"),
        (10, "bad magic"),
        (20, "truncated"),
        (HEADER_LEN, "truncated"),
        (bytes.len() / 2, "truncated"),
        (bytes.len() - 1, "truncated"),
    ] {
        with_state(&bytes[..len]);
        refused(&bad, want);
    }
    // A byte appended.
    let mut longer = bytes.clone();
    longer.push(b' ');
    with_state(&longer);
    refused(&bad, "padded");
    // Bit flips: in the magic, the version, the checksum, the length, the body.
    let flipped = format!("format version {}", crate::snapshot::FORMAT_VERSION ^ 1);
    for (pos, want) in [
        (3, "bad magic"),
        (16, flipped.as_str()),
        (21, "checksum"),
        (25, "truncated"),
        (HEADER_LEN + 1, "checksum"),
        (bytes.len() - 2, "checksum"),
    ] {
        let mut b = bytes.clone();
        b[pos] ^= 0x01;
        with_state(&b);
        refused(&bad, want);
    }
    // Another format version, everything else intact.
    let mut b = bytes.clone();
    let other = crate::snapshot::FORMAT_VERSION + 1;
    b[16..20].copy_from_slice(&other.to_le_bytes());
    with_state(&b);
    refused(&bad, &format!("format version {other}, this microvm reads version {}", crate::snapshot::FORMAT_VERSION));
    // A header claiming a huge body is refused without allocating it.
    let mut b = bytes.clone();
    b[24..32].copy_from_slice(&u64::MAX.to_le_bytes());
    with_state(&b);
    refused(&bad, "at most");

    // Well-formed (checksum right) but wrong content.
    let rewrite = |f: &dyn Fn(&mut SnapshotState)| {
        let mut s = state.clone();
        f(&mut s);
        with_state(&encode_state(&s).unwrap());
    };
    rewrite(&|s| s.cpu_vendor = "FakeVendorCPU".into());
    refused(&bad, "taken on a FakeVendorCPU CPU");
    rewrite(&|s| s.vcpus.clear());
    refused(&bad, "0 vCPUs");
    rewrite(&|s| s.memory[0].size = 1 << 62);
    refused(&bad, "MiB of guest memory");
    rewrite(&|s| s.memory[0].size += 4096);
    refused(&bad, "memory file is");
    rewrite(&|s| s.vcpus[0].xsave.truncate(10));
    refused(&bad, "XSAVE area of 40 bytes");
    rewrite(&|s| s.vm.ioapic.chip_id = 0);
    refused(&bad, "irqchip 0 where 2 belongs");
    // A KVM struct one byte short inside valid JSON.
    let mut json: serde_json::Value = serde_json::from_slice(&bytes[HEADER_LEN..]).unwrap();
    json["vcpus"][0]["regs"] = serde_json::Value::String("AAAA".into());
    let body = serde_json::to_vec(&json).unwrap();
    let mut b = bytes[..HEADER_LEN].to_vec();
    b[20..24].copy_from_slice(&crc32fast::hash(&body).to_le_bytes());
    b[24..32].copy_from_slice(&(body.len() as u64).to_le_bytes());
    b.extend_from_slice(&body);
    with_state(&b);
    refused(&bad, "expected 144 bytes, got 3");

    // The memory file truncated or missing.
    copy_dir(&good, &bad);
    let m = std::fs::OpenOptions::new()
        .write(true)
        .open(bad.join(MEMORY_FILE))
        .unwrap();
    m.set_len(4096).unwrap();
    refused(&bad, "memory file is 4096 bytes");
    std::fs::remove_file(bad.join(MEMORY_FILE)).unwrap();
    refused(&bad, "cannot read snapshot file");
    // No state at all, no directory.
    std::fs::remove_file(bad.join(STATE_FILE)).unwrap();
    refused(&bad, "no state file");
    refused(&root.join("absent"), "not a directory");

    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn other_tsc_frequency_is_refused() {
    let root = tempdir("tsc");
    let (dir, mut state) = make_snapshot(&root, "snap");
    let t = new_vm(Some(load(&dir).unwrap().map_memory().unwrap()));
    let caps = KvmCaps::new(&t.kvm, &t.vm).unwrap();
    let fd = t.vm.create_vcpu(0).unwrap();
    let host = fd.get_tsc_khz().unwrap();
    state.vcpus[0].tsc_khz = host + host / 100;
    let e = restore_vcpu(&fd, &state.vcpus[0], &caps).unwrap_err();
    assert!(
        e.is_usage() && matches!(e, SnapshotError::TscKhz { .. }),
        "{e}"
    );
    // Within calibration jitter (100 ppm) is the same frequency.
    state.vcpus[0].tsc_khz = host + host / 10_000;
    restore_vcpu(&fd, &state.vcpus[0], &caps).unwrap();
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn interrupted_save_leaves_nothing_that_loads() {
    let root = tempdir("atomic");
    let (first, _) = make_snapshot(&root, "first");
    let dir = root.join("snap");

    // Killed after writing everything but before the rename: DIR does not exist.
    let t = new_vm(None);
    let fd = boot_payload(&t, Payload::Count, 1);
    let caps = KvmCaps::new(&t.kvm, &t.vm).unwrap();
    let state = SnapshotState::new(
        capture_vm(&t.vm).unwrap(),
        vec![capture_vcpu(&fd, &caps).unwrap()],
        serde_json::json!({"n": 1}),
        serde_json::json!({}),
    );
    let (tmp, _) = write_tmp(&dir, &state, &t.mem).unwrap();
    assert!(tmp.join(STATE_FILE).exists());
    refused(&dir, "not a directory");
    // ... and that of a process that no longer exists is removed by the next save.
    let stale = root.join("snap.tmp-2147483646");
    std::fs::rename(&tmp, &stale).unwrap();
    save(&dir, &state, &t.mem).unwrap();
    assert!(!stale.exists(), "stale temporary directory left behind");
    assert_eq!(
        load(&dir).unwrap().state.config,
        serde_json::json!({"n": 1})
    );

    // Killed before the rename that would replace an existing snapshot: the old one stays.
    let mut second = state.clone();
    second.config = serde_json::json!({"n": 2});
    let (tmp, _) = write_tmp(&dir, &second, &t.mem).unwrap();
    assert_eq!(
        load(&dir).unwrap().state.config,
        serde_json::json!({"n": 1})
    );
    std::fs::remove_dir_all(&tmp).unwrap();
    // Completed: replaced atomically, no temporary left.
    save(&dir, &second, &t.mem).unwrap();
    assert_eq!(
        load(&dir).unwrap().state.config,
        serde_json::json!({"n": 2})
    );
    let leftovers: Vec<_> = std::fs::read_dir(&root)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(leftovers.len(), 2, "{leftovers:?}");

    // A directory that is not a snapshot is never replaced.
    let other = root.join("other");
    std::fs::create_dir(&other).unwrap();
    std::fs::write(other.join("precious"), b"x").unwrap();
    let e = save(&other, &state, &t.mem).unwrap_err();
    assert!(matches!(e, SnapshotError::NotASnapshotDir { .. }), "{e}");
    assert!(other.join("precious").exists());
    let _ = first;
    std::fs::remove_dir_all(&root).unwrap();
}

/// Every truncation and every single-bit flip of a real state file is refused; random
/// garbage with a correct checksum (a deliberate forgery) is refused or parses into bounded
/// values, never a panic.
#[test]
fn no_damage_gets_through_or_panics() {
    let root = tempdir("exhaustive");
    let (good, _) = make_snapshot(&root, "snap");
    let bytes = std::fs::read(good.join(STATE_FILE)).unwrap();
    let path = good.join(STATE_FILE);
    assert!(parse_state(&bytes, &path).is_ok());
    for len in 0..bytes.len() {
        assert!(
            parse_state(&bytes[..len], &path).is_err(),
            "truncated to {len}"
        );
    }
    let mut b = bytes.clone();
    for pos in 0..bytes.len() {
        for bit in [0, 7] {
            b[pos] ^= 1 << bit;
            assert!(
                parse_state(&b, &path).is_err(),
                "bit {bit} of byte {pos} flipped"
            );
            b[pos] ^= 1 << bit;
        }
    }
    // Forged: bytes of the JSON body replaced, checksum recomputed.
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for _ in 0..3000 {
        let mut body = bytes[HEADER_LEN..].to_vec();
        for _ in 0..4 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let pos = (x as usize) % body.len();
            body[pos] = (x >> 32) as u8;
        }
        let mut f = bytes[..HEADER_LEN].to_vec();
        f[20..24].copy_from_slice(&crc32fast::hash(&body).to_le_bytes());
        f.extend_from_slice(&body);
        if let Ok(state) = parse_state(&f, &path) {
            let _ = state.validate();
        }
    }
    std::fs::remove_dir_all(&root).unwrap();
}
