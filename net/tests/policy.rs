//! Guest-to-host policy and anti-spoofing, in network namespaces each test creates (see
//! `microvm_tests::netns`). "Guests" are veths in their own namespace (the ip-family policy
//! sees only the bridge, so a veth port tests it the same as a TAP) and frames written into
//! an attachment's TAP fd (what a guest's virtio-net TX does), which the bridge-family guard
//! filters.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener};
use std::path::Path;
use std::time::{Duration, Instant};

use microvm_tests::netns::{inner, sh, try_sh, wire_internet, Netns, TempDir};

fn env(key: &str) -> String {
    std::env::var(key).unwrap_or_else(|_| panic!("{key} not set"))
}

#[test]
fn guest_to_host_policy() {
    microvm_tests::netns::outer();
    let host = Netns::new("pol");
    let inet = Netns::new("polinet");
    let guest = Netns::new("polg");
    let guest2 = Netns::new("polg2");
    let run = TempDir::new();
    wire_internet(&host, &inet);
    // A "metadata service" beyond the uplink, at the link-local address clouds use.
    inet.sh("ip addr add 169.254.169.254/32 dev lo && ip link set lo up");
    host.run_inner(
        "inner_guest_to_host_policy",
        &[("MICROVM_RUN_DIR", run.str()), ("MVTEST_GUEST_NS", &guest.name), ("MVTEST_GUEST2_NS", &guest2.name)],
    );
}

/// Plugs a veth into `bridge` whose other end, in namespace `ns`, has `addr`/24 and a
/// default route via `gw`.
fn veth_guest(port: &str, bridge: &str, ns: &str, addr: &str, gw: &str) {
    sh(&format!("ip link add {port} type veth peer name eth0 netns {ns}"));
    sh(&format!("ip link set {port} master {bridge} && ip link set {port} up"));
    sh(&format!(
        "ip -n {ns} link set eth0 up && ip -n {ns} addr add {addr}/24 dev eth0 && ip -n {ns} route add default via {gw}"
    ));
}

/// True if `busybox nc` in `ns` connects to ip:port and reads the listener's greeting.
fn connects(ns: &str, ip: &str, port: u16) -> bool {
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", ns, "busybox", "nc", "-w", "3", ip, &port.to_string()])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).contains("hello from the host")
}

