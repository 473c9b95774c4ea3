//! Networks across hosts with real guests: three namespaces stand in for hosts A, B, C on
//! an underlay (see `World::hosts`). Overlay `lab` is VNI 4242 on A and B (one definition
//! file they share) and VNI 4343 on C (same name and subnet: only the VNI keeps them apart).
//! Boots are expensive, so four boots check it all:
//! 1. M boots on A: an address derived from its MAC; NAT through A's uplink.
//! 2. G boots on A and waits for M, which 3. boots on B with the same disk: same address,
//!    NAT through B's uplink; G and M ping each other and talk TCP across the hosts.
//! 4. C boots on host C meanwhile and reaches neither.
//!
//! Then nothing of microvm's is left on any host.
//!
//! Not covered here: VLANs (`bridge=BR,vlan=N`), because this host's kernel lacks bridge
//! VLAN filtering (CONFIG_BRIDGE_VLAN_FILTERING); net/tests/overlay.rs checks the refusal.

use std::path::Path;
use std::time::Duration;

use microvm_tests::world::{Guest, World};
use microvm_tests::{guest_with_own_rootfs, scratch_dir};

/// Generous: on this shared 2-core host a loaded guest takes many minutes.
const BOOT_TIMEOUT: Duration = Duration::from_secs(1500);

fn field<'a>(out: &'a str, key: &str) -> Option<&'a str> {
    out.lines().find_map(|l| l.trim().strip_prefix(key))
}

/// `LEASE=a.b.c.d` (without the prefix length) printed by `LEASE` below.
fn lease(out: &str) -> String {
    let l = field(out, "LEASE=").unwrap_or_else(|| panic!("no lease printed: {out}"));
    assert!(l.starts_with("10.77.0.") && l.ends_with("/24"), "{out}");
    l.trim_end_matches("/24").to_string()
}

const LEASE: &str = "check LEASE 'ip -4 -o addr show eth0 | awk \"{print \\$4}\"'; ";
const WHO: &str = "check WHO 'timeout 10 wget -q -O - http://198.51.100.1/cgi-bin/who'; ";

fn definition(dir: &Path, vni: u32) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(
        dir.join("lab.toml"),
        format!(
            "vni = {vni}\nsubnet = \"10.77.0.0/24\"\npeers = [\"192.0.2.11\", \"192.0.2.12\", \"192.0.2.13\"]\ndev = \"ul0\"\n"
        ),
    )
    .unwrap();
}

