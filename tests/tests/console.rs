//! Where the guest console goes (stdout, `-v` stderr, `--console-log FILE`), the post-mortem
//! of its last lines after a bad ending, and `--timeout`. Payload VMs (no Linux): each run
//! takes milliseconds, except the timeouts they wait for.

use std::time::Duration;

use microvm_tests::payload::{write_elf, Asm, LOAD_ADDR};
use microvm_tests::{run_microvm, scratch_dir};

const T: Duration = Duration::from_secs(60);

fn payload(dir: &std::path::Path, asm: Asm) -> String {
    let p = dir.join("payload.elf");
    write_elf(&p, &asm.code);
    p.to_str().unwrap().to_string()
}

/// Without a command the console is the terminal (stdout); --console-log adds a copy.
#[test]
fn interactive_console_on_stdout_and_in_the_log() {
    let dir = scratch_dir("console-interactive");
    let k = payload(&dir, Asm::default().print("boot line\n").exit(0).halt());
    let log = dir.join("console.log");
    let r = run_microvm(&["--kernel", &k, "--console-log", log.to_str().unwrap()], T);
    assert_eq!(r.code(), 0, "{r:?}");
    assert_eq!(r.stdout, "boot line\n", "{r:?}");
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "boot line\n");
    // -v does not duplicate an interactive console on stderr.
    let r = run_microvm(&["--kernel", &k, "-v"], T);
    assert_eq!(r.stdout, "boot line\n", "{r:?}");
    assert!(!r.stderr.contains("boot line"), "{r:?}");
}

/// With a command: stdout by default (the command's output still shares ttyS0), stderr with
/// -v, the file alone with --console-log; stdout then carries nothing of the console.
#[test]
fn command_mode_console_placement() {
    let dir = scratch_dir("console-command");
    let k = payload(
        &dir,
        Asm::default().print("kernel says hi\n").exit(5).halt(),
    );
    // With a command, stdout is the command's (over the command channel): the console is
    // kept in memory only, and an ordinary end prints none of it.
    let r = run_microvm(&["--kernel", &k, "--", "true"], T);
    assert_eq!((r.code(), r.stdout.as_str()), (5, ""), "{r:?}");
    assert!(!r.stderr.contains("kernel says hi"), "{r:?}");

    let r = run_microvm(&["--kernel", &k, "--verbose", "--", "true"], T);
    assert_eq!(r.code(), 5, "{r:?}");
    assert_eq!(r.stdout, "", "{r:?}");
    assert!(r.stderr.contains("kernel says hi\n"), "{r:?}");

    let log = dir.join("c.log");
    let r = run_microvm(
        &[
            "--kernel",
            &k,
            "--console-log",
            log.to_str().unwrap(),
            "--",
            "true",
        ],
        T,
    );
    assert_eq!(r.code(), 5, "{r:?}");
    assert_eq!(r.stdout, "", "{r:?}");
    assert!(
        !r.stderr.contains("kernel says hi"),
        "an ordinary exit has no post-mortem: {r:?}"
    );
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "kernel says hi\n");
}

/// `--console-log /dev/stdout` with stdout redirected to a file (how the network tests
/// join the console and the command's output) writes through microvm's own stdout: the
/// file is not truncated and nothing already in it is written over.
#[test]
fn console_log_to_own_stdout_appends_to_it() {
    use std::io::Write;
    let dir = scratch_dir("console-own-stdout");
    let k = payload(&dir, Asm::default().print("kernel line\n").exit(0).halt());
    let out = dir.join("stdout");
    let mut f = std::fs::File::create(&out).unwrap();
    f.write_all(b"written before microvm started\n").unwrap();
    let status = std::process::Command::new(microvm_tests::microvm_bin())
        .args(["--kernel", &k, "--console-log", "/dev/stdout", "--", "true"])
        .stdin(std::process::Stdio::null())
        .stdout(f)
        .status()
        .unwrap();
    assert_eq!(status.code(), Some(0));
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "written before microvm started\nkernel line\n");
}

/// A guest command failing with any status (even 1, 101 or 124) is the command's business,
/// not a bad end of the VM: no post-mortem.
#[test]
fn command_failure_has_no_post_mortem() {
    let dir = scratch_dir("console-cmd-fail");
    let log = dir.join("c.log");
    for status in [1, 101, 124] {
        let k = payload(&dir, Asm::default().print("guest output\n").exit(status).halt());
        let r = run_microvm(&["--kernel", &k, "--console-log", log.to_str().unwrap(), "--", "false"], T);
        assert_eq!(r.code(), status as i32, "{r:?}");
        assert!(!r.stderr.contains("guest console"), "{r:?}");
    }
}

