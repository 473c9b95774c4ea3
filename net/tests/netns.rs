//! Namespaced integration tests: real bridges, TAPs, nft rules and DHCP traffic, all inside
//! network namespaces created (and deleted) by each test. See `microvm_tests::netns` for the safety model.
//!
//! Outer tests (`nat_end_to_end`, ...) build namespaces and run an `inner_*` test of this
//! binary inside them; `inner_*` tests are #[ignore]d: only their outer test runs them.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use microvm_tests::netns::{cli_message, inner, link_exists, sh, try_sh, wait_until, wire_internet, Netns, TempDir};

fn env(key: &str) -> String {
    std::env::var(key).unwrap_or_else(|_| panic!("{key} not set"))
}

fn nft_table_exists() -> bool {
    try_sh("nft list table ip microvm")
}

fn master_of(link: &str) -> String {
    let out = sh(&format!("ip -o link show dev {link}"));
    out.split_whitespace()
        .skip_while(|w| *w != "master")
        .nth(1)
        .unwrap_or("")
        .to_string()
}

/// A udhcpc script appending "EVENT ip=.. subnet=.. router=.. dns=.." lines to the
/// returned output file and configuring the address when bound: (script, output).
fn udhcpc_script(tmp: &str) -> (String, String) {
    let script = format!("{tmp}/udhcpc.sh");
    let out = format!("{tmp}/udhcpc.out");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\necho \"$1 ip=$ip subnet=$subnet router=$router dns=$dns\" >> {out}\n\
             if [ \"$1\" = bound ]; then ip addr add $ip/24 dev $interface; ip route add default via $router; fi\n"
        ),
    )
    .unwrap();
    sh(&format!("chmod +x {script}"));
    (script, out)
}

/// Runs busybox udhcpc on `iface` in namespace `ns` (one lease, then exit); true if it got one.
fn udhcpc(ns: &str, iface: &str, tries: &str, script: &str) -> bool {
    let child = Command::new("ip")
        .args(["netns", "exec", ns, "busybox", "udhcpc", "-i", iface, "-f", "-q", "-n", "-t", tries, "-T", "1", "-s", script])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let res = microvm_tests::netns::wait_timeout(child, 60);
    println!("udhcpc: {}{}", String::from_utf8_lossy(&res.stdout), String::from_utf8_lossy(&res.stderr));
    res.status.success()
}

fn state_dir_of(name: &str) -> std::path::PathBuf {
    use std::os::unix::fs::MetadataExt;
    let ino = std::fs::metadata("/proc/self/ns/net").unwrap().ino();
    Path::new(&env("MICROVM_RUN_DIR")).join(ino.to_string()).join("net").join(name)
}

// ---------------------------------------------------------------------------------------

#[test]
fn nat_end_to_end() {
    microvm_tests::netns::outer();
    let host = Netns::new("host");
    let inet = Netns::new("inet");
    let guest = Netns::new("guest");
    let guest2 = Netns::new("guest2");
    let run = TempDir::new();
    wire_internet(&host, &inet);
    host.run_inner(
        "inner_nat_end_to_end",
        &[
            ("MICROVM_RUN_DIR", run.str()),
            ("MVTEST_GUEST_NS", &guest.name),
            ("MVTEST_GUEST2_NS", &guest2.name),
            ("MVTEST_TMP", run.str()),
        ],
    );
}

