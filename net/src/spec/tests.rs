use super::*;

fn p(s: &str) -> Result<NetSpec, OptionError> {
    s.parse()
}

/// The reason a spec is refused, as one line that names the spec.
fn why(s: &str) -> String {
    let e = p(s).unwrap_err();
    let msg = e.to_string();
    assert!(msg.starts_with(&format!("bad --net '{s}': ")) && !msg.contains('\n'), "{msg}");
    e.reason.to_string()
}

#[test]
fn nat_full() {
    let spec = p("nat:lab,subnet=10.77.0.0/24,mac=52:54:00:12:34:56,rate=50Mbit").unwrap();
    assert_eq!(
        spec.mode,
        NetMode::Nat {
            name: "lab".into(),
            subnet: Some("10.77.0.0/24".parse().unwrap()),
            uplink: None,
            tap: None,
            allow_host: false,
            overlay: None,
        }
    );
    assert_eq!(spec.mac, Some(MacAddr([0x52, 0x54, 0, 0x12, 0x34, 0x56])));
    assert_eq!(spec.rate.bytes_per_sec, Some(6_250_000));
    assert_eq!(spec.rate.ops_per_sec, None);
    assert_eq!(spec.network_name(), Some("lab"));
}

#[test]
fn defaults() {
    let spec = p("nat").unwrap();
    assert_eq!(spec.network_name(), Some(DEFAULT_NETWORK));
    assert!(spec.rate.is_unlimited());
    let spec = p("host-only").unwrap();
    assert!(matches!(spec.mode, NetMode::HostOnly { ref name, .. } if name == "default"));
    assert!(p("none").unwrap().is_none());
}

#[test]
fn other_modes() {
    let spec = p("bridge=br0,pps=1000").unwrap();
    assert_eq!(spec.mode, NetMode::Bridge { bridge: "br0".into(), vlan: None });
    assert_eq!(spec.rate.ops_per_sec, Some(1000));
    let spec = p("tap=tap0,mac=02:00:00:00:00:01,rate=5MB").unwrap();
    assert_eq!(spec.mode, NetMode::Tap { name: "tap0".into() });
    assert_eq!(spec.rate.bytes_per_sec, Some(5_000_000));
    let spec = p("nat:x,uplink=eth0,tap=mytap").unwrap();
    assert_eq!(
        spec.mode,
        NetMode::Nat {
            name: "x".into(),
            subnet: None,
            uplink: Some("eth0".into()),
            tap: Some("mytap".into()),
            allow_host: false,
            overlay: None,
        }
    );
    let spec = p("host-only:h1,subnet=192.168.50.0/24,tap=t").unwrap();
    assert!(matches!(spec.mode, NetMode::HostOnly { tap: Some(_), subnet: Some(_), .. }));
}

#[test]
fn allow_host_switch() {
    assert!(matches!(p("nat,allow-host").unwrap().mode, NetMode::Nat { allow_host: true, .. }));
    assert!(matches!(p("host-only:h,allow-host,subnet=10.9.9.0/24").unwrap().mode, NetMode::HostOnly { allow_host: true, .. }));
    assert!(matches!(p("nat:x").unwrap().mode, NetMode::Nat { allow_host: false, .. }));
    // Only for the modes whose host side we own.
    assert!(p("bridge=br0,allow-host").is_err());
    assert!(p("tap=t0,allow-host").is_err());
    assert!(p("nat,allow-host=1").is_err());
    assert!(p("nat,allow-host,allow-host").is_err());
    let spec = p("host-only:h,allow-host").unwrap();
    assert_eq!(spec.to_string().parse::<NetSpec>().unwrap(), spec);
}

#[test]
fn rates_share_the_disk_grammar() {
    // The same RATE grammar as --disk bw=: a bare K/M/G suffix is decimal bytes/s.
    assert_eq!(p("nat,rate=10M").unwrap().rate.bytes_per_sec, Some(10_000_000));
    assert_eq!(p("nat,rate=1GiB,pps=10K").unwrap().rate, RateSpec { bytes_per_sec: Some(1 << 30), ops_per_sec: Some(10_000) });
}

#[test]
fn errors() {
    assert_eq!(p("").unwrap_err().reason, Reason::MissingHead("mode (expected nat[:NAME], host-only[:NAME], bridge=BR, tap=NAME or none)"));
    for unknown in ["foo", "nat=x", "bridge", "bridge:br0", "none:x"] {
        assert!(why(unknown).starts_with("unknown mode"), "{unknown}");
    }
    for (spec, option) in [
        ("none,mac=52:54:00:00:00:01", "mac"),
        ("host-only,uplink=eth0", "uplink"),
        ("bridge=br0,subnet=10.1.2.0/24", "subnet"),
        ("nat,colour=red", "colour"),
    ] {
        assert!(matches!(p(spec).unwrap_err().reason, Reason::UnknownOption { option: o, .. } if o == option), "{spec}");
    }
    assert_eq!(p("nat,rate=1Mbit,rate=2Mbit").unwrap_err().reason, Reason::Duplicate("rate".into()));
    assert_eq!(p("nat,rate=").unwrap_err().reason, Reason::MissingValue("rate".into()));
    assert_eq!(p("nat,rate").unwrap_err().reason, Reason::MissingValue("rate".into()));
    for (spec, needle) in [
        ("nat:", "invalid network name"),
        ("nat:elevenchars", "invalid network name"),
        ("nat:a b", "invalid network name"),
        ("nat:-x", "invalid network name"),
        ("bridge=", "invalid bridge name"),
        ("tap=sixteen_chars_xx", "invalid tap name"),
        ("nat,uplink=e\"th0", "invalid uplink name"),
        ("nat,mac=01:00:00:00:00:01", "invalid mac"),
        ("nat,subnet=10.0.0.0/8", "invalid subnet"),
        ("nat,rate=fast", "bad rate 'fast'"),
        ("nat,pps=0", "bad count '0'"),
    ] {
        assert!(why(spec).starts_with(needle), "{spec}: {}", why(spec));
    }
}

