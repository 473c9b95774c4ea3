use super::*;

#[test]
fn memory_sizes() {
    assert_eq!(parse_memory("512").unwrap(), 512);
    assert_eq!(parse_memory("512M").unwrap(), 512);
    assert_eq!(parse_memory("512m").unwrap(), 512);
    assert_eq!(parse_memory("2G").unwrap(), 2048);
    assert_eq!(parse_memory("2GiB").unwrap(), 2048);
    assert_eq!(parse_memory("1T").unwrap(), 1 << 20);
    assert_eq!(parse_memory("65536K").unwrap(), 64);
    for bad in ["", "2X", "1.5G", "1000K", "-1", "G", "536870912"] {
        let r = parse_memory(bad);
        if bad == "536870912" {
            // A plain number is MiB: parses, and validate() refuses it as too large.
            let c = VmConfig { memory_mib: r.unwrap(), ..Default::default() };
            assert!(matches!(c.validate(), Err(ConfigError::Memory(_))));
            continue;
        }
        let e = r.unwrap_err().to_string();
        assert!(e.starts_with(&format!("bad --memory '{bad}'")) && !e.contains('\n'), "{e}");
    }
}

#[test]
fn validate_bounds() {
    let mut c = VmConfig::default();
    c.validate().unwrap();
    c.cpus = 0;
    assert!(matches!(c.validate(), Err(ConfigError::Cpus(0))));
    c.cpus = MAX_VCPUS + 1;
    assert!(c.validate().is_err());
    c.cpus = 1;
    c.memory_mib = 1;
    assert!(matches!(c.validate(), Err(ConfigError::Memory(1))));
    c.memory_mib = 128;
    // One slot is the virtio-rng's.
    c.disks = vec!["d.img".parse().unwrap(); crate::layout::MAX_VIRTIO_DEVICES - 1];
    c.validate().unwrap();
    c.shares.push("/tmp".parse().unwrap());
    assert!(matches!(c.validate(), Err(ConfigError::TooManyDevices { .. })));
    // A command needs the command channel's slot too.
    c.shares.clear();
    c.command = vec!["true".into()];
    assert!(crate::channel::wanted(&c));
    assert!(matches!(c.validate(), Err(ConfigError::TooManyDevices { max: 8, got: 9 })));
    c.disks.pop();
    c.validate().unwrap();
}

#[test]
fn share_tags_are_unique() {
    let shares = vec!["/a".parse().unwrap(), "/b".parse().unwrap(), "/c,tag=mine".parse().unwrap()];
    let mut c = VmConfig { shares, ..Default::default() };
    assert_eq!(c.share_tags(), ["share0", "share1", "mine"]);
    c.validate().unwrap();
    c.shares.push("/d,tag=share1".parse().unwrap());
    let e = c.validate().unwrap_err();
    assert_eq!(e.to_string(), "--share /b and --share /d both use tag 'share1' (give one of them tag=...)");
    assert_eq!(e.exit_code(), code::USAGE);
}

#[test]
fn every_check_is_usage_except_host_failures() {
    let spec: Result<DiskConfig, _> = "x,size=lots".parse();
    assert_eq!(ConfigError::from(spec.unwrap_err()).exit_code(), code::USAGE);
    let not_permitted = net::NetError::NotPermitted { mode: "nat" };
    assert_eq!(ConfigError::Net(not_permitted).exit_code(), code::USAGE);
    let io = net::NetError::Network(net::NetworkError::IpForward(std::io::Error::other("x")));
    assert_eq!(ConfigError::Net(io).exit_code(), code::VM_FAILURE);
}
