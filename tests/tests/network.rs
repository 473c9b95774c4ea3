//! Guest networking end to end, with real guests, inside namespaces each test creates
//! (see microvm_tests::world). Boots are expensive here, so one test runs five guests at
//! once: sharing (NAT), interconnection (same network), isolation (other network,
//! host-only), and bridged mode, then checks that nothing is left behind.

use std::time::Duration;

use microvm_tests::netns::{HOST_UPLINK_ADDR, INTERNET_ADDR};
use microvm_tests::payload::{write_elf, Asm};
use microvm_tests::scratch_dir;
use microvm_tests::world::World;

const BOOT_TIMEOUT: Duration = Duration::from_secs(600);

fn field<'a>(out: &'a str, key: &str) -> Option<&'a str> {
    out.lines().find_map(|l| l.trim().strip_prefix(key))
}

#[test]
fn guests_share_isolate_and_interconnect() {
    let world = World::new();
    // Bridged mode: a bridge the "admin" made, with its own DHCP server (busybox udhcpd).
    world.host.sh("ip link add brx type bridge && ip addr add 192.0.2.1/24 dev brx && ip link set brx up");
    let udhcpd = world.run_dir.path.join("udhcpd.conf");
    std::fs::write(
        &udhcpd,
        format!(
            "start 192.0.2.100\nend 192.0.2.120\ninterface brx\nlease_file {}\noption subnet 255.255.255.0\noption router 192.0.2.1\n",
            world.run_dir.path.join("udhcpd.leases").display()
        ),
    )
    .unwrap();
    std::fs::write(world.run_dir.path.join("udhcpd.leases"), "").unwrap();
    let mut udhcpd = std::process::Command::new("ip")
        .args(["netns", "exec", &world.host.name, "busybox", "udhcpd", "-f"])
        .arg(&udhcpd)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();

    // Guests start in waves of at most two booting at once (see Guest::wait_ready); after
    // boot they mostly wait on the network, which costs little.
    let lease = "echo LEASE=$(ip -4 -o addr show eth0 | awk '{print $4}')";
    let inet = format!(
        "timeout 10 wget -q -O - http://{INTERNET_ADDR}/hello.txt && timeout 10 wget -q -O - http://{INTERNET_ADDR}/cgi-bin/who"
    );
    // A and B share network t1; B serves TCP until A says quit. B attaches first, so its
    // lease is the pool's first address, 10.123.1.2 (a guest may only use its lease: extra
    // addresses are dropped by the anti-spoofing guard).
    let mut b = world.spawn_guest(
        "b",
        &["nat:t1,subnet=10.123.1.0/24"],
        "end=$(( $(cut -d. -f1 /proc/uptime) + 400 )); \
         while [ $(cut -d. -f1 /proc/uptime) -lt $end ]; do \
           m=$(echo TCP_FROM_B | nc -l -p 7000); echo GOT=$m; [ \"$m\" = quit ] && exit 0; done; exit 1",
    );
    assert!(b.wait_ready(BOOT_TIMEOUT), "guest b did not boot: {}", b.stderr_now());
    let mut a = world.spawn_guest(
        "a",
        &["nat:t1,subnet=10.123.1.0/24"],
        &format!(
            "{lease}; ping -c 1 -W 5 10.123.1.1 >/dev/null && echo GW_OK; {inet}; \
             for i in $(seq 120); do ping -c 1 -W 1 10.123.1.2 >/dev/null && break; sleep 1; done; \
             ping -c 2 -W 2 10.123.1.2 >/dev/null && echo PING_B_OK; \
             echo hello | nc -w 5 10.123.1.2 7000; \
             sleep 60; echo quit | nc -w 5 10.123.1.2 7000; exit 0"
        ),
    );
    // C is on another network: it must not reach B (it tries 12 times while B serves), but
    // has internet.
    let mut c = world.spawn_guest(
        "c",
        &["nat:t2,subnet=10.123.2.0/24"],
        &format!(
            "{lease}; {inet}; r=ISOLATED; for i in $(seq 12); do \
               if ping -c 1 -W 1 10.123.1.2 >/dev/null || echo x | nc -w 1 10.123.1.2 7000 >/dev/null; then r=REACHED_B; break; fi; \
               sleep 1; done; echo $r; exit 0"
        ),
    );
    assert!(a.wait_ready(BOOT_TIMEOUT), "guest a did not boot: {}", a.stderr_now());
    assert!(c.wait_ready(BOOT_TIMEOUT), "guest c did not boot: {}", c.stderr_now());
    // D is host-only: the host bridge yes, the internet no.
    let d = world.spawn_guest(
        "d",
        &["host-only:h1,subnet=10.123.3.0/24"],
        &format!(
            "{lease}; ping -c 1 -W 5 10.123.3.1 >/dev/null && echo GW_OK; \
             timeout 10 wget -q -O - http://{INTERNET_ADDR}/hello.txt || echo INET_BLOCKED; exit 0"
        ),
    );
    // E is bridged on brx and gets its address from the test's DHCP server there.
    let e = world.spawn_guest(
        "e",
        &["bridge=brx"],
        &format!("{lease}; ping -c 1 -W 5 192.0.2.1 >/dev/null && echo GW_OK; exit 0"),
    );

    let runs: Vec<_> = [a, b, c, d, e].into_iter().map(|g| (g.name.clone(), g.wait(BOOT_TIMEOUT))).collect();
    let _ = udhcpd.kill();
    let _ = udhcpd.wait();
    for (name, run) in &runs {
        println!("===== guest {name}: {run:?}");
    }
    let get = |n: &str| &runs.iter().find(|(name, _)| name == n).unwrap().1;
    let (a, b, c, d, e) = (get("a"), get("b"), get("c"), get("d"), get("e"));
    for (name, run) in &runs {
        assert_eq!(run.code(), 0, "guest {name} failed: {run:?}");
    }
    // NAT: a lease in the subnet, the gateway, the internet through the host's address.
    assert!(field(&a.stdout, "LEASE=").is_some_and(|l| l.starts_with("10.123.1.") && l.ends_with("/24")), "{a:?}");
    assert!(a.stdout.contains("GW_OK") && a.stdout.contains("hello-internet"), "{a:?}");
    assert!(a.stdout.contains(&format!("REMOTE={HOST_UPLINK_ADDR}")), "server saw a non-masqueraded source: {a:?}");
    // Same network: ping and TCP both ways.
    assert!(a.stdout.contains("PING_B_OK") && a.stdout.contains("TCP_FROM_B"), "{a:?}");
    assert!(b.stdout.contains("GOT=hello") && b.stdout.contains("GOT=quit"), "{b:?}");
    // Other network: isolated from t1, but online.
    assert!(field(&c.stdout, "LEASE=").is_some_and(|l| l.starts_with("10.123.2.")), "{c:?}");
    assert!(c.stdout.contains("hello-internet"), "{c:?}");
    assert!(c.stdout.contains("ISOLATED") && !c.stdout.contains("REACHED_B"), "{c:?}");
    // Host-only.
    assert!(field(&d.stdout, "LEASE=").is_some_and(|l| l.starts_with("10.123.3.")), "{d:?}");
    assert!(d.stdout.contains("GW_OK") && d.stdout.contains("INET_BLOCKED"), "{d:?}");
    assert!(!d.stdout.contains("hello-internet"), "{d:?}");
    // Bridged: the address came from the test's own DHCP server.
    assert!(field(&e.stdout, "LEASE=").is_some_and(|l| l.starts_with("192.0.2.1")), "{e:?}");
    assert!(e.stdout.contains("GW_OK"), "{e:?}");

    // Nothing of microvm's is left; the admin's bridge is untouched (and has no ports left).
    assert_eq!(world.leftovers(), Vec::<String>::new());
    assert!(world.host.try_sh("ip link show dev brx"));
    assert_eq!(world.host.sh("ip -o link show master brx").trim(), "");
}

