//! `--share` and the virtiofsd processes behind it. The lifecycle tests use a tiny payload
//! kernel (no Linux boot: seconds), with neither --disk nor --initrd, so microvm also shares
//! the host root and the working directory (three virtiofsd). One test boots the real guest
//! and uses the shares from busybox.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use microvm_tests::payload::{write_elf, Asm};
use microvm_tests::netns::wait_until;
use microvm_tests::procs::{alive, all_pids, descendants, is_release_process, stat};
use microvm_tests::{guest_with_own_rootfs, microvm_bin, scratch_dir};

/// A microvm running in the background, its output collected.
struct Vm {
    child: Child,
    stdout: Arc<Mutex<String>>,
    stderr: Arc<Mutex<String>>,
}

impl Vm {
    fn start(args: &[&str], envs: &[(&str, &Path)], cwd: &Path) -> Vm {
        let mut cmd = Command::new(microvm_bin());
        cmd.args(args).current_dir(cwd).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn microvm");
        let collect = |mut r: Box<dyn Read + Send>| {
            let buf = Arc::new(Mutex::new(String::new()));
            let b = buf.clone();
            std::thread::spawn(move || {
                let mut chunk = [0u8; 4096];
                while let Ok(n) = r.read(&mut chunk) {
                    if n == 0 {
                        break;
                    }
                    b.lock().unwrap().push_str(&String::from_utf8_lossy(&chunk[..n]));
                }
            });
            buf
        };
        let stdout = collect(Box::new(child.stdout.take().unwrap()));
        let stderr = collect(Box::new(child.stderr.take().unwrap()));
        Vm { child, stdout, stderr }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn wait(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(s) = self.child.try_wait().unwrap() {
                std::thread::sleep(Duration::from_millis(100)); // let the readers drain
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    fn out(&self) -> String {
        format!("--- stdout ---\n{}\n--- stderr ---\n{}", self.stdout.lock().unwrap(), self.stderr.lock().unwrap())
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Every descendant of microvm `pid` but its release process (vmm/src/release.rs), which
/// outlives it by design: the virtiofsd daemons and their sandboxed workers.
fn daemons(pid: u32) -> Vec<u32> {
    descendants(pid).into_iter().filter(|p| !is_release_process(*p)).collect()
}

/// The virtiofsd processes microvm `pid` started: (pid, its command line).
fn virtiofsds(pid: u32) -> Vec<(u32, String)> {
    all_pids()
        .into_iter()
        .filter(|p| stat(*p).is_some_and(|s| s.ppid == pid && s.comm == "virtiofsd"))
        .map(|p| (p, std::fs::read_to_string(format!("/proc/{p}/cmdline")).unwrap_or_default().replace('\0', " ")))
        .collect()
}

/// A payload that prints UP and then halts for ever (the VM runs until it is stopped).
fn halting_payload(dir: &Path) -> PathBuf {
    let k = dir.join("halt.elf");
    write_elf(&k, &Asm::default().print("PAYLOAD-UP\n").halt().code);
    k
}

struct Setup {
    dir: PathBuf,
    run_dir: PathBuf,
    shared: PathBuf,
    vm: Vm,
    state_dir: PathBuf,
}

/// microvm on a halting payload with the host root, the working directory and one --share:
/// waits until its three virtiofsd run and the VM is up.
fn start_with_three_daemons(name: &str) -> Setup {
    let dir = scratch_dir(name);
    let run_dir = dir.join("run");
    let shared = dir.join("shared");
    std::fs::create_dir_all(&shared).unwrap();
    let k = halting_payload(&dir);
    let vm = Vm::start(
        &["--kernel", k.to_str().unwrap(), "--share", &format!("{},tag=data", shared.display())],
        &[("MICROVM_RUN_DIR", &run_dir)],
        &dir,
    );
    let state_dir = run_dir.join(format!("vm-{}", vm.pid()));
    let up = wait_until(60, || {
        vm.stdout.lock().unwrap().contains("PAYLOAD-UP") && virtiofsds(vm.pid()).len() == 3
    });
    assert!(up, "VM with 3 virtiofsd did not come up: {:?} {}", virtiofsds(vm.pid()), vm.out());
    let sockets = std::fs::read_dir(&state_dir)
        .unwrap()
        .filter(|e| e.as_ref().unwrap().file_name().to_str().unwrap().ends_with(".sock"))
        .count();
    assert_eq!(sockets, 3, "one socket per share in {}", state_dir.display());
    Setup { dir, run_dir, shared, vm, state_dir }
}

#[test]
fn virtiofsd_missing_is_a_usage_error() {
    let dir = scratch_dir("share-missing");
    let k = halting_payload(&dir);
    let check = |envs: &[(&str, &Path)], needle: &str| {
        let mut vm = Vm::start(&["--kernel", k.to_str().unwrap(), "--share", dir.to_str().unwrap()], envs, &dir);
        let status = vm.wait(Duration::from_secs(30)).unwrap_or_else(|| panic!("still running: {}", vm.out()));
        assert_eq!(status.code(), Some(2), "{}", vm.out());
        let err = vm.stderr.lock().unwrap().clone();
        let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(lines.len(), 1, "one line: {}", vm.out());
        assert!(lines[0].contains(needle) && lines[0].contains("cargo install virtiofsd"), "{}", vm.out());
        assert!(virtiofsds(vm.pid()).is_empty());
    };
    check(&[("MICROVM_VIRTIOFSD", Path::new("/nonexistent/virtiofsd"))], "MICROVM_VIRTIOFSD=/nonexistent/virtiofsd");
    // Not in PATH, not in ~/.cargo/bin (HOME elsewhere), no override.
    let empty = dir.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    check(&[("PATH", &empty), ("HOME", &empty), ("MICROVM_VIRTIOFSD", Path::new(""))], "virtiofsd not found");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn sigterm_stops_every_virtiofsd_and_removes_the_state_dir() {
    let mut s = start_with_three_daemons("share-sigterm");
    let procs = daemons(s.vm.pid());
    assert!(procs.len() >= 3, "{procs:?}");
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(s.vm.pid() as i32, libc::SIGTERM) };
    let status = s.vm.wait(Duration::from_secs(15)).unwrap_or_else(|| panic!("SIGTERM ignored: {}", s.vm.out()));
    assert_eq!(status.code(), Some(128 + libc::SIGTERM), "{}", s.vm.out());
    let left: Vec<u32> = procs.iter().copied().filter(|p| alive(*p)).collect();
    assert!(left.is_empty(), "processes left behind: {left:?}");
    assert!(!s.state_dir.exists(), "state dir left behind");
    std::fs::remove_dir_all(&s.dir).unwrap();
}

#[test]
fn virtiofsd_death_ends_the_vm_with_an_error() {
    let mut s = start_with_three_daemons("share-death");
    let procs = daemons(s.vm.pid());
    let (victim, _) = virtiofsds(s.vm.pid())
        .into_iter()
        .find(|(_, cmd)| cmd.contains(s.shared.to_str().unwrap()))
        .expect("the virtiofsd of the --share");
    let t0 = Instant::now();
    // SAFETY: kill(2) on a process of this test's microvm.
    unsafe { libc::kill(victim as i32, libc::SIGKILL) };
    let status = s.vm.wait(Duration::from_secs(10)).unwrap_or_else(|| panic!("microvm hangs: {}", s.vm.out()));
    assert!(t0.elapsed() < Duration::from_secs(5), "took {:?}", t0.elapsed());
    assert_eq!(status.code(), Some(1), "{}", s.vm.out());
    let err = s.vm.stderr.lock().unwrap().clone();
    assert!(
        err.contains("virtiofsd for share 'data'") && err.contains("exited unexpectedly") && err.contains("signal 9"),
        "{}",
        s.vm.out()
    );
    let left: Vec<u32> = procs.iter().copied().filter(|p| alive(*p)).collect();
    assert!(left.is_empty(), "processes left behind: {left:?}");
    assert!(!s.state_dir.exists(), "state dir left behind");
    std::fs::remove_dir_all(&s.dir).unwrap();
}

#[test]
fn virtiofsd_dies_with_a_killed_microvm_and_the_next_run_cleans_up() {
    let mut s = start_with_three_daemons("share-kill9");
    let procs = daemons(s.vm.pid());
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(s.vm.pid() as i32, libc::SIGKILL) };
    s.vm.wait(Duration::from_secs(5)).expect("SIGKILL");
    assert!(
        wait_until(5, || procs.iter().all(|p| !alive(*p))),
        "virtiofsd outlived a SIGKILLed microvm: {:?}",
        procs.iter().filter(|p| alive(**p)).collect::<Vec<_>>()
    );
    assert!(s.state_dir.exists(), "nobody could remove it");
    // The next microvm with the same run dir removes the dead one's directory.
    let k = s.dir.join("exit.elf");
    write_elf(&k, &Asm::default().exit(0).halt().code);
    let mut next = Vm::start(
        &["--kernel", k.to_str().unwrap(), "--share", s.shared.to_str().unwrap()],
        &[("MICROVM_RUN_DIR", &s.run_dir)],
        &s.dir,
    );
    let status = next.wait(Duration::from_secs(30)).unwrap_or_else(|| panic!("{}", next.out()));
    assert_eq!(status.code(), Some(0), "{}", next.out());
    assert!(!s.state_dir.exists(), "stale state dir not removed");
    assert_eq!(std::fs::read_dir(&s.run_dir).unwrap().count(), 0, "the next run left its own dir");
    std::fs::remove_dir_all(&s.dir).unwrap();
}

/// One boot of the real guest (busybox on a --disk root): a writable and a read-only share,
/// mounted by hand. The guest writes, reads a file the host creates while it runs, is refused
/// on the read-only share; then the host kills the writable share's virtiofsd while the guest
/// keeps reading it, and microvm must exit with an error within seconds, leaving nothing.
#[test]
fn guest_uses_shares_and_survives_nothing_when_virtiofsd_dies() {
    let dir = scratch_dir("share-guest");
    let (kernel, root) = guest_with_own_rootfs(&dir);
    let rw = dir.join("rw");
    let ro = dir.join("ro");
    std::fs::create_dir_all(&rw).unwrap();
    std::fs::create_dir_all(&ro).unwrap();
    std::fs::write(ro.join("hostfile"), "from-the-host\n").unwrap();
    let run_dir = dir.join("run");
    // Plain busybox: works with the test image's init and with microvm's own.
    // `again`: see SH_CHECK (this host's PVM sometimes crashes a process as it starts).
    let script = format!("{} again mkdir -p /tmp/rw /tmp/ro && again mount -t virtiofs t1 /tmp/rw \
        && again mount -t virtiofs t2 /tmp/ro \
        && echo written-by-guest > /tmp/rw/f \
        && {{ again cat /tmp/ro/hostfile > /tmp/rw/copied; }} \
        && {{ echo nope > /tmp/ro/g 2>/dev/null && echo RO-WRITTEN > /tmp/rw/ro-result || echo RO-REFUSED > /tmp/rw/ro-result; }} \
        && echo ready > /tmp/rw/ready \
        && i=0; while [ ! -e /tmp/rw/live ] && [ $i -lt 120 ]; do sleep 1; i=$((i+1)); done; \
        again cat /tmp/rw/live > /tmp/rw/live-seen; \
        while :; do cat /tmp/rw/f > /dev/null; done", microvm_tests::SH_CHECK);
    let mut vm = Vm::start(
        &[
            "--kernel", kernel.to_str().unwrap(),
            "--disk", root.to_str().unwrap(),
            "--share", &format!("{},tag=t1", rw.display()),
            "--share", &format!("{},tag=t2,ro", ro.display()),
            "--cmdline", "quiet",
            "--", "sh", "-c", &script,
        ],
        &[("MICROVM_RUN_DIR", &run_dir)],
        &dir,
    );
    let state_dir = run_dir.join(format!("vm-{}", vm.pid()));
    let ready = wait_until(600, || rw.join("ready").exists() || vm.child.try_wait().unwrap().is_some());
    assert!(ready && rw.join("ready").exists(), "guest never got ready: {}", vm.out());
    assert_eq!(std::fs::read_to_string(rw.join("f")).unwrap(), "written-by-guest\n");
    assert_eq!(std::fs::read_to_string(rw.join("copied")).unwrap(), "from-the-host\n");
    assert_eq!(std::fs::read_to_string(rw.join("ro-result")).unwrap(), "RO-REFUSED\n", "{}", vm.out());
    assert!(!ro.join("g").exists(), "read-only share was written");
    // A file the host creates while the guest runs is visible to the guest.
    std::fs::write(rw.join("live"), "created-on-the-host\n").unwrap();
    let seen = wait_until(180, || rw.join("live-seen").exists());
    assert!(seen, "guest did not see the host's new file: {}", vm.out());
    assert!(
        wait_until(30, || std::fs::read_to_string(rw.join("live-seen")).unwrap_or_default() == "created-on-the-host\n"),
        "{}",
        vm.out()
    );

    // The guest is now reading /tmp/rw in a loop: kill that share's virtiofsd.
    let procs = daemons(vm.pid());
    let (victim, _) = virtiofsds(vm.pid())
        .into_iter()
        .find(|(_, cmd)| cmd.contains(rw.to_str().unwrap()))
        .expect("the virtiofsd of t1");
    let t0 = Instant::now();
    // SAFETY: kill(2) on a process of this test's microvm.
    unsafe { libc::kill(victim as i32, libc::SIGKILL) };
    let status = vm.wait(Duration::from_secs(20)).unwrap_or_else(|| panic!("microvm hangs: {}", vm.out()));
    assert!(t0.elapsed() < Duration::from_secs(10), "took {:?}", t0.elapsed());
    assert_eq!(status.code(), Some(1), "{}", vm.out());
    assert!(vm.stderr.lock().unwrap().contains("virtiofsd for share 't1'"), "{}", vm.out());
    let left: Vec<u32> = procs.iter().copied().filter(|p| alive(*p)).collect();
    assert!(left.is_empty(), "processes left behind: {left:?}");
    assert!(!state_dir.exists(), "state dir (sockets) left behind");
    std::fs::remove_dir_all(&dir).unwrap();
}
