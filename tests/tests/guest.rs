//! Boots the real test guest (tools/build-guest) under microvm. Each boot costs tens of
//! seconds on nested KVM, so one boot checks many things. Never skipped: a missing guest
//! is a failure.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::MetadataExt;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use microvm_tests::{guest, guest_with_own_rootfs, microvm_bin, run_microvm, scratch_dir, small_disk_args};

const BOOT_TIMEOUT: Duration = Duration::from_secs(420);

/// One boot: 2 vCPUs, 256 MiB, root disk + a sized scratch disk + a read-only disk + five
/// small disks, so that with the virtio-rng and the command channel every virtio slot is
/// taken; the guest reports what it sees, writes to vdb, tries to write to vdc, and exits 7.
/// The command is too long for the kernel command line, so the init waits for it on the
/// command channel's control port, the last device (it lost an interrupt now and then when
/// a fifth device shared the ACPI SCI's level-triggered line).
#[test]
fn guest_boots_sees_its_resources_and_reports_status() {
    let dir = scratch_dir("guest-main");
    let (kernel, root) = guest_with_own_rootfs(&dir);
    let data = dir.join("data.img");
    let ro = dir.join("ro.img");
    std::fs::write(&ro, vec![0x5a; 1 << 20]).unwrap();
    let marker = format!("microvm-disk-test-{}", std::process::id());
    // Every command retried: see SH_CHECK. A refused write is told from a crashed dd by
    // its status (1, not a signal's 128+N).
    let check = microvm_tests::SH_CHECK;
    let script = format!(
        "{check} check CPUS 'grep -c ^processor /proc/cpuinfo'; \
         check MEMKB \"awk '/^MemTotal:/ {{print \\$2}}' /proc/meminfo\"; \
         check VDB_SECTORS cat /sys/block/vdb/size; check VDC_RO cat /sys/block/vdc/ro; \
         check VDB_W 'printf {marker} | dd of=/dev/vdb bs=512 conv=sync,fsync 2>/dev/null && echo ok'; \
         check VDC_W 'printf overwrite | dd of=/dev/vdc bs=512 conv=sync,fsync 2>/dev/null; s=$?; [ $s -lt 128 ] && echo $s'; \
         check RNG cat /sys/class/misc/hw_random/rng_current; \
         check HWRNG_BYTES 'head -c 32 /dev/hwrng | wc -c'; \
         check DISKS 'ls -d /sys/block/vd* | wc -l'; \
         check EXTRA_SECTORS 'cat /sys/block/vdh/size'; \
         check VIRTIO_LINES \"grep -c 'IO-APIC.*virtio' /proc/interrupts\"; \
         check LEVEL_LINES \"grep -c 'fasteoi.*virtio' /proc/interrupts || true\"; \
         exit 7"
    );
    // Longer than vmm's guestinit::ARGV_ON_CMDLINE_MAX (1024 bytes, of base64: more than
    // the script), so it goes over the control port.
    assert!(script.len() > 1024, "the command must go over the control port");
    let extra = small_disk_args(&dir, "extra", 5);
    let (data_spec, ro_spec) = (format!("{},size=64M", data.display()), format!("{},readonly", ro.display()));
    let mut args = vec![
        "--kernel", kernel.to_str().unwrap(),
        "--cpus", "2",
        "--memory", "256",
        "--disk", root.to_str().unwrap(),
        "--disk", &data_spec,
        "--disk", &ro_spec,
    ];
    args.extend(extra.iter().map(String::as_str));
    args.extend(["-v", "--cmdline", "quiet", "--", "sh", "-c", &script]);
    let run = run_microvm(&args, BOOT_TIMEOUT);
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
    assert!(run.stdout.contains("VDB_W=ok"), "{run:?}");
    assert!(run.stdout.contains("VDC_W=1"), "read-only disk accepted a write: {run:?}");
    // Every guest gets a virtio-rng, and it serves reads.
    assert!(run.stdout.contains("RNG=virtio_rng.0"), "{run:?}");
    assert!(run.stdout.contains("HWRNG_BYTES=32"), "{run:?}");
    // Every slot's device bound: eight disks, and the rng and the channel above.
    assert!(run.stdout.contains("DISKS=8"), "{run:?}");
    assert!(run.stdout.contains(&format!("EXTRA_SECTORS={}", (1 << 20) / 512)), "{run:?}");
    assert!(run.stdout.contains("VIRTIO_LINES=10"), "{run:?}");
    // None on a level-triggered line (the irqfd pulses it).
    assert!(run.stdout.contains("LEVEL_LINES=0"), "{run:?}");

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

/// `--disk PATH,snapshot`, in two boots of one root image and one data image (grown by
/// `size=`). The first boot writes a file on /, bytes across a 64 KiB chunk boundary of vdb
/// and bytes past the end of vdb's image, and reads them back; while it runs, another VM
/// uses the same root image (shared) and a read-write one is refused. The second boot sees
/// none of those writes, and neither image's bytes ever change.
#[test]
fn guest_snapshot_disks_forget_writes_at_exit() {
    use std::hash::{DefaultHasher, Hasher};
    let dir = scratch_dir("guest-snapshot");
    let (kernel, root) = guest_with_own_rootfs(&dir);
    let data = dir.join("data.img");
    // Sector s holds bytes (s | 1): never zero; sectors 127 and 128 are 0o177 and 0o201.
    let data_bytes: Vec<u8> = (0..4u32 << 20).map(|i| (i / 512) as u8 | 1).collect();
    std::fs::write(&data, &data_bytes).unwrap();
    let hash = |p: &std::path::Path| {
        let mut h = DefaultHasher::new();
        h.write(&std::fs::read(p).unwrap());
        h.finish()
    };
    let root_hash = hash(&root);
    let root_snap = format!("{},snapshot", root.display());
    let data_snap = format!("{},snapshot,size=8M", data.display());
    let args = |script: &str| -> Vec<String> {
        [
            "--kernel", kernel.to_str().unwrap(),
            "--disk", &root_snap,
            "--disk", &data_snap,
            "-v", "--cmdline", "quiet",
            "--", "sh", "-c", script,
        ]
        .map(String::from)
        .to_vec()
    };
    // Every command retried: see SH_CHECK.
    let check = microvm_tests::SH_CHECK;
    let first = format!(
        "{check} echo first-run >/snapfile; check SYNC sync; check SNAPFILE cat /snapfile; \
         check VDA_RO cat /sys/block/vda/ro; check VDB_RO cat /sys/block/vdb/ro; \
         check VDB_SECTORS cat /sys/block/vdb/size; \
         check W1 'printf MARK-ACROSS-CHUNKS | dd of=/dev/vdb bs=1 seek=65530 conv=notrunc,fsync'; \
         check W2 'printf MARK-PAST-THE-IMAGE | dd of=/dev/vdb bs=1 seek=6291456 conv=notrunc,fsync'; \
         echo 3 >/proc/sys/vm/drop_caches; \
         check READ1 dd if=/dev/vdb bs=1 skip=65530 count=18; \
         check AROUND 'dd if=/dev/vdb bs=512 skip=127 count=2 | tr -d \"\\177\\201\" | wc -c'; \
         check READ2 dd if=/dev/vdb bs=1 skip=6291456 count=19; \
         check TAIL 'dd if=/dev/vdb bs=512 skip=16383 count=1 | tr -d \"\\000\" | wc -c'; \
         exit 3"
    );
    let mut child = Command::new(microvm_bin())
        .args(args(&first))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let (out_tx, out_rx) = mpsc::channel();
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let readers = [
        std::thread::spawn(move || std::io::read_to_string(&mut stdout).unwrap_or_default()),
        std::thread::spawn(move || std::io::read_to_string(&mut stderr).unwrap_or_default()),
    ];
    std::thread::spawn(move || {
        let _ = out_tx.send(child.wait());
    });
    // Once the VM holds both images (before its guest runs), other VMs try the root image.
    let deadline = Instant::now() + Duration::from_secs(60);
    let holds = |p: &std::path::Path| {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .map(|fds| fds.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok()).any(|l| l == p))
            .unwrap_or(false)
    };
    while !(holds(&root) && holds(&data)) {
        assert!(Instant::now() < deadline, "microvm never opened its disks");
        std::thread::sleep(Duration::from_millis(50));
    }
    let probe = dir.join("probe.elf");
    microvm_tests::payload::write_elf(&probe, &microvm_tests::payload::Asm::default().exit(0).halt().code);
    let shared = run_microvm(&["--kernel", probe.to_str().unwrap(), "--disk", &root_snap], Duration::from_secs(60));
    let writer = run_microvm(&["--kernel", probe.to_str().unwrap(), "--disk", root.to_str().unwrap()], Duration::from_secs(60));

    let status = match out_rx.recv_timeout(BOOT_TIMEOUT) {
        Ok(s) => s.unwrap(),
        Err(_) => {
            // SAFETY: kill(2) on our own child.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            out_rx.recv().unwrap().unwrap()
        }
    };
    let [out, err] = readers.map(|r| r.join().unwrap());
    let run1 = format!("exit {status:?}\n--- stdout ---\n{out}\n--- stderr ---\n{err}");
    assert!(err.contains("MICROVM-INIT-READY"), "guest never reached init: {run1}");
    assert_eq!(status.code(), Some(3), "{run1}");
    assert_eq!(shared.code(), 0, "a second snapshot user of the image: {shared:?}");
    assert_eq!(writer.code(), 2, "a read-write user while snapshot VMs run: {writer:?}");
    assert!(writer.stderr.contains("in use"), "{writer:?}");
    assert!(!out.contains("FAILED"), "{run1}");
    for want in [
        "SNAPFILE=first-run",
        "VDA_RO=0",
        "VDB_RO=0",
        "VDB_SECTORS=16384",
        "READ1=MARK-ACROSS-CHUNKS",
        // The two sectors around the chunk boundary hold the base's bytes and the marker.
        "AROUND=18",
        "READ2=MARK-PAST-THE-IMAGE",
        // Past the image, unwritten: zeros.
        "TAIL=0",
    ] {
        assert!(out.contains(want), "{want}: {run1}");
    }
    assert_eq!(hash(&root), root_hash, "the root image changed");
    assert!(std::fs::read(&data).unwrap() == data_bytes, "the data image changed");

    let second = format!(
        "{check} test -e /snapfile && echo SNAPFILE_PRESENT || echo SNAPFILE_ABSENT; \
         check READ1 'dd if=/dev/vdb bs=512 skip=127 count=2 | tr -d \"\\177\\201\" | wc -c'; \
         check READ2 'dd if=/dev/vdb bs=1 skip=6291456 count=19 | tr -d \"\\000\" | wc -c'; \
         exit 4"
    );
    let a = args(&second);
    let run2 = run_microvm(&a.iter().map(String::as_str).collect::<Vec<_>>(), BOOT_TIMEOUT);
    assert_eq!(run2.code(), 4, "{run2:?}");
    assert!(!run2.stdout.contains("FAILED"), "{run2:?}");
    for want in ["SNAPFILE_ABSENT", "READ1=0", "READ2=0"] {
        assert!(run2.stdout.contains(want), "{want}: {run2:?}");
    }
    assert_eq!(hash(&root), root_hash, "the root image changed");
    assert!(std::fs::read(&data).unwrap() == data_bytes, "the data image changed");
    std::fs::remove_dir_all(&dir).unwrap();
}