#[test]
#[ignore = "started by its outer test inside a test namespace"]
fn inner_nat_end_to_end() {
    inner();
    let guest_ns = env("MVTEST_GUEST_NS");
    let tmp = env("MVTEST_TMP");
    net::cleanup_stale().unwrap();

    let spec: net::NetSpec = "nat:t1,rate=50Mbit".parse().unwrap();
    spec.preflight().unwrap();
    let att = net::attach(&spec, "vm-e2e", 0).unwrap();
    let tap = att.tap_name().to_string();
    let subnet = att.subnet().unwrap();
    assert_eq!(subnet.to_string(), "10.200.0.0/24", "first free auto subnet");
    assert_eq!((att.network(), att.bridge()), (Some("t1"), Some("mvbr-t1")));
    assert_eq!(att.gateway(), Some(std::net::Ipv4Addr::new(10, 200, 0, 1)));
    assert!(link_exists("mvbr-t1"));
    assert_eq!(master_of(&tap), "mvbr-t1");
    assert!(tap.starts_with("mvtap-") && tap.len() <= 15, "{tap}");
    let flags = std::fs::read_to_string(format!("/sys/class/net/{tap}/tun_flags")).unwrap();
    let flags = u32::from_str_radix(flags.trim().trim_start_matches("0x"), 16).unwrap();
    assert_eq!(flags & 0x5002, 0x5002, "IFF_TAP|IFF_NO_PI|IFF_VNET_HDR, got {flags:#x}");
    att.set_offload(net::TUN_F_CSUM | net::TUN_F_TSO4 | net::TUN_F_TSO6).unwrap();
    assert!(sh("ip -o -4 addr show dev mvbr-t1").contains("10.200.0.1/24"));
    let rules = sh("nft list table ip microvm");
    assert!(rules.contains("\"mvbr-t1\" . \"up0\" . 10.200.0.0/24") && rules.contains("\"mvbr-t1\" : jump nat_out"), "{rules}");
    assert_eq!(std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap().trim(), "1");
    assert!(net::dhcp_server_running("t1"));

    // Fake guest: a veth plugged into the bridge, the other end in the guest namespace
    // carrying the attachment's MAC, so our DHCP server answers it.
    let mac = net::MacAddr(att.mac()).to_string();
    sh(&format!("ip link add gv0 type veth peer name gv1 netns {guest_ns}"));
    sh("ip link set gv0 master mvbr-t1 && ip link set gv0 up");
    sh(&format!("ip -n {guest_ns} link set gv1 up"));
    let (script, out) = udhcpc_script(&tmp);
    let get_lease = |tries: &str| udhcpc(&guest_ns, "gv1", tries, &script);
    // A MAC no attachment owns gets no answer (several processes share one bridge).
    sh(&format!("ip -n {guest_ns} link set gv1 address 02:00:00:00:00:99"));
    assert!(!get_lease("2"), "DHCP answered a foreign MAC");
    sh(&format!("ip -n {guest_ns} link set gv1 address {mac}"));
    assert!(get_lease("5"), "udhcpc got no lease");
    let result = std::fs::read_to_string(&out).unwrap();
    let bound = result.lines().find(|l| l.starts_with("bound")).expect("bound line");
    let ip: std::net::Ipv4Addr = bound.split_whitespace().nth(1).unwrap().trim_start_matches("ip=").parse().unwrap();
    assert!(subnet.contains(ip) && ip.octets()[3] >= 2, "{bound}");
    assert!(bound.contains("subnet=255.255.255.0") && bound.contains("router=10.200.0.1"), "{bound}");
    let leases = std::fs::read_to_string(state_dir_of("t1").join("leases")).unwrap();
    assert!(leases.contains(&mac) && leases.contains(&ip.to_string()), "{leases}");

    // Traffic: guest -> gateway, and guest -> "internet" through the masquerade (the
    // internet namespace has no route back to 10.200.0.0/24, so a reply proves NAT).
    sh(&format!("ip netns exec {guest_ns} busybox ping -c 1 -W 2 10.200.0.1"));
    sh(&format!("ip netns exec {guest_ns} busybox ping -c 1 -W 2 198.51.100.1"));

    // Isolation: a host-only network next to it, with a statically configured guest.
    let guest2 = env("MVTEST_GUEST2_NS");
    let iso = net::attach(&"host-only:iso".parse().unwrap(), "vm-iso", 0).unwrap();
    assert_eq!(iso.subnet().unwrap().to_string(), "10.200.1.0/24");
    sh(&format!("ip link add gw0 type veth peer name gw1 netns {guest2}"));
    sh("ip link set gw0 master mvbr-iso && ip link set gw0 up");
    sh(&format!(
        "ip -n {guest2} link set gw1 up && ip -n {guest2} addr add 10.200.1.2/24 dev gw1 && \
         ip -n {guest2} route add default via 10.200.1.1"
    ));
    let ping = |ns: &str, ip: &str| try_sh(&format!("ip netns exec {ns} busybox ping -c 1 -W 1 {ip}"));
    assert!(ping(&guest2, "10.200.1.1"), "host-only guest must reach the host");
    assert!(!ping(&guest_ns, "10.200.1.2"), "networks must be isolated (nat -> host-only)");
    assert!(!ping(&guest2, "10.200.0.2"), "networks must be isolated (host-only -> nat)");
    assert!(!ping(&guest2, "198.51.100.1"), "host-only must not forward outside");
    assert!(ping(&guest_ns, "198.51.100.1"), "nat still works");
    drop(iso);
    assert!(!link_exists("mvbr-iso") && nft_table_exists());

    drop(att);
    assert!(!net::dhcp_server_running("t1"));
    assert!(!link_exists("mvbr-t1"), "bridge left behind");
    assert!(!link_exists(&tap), "TAP left behind");
    assert!(!nft_table_exists(), "nft table left behind");
    assert!(!state_dir_of("t1").exists(), "state left behind");
}

// ---------------------------------------------------------------------------------------

#[test]
fn shared_network_refcount() {
    microvm_tests::netns::outer();
    let host = Netns::new("share");
    let inet = Netns::new("sinet");
    let run = TempDir::new();
    wire_internet(&host, &inet);
    host.run_inner("inner_shared_network_refcount", &[("MICROVM_RUN_DIR", run.str()), ("MVTEST_TMP", run.str())]);
}

