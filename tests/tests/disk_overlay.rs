//! `--disk PATH,snapshot` without a Linux guest: tiny payloads read the disk's virtio
//! registers, and several microvm processes use one image at once to check the locking rule
//! (any number of `snapshot`/`readonly` users, or one read-write user). The guest's writes
//! going to the overlay are checked with a real guest in guest.rs.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use microvm_tests::payload::{write_elf, Asm, FIRST_VIRTIO};
use microvm_tests::{microvm_bin, run_microvm, scratch_dir, Run};

const T: Duration = Duration::from_secs(60);
/// DeviceFeatures bits 0..31 of a writable disk: SEG_MAX (2) | FLUSH (9); a read-only one
/// adds RO (5).
const FEATURES_RW: u32 = (1 << 2) | (1 << 9);
const FEATURES_RO: u32 = FEATURES_RW | (1 << 5);

/// A payload that prints what the first virtio device (the disk) says: writable or not, and
/// whether its capacity is `sectors`; then exits 0, or halts for ever after "up" if `stay`.
fn disk_probe(dir: &Path, name: &str, sectors: u32, stay: bool) -> String {
    let asm = Asm::default()
        .if_mmio_eq(FIRST_VIRTIO + 8, 2, "blk ok\n", "blk bad\n")
        .if_mmio_eq(FIRST_VIRTIO + 0x10, FEATURES_RW, "writable\n", "")
        .if_mmio_eq(FIRST_VIRTIO + 0x10, FEATURES_RO, "read-only\n", "")
        .if_mmio_eq(FIRST_VIRTIO + 0x100, sectors, "capacity ok\n", "capacity bad\n")
        .if_mmio_eq(FIRST_VIRTIO + 0x104, 0, "", "capacity high bad\n");
    let asm = if stay { asm.print("up\n").halt() } else { asm.exit(0).halt() };
    let p = dir.join(name);
    write_elf(&p, &asm.code);
    p.to_str().unwrap().to_string()
}

/// Starts microvm with `args` and waits until the payload prints "up" (its disks are open
/// and locked by then).
fn start(args: &[&str]) -> Child {
    let mut child = Command::new(microvm_bin())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn microvm");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if line.trim() == "up" {
                let _ = tx.send(());
            }
        }
    });
    if rx.recv_timeout(T).is_err() {
        let _ = child.kill();
        let _ = child.wait();
        panic!("microvm {args:?} never came up");
    }
    child
}

fn stop(mut child: Child) {
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(128 + libc::SIGTERM));
}

fn locked(r: &Run, image: &Path) {
    assert_eq!(r.code(), 2, "{r:?}");
    let want = format!("disk '{}' is in use by another process or another --disk (locked)", image.display());
    assert!(r.stderr.contains(&want), "{r:?}");
    assert_eq!(r.stderr.trim().lines().count(), 1, "one line: {r:?}");
}

#[test]
fn snapshot_disks_share_an_image_and_keep_writers_out() {
    let dir = scratch_dir("overlay-lock");
    let image = dir.join("shared.img");
    let bytes: Vec<u8> = (0..1u32 << 20).map(|i| (i % 253) as u8).collect();
    std::fs::write(&image, &bytes).unwrap();
    let img = image.to_str().unwrap();
    let snap = format!("{img},snapshot");
    let stay = disk_probe(&dir, "stay.elf", 2048, true);
    let probe = disk_probe(&dir, "probe.elf", 2048, false);

    // A snapshot VM holds the image; a second one, and a read-only one, start beside it.
    let first = start(&["--kernel", &stay, "--disk", &snap]);
    let r = run_microvm(&["--kernel", &probe, "--disk", &snap], T);
    assert_eq!(r.code(), 0, "{r:?}");
    assert!(r.stdout.contains("blk ok") && r.stdout.contains("writable"), "the guest sees a writable disk: {r:?}");
    assert!(r.stdout.contains("capacity ok") && !r.stdout.contains("bad"), "{r:?}");
    // Two snapshot --disks of one image in one VM are fine too.
    let r = run_microvm(&["--kernel", &probe, "--disk", &snap, "--disk", &snap], T);
    assert_eq!(r.code(), 0, "{r:?}");
    let r = run_microvm(&["--kernel", &probe, "--disk", &format!("{img},ro")], T);
    assert!(r.code() == 0 && r.stdout.contains("read-only"), "{r:?}");
    // `snapshot,readonly`: allowed, and the guest sees a read-only disk.
    let r = run_microvm(&["--kernel", &probe, "--disk", &format!("{img},snapshot,readonly")], T);
    assert!(r.code() == 0 && r.stdout.contains("read-only"), "{r:?}");
    // A read-write user is refused while the snapshot VM runs.
    locked(&run_microvm(&["--kernel", &probe, "--disk", img], T), &image);
    stop(first);
    assert_eq!(std::fs::read(&image).unwrap(), bytes);

    // The other way round: a read-write VM keeps snapshot users out.
    let writer = start(&["--kernel", &stay, "--disk", img]);
    locked(&run_microvm(&["--kernel", &probe, "--disk", &snap], T), &image);
    stop(writer);
    let r = run_microvm(&["--kernel", &probe, "--disk", &snap], T);
    assert_eq!(r.code(), 0, "released at exit: {r:?}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn snapshot_size_grows_only_the_overlay() {
    let dir = scratch_dir("overlay-size");
    let image = dir.join("small.img");
    std::fs::write(&image, vec![0x5au8; 1 << 20]).unwrap();
    let img = image.to_str().unwrap();
    // 4 MiB = 8192 sectors seen by the guest; the image keeps its 1 MiB.
    let probe = disk_probe(&dir, "probe.elf", 8192, false);
    let r = run_microvm(&["--kernel", &probe, "--disk", &format!("{img},snapshot,size=4M")], T);
    assert_eq!(r.code(), 0, "{r:?}");
    assert!(r.stdout.contains("capacity ok") && r.stdout.contains("writable") && !r.stdout.contains("bad"), "{r:?}");
    assert_eq!(std::fs::metadata(&image).unwrap().len(), 1 << 20);
    assert!(std::fs::read(&image).unwrap().iter().all(|&b| b == 0x5a));

    // Refused with one line and exit 2: shrinking, a missing image (never created),
    // growing with snapshot,readonly, and an overlay directory that does not exist.
    let missing = dir.join("missing.img");
    let cases: [(&[&str], String, &str); 4] = [
        (&[], format!("{img},snapshot,size=512K"), "refusing to shrink"),
        (&[], format!("{},snapshot,size=1M", missing.display()), "a snapshot disk overlays an existing image"),
        (&[], format!("{img},snapshot,ro,size=2M"), "cannot resize read-only disk"),
        (&["TMPDIR", "/nonexistent-microvm-tmp"], format!("{img},snapshot"), "set TMPDIR to a writable directory"),
    ];
    for (env, spec, needle) in cases {
        let mut cmd = Command::new(microvm_bin());
        cmd.args(["--kernel", &probe, "--disk", &spec]);
        if let [k, v] = env {
            cmd.env(k, v);
        }
        let out = cmd.output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{spec}: {stderr}");
        assert!(stderr.contains(needle) && stderr.trim().lines().count() == 1, "{spec}: {stderr}");
    }
    assert!(!missing.exists());
    assert_eq!(std::fs::metadata(&image).unwrap().len(), 1 << 20);
    std::fs::remove_dir_all(&dir).unwrap();
}
