//! The real test guest (tools/build-guest) powering off, and `--timeout` on a real
//! kernel. Each test restores the shared booted snapshot of the test guest (see
//! `microvm_tests::booted_snapshot`: one boot for all of them) and runs its command there;
//! never skipped.

use std::io::{BufRead, BufReader, Read};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use microvm_tests::{booted_snapshot, microvm_bin, scratch_dir};

const BOOT_TIMEOUT: Duration = Duration::from_secs(420);
/// From the command's start (MICROVM-INIT-READY) to microvm's exit: a `poweroff -f`
/// is one exec plus the kernel's shutdown path, emulated; seconds, with slack for a
/// loaded host. A guest that only halts never gets there.
const POWEROFF_WITHIN: Duration = Duration::from_secs(30);

struct Boot {
    status: Option<i32>,
    stdout: String,
    stderr: String,
    /// When MICROVM-INIT-READY appeared on stderr (the console, with `-v`).
    ready_at: Option<Instant>,
    exited_at: Instant,
}

impl std::fmt::Debug for Boot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let since_ready = self.ready_at.map(|r| self.exited_at - r);
        write!(
            f,
            "exit {:?}, {since_ready:?} after init was ready\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.status, self.stdout, self.stderr
        )
    }
}

/// Runs microvm with `-v` unless the test gives `--console-log` (the console, with the
/// init's READY line, on stderr; the command's output on stdout), timestamping READY when
/// it shows; kills it after `limit`.
fn boot(args: &[&str], limit: Duration) -> Boot {
    // A test that sends the console to a file (--console-log) keeps it off stderr.
    let verbose: &[&str] = if args.contains(&"--console-log") { &[] } else { &["-v"] };
    let mut child = Command::new(microvm_bin())
        .args(verbose)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn microvm");
    let ready_at = Arc::new(Mutex::new(None));
    let out = child.stderr.take().unwrap();
    let r = ready_at.clone();
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if line.contains("MICROVM-INIT-READY") {
                r.lock().unwrap().get_or_insert(Instant::now());
            }
            text.push_str(&line);
            text.push('\n');
        }
        text
    });
    let mut err = child.stdout.take().unwrap();
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s.code();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let exited_at = Instant::now();
    let stderr = reader.join().unwrap();
    let stdout = err_reader.join().unwrap();
    let ready_at = *ready_at.lock().unwrap();
    Boot { status, stdout, stderr, ready_at, exited_at }
}

fn assert_prompt_power_off(b: &Boot) {
    let ready = b.ready_at.unwrap_or_else(|| panic!("guest never reached init: {b:?}"));
    assert_eq!(b.status, Some(0), "{b:?}");
    assert!(b.exited_at - ready < POWEROFF_WITHIN, "power-off took too long: {b:?}");
    assert!(!b.stderr.contains("Power off not available"), "{b:?}");
}

/// `poweroff -f` reaches ACPI S5 (the guest kernel has CONFIG_ACPI, microvm gives it
/// tables and the PM1 registers): microvm exits 0 at once, instead of the guest halting.
#[test]
fn guest_poweroff_f_exits_zero() {
    let snap = booted_snapshot();
    let b = boot(&["--restore", snap.to_str().unwrap(), "--", "poweroff", "-f"], BOOT_TIMEOUT);
    assert_prompt_power_off(&b);
}

/// busybox `poweroff` without -f, from a shell, signals PID 1 (the guest init), which
/// powers off: the rest of the script never runs.
#[test]
fn guest_shell_poweroff_exits_zero() {
    let snap = booted_snapshot();
    let b = boot(
        &[
            "--restore", snap.to_str().unwrap(),
            "--", "sh", "-c", "echo powering-off; poweroff; sleep 100; echo not-reached; exit 3",
        ],
        BOOT_TIMEOUT,
    );
    assert_prompt_power_off(&b);
    assert!(b.stdout.contains("powering-off"), "{b:?}");
    assert!(!b.stdout.contains("not-reached"), "{b:?}");
}

/// `--timeout` on a real kernel whose vCPUs sit halted in its idle loop most of the time
/// (the kick must get them out of an in-kernel HLT): exit 124 shortly after the deadline,
/// with the register dump and the console's last lines on stderr.
#[test]
fn guest_timeout_exits_124_with_a_dump() {
    let dir = scratch_dir("guest-timeout");
    let snap = booted_snapshot();
    let log = dir.join("console.log");
    let start = Instant::now();
    let b = boot(
        &[
            "--restore", snap.to_str().unwrap(),
            "--console-log", log.to_str().unwrap(),
            "--timeout", "20s",
            "--", "sleep", "1000",
        ],
        BOOT_TIMEOUT,
    );
    let elapsed = start.elapsed();
    assert_eq!(b.status, Some(124), "{b:?}");
    assert!(elapsed >= Duration::from_secs(20) && elapsed < Duration::from_secs(25), "{elapsed:?} {b:?}");
    for needle in ["--timeout 20s expired", "vcpu-0: RIP=", "lines of the guest console:", "  | "] {
        assert!(b.stderr.contains(needle), "no '{needle}': {b:?}");
    }
    // The console went to the log file alone.
    assert_eq!(b.stdout, "", "{b:?}");
    // The restored run's console: the init's line as the command started.
    assert!(std::fs::read_to_string(&log).unwrap().contains("MICROVM-INIT-READY"), "{b:?}");
    std::fs::remove_dir_all(&dir).unwrap();
}