/// Holds an attachment of MVTEST_SPEC until MVTEST_TMP/release exists (started as a child
/// process by other inner tests, inside their namespace).
#[test]
#[ignore = "started by its outer test inside a test namespace"]
fn inner_hold() {
    inner();
    let tmp = env("MVTEST_TMP");
    let id = std::env::var("MVTEST_ID").unwrap_or_default();
    let spec: net::NetSpec = env("MVTEST_SPEC").parse().unwrap();
    let att = net::attach(&spec, &format!("vm-holder{id}"), 0).unwrap();
    std::fs::write(format!("{tmp}/ready{id}"), att.tap_name()).unwrap();
    let released = wait_until(60, || Path::new(&format!("{tmp}/release")).exists());
    assert!(released);
    drop(att);
}

fn spawn_holder(spec: &str) -> std::process::Child {
    spawn_holder_id(spec, "")
}

fn spawn_holder_id(spec: &str, id: &str) -> std::process::Child {
    Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "inner_hold", "--include-ignored", "--nocapture", "--test-threads=1"])
        .env("MVTEST_SPEC", spec)
        .env("MVTEST_ID", id)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap()
}

#[test]
#[ignore = "started by its outer test inside a test namespace"]
fn inner_shared_network_refcount() {
    inner();
    let tmp = env("MVTEST_TMP");
    let a = net::attach(&"nat:sh,subnet=10.99.0.0/24".parse().unwrap(), "vm-a", 0).unwrap();
    let b = net::attach(&"nat:sh".parse().unwrap(), "vm-b", 0).unwrap();
    assert_eq!(b.subnet(), a.subnet());
    assert_ne!(a.tap_name(), b.tap_name());
    assert_ne!(a.mac(), b.mac());
    assert_eq!(master_of(b.tap_name()), "mvbr-sh");

    // Mismatching requests for an existing network are bad input, and change nothing.
    let e = net::attach(&"host-only:sh".parse().unwrap(), "vm-c", 0).unwrap_err();
    assert!(e.is_bad_input() && e.to_string().contains("already exists"), "{e}");
    let e = net::attach(&"nat:sh,subnet=10.98.0.0/24".parse().unwrap(), "vm-c", 0).unwrap_err();
    assert!(e.is_bad_input(), "{e}");

    // A subnet colliding with a host route is refused, leaving nothing behind.
    let e = net::attach(&"nat:clash,subnet=198.51.100.0/24".parse().unwrap(), "vm-c", 0).unwrap_err();
    println!("{}", cli_message(&e));
    assert!(e.is_bad_input() && e.to_string().contains("198.51.100.0/24"), "{e}");
    assert!(!link_exists("mvbr-clash") && !state_dir_of("clash").exists());
    // ...and so is one colliding with another microvm network.
    let e = net::attach(&"host-only:clash,subnet=10.99.0.0/24".parse().unwrap(), "vm-c", 0).unwrap_err();
    assert!(e.is_bad_input(), "{e}");

    // A second network picks the first free auto subnet and is isolated from the first.
    let other = net::attach(&"host-only:other".parse().unwrap(), "vm-d", 0).unwrap();
    assert_eq!(other.subnet().unwrap().to_string(), "10.200.0.0/24");
    let rules = sh("nft list table ip microvm");
    assert!(rules.contains("\"mvbr-sh\" : jump from_nat") && rules.contains("\"mvbr-other\" : jump from_host_only"), "{rules}");

    // Rules flushed behind our back are re-installed when the next user joins.
    sh("nft delete table ip microvm");
    let e = net::attach(&"host-only:other".parse().unwrap(), "vm-e", 0).unwrap();
    let rules = sh("nft list table ip microvm");
    assert!(rules.contains("\"mvbr-other\" : jump from_host_only") && !rules.contains("mvbr-sh"), "{rules}");
    drop(e);
    let sh_att = net::attach(&"nat:sh".parse().unwrap(), "vm-f", 0).unwrap();
    assert!(sh("nft list table ip microvm").contains("\"mvbr-sh\" : jump nat_out"));
    drop(sh_att);

    // Another process joins the same network.
    let child = spawn_holder("nat:sh");
    assert!(wait_until(30, || Path::new(&format!("{tmp}/ready")).exists()), "holder not ready");
    let users = std::fs::read_to_string(state_dir_of("sh").join("users")).unwrap();
    assert_eq!(users.lines().count(), 3, "{users}");

    drop(a);
    drop(b);
    assert!(link_exists("mvbr-sh"), "torn down while another process still uses it");
    assert!(sh("nft list table ip microvm").contains("\"mvbr-sh\" : jump from_nat"));

    drop(other);
    assert!(!link_exists("mvbr-other"));
    let rules = sh("nft list table ip microvm");
    assert!(!rules.contains("mvbr-other") && rules.contains("\"mvbr-sh\" : jump from_nat"), "{rules}");

    std::fs::write(format!("{tmp}/release"), "").unwrap();
    let out = microvm_tests::netns::wait_timeout(child, 30);
    assert!(out.status.success(), "holder failed");
    assert!(!link_exists("mvbr-sh"), "last user left but bridge remains");
    assert!(!nft_table_exists());
    assert!(!state_dir_of("sh").exists());
}

