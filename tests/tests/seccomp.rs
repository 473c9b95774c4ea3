//! seccomp: a thread that makes a system call outside its filter ends microvm with a clear
//! report and exit status 159, and its network is still torn down; a panic in a filtered
//! thread is still reported and torn down; `--no-seccomp` turns the filters off. Faults are
//! injected through microvm's test-only path (`MICROVM_TEST_FAULT=THREAD:syscall|panic`,
//! honoured by debug builds only; THREAD is vcpu, main or channel): right after installing
//! its filter, the thread calls getppid(2), which no filter allows, or panics.

use std::process::{Command, Stdio};

use microvm_tests::payload::{write_elf, Asm};
use microvm_tests::world::World;
use microvm_tests::{microvm_bin, scratch_dir};

const FAULT: &str = "MICROVM_TEST_FAULT";
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

fn output(mut cmd: Command, fault: Option<&str>) -> Out {
    cmd.stdin(Stdio::null()).env_remove(FAULT);
    if let Some(f) = fault {
        cmd.env(FAULT, f);
    }
    let out = cmd.output().expect("run microvm");
    Out {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Runs microvm with `args` and the injected `fault`.
fn run(args: &[&str], fault: Option<&str>) -> Out {
    let mut cmd = Command::new(microvm_bin());
    cmd.args(args);
    output(cmd, fault)
}

/// Runs microvm with `args` in the world's host namespace.
fn run_in(world: &World, args: &[&str], fault: Option<&str>) -> Out {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &world.host.name]).arg(microvm_bin()).args(args);
    cmd.env("MICROVM_RUN_DIR", &world.run_dir.path);
    output(cmd, fault)
}

fn report(thread: &str) -> String {
    format!("microvm: seccomp: thread {thread} made a forbidden system call {} (getppid) at 0x", libc::SYS_getppid)
}

#[test]
fn vcpu_forbidden_syscall_is_reported_and_ends_the_vm() {
    let k = payload("sc-vcpu", Asm::default().print("guest ran\n").exit(42).halt());
    let r = run(&["--kernel", &k, "--cpus", "2"], Some("vcpu:syscall"));
    assert_eq!(r.code, Some(SECCOMP_EXIT), "{r:?}");
    assert!(r.stderr.contains(&report("vcpu-0")), "{r:?}");
    assert_eq!(r.stderr.matches("microvm: seccomp:").count(), 1, "one report: {r:?}");
    // vCPU 0 is the boot CPU: it died before its first KVM_RUN, so the guest never ran.
    assert!(!r.stdout.contains("guest ran"), "{r:?}");
}

#[test]
fn event_loop_forbidden_syscall_is_reported_and_ends_the_vm() {
    let k = payload("sc-main", Asm::default().halt());
    let r = run(&["--kernel", &k], Some("main:syscall"));
    assert_eq!(r.code, Some(SECCOMP_EXIT), "{r:?}");
    assert!(r.stderr.contains(&report("main")), "{r:?}");
}

/// The command channel's pumps run under their own filter. `-- true` without a disk is the
/// host root (virtiofsd) with the channel; the fault comes before any vCPU runs.
#[test]
fn channel_pump_forbidden_syscall_is_reported_and_ends_the_vm() {
    let k = payload("sc-chan", Asm::default().halt());
    let r = run(&["--kernel", &k, "--", "true"], Some("channel:syscall"));
    assert_eq!(r.code, Some(SECCOMP_EXIT), "{r:?}");
    assert!(r.stderr.contains(&report("microvm.stdout")), "{r:?}");
    assert_eq!(r.stderr.matches("microvm: seccomp:").count(), 1, "one report: {r:?}");
}

#[test]
fn no_seccomp_lets_the_same_call_through() {
    let k = payload("sc-off", Asm::default().print("guest ran\n").exit(42).halt());
    for fault in ["vcpu:syscall", "main:syscall"] {
        let r = run(&["--kernel", &k, "--no-seccomp"], Some(fault));
        assert_eq!(r.code, Some(42), "{fault}: {r:?}");
        assert!(r.stdout.contains("guest ran") && !r.stderr.contains("seccomp"), "{fault}: {r:?}");
    }
    // The filters are on by default, and a VM without faults runs under them.
    let r = run(&["--kernel", &k, "--cpus", "2"], None);
    assert_eq!(r.code, Some(42), "{r:?}");
    assert!(r.stdout.contains("guest ran"), "{r:?}");
}

