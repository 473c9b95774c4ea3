//! Networks across hosts without guests: VXLAN overlays (device, flood list, gateway MAC,
//! filter, DHCP MTU, the address probe, teardown and stale cleanup) and bridge VLANs, in
//! namespaces each test creates: hosts A and B joined by an underlay bridge in a third
//! namespace (see `microvm_tests::netns` for the safety model).

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use microvm_tests::netns::{inner, link_exists, sh, try_sh, wait_until, Netns, TempDir};

fn env(key: &str) -> String {
    std::env::var(key).unwrap_or_else(|_| panic!("{key} not set"))
}

/// Hosts A (192.0.2.11) and B (192.0.2.12) on an underlay: veths into a bridge in `wire`.
fn underlay(a: &Netns, b: &Netns, wire: &Netns) {
    wire.sh("ip link add ulbr type bridge && ip link set ulbr up");
    for (host, n, port) in [(a, 11, "a0"), (b, 12, "b0")] {
        wire.sh(&format!("ip link add {port} type veth peer name ul0 netns {}", host.name));
        wire.sh(&format!("ip link set {port} master ulbr && ip link set {port} up"));
        host.sh(&format!("ip addr add 192.0.2.{n}/24 dev ul0 && ip link set ul0 up"));
    }
}

#[test]
fn overlay_device_filter_probe_and_teardown() {
    microvm_tests::netns::outer();
    let (a, b, wire, guest) = (Netns::new("ovA"), Netns::new("ovB"), Netns::new("ovW"), Netns::new("ovG"));
    underlay(&a, &b, &wire);
    let run = TempDir::new();
    let nets = TempDir::new();
    std::fs::write(
        nets.path.join("lab.toml"),
        "vni = 4242\nsubnet = \"10.77.0.0/24\"\npeers = [\"192.0.2.11\", \"192.0.2.12\"]\ndev = \"ul0\"\n",
    )
    .unwrap();
    a.run_inner(
        "inner_overlay",
        &[
            ("MICROVM_RUN_DIR", run.str()),
            ("MICROVM_NETWORKS_DIR", nets.str()),
            ("MVTEST_B_NS", &b.name),
            ("MVTEST_GUEST_NS", &guest.name),
            ("MVTEST_TMP", run.str()),
        ],
    );
}

/// Attaches to overlay `lab` (from its definition file) and keeps it until killed.
#[test]
#[ignore = "started by its outer test inside a test namespace"]
fn inner_overlay_holder() {
    inner();
    let att = net::attach(&"host-only:lab".parse().unwrap(), "vm-holder", 0).unwrap();
    println!("HOLDING {}", att.tap_name());
    std::thread::sleep(Duration::from_secs(120));
    drop(att);
}

fn overlay_leftovers() -> Vec<String> {
    let mut left = Vec::new();
    for l in ["mvvx-lab", "mvbr-lab", "mvvx-lab2", "mvbr-lab2"] {
        if link_exists(l) {
            left.push(l.to_string());
        }
    }
    if try_sh("nft list table ip microvm") {
        left.push("table ip microvm".into());
    }
    let bridge = Command::new("nft").args(["list", "table", "bridge", "microvm"]).output().unwrap();
    let text = String::from_utf8_lossy(&bridge.stdout);
    if text.contains("\"mvvx-lab\" .") || text.contains("\"mvvx-lab2\" .") {
        left.push(format!("overlay elements: {text}"));
    }
    left
}