/// Fetches http://ip:8080/big (retrying until the guest serves it) and returns the receive
/// rate in bytes/s, measured from 1 s after the first byte to EOF (skipping the token
/// bucket's initial burst). `started` is signalled once data flows.
fn fetch_rate(ip: String, started: std::sync::mpsc::Sender<()>) -> f64 {
    use std::io::{Read, Write};
    use std::time::Instant;
    let deadline = Instant::now() + BOOT_TIMEOUT;
    let addr: std::net::SocketAddr = format!("{ip}:8080").parse().expect("address");
    let mut conn = loop {
        match std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
            Ok(c) => break c,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_secs(1)),
            Err(e) => panic!("guest {ip} never served: {e}"),
        }
    };
    conn.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    conn.write_all(b"GET /big HTTP/1.0\r\n\r\n").unwrap();
    let mut buf = vec![0u8; 1 << 16];
    let (mut total, mut first, mut mark) = (0u64, None::<Instant>, None::<(Instant, u64)>);
    loop {
        let n = conn.read(&mut buf).expect("read");
        let now = Instant::now();
        if n == 0 {
            let (t0, b0) = mark.expect("transfer shorter than one second");
            return (total - b0) as f64 / now.duration_since(t0).as_secs_f64();
        }
        total += n as u64;
        let f = *first.get_or_insert_with(|| {
            let _ = started.send(());
            now
        });
        if mark.is_none() && now.duration_since(f) >= Duration::from_secs(1) {
            mark = Some((now, total));
        }
    }
}

