use super::*;
use crate::dhcp::wire;

const MAC: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56];

fn params() -> ServerParams {
    ServerParams {
        subnet: Subnet::from_octets(10, 77, 0),
        dns: vec![Ipv4Addr::new(9, 9, 9, 9)],
        lease_secs: 3600,
        mtu: None,
    }
}

fn client(mtype: MessageType, extra: &[DhcpOption]) -> Vec<u8> {
    let u = Ipv4Addr::UNSPECIFIED;
    let mut m = Message::new_with_id(0xdead_beef, u, u, u, u, &MAC);
    m.opts_mut().insert(DhcpOption::MessageType(mtype));
    for o in extra {
        m.opts_mut().insert(o.clone());
    }
    m.to_vec().unwrap()
}

fn ip(d: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 77, 0, d)
}

#[test]
fn parse_discover_and_request() {
    let (_, req) = parse_request(&client(MessageType::Discover, &[])).unwrap();
    assert_eq!(req, ClientRequest { mac: MacAddr(MAC), kind: ClientKind::Discover });

    let buf = client(
        MessageType::Request,
        &[DhcpOption::RequestedIpAddress(ip(5)), DhcpOption::ServerIdentifier(ip(1))],
    );
    let (_, req) = parse_request(&buf).unwrap();
    assert_eq!(req.kind, ClientKind::Request { requested: Some(ip(5)), server_id: Some(ip(1)) });
}

#[test]
fn renew_uses_ciaddr() {
    let u = Ipv4Addr::UNSPECIFIED;
    let mut m = Message::new_with_id(1, ip(9), u, u, u, &MAC);
    m.opts_mut().insert(DhcpOption::MessageType(MessageType::Request));
    let (_, req) = parse_request(&m.to_vec().unwrap()).unwrap();
    assert_eq!(req.kind, ClientKind::Request { requested: Some(ip(9)), server_id: None });
}

#[test]
fn parse_ignores_junk() {
    let malformed = |buf: &[u8]| matches!(parse_request(buf), Err(Ignored::Malformed(_)));
    assert!(malformed(&[]));
    assert!(malformed(&[0u8; 300]));
    assert!(malformed(&[0xffu8; 600]));
    // A reply (BootReply) is not a request.
    let req = Message::from_bytes(&client(MessageType::Discover, &[])).unwrap();
    let reply = build_reply(&req, &params(), Reply::Offer(ip(2)));
    assert_eq!(parse_request(&reply.to_vec().unwrap()).unwrap_err(), Ignored::NotARequest);
    // No message type (dhcproto writes no options, not even End, for an empty set).
    let u = Ipv4Addr::UNSPECIFIED;
    let m = Message::new_with_id(1, u, u, u, u, &MAC);
    let mut raw = m.to_vec().unwrap();
    raw.push(255);
    assert_eq!(parse_request(&raw).unwrap_err(), Ignored::NotARequest);
    // Relayed.
    let mut m = Message::new_with_id(1, u, u, u, ip(200), &MAC);
    m.opts_mut().insert(DhcpOption::MessageType(MessageType::Discover));
    assert_eq!(parse_request(&m.to_vec().unwrap()).unwrap_err(), Ignored::NotARequest);
    // hlen > 16 must not panic (dhcproto's chaddr() slices by hlen).
    let mut raw = client(MessageType::Discover, &[]);
    raw[2] = 200;
    assert_eq!(parse_request(&raw).unwrap_err(), Ignored::Malformed(Malformed::BadHlen(200)));
    // Rapid Commit with a 1-byte body: dhcproto would debug_assert on it.
    let mut raw = client(MessageType::Discover, &[]);
    let end = raw.iter().rposition(|&b| b == 255).unwrap();
    raw.splice(end..end, [80, 1, 0]);
    assert_eq!(parse_request(&raw).unwrap_err(), Ignored::Malformed(Malformed::BadLength { code: 80, len: 1 }));
}

/// xorshift64*: a tiny deterministic generator, so a failing case can be replayed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn byte(&mut self) -> u8 {
        (self.next() >> 32) as u8
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.byte()).collect()
    }
}

/// A DISCOVER from MAC with the options area replaced by `opts` (message type first).
fn discover_with(opts: &[u8]) -> Vec<u8> {
    let mut raw = client(MessageType::Discover, &[]);
    raw.truncate(240);
    raw.extend_from_slice(&[53, 1, 1]);
    raw.extend_from_slice(opts);
    raw
}

/// Parses `buf`; a panic, contained or not, fails the test (`case` says which input).
fn parse_no_panic(buf: &[u8], case: &str) -> Result<(Message, ClientRequest), Ignored> {
    let res = parse_request(buf);
    if let Err(Ignored::DecoderPanic(msg)) = &res {
        panic!("dhcproto panicked on {case}: {msg}\n{buf:02x?}");
    }
    res
}

