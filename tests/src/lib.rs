//! Shared helpers for the integration tests: where the microvm binary and the test guest
//! are, tiny hand-assembled guest payloads, and running microvm with a timeout.

pub mod netns;
pub mod payload;
pub mod procs;
pub mod world;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// A shell prelude for guest scripts: `check NAME CMD...` runs CMD (eval'd) up to eight
/// times and prints `NAME=<its output>` from the first clean run, else `NAME=FAILED (exit S..)`
/// with each run's status (only positive probes use it: a failure costs the retries);
/// `again CMD ARGS...` runs a command whose output goes on (a stream, a side effect) again,
/// up to eight times, only while it dies of a signal, and keeps its status otherwise.
/// This host's PVM sometimes starts a guest process with a broken TLS base (a segfault at
/// its first TLS access, "exe[N]: segfault at 0"), whatever it runs, in booted and restored
/// guests alike (~30% of `$(a | b)` here; three failures in a row were seen in one of five
/// restores, five in a row once in CI, in a restore whose guest was busy catching its clock
/// up): so commands are retried, after the third failure a second apart (`sleep` may crash
/// too: harmless), and with pipefail a crash in a pipeline is never read as its result
/// (where the shell has pipefail: dash has not).
pub const SH_CHECK: &str = "(set -o pipefail) 2>/dev/null && set -o pipefail; \
     check() { local n i r s; n=$1; shift; s=; for i in 1 2 3 4 5 6 7 8; do [ $i -gt 3 ] && sleep 1; r=$(eval \"$*\" 2>/dev/null) && { echo \"$n=$r\"; return; }; s=\"$s $?\"; done; echo \"$n=FAILED (exit$s)\"; }; \
     again() { local i s; for i in 1 2 3 4 5 6 7 8; do [ $i -gt 3 ] && sleep 1; \"$@\"; s=$?; [ $s -gt 128 ] || return $s; done; return $s; }; ";

/// After `SH_CHECK`: the external commands the network scripts use, each wrapped in
/// `again` (a function of the same name that runs `command NAME ...`), so a process the
/// host crashes as it starts is started again instead of reading as a failed probe.
pub const SH_AGAIN_COMMANDS: &str = "for c in ip awk nc ping wget timeout udhcpc arping cat grep sed head wc tr dd seq httpd; do \
     eval \"$c() { again command $c \\\"\\$@\\\"; }\"; done; ";

/// The workspace root (this crate lives in `<root>/tests`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ has a parent").to_path_buf()
}

/// The microvm binary: `$MICROVM_BIN`, or the workspace's debug build (built on first use,
/// so `cargo test` alone works).
pub fn microvm_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(p) = std::env::var_os("MICROVM_BIN") {
            return PathBuf::from(p);
        }
        let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .args(["build", "-q", "-p", "vmm", "--bin", "microvm"])
            .current_dir(workspace_root())
            .status()
            .expect("run cargo build");
        assert!(status.success(), "building microvm failed");
        workspace_root().join("target/debug/microvm")
    })
    .clone()
}

/// The test guest built by tools/build-guest: (vmlinux, rootfs.ext4).
/// Panics with a clear message when it is missing: guest tests are never skipped.
pub fn guest() -> (PathBuf, PathBuf) {
    let dir = std::env::var_os("MICROVM_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target/guest"));
    let kernel = dir.join("vmlinux");
    let rootfs = dir.join("rootfs.ext4");
    assert!(
        kernel.exists() && rootfs.exists(),
        "test guest missing in {}: run tools/build-guest (tools/test does)",
        dir.display()
    );
    (kernel, rootfs)
}

/// The test guest's kernel and a private copy of its rootfs in `dir` (guests write to
/// their root disk, so each boot gets its own): (vmlinux, dir/root.ext4).
pub fn guest_with_own_rootfs(dir: &Path) -> (PathBuf, PathBuf) {
    let (kernel, rootfs) = guest();
    let root = dir.join("root.ext4");
    std::fs::copy(&rootfs, &root).expect("copy the guest rootfs");
    (kernel, root)
}

