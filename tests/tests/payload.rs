//! Fast tests: microvm runs tiny hand-assembled payloads (no Linux), so the vCPU loop,
//! COM1 output, the exit-status device and MMIO dispatch are checked in milliseconds.

use std::time::Duration;

use microvm_tests::payload::{write_elf, Asm, FIRST_VIRTIO};
use microvm_tests::{run_microvm, scratch_dir};

const T: Duration = Duration::from_secs(60);

fn payload(name: &str, asm: Asm) -> std::path::PathBuf {
    let dir = scratch_dir(name);
    let p = dir.join("payload.elf");
    write_elf(&p, &asm.code);
    p
}

#[test]
fn serial_output_and_exit_status() {
    let k = payload("serial", Asm::default().print("hello from ring 0\n").exit(42).halt());
    let r = run_microvm(&["--kernel", k.to_str().unwrap()], T);
    assert_eq!(r.code(), 42, "{r:?}");
    assert!(r.stdout.contains("hello from ring 0"), "{r:?}");
}

#[test]
fn exit_status_zero_and_255() {
    for status in [0u32, 255] {
        let k = payload(&format!("exit{status}"), Asm::default().exit(status).halt());
        let r = run_microvm(&["--kernel", k.to_str().unwrap(), "--cpus", "2"], T);
        assert_eq!(r.code(), status as i32, "{r:?}");
    }
}

#[test]
fn virtio_mmio_window_answers_with_its_magic() {
    let dir = scratch_dir("mmio");
    let disk = dir.join("d.img");
    let k = dir.join("payload.elf");
    let asm = Asm::default()
        .if_mmio_eq(FIRST_VIRTIO, 0x7472_6976, "magic ok\n", "magic bad\n")
        // Device ID register: 2 = block.
        .if_mmio_eq(FIRST_VIRTIO + 8, 2, "blk ok\n", "blk bad\n")
        // After the disk: the virtio-rng (device ID 4) every guest gets.
        .if_mmio_eq(FIRST_VIRTIO + 0x1000 + 8, 4, "rng ok\n", "rng bad\n")
        .exit(3)
        .halt();
    write_elf(&k, &asm.code);
    let spec = format!("{},size=1M", disk.display());
    let r = run_microvm(&["--kernel", k.to_str().unwrap(), "--disk", &spec], T);
    assert_eq!(r.code(), 3, "{r:?}");
    assert!(r.stdout.contains("magic ok") && r.stdout.contains("blk ok"), "{r:?}");
    assert!(r.stdout.contains("rng ok"), "{r:?}");
    assert_eq!(std::fs::metadata(&disk).unwrap().len(), 1 << 20);
}

#[test]
fn every_guest_gets_a_virtio_rng() {
    let asm = Asm::default()
        .if_mmio_eq(FIRST_VIRTIO, 0x7472_6976, "magic ok\n", "magic bad\n")
        .if_mmio_eq(FIRST_VIRTIO + 8, 4, "rng ok\n", "rng bad\n")
        // Its one queue has the maximum size the device declares.
        .if_mmio_eq(FIRST_VIRTIO + 0x34, 256, "qmax ok\n", "qmax bad\n")
        .exit(0)
        .halt();
    let k = payload("rng", asm);
    // An initrd (any bytes: the payload never reads it) so no host root is shared: that
    // virtio-fs device would take the first slot.
    let initrd = k.with_file_name("initrd");
    std::fs::write(&initrd, b"unused").unwrap();
    let r = run_microvm(&["--kernel", k.to_str().unwrap(), "--initrd", initrd.to_str().unwrap()], T);
    assert_eq!(r.code(), 0, "{r:?}");
    for want in ["magic ok", "rng ok", "qmax ok"] {
        assert!(r.stdout.contains(want), "{want}: {r:?}");
    }
}

