//! Snapshot and restore with the real test guest: one boot is saved with `--snapshot-to`,
//! then restored again and again with different commands (each restore takes seconds, not a
//! boot). Damaged snapshots and a microvm killed while saving leave nothing a restore accepts.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use microvm_tests::{guest_with_own_rootfs, microvm_bin, run_microvm, scratch_dir, Run, SH_CHECK};

const BOOT_TIMEOUT: Duration = Duration::from_secs(600);
const RESTORE_TIMEOUT: Duration = Duration::from_secs(180);

fn restore(snap: &std::path::Path, command: &[&str]) -> Run {
    restore_with(snap, &[], command)
}

/// [`restore`] with more microvm options before the command.
fn restore_with(snap: &std::path::Path, options: &[&str], command: &[&str]) -> Run {
    let mut args = vec!["--restore", snap.to_str().unwrap()];
    args.extend(options);
    args.push("--");
    args.extend(command);
    run_microvm(&args, RESTORE_TIMEOUT)
}

/// Boot once, save at the init's READY; restore five times in a row with different
/// commands: each prints its own output and returns its own status, stdin reaches the
/// command, the guest continues from the saved moment each time (the same boot), and the
/// disk image is what the guest left at the snapshot.
#[test]
fn snapshot_once_restore_many_times() {
    let dir = scratch_dir("snapshot-many");
    let (kernel, root) = guest_with_own_rootfs(&dir);
    let snap = dir.join("booted");
    let disk = format!("{},snapshot", root.display());
    let boot = run_microvm(
        &["--kernel", kernel.to_str().unwrap(), "--disk", &disk, "--cmdline", "quiet", "--snapshot-to", snap.to_str().unwrap()],
        BOOT_TIMEOUT,
    );
    assert_eq!(boot.code(), 0, "{boot:?}");
    assert!(boot.stderr.contains("snapshot saved to"), "{boot:?}");
    assert!(snap.join("state").is_file() && snap.join("memory").is_file(), "{boot:?}");
    let image_before = std::fs::read(&root).unwrap();

    // The boot's identity, as the saved guest knows it: its boot time (`btime` in
    // /proc/stat, wall clock minus uptime), the same in every restore of one snapshot (both
    // jump together) and another for another boot. Read with shell builtins only: this
    // host's PVM sometimes crashes a new guest process as it starts, and in a restore it
    // can do so several times in a row (SH_CHECK), so the identity needs no new process.
    let boot_id = |r: &Run| r.stdout.lines().find_map(|l| l.strip_prefix("BOOT=")).filter(|b| !b.is_empty()).map(str::to_string);
    let mut ids = Vec::new();
    for (i, status) in [0, 3, 7, 42, 255].into_iter().enumerate() {
        let script = format!(
            "b=; while read -r k v; do [ \"$k\" = btime ] && b=$v; done < /proc/stat; echo BOOT=$b; echo run {i}; \
             test -e /left-by-a-restore && echo SAW_EARLIER_WRITE; echo {i} > /left-by-a-restore; sync; exit {status}"
        );
        // The guest's console, for a failure's message.
        let console = dir.join(format!("console-{i}.log"));
        let t = Instant::now();
        let r = restore_with(&snap, &["--console-log", console.to_str().unwrap()], &["sh", "-c", &script]);
        println!("restore {i}: {:.1} s", t.elapsed().as_secs_f64());
        let r = Run { stderr: format!("{}--- guest console ---\n{}", r.stderr, std::fs::read_to_string(&console).unwrap_or_default()), ..r };
        assert_eq!(r.code(), status, "restore {i}: {r:?}");
        assert!(r.stdout.contains(&format!("run {i}\n")), "restore {i}: {r:?}");
        assert!(!r.stdout.contains("SAW_EARLIER_WRITE"), "a restore saw a file written by an earlier one: {r:?}");
        ids.push(boot_id(&r).unwrap_or_else(|| panic!("no boot id: {r:?}")));
    }
    assert!(ids.iter().all(|id| *id == ids[0]), "restores are not the same boot: {ids:?}");
    assert_eq!(std::fs::read(&root).unwrap(), image_before, "a restore changed the base image");

    // stdin goes to the restored command, byte-exact.
    let payload: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let mut child = Command::new(microvm_bin())
        .args(["--restore", snap.to_str().unwrap(), "--", "sh", "-c", &format!("{SH_CHECK} again cat")])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let data = payload.clone();
    let feeder = std::thread::spawn(move || stdin.write_all(&data));
    let out = child.wait_with_output().unwrap();
    feeder.join().unwrap().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.stdout == payload, "stdin did not arrive byte-exact ({} of {} bytes)", out.stdout.len(), payload.len());

    // A restore takes the VM's shape from the snapshot: shape options are refused.
    let r = run_microvm(&["--restore", snap.to_str().unwrap(), "--cpus", "2", "--", "true"], RESTORE_TIMEOUT);
    assert_eq!(r.code(), 2, "{r:?}");

    // Damage: a flipped byte in the state, a truncated memory file, a missing directory.
    let bad = dir.join("damaged");
    std::fs::create_dir_all(&bad).unwrap();
    let mut state = std::fs::read(snap.join("state")).unwrap();
    let n = state.len();
    state[n / 2] ^= 0x20;
    std::fs::write(bad.join("state"), &state).unwrap();
    std::fs::copy(snap.join("memory"), bad.join("memory")).unwrap();
    for (what, target) in [("flipped state byte", bad.clone()), ("no such snapshot", dir.join("nothing-here"))] {
        let r = restore(&target, &["true"]);
        assert_eq!(r.code(), 2, "{what}: {r:?}");
        assert_eq!(r.stderr.trim().lines().count(), 1, "{what}: not one line: {r:?}");
    }
    std::fs::copy(snap.join("state"), bad.join("state")).unwrap();
    let memory = std::fs::OpenOptions::new().write(true).open(bad.join("memory")).unwrap();
    memory.set_len(memory.metadata().unwrap().len() / 2).unwrap();
    let r = restore(&bad, &["true"]);
    assert_eq!(r.code(), 2, "truncated memory: {r:?}");
    assert_eq!(r.stderr.trim().lines().count(), 1, "{r:?}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// microvm killed (SIGKILL) while it writes a snapshot: no DIR that a restore accepts is
/// left, and the next `--snapshot-to` of that DIR works.
#[test]
fn killed_while_saving_leaves_nothing_to_restore() {
    let dir = scratch_dir("snapshot-kill");
    let (kernel, root) = guest_with_own_rootfs(&dir);
    let snap = dir.join("s");
    let disk = format!("{},snapshot", root.display());
    let args = ["--kernel", kernel.to_str().unwrap(), "--disk", &disk, "--cmdline", "quiet", "--snapshot-to", snap.to_str().unwrap()];
    let mut child = Command::new(microvm_bin()).args(args).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    // The save writes DIR.tmp-<pid> first: kill as soon as it appears.
    let tmp = dir.join(format!("s.tmp-{}", child.id()));
    let deadline = Instant::now() + BOOT_TIMEOUT;
    while !tmp.exists() {
        assert!(Instant::now() < deadline, "the snapshot was never started");
        assert!(child.try_wait().unwrap().is_none(), "microvm ended before saving");
        std::thread::sleep(Duration::from_micros(200));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let r = restore(&snap, &["true"]);
    assert_eq!(r.code(), 2, "a half-written snapshot was accepted: {r:?}");
    assert!(!snap.exists() || !snap.join("state").exists(), "DIR appeared although the save was killed");
    std::fs::remove_dir_all(&dir).unwrap();
}