#[test]
#[ignore = "started by its outer test inside a test namespace"]
fn inner_guest_to_host_policy() {
    inner();
    net::cleanup_stale().unwrap();
    let (g1, g2) = (env("MVTEST_GUEST_NS"), env("MVTEST_GUEST2_NS"));
    let closed = net::attach(&"nat:p1".parse().unwrap(), "vm-closed", 0).unwrap();
    let open = net::attach(&"host-only:p2,allow-host".parse().unwrap(), "vm-open", 0).unwrap();
    // allow-host is the network's: a VM asking differently is a usage error, both ways.
    for spec in ["nat:p1,allow-host", "host-only:p2"] {
        let e = net::attach(&spec.parse().unwrap(), "vm-other", 0).unwrap_err();
        assert!(e.is_bad_input() && e.to_string().contains("allow-host"), "{spec}: {e}");
    }
    veth_guest("pv1", "mvbr-p1", &g1, "10.200.0.50", "10.200.0.1");
    veth_guest("pv2", "mvbr-p2", &g2, "10.200.1.50", "10.200.1.1");

    // A host service on 0.0.0.0, greeting whoever connects.
    let listener = TcpListener::bind("0.0.0.0:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for mut s in listener.incoming().flatten() {
            let _ = s.write_all(b"hello from the host\n");
        }
    });
    assert!(connects(&g2, "10.200.1.1", port), "allow-host: the guest reaches the host service");
    assert!(!connects(&g1, "10.200.0.1", port), "default: the host service is closed to guests");
    assert!(!connects(&g1, "198.51.100.2", port), "nor reachable on another host address");
    let ping = |ns: &str, ip: &str| try_sh(&format!("ip netns exec {ns} busybox ping -c 1 -W 2 {ip}"));
    assert!(ping(&g1, "10.200.0.1"), "ping of the gateway stays open");
    assert!(ping(&g1, "198.51.100.1"), "NAT still works");
    // Host -> guest connections still work (replies pass conntrack).
    let guest_srv = std::process::Command::new("ip")
        .args(["netns", "exec", &g1, "busybox", "nc", "-l", "-p", "8123", "-e", "echo", "hello from the guest"])
        .spawn()
        .unwrap();
    let reached = (0..50).any(|_| {
        std::thread::sleep(Duration::from_millis(100));
        std::net::TcpStream::connect_timeout(&"10.200.0.50:8123".parse().unwrap(), Duration::from_secs(2))
            .ok()
            .and_then(|mut s| {
                let mut buf = String::new();
                s.read_to_string(&mut buf).ok()?;
                Some(buf.contains("hello from the guest"))
            })
            .unwrap_or(false)
    });
    let mut guest_srv = guest_srv;
    let _ = guest_srv.kill();
    let _ = guest_srv.wait();
    assert!(reached, "host -> guest connection");
    // Link-local: reachable from the host, not from a guest (not even through NAT).
    assert!(try_sh("busybox ping -c 1 -W 2 169.254.169.254"), "the host reaches the metadata address");
    assert!(!ping(&g1, "169.254.169.254"), "a guest must not reach link-local addresses");
    let rules = sh("nft list table ip microvm");
    assert!(rules.contains("no host access without allow-host") && rules.contains("169.254.0.0/16"), "{rules}");
    sh("ip link del pv1 && ip link del pv2");
    open.release().unwrap();
    closed.release().unwrap();
    assert!(!try_sh("nft list table ip microvm"), "ip table left behind");
}

// ---------------------------------------------------------------------------------------

#[test]
fn anti_spoofing() {
    microvm_tests::netns::outer();
    let host = Netns::new("spoof");
    let inet = Netns::new("spoofin");
    let run = TempDir::new();
    wire_internet(&host, &inet);
    host.run_inner("inner_anti_spoofing", &[("MICROVM_RUN_DIR", run.str())]);
}

const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 1);

/// An ARP request "who has 10.200.0.1? tell (sha, spa)" from Ethernet source `src`, with the
/// TAP's 12-byte virtio-net header in front (all zero: no offloads).
fn arp_request(src: [u8; 6], sha: [u8; 6], spa: Ipv4Addr) -> Vec<u8> {
    let mut f = vec![0u8; net::VNET_HDR_LEN as usize];
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&src);
    f.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
    f.extend_from_slice(&sha);
    f.extend_from_slice(&spa.octets());
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&GATEWAY.octets());
    f
}

/// A broadcast UDP datagram (to port 9, discard) from (`src`, `ip`), with the vnet header.
fn udp_broadcast(src: [u8; 6], ip: Ipv4Addr) -> Vec<u8> {
    let mut f = vec![0u8; net::VNET_HDR_LEN as usize];
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&src);
    f.extend_from_slice(&[0x08, 0x00]);
    let payload = [0u8; 18];
    let total = (20 + 8 + payload.len()) as u16;
    let mut iph = vec![0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 17, 0, 0];
    iph[2..4].copy_from_slice(&total.to_be_bytes());
    iph.extend_from_slice(&ip.octets());
    iph.extend_from_slice(&[10, 200, 0, 255]);
    let sum = !iph.chunks(2).fold(0u32, |a, c| {
        let s = a + u32::from(u16::from_be_bytes([c[0], c[1]]));
        (s & 0xffff) + (s >> 16)
    }) as u16;
    iph[10..12].copy_from_slice(&sum.to_be_bytes());
    f.extend_from_slice(&iph);
    f.extend_from_slice(&[0x30, 0x39, 0, 9]);
    f.extend_from_slice(&(8 + payload.len() as u16).to_be_bytes());
    f.extend_from_slice(&[0, 0]);
    f.extend_from_slice(&payload);
    f
}

