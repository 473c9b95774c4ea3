//! Helpers for namespaced integration tests.
//!
//! Safety model: every link, address, route, nft rule and packet these tests create lives in
//! network namespaces the test itself creates (`mvtest-<pid>x<random>-<tag>`) and deletes on
//! drop, even when the test fails; a test process killed before its drops ran (nextest's
//! timeout) has its namespaces deleted by the next test process that makes one. Code under test runs in a child process started with
//! `ip netns exec NS <this test binary> --exact <inner test>`; inner tests refuse to run
//! unless `MVTEST_INNER=1` is set AND they are outside the initial network namespace.

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub const INNER_ENV: &str = "MVTEST_INNER";

fn unique() -> String {
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
    format!("{}x{:x}", std::process::id(), nanos % 0xfffff)
}

/// Once per process: deletes the `mvtest-<pid>x...` namespaces whose test process is gone
/// (killed at a timeout, so its `Drop`s never ran), killing what still runs in them (a
/// microvm). Only this helper's own names are touched: another live test's pid is alive.
fn sweep_dead_tests() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let Ok(dir) = std::fs::read_dir("/var/run/netns") else {
            return;
        };
        for entry in dir.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let pid = name.strip_prefix("mvtest-").and_then(|r| r.split('x').next()).and_then(|p| p.parse::<u32>().ok());
            match pid {
                Some(pid) if !std::path::Path::new(&format!("/proc/{pid}")).exists() => {
                    let _ = Command::new("sh")
                        .args(["-c", &format!("ip netns pids {name} | xargs -r kill -9; ip netns del {name}")])
                        .status();
                }
                _ => {}
            }
        }
    });
}