#[test]
fn guest_overlay_spans_hosts() {
    let world = World::hosts(3);
    let defs = world.run_dir.path.join("networks");
    let (ab, c) = (defs.join("ab"), defs.join("c"));
    definition(&ab, 4242);
    definition(&c, 4343);
    let (ab, c) = (ab.display().to_string(), c.display().to_string());
    let env_ab = [("MICROVM_NETWORKS_DIR", ab.as_str())];
    let disk_dir = scratch_dir("ov-m-disk");
    let (kernel, m_disk) = guest_with_own_rootfs(&disk_dir);
    let spawn = |host: usize, name: &str, disk: &Path, envs: &[(&str, &str)], script: String| -> Guest {
        world.spawn_guest_disk(host, name, &kernel, disk, scratch_dir(&format!("ov-{name}")), &["nat:lab"], &script, envs)
    };

    // 1. M on A.
    let m1 = spawn(0, "m1", &m_disk, &env_ab, format!("{LEASE}{WHO}check MTU cat /sys/class/net/eth0/mtu; exit 0")).wait(BOOT_TIMEOUT);
    println!("===== m1 (host A): {m1:?}");
    assert_eq!(m1.code(), 0, "{m1:?}");
    let m_ip = lease(&m1.stdout);
    assert!(m1.stdout.contains("WHO=REMOTE=198.51.100.2"), "NAT through A's uplink: {m1:?}");
    // The overlay's MTU (the underlay's 1500 less VXLAN's 50) reached the guest by DHCP.
    assert!(m1.stdout.contains("MTU=1450"), "{m1:?}");

    // 2. G on A: serves TCP for M, then waits for M to come back (on B) and talks to it.
    let g_dir = scratch_dir("ov-g-disk");
    let (_, g_disk) = guest_with_own_rootfs(&g_dir);
    let mut g = spawn(
        0,
        "g",
        &g_disk,
        &env_ab,
        format!(
            "{LEASE}(echo TCP_FROM_G | nc -l -p 7000 > /tmp/got) & \
             i=0; while [ $i -lt 900 ]; do ping -c 1 -W 1 {m_ip} >/dev/null && break; sleep 1; i=$((i+1)); done; \
             check PING_M 'ping -c 2 -W 2 {m_ip} >/dev/null && echo OK'; \
             i=0; r=; while [ $i -lt 120 ]; do r=$(echo hi-from-g | nc -w 5 {m_ip} 7002); [ \"$r\" = FROM_M ] && break; sleep 1; i=$((i+1)); done; echo FROM_M=$r; \
             i=0; while [ $i -lt 300 ] && [ ! -s /tmp/got ]; do sleep 1; i=$((i+1)); done; check GOT 'cat /tmp/got'; sleep 20; exit 0"
        ),
    );
    assert!(g.wait_ready(BOOT_TIMEOUT), "g did not boot: {}", g.stderr_now());
    let leased = microvm_tests::netns::wait_until(120, || field(&g.stdout_now(), "LEASE=").is_some());
    assert!(leased, "g printed no lease: {}", g.stdout_now());
    let g_ip = lease(&g.stdout_now());
    assert_ne!(g_ip, m_ip);

    // 3. M again, on B, same disk. 4. C on host C, another VNI, meanwhile.
    let m2 = spawn(
        1,
        "m2",
        &m_disk,
        &env_ab,
        format!(
            "{LEASE}{WHO}(i=0; while [ $i -lt 300 ]; do echo FROM_M | nc -l -p 7002 >> /tmp/g7002; i=$((i+1)); done) & \
             i=0; while [ $i -lt 300 ]; do ping -c 1 -W 1 {g_ip} >/dev/null && break; sleep 1; i=$((i+1)); done; \
             check PING_G 'ping -c 2 -W 2 {g_ip} >/dev/null && echo OK'; \
             check TCP_G 'echo hello-from-m | nc -w 5 {g_ip} 7000'; \
             check GW 'ping -c 1 -W 2 10.77.0.1 >/dev/null && echo OK'; \
             i=0; while [ $i -lt 300 ] && ! grep -q hi-from-g /tmp/g7002 2>/dev/null; do sleep 1; i=$((i+1)); done; \
             check GOT7002 'cat /tmp/g7002'; exit 0"
        ),
    );
    let c_disk_dir = scratch_dir("ov-c-disk");
    let (_, c_disk) = guest_with_own_rootfs(&c_disk_dir);
    let cguest = spawn(
        2,
        "c",
        &c_disk,
        &[("MICROVM_NETWORKS_DIR", c.as_str())],
        format!(
            "{LEASE}r=ISOLATED; i=0; while [ $i -lt 40 ]; do \
               if ping -c 1 -W 1 {g_ip} >/dev/null || ping -c 1 -W 1 {m_ip} >/dev/null; then r=REACHED; break; fi; sleep 1; i=$((i+1)); done; \
             echo $r; exit 0"
        ),
    );
    let (m2, cguest, g) = (m2.wait(BOOT_TIMEOUT), cguest.wait(BOOT_TIMEOUT), g.wait(BOOT_TIMEOUT));
    for (name, run) in [("g (A)", &g), ("m2 (B)", &m2), ("c (C)", &cguest)] {
        println!("===== {name}: {run:?}");
    }
    for run in [&g, &m2, &cguest] {
        assert_eq!(run.code(), 0, "{run:?}");
    }
    // The moved VM kept its address, and its NAT now leaves through B.
    assert_eq!(lease(&m2.stdout), m_ip, "{m2:?}");
    assert!(m2.stdout.contains("WHO=REMOTE=198.51.100.3"), "NAT through B's uplink: {m2:?}");
    assert!(m2.stdout.contains("GW=OK"), "B's own gateway: {m2:?}");
    // Across the hosts: ping and TCP both ways.
    assert!(m2.stdout.contains("PING_G=OK") && m2.stdout.contains("TCP_G=TCP_FROM_G"), "{m2:?}");
    assert!(g.stdout.contains("PING_M=OK") && g.stdout.contains("FROM_M=FROM_M") && g.stdout.contains("GOT=hello-from-m"), "{g:?}");
    assert!(field(&m2.stdout, "GOT7002=").is_some_and(|v| v.contains("hi-from-g")), "{m2:?}");
    // Another VNI: same name, same subnet, reaches neither.
    let _ = lease(&cguest.stdout);
    assert!(cguest.stdout.contains("ISOLATED") && !cguest.stdout.contains("REACHED"), "{cguest:?}");

    for h in 0..3 {
        assert_eq!(world.leftovers_on(h), Vec::<String>::new(), "host {h}");
    }
    for d in [disk_dir, g_dir, c_disk_dir] {
        let _ = std::fs::remove_dir_all(d);
    }
}