#[test]
fn every_option_code_and_short_length() {
    // Debug builds (the asserts this guards against are debug_asserts).
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut accepted = 0;
    for code in 0..=255u8 {
        for len in 0..=3usize {
            for body in [vec![0u8; len], vec![0xff; len], rng.bytes(len)] {
                let mut opts = vec![code, len as u8];
                opts.extend_from_slice(&body);
                opts.push(255);
                let raw = discover_with(&opts);
                let case = format!("option {code} length {len}");
                let res = parse_no_panic(&raw, &case);
                // Whatever passes the wire check keeps its message type (decoded first), so
                // a good request still parses with a bad option behind it.
                if wire::check(&raw).is_ok() {
                    accepted += 1;
                    let (_, req) = res.unwrap_or_else(|e| panic!("{case}: {e:?}"));
                    assert_eq!(req, ClientRequest { mac: MacAddr(MAC), kind: ClientKind::Discover }, "{case}");
                } else {
                    assert!(res.is_err(), "{case}");
                }
            }
        }
    }
    // Sanity: most (code, length) pairs are legal, some are not.
    assert!((1500..3072).contains(&accepted), "{accepted}");
}

#[test]
fn random_packets_never_panic_and_good_requests_survive() {
    let mut rng = Rng(42);
    let good = client(
        MessageType::Request,
        &[DhcpOption::RequestedIpAddress(ip(5)), DhcpOption::ServerIdentifier(ip(1)), DhcpOption::Hostname("vm".into())],
    );
    let (_, want) = parse_request(&good).unwrap();
    for i in 0..6000 {
        let raw = match i % 3 {
            // Random TLVs, mostly short, sometimes terminated.
            0 => {
                let mut opts = Vec::new();
                for _ in 0..rng.below(12) {
                    let code = if rng.below(4) == 0 { [80, 81, 94, 121, 119, 82, 52, 152][rng.below(8)] } else { rng.byte() };
                    let len = if rng.below(8) == 0 { rng.below(256) } else { rng.below(6) };
                    opts.push(code);
                    opts.push(len as u8);
                    opts.extend(rng.bytes(len));
                }
                if rng.below(4) != 0 {
                    opts.push(255);
                }
                discover_with(&opts)
            }
            // A good request with a few bytes flipped anywhere.
            1 => {
                let mut raw = good.clone();
                for _ in 0..1 + rng.below(4) {
                    let at = rng.below(raw.len());
                    raw[at] = rng.byte();
                }
                raw
            }
            // Random bytes behind a valid header and cookie, or entirely random.
            _ => {
                let n = rng.below(700);
                if rng.below(2) == 0 {
                    let mut raw = good[..240].to_vec();
                    raw.extend(rng.bytes(n));
                    raw
                } else {
                    rng.bytes(n)
                }
            }
        };
        let _ = parse_no_panic(&raw, &format!("random case {i}"));
        // Interleave the good request: it keeps parsing.
        if i % 500 == 0 {
            assert_eq!(parse_request(&good).unwrap().1, want);
        }
    }
}

/// The length table is what keeps dhcproto from asserting: feed dhcproto the raw option
/// directly (contained) and check that every (code, length) on which it panics is refused.
#[test]
fn table_covers_every_dhcproto_assert() {
    let mut panics = Vec::new();
    for code in 1..=254u8 {
        for len in 0..=6usize {
            let mut opts = vec![code, len as u8];
            opts.extend(std::iter::repeat_n(0x01, len));
            opts.push(255);
            let raw = discover_with(&opts);
            if crate::contain::contain(|| Message::from_bytes(&raw)).is_err() {
                panics.push((code, len));
                assert!(!wire::rule(code).allows_len(len), "dhcproto panics on option {code} length {len}, the table allows it");
            }
        }
    }
    if cfg!(debug_assertions) {
        // The case from the bug report really is a panic in debug builds.
        assert!(panics.contains(&(80, 1)), "{panics:?}");
    }
}

