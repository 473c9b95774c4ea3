//! The DHCP responder thread of one process on one network.
//!
//! Bound to the bridge (SO_BINDTODEVICE) on 0.0.0.0:67 with SO_REUSEADDR, so every microvm
//! process on the network has its own socket and each gets a copy of broadcast requests; a
//! process answers only for the MACs of its own attachments. Replies go to
//! 255.255.255.255:68 on the bridge since clients have no address yet.
//!
//! Limitation: a unicast RENEW (to .1:67) reaches only one of the sockets, which may belong
//! to another process and be ignored; the client then falls back to a broadcast REBIND at
//! 7/8 of the lease time, which its own process answers.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};

use super::lease::LeaseFile;
use super::packet::{build_reply, decide, encode, parse_request, ServerParams};
use super::DhcpError;
use crate::spec::MacAddr;

/// How often the thread checks its stop flag.
const POLL: Duration = Duration::from_millis(200);

/// MACs this process answers for, with a count per MAC (two NICs may share a MAC).
pub(crate) type OwnedMacs = Arc<Mutex<HashMap<MacAddr, usize>>>;

/// Opens the server socket on `bridge`. Done in the caller's thread so errors surface
/// from `attach`.
pub(crate) fn open_socket(bridge: &str) -> Result<UdpSocket, DhcpError> {
    let err = |source| DhcpError::Socket { bridge: bridge.to_string(), source };
    let sock = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).map_err(err)?;
    sock.set_reuse_address(true).map_err(err)?;
    sock.set_broadcast(true).map_err(err)?;
    sock.bind_device(Some(bridge.as_bytes())).map_err(err)?;
    sock.bind(&SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 67).into()).map_err(err)?;
    let udp: UdpSocket = sock.into();
    udp.set_read_timeout(Some(POLL)).map_err(err)?;
    Ok(udp)
}

/// Serves until `stop` is set.
pub(crate) fn serve(
    sock: UdpSocket,
    network: String,
    params: ServerParams,
    leases: LeaseFile,
    macs: OwnedMacs,
    stop: Arc<AtomicBool>,
) {
    let span = tracing::info_span!("dhcp", network = %network);
    let _enter = span.enter();
    tracing::debug!(server = %params.server_ip(), "DHCP server started");
    let mut buf = [0u8; 1500];
    let dest = SocketAddrV4::new(Ipv4Addr::BROADCAST, 68);
    while !stop.load(Ordering::Relaxed) {
        let n = match sock.recv_from(&mut buf) {
            Ok((n, _)) => n,
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut | std::io::ErrorKind::Interrupted) => continue,
            Err(e) => {
                tracing::warn!(error = %e, "DHCP receive failed");
                std::thread::sleep(POLL);
                continue;
            }
        };
        let Some((msg, req)) = parse_request(&buf[..n]) else {
            continue;
        };
        let owned = macs.lock().unwrap_or_else(|e| e.into_inner()).contains_key(&req.mac);
        if !owned {
            continue;
        }
        let reply = decide(&req, params.server_ip(), || match leases.allocate(req.mac) {
            Ok(Some(ip)) => Some(ip),
            Ok(None) => {
                tracing::warn!(mac = %req.mac, "DHCP pool exhausted");
                None
            }
            Err(e) => {
                tracing::warn!(error = %e, path = %leases.path().display(), "cannot update DHCP leases");
                None
            }
        });
        let Some(reply) = reply else {
            continue;
        };
        let out = build_reply(&msg, &params, reply);
        let Some(bytes) = encode(&out) else {
            tracing::warn!(mac = %req.mac, "cannot encode DHCP reply");
            continue;
        };
        match sock.send_to(&bytes, dest) {
            Ok(_) => tracing::debug!(mac = %req.mac, ?reply, "DHCP reply sent"),
            Err(e) => tracing::warn!(error = %e, mac = %req.mac, "cannot send DHCP reply"),
        }
    }
    tracing::debug!("DHCP server stopped");
}