#[test]
fn unclaimed_mmio_reads_all_ones() {
    let k = payload(
        "unclaimed",
        Asm::default()
            .if_mmio_eq(0xc000_0000, 0xffff_ffff, "ones\n", "not ones\n")
            .exit(0)
            .halt(),
    );
    let r = run_microvm(&["--kernel", k.to_str().unwrap()], T);
    assert_eq!(r.code(), 0, "{r:?}");
    assert!(r.stdout.contains("ones\n") && !r.stdout.contains("not ones"), "{r:?}");
}

#[test]
fn i8042_reset_exits_zero() {
    // mov al, 0xfe; out 0x64, al
    let k = payload("reset", Asm::default().print("resetting\n").bytes(&[0xb0, 0xfe, 0xe6, 0x64]).halt());
    let r = run_microvm(&["--kernel", k.to_str().unwrap()], T);
    assert_eq!(r.code(), 0, "{r:?}");
    assert!(r.stdout.contains("resetting"), "{r:?}");
}

/// microvm running payload `k` in the background, its stdio on /dev/null.
fn spawn_quiet(k: &std::path::Path) -> std::process::Child {
    std::process::Command::new(microvm_tests::microvm_bin())
        .args(["--kernel", k.to_str().unwrap()])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap()
}

#[test]
fn sigterm_stops_a_running_guest() {
    let k = payload("sigterm", Asm::default().print("up\n").halt());
    let mut child = spawn_quiet(&k);
    std::thread::sleep(Duration::from_millis(500));
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(128 + libc::SIGTERM));
}

/// An instruction the vCPU can't execute is reported with the vCPU, RIP and instruction
/// bytes. On nested PVM hosts ring-0 `int3` is an emulation failure (exit 1); on hardware
/// KVM it is a #BP with no IDT, i.e. a triple fault, which is a guest reset (exit 0).
/// A System.map beside the image names the function RIP is in.
#[test]
fn int3_in_ring0_is_reported() {
    let k = payload("int3", Asm::default().print("before\n").bytes(&[0xcc]).exit(9).halt());
    let map = format!("{:016x} T payload_start\n", microvm_tests::payload::LOAD_ADDR);
    std::fs::write(k.with_file_name("System.map"), map).unwrap();
    let r = run_microvm(&["--kernel", k.to_str().unwrap()], T);
    assert!(r.stdout.contains("before"), "{r:?}");
    if std::path::Path::new("/sys/module/kvm_pvm").exists() {
        assert_eq!(r.code(), 1, "{r:?}");
        assert!(r.stderr.contains("vCPU 0 stopped: KVM internal error"), "{r:?}");
        assert!(r.stderr.contains("instruction bytes: cc"), "{r:?}");
        assert!(r.stderr.contains(" <payload_start+0x"), "{r:?}");
    } else {
        assert_eq!(r.code(), 0, "{r:?}");
    }
}

/// Starts microvm, sends SIGUSR1 after 1.5 s and SIGTERM 1.5 s later; checks it stopped on
/// SIGTERM and returns (stdout, stderr).
fn dump_registers(args: &[&str]) -> (String, String) {
    let child = std::process::Command::new(microvm_tests::microvm_bin())
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    for signal in [libc::SIGUSR1, libc::SIGTERM] {
        std::thread::sleep(Duration::from_millis(1500));
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(child.id() as i32, signal) };
    }
    let out = child.wait_with_output().unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned());
    assert_eq!(out.status.code(), Some(128 + libc::SIGTERM), "{stderr}");
    (stdout, stderr)
}

/// SIGUSR1 makes every vCPU print its registers (the guest keeps running).
#[test]
fn sigusr1_dumps_vcpu_registers() {
    // A tight loop at a known address: jmp $ (eb fe) right after the print.
    let asm = Asm::default().print("spinning\n");
    let spin_at = microvm_tests::payload::LOAD_ADDR + asm.code.len() as u64;
    let k = payload("usr1", asm.bytes(&[0xeb, 0xfe]));
    let (_, stderr) = dump_registers(&["--kernel", k.to_str().unwrap(), "--cpus", "2"]);
    assert!(stderr.contains(&format!("vcpu-0: RIP={spin_at:#018x}")), "{stderr}");
    // vCPU 1 never got a startup IPI: it is parked in the kernel, but still answers.
    assert!(stderr.contains("vcpu-1: RIP="), "{stderr}");
}