/// Rate limit: a NIC limited to 320 kbit/s (40,000 B/s) sends a bulk transfer within ±15%
/// of that; an unlimited NIC on the same network, sending at the same time, is not held
/// back by it. The guests serve a file with busybox httpd (sendfile, TSO frames); the test
/// fetches from the host side and measures there. (On nested PVM hosts a guest's emulated
/// kernel sends at most ~200 KB/s, so the limit is set well below that.)
#[test]
fn rate_limit_holds_and_neighbour_is_unaffected() {
    let world = World::new();
    // Each guest serves on its DHCP lease (the only address it may use) and prints it.
    let serve = "mkdir -p /tmp/www && dd if=/dev/zero of=/tmp/www/big bs=64k count=16 2>/dev/null && \
                 echo LEASE=$(ip -4 -o addr show eth0 | awk '{print $4}' | cut -d/ -f1) && exec httpd -f -p 8080 -h /tmp/www";
    let mut limited = world.spawn_guest("limited", &["nat:r1,subnet=10.123.9.0/24,rate=320kbit"], serve);
    let mut free = world.spawn_guest("free", &["nat:r1,subnet=10.123.9.0/24"], serve);
    let lease_of = |g: &mut microvm_tests::world::Guest| {
        assert!(g.wait_ready(BOOT_TIMEOUT), "guest did not boot: {}", g.stderr_now());
        let ok = microvm_tests::netns::wait_until(120, || field(&g.stdout_now(), "LEASE=").is_some_and(|l| !l.is_empty()));
        assert!(ok, "no lease printed: {}", g.stdout_now());
        field(&g.stdout_now(), "LEASE=").unwrap().to_string()
    };
    let (limited_ip, free_ip) = (lease_of(&mut limited), lease_of(&mut free));
    // The unlimited transfer starts only once the limited one is flowing, so they overlap.
    let (tx, rx) = std::sync::mpsc::channel();
    let limited_rate = world.host.spawn_in(move || fetch_rate(limited_ip, tx));
    rx.recv_timeout(BOOT_TIMEOUT).expect("limited transfer never started");
    let (tx2, _rx2) = std::sync::mpsc::channel();
    let free_rate = world.host.spawn_in(move || fetch_rate(free_ip, tx2));
    let (lr, fr) = (limited_rate.join().expect("limited fetch"), free_rate.join().expect("free fetch"));
    // The guests serve forever: stop them (SIGTERM tears their NICs down).
    for g in [&limited, &free] {
        // SAFETY: kill(2) on our child.
        unsafe { libc::kill(g.child.id() as i32, libc::SIGTERM) };
    }
    let (limited, free) = (limited.wait(Duration::from_secs(30)), free.wait(Duration::from_secs(30)));
    println!("limited NIC: {lr:.0} B/s (limit 40000), unlimited NIC: {fr:.0} B/s");
    assert!((34_000.0..=46_000.0).contains(&lr), "limited NIC ran at {lr:.0} B/s: {limited:?}");
    assert!(fr > 2.0 * 40_000.0, "unlimited NIC ran at {fr:.0} B/s only: {free:?}");
    assert_eq!(limited.code(), 128 + libc::SIGTERM, "{limited:?}");
    assert_eq!(world.leftovers(), Vec::<String>::new());
}