fn write_frame(fd: std::os::fd::RawFd, frame: &[u8]) {
    // SAFETY: writes from a live buffer of `frame.len()` bytes to the attachment's TAP fd,
    // which the attachment keeps open while this test holds it.
    let n = unsafe { libc::write(fd, frame.as_ptr().cast(), frame.len()) };
    assert_eq!(n, frame.len() as isize, "TAP write: {}", std::io::Error::last_os_error());
}

fn neigh(ip: Ipv4Addr) -> String {
    sh(&format!("ip neigh show {ip} dev mvbr-s1"))
}

/// Frames per second written into the TAP, `n` broadcast datagrams.
fn pps(fd: std::os::fd::RawFd, frame: &[u8], n: u32) -> f64 {
    let start = Instant::now();
    for _ in 0..n {
        write_frame(fd, frame);
    }
    f64::from(n) / start.elapsed().as_secs_f64()
}

#[test]
#[ignore = "started by its outer test inside a test namespace"]
fn inner_anti_spoofing() {
    inner();
    net::cleanup_stale().unwrap();
    let att = net::attach(&"nat:s1".parse().unwrap(), "vm-spoof", 0).unwrap();
    let (fd, tap, mac) = (att.tap_fd(), att.tap_name().to_string(), att.mac());
    // The lease was allocated at attach time, before any DHCP: the guard names it.
    let run_dir = env("MICROVM_RUN_DIR");
    let leases = std::fs::read_dir(&run_dir)
        .unwrap()
        .flatten()
        .map(|d| d.path().join("net/s1/leases"))
        .find(|p| p.exists())
        .expect("lease file");
    let leases = std::fs::read_to_string(leases).unwrap();
    let lease: Ipv4Addr = leases.split_whitespace().nth(1).unwrap().parse().unwrap();
    assert!(leases.starts_with(&net::MacAddr(mac).to_string()), "{leases}");
    let guard = sh("nft list table bridge microvm");
    assert!(guard.contains(&format!("\"{tap}\" . {lease}")), "{guard}");
    assert!(guard.contains(&format!("\"{tap}\" : jump check_lease")), "{guard}");

    // A neighbour's address, and a foreign MAC: the host must learn neither from this TAP.
    let other = Ipv4Addr::new(10, 200, 0, 77);
    let forged_mac = [0x52, 0x54, 0, 0xde, 0xad, 0x01];
    for _ in 0..3 {
        write_frame(fd, &arp_request(mac, mac, other)); // forged IP
        write_frame(fd, &arp_request(forged_mac, forged_mac, lease)); // forged MAC
        write_frame(fd, &arp_request(mac, forged_mac, lease)); // forged ARP sender MAC only
    }
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(neigh(other), "", "the host learnt a forged IP");
    assert_eq!(neigh(lease), "", "the host learnt a forged MAC");
    // The genuine sender is learnt: the path works, so the drops above are the guard's.
    write_frame(fd, &arp_request(mac, mac, lease));
    assert!(
        microvm_tests::netns::wait_until(5, || neigh(lease).contains(&net::MacAddr(mac).to_string())),
        "genuine ARP not learnt: {}",
        neigh(lease)
    );
    let counters = sh("nft list table bridge microvm");
    println!("{counters}");

    // A sealed TAP (one waiting in its network's pool, see tests/pool.rs) passes nothing,
    // genuine frames included.
    sh(&format!("nft add element bridge microvm guard_sealed '{{ \"{tap}\" }}'"));
    sh("ip neigh flush dev mvbr-s1");
    for _ in 0..3 {
        write_frame(fd, &arp_request(mac, mac, lease));
    }
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(neigh(lease), "", "a sealed TAP's frame passed");
    sh(&format!("nft delete element bridge microvm guard_sealed '{{ \"{tap}\" }}'"));

    // Cost: TAP -> bridge frames/s with the guard, then without it (same frames).
    let frame = udp_broadcast(mac, lease);
    let n = 100_000;
    let _ = pps(fd, &frame, 10_000);
    let with = pps(fd, &frame, n);
    sh(&format!("nft delete element bridge microvm guard_tap '{{ \"{tap}\" }}'"));
    let _ = pps(fd, &frame, 10_000);
    let without = pps(fd, &frame, n);
    let with2 = {
        sh(&format!("nft add element bridge microvm guard_tap '{{ \"{tap}\" : jump check_lease }}'"));
        pps(fd, &frame, n)
    };
    println!("MEASURE tap->bridge pps: with guard {with:.0} / {with2:.0}, without {without:.0}");

    att.release().unwrap();
    assert!(!sh("nft list table bridge microvm").contains(&format!("\"{tap}\"")), "guard left behind");
    assert!(!Path::new(&format!("/sys/class/net/{tap}")).exists(), "TAP left behind");
}

