//! DHCPv4 client messages (RFC 2131/2132): DISCOVER and REQUEST out, OFFER/ACK/NAK in.
//! Written here rather than with dhcproto (which the host side uses) because dhcproto pulls
//! in hickory-proto and idna, and every byte of the init is unpacked by the guest kernel
//! on each boot; the client needs a dozen fields and seven options.

use std::net::Ipv4Addr;

const OP_REQUEST: u8 = 1;
const OP_REPLY: u8 = 2;
const HTYPE_ETHER: u8 = 1;
const COOKIE: [u8; 4] = [99, 130, 83, 99];
const FLAG_BROADCAST: u16 = 0x8000;
/// Fixed BOOTP header up to and including the magic cookie.
const HEADER_LEN: usize = 240;
/// Some servers ignore BOOTP messages shorter than this.
const MIN_LEN: usize = 300;

const OPT_PAD: u8 = 0;
const OPT_SUBNET_MASK: u8 = 1;
const OPT_ROUTER: u8 = 3;
const OPT_DNS: u8 = 6;
const OPT_DOMAIN: u8 = 15;
const OPT_MTU: u8 = 26;
const OPT_BROADCAST: u8 = 28;
const OPT_REQUESTED_IP: u8 = 50;
const OPT_MESSAGE_TYPE: u8 = 53;
const OPT_SERVER_ID: u8 = 54;
const OPT_PARAM_LIST: u8 = 55;
const OPT_END: u8 = 255;

pub const DISCOVER: u8 = 1;
pub const OFFER: u8 = 2;
pub const REQUEST: u8 = 3;
pub const ACK: u8 = 5;
pub const NAK: u8 = 6;

/// What a server offered or acknowledged.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Lease {
    pub kind: u8,
    pub address: Option<Ipv4Addr>,
    pub server: Option<Ipv4Addr>,
    pub netmask: Option<Ipv4Addr>,
    pub broadcast: Option<Ipv4Addr>,
    pub router: Option<Ipv4Addr>,
    pub dns: Vec<Ipv4Addr>,
    pub domain: Option<String>,
    /// The interface MTU (option 26; an overlay network's is below 1500). Values below
    /// IPv4's minimum of 68 are ignored.
    pub mtu: Option<u16>,
}

/// A DISCOVER (no `request`) or a REQUEST for `request = (address, server)`, asking for a
/// broadcast reply since the interface has no address yet.
pub fn build(xid: u32, mac: [u8; 6], request: Option<(Ipv4Addr, Ipv4Addr)>) -> Vec<u8> {
    let mut m = vec![0u8; HEADER_LEN];
    m[0] = OP_REQUEST;
    m[1] = HTYPE_ETHER;
    m[2] = 6;
    m[4..8].copy_from_slice(&xid.to_be_bytes());
    m[10..12].copy_from_slice(&FLAG_BROADCAST.to_be_bytes());
    m[28..34].copy_from_slice(&mac);
    m[236..240].copy_from_slice(&COOKIE);
    let kind = if request.is_some() { REQUEST } else { DISCOVER };
    m.extend_from_slice(&[OPT_MESSAGE_TYPE, 1, kind]);
    if let Some((ip, server)) = request {
        m.extend_from_slice(&[OPT_REQUESTED_IP, 4]);
        m.extend_from_slice(&ip.octets());
        m.extend_from_slice(&[OPT_SERVER_ID, 4]);
        m.extend_from_slice(&server.octets());
    }
    m.extend_from_slice(&[OPT_PARAM_LIST, 6, OPT_SUBNET_MASK, OPT_ROUTER, OPT_DNS, OPT_DOMAIN, OPT_BROADCAST, OPT_MTU]);
    m.push(OPT_END);
    if m.len() < MIN_LEN {
        m.resize(MIN_LEN, OPT_PAD);
    }
    m
}