// ---------------------------------------------------------------------------------------

#[test]
fn concurrent_first_attach() {
    microvm_tests::netns::outer();
    let host = Netns::new("race");
    let run = TempDir::new();
    host.run_inner("inner_concurrent_first_attach", &[("MICROVM_RUN_DIR", run.str()), ("MVTEST_TMP", run.str())]);
}

#[test]
#[ignore = "started by its outer test inside a test namespace"]
fn inner_concurrent_first_attach() {
    inner();
    let tmp = env("MVTEST_TMP");
    // Several processes create the same new network at once: the state lock serializes
    // them, so exactly one creates it and the others join.
    let ids = ["a", "b", "c", "d"];
    let children: Vec<_> = ids.iter().map(|id| spawn_holder_id("host-only:race", id)).collect();
    let all_ready = || ids.iter().all(|id| Path::new(&format!("{tmp}/ready{id}")).exists());
    assert!(wait_until(30, all_ready), "not all holders attached");
    let users = std::fs::read_to_string(state_dir_of("race").join("users")).unwrap();
    assert_eq!(users.lines().count(), ids.len(), "{users}");
    for id in ids {
        let tap = std::fs::read_to_string(format!("{tmp}/ready{id}")).unwrap();
        assert_eq!(master_of(&tap), "mvbr-race");
    }
    std::fs::write(format!("{tmp}/release"), "").unwrap();
    for child in children {
        assert!(microvm_tests::netns::wait_timeout(child, 30).status.success());
    }
    assert!(!link_exists("mvbr-race") && !nft_table_exists() && !state_dir_of("race").exists());
}

// ---------------------------------------------------------------------------------------

#[test]
fn stale_cleanup_after_kill() {
    microvm_tests::netns::outer();
    let host = Netns::new("stale");
    let run = TempDir::new();
    host.run_inner("inner_stale_cleanup_after_kill", &[("MICROVM_RUN_DIR", run.str()), ("MVTEST_TMP", run.str())]);
}

#[test]
#[ignore = "started by its outer test inside a test namespace"]
fn inner_stale_cleanup_after_kill() {
    inner();
    let tmp = env("MVTEST_TMP");
    let mut child = spawn_holder("host-only:st");
    assert!(wait_until(30, || Path::new(&format!("{tmp}/ready")).exists()), "holder not ready");
    let tap = std::fs::read_to_string(format!("{tmp}/ready")).unwrap();
    assert!(link_exists(&tap) && link_exists("mvbr-st"));
    child.kill().unwrap(); // SIGKILL: no Drop runs
    child.wait().unwrap();
    // The TAP was never persistent, so it died with its fd; the network is stale.
    assert!(wait_until(5, || !link_exists(&tap)));
    assert!(link_exists("mvbr-st") && nft_table_exists() && state_dir_of("st").exists());

    // An orphan persistent TAP whose encoded pid is not running, and an orphan bridge.
    sh("ip tuntap add mvtap-zzzzz-0 mode tap");
    sh("ip link add mvbr-orphan type bridge");
    // A persistent TAP in no network's pool, named by a running process (this one): what a
    // process killed while pooling a TAP, or taking one from a pool, leaves.
    let live_named = format!("mvtap-{}-zz", base36(std::process::id()));
    sh(&format!("ip tuntap add {live_named} mode tap"));
    net::cleanup_stale().unwrap();
    assert!(!link_exists("mvbr-st") && !state_dir_of("st").exists());
    assert!(!nft_table_exists());
    assert!(!link_exists("mvtap-zzzzz-0") && !link_exists("mvbr-orphan"));
    assert!(!link_exists(&live_named), "a persistent TAP outside any pool is an orphan");

    // The network can be created again afterwards.
    let att = net::attach(&"host-only:st".parse().unwrap(), "vm-again", 0).unwrap();
    assert!(link_exists("mvbr-st"));
    net::teardown_all().unwrap();
    assert!(!link_exists("mvbr-st") && !nft_table_exists());
    drop(att);
}

fn base36(mut v: u32) -> String {
    let mut out = Vec::new();
    loop {
        out.push(b"0123456789abcdefghijklmnopqrstuvwxyz"[(v % 36) as usize]);
        v /= 36;
        if v == 0 {
            break;
        }
    }
    out.reverse();
    String::from_utf8(out).unwrap()
}

// ---------------------------------------------------------------------------------------

#[test]
fn bridge_and_tap_modes() {
    microvm_tests::netns::outer();
    let host = Netns::new("modes");
    let run = TempDir::new();
    host.run_inner("inner_bridge_and_tap_modes", &[("MICROVM_RUN_DIR", run.str())]);
}