/// `--kernel DIR`: a directory laid out like a kernel build tree (arch/x86/boot/bzImage
/// and System.map) boots its bzImage, and a SIGUSR1 dump names the function RIP is in.
#[test]
fn kernel_tree_boots_its_bzimage_and_names_rip() {
    let tree = scratch_dir("ktree");
    let boot = tree.join("arch/x86/boot");
    std::fs::create_dir_all(&boot).unwrap();
    let asm = Asm::default().print("tree kernel\n");
    // The bzImage's 64-bit entry is LOAD_ADDR + 0x200; the loop (jmp $) follows the print.
    let entry = microvm_tests::payload::LOAD_ADDR + 0x200;
    let spin_offset = asm.code.len() as u64;
    microvm_tests::payload::write_bzimage(&boot.join("bzImage"), &asm.bytes(&[0xeb, 0xfe]).code);
    std::fs::write(
        tree.join("System.map"),
        format!("{:016x} T payload_entry\n{:016x} T after_the_payload\n", entry, entry + 0x1000),
    )
    .unwrap();
    let (stdout, stderr) = dump_registers(&["--kernel", tree.to_str().unwrap()]);
    assert!(stdout.contains("tree kernel"), "{stdout}");
    let want = format!("vcpu-0: RIP={:#018x} <payload_entry+{spin_offset:#x}>", entry + spin_offset);
    assert!(stderr.contains(&want), "want {want}: {stderr}");
}

/// --memory with a unit: the e820 RAM entry above 1 MiB (zero page 0x7000, e820_table at
/// 0x2d0, third entry, size at +8) ends at the requested size.
#[test]
fn memory_with_units() {
    for (value, bytes) in [("64M", 64u32 << 20), ("96", 96 << 20)] {
        let asm = Asm::default()
            .if_mmio_eq(0x7000 + 0x2d0 + 2 * 20 + 8, bytes - (1 << 20), "size ok\n", "size wrong\n")
            .exit(0)
            .halt();
        let k = payload(&format!("mem{value}"), asm);
        let r = run_microvm(&["--kernel", k.to_str().unwrap(), "--memory", value], T);
        assert_eq!(r.code(), 0, "{r:?}");
        assert!(r.stdout.contains("size ok"), "--memory {value}: {r:?}");
    }
}

/// The bzImage path: setup header parsed, protected-mode part loaded, 64-bit entry used.
#[test]
fn bzimage_payload_boots() {
    let dir = scratch_dir("bzimage");
    let k = dir.join("bzImage");
    microvm_tests::payload::write_bzimage(&k, &Asm::default().print("bzimage entry\n").exit(11).halt().code);
    let r = run_microvm(&["--kernel", k.to_str().unwrap()], T);
    assert_eq!(r.code(), 11, "{r:?}");
    assert!(r.stdout.contains("bzimage entry"), "{r:?}");
}

/// --initrd: the image lands in guest memory where the zero page's ramdisk_image (offset
/// 0x218; the zero page is at 0x7000) points, with its size in ramdisk_size.
#[test]
fn initrd_is_loaded_where_the_zero_page_says() {
    let dir = scratch_dir("initrd");
    let initrd = dir.join("initrd.img");
    let mut image = b"INRD".to_vec();
    image.resize(3 * 4096 + 17, 0xab);
    std::fs::write(&initrd, &image).unwrap();
    let k = dir.join("k.elf");
    let asm = Asm::default()
        .if_deref_eq(0x7218, u32::from_le_bytes(*b"INRD"), "initrd ok\n", "initrd missing\n")
        .if_mmio_eq(0x721c, image.len() as u32, "size ok\n", "size wrong\n")
        .exit(0)
        .halt();
    write_elf(&k, &asm.code);
    let r = run_microvm(&["--kernel", k.to_str().unwrap(), "--initrd", initrd.to_str().unwrap()], T);
    assert_eq!(r.code(), 0, "{r:?}");
    assert!(r.stdout.contains("initrd ok") && r.stdout.contains("size ok"), "{r:?}");
}

