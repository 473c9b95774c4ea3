use super::*;

const DISKLIKE: OptionParser = OptionParser::new("--disk", "PATH")
    .values(&["size", "bw", "iops"])
    .switches(&[("readonly", "readonly"), ("ro", "readonly")]);

#[test]
fn sizes() {
    assert_eq!(parse_size("4G"), Some(4 << 30));
    assert_eq!(parse_size("4GiB"), Some(4 << 30));
    assert_eq!(parse_size("512m"), Some(512 << 20));
    assert_eq!(parse_size("100K"), Some(100 << 10));
    assert_eq!(parse_size("1T"), Some(1 << 40));
    assert_eq!(parse_size("1000"), Some(1000));
    for bad in ["", "G", "4X", "4.5G", "-1", "4 G", "iB", "4iB", "4GB", "99999999999T", "0x10"] {
        assert_eq!(parse_size(bad), None, "{bad:?}");
    }
}

#[test]
fn rates_bytes() {
    // The forms --disk bw= always took: decimal bytes/s.
    assert_eq!(parse_rate("10M"), Ok(10_000_000));
    assert_eq!(parse_rate("10m"), Ok(10_000_000));
    assert_eq!(parse_rate("1000"), Ok(1000));
    assert_eq!(parse_rate("2K"), Ok(2000));
    assert_eq!(parse_rate("1G"), Ok(1_000_000_000));
    // The forms --net rate= always took.
    assert_eq!(parse_rate("5MB"), Ok(5_000_000));
    assert_eq!(parse_rate("5MiB"), Ok(5 << 20));
    assert_eq!(parse_rate("100B"), Ok(100));
    assert_eq!(parse_rate("2kB"), Ok(2000));
    assert_eq!(parse_rate("0.5KiB"), Ok(512));
    assert_eq!(parse_rate("1GB/s"), Ok(1_000_000_000));
}

#[test]
fn rates_bits() {
    assert_eq!(parse_rate("50Mbit"), Ok(6_250_000));
    assert_eq!(parse_rate("50mbit"), Ok(6_250_000));
    assert_eq!(parse_rate("800kbit"), Ok(100_000));
    assert_eq!(parse_rate("1Gbit"), Ok(125_000_000));
    assert_eq!(parse_rate("1.5Gbit"), Ok(187_500_000));
    assert_eq!(parse_rate("64bit"), Ok(8));
    assert_eq!(parse_rate("50Mbit/s"), Ok(6_250_000));
}

#[test]
fn rates_refused() {
    for bad in [
        "", "0", "Mbit", "5mb", "5Mbps", "0Mbit", "1bit", "-5MB", "5 MB", "1.Mbit", ".5Mbit", "1.2.3Mbit",
        "99999999999999999999TB", "1.0000000001Gbit", "5XB", "fast",
    ] {
        assert!(parse_rate(bad).is_err(), "{bad:?} should fail");
    }
}

#[test]
fn counts() {
    assert_eq!(parse_count("100"), Some(100));
    assert_eq!(parse_count("10K"), Some(10_000));
    assert_eq!(parse_count("1k"), Some(1000));
    assert_eq!(parse_count("2M"), Some(2_000_000));
    for bad in ["", "0", "-1", "1.5K", "K", "1X", "99999999999999999999"] {
        assert_eq!(parse_count(bad), None, "{bad:?}");
    }
}

#[test]
fn spec_forms() {
    let o = DISKLIKE.parse("a.img,size=1G,ro,bw=1M,iops=100,").unwrap();
    assert_eq!(o.head(), "a.img");
    assert_eq!(o.size("size"), Ok(Some(1 << 30)));
    assert_eq!(o.rate("bw"), Ok(Some(1_000_000)));
    assert_eq!(o.count("iops"), Ok(Some(100)));
    assert!(o.has("readonly"));
    let o = DISKLIKE.parse("b.img").unwrap();
    assert_eq!((o.get("size"), o.has("readonly")), (None, false));
    assert_eq!(o.parsed::<u8>("size"), Ok(None));
}

#[test]
fn spec_errors_name_the_spec_on_one_line() {
    let cases = [
        ("", Reason::MissingHead("PATH")),
        (",size=1G", Reason::MissingHead("PATH")),
        ("a,colour=red", Reason::UnknownOption { option: "colour".into(), allowed: "size=, bw=, iops=, readonly, ro".into() }),
        ("a,size=1G,size=2G", Reason::Duplicate("size".into())),
        ("a,ro,readonly", Reason::Duplicate("readonly".into())),
        ("a,size=", Reason::MissingValue("size".into())),
        ("a,size", Reason::MissingValue("size".into())),
        ("a,ro=yes", Reason::UnexpectedValue("ro".into())),
    ];
    for (spec, reason) in cases {
        let e = DISKLIKE.parse(spec).unwrap_err();
        assert_eq!(e.reason, reason, "{spec}");
        let msg = e.to_string();
        assert!(msg.starts_with(&format!("bad --disk '{spec}': ")) && !msg.contains('\n'), "{msg}");
    }
    let o = DISKLIKE.parse("a,size=lots,bw=fast,iops=0").unwrap();
    for (e, needle) in [
        (o.size("size").unwrap_err(), "bad size 'lots'"),
        (o.rate("bw").unwrap_err(), "bad rate 'fast'"),
        (o.count("iops").unwrap_err(), "bad count '0'"),
        (o.parsed::<u8>("size").unwrap_err(), "invalid digit"),
    ] {
        let msg = e.to_string();
        assert!(msg.starts_with("bad --disk 'a,size=lots,bw=fast,iops=0': ") && msg.contains(needle), "{msg}");
        assert!(!msg.contains('\n'), "{msg}");
    }
}