#[test]
fn decisions() {
    let me = ip(1);
    let disc = ClientRequest { mac: MacAddr(MAC), kind: ClientKind::Discover };
    assert_eq!(decide(&disc, me, || Some(ip(2))), Some(Reply::Offer(ip(2))));
    assert_eq!(decide(&disc, me, || None), None, "pool full: stay silent");

    let req = |requested, server_id| ClientRequest {
        mac: MacAddr(MAC),
        kind: ClientKind::Request { requested, server_id },
    };
    assert_eq!(decide(&req(Some(ip(2)), Some(me)), me, || Some(ip(2))), Some(Reply::Ack(ip(2))));
    assert_eq!(decide(&req(Some(ip(2)), None), me, || Some(ip(2))), Some(Reply::Ack(ip(2))));
    assert_eq!(decide(&req(Some(ip(3)), None), me, || Some(ip(2))), Some(Reply::Nak));
    assert_eq!(decide(&req(Some(ip(3)), None), me, || None), Some(Reply::Nak));
    assert_eq!(decide(&req(None, None), me, || Some(ip(2))), None);
    let mut called = false;
    assert_eq!(
        decide(&req(Some(ip(2)), Some(Ipv4Addr::new(192, 0, 2, 1))), me, || {
            called = true;
            Some(ip(2))
        }),
        None
    );
    assert!(!called, "another server's transaction must not allocate a lease");
    let inform = ClientRequest { mac: MacAddr(MAC), kind: ClientKind::Inform };
    assert_eq!(decide(&inform, me, || None), Some(Reply::InformAck));
    let release = ClientRequest { mac: MacAddr(MAC), kind: ClientKind::Release };
    assert_eq!(decide(&release, me, || Some(ip(2))), None);
}

#[test]
fn offer_contents() {
    let req = Message::from_bytes(&client(MessageType::Discover, &[])).unwrap();
    let bytes = encode(&build_reply(&req, &params(), Reply::Offer(ip(7)))).unwrap();
    let m = Message::from_bytes(&bytes).unwrap();
    assert_eq!(m.opcode(), Opcode::BootReply);
    assert_eq!(m.xid(), 0xdead_beef);
    assert_eq!(m.yiaddr(), ip(7));
    assert_eq!(m.siaddr(), ip(1));
    assert_eq!(m.chaddr(), &MAC);
    let o = m.opts();
    assert_eq!(o.msg_type(), Some(MessageType::Offer));
    assert_eq!(o.get(OptionCode::ServerIdentifier), Some(&DhcpOption::ServerIdentifier(ip(1))));
    assert_eq!(o.get(OptionCode::SubnetMask), Some(&DhcpOption::SubnetMask(Ipv4Addr::new(255, 255, 255, 0))));
    assert_eq!(o.get(OptionCode::Router), Some(&DhcpOption::Router(vec![ip(1)])));
    assert_eq!(
        o.get(OptionCode::DomainNameServer),
        Some(&DhcpOption::DomainNameServer(vec![Ipv4Addr::new(9, 9, 9, 9)]))
    );
    assert_eq!(o.get(OptionCode::AddressLeaseTime), Some(&DhcpOption::AddressLeaseTime(3600)));
    assert_eq!(o.get(OptionCode::Renewal), Some(&DhcpOption::Renewal(1800)));
    assert!(o.get(OptionCode::InterfaceMtu).is_none(), "only overlays offer an MTU");
}

#[test]
fn overlay_offers_its_mtu() {
    let req = Message::from_bytes(&client(MessageType::Request, &[DhcpOption::RequestedIpAddress(ip(7))])).unwrap();
    let p = ServerParams { mtu: Some(1450), ..params() };
    for reply in [Reply::Offer(ip(7)), Reply::Ack(ip(7)), Reply::InformAck] {
        let bytes = encode(&build_reply(&req, &p, reply)).unwrap();
        assert!(wire::check(&bytes).is_ok());
        let m = Message::from_bytes(&bytes).unwrap();
        assert_eq!(m.opts().get(OptionCode::InterfaceMtu), Some(&DhcpOption::InterfaceMtu(1450)), "{reply:?}");
    }
    assert!(build_reply(&req, &p, Reply::Nak).opts().get(OptionCode::InterfaceMtu).is_none());
}

#[test]
fn ack_nak_inform() {
    let req = Message::from_bytes(&client(MessageType::Request, &[DhcpOption::RequestedIpAddress(ip(7))])).unwrap();
    let m = build_reply(&req, &params(), Reply::Ack(ip(7)));
    assert_eq!(m.opts().msg_type(), Some(MessageType::Ack));
    assert_eq!(m.yiaddr(), ip(7));

    let m = build_reply(&req, &params(), Reply::Nak);
    assert_eq!(m.opts().msg_type(), Some(MessageType::Nak));
    assert_eq!(m.yiaddr(), Ipv4Addr::UNSPECIFIED);
    assert!(m.opts().get(OptionCode::AddressLeaseTime).is_none());
    assert!(m.opts().get(OptionCode::Router).is_none());

    let mut p = params();
    p.dns.clear();
    let m = build_reply(&req, &p, Reply::InformAck);
    assert_eq!(m.opts().msg_type(), Some(MessageType::Ack));
    assert!(m.opts().get(OptionCode::AddressLeaseTime).is_none());
    assert!(m.opts().get(OptionCode::DomainNameServer).is_none());
    assert!(m.opts().get(OptionCode::Router).is_some());
}
