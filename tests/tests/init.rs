//! microvm's own guest init (resources/init) on a root image that knows nothing of microvm:
//! an ext4 image holding only busybox and its applet links (no init script, no /proc, /sys,
//! /dev, /etc). Each boot checks several things; boots are expensive here. The command's
//! output is on stdout (the command channel); the console (kernel log, the init's own lines)
//! on stderr.

use std::process::Command;
use std::time::Duration;

use microvm_tests::netns::INTERNET_ADDR;
use microvm_tests::world::World;
use microvm_tests::{busybox_image, guest, run_microvm, scratch_dir};

const BOOT_TIMEOUT: Duration = Duration::from_secs(600);

/// The status, argv and environment of a command, and what the init set up around it.
#[test]
fn command_on_a_plain_busybox_root() {
    let dir = scratch_dir("init-plain");
    let image = busybox_image(&dir);
    let (kernel, _) = guest();
    // `again`: see SH_CHECK (this host's PVM sometimes crashes a process as it starts).
    let script = format!(
        "{} echo hello; printf '<%s>' \"$@\"; echo; \
         echo PID1=$(again cat /proc/1/comm) HOST=$(again hostname) CWD=$(pwd) HOME=$HOME PATH=$PATH; \
         again grep -E ' /(run|tmp|proc|sys|dev|dev/pts) ' /proc/mounts | again cut -d' ' -f2,3 | again sed 's/^/MOUNT /'; \
         echo kept > /kept; (sleep 1 &); exit 3",
        microvm_tests::SH_CHECK
    );
    let words = ["a b", "c'd", "", "\u{fc}n\u{ef} \"q\" $HOME \\n"];
    let mut args = vec![
        "--kernel", kernel.to_str().unwrap(),
        "--disk", image.to_str().unwrap(),
        "-v", "--cmdline", "quiet",
        "--", "sh", "-c", &script, "argv0",
    ];
    args.extend(words);
    let run = run_microvm(&args, BOOT_TIMEOUT);
    assert!(run.stderr.contains("MICROVM-INIT-READY"), "init never got ready: {run:?}");
    assert_eq!(run.code(), 3, "exit status not propagated: {run:?}");
    assert!(run.stdout.contains("hello"), "{run:?}");
    let expected: String = words.iter().map(|w| format!("<{w}>")).collect();
    assert!(run.stdout.lines().any(|l| l.trim_end() == expected), "argv did not arrive exactly; want {expected}: {run:?}");
    assert!(run.stdout.contains("PID1=init HOST=microvm CWD=/ HOME=/root PATH=/usr/local/sbin:"), "{run:?}");
    for m in ["/proc proc", "/sys sysfs", "/dev devtmpfs", "/dev/pts devpts", "/run tmpfs", "/tmp tmpfs"] {
        assert!(run.stdout.contains(&format!("MOUNT {m}")), "{m} not mounted: {run:?}");
    }
    assert!(!run.stdout.contains("microvm-init:") && !run.stderr.contains("microvm-init:"), "the init complained: {run:?}");
    // The command's write reached the disk before the VM ended: the image is an ordinary
    // ext4 with a /kept (busybox's debugfs is not there, so use e2fsprogs' debugfs).
    let cat = Command::new("debugfs").args(["-R", "cat /kept"]).arg(&image).output().expect("debugfs");
    assert_eq!(String::from_utf8_lossy(&cat.stdout), "kept\n", "{}", String::from_utf8_lossy(&cat.stderr));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A command that does not exist: status 127 and one line from the init saying so.
#[test]
fn command_not_found_is_127() {
    let dir = scratch_dir("init-notfound");
    let image = busybox_image(&dir);
    let (kernel, _) = guest();
    let run = run_microvm(
        &[
            "--kernel", kernel.to_str().unwrap(),
            "--disk", &format!("{},readonly", image.display()),
            "-v", "--cmdline", "quiet",
            "--", "no-such-command", "x",
        ],
        BOOT_TIMEOUT,
    );
    // The read-only image has no /proc to mount on: the init must say so and fail with 125
    // rather than run anything. (A root with mountpoints is the next boot's case.)
    assert_eq!(run.code(), 125, "{run:?}");
    let lines: Vec<&str> = run.stderr.lines().filter(|l| l.contains("microvm-init:")).collect();
    assert_eq!(lines.len(), 1, "want one init line: {run:?}");
    assert!(lines[0].contains("read-only root has no /proc"), "{run:?}");
    assert!(!run.stderr.contains("MICROVM-INIT-READY"), "{run:?}");

    let run = run_microvm(
        &["--kernel", kernel.to_str().unwrap(), "--disk", image.to_str().unwrap(), "-v", "--cmdline", "quiet", "--", "no-such-command", "x"],
        BOOT_TIMEOUT,
    );
    assert!(run.stderr.contains("MICROVM-INIT-READY"), "{run:?}");
    assert_eq!(run.code(), 127, "{run:?}");
    // Said by the command's process, on its stderr: the command channel's.
    assert!(run.stderr.contains("microvm-init: cannot run 'no-such-command'"), "{run:?}");
    assert_eq!(run.stdout, "", "{run:?}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `--net nat`: the init's DHCP client configures address, default route and resolv.conf
/// (the guest reaches the test's "internet"); a command killed by signal N reports 128+N.
#[test]
fn dhcp_and_signal_status() {
    let world = World::new();
    let dir = scratch_dir("init-net");
    let image = busybox_image(&dir);
    let (kernel, _) = guest();
    let script = format!(
        "{check} again ip -4 -o addr show eth0 | again sed 's/^/ADDR /'; again ip route | again sed 's/^/ROUTE /'; \
         again sed 's/^/RESOLV /' /etc/resolv.conf; \
         again timeout 10 wget -q -O - http://{INTERNET_ADDR}/hello.txt; kill -TERM $$",
        check = microvm_tests::SH_CHECK
    );
    let args: Vec<String> = [
        "--kernel", kernel.to_str().unwrap(),
        "--disk", image.to_str().unwrap(),
        "--net", "nat:i1,subnet=10.123.7.0/24",
        "-v", "--cmdline", "quiet",
        "--", "sh", "-c", &script,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let run = world.spawn("init-net", &args, dir.clone()).wait(BOOT_TIMEOUT);
    assert_eq!(run.code(), 128 + libc::SIGTERM, "{run:?}");
    assert!(
        run.stdout.lines().any(|l| l.starts_with("ADDR ") && l.contains("inet 10.123.7.") && l.contains("/24")),
        "no DHCP address: {run:?}"
    );
    assert!(run.stdout.contains("ROUTE default via 10.123.7.1 dev eth0"), "no default route: {run:?}");
    assert!(run.stdout.contains("hello-internet"), "no route to the internet: {run:?}");
    // microvm offers the host's (non-loopback) name servers on NAT networks.
    let host_ns: Vec<String> = std::fs::read_to_string("/etc/resolv.conf")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.strip_prefix("nameserver "))
        .map(|s| s.trim().to_string())
        .filter(|s| s.parse::<std::net::Ipv4Addr>().is_ok_and(|ip| !ip.is_loopback()))
        .collect();
    match host_ns.first() {
        Some(ns) => assert!(run.stdout.contains(&format!("RESOLV nameserver {ns}")), "{run:?}"),
        None => assert!(!run.stdout.contains("RESOLV nameserver"), "{run:?}"),
    }
    assert_eq!(world.leftovers(), Vec::<String>::new());
}
