//! DHCP for named networks: one responder thread per (process, network), answering only
//! for the MACs this process's attachments own. Packets are encoded and decoded with
//! `dhcproto`; the decisions live in [`packet`] (pure), leases in [`lease`].
//!
//! Options offered: subnet mask, router (= gateway .1), lease time 1 h (T1 30 min, T2
//! 52.5 min), server id (= gateway), and DNS servers:
//! * NAT networks: the host's IPv4 nameservers from /etc/resolv.conf, skipping 127.x
//!   (local stubs are unreachable from a guest); if that leaves none (e.g. systemd-resolved's
//!   127.0.0.53), those of /run/systemd/resolve/resolv.conf; if still none, no DNS option
//!   (we do not offer the gateway: no DNS server listens there).
//! * host-only networks: no DNS option (the guest cannot reach anything beyond the host).
//! * overlay networks: the interface MTU (option 26), the VXLAN port's (underlay - 50).

mod derive;
pub(crate) mod lease;
pub(crate) mod packet;
mod server;
pub(crate) mod wire;

use std::collections::HashMap;
use std::io;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;

use crate::spec::{MacAddr, Subnet};
use lease::LeaseFile;
use packet::ServerParams;
use server::{OwnedMacs, StopSignal};

/// Lease time offered to guests.
pub const LEASE_SECS: u32 = 3600;

/// DHCP server errors.
#[derive(Debug, thiserror::Error)]
pub enum DhcpError {
    #[error("cannot open the DHCP server socket on {bridge}")]
    Socket {
        bridge: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot confine the DHCP server thread for network {network}")]
    ThreadStart {
        network: String,
        #[source]
        source: crate::HookError,
    },
    #[error("cannot start the DHCP server thread for network {network}")]
    Spawn {
        network: String,
        #[source]
        source: io::Error,
    },
    #[error("the DHCP server thread of network {network} panicked")]
    ThreadPanicked { network: String },
}

/// What a network's DHCP server needs.
#[derive(Clone, Debug)]
pub(crate) struct DhcpNetwork {
    pub name: String,
    pub bridge: String,
    pub subnet: Subnet,
    pub lease_path: PathBuf,
    pub offer_dns: bool,
    /// Overlay networks: the guests' MTU (option 26), and addresses derived from MACs.
    pub overlay_mtu: Option<u16>,
}

impl DhcpNetwork {
    fn lease_file(&self) -> LeaseFile {
        let file = LeaseFile::new(self.lease_path.clone(), self.subnet, u64::from(LEASE_SECS));
        if self.overlay_mtu.is_some() {
            file.derived()
        } else {
            file
        }
    }
}

struct Running {
    macs: OwnedMacs,
    stop: Arc<StopSignal>,
    counters: Arc<Counters>,
    thread: Option<JoinHandle<()>>,
}

/// Packets a server dropped, counted by its thread.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub malformed: AtomicU64,
    pub decoder_panics: AtomicU64,
}

/// What a network's DHCP server in this process has dropped so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DhcpStats {
    /// Refused by the wire check (see the `wire` module) before decoding.
    pub malformed: u64,
    /// Contained panics of the decoder (a case the wire check misses; expected 0).
    pub decoder_panics: u64,
}

fn servers() -> &'static Mutex<HashMap<String, Running>> {
    static SERVERS: OnceLock<Mutex<HashMap<String, Running>>> = OnceLock::new();
    SERVERS.get_or_init(|| Mutex::new(HashMap::new()))
}

/// While alive, this process's DHCP server on the network answers for `mac`. Ended by
/// [`DhcpRegistration::release`], or on drop as a fallback.
#[derive(Debug)]
pub(crate) struct DhcpRegistration {
    network: String,
    mac: MacAddr,
    released: bool,
}