/// Guest-to-host policy and anti-spoofing with real guests. M (mallory) has two NICs: one
/// on the default-policy network sp, shared with V (victim), one on an `allow-host` network.
/// M finds a host service on 0.0.0.0 closed through sp and open through the allow-host
/// network, cannot reach the link-local "metadata" address (which the host reaches), then
/// takes V's address and MAC and announces them with gratuitous ARP: the host still maps
/// V's address to V's MAC and still reaches V's service.
#[test]
fn guests_cannot_reach_the_host_or_take_a_neighbours_address() {
    use std::io::{Read, Write};
    let world = World::new();
    world.inet.sh("ip addr add 169.254.169.254/32 dev lo && ip link set lo up");
    assert!(world.host.try_sh("busybox ping -c 1 -W 5 169.254.169.254"), "the host must reach the metadata address");
    let listener = world.host.spawn_in(|| std::net::TcpListener::bind("0.0.0.0:7777").expect("bind")).join().unwrap();
    std::thread::spawn(move || {
        for mut c in listener.incoming().flatten() {
            let _ = c.write_all(b"HOST_SERVICE\n");
        }
    });
    let (v_mac, m_mac) = ("52:54:00:00:05:0a", "52:54:00:00:05:0b");
    // V attaches first: its lease is the pool's first address, .2.
    let v_ip = "10.123.5.2";
    let mut v = world.spawn_guest(
        "v",
        &[&format!("nat:sp,subnet=10.123.5.0/24,mac={v_mac}")],
        "echo LEASE=$(ip -4 -o addr show eth0 | awk '{print $4}'); \
         while true; do echo FROM_V | nc -l -p 7000 >/dev/null; done",
    );
    assert!(v.wait_ready(BOOT_TIMEOUT), "guest v did not boot: {}", v.stderr_now());
    let m = world.spawn_guest(
        "m",
        &[&format!("nat:sp,subnet=10.123.5.0/24,mac={m_mac}"), "host-only:ah,subnet=10.123.6.0/24,allow-host"],
        &format!(
            "echo LEASE=$(ip -4 -o addr show eth0 | awk '{{print $4}}'); \
             r=$(nc -w 5 10.123.5.1 7777 </dev/null); echo \"DEFAULT_NET=${{r:-CLOSED}}\"; \
             ping -c 1 -W 3 10.123.5.1 >/dev/null && echo GW_PING_OK; \
             timeout 10 wget -q -O - http://{INTERNET_ADDR}/hello.txt; \
             ping -c 2 -W 3 169.254.169.254 >/dev/null && echo META_REACHED || echo META_BLOCKED; \
             ip link set eth1 up; udhcpc -i eth1 -q -n -t 10 -T 1 -s /etc/udhcpc.script >/dev/null 2>&1; \
             echo LEASE1=$(ip -4 -o addr show eth1 | awk '{{print $4}}'); \
             r=$(nc -w 5 10.123.6.1 7777 </dev/null); echo \"ALLOW_HOST_NET=${{r:-CLOSED}}\"; \
             ip addr flush dev eth0; ip addr add {v_ip}/24 dev eth0; \
             arping -U -c 3 -I eth0 {v_ip}; arping -A -c 3 -I eth0 {v_ip}; \
             ip link set eth0 down; ip link set eth0 address {v_mac}; ip link set eth0 up; \
             arping -U -c 3 -I eth0 {v_ip}; arping -A -c 3 -I eth0 {v_ip}; ping -c 3 -W 1 10.123.5.1 >/dev/null; \
             echo SPOOF_DONE; sleep 60; exit 0"
        ),
    );
    let mut m = m;
    assert!(m.wait_ready(BOOT_TIMEOUT), "guest m did not boot: {}", m.stderr_now());
    let spoofed = microvm_tests::netns::wait_until(300, || m.stdout_now().contains("SPOOF_DONE"));
    assert!(spoofed, "m never finished spoofing: {}", m.stdout_now());
    // The host still maps V's address to V, and reaches V's service there.
    let reach_v = || {
        world
            .host
            .spawn_in(move || {
                let addr: std::net::SocketAddr = format!("{v_ip}:7000").parse().unwrap();
                let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5)).ok()?;
                s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
                let mut buf = String::new();
                s.read_to_string(&mut buf).ok()?;
                Some(buf)
            })
            .join()
            .unwrap()
    };
    let got = reach_v();
    let neigh = world.host.sh(&format!("ip neigh show {v_ip} dev mvbr-sp"));
    assert!(got.as_deref().is_some_and(|b| b.contains("FROM_V")), "host -> V after M's spoofing: {got:?}");
    assert!(neigh.contains(v_mac) && !neigh.contains(m_mac), "host ARP entry for V: {neigh}");
    let m = m.wait(BOOT_TIMEOUT);
    // SAFETY: kill(2) on our child.
    unsafe { libc::kill(v.child.id() as i32, libc::SIGTERM) };
    let v = v.wait(Duration::from_secs(30));
    println!("===== m: {m:?}\n===== v: {v:?}");
    assert_eq!(m.code(), 0, "{m:?}");
    assert!(field(&v.stdout, "LEASE=") == Some("10.123.5.2/24"), "{v:?}");
    assert!(field(&m.stdout, "LEASE=").is_some_and(|l| l.starts_with("10.123.5.")), "{m:?}");
    assert!(field(&m.stdout, "LEASE1=").is_some_and(|l| l.starts_with("10.123.6.")), "{m:?}");
    assert_eq!(field(&m.stdout, "DEFAULT_NET="), Some("CLOSED"), "host service open to a guest: {m:?}");
    assert_eq!(field(&m.stdout, "ALLOW_HOST_NET="), Some("HOST_SERVICE"), "allow-host: {m:?}");
    assert!(m.stdout.contains("GW_PING_OK") && m.stdout.contains("hello-internet"), "{m:?}");
    assert!(m.stdout.contains("META_BLOCKED") && !m.stdout.contains("META_REACHED"), "{m:?}");
    assert_eq!(world.leftovers(), Vec::<String>::new());
}

