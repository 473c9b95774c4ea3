//! Bad input: each case is one line on stderr and exit status 2, and nothing is started.

use std::time::Duration;

use microvm_tests::payload::{write_elf, Asm};
use microvm_tests::{microvm_bin, run_microvm, scratch_dir, Run};

const T: Duration = Duration::from_secs(30);

fn assert_usage_error(r: &Run, needle: &str) {
    assert_eq!(r.code(), 2, "{r:?}");
    let lines: Vec<&str> = r.stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "want one line: {r:?}");
    assert!(lines[0].contains(needle), "want '{needle}': {r:?}");
    assert!(!r.stderr.contains("panicked"), "{r:?}");
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
    let r = run_microvm(&["--kernel", k.to_str().unwrap(), "--disk", "x.img,size=lots"], T);
    assert_usage_error(&r, "bad size 'lots'");
    let r = run_microvm(&["--kernel", k.to_str().unwrap(), "--disk", "x.img,colour=red"], T);
    assert_usage_error(&r, "unknown option 'colour=red'");
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