/// The network of a VM ended by its filter is still torn down (by the teardown thread).
#[test]
fn seccomp_violation_tears_the_network_down() {
    let world = World::new();
    let k = payload("sc-net", Asm::default().halt());
    let r = run_in(&world, &["--kernel", &k, "--net", "nat:sc", "--net", "host-only:sc2"], Some("vcpu:syscall"));
    assert_eq!(r.code, Some(SECCOMP_EXIT), "{r:?}");
    assert_eq!(r.stderr.matches("TAP mvtap-").count(), 2, "both NICs were up: {r:?}");
    assert!(r.stderr.contains(&report("vcpu-0")), "{r:?}");
    assert_eq!(world.leftovers(), Vec::<String>::new(), "{r:?}");
}

/// A panic in a filtered thread: reported (without a backtrace, which would need files),
/// exit 1, and the network torn down.
#[test]
fn panic_in_a_filtered_thread_tears_the_network_down() {
    let world = World::new();
    let k = payload("sc-panic", Asm::default().halt());
    for thread in ["vcpu", "main"] {
        let fault = format!("{thread}:panic");
        let r = run_in(&world, &["--kernel", &k, "--net", "nat:scp"], Some(&fault));
        assert_eq!(r.code, Some(1), "{fault}: {r:?}");
        assert!(r.stderr.contains("panicked at") && r.stderr.contains(&fault), "{fault}: {r:?}");
        assert!(r.stderr.contains("no backtrace under seccomp") && !r.stderr.contains("seccomp: thread"), "{fault}: {r:?}");
        assert_eq!(world.leftovers(), Vec::<String>::new(), "{fault}: {r:?}");
    }
}

/// The DHCP thread works under its filter: a DHCP client on a veth in the VM's bridge
/// (standing in for the guest, whose MAC it takes) gets a lease (socket I/O, lease file
/// open/flock/rewrite/sync), and microvm then stops on SIGTERM, not on a violation.
#[test]
fn dhcp_thread_serves_under_its_filter() {
    let world = World::new();
    let k = payload("sc-dhcp", Asm::default().halt());
    let mac = "52:54:00:5c:0d:01";
    let dir = scratch_dir("sc-dhcp-run");
    let mut child = Command::new("ip")
        .args(["netns", "exec", &world.host.name])
        .arg(microvm_bin())
        .args(["--kernel", &k, "--net", &format!("host-only:scd,mac={mac}")])
        .env("MICROVM_RUN_DIR", &world.run_dir.path)
        .env_remove(FAULT)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("stderr")).unwrap())
        .spawn()
        .expect("spawn microvm");
    let up = microvm_tests::netns::wait_until(30, || world.host.try_sh("ip link show dev mvbr-scd"));
    assert!(up, "network never came up");
    world.host.sh(&format!(
        "ip link add scd-a type veth peer name scd-b && ip link set scd-a master mvbr-scd up && \
         ip link set scd-b address {mac} up"
    ));
    let dhcp = world.host.sh("busybox udhcpc -i scd-b -n -q -t 5 -T 2 -s /bin/true 2>&1");
    // SAFETY: kill(2) on our child (`ip netns exec` execs microvm itself).
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().expect("wait for microvm");
    let stderr = std::fs::read_to_string(dir.join("stderr")).unwrap();
    assert!(dhcp.contains("obtained"), "no lease: {dhcp}\n{stderr}");
    assert_eq!(status.code(), Some(128 + libc::SIGTERM), "{stderr}");
    assert!(!stderr.contains("seccomp"), "{stderr}");
    world.host.sh("ip link del scd-a");
    assert_eq!(world.leftovers(), Vec::<String>::new(), "{stderr}");
}