/// Parses a server's reply to our `xid` for `mac`; None for anything else (another
/// client's reply, garbage).
pub fn parse(buf: &[u8], xid: u32, mac: [u8; 6]) -> Option<Lease> {
    if buf.len() < HEADER_LEN
        || buf[0] != OP_REPLY
        || buf[4..8] != xid.to_be_bytes()
        || buf[28..34] != mac
        || buf[236..240] != COOKIE
    {
        return None;
    }
    let yiaddr = Ipv4Addr::new(buf[16], buf[17], buf[18], buf[19]);
    let mut lease = Lease { address: (!yiaddr.is_unspecified()).then_some(yiaddr), ..Lease::default() };
    let mut opts = &buf[HEADER_LEN..];
    while let Some((&code, rest)) = opts.split_first() {
        match code {
            OPT_PAD => {
                opts = rest;
                continue;
            }
            OPT_END => break,
            _ => {}
        }
        let (&len, rest) = rest.split_first()?;
        let value = rest.get(..usize::from(len))?;
        opts = &rest[usize::from(len)..];
        let first_ip = || value.get(..4).map(|v| Ipv4Addr::new(v[0], v[1], v[2], v[3]));
        match code {
            OPT_MESSAGE_TYPE => lease.kind = *value.first()?,
            OPT_SUBNET_MASK => lease.netmask = first_ip(),
            OPT_BROADCAST => lease.broadcast = first_ip(),
            OPT_MTU => {
                lease.mtu = value.get(..2).map(|v| u16::from_be_bytes([v[0], v[1]])).filter(|m| *m >= 68);
            }
            OPT_ROUTER => lease.router = first_ip(),
            OPT_SERVER_ID => lease.server = first_ip(),
            OPT_DNS => lease.dns = value.chunks_exact(4).map(|v| Ipv4Addr::new(v[0], v[1], v[2], v[3])).collect(),
            // Only a plain host name: it goes into resolv.conf verbatim.
            OPT_DOMAIN => {
                lease.domain = std::str::from_utf8(value)
                    .ok()
                    .map(|d| d.trim_end_matches('\0'))
                    .filter(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_alphanumeric() || b"-.".contains(&b)))
                    .map(str::to_string)
            }
            _ => {}
        }
    }
    (lease.kind != 0).then_some(lease)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56];

    fn reply(xid: u32, kind: u8, extra: &[u8]) -> Vec<u8> {
        let mut m = vec![0u8; HEADER_LEN];
        m[0] = OP_REPLY;
        m[4..8].copy_from_slice(&xid.to_be_bytes());
        m[16..20].copy_from_slice(&[10, 0, 0, 7]);
        m[28..34].copy_from_slice(&MAC);
        m[236..240].copy_from_slice(&COOKIE);
        m.extend_from_slice(&[OPT_MESSAGE_TYPE, 1, kind, OPT_PAD, OPT_SERVER_ID, 4, 10, 0, 0, 1]);
        m.extend_from_slice(extra);
        m.push(OPT_END);
        m
    }

    #[test]
    fn discover_and_request_layout() {
        let d = build(0xdead_beef, MAC, None);
        assert_eq!(d.len(), MIN_LEN);
        assert_eq!((d[0], d[1], d[2]), (OP_REQUEST, HTYPE_ETHER, 6));
        assert_eq!(&d[4..8], &[0xde, 0xad, 0xbe, 0xef]);
        assert_eq!(&d[10..12], &[0x80, 0]);
        assert_eq!(&d[28..34], &MAC);
        assert_eq!(&d[240..243], &[OPT_MESSAGE_TYPE, 1, DISCOVER]);
        let r = build(1, MAC, Some((Ipv4Addr::new(10, 0, 0, 7), Ipv4Addr::new(10, 0, 0, 1))));
        assert_eq!(&r[240..255], &[53, 1, 3, 50, 4, 10, 0, 0, 7, 54, 4, 10, 0, 0, 1]);
    }

    #[test]
    fn parses_an_ack() {
        let extra = [1, 4, 255, 255, 255, 0, 3, 8, 10, 0, 0, 1, 10, 0, 0, 2, 6, 8, 1, 1, 1, 1, 8, 8, 8, 8, 15, 4, b'l', b'a', b'n', 0];
        let l = parse(&reply(9, ACK, &extra), 9, MAC).unwrap();
        assert_eq!(l.kind, ACK);
        assert_eq!(l.address, Some(Ipv4Addr::new(10, 0, 0, 7)));
        assert_eq!(l.server, Some(Ipv4Addr::new(10, 0, 0, 1)));
        assert_eq!(l.netmask, Some(Ipv4Addr::new(255, 255, 255, 0)));
        assert_eq!(l.router, Some(Ipv4Addr::new(10, 0, 0, 1)));
        assert_eq!(l.dns, vec![Ipv4Addr::new(1, 1, 1, 1), Ipv4Addr::new(8, 8, 8, 8)]);
        assert_eq!(l.domain.as_deref(), Some("lan"));
        assert_eq!(l.mtu, None);
        // An overlay's MTU (option 26); one below IPv4's 68 is ignored.
        assert_eq!(parse(&reply(9, ACK, &[26, 2, 0x05, 0xaa]), 9, MAC).unwrap().mtu, Some(1450));
        assert_eq!(parse(&reply(9, ACK, &[26, 2, 0, 67]), 9, MAC).unwrap().mtu, None);
        assert_eq!(parse(&reply(9, ACK, &[26, 1, 5]), 9, MAC).unwrap().mtu, None);
    }

    #[test]
    fn rejects_foreign_and_broken_replies() {
        let good = reply(9, OFFER, &[]);
        assert!(parse(&good, 9, MAC).is_some());
        assert!(parse(&good, 10, MAC).is_none(), "other xid");
        assert!(parse(&good, 9, [0; 6]).is_none(), "other mac");
        assert!(parse(&good[..100], 9, MAC).is_none(), "short");
        // An option running past the end; a domain with a newline (would inject resolv.conf lines).
        assert!(parse(&reply(9, OFFER, &[6, 200, 1, 2]), 9, MAC).is_none());
        let l = parse(&reply(9, OFFER, &[15, 5, b'a', b'\n', b'n', b's', b' ']), 9, MAC).unwrap();
        assert_eq!(l.domain, None);
        // Every truncation of a valid reply parses or is refused, never panics.
        let full = reply(9, ACK, &[1, 4, 255, 255, 255, 0, 6, 4, 1, 1, 1, 1]);
        for n in 0..full.len() {
            let _ = parse(&full[..n], 9, MAC);
        }
    }
}
