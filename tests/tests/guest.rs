//! Boots the real test guest (tools/build-guest) under microvm. Each boot costs tens of
//! seconds on nested KVM, so one boot checks many things. Never skipped: a missing guest
//! is a failure.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::MetadataExt;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use microvm_tests::{guest, guest_with_own_rootfs, microvm_bin, run_microvm, scratch_dir};

const BOOT_TIMEOUT: Duration = Duration::from_secs(420);

/// One boot: 2 vCPUs, 256 MiB, root disk + a sized scratch disk + a read-only disk; the
/// guest reports what it sees, writes to vdb, tries to write to vdc, and exits 7.
#[test]
fn guest_boots_sees_its_resources_and_reports_status() {
    let dir = scratch_dir("guest-main");
    let (kernel, root) = guest_with_own_rootfs(&dir);
    let data = dir.join("data.img");
    let ro = dir.join("ro.img");
    std::fs::write(&ro, vec![0x5a; 1 << 20]).unwrap();
    let marker = format!("microvm-disk-test-{}", std::process::id());
    let script = format!(
        "echo CPUS=$(grep -c ^processor /proc/cpuinfo); \
         echo MEMKB=$(sed -n 's/^MemTotal: *\\([0-9]*\\) kB/\\1/p' /proc/meminfo); \
         echo VDB_SECTORS=$(cat /sys/block/vdb/size); echo VDC_RO=$(cat /sys/block/vdc/ro); \
         printf '{marker}' | dd of=/dev/vdb bs=512 conv=sync,fsync 2>/dev/null && echo VDB_WRITTEN; \
         printf 'overwrite' | dd of=/dev/vdc bs=512 conv=sync,fsync 2>/dev/null || echo VDC_REFUSED; \
         echo RNG=$(cat /sys/class/misc/hw_random/rng_current); \
         echo HWRNG_BYTES=$(head -c 32 /dev/hwrng | wc -c); \
         exit 7"
    );
    let run = run_microvm(
        &[
            "--kernel", kernel.to_str().unwrap(),
            "--cpus", "2",
            "--memory", "256",
            "--disk", root.to_str().unwrap(),
            "--disk", &format!("{},size=64M", data.display()),
            "--disk", &format!("{},readonly", ro.display()),
            "-v", "--cmdline", "quiet",
            "--", "sh", "-c", &script,
        ],
        BOOT_TIMEOUT,
    );
    assert!(run.stderr.contains("MICROVM-INIT-READY"), "guest never reached init: {run:?}");
    assert_eq!(run.code(), 7, "exit status not propagated: {run:?}");
    assert!(run.stdout.contains("CPUS=2"), "{run:?}");
    let mem_kb: u64 = run
        .stdout
        .lines()
        .find_map(|l| l.trim().strip_prefix("MEMKB="))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no MEMKB line: {run:?}"));
    assert!((200_000..=262_144).contains(&mem_kb), "MemTotal {mem_kb} kB for --memory 256: {run:?}");
    assert!(run.stdout.contains(&format!("VDB_SECTORS={}", (64 << 20) / 512)), "{run:?}");
    assert!(run.stdout.contains("VDC_RO=1"), "{run:?}");
    assert!(run.stdout.contains("VDB_WRITTEN"), "{run:?}");
    assert!(run.stdout.contains("VDC_REFUSED"), "read-only disk accepted a write: {run:?}");
    // Every guest gets a virtio-rng, and it serves reads.
    assert!(run.stdout.contains("RNG=virtio_rng.0"), "{run:?}");
    assert!(run.stdout.contains("HWRNG_BYTES=32"), "{run:?}");

    // The sized disk was created sparse, with the right length, and holds the guest's write.
    let meta = std::fs::metadata(&data).unwrap();
    assert_eq!(meta.len(), 64 << 20);
    assert!(meta.blocks() * 512 < 4 << 20, "data.img is not sparse: {} blocks", meta.blocks());
    let bytes = std::fs::read(&data).unwrap();
    assert_eq!(&bytes[..marker.len()], marker.as_bytes());
    // The read-only image is untouched.
    assert!(std::fs::read(&ro).unwrap().iter().all(|b| *b == 0x5a));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A kernel panic (no root device) makes microvm exit with the panic status. An empty
/// initramfs of the user's keeps microvm's own init out, so the kernel itself looks for
/// root= and panics.
#[test]
fn guest_kernel_panic_exits_101() {
    let (kernel, _) = guest();
    let dir = scratch_dir("guest-panic");
    let empty = dir.join("empty.cpio");
    let out = Command::new("cpio").args(["-o", "-H", "newc", "--quiet"]).stdin(Stdio::null()).output().expect("run cpio");
    assert!(out.status.success() && !out.stdout.is_empty(), "cpio made no archive");
    std::fs::write(&empty, &out.stdout).unwrap();
    let run = run_microvm(
        &["--kernel", kernel.to_str().unwrap(), "--initrd", empty.to_str().unwrap(), "--cmdline", "quiet root=/dev/vdz"],
        BOOT_TIMEOUT,
    );
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(run.stdout.contains("Kernel panic - not syncing"), "{run:?}");
    assert_eq!(run.code(), 101, "{run:?}");
    assert!(run.stderr.contains("guest kernel panicked"), "{run:?}");
    // stdout is a pipe, not stderr: the console's last lines are repeated on stderr.
    assert!(run.stderr.contains("  | ") && run.stderr.contains("Kernel panic - not syncing"), "{run:?}");
}

/// Without a command the guest runs a shell on the console: host stdin reaches it and
/// leaving the shell ends the VM with status 0.
#[test]
fn interactive_shell_on_the_console() {
    let dir = scratch_dir("guest-shell");
    let (kernel, root) = guest_with_own_rootfs(&dir);
    let mut child = Command::new(microvm_bin())
        .args(["--kernel", kernel.to_str().unwrap(), "--disk", root.to_str().unwrap(), "--cmdline", "quiet"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + BOOT_TIMEOUT;
    let mut seen = Vec::new();
    let wait_for = |needle: &str, seen: &mut Vec<String>| -> bool {
        while let Ok(line) = rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            let hit = line.contains(needle);
            seen.push(line);
            if hit {
                return true;
            }
        }
        false
    };
    let ready = wait_for("MICROVM-INIT-READY", &mut seen);
    if !ready {
        let _ = child.kill();
        panic!("no init: {seen:#?}");
    }
    let mut stdin = child.stdin.take().unwrap();
    // Give the shell a moment to print its prompt, then type slowly enough for the UART FIFO.
    std::thread::sleep(Duration::from_secs(2));
    for chunk in ["echo shell-says-$((6*7))\n", "exit\n"] {
        stdin.write_all(chunk.as_bytes()).unwrap();
        stdin.flush().unwrap();
        std::thread::sleep(Duration::from_millis(500));
    }
    let answered = wait_for("shell-says-42", &mut seen);
    let status = child.wait().unwrap();
    assert!(answered, "shell did not run our command: {seen:#?}");
    assert_eq!(status.code(), Some(0), "{seen:#?}");
    std::fs::remove_dir_all(&dir).unwrap();
}
