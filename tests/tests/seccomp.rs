//! seccomp: a thread that makes a system call outside its filter ends microvm with a clear
//! report and exit status 159 (and its network is still torn down); `--no-seccomp` turns
//! the filters off. The forbidden call is made through microvm's test-only path
//! (`MICROVM_TEST_FORBIDDEN_SYSCALL`, honoured by debug builds only): the named thread calls
//! getppid(2) right after installing its filter.

use std::process::{Command, Stdio};

use microvm_tests::payload::{write_elf, Asm};
use microvm_tests::world::World;
use microvm_tests::{microvm_bin, scratch_dir};

const TRIGGER: &str = "MICROVM_TEST_FORBIDDEN_SYSCALL";
const SECCOMP_EXIT: i32 = 128 + libc::SIGSYS;

fn payload(name: &str, asm: Asm) -> String {
    let p = scratch_dir(name).join("k.elf");
    write_elf(&p, &asm.code);
    p.display().to_string()
}

struct Out {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl std::fmt::Debug for Out {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "exit {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}", self.code, self.stdout, self.stderr)
    }
}

/// Runs microvm with `args`; `trigger` names the thread that makes the forbidden call.
fn run(args: &[&str], trigger: Option<&str>) -> Out {
    let mut cmd = Command::new(microvm_bin());
    cmd.args(args).stdin(Stdio::null()).env_remove(TRIGGER);
    if let Some(t) = trigger {
        cmd.env(TRIGGER, t);
    }
    let out = cmd.output().expect("run microvm");
    Out {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn report(thread: &str) -> String {
    format!("microvm: seccomp: thread {thread} made a forbidden system call {} (getppid) at 0x", libc::SYS_getppid)
}

#[test]
fn vcpu_forbidden_syscall_is_reported_and_ends_the_vm() {
    let k = payload("sc-vcpu", Asm::default().print("guest ran\n").exit(42).halt());
    let r = run(&["--kernel", &k, "--cpus", "2"], Some("vcpu"));
    assert_eq!(r.code, Some(SECCOMP_EXIT), "{r:?}");
    assert!(r.stderr.contains(&report("vcpu-0")), "{r:?}");
    assert_eq!(r.stderr.matches("microvm: seccomp:").count(), 1, "one report: {r:?}");
    // vCPU 0 is the boot CPU: it died before its first KVM_RUN, so the guest never ran.
    assert!(!r.stdout.contains("guest ran"), "{r:?}");
}

#[test]
fn event_loop_forbidden_syscall_is_reported_and_ends_the_vm() {
    let k = payload("sc-main", Asm::default().halt());
    let r = run(&["--kernel", &k], Some("main"));
    assert_eq!(r.code, Some(SECCOMP_EXIT), "{r:?}");
    assert!(r.stderr.contains(&report("main")), "{r:?}");
}

#[test]
fn no_seccomp_lets_the_same_call_through() {
    let k = payload("sc-off", Asm::default().print("guest ran\n").exit(42).halt());
    for trigger in ["vcpu", "main"] {
        let r = run(&["--kernel", &k, "--no-seccomp"], Some(trigger));
        assert_eq!(r.code, Some(42), "{trigger}: {r:?}");
        assert!(r.stdout.contains("guest ran") && !r.stderr.contains("seccomp"), "{trigger}: {r:?}");
    }
    // And the filters are on by default: the same payload, no forbidden call, runs.
    let r = run(&["--kernel", &k, "--cpus", "2"], None);
    assert_eq!(r.code, Some(42), "{r:?}");
}

/// The network of a VM killed by its filter is still torn down (by the teardown thread).
#[test]
fn seccomp_violation_tears_the_network_down() {
    let world = World::new();
    let k = payload("sc-net", Asm::default().halt());
    let out = Command::new("ip")
        .args(["netns", "exec", &world.host.name])
        .arg(microvm_bin())
        .args(["--kernel", &k, "--net", "nat:sc", "--net", "host-only:sc2"])
        .env("MICROVM_RUN_DIR", &world.run_dir.path)
        .env(TRIGGER, "vcpu")
        .stdin(Stdio::null())
        .output()
        .expect("run microvm");
    let r = Out {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    assert_eq!(r.code, Some(SECCOMP_EXIT), "{r:?}");
    assert!(r.stderr.contains("TAP mvtap-") && r.stderr.contains(&report("vcpu-0")), "{r:?}");
    assert_eq!(world.leftovers(), Vec::<String>::new(), "{r:?}");
}