/// Starts the network's server in this process if needed and adds `mac` to its MACs.
pub(crate) fn register(net: &DhcpNetwork, mac: MacAddr) -> Result<DhcpRegistration, DhcpError> {
    let mut map = servers().lock().unwrap_or_else(|e| e.into_inner());
    if let Some(running) = map.get(&net.name) {
        *running.macs.lock().unwrap_or_else(|e| e.into_inner()).entry(mac).or_insert(0) += 1;
        return Ok(DhcpRegistration { network: net.name.clone(), mac, released: false });
    }
    let sock = server::open_socket(&net.bridge)?;
    let params = ServerParams {
        subnet: net.subnet,
        dns: if net.offer_dns { host_dns() } else { Vec::new() },
        lease_secs: LEASE_SECS,
        mtu: net.overlay_mtu,
    };
    let leases = net.lease_file();
    let macs: OwnedMacs = Arc::new(Mutex::new(HashMap::from([(mac, 1)])));
    let spawn_err = |source| DhcpError::Spawn { network: net.name.clone(), source };
    let stop = Arc::new(StopSignal::new().map_err(spawn_err)?);
    let counters = Arc::new(Counters::default());
    let (m, s, c, name) = (macs.clone(), stop.clone(), counters.clone(), net.name.clone());
    // The thread runs the start hook (microvm's seccomp filter) before it reads a packet,
    // and reports the hook's result here so a failure fails `attach`.
    let (started_tx, started_rx) = std::sync::mpsc::sync_channel(1);
    let thread = std::thread::Builder::new()
        .name(format!("dhcp-{}", net.name))
        .spawn(move || {
            let hooked = crate::thread_hook::run("dhcp");
            let ok = hooked.is_ok();
            let _ = started_tx.send(hooked);
            if ok {
                server::serve(sock, name, params, leases, m, s, c);
            }
        })
        .map_err(spawn_err)?;
    let hook_err = |source| DhcpError::ThreadStart { network: net.name.clone(), source };
    match started_rx.recv() {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            let _ = thread.join();
            return Err(hook_err(e));
        }
        Err(_) => {
            let _ = thread.join();
            return Err(hook_err("the thread ended before starting".into()));
        }
    }
    map.insert(net.name.clone(), Running { macs, stop, counters, thread: Some(thread) });
    Ok(DhcpRegistration { network: net.name.clone(), mac, released: false })
}

impl DhcpRegistration {
    /// Stops answering for the MAC; the last registration on a network stops and joins its
    /// thread (at once: the thread waits on a stop eventfd, not a timeout).
    pub fn release(mut self) -> Result<(), DhcpError> {
        self.released = true;
        unregister(&self.network, self.mac)
    }
}

impl Drop for DhcpRegistration {
    /// Fallback for registrations not ended by `release` (e.g. rollback of a failed attach).
    fn drop(&mut self) {
        if !self.released {
            if let Err(e) = unregister(&self.network, self.mac) {
                tracing::warn!(error = %e, "DHCP server stopped with an error");
            }
        }
    }
}

fn unregister(network: &str, mac: MacAddr) -> Result<(), DhcpError> {
    let mut map = servers().lock().unwrap_or_else(|e| e.into_inner());
    let Some(running) = map.get_mut(network) else {
        return Ok(());
    };
    let now_empty = {
        let mut macs = running.macs.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = macs.get_mut(&mac) {
            *count -= 1;
            if *count == 0 {
                macs.remove(&mac);
            }
        }
        macs.is_empty()
    };
    if !now_empty {
        return Ok(());
    }
    running.stop.raise();
    let thread = running.thread.take();
    map.remove(network);
    // Join without holding the map: other networks' servers stay usable meanwhile.
    drop(map);
    match thread.map(JoinHandle::join) {
        Some(Err(_)) => Err(DhcpError::ThreadPanicked { network: network.to_string() }),
        _ => Ok(()),
    }
}

/// The address the network's DHCP server hands `mac` (allocated, or renewed, now in the
/// shared lease file); `None` when the pool is full of leases of `live` MACs (the network's
/// live VMs) and unexpired ones. On an overlay network a new address is one `in_use` (a
/// probe of the other hosts) does not report taken. A MAC without a lease gets `want` (a
/// restored guest's address) if no live VM holds it.
pub(crate) fn lease_for(
    net: &DhcpNetwork,
    mac: MacAddr,
    want: Option<Ipv4Addr>,
    live: &[MacAddr],
    in_use: impl FnMut(Ipv4Addr) -> bool,
) -> io::Result<Option<Ipv4Addr>> {
    net.lease_file().allocate_checked(mac, want, Some(live), in_use)
}

