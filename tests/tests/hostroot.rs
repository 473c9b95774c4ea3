//! The host as the guest's root: no disk image, no initrd. microvm shares the host's `/`
//! read-only over virtio-fs, the current directory writable at the same path, and runs the
//! command there with its own init (what `vng -- CMD` does). One boot checks it all.

use std::time::Duration;

use microvm_tests::{guest, run_microvm_in, scratch_dir};

#[test]
fn host_root_runs_a_command_on_the_hosts_files() {
    let dir = scratch_dir("hostroot");
    let (kernel, _) = guest();
    let (rw, ro) = (dir.join("rw share"), dir.join("ro"));
    std::fs::create_dir_all(&rw).unwrap();
    std::fs::create_dir_all(&ro).unwrap();
    std::fs::write(ro.join("seen"), "from the host\n").unwrap();
    let os_release = std::fs::read_to_string("/etc/os-release").unwrap();
    let first_line = os_release.lines().next().unwrap().to_string();
    let script = format!(
        "{check} check OS head -n1 /etc/os-release; echo CWD=$(pwd); check UNAME uname -r; \
         echo guest > cwd-file; echo shared > '{rw}/written'; \
         again cat '{ro}/seen'; if echo no > '{ro}/refused' 2>/dev/null; then echo RO_WRITABLE; else echo RO_REFUSED; fi; \
         if again touch /usr/microvm-test 2>/dev/null; then echo ROOT_WRITABLE; else echo ROOT_RO; fi; \
         echo tmp > /tmp/t && check TMP cat /tmp/t; exit 4",
        check = microvm_tests::SH_CHECK,
        rw = rw.display(),
        ro = ro.display()
    );
    let rw_spec = rw.to_str().unwrap().to_string();
    let ro_spec = format!("{},ro", ro.display());
    let args = [
        "--kernel", kernel.to_str().unwrap(),
        "--cmdline", "quiet",
        "--share", &rw_spec,
        "--share", &ro_spec,
        "--", "sh", "-c", &script,
    ];
    let run = run_microvm_in(&dir, &args, Duration::from_secs(900));
    let out = &run.stdout;
    assert_eq!(run.code(), 4, "{run:?}");
    assert!(out.contains(&format!("OS={first_line}")), "the host's /etc/os-release: {run:?}");
    assert!(out.contains(&format!("CWD={}", dir.display())), "the working directory is the host's: {run:?}");
    assert!(out.contains("from the host") && out.contains("RO_REFUSED"), "{run:?}");
    assert!(out.contains("ROOT_RO") && out.contains("TMP=tmp"), "read-only root, writable /tmp: {run:?}");
    assert!(!out.contains("RO_WRITABLE") && !out.contains("ROOT_WRITABLE"), "{run:?}");
    assert_eq!(std::fs::read_to_string(dir.join("cwd-file")).unwrap(), "guest\n", "{run:?}");
    assert_eq!(std::fs::read_to_string(rw.join("written")).unwrap(), "shared\n", "{run:?}");
    assert!(!ro.join("refused").exists());
    assert!(!std::path::Path::new("/usr/microvm-test").exists());
    std::fs::remove_dir_all(&dir).unwrap();
}