#[test]
fn stale_guard_cleanup() {
    microvm_tests::netns::outer();
    let host = Netns::new("sguard");
    let run = TempDir::new();
    host.run_inner("inner_stale_guard_cleanup", &[("MICROVM_RUN_DIR", run.str())]);
}

#[test]
#[ignore = "started by its outer test inside a test namespace"]
fn inner_stale_guard_cleanup() {
    inner();
    sh("ip link add name testbr0 type bridge");
    let att = net::attach(&"bridge=testbr0".parse().unwrap(), "vm-b", 0).unwrap();
    let tap = att.tap_name().to_string();
    let guarded = || sh("nft list table bridge microvm").contains(&format!("\"{tap}\""));
    let guard = sh("nft list table bridge microvm");
    assert!(guard.contains(&format!("\"{tap}\" : jump check_mac")), "bridge=: MAC only\n{guard}");
    assert!(!guard.contains(&format!("\"{tap}\" . 10.")), "bridge=: no address\n{guard}");
    // A crash: the TAP vanishes with the process, its guard stays behind...
    std::mem::forget(att);
    sh(&format!("ip link del {tap}"));
    assert!(guarded());
    // ... until the next start's stale cleanup.
    net::cleanup_stale().unwrap();
    assert!(!guarded(), "stale guard left behind");
    // Whatever is left under a name a new TAP takes is replaced, never inherited: a stale
    // MAC and address of "reused0" must not be allowed for the new guest on it.
    sh("nft add element bridge microvm guard_mac '{ \"reused0\" . 52:54:00:66:66:66 }'");
    sh("nft add element bridge microvm guard_ip '{ \"reused0\" . 10.99.0.9 }'");
    sh("nft add element bridge microvm guard_sealed '{ \"reused0\" }'");
    let att = net::attach(&"host-only:hs,tap=reused0".parse().unwrap(), "vm-r", 0).unwrap();
    let table = sh("nft list table bridge microvm");
    assert!(!table.contains("52:54:00:66:66:66") && !table.contains("10.99.0.9"), "stale elements inherited\n{table}");
    assert!(table.contains(&format!("\"reused0\" . {}", net::MacAddr(att.mac()))), "{table}");
    assert!(table.contains("\"reused0\" : jump check_lease"), "{table}");
    let sealed = table.split("set guard_sealed {").nth(1).and_then(|r| r.split('}').next()).unwrap_or("");
    assert!(!sealed.contains("reused0"), "a stale seal would cut the new guest off\n{table}");
    att.release().unwrap();
    assert!(!sh("nft list table bridge microvm").contains("reused0"), "guard left behind");
    net::teardown_all().unwrap();
    assert!(!try_sh("nft list table bridge microvm"));
    sh("ip link del testbr0");
}