fn payload(name: &str, asm: Asm) -> String {
    let p = scratch_dir(name).join("k.elf");
    write_elf(&p, &asm.code);
    p.display().to_string()
}

fn args(kernel: &str, extra: &[&str]) -> Vec<String> {
    std::iter::once("--kernel").chain(std::iter::once(kernel)).chain(extra.iter().copied()).map(String::from).collect()
}

/// A SIGKILLed microvm leaves its network behind; the next microvm start cleans it up.
#[test]
fn killed_vm_network_is_cleaned_on_next_start() {
    let world = World::new();
    let forever = payload("k9-forever", Asm::default().halt());
    let quick = payload("k9-quick", Asm::default().exit(0).halt());
    let g = world.spawn("k9", &args(&forever, &["--net", "nat:k9"]), scratch_dir("k9"));
    let up = microvm_tests::netns::wait_until(30, || world.host.try_sh("ip link show dev mvbr-k9"));
    assert!(up, "network never came up: {}", g.stderr_now());
    // SAFETY: kill(2) on our child (the `ip netns exec` execs microvm itself).
    unsafe { libc::kill(g.child.id() as i32, libc::SIGKILL) };
    let _ = g.wait(Duration::from_secs(10));
    assert!(world.leftovers().iter().any(|l| l == "mvbr-k9"), "nothing was left to clean: {:?}", world.leftovers());
    let r = world.run("k9-next", &args(&quick, &["--net", "nat:other"]), Duration::from_secs(60));
    assert_eq!(r.code(), 0, "{r:?}");
    assert_eq!(world.leftovers(), Vec::<String>::new());
}

/// SIGTERM while running: the TAP and network are torn down before microvm exits.
#[test]
fn sigterm_tears_the_network_down() {
    let world = World::new();
    let forever = payload("term-forever", Asm::default().halt());
    let g = world.spawn("term", &args(&forever, &["--net", "nat:term", "--net", "host-only:term2"]), scratch_dir("term"));
    // The second NIC's bridge exists a moment before its TAP: wait for both TAPs.
    let taps = || world.leftovers().iter().filter(|l| l.starts_with("mvtap-")).count();
    let up = microvm_tests::netns::wait_until(30, || taps() == 2);
    assert!(up, "network never came up: {}", g.stderr_now());
    // SAFETY: kill(2) on our child.
    unsafe { libc::kill(g.child.id() as i32, libc::SIGTERM) };
    let r = g.wait(Duration::from_secs(30));
    assert_eq!(r.code(), 128 + libc::SIGTERM, "{r:?}");
    assert_eq!(world.leftovers(), Vec::<String>::new());
}