#[test]
fn ten_char_name_fits() {
    let spec = p("nat:abcdefghij").unwrap();
    let bridge = format!("{BRIDGE_PREFIX}{}", spec.network_name().unwrap());
    assert_eq!(bridge.len(), 15);
}

#[test]
fn messages_are_one_line_and_helpful() {
    let e = why("foo");
    assert!(e.contains("nat[:NAME]"), "{e}");
    let e = p("host-only,uplink=eth0").unwrap_err().to_string();
    assert!(e.contains("uplink") && e.contains("host-only") && e.contains("subnet"), "{e}");
}

#[test]
fn display_round_trips() {
    for s in [
        "nat:lab,subnet=10.77.0.0/24,mac=52:54:00:12:34:56,rate=50Mbit,pps=100",
        "nat,uplink=eth0,tap=t0",
        "host-only:h,tap=t1",
        "bridge=br0,rate=1GB",
        "bridge=br0,vlan=10",
        "host-only:lab,subnet=10.77.0.0/24,vxlan=4242,peers=192.0.2.12+192.0.2.11,dev=eth0,mtu=1400",
        "nat:lab,subnet=10.77.0.0/24,vxlan=1,peers=192.0.2.11",
        "tap=tap0",
        "none",
    ] {
        let spec = p(s).unwrap();
        assert_eq!(p(&spec.to_string()).unwrap(), spec, "{s} -> {spec}");
    }
}

#[test]
fn mac_for_uses_explicit_or_derived() {
    let spec = p("nat").unwrap();
    assert_eq!(spec.mac_for("vm1", 0), MacAddr::derived("vm1", 0));
    let spec = p("nat,mac=02:00:00:00:00:09").unwrap();
    assert_eq!(spec.mac_for("vm1", 0), MacAddr([2, 0, 0, 0, 0, 9]));
}

#[test]
fn no_panic_on_garbage() {
    for s in [",", ",,,", "nat,,", "nat:,", "=", ":", "nat:x:y", "tap=,", "bridge==", "\u{00e9}", "nat,=x"] {
        let _ = p(s);
    }
}

#[test]
fn vlans() {
    assert_eq!(p("bridge=br0,vlan=10").unwrap().mode, NetMode::Bridge { bridge: "br0".into(), vlan: Some(10) });
    assert_eq!(p("bridge=br0,vlan=4094").unwrap().mode, NetMode::Bridge { bridge: "br0".into(), vlan: Some(4094) });
    for bad in ["0", "4095", "-1", "ten", "65536"] {
        let e = why(&format!("bridge=br0,vlan={bad}"));
        assert!(e.contains("1..4094"), "{bad}: {e}");
    }
    // Only bridged NICs have VLANs here.
    assert!(why("tap=t0,vlan=10").contains("unknown option 'vlan'"));
    assert!(why("nat,vlan=10").contains("unknown option 'vlan'"));
}

#[test]
fn overlays() {
    let spec = p("host-only:lab,subnet=10.77.0.0/24,vxlan=4242,peers=192.0.2.11+192.0.2.12").unwrap();
    let NetMode::HostOnly { overlay: Some(o), .. } = &spec.mode else { panic!("{spec:?}") };
    assert_eq!(o.vni, 4242);
    assert_eq!(o.peers.len(), 2);
    assert_eq!((o.dev.as_deref(), o.mtu), (None, None));
    let NetMode::Nat { overlay: Some(o), .. } = p("nat:lab,subnet=10.77.0.0/24,vxlan=7,peers=192.0.2.11,dev=eth0,mtu=1400").unwrap().mode else {
        panic!()
    };
    assert_eq!((o.vni, o.dev.as_deref(), o.mtu), (7, Some("eth0"), Some(1400)));
    // Parse and validation errors both name the spec, in one line.
    assert!(why("host-only:lab,vxlan=x,peers=192.0.2.1,subnet=10.77.0.0/24").contains("vxlan='x' is not a number"));
    assert!(why("host-only:lab,vxlan=0,peers=192.0.2.1,subnet=10.77.0.0/24").contains("out of range"));
    assert!(why("host-only:lab,vxlan=5,peers=192.0.2.1").contains("needs its subnet"));
    assert!(why("host-only:lab,vxlan=5,subnet=10.77.0.0/24").contains("needs peers"));
    assert!(why("host-only:lab,vxlan=5,peers=192.0.2.1+nope,subnet=10.77.0.0/24").contains("'nope' is not an IPv4"));
    assert!(why("host-only:lab,peers=192.0.2.1").contains("add vxlan=VNI"));
    assert!(why("nat:lab,mtu=1400").contains("add vxlan=VNI"));
    assert!(why("host-only:lab,vxlan=5,peers=192.0.2.1,subnet=10.77.0.0/24,mtu=20").contains("mtu 20"));
    assert!(why("bridge=br0,vxlan=5").contains("unknown option 'vxlan'"));
}