/// KVM destroys a VM in microvm's release process (vmm/src/release.rs), after microvm has
/// exited: the process holds the VM fd and a pidfd of microvm and nothing else, runs
/// confined in `/`, and exits once microvm is gone, whether microvm ended by SIGTERM or was
/// SIGKILLed; the VM (its PIT's kernel thread) is gone with it.
#[test]
fn kvm_destroys_the_vm_in_the_release_process_after_microvm_exits() {
    use microvm_tests::netns::wait_until;
    use microvm_tests::procs::{children, is_release_process, stat};
    // PR_SET_CHILD_SUBREAPER: the release process becomes this test's child when its
    // microvm exits, so the test can wait for it.
    // SAFETY: prctl with integer arguments.
    assert_eq!(unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) }, 0);
    let k = payload("release", Asm::default().print("up\n").halt());
    for signal in [libc::SIGTERM, libc::SIGKILL] {
        let mut vm = spawn_quiet(&k);
        let pid = vm.id();
        // The PIT's kernel thread lives as long as the VM: "kvm-pit/<microvm's pid>".
        let pit = format!("kvm-pit/{pid}");
        let vm_alive = || microvm_tests::procs::all_pids().into_iter().any(|p| stat(p).is_some_and(|s| s.comm == pit));
        let mut release = None;
        assert!(
            wait_until(10, || {
                release = children(pid).into_iter().find(|p| is_release_process(*p));
                release.is_some() && vm_alive()
            }),
            "no release process, or no VM, beside microvm {pid}"
        );
        let release = release.unwrap();
        let mut fds: Vec<String> = std::fs::read_dir(format!("/proc/{release}/fd"))
            .unwrap()
            .map(|e| std::fs::read_link(e.unwrap().path()).unwrap().to_string_lossy().into_owned())
            .collect();
        fds.sort();
        assert_eq!(fds, ["anon_inode:[pidfd]", "anon_inode:kvm-vm"], "the release process holds more");
        assert_eq!(std::fs::read_link(format!("/proc/{release}/cwd")).unwrap(), std::path::Path::new("/"));
        // It takes its name right before it installs its filter.
        let confined = || {
            let status = std::fs::read_to_string(format!("/proc/{release}/status")).unwrap_or_default();
            status.lines().any(|l| l.split_whitespace().eq(["Seccomp:", "2"]))
        };
        assert!(wait_until(5, confined), "the release process is not confined");
        // A signal meant for microvm (a process group's SIGTERM, `pkill -USR1 microvm`) does
        // not end it.
        for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGUSR1] {
            // SAFETY: kill(2) on a child of our child.
            unsafe { libc::kill(release as i32, sig) };
        }
        std::thread::sleep(Duration::from_millis(100));
        assert!(microvm_tests::procs::alive(release), "a blockable signal ended the release process");

        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(pid as i32, signal) };
        let status = vm.wait().unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert!(status.code() == Some(128 + libc::SIGTERM) || status.signal() == Some(libc::SIGKILL), "{status:?}");
        // microvm is gone; its release process, now this test's child, exits on its own.
        let mut code = -1;
        assert!(
            wait_until(10, || {
                let mut st = 0;
                // SAFETY: waitpid(2) on our (adopted) child, WNOHANG, into a local.
                let r = unsafe { libc::waitpid(release as i32, &mut st, libc::WNOHANG) };
                if r == release as i32 {
                    code = if libc::WIFEXITED(st) { libc::WEXITSTATUS(st) } else { -1 };
                }
                r == release as i32
            }),
            "the release process outlived microvm ({signal}) by 10 s"
        );
        assert_eq!(code, 0, "the release process did not exit cleanly");
        // The PIT thread has stopped when its VM's destruction returns; its /proc entry can
        // stay a moment longer, until the kernel reaps it.
        assert!(wait_until(5, || !vm_alive()), "the VM outlived its release process");
    }
}