/// A snapshot of the test guest booted to its init's READY (1 vCPU, its rootfs as a
/// `,snapshot` disk, no NIC), for tests that only need a booted guest: `microvm --restore
/// DIR -- CMD` takes seconds where a boot takes a minute here. Made by the first test that
/// asks (under a lock, so parallel tests wait for one boot) and reused while the microvm
/// binary, the kernel and the rootfs are unchanged (their sizes and modification times name
/// the directory). Restores never write the rootfs copy beside it.
pub fn booted_snapshot() -> PathBuf {
    use std::os::unix::fs::MetadataExt;
    let (kernel, rootfs) = guest();
    let id = |p: &Path| {
        let m = std::fs::metadata(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        format!("{:x}-{:x}", m.len(), m.mtime())
    };
    let key = format!("{}-{}-{}", id(&microvm_bin()), id(&kernel), id(&rootfs));
    let dir = workspace_root().join("target/test-snapshots").join(key);
    std::fs::create_dir_all(&dir).expect("create the test snapshot directory");
    let lock = std::fs::File::create(dir.join("lock")).expect("create the lock file");
    // SAFETY: flock on a descriptor we own; released when `lock` is closed.
    assert_eq!(unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&lock), libc::LOCK_EX) }, 0);
    let snap = dir.join("snap");
    if !snap.join("state").exists() {
        let root = dir.join("root.ext4");
        std::fs::copy(&rootfs, &root).expect("copy the guest rootfs");
        let disk = format!("{},snapshot", root.display());
        let boot = run_microvm(
            &["--kernel", kernel.to_str().unwrap(), "--disk", &disk, "--cmdline", "quiet",
              "--snapshot-to", snap.to_str().unwrap()],
            Duration::from_secs(600),
        );
        assert_eq!(boot.code(), 0, "booting the shared test snapshot failed: {boot:?}");
    }
    snap
}

/// `--disk DIR/NAMEi.img,size=1M` for each i in 0..n, as arguments: small disks that
/// microvm creates, for tests that fill virtio slots.
pub fn small_disk_args(dir: &Path, name: &str, n: usize) -> Vec<String> {
    (0..n)
        .flat_map(|i| ["--disk".to_string(), format!("{},size=1M", dir.join(format!("{name}{i}.img")).display())])
        .collect()
}

/// A fresh scratch directory under the target dir, removed by the caller when done.
pub fn scratch_dir(name: &str) -> PathBuf {
    let d = workspace_root()
        .join("target/test-scratch")
        .join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("create scratch dir");
    d
}

/// Result of one microvm run.
pub struct Run {
    pub status: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl Run {
    pub fn code(&self) -> i32 {
        self.status.unwrap_or(-1)
    }
}

impl std::fmt::Debug for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {:?} after {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.status, self.elapsed, self.stdout, self.stderr
        )
    }
}

/// Runs microvm with `args`, stdin closed, killing it after `timeout`.
pub fn run_microvm(args: &[&str], timeout: Duration) -> Run {
    run_microvm_in(&std::env::current_dir().expect("current dir"), args, timeout)
}

/// [`run_microvm`] with `cwd` as microvm's working directory (the guest command's, with a
/// host root).
pub fn run_microvm_in(cwd: &Path, args: &[&str], timeout: Duration) -> Run {
    let start = Instant::now();
    let child = Command::new(microvm_bin())
        .args(args)
        .current_dir(cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn microvm");
    let pid = child.id();
    let killer = std::thread::spawn(move || {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(200));
            // SAFETY: signal 0 only checks that the process exists.
            if unsafe { libc::kill(pid as i32, 0) } != 0 {
                return;
            }
        }
        // SAFETY: plain kill(2) on our own child.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    });
    let out: Output = child.wait_with_output().expect("wait for microvm");
    let _ = killer.join();
    Run {
        status: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        elapsed: start.elapsed(),
    }
}

/// `dir/plain.ext4` (for microvm's own init on a root that knows nothing of microvm): busybox-static and a symlink per applet in /bin, nothing else.
pub fn busybox_image(dir: &Path) -> PathBuf {
    let busybox = Path::new("/bin/busybox");
    assert!(busybox.exists(), "no /bin/busybox: apt-get install busybox-static");
    let tree = dir.join("tree");
    let bin = tree.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::copy(busybox, bin.join("busybox")).unwrap();
    let list = Command::new(busybox).arg("--list").output().expect("busybox --list");
    for applet in String::from_utf8_lossy(&list.stdout).lines().filter(|a| *a != "busybox") {
        std::os::unix::fs::symlink("busybox", bin.join(applet)).unwrap();
    }
    let image = dir.join("plain.ext4");
    let ok = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(&tree)
        .arg(&image)
        .arg("32M")
        .status()
        .expect("run mkfs.ext4 (apt-get install e2fsprogs)");
    assert!(ok.success(), "mkfs.ext4 failed");
    for d in ["proc", "sys", "dev", "etc", "sbin", "init"] {
        assert!(!tree.join(d).exists(), "the image must know nothing of microvm: it has /{d}");
    }
    image
}
