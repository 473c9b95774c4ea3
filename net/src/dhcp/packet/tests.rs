use super::*;

const MAC: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56];

fn params() -> ServerParams {
    ServerParams {
        subnet: Subnet::from_octets(10, 77, 0),
        dns: vec![Ipv4Addr::new(9, 9, 9, 9)],
        lease_secs: 3600,
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
    assert!(parse_request(&[]).is_none());
    assert!(parse_request(&[0u8; 300]).is_none());
    assert!(parse_request(&[0xffu8; 600]).is_none());
    // A reply (BootReply) is not a request.
    let req = Message::from_bytes(&client(MessageType::Discover, &[])).unwrap();
    let reply = build_reply(&req, &params(), Reply::Offer(ip(2)));
    assert!(parse_request(&reply.to_vec().unwrap()).is_none());
    // No message type.
    let u = Ipv4Addr::UNSPECIFIED;
    let m = Message::new_with_id(1, u, u, u, u, &MAC);
    assert!(parse_request(&m.to_vec().unwrap()).is_none());
    // Relayed.
    let mut m = Message::new_with_id(1, u, u, u, ip(200), &MAC);
    m.opts_mut().insert(DhcpOption::MessageType(MessageType::Discover));
    assert!(parse_request(&m.to_vec().unwrap()).is_none());
    // hlen > 16 must not panic (dhcproto's chaddr() slices by hlen).
    let mut raw = client(MessageType::Discover, &[]);
    raw[2] = 200;
    assert!(parse_request(&raw).is_none());
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