/// Whether this process runs a DHCP server for `network` (for tests and diagnostics).
pub fn server_running(network: &str) -> bool {
    servers().lock().unwrap_or_else(|e| e.into_inner()).contains_key(network)
}

/// Drop counters of this process's DHCP server for `network`, if it runs one (for tests and
/// diagnostics).
pub fn stats(network: &str) -> Option<DhcpStats> {
    let map = servers().lock().unwrap_or_else(|e| e.into_inner());
    map.get(network).map(|r| DhcpStats {
        malformed: r.counters.malformed.load(Ordering::Relaxed),
        decoder_panics: r.counters.decoder_panics.load(Ordering::Relaxed),
    })
}

/// DNS servers to offer NAT guests (see the module docs).
pub(crate) fn host_dns() -> Vec<Ipv4Addr> {
    for path in ["/etc/resolv.conf", "/run/systemd/resolve/resolv.conf"] {
        if let Ok(text) = std::fs::read_to_string(path) {
            let found = parse_resolv_conf(&text);
            if !found.is_empty() {
                return found;
            }
        }
    }
    Vec::new()
}

/// IPv4 `nameserver` lines, without loopback/unspecified ones, at most 3 (resolv.conf's limit).
pub(crate) fn parse_resolv_conf(text: &str) -> Vec<Ipv4Addr> {
    let mut out = Vec::new();
    for line in text.lines() {
        let mut it = line.split_whitespace();
        if it.next() != Some("nameserver") {
            continue;
        }
        if let Some(Ok(ip)) = it.next().map(str::parse::<Ipv4Addr>) {
            if !ip.is_loopback() && !ip.is_unspecified() && !out.contains(&ip) && out.len() < 3 {
                out.push(ip);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolv_conf() {
        let text = "# comment\nnameserver 127.0.0.53\nnameserver 9.9.9.9\nsearch x\n\
                    nameserver ::1\nnameserver 1.1.1.1 \n nameserver 9.9.9.9\nnameserver 0.0.0.0\n\
                    nameserver 8.8.8.8\nnameserver 8.8.4.4\n";
        assert_eq!(
            parse_resolv_conf(text),
            vec![Ipv4Addr::new(9, 9, 9, 9), Ipv4Addr::new(1, 1, 1, 1), Ipv4Addr::new(8, 8, 8, 8)]
        );
        assert!(parse_resolv_conf("nameserver 127.0.0.53\n").is_empty());
        assert!(parse_resolv_conf("").is_empty());
    }
}

/// The server's whole packet path on `buf` without sockets or files: the wire check, the
/// decode (NOT contained here, so a decoder panic the check lets through is a fuzzer
/// crash), the decision with an in-memory lease table, and the encoded reply.
#[cfg(feature = "fuzzing")]
pub fn fuzz_packet(buf: &[u8]) {
    use dhcproto::Decodable;
    if wire::check(buf).is_ok() {
        let _ = dhcproto::v4::Message::from_bytes(buf);
    }
    let Ok((msg, req)) = packet::parse_request(buf) else { return };
    let subnet = Subnet::from_octets(10, 200, 7);
    let params = ServerParams { subnet, dns: vec![Ipv4Addr::new(10, 200, 7, 1)], lease_secs: LEASE_SECS, mtu: Some(1450) };
    let mut table = lease::LeaseTable::default();
    let Some(reply) = packet::decide(&req, params.server_ip(), || table.allocate(req.mac, None, subnet, 1, u64::from(LEASE_SECS), None))
    else {
        return;
    };
    let out = packet::build_reply(&msg, &params, reply);
    let bytes = packet::encode(&out).expect("our own reply always encodes");
    assert!(wire::check(&bytes).is_ok(), "our own reply fails our wire check");
}