#[test]
#[ignore = "started by its outer test inside a test namespace"]
fn inner_bridge_and_tap_modes() {
    inner();
    // bridge=BR
    let e = net::attach(&"bridge=nosuch".parse().unwrap(), "vm", 0).unwrap_err();
    println!("{}", cli_message(&e));
    assert!(e.is_bad_input() && e.to_string().contains("nosuch"), "{e}");
    sh("ip link add notbr type veth peer name notbr-p");
    let e = "bridge=notbr".parse::<net::NetSpec>().unwrap().preflight().unwrap_err();
    assert!(e.is_bad_input() && e.to_string().contains("not a bridge"), "{e}");
    sh("ip link add br0 type bridge");
    let att = net::attach(&"bridge=br0,mac=02:00:00:00:00:07".parse().unwrap(), "vm", 0).unwrap();
    assert_eq!(att.mac(), [2, 0, 0, 0, 0, 7]);
    let tap = att.tap_name().to_string();
    assert_eq!(master_of(&tap), "br0");
    assert_eq!(att.bridge(), Some("br0"));
    assert!(att.subnet().is_none());
    assert!(!nft_table_exists(), "bridge= must not add firewall rules");
    drop(att);
    assert!(!link_exists(&tap) && link_exists("br0"));

    // tap=NAME
    let e = net::attach(&"tap=nosuch".parse().unwrap(), "vm", 0).unwrap_err();
    println!("{}", cli_message(&e));
    assert!(e.is_bad_input(), "{e}");
    let e = net::attach(&"tap=notbr".parse().unwrap(), "vm", 0).unwrap_err();
    assert!(e.is_bad_input() && e.to_string().contains("not a TAP"), "{e}");
    sh("ip tuntap add mytap0 mode tap");
    let att = net::attach(&"tap=mytap0".parse().unwrap(), "vm", 1).unwrap();
    assert_eq!(att.tap_name(), "mytap0");
    assert!(att.tap_fd() >= 0);
    att.set_offload(net::TUN_F_CSUM).unwrap();
    let flags = std::fs::read_to_string("/sys/class/net/mytap0/tun_flags").unwrap();
    assert!(u32::from_str_radix(flags.trim().trim_start_matches("0x"), 16).unwrap() & 0x4000 != 0);
    drop(att);
    assert!(link_exists("mytap0"), "an existing TAP must be left alone");

    // Explicit TAP name for a named network; a taken name is refused.
    let e = net::attach(&"host-only:h,tap=mytap0".parse().unwrap(), "vm", 0).unwrap_err();
    assert!(e.is_bad_input(), "{e}");
    assert!(!link_exists("mvbr-h"));
    let att = net::attach(&"host-only:h,tap=vmnic0".parse().unwrap(), "vm", 0).unwrap();
    assert_eq!(master_of("vmnic0"), "mvbr-h");
    let rules = sh("nft list table ip microvm");
    assert!(!rules.contains("jump nat_out") && rules.contains("\"mvbr-h\" : jump from_host_only"), "host-only must not masquerade: {rules}");
    drop(att);
    assert!(!link_exists("vmnic0") && !link_exists("mvbr-h"));

    // nat without a default route: a clear bad-input error, nothing left behind.
    let e = net::attach(&"nat:nr".parse().unwrap(), "vm", 0).unwrap_err();
    println!("{}", cli_message(&e));
    assert!(e.is_bad_input() && e.to_string().contains("default route"), "{e}");
    assert!(!link_exists("mvbr-nr") && !nft_table_exists() && !state_dir_of("nr").exists());
    let e = net::attach(&"nat:nr,uplink=nosuch0".parse().unwrap(), "vm", 0).unwrap_err();
    assert!(e.is_bad_input(), "{e}");
    // With an explicit uplink it works.
    sh("ip link add up9 type veth peer name up9-p");
    let att = net::attach(&"nat:nr,uplink=up9".parse().unwrap(), "vm", 0).unwrap();
    assert!(sh("nft list table ip microvm").contains("\"up9\""));
    drop(att);
    assert!(!nft_table_exists());

    // A failure after the bridge, rules and TAP exist rolls all of it back: occupy the
    // DHCP port without SO_REUSEADDR so the server socket cannot bind.
    let blocker = std::net::UdpSocket::bind("0.0.0.0:67").unwrap();
    let e = net::attach(&"host-only:rb".parse().unwrap(), "vm", 0).unwrap_err();
    println!("{}", cli_message(&e));
    assert!(!e.is_bad_input() && matches!(e, net::NetError::Dhcp(_)), "{e}");
    assert!(!link_exists("mvbr-rb") && !nft_table_exists() && !state_dir_of("rb").exists());
    assert!(!sh("ip -o link").contains("mvtap-"), "TAP left behind after rollback");
    drop(blocker);

    // Callers inside a tokio runtime must not hit "cannot block_on inside a runtime".
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    rt.block_on(async {
        let att = net::attach(&"bridge=br0".parse().unwrap(), "vm", 2).unwrap();
        assert_eq!(master_of(att.tap_name()), "br0");
        drop(att);
        net::cleanup_stale().unwrap();
    });
    drop(rt);
    std::thread::sleep(Duration::from_millis(10));
}

