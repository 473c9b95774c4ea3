//! Bad input: each case is one line on stderr and exit status 2, and nothing is started.

use std::time::Duration;

use microvm_tests::payload::{write_elf, Asm};
use microvm_tests::{microvm_bin, run_microvm, scratch_dir, small_disk_args, Run};

const T: Duration = Duration::from_secs(30);

fn assert_usage_error(r: &Run, needle: &str) {
    assert_eq!(r.code(), 2, "{r:?}");
    let lines: Vec<&str> = r.stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "want one line: {r:?}");
    assert!(lines[0].contains(needle), "want '{needle}': {r:?}");
    assert!(!r.stderr.contains("panicked"), "{r:?}");
}

/// Each (value, expected message) given as `flag value` is refused with exit 2 and one line.
fn each_refused(kernel: &std::path::Path, flag: &str, cases: &[(&str, &str)]) {
    for (value, needle) in cases {
        let r = run_microvm(&["--kernel", kernel.to_str().unwrap(), flag, value], T);
        assert_usage_error(&r, needle);
    }
}

fn good_kernel(name: &str) -> std::path::PathBuf {
    let p = scratch_dir(name).join("k.elf");
    write_elf(&p, &Asm::default().exit(0).halt().code);
    p
}

#[test]
fn missing_kernel() {
    let r = run_microvm(&["--kernel", "/nonexistent/vmlinux"], T);
    assert_usage_error(&r, "cannot open kernel '/nonexistent/vmlinux'");
}

#[test]
fn file_that_is_no_kernel() {
    let p = scratch_dir("notkernel").join("junk");
    std::fs::write(&p, b"this is not a kernel image at all, just some text").unwrap();
    let r = run_microvm(&["--kernel", p.to_str().unwrap()], T);
    assert_usage_error(&r, "is not a kernel microvm can boot");
}

#[test]
fn bad_disk_size_and_options() {
    let k = good_kernel("badsize");
    each_refused(&k, "--disk", &[
        ("x.img,size=lots", "bad --disk 'x.img,size=lots': bad size 'lots'"),
        ("x.img,colour=red", "bad --disk 'x.img,colour=red': unknown option 'colour'"),
        ("x.img,size=1000", "not a non-zero multiple of 512 bytes"),
        ("x.img,bw=fast", "bad --disk 'x.img,bw=fast': bad rate 'fast'"),
    ]);
}

#[test]
fn bad_net_specs() {
    let k = good_kernel("badnet");
    each_refused(&k, "--net", &[
        ("foo", "bad --net 'foo': unknown mode 'foo'"),
        ("nat,rate=5mb", "bad --net 'nat,rate=5mb': bad rate '5mb'"),
        ("nat,pps=0", "bad --net 'nat,pps=0': bad count '0'"),
        ("nat,mac=01:00:00:00:00:01", "invalid mac"),
        ("host-only,uplink=eth0", "unknown option 'uplink'"),
        ("bridge=br0,vlan=4095", "vlan '4095' is not a VLAN id (1..4094)"),
        ("host-only:lab,subnet=10.77.0.0/24,vxlan=0,peers=192.0.2.1", "VNI 0 is out of range"),
        ("host-only:lab,vxlan=5,peers=192.0.2.1", "an overlay needs its subnet"),
        ("nat:lab,peers=192.0.2.1", "add vxlan=VNI"),
    ]);
}