/// A panic in a helper thread ends microvm with exit 1, after tearing its TAPs, bridges,
/// nft table and network state down. The panic comes from the DHCP server thread on the
/// first packet it receives, forced by MICROVM_TEST_PANIC=dhcp (debug builds only; the
/// tests build microvm in debug mode).
#[test]
fn helper_thread_panic_tears_the_network_down() {
    use std::os::unix::fs::MetadataExt;
    let world = World::new();
    let forever = payload("pn-forever", Asm::default().halt());
    let nets = ["--net", "nat:pn", "--net", "host-only:pn2"];
    let g = world.spawn_env("pn", &args(&forever, &nets), scratch_dir("pn"), &[("MICROVM_TEST_PANIC", "dhcp")]);
    let taps = || world.leftovers().iter().filter(|l| l.starts_with("mvtap-")).count();
    let up = microvm_tests::netns::wait_until(30, || taps() == 2);
    assert!(up, "network never came up: {}", g.stderr_now());
    let ino = std::fs::metadata(format!("/var/run/netns/{}", world.host.name)).unwrap().ino();
    let state = world.run_dir.path.join(ino.to_string()).join("net");
    assert!(state.join("pn").exists() && state.join("pn2").exists(), "state not where expected");

    // Something on network pn asks for an address.
    let peer = microvm_tests::netns::Netns::new("pnpeer");
    world.host.sh(&format!(
        "ip link add pv0 type veth peer name pv1 netns {} && ip link set pv0 master mvbr-pn && ip link set pv0 up",
        peer.name
    ));
    peer.sh("ip link set pv1 up");
    let _ = peer.try_sh("busybox udhcpc -i pv1 -n -q -t 2 -T 1");
    let r = g.wait(Duration::from_secs(30));
    assert_eq!(r.code(), 1, "{r:?}");
    assert!(r.stderr.contains("test-triggered panic"), "{r:?}");
    assert_eq!(world.leftovers(), Vec::<String>::new());
    assert!(!state.join("pn").exists() && !state.join("pn2").exists(), "network state left behind");
}

/// A panic the net crate contains (a decoder fed a hostile packet; forced here with the
/// debug-build-only MICROVM_TEST_PANIC=dhcp-contained) is not fatal: microvm logs it once
/// per interval and keeps running, and still tears down normally afterwards.
#[test]
fn contained_decoder_panic_is_not_fatal() {
    let world = World::new();
    let forever = payload("cp-forever", Asm::default().halt());
    let g = world.spawn_env("cp", &args(&forever, &["--net", "host-only:cp"]), scratch_dir("cp"), &[("MICROVM_TEST_PANIC", "dhcp-contained")]);
    let up = microvm_tests::netns::wait_until(30, || world.leftovers().iter().any(|l| l.starts_with("mvtap-")));
    assert!(up, "network never came up: {}", g.stderr_now());
    let peer = microvm_tests::netns::Netns::new("cppeer");
    world.host.sh(&format!(
        "ip link add pv0 type veth peer name pv1 netns {} && ip link set pv0 master mvbr-cp && ip link set pv0 up",
        peer.name
    ));
    peer.sh("ip link set pv1 up");
    // Several DISCOVERs, each a contained panic.
    let _ = peer.try_sh("busybox udhcpc -i pv1 -n -q -t 3 -T 1");
    let logged = microvm_tests::netns::wait_until(10, || g.stderr_now().contains("DHCP decoder panicked"));
    assert!(logged, "{}", g.stderr_now());
    std::thread::sleep(Duration::from_millis(500));
    let stderr = g.stderr_now();
    assert_eq!(stderr.matches("DHCP decoder panicked").count(), 1, "rate-limited to one line: {stderr}");
    assert!(!stderr.contains("panicked at"), "the hook must not report a contained panic: {stderr}");
    assert!(world.leftovers().iter().any(|l| l == "mvbr-cp"), "microvm died: {stderr}");
    // SAFETY: kill(2) on our child.
    unsafe { libc::kill(g.child.id() as i32, libc::SIGTERM) };
    let r = g.wait(Duration::from_secs(30));
    assert_eq!(r.code(), 128 + libc::SIGTERM, "{r:?}");
    assert_eq!(world.leftovers(), Vec::<String>::new());
}