#[test]
fn attachment_is_send() {
    fn assert_send<T: Send>() {}
    assert_send::<net::Attachment>();
    assert_send::<net::NetError>();
}

// ---------------------------------------------------------------------------------------

#[test]
fn not_permitted_is_bad_input() {
    microvm_tests::netns::outer();
    let host = Netns::new("noperm");
    let run = TempDir::new();
    host.run_inner_via(
        &["setpriv", "--inh-caps=-net_admin", "--bounding-set=-net_admin"],
        "inner_not_permitted",
        &[("MICROVM_RUN_DIR", run.str())],
    );
}

#[test]
#[ignore = "started by its outer test inside a test namespace"]
fn inner_not_permitted() {
    inner();
    // Nothing to clean up without the capability: a quiet no-op, not an error.
    net::cleanup_stale().unwrap();
    for spec in ["nat:np", "host-only:np", "bridge=br0"] {
        let spec: net::NetSpec = spec.parse().unwrap();
        let e = spec.preflight().unwrap_err();
        println!("{}", cli_message(&e));
        assert!(matches!(e, net::NetError::NotPermitted { .. }) && e.is_bad_input(), "{e}");
        let e = net::attach(&spec, "vm", 0).unwrap_err();
        assert!(matches!(e, net::NetError::NotPermitted { .. }), "{e}");
    }
    assert!(!link_exists("mvbr-np"));
}

// ---------------------------------------------------------------------------------------

#[test]
fn dhcp_survives_hostile_packets() {
    microvm_tests::netns::outer();
    let host = Netns::new("hostile");
    let guest = Netns::new("hguest");
    let run = TempDir::new();
    host.run_inner(
        "inner_dhcp_survives_hostile_packets",
        &[("MICROVM_RUN_DIR", run.str()), ("MVTEST_GUEST_NS", &guest.name), ("MVTEST_TMP", run.str())],
    );
}

/// A BOOTREQUEST from `chaddr` with the magic cookie and `opts` as its options.
fn bootp(chaddr: [u8; 6], opts: &[u8]) -> Vec<u8> {
    let mut b = vec![0u8; 236];
    b[..4].copy_from_slice(&[1, 1, 6, 0]);
    b[4..8].copy_from_slice(&0x1234_5678u32.to_be_bytes());
    b[28..34].copy_from_slice(&chaddr);
    b.extend_from_slice(&[99, 130, 83, 99]);
    b.extend_from_slice(opts);
    b
}