#[test]
#[ignore = "started by its outer test inside a test namespace"]
fn inner_overlay() {
    inner();
    let (b_ns, guest_ns, tmp) = (env("MVTEST_B_NS"), env("MVTEST_GUEST_NS"), env("MVTEST_TMP"));
    net::cleanup_stale().unwrap();

    // The file's definition, picked up by the plain spec.
    let spec: net::NetSpec = "host-only:lab".parse().unwrap();
    spec.preflight().unwrap();
    let att = net::attach(&spec, "vm-ov", 0).unwrap();
    assert_eq!(att.subnet().unwrap().to_string(), "10.77.0.0/24");
    let details = sh("ip -d link show dev mvvx-lab");
    for want in ["vxlan id 4242", "local 192.0.2.11", "dev ul0", "dstport 4789", "master mvbr-lab", "mtu 1450"] {
        assert!(details.contains(want), "{want}: {details}");
    }
    assert!(!details.contains("nolearning"), "{details}");
    // Head-end replication to B only (A's own address is no peer).
    let fdb = sh("bridge fdb show dev mvvx-lab");
    assert!(fdb.contains("00:00:00:00:00:00 dst 192.0.2.12 self permanent"), "{fdb}");
    assert!(!fdb.contains("192.0.2.11"), "{fdb}");
    // The distributed gateway: a MAC of the network's, not a port's.
    let br = sh("ip -o link show dev mvbr-lab");
    assert!(br.contains("link/ether 02:6d:"), "{br}");
    let rules = sh("nft list table bridge microvm");
    assert!(rules.contains("\"mvvx-lab\" . 10.77.0.1") && rules.contains("\"mvvx-lab\" . 02:6d:"), "{rules}");
    assert!(rules.contains("oifname \"mvvx-*\" jump overlay_out"), "{rules}");

    // A second definition of lab on this host is refused, as a user error.
    let e = net::attach(&"host-only:lab,subnet=10.77.0.0/24,vxlan=7,peers=192.0.2.12".parse().unwrap(), "vm-x", 0).unwrap_err();
    assert!(e.is_bad_input() && e.to_string().contains("lab.toml") && e.to_string().contains("command line"), "{e}");
    let l2 = net::attach(&"host-only:lab2,subnet=10.78.0.0/24,vxlan=5,peers=192.0.2.12".parse().unwrap(), "vm-l2", 0).unwrap();
    let e = net::attach(&"host-only:lab2,subnet=10.78.0.0/24,vxlan=6,peers=192.0.2.12".parse().unwrap(), "vm-l2b", 0).unwrap_err();
    assert!(e.is_bad_input() && e.to_string().contains("vxlan=5") && e.to_string().contains("vxlan=6"), "{e}");
    l2.release().unwrap();

    // DHCP: the overlay's MTU, a MAC-derived address. A fake guest: a veth with the
    // attachment's MAC in the bridge.
    let mac = net::MacAddr(att.mac()).to_string();
    sh(&format!("ip link add gv0 type veth peer name gv1 netns {guest_ns}"));
    sh("ip link set gv0 master mvbr-lab && ip link set gv0 up");
    let gsh = |c: &str| sh(&format!("ip netns exec {guest_ns} sh -c '{c}'"));
    gsh(&format!("ip link set gv1 address {mac} && ip link set gv1 up"));
    let script = format!("{tmp}/udhcpc-mtu.sh");
    let out = format!("{tmp}/udhcpc-mtu.out");
    std::fs::write(&script, format!("#!/bin/sh\necho \"$1 ip=$ip mtu=$mtu\" >> {out}\n")).unwrap();
    sh(&format!("chmod +x {script}"));
    let dhcp = Command::new("ip")
        .args(["netns", "exec", &guest_ns, "busybox", "udhcpc", "-i", "gv1", "-f", "-q", "-n", "-t", "5", "-T", "1", "-O", "mtu", "-s", &script])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    let got = std::fs::read_to_string(&out).unwrap_or_default();
    assert!(dhcp.success(), "{got}");
    let bound = got.lines().find(|l| l.starts_with("bound")).unwrap_or_else(|| panic!("{got}"));
    assert!(bound.contains("mtu=1450"), "{bound}");
    let first_ip = bound.split_whitespace().find_map(|w| w.strip_prefix("ip=")).unwrap().to_string();
    assert!(first_ip.starts_with("10.77.0."), "{bound}");
    sh("ip link del gv0");

    // Teardown: the last user takes port, bridge and elements with it.
    att.release().unwrap();
    assert_eq!(overlay_leftovers(), Vec::<String>::new());

    // The probe: on host B, a guest already holds that address (B's side built by hand:
    // a VXLAN of VNI 4242 flooding to A, a bridge, a veth with the address). A VM with the
    // same MAC joining on A now gets the next candidate instead.
    let bsh = |c: &str| sh(&format!("ip netns exec {b_ns} sh -c '{c}'"));
    bsh("ip link add vx type vxlan id 4242 dstport 4789 local 192.0.2.12 dev ul0 && bridge fdb append 00:00:00:00:00:00 dev vx dst 192.0.2.11");
    bsh("ip link add obr type bridge && ip link set vx master obr && ip link set vx up && ip link set obr up");
    bsh(&format!("ip link add h0 type veth peer name h1 && ip link set h0 master obr && ip link set h0 up && ip addr add {first_ip}/24 dev h1 && ip link set h1 up"));
    let t = Instant::now();
    let att = net::attach(&spec, "vm-ov", 0).unwrap();
    println!("join with one probe answered: {:?}", t.elapsed());
    let leases = std::fs::read_to_string(microvm_state("lab").join("leases")).unwrap();
    assert!(leases.contains(&mac) && !leases.contains(&format!("{first_ip} ")), "{first_ip} is held on B: {leases}");
    assert!(leases.contains("10.77.0."), "{leases}");
    att.release().unwrap();

    // A holder killed with SIGKILL: the next run's stale cleanup removes everything.
    let exe = std::env::current_exe().unwrap();
    let mut holder = Command::new(exe)
        .args(["--exact", "inner_overlay_holder", "--include-ignored", "--nocapture", "--test-threads=1"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    assert!(wait_until(30, || link_exists("mvvx-lab") && sh("ip -o link show master mvbr-lab").contains("mvtap-")), "holder never joined");
    holder.kill().unwrap();
    holder.wait().unwrap();
    assert!(link_exists("mvvx-lab"), "a killed process cannot clean up");
    net::cleanup_stale().unwrap();
    assert_eq!(overlay_leftovers(), Vec::<String>::new());
}

fn microvm_state(name: &str) -> std::path::PathBuf {
    use std::os::unix::fs::MetadataExt;
    let ino = std::fs::metadata("/proc/self/ns/net").unwrap().ino();
    std::path::Path::new(&env("MICROVM_RUN_DIR")).join(ino.to_string()).join("net").join(name)
}

#[test]
fn bridge_vlan_access_port() {
    microvm_tests::netns::outer();
    let host = Netns::new("vlan");
    let run = TempDir::new();
    host.run_inner("inner_bridge_vlan", &[("MICROVM_RUN_DIR", run.str())]);
}

#[test]
#[ignore = "started by its outer test inside a test namespace"]
fn inner_bridge_vlan() {
    inner();
    sh("ip link add trunk type bridge && ip link set trunk up");
    let spec: net::NetSpec = "bridge=trunk,vlan=10".parse().unwrap();
    if !std::path::Path::new("/sys/class/net/trunk/bridge/vlan_filtering").exists() {
        // This kernel has no bridge VLAN filtering (CONFIG_BRIDGE_VLAN_FILTERING off, as on
        // the development host): vlan= is refused as such, in one line, leaving no port.
        let e = spec.preflight().unwrap_err();
        assert!(e.is_bad_input() && e.to_string().contains("CONFIG_BRIDGE_VLAN_FILTERING") && !e.to_string().contains('\n'), "{e}");
        assert!(net::attach(&spec, "vm-v", 0).unwrap_err().is_bad_input());
        assert_eq!(sh("ip -o link show master trunk").trim(), "", "a refused attach leaves no port");
        println!("kernel without bridge VLAN filtering: checked the refusal only");
        return;
    }
    // A user's bridge is never reconfigured behind their back: one line, and the fix.
    let e = spec.preflight().unwrap_err();
    assert!(e.is_bad_input(), "{e}");
    assert!(e.to_string().contains("ip link set trunk type bridge vlan_filtering 1") && !e.to_string().contains('\n'), "{e}");
    assert!(net::attach(&spec, "vm-v", 0).unwrap_err().is_bad_input());
    assert_eq!(sh("ip -o link show master trunk").trim(), "", "a refused attach leaves no port");

    sh("ip link set trunk type bridge vlan_filtering 1");
    spec.preflight().unwrap();
    let a = net::attach(&spec, "vm-v", 0).unwrap();
    let b = net::attach(&"bridge=trunk,vlan=20".parse().unwrap(), "vm-w", 0).unwrap();
    let show = |tap: &str| sh(&format!("bridge -j vlan show dev {tap}"));
    let va = show(a.tap_name());
    assert!(va.contains("\"vlan\":10") && va.contains("PVID") && va.contains("Egress Untagged"), "{va}");
    assert!(!va.contains("\"vlan\":1,") && !va.contains("\"vlan\":1}"), "default VLAN 1 removed: {va}");
    let vb = show(b.tap_name());
    assert!(vb.contains("\"vlan\":20") && !vb.contains("\"vlan\":10"), "{vb}");
    let (ta, tb) = (a.tap_name().to_string(), b.tap_name().to_string());
    a.release().unwrap();
    b.release().unwrap();
    assert!(!link_exists(&ta) && !link_exists(&tb));
    // The user's bridge stays, VLAN filtering and all.
    assert!(sh("ip -d link show dev trunk").contains("vlan_filtering 1"));
}