/// A network namespace deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(tag: &str) -> Netns {
        sweep_dead_tests();
        let name = format!("mvtest-{}-{tag}", unique());
        sh(&format!("ip netns add {name}"));
        let ns = Netns { name };
        ns.sh("ip link set lo up");
        ns
    }

    /// Runs `sh -c cmd` inside the namespace; panics on failure.
    pub fn sh(&self, cmd: &str) -> String {
        sh(&format!("ip netns exec {} sh -c '{}'", self.name, cmd.replace('\'', r"'\''")))
    }

    /// Like `sh` but returns success instead of panicking.
    pub fn try_sh(&self, cmd: &str) -> bool {
        Command::new("ip")
            .args(["netns", "exec", &self.name, "sh", "-c", cmd])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    }

    /// Runs the inner test `test` of this binary inside the namespace, with `envs`.
    pub fn run_inner(&self, test: &str, envs: &[(&str, &str)]) {
        self.run_inner_via(&[], test, envs)
    }

    /// Like `run_inner`, with the test binary started through `wrapper` (e.g. setpriv ...).
    pub fn run_inner_via(&self, wrapper: &[&str], test: &str, envs: &[(&str, &str)]) {
        let exe = std::env::current_exe().expect("current exe");
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name])
            .args(wrapper)
            .arg(&exe)
            .args(["--exact", test, "--include-ignored", "--nocapture", "--test-threads=1"])
            .env(INNER_ENV, "1");
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let out = wait_timeout(cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn"), 120);
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        println!("--- inner {test} stdout ---\n{stdout}\n--- stderr ---\n{stderr}");
        assert!(out.status.success(), "inner test {test} failed");
        assert!(stdout.contains("1 passed"), "inner test {test} did not run");
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

/// A temporary directory removed on drop (used as MICROVM_RUN_DIR).
pub struct TempDir {
    pub path: PathBuf,
}

impl TempDir {
    pub fn new() -> TempDir {
        let path = std::env::temp_dir().join(format!("mvtest-{}", unique()));
        std::fs::create_dir_all(&path).expect("mkdir");
        TempDir { path }
    }

    pub fn str(&self) -> &str {
        self.path.to_str().expect("utf8 path")
    }
}

impl Default for TempDir {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Runs `sh -c cmd` in the current namespace; panics with its output on failure.
pub fn sh(cmd: &str) -> String {
    let out = Command::new("sh").args(["-c", cmd]).output().expect("run sh");
    assert!(
        out.status.success(),
        "`{cmd}` failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `sh -c cmd` success, output ignored.
pub fn try_sh(cmd: &str) -> bool {
    Command::new("sh")
        .args(["-c", cmd])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// Waits up to `secs` for the child, killing it on timeout.
pub fn wait_timeout(mut child: Child, secs: u64) -> Output {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            _ => {
                let _ = child.kill();
                break;
            }
        }
    }
    child.wait_with_output().expect("wait")
}

/// For outer tests: checks the test can create its namespaces. Not being root, or a
/// missing tool, is a failure, never a skip.
pub fn outer() {
    let euid = std::fs::metadata("/proc/self").map(|m| m.uid()).unwrap_or(u32::MAX);
    assert_eq!(euid, 0, "namespaced tests need root (network namespaces, TAPs, nftables)");
    for (tool, args) in [("ip", "-V"), ("nft", "--version"), ("busybox", "--help"), ("setpriv", "--version")] {
        let ok = Command::new(tool).arg(args).stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok();
        assert!(ok, "namespaced tests need `{tool}` (packages: iproute2, nftables, busybox-static, util-linux)");
    }
}

fn ns_inode(path: &str) -> u64 {
    std::fs::metadata(path).map(|m| m.ino()).unwrap_or(0)
}

/// For inner tests (marked `#[ignore]`, run only by `run_inner`): panics unless started by
/// `run_inner`, and if asked to run in the initial network namespace.
pub fn inner() {
    assert_eq!(
        std::env::var(INNER_ENV).as_deref(),
        Ok("1"),
        "inner tests run only inside a test namespace, started by their outer test"
    );
    let own = ns_inode("/proc/self/ns/net");
    let init = ns_inode("/proc/1/ns/net");
    assert!(own != 0 && own != init, "refusing to run a namespaced test in the initial network namespace");
}

/// Whether interface `name` exists in the current namespace.
pub fn link_exists(name: &str) -> bool {
    try_sh(&format!("ip link show dev {name}"))
}

/// Polls `f` for up to `secs`.
pub fn wait_until(secs: u64, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    f()
}

/// `error: e: source: source...` as the CLI prints it.
pub fn cli_message(e: &dyn std::error::Error) -> String {
    let mut msg = format!("error: {e}");
    let mut src = e.source();
    while let Some(s) = src {
        msg += &format!(": {s}");
        src = s.source();
    }
    msg
}

/// The "internet" side of a test world: gives `host` a default route through a veth to
/// `inet` (198.51.100.2 -> 198.51.100.1, a documentation range).
pub const HOST_UPLINK_ADDR: &str = "198.51.100.2";
pub const INTERNET_ADDR: &str = "198.51.100.1";

pub fn wire_internet(host: &Netns, inet: &Netns) {
    host.sh(&format!("ip link add up0 type veth peer name down0 netns {}", inet.name));
    host.sh(&format!(
        "ip addr add {HOST_UPLINK_ADDR}/24 dev up0 && ip link set up0 up && ip route add default via {INTERNET_ADDR}"
    ));
    inet.sh(&format!("ip addr add {INTERNET_ADDR}/24 dev down0 && ip link set down0 up"));
}

impl Netns {
    /// Runs `f` on a new thread that has entered this namespace (setns affects only the
    /// calling thread), e.g. to listen on a socket inside it from the test process.
    pub fn spawn_in<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> std::thread::JoinHandle<T> {
        spawn_in_named(&self.name, f)
    }
}

/// [`Netns::spawn_in`] for a namespace known by name only (e.g. in an inner test).
pub fn spawn_in_named<T: Send + 'static>(name: &str, f: impl FnOnce() -> T + Send + 'static) -> std::thread::JoinHandle<T> {
    let path = format!("/var/run/netns/{name}");
    std::thread::spawn(move || {
        let ns = std::fs::File::open(&path).expect("open netns");
        // SAFETY: setns on a valid namespace fd; it switches only this thread.
        let rc = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&ns), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
        f()
    })
}