#[test]
#[ignore = "started by its outer test inside a test namespace"]
fn inner_dhcp_survives_hostile_packets() {
    inner();
    let guest_ns = env("MVTEST_GUEST_NS");
    let tmp = env("MVTEST_TMP");
    let att = net::attach(&"host-only:hd".parse().unwrap(), "vm-hd", 0).unwrap();
    let subnet = att.subnet().unwrap();
    let mac = net::MacAddr(att.mac()).to_string();
    sh(&format!("ip link add gv0 type veth peer name gv1 netns {guest_ns}"));
    sh("ip link set gv0 master mvbr-hd && ip link set gv0 up");
    sh(&format!("ip -n {guest_ns} link set gv1 address {mac} && ip -n {guest_ns} link set gv1 up"));
    assert_eq!(net::dhcp_stats("hd"), Some(net::DhcpStats::default()));

    // Packets dhcproto would assert on or that are broken on the wire, all from a foreign
    // MAC (nothing would be answered even if they parsed).
    let foreign = [2, 0, 0, 0, 0, 0x99];
    let mt = [53, 1, 1];
    let with = |tail: &[u8]| bootp(foreign, &[&mt[..], tail, &[255]].concat());
    let mut bad_cookie = with(&[]);
    bad_cookie[236] = 0;
    let mut bad_hlen = with(&[]);
    bad_hlen[2] = 17;
    let hostile: Vec<Vec<u8>> = vec![
        with(&[80, 1, 0]), // the bug report: Rapid Commit, length 1
        with(&[80, 2, 0, 0]),
        with(&[81, 2, 0, 0]),
        with(&[94, 2, 1, 2]),
        with(&[94, 4, 1, 2, 3, 4]),
        with(&[152, 3, 0, 0, 0]),
        with(&[153, 2, 0, 0]),
        with(&[154, 0]),
        with(&[155, 5, 0, 0, 0, 0, 0]),
        with(&[50, 3, 10, 0, 0]),
        with(&[52, 1, 7]),
        with(&[52, 1, 1]), // overload into a file field that has no End
        bootp(foreign, &[53, 1, 1, 12, 40, b'x']), // truncated
        bootp(foreign, &mt),                       // no End
        bad_cookie,
        bad_hlen,
        vec![1, 1, 6, 0, 0, 0],
    ];
    // Then every option code at lengths 0..=3, and random junk: must not hurt either.
    let mut sweep = Vec::new();
    for code in 0..=255u8 {
        for len in 0..=3u8 {
            let mut tail = vec![code, len];
            tail.extend(std::iter::repeat_n(0x01, usize::from(len)));
            sweep.push(with(&tail));
        }
    }
    let mut seed = 7u64;
    for _ in 0..500 {
        let n = (seed % 600) as usize;
        let junk: Vec<u8> = (0..n)
            .map(|_| {
                seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
                (seed >> 56) as u8
            })
            .collect();
        sweep.push([&bootp(foreign, &[])[..], &junk].concat());
    }

    let send = move |packets: Vec<Vec<u8>>| {
        microvm_tests::netns::spawn_in_named(&env("MVTEST_GUEST_NS"), move || {
            use socket2::{Domain, Protocol, Socket, Type};
            let sock = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).unwrap();
            sock.set_broadcast(true).unwrap();
            sock.bind_device(Some(b"gv1")).unwrap();
            let to: std::net::SocketAddr = "255.255.255.255:67".parse().unwrap();
            for (i, p) in packets.iter().enumerate() {
                sock.send_to(p, &to.into()).unwrap();
                if i % 32 == 31 {
                    // Pace the burst so the server's receive queue never overflows.
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        })
        .join()
        .unwrap();
    };
    let n_hostile = hostile.len() as u64;
    send(hostile);
    let counted = wait_until(10, || net::dhcp_stats("hd").is_some_and(|s| s.malformed == n_hostile));
    assert!(counted, "server saw {:?}, want {n_hostile} malformed", net::dhcp_stats("hd"));
    send(sweep);

    // Still serving: the attachment's MAC gets its lease.
    let (script, out) = udhcpc_script(&tmp);
    assert!(udhcpc(&guest_ns, "gv1", "5", &script), "no lease after the hostile packets");
    let result = std::fs::read_to_string(&out).unwrap();
    assert!(result.lines().any(|l| l.starts_with("bound") && l.contains(&format!("ip={}", subnet.host(2)))), "{result}");
    let stats = net::dhcp_stats("hd").unwrap();
    println!("{stats:?}");
    assert_eq!(stats.decoder_panics, 0, "dhcproto panicked (contained) on something the wire check let through");
    assert!(stats.malformed > n_hostile, "the sweep holds malformed packets too: {stats:?}");
    att.release().unwrap();
    assert!(!net::dhcp_server_running("hd") && !link_exists("mvbr-hd"));
}

// ---------------------------------------------------------------------------------------

#[test]
fn joining_and_leaving_an_existing_network_runs_no_nft() {
    microvm_tests::netns::outer();
    let host = Netns::new("nonft");
    let run = TempDir::new();
    host.run_inner("inner_join_leave_without_nft", &[("MICROVM_RUN_DIR", run.str())]);
}

/// The fast path: a VM joining a network another VM holds, and leaving it, changes only
/// set elements over netlink; no `nft` process runs (each cost 10-17 ms of fork, exec and
/// cache fill). Checked by hiding `nft` from PATH for that part.
#[test]
#[ignore = "started by its outer test inside a test namespace"]
fn inner_join_leave_without_nft() {
    inner();
    let first = net::attach(&"host-only:nn".parse().unwrap(), "vm-a", 0).unwrap();
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::set_var("PATH", "/nonexistent");
    let joined_and_left = net::attach(&"host-only:nn".parse().unwrap(), "vm-b", 0).and_then(|a| {
        let tap = a.tap_name().to_string();
        a.release().map(|()| tap)
    });
    std::env::set_var("PATH", &path);
    let tap = joined_and_left.unwrap();
    // Pooled for the next VM (tests/pool.rs), its guard sealed.
    let table = sh("nft list table bridge microvm");
    let sealed = table.split("set guard_sealed {").nth(1).and_then(|r| r.split('}').next()).unwrap_or("");
    assert!(link_exists(&tap) && sealed.contains(&format!("\"{tap}\"")), "not sealed\n{table}");
    assert!(table.contains(&format!("\"{}\" : jump check_lease", first.tap_name())), "{table}");
    // Taking the pooled TAP, and pooling it again, runs no nft either.
    std::env::set_var("PATH", "/nonexistent");
    let again = net::attach(&"host-only:nn".parse().unwrap(), "vm-c", 0).and_then(|a| {
        let tap = a.tap_name().to_string();
        a.release().map(|()| tap)
    });
    std::env::set_var("PATH", &path);
    assert_eq!(again.unwrap(), tap);
    first.release().unwrap();
    assert!(!link_exists(&tap), "pooled TAP left behind");
    assert!(!link_exists("mvbr-nn") && !nft_table_exists() && !state_dir_of("nn").exists());
}

#[test]
fn release_tears_down_in_order() {
    microvm_tests::netns::outer();
    let host = Netns::new("release");
    let run = TempDir::new();
    host.run_inner("inner_release_tears_down_in_order", &[("MICROVM_RUN_DIR", run.str())]);
}

#[test]
#[ignore = "started by its outer test inside a test namespace"]
fn inner_release_tears_down_in_order() {
    inner();
    // A VM whose id (its first disk's path) has blanks, and one with an empty id.
    let spaced = "/var/lib/my vms/disk\t1.img";
    let a = net::attach(&"host-only:sp".parse().unwrap(), spaced, 0).unwrap();
    let b = net::attach(&"host-only:sp".parse().unwrap(), "", 1).unwrap();
    let (tap_a, tap_b) = (a.tap_name().to_string(), b.tap_name().to_string());
    let users = std::fs::read_to_string(state_dir_of("sp").join("users")).unwrap();
    assert!(users.contains(" /var/lib/my%20vms/disk%091.img "), "{users}");
    assert_eq!(users.lines().count(), 2, "{users}");

    a.release().unwrap();
    // The network stays: a's TAP waits, down, in its pool (tests/pool.rs).
    let pool = std::fs::read_to_string(state_dir_of("sp").join("pool")).unwrap();
    assert_eq!(pool.trim(), tap_a, "a's TAP is pooled");
    assert!(!sh(&format!("ip -o link show dev {tap_a}")).contains(",UP"), "a pooled TAP is down");
    assert!(link_exists(&tap_b) && link_exists("mvbr-sp") && net::dhcp_server_running("sp"));
    let users = std::fs::read_to_string(state_dir_of("sp").join("users")).unwrap();
    assert_eq!(users.lines().count(), 1, "the released NIC's entry must go: {users}");

    // The last user leaves: everything goes, DHCP thread included.
    b.release().unwrap();
    assert!(!net::dhcp_server_running("sp"));
    assert!(!link_exists(&tap_b) && !link_exists(&tap_a) && !link_exists("mvbr-sp"), "network left behind");
    assert!(!state_dir_of("sp").exists() && !nft_table_exists());

    // Other modes release too; an existing tap=NAME is left alone.
    sh("ip link add br0 type bridge && ip tuntap add mytap0 mode tap");
    let br = net::attach(&"bridge=br0".parse().unwrap(), spaced, 2).unwrap();
    let tap_br = br.tap_name().to_string();
    br.release().unwrap();
    assert!(!link_exists(&tap_br) && link_exists("br0"));
    net::attach(&"tap=mytap0".parse().unwrap(), "vm", 3).unwrap().release().unwrap();
    assert!(link_exists("mytap0"));

    // Drop stays a fallback for attachments nobody released.
    let c = net::attach(&"host-only:sp".parse().unwrap(), spaced, 0).unwrap();
    let tap_c = c.tap_name().to_string();
    drop(c);
    assert!(!link_exists(&tap_c) && !link_exists("mvbr-sp") && !state_dir_of("sp").exists());
}

// ---------------------------------------------------------------------------------------

#[test]
fn emergency_teardown_leaves_nothing() {
    microvm_tests::netns::outer();
    let host = Netns::new("emerg");
    let run = TempDir::new();
    host.run_inner("inner_emergency_teardown", &[("MICROVM_RUN_DIR", run.str()), ("MVTEST_TMP", run.str())]);
}

#[test]
#[ignore = "started by its outer test inside a test namespace"]
fn inner_emergency_teardown() {
    inner();
    let tmp = env("MVTEST_TMP");
    sh("ip link add br0 type bridge");
    // Another process shares em2: that network must survive, without our entries.
    let holder = spawn_holder("host-only:em2");
    assert!(wait_until(30, || Path::new(&format!("{tmp}/ready")).exists()), "holder not ready");
    let atts: Vec<net::Attachment> = ["host-only:em1", "host-only:em1", "host-only:em2", "bridge=br0"]
        .iter()
        .enumerate()
        .map(|(i, s)| net::attach(&s.parse().unwrap(), "vm em", i as u32).unwrap())
        .collect();
    let taps: Vec<String> = atts.iter().map(|a| a.tap_name().to_string()).collect();
    assert!(taps.iter().all(|t| link_exists(t)));

    net::emergency_teardown();
    for t in &taps {
        assert!(!link_exists(t), "TAP {t} left behind");
    }
    assert!(!link_exists("mvbr-em1") && !state_dir_of("em1").exists(), "em1 left behind");
    assert!(link_exists("mvbr-em2") && link_exists("br0"));
    let users = std::fs::read_to_string(state_dir_of("em2").join("users")).unwrap();
    assert_eq!(users.lines().count(), 1, "only the holder remains: {users}");
    let pid = std::process::id().to_string();
    assert!(users.lines().all(|l| l.split_whitespace().next() != Some(pid.as_str())), "{users}");

    // Runs once; the attachments' Drop afterwards finds nothing to do and brings nothing back.
    net::emergency_teardown();
    drop(atts);
    assert!(taps.iter().all(|t| !link_exists(t)) && !link_exists("mvbr-em1"));
    assert!(link_exists("mvbr-em2"));

    std::fs::write(format!("{tmp}/release"), "").unwrap();
    assert!(microvm_tests::netns::wait_timeout(holder, 30).status.success());
    assert!(!link_exists("mvbr-em2") && !nft_table_exists() && !state_dir_of("em2").exists());
}