/// Bad --net input: one line, exit 2, nothing left behind.
#[test]
fn bad_net_input_exits_2_and_leaves_nothing() {
    let world = World::new();
    let k = payload("badnet", Asm::default().exit(0).halt());
    let cases: &[(&[&str], &str)] = &[
        (&["--net", "carrier-pigeon"], "carrier-pigeon"),
        (&["--net", "nat,mac=zz:00:00:00:00:01"], "zz:00:00:00:00:01"),
        (&["--net", "bridge=nosuchbr0"], "nosuchbr0"),
        (&["--net", "nat:clash,subnet=198.51.100.0/24"], "collides"),
        // A good NIC first, then a bad one: the first must be undone.
        (&["--net", "nat:ok1", "--net", "bridge=nosuchbr1"], "nosuchbr1"),
    ];
    for (extra, needle) in cases {
        let r = world.run("badnet-case", &args(&k, extra), Duration::from_secs(60));
        assert_eq!(r.code(), 2, "{extra:?}: {r:?}");
        let lines: Vec<&str> = r.stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        assert!(lines.len() == 1 && lines[0].contains(needle), "{extra:?}: want one line with '{needle}': {r:?}");
        assert_eq!(world.leftovers(), Vec::<String>::new(), "{extra:?} left things behind");
    }
    // Without CAP_NET_ADMIN (root, but the capability dropped from the bounding set).
    let mut a = vec!["--bounding-set".to_string(), "-net_admin".into(), microvm_tests::microvm_bin().display().to_string()];
    a.extend(args(&k, &["--net", "nat"]));
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", &world.host.name, "setpriv"])
        .args(&a)
        .env("MICROVM_RUN_DIR", &world.run_dir.path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("CAP_NET_ADMIN") || stderr.contains("root"), "{stderr}");
    assert_eq!(world.leftovers(), Vec::<String>::new());
}