/// A panic with the console out of sight (in a file): the last 60 console lines are
/// repeated on stderr, sanitized and framed, so a CI log shows why.
#[test]
fn panic_post_mortem_shows_the_last_console_lines() {
    let dir = scratch_dir("console-panic");
    let mut text = String::new();
    for i in 1..=100 {
        text.push_str(&format!("line {i:03}\n"));
    }
    text.push_str("\x1b[31mKernel panic - not syncing: test\n");
    // mov al, 0xfe; out 0x64, al: the reset a panicking Linux (panic=-1) does.
    let k = payload(
        &dir,
        Asm::default()
            .print(&text)
            .bytes(&[0xb0, 0xfe, 0xe6, 0x64])
            .halt(),
    );
    let log = dir.join("c.log");
    let r = run_microvm(
        &[
            "--kernel",
            &k,
            "--console-log",
            log.to_str().unwrap(),
            "--",
            "true",
        ],
        T,
    );
    assert_eq!(r.code(), 101, "{r:?}");
    assert!(r.stderr.contains("guest kernel panicked"), "{r:?}");
    assert!(
        r.stderr.contains("last 60 lines of the guest console"),
        "{r:?}"
    );
    assert!(
        r.stderr
            .contains("  | \u{fffd}[31mKernel panic - not syncing: test\n"),
        "{r:?}"
    );
    assert!(
        r.stderr.contains("  | line 042\n") && r.stderr.contains("  | line 100\n"),
        "{r:?}"
    );
    assert!(!r.stderr.contains("line 041"), "more than 60 lines: {r:?}");
    assert!(
        !r.stderr.contains('\x1b'),
        "escape sequence reached stderr: {r:?}"
    );
    assert_eq!(r.stdout, "", "{r:?}");
    assert_eq!(std::fs::read_to_string(&log).unwrap(), text);

    // With the console already on stderr (-v) it is not repeated.
    let r = run_microvm(&["--kernel", &k, "-v", "--", "true"], T);
    assert_eq!(r.code(), 101, "{r:?}");
    assert_eq!(r.stderr.matches("line 100").count(), 1, "{r:?}");
}

/// --timeout on a guest that spins for ever: exit 124 soon after the deadline, with every
/// vCPU's registers (vCPU 0 at the spin loop) and the console's last lines on stderr.
#[test]
fn timeout_dumps_registers_and_exits_124() {
    let dir = scratch_dir("timeout");
    let asm = Asm::default().print("spinning now\n");
    let spin_at = LOAD_ADDR + asm.code.len() as u64;
    let k = payload(&dir, asm.spin());
    let log = dir.join("c.log");
    let r = run_microvm(
        &[
            "--kernel",
            &k,
            "--cpus",
            "2",
            "--timeout",
            "2s",
            "--console-log",
            log.to_str().unwrap(),
            "--",
            "true",
        ],
        T,
    );
    assert_eq!(r.code(), 124, "{r:?}");
    assert!(r.elapsed >= Duration::from_secs(2), "{r:?}");
    // A second or so after the deadline; more slack for a loaded 2-core CI host.
    assert!(
        r.elapsed < Duration::from_millis(4500),
        "too long after the deadline: {r:?}"
    );
    assert!(r.stderr.contains("--timeout 2s expired"), "{r:?}");
    assert!(
        r.stderr.contains(&format!("vcpu-0: RIP={spin_at:#018x}")),
        "{r:?}"
    );
    assert!(r.stderr.contains("vcpu-1: RIP="), "{r:?}");
    assert!(r.stderr.contains("  | spinning now"), "{r:?}");
    // The dump, then the console's tail, then the final line.
    let dump = r.stderr.find("vcpu-0: RIP").unwrap();
    let tail = r.stderr.find("  | spinning now").unwrap();
    assert!(dump < tail, "{r:?}");
    assert!(
        r.stderr
            .trim_end()
            .ends_with("microvm: stopped after --timeout 2s"),
        "{r:?}"
    );
}

/// A guest that exits before its timeout is not affected by it.
#[test]
fn timeout_not_reached() {
    let dir = scratch_dir("timeout-not-reached");
    let k = payload(&dir, Asm::default().exit(3).halt());
    let r = run_microvm(&["--kernel", &k, "--timeout", "1m"], T);
    assert_eq!(r.code(), 3, "{r:?}");
    assert!(!r.stderr.contains("timeout"), "{r:?}");
}

#[test]
fn bad_timeout_and_log_path_are_usage_errors() {
    let dir = scratch_dir("timeout-bad");
    let k = payload(&dir, Asm::default().exit(0).halt());
    for bad in ["0", "soon", "5x", "-1s"] {
        let r = run_microvm(&["--kernel", &k, &format!("--timeout={bad}")], T);
        assert_eq!(r.code(), 2, "{bad}: {r:?}");
        assert_eq!(r.stderr.trim().lines().count(), 1, "{r:?}");
        assert!(
            r.stderr.contains(&format!("bad --timeout '{bad}'")),
            "{r:?}"
        );
    }
    let r = run_microvm(
        &["--kernel", &k, "--console-log", "/nonexistent-dir/c.log"],
        T,
    );
    assert_eq!(r.code(), 2, "{r:?}");
    assert!(
        r.stderr
            .contains("cannot create --console-log file '/nonexistent-dir/c.log'"),
        "{r:?}"
    );
}
