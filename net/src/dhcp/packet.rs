//! Pure DHCP logic: classify a client message, decide the answer, build the reply.
//! No sockets or files here, so all of it is unit-tested.

use std::net::Ipv4Addr;

use dhcproto::v4::{DhcpOption, Flags, HType, Message, MessageType, Opcode, OptionCode};
use dhcproto::{Decodable, Encodable};

use super::wire::{self, Malformed};
use crate::contain::contain;
use crate::spec::{MacAddr, Subnet};

/// What the server hands out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ServerParams {
    pub subnet: Subnet,
    /// DNS servers to offer; empty means the option is left out.
    pub dns: Vec<Ipv4Addr>,
    pub lease_secs: u32,
    /// Interface MTU to offer (option 26; overlay networks), else none.
    pub mtu: Option<u16>,
}

impl ServerParams {
    /// Server identifier and router: the gateway address on the bridge.
    pub fn server_ip(&self) -> Ipv4Addr {
        self.subnet.gateway()
    }
}

/// A client message we may answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum ClientKind {
    Discover,
    /// `requested` is option 50, or `ciaddr` when renewing.
    Request { requested: Option<Ipv4Addr>, server_id: Option<Ipv4Addr> },
    Inform,
    Release,
    Decline,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ClientRequest {
    pub mac: MacAddr,
    pub kind: ClientKind,
}

/// Our answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Reply {
    Offer(Ipv4Addr),
    Ack(Ipv4Addr),
    Nak,
    /// DHCPACK to a DHCPINFORM: options only, no address.
    InformAck,
}

/// Why a received datagram gets no answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Ignored {
    /// Broken on the wire (the server logs these, rate-limited).
    Malformed(Malformed),
    /// dhcproto panicked on it: a case `wire::check` misses. Contained; logged likewise.
    DecoderPanic(String),
    /// Well-formed, but not a client request this server answers (a reply, relayed, not
    /// Ethernet, no or another message type).
    NotARequest,
}

/// Checks `buf` on the wire (see [`wire`]), decodes it, and keeps it only if it is a client
/// request from an Ethernet MAC that arrived directly (not through a relay).
pub(crate) fn parse_request(buf: &[u8]) -> Result<(Message, ClientRequest), Ignored> {
    wire::check(buf).map_err(Ignored::Malformed)?;
    let msg = contain(|| Message::from_bytes(buf))
        .map_err(Ignored::DecoderPanic)?
        .map_err(|_| Ignored::Malformed(Malformed::Undecodable))?;
    if msg.opcode() != Opcode::BootRequest || msg.htype() != HType::Eth || msg.hlen() != 6 {
        return Err(Ignored::NotARequest);
    }
    if !msg.giaddr().is_unspecified() {
        return Err(Ignored::NotARequest);
    }
    // hlen == 6 was checked, so chaddr() is exactly 6 bytes (it slices by hlen).
    let mac = MacAddr(msg.chaddr().try_into().map_err(|_| Ignored::NotARequest)?);
    let opts = msg.opts();
    let kind = match opts.msg_type().ok_or(Ignored::NotARequest)? {
        MessageType::Discover => ClientKind::Discover,
        MessageType::Request => {
            let requested = match opts.get(OptionCode::RequestedIpAddress) {
                Some(DhcpOption::RequestedIpAddress(ip)) => Some(*ip),
                _ => Some(msg.ciaddr()).filter(|ip| !ip.is_unspecified()),
            };
            let server_id = match opts.get(OptionCode::ServerIdentifier) {
                Some(DhcpOption::ServerIdentifier(ip)) => Some(*ip),
                _ => None,
            };
            ClientKind::Request { requested, server_id }
        }
        MessageType::Inform => ClientKind::Inform,
        MessageType::Release => ClientKind::Release,
        MessageType::Decline => ClientKind::Decline,
        _ => return Err(Ignored::NotARequest),
    };
    Ok((msg, ClientRequest { mac, kind }))
}

/// Decides the answer. `lease` yields the MAC's address (existing or newly allocated; `None`
/// when the pool is full) and is only called when an address is needed.
pub(crate) fn decide(
    req: &ClientRequest,
    server_ip: Ipv4Addr,
    lease: impl FnOnce() -> Option<Ipv4Addr>,
) -> Option<Reply> {
    match &req.kind {
        ClientKind::Discover => lease().map(Reply::Offer),
        // The client picked another server's offer.
        ClientKind::Request { server_id: Some(s), .. } if *s != server_ip => None,
        ClientKind::Request { requested: None, .. } => None,
        ClientKind::Request { requested: Some(want), .. } => match lease() {
            Some(ip) if ip == *want => Some(Reply::Ack(ip)),
            // Wrong address (e.g. an old lease from another network) or no address: NAK
            // so the client restarts with DISCOVER.
            _ => Some(Reply::Nak),
        },
        ClientKind::Inform => Some(Reply::InformAck),
        // Leases stay reserved per MAC (stable addresses); nothing to answer.
        ClientKind::Release | ClientKind::Decline => None,
    }
}

/// Builds the reply message to `req`.
pub(crate) fn build_reply(req: &Message, params: &ServerParams, reply: Reply) -> Message {
    let server_ip = params.server_ip();
    let unspec = Ipv4Addr::UNSPECIFIED;
    let (yiaddr, ciaddr) = match reply {
        Reply::Offer(ip) | Reply::Ack(ip) => (ip, unspec),
        Reply::Nak => (unspec, unspec),
        Reply::InformAck => (unspec, req.ciaddr()),
    };
    let siaddr = if reply == Reply::Nak { unspec } else { server_ip };
    // The caller only passes requests that parse_request accepted, so hlen is 6 and
    // chaddr() cannot exceed the 16 bytes Message::new_with_id asserts on.
    let chaddr = if req.hlen() <= 16 { req.chaddr() } else { &[] };
    let mut msg = Message::new_with_id(req.xid(), ciaddr, yiaddr, siaddr, unspec, chaddr);
    msg.set_opcode(Opcode::BootReply).set_htype(req.htype());
    // Keep the client's broadcast bit; we answer by broadcast in any case.
    msg.set_flags(if req.flags().broadcast() { Flags::default().set_broadcast() } else { Flags::default() });
    let opts = msg.opts_mut();
    let mtype = match reply {
        Reply::Offer(_) => MessageType::Offer,
        Reply::Ack(_) | Reply::InformAck => MessageType::Ack,
        Reply::Nak => MessageType::Nak,
    };
    opts.insert(DhcpOption::MessageType(mtype));
    opts.insert(DhcpOption::ServerIdentifier(server_ip));
    if reply == Reply::Nak {
        return msg;
    }
    opts.insert(DhcpOption::SubnetMask(params.subnet.netmask()));
    opts.insert(DhcpOption::Router(vec![params.subnet.gateway()]));
    if !params.dns.is_empty() {
        opts.insert(DhcpOption::DomainNameServer(params.dns.clone()));
    }
    if let Some(mtu) = params.mtu {
        opts.insert(DhcpOption::InterfaceMtu(mtu));
    }
    if let Reply::Offer(_) | Reply::Ack(_) = reply {
        opts.insert(DhcpOption::AddressLeaseTime(params.lease_secs));
        opts.insert(DhcpOption::Renewal(params.lease_secs / 2));
        opts.insert(DhcpOption::Rebinding(params.lease_secs / 8 * 7));
    }
    msg
}

/// Encodes a reply; `None` if dhcproto refuses (logged by the caller).
pub(crate) fn encode(msg: &Message) -> Option<Vec<u8>> {
    msg.to_vec().ok()
}

#[cfg(test)]
mod tests;