#[test]
fn bad_shares() {
    let k = good_kernel("badshare");
    let dir = scratch_dir("badshare-dir");
    let missing = dir.join("nonexistent");
    let r = run_microvm(&["--kernel", k.to_str().unwrap(), "--share", missing.to_str().unwrap()], T);
    assert_usage_error(&r, &format!("cannot share '{}'", missing.display()));
    let file = dir.join("file");
    std::fs::write(&file, b"x").unwrap();
    let r = run_microvm(&["--kernel", k.to_str().unwrap(), "--share", file.to_str().unwrap()], T);
    assert_usage_error(&r, "not a directory");
    let spec = format!("{},at=relative", dir.display());
    let r = run_microvm(&["--kernel", k.to_str().unwrap(), "--share", &spec], T);
    assert_usage_error(&r, &format!("bad --share '{spec}': at=relative must be an absolute guest path"));
    let (a, b) = (format!("{},tag=t", dir.display()), "/tmp,tag=t".to_string());
    let r = run_microvm(&["--kernel", k.to_str().unwrap(), "--share", &a, "--share", &b], T);
    assert_usage_error(&r, "both use tag 't'");
    for (spec, needle) in [
        (format!("{},tag=no space", dir.display()), "only letters, digits"),
        (format!("{},tag=microvm-root", dir.display()), "tag 'microvm-root' is reserved"),
        (format!("{},at=/", dir.display()), "would hide the guest's root"),
    ] {
        let r = run_microvm(&["--kernel", k.to_str().unwrap(), "--share", &spec], T);
        assert_usage_error(&r, needle);
    }
}

#[test]
fn bad_memory_units() {
    let k = good_kernel("badmem");
    each_refused(&k, "--memory", &[
        ("2X", "bad --memory '2X'"),
        ("1.5G", "bad --memory '1.5G'"),
        ("1000K", "bad --memory '1000K'"),
        ("16M", "--memory must be between 32 and"),
        ("2T", "--memory must be between 32 and"),
    ]);
}

#[test]
fn kernel_tree_without_an_image() {
    let dir = scratch_dir("emptytree");
    std::fs::create_dir_all(dir.join("arch/x86/boot")).unwrap();
    let r = run_microvm(&["--kernel", dir.to_str().unwrap()], T);
    assert_usage_error(&r, "has neither vmlinux nor arch/x86/boot/bzImage");
}

#[test]
fn kconfig_needs_no_kernel_and_kernel_is_otherwise_required() {
    let r = run_microvm(&["--kconfig"], T);
    assert_eq!(r.code(), 0, "{r:?}");
    for option in ["CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES=y", "CONFIG_VIRTIO_FS=y", "CONFIG_HW_RANDOM_VIRTIO=y", "CONFIG_PVH=y"] {
        assert!(r.stdout.lines().any(|l| l == option), "{option}: {r:?}");
    }
    assert!(r.stderr.is_empty(), "{r:?}");
    let r = run_microvm(&[], T);
    assert_eq!(r.code(), 2, "{r:?}");
    assert!(r.stderr.contains("--kernel"), "{r:?}");
}

#[test]
fn disk_refuses_to_shrink_and_missing_disk() {
    let dir = scratch_dir("shrink");
    let k = good_kernel("shrink-k");
    let img = dir.join("d.img");
    std::fs::write(&img, vec![0u8; 2 << 20]).unwrap();
    let r = run_microvm(&["--kernel", k.to_str().unwrap(), "--disk", &format!("{},size=1M", img.display())], T);
    assert_usage_error(&r, "refusing to shrink");
    assert_eq!(std::fs::metadata(&img).unwrap().len(), 2 << 20);
    let missing = dir.join("none.img");
    let r = run_microvm(&["--kernel", k.to_str().unwrap(), "--disk", missing.to_str().unwrap()], T);
    assert_usage_error(&r, "does not exist");
}

#[test]
fn too_many_vcpus_and_bad_memory() {
    let k = good_kernel("cpus");
    let r = run_microvm(&["--kernel", k.to_str().unwrap(), "--cpus", "500"], T);
    assert_usage_error(&r, "--cpus must be between 1 and 32");
    let r = run_microvm(&["--kernel", k.to_str().unwrap(), "--cpus", "0"], T);
    assert_usage_error(&r, "--cpus must be between");
    let r = run_microvm(&["--kernel", k.to_str().unwrap(), "--memory", "1"], T);
    assert_usage_error(&r, "--memory must be between");
}