/// A snapshot of a guest on a NAT network: each restore gets a new TAP on the network, the
/// guest keeps its MAC and its DHCP address, and reaches the "internet" through NAT. The
/// guest was booted while another VM held the network's first address, so its address is
/// the second: a restore onto the network created anew asks for that address again and gets
/// it, though the first is free then; where a live VM holds it, the guest gets another and
/// its init configures the network again. A second restore of the same snapshot while the
/// first runs would put one MAC twice on the bridge: it is refused (exit 2, one line) and
/// the first keeps working. Nothing is left behind.
#[test]
fn restored_guest_keeps_its_lease_and_nat() {
    let world = World::new();
    let dir = scratch_dir("net-snapshot");
    let (kernel, root) = microvm_tests::guest_with_own_rootfs(&dir);
    let snap = dir.join("snap");
    let s = |p: &std::path::Path| p.display().to_string();
    let taps = || world.leftovers().into_iter().filter(|l| l.starts_with("mvtap-")).collect::<Vec<_>>();
    let halt = payload("sn-holder", Asm::default().halt());
    let hold = |name: &str, n: usize| {
        let holder = world.spawn(name, &args(&halt, &["--net", "nat:sn,subnet=10.123.11.0/24"]), scratch_dir(name));
        assert!(microvm_tests::netns::wait_until(30, || taps().len() == n), "holder not on sn: {}", holder.stderr_now());
        holder
    };
    let stop = |holder: microvm_tests::world::Guest| {
        // SAFETY: kill(2) on our child.
        unsafe { libc::kill(holder.child.id() as i32, libc::SIGTERM) };
        let h = holder.wait(Duration::from_secs(30));
        assert_eq!(h.code(), 128 + libc::SIGTERM, "{h:?}");
    };
    let first_holder = hold("sn-hold0", 1);
    let boot = world.run(
        "snap-boot",
        &[
            "--kernel".into(), s(&kernel),
            "--disk".into(), format!("{},snapshot", s(&root)),
            "--cmdline".into(), "quiet".into(),
            "--net".into(), "nat:sn,subnet=10.123.11.0/24".into(),
            "--snapshot-to".into(), s(&snap),
        ],
        BOOT_TIMEOUT,
    );
    assert_eq!(boot.code(), 0, "{boot:?}");
    stop(first_holder);
    assert_eq!(world.leftovers(), Vec::<String>::new(), "the network goes with its last VM");
    let restore_args = |cmd: &str| -> Vec<String> {
        vec!["--restore".into(), s(&snap), "--".into(), "sh".into(), "-c".into(), cmd.into()]
    };
    let probe = format!(
        "{} check ADDR \"ip -4 -o addr show eth0 | awk '{{print \\$4}}'\"; \
         check MAC cat /sys/class/net/eth0/address; \
         check FETCH timeout 20 wget -q -O - http://{INTERNET_ADDR}/hello.txt",
        microvm_tests::SH_CHECK
    );
    let first = world.run("snap-r1", &restore_args(&probe), BOOT_TIMEOUT);
    assert_eq!(first.code(), 0, "{first:?}");
    let addr = field(&first.stdout, "ADDR=").map(str::to_string);
    assert_eq!(addr.as_deref(), Some("10.123.11.3/24"), "not the snapshot's address: {first:?}");
    assert!(first.stdout.contains("FETCH=hello-internet"), "no NAT after restore: {first:?}");

    // The first restore holds the network; the second is refused, the first carries on.
    let long = world.spawn("snap-r2", &restore_args(&format!("sleep 15; {probe}")), scratch_dir("net-snapshot-r2"));
    std::thread::sleep(Duration::from_secs(5));
    let second = world.run("snap-r3", &restore_args("echo SHOULD_NOT_RUN"), BOOT_TIMEOUT);
    assert_eq!(second.code(), 2, "{second:?}");
    assert!(second.stderr.contains("already in use on network sn"), "{second:?}");
    assert!(!second.stdout.contains("SHOULD_NOT_RUN"), "{second:?}");
    let long = long.wait(BOOT_TIMEOUT);
    assert_eq!(long.code(), 0, "{long:?}");
    assert_eq!(field(&long.stdout, "ADDR="), addr.as_deref(), "{long:?}");
    assert_eq!(field(&long.stdout, "MAC="), field(&first.stdout, "MAC="), "{long:?}");
    assert!(long.stdout.contains("FETCH=hello-internet"), "{long:?}");
    assert_eq!(world.leftovers(), Vec::<String>::new());

    // While another VM holds the network, a VM leaving it leaves its TAP in the network's
    // pool, and the next VM to join takes it: the lease, NAT and the anti-spoofing guard
    // work through a reused TAP. The holder creates the network anew and takes its first
    // address; the restored VM still gets the snapshot's.
    let tap_of = |r: &microvm_tests::Run| {
        r.stderr.split("eth0: TAP ").nth(1).and_then(|t| t.split_whitespace().next()).map(str::to_string)
    };
    let holder = hold("sn-hold", 1);
    let fourth = world.spawn("snap-r4", &restore_args(&format!("sleep 10; {probe}")), scratch_dir("net-snapshot-r4"));
    assert!(microvm_tests::netns::wait_until(30, || taps().len() == 2), "r4 not on sn: {}", fourth.stderr_now());
    let fourth = fourth.wait(BOOT_TIMEOUT);
    assert_eq!(fourth.code(), 0, "{fourth:?}");
    let pooled = tap_of(&fourth).expect("no TAP line");
    assert!(taps().contains(&pooled), "the leaving VM's TAP stays, pooled: {:?}", world.leftovers());
    let fifth = world.run("snap-r5", &restore_args(&probe), BOOT_TIMEOUT);
    assert_eq!(fifth.code(), 0, "{fifth:?}");
    assert_eq!(tap_of(&fifth).as_deref(), Some(pooled.as_str()), "the pooled TAP is reused: {fifth:?}");
    for r in [&fourth, &fifth] {
        assert_eq!(field(&r.stdout, "ADDR="), addr.as_deref(), "{r:?}");
        assert!(r.stdout.contains("FETCH=hello-internet"), "{r:?}");
    }
    stop(holder);
    assert_eq!(world.leftovers(), Vec::<String>::new(), "the last VM's exit takes the pool with the network");

    // The network created anew by two other VMs, which take its first two addresses: the
    // snapshot's is held by a live VM. The restore gets the next one, says so, and the
    // guest's init configures the network again before the command, so NAT works.
    let a = hold("sn-hold-a", 1);
    let b = hold("sn-hold-b", 2);
    let moved = world.run("snap-r6", &restore_args(&probe), BOOT_TIMEOUT);
    assert_eq!(moved.code(), 0, "{moved:?}");
    assert!(
        moved.stderr.contains("the guest's address 10.123.11.3 is held by another VM on network sn"),
        "{moved:?}"
    );
    assert_eq!(field(&moved.stdout, "ADDR="), Some("10.123.11.4/24"), "{moved:?}");
    assert!(moved.stdout.contains("FETCH=hello-internet"), "{moved:?}");
    stop(a);
    stop(b);
    assert_eq!(world.leftovers(), Vec::<String>::new());
    std::fs::remove_dir_all(&dir).unwrap();
}