/// Ten virtio slots: the virtio-rng takes one, a command's channel another. Past that, a
/// usage error, not a guest missing devices.
#[test]
fn too_many_devices() {
    let k = good_kernel("devices");
    let dir = scratch_dir("devices");
    let disks = small_disk_args(&dir, "d", 9);
    let mut args = vec!["--kernel", k.to_str().unwrap()];
    args.extend(disks.iter().map(String::as_str));
    // Nine disks and a command: one too many.
    args.extend(["--", "true"]);
    let r = run_microvm(&args, T);
    assert_usage_error(&r, "too many devices: 9 for disks, NICs and shares (a host root's take two), at most 8 fit");
    assert!(!dir.join("d0.img").exists(), "a refused run created a disk");
}

#[test]
fn kvm_missing() {
    // A private mount namespace with an empty /dev: /dev/kvm does not exist there.
    let k = good_kernel("nokvm");
    let out = std::process::Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg("mount -t tmpfs tmpfs /dev && exec \"$0\" --kernel \"$1\"")
        .arg(microvm_bin())
        .arg(&k)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("cannot open /dev/kvm"), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
}

#[test]
fn kvm_not_permitted() {
    // As an unprivileged user, /dev/kvm (mode 0600 here) can't be opened. Copy the binary and
    // kernel where that user can reach them.
    let k = good_kernel("kvmperm");
    let dir = std::env::temp_dir().join(format!("mv-perm-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bin = dir.join("microvm");
    let kernel = dir.join("k.elf");
    std::fs::copy(microvm_bin(), &bin).unwrap();
    std::fs::copy(&k, &kernel).unwrap();
    let _ = std::process::Command::new("chmod").args(["-R", "a+rX"]).arg(&dir).status();
    let out = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(&bin)
        .arg("--kernel")
        .arg(&kernel)
        .output()
        .unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("cannot open /dev/kvm") && stderr.contains("ermission denied"), "{stderr}");
}

/// Input only found wrong while building the VM is still bad usage: exit 2, one line.
#[test]
fn initrd_too_big_and_cmdline_too_long() {
    let k = good_kernel("late");
    let initrd = scratch_dir("late-initrd").join("big.cpio");
    std::fs::File::create(&initrd).unwrap().set_len(40 << 20).unwrap();
    let r = run_microvm(&["--kernel", k.to_str().unwrap(), "--memory", "32M", "--initrd", initrd.to_str().unwrap()], T);
    assert_usage_error(&r, "does not fit in guest memory");
    let long = "a".repeat(3000);
    let r = run_microvm(&["--kernel", k.to_str().unwrap(), "--no-quirks", "--cmdline", &long], T);
    assert_usage_error(&r, "kernel command line is invalid or longer than 2048 bytes");
}

#[test]
fn disk_in_use_is_refused() {
    let dir = scratch_dir("locked");
    let k = good_kernel("locked-k");
    let img = dir.join("a.img");
    std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
    let img_s = img.to_str().unwrap();
    let name = format!("disk '{img_s}' is in use");

    // The same image twice in one VM.
    let r = run_microvm(&["--kernel", k.to_str().unwrap(), "--disk", img_s, "--disk", img_s], T);
    assert_usage_error(&r, &name);

    // A second microvm on an image a running one holds (read-write or read-only).
    let up = dir.join("up.elf");
    write_elf(&up, &Asm::default().print("up\n").halt().code);
    let mut first = std::process::Command::new(microvm_bin())
        .args(["--kernel", up.to_str().unwrap(), "--disk", img_s])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stdout = first.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line);
        let _ = tx.send(line);
    });
    let line = rx.recv_timeout(T).unwrap_or_default();
    let second = run_microvm(&["--kernel", k.to_str().unwrap(), "--disk", img_s], T);
    let second_ro = run_microvm(&["--kernel", k.to_str().unwrap(), "--disk", &format!("{img_s},readonly")], T);
    first.kill().unwrap();
    first.wait().unwrap();
    assert_eq!(line, "up\n", "the first microvm did not start");
    assert_usage_error(&second, &name);
    assert_usage_error(&second_ro, &name);

    // Once it is gone, the image is free again.
    let r = run_microvm(&["--kernel", k.to_str().unwrap(), "--disk", img_s], T);
    assert_eq!(r.code(), 0, "{r:?}");
    let _ = std::fs::remove_dir_all(&dir);
}
