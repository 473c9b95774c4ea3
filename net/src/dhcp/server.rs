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
use std::io;
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};

use super::lease::LeaseFile;
use super::Counters;
use super::packet::{build_reply, decide, encode, parse_request, Ignored, ServerParams};
use super::DhcpError;
use crate::ratelog::RateLimitedLog;
use crate::spec::MacAddr;

/// At most one log line per this interval for each kind of trouble outsiders can cause.
const LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Receive buffer: larger than a bridge's usual 1500-byte MTU, so a normal message is never
/// cut; a longer datagram is cut here, loses its End option and is dropped as malformed.
const RECV_BUF: usize = 4096;

/// Debug builds only, for tests of microvm's panic hook: `MICROVM_TEST_PANIC=dhcp` makes
/// the DHCP thread panic on each datagram it receives (the hook must tear the network down
/// and exit); `MICROVM_TEST_PANIC=dhcp-contained` makes the decoding of each datagram
/// panic inside the containment (the hook must let the process live; the panic is logged).
#[cfg(debug_assertions)]
pub(crate) const TEST_PANIC_ENV: &str = "MICROVM_TEST_PANIC";

/// MACs this process answers for, with a count per MAC (two NICs may share a MAC).
pub(crate) type OwnedMacs = Arc<Mutex<HashMap<MacAddr, usize>>>;

/// Tells the server thread to stop: an eventfd the thread polls beside its socket, so
/// stopping takes effect at once instead of after a receive timeout.
#[derive(Debug)]
pub(crate) struct StopSignal(OwnedFd);

impl StopSignal {
    pub fn new() -> io::Result<StopSignal> {
        // SAFETY: eventfd takes no pointers; the result is checked before use.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor owned by nobody else.
        Ok(StopSignal(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// Wakes the thread; it leaves its loop. (An eventfd write of 1 cannot block or fail
    /// short of 2^64 - 2 pending increments.)
    pub fn raise(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to an eventfd we own.
        let _ = unsafe { libc::write(self.0.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }

    /// Waits up to `timeout` for the signal (a back-off that a stop cuts short); true if
    /// it was raised.
    pub fn wait(&self, timeout: Duration) -> bool {
        let mut fd = libc::pollfd { fd: self.0.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
        // SAFETY: one live pollfd for the duration of the call; the fd is owned by `self`.
        let rc = unsafe { libc::poll(&mut fd, 1, ms) };
        rc > 0 && fd.revents != 0
    }
}

/// Opens the server socket on `bridge`. Done in the caller's thread so errors surface
/// from `attach`.
pub(crate) fn open_socket(bridge: &str) -> Result<UdpSocket, DhcpError> {
    let err = |source| DhcpError::Socket { bridge: bridge.to_string(), source };
    let sock = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).map_err(err)?;
    sock.set_reuse_address(true).map_err(err)?;
    sock.set_broadcast(true).map_err(err)?;
    sock.bind_device(Some(bridge.as_bytes())).map_err(err)?;
    sock.bind(&SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 67).into()).map_err(err)?;
    // Read only after poll says so; nonblocking so a spurious wakeup cannot hang the thread.
    sock.set_nonblocking(true).map_err(err)?;
    Ok(sock.into())
}

/// Rate limiters for the log lines of one server thread, and its drop counters.
struct Logs {
    counters: Arc<Counters>,
    malformed: RateLimitedLog,
    decoder_panic: RateLimitedLog,
    io: RateLimitedLog,
    reply: RateLimitedLog,
}

/// Serves until `stop` is raised.
pub(crate) fn serve(
    sock: UdpSocket,
    network: String,
    params: ServerParams,
    leases: LeaseFile,
    macs: OwnedMacs,
    stop: Arc<StopSignal>,
    counters: Arc<Counters>,
) {
    let span = tracing::info_span!("dhcp", network = %network);
    let _enter = span.enter();
    tracing::debug!(server = %params.server_ip(), "DHCP server started");
    #[cfg(debug_assertions)]
    let test_panic = std::env::var(TEST_PANIC_ENV).ok();
    let mut logs = Logs {
        counters,
        malformed: RateLimitedLog::new(LOG_INTERVAL),
        decoder_panic: RateLimitedLog::new(LOG_INTERVAL),
        io: RateLimitedLog::new(LOG_INTERVAL),
        reply: RateLimitedLog::new(LOG_INTERVAL),
    };
    let mut buf = [0u8; RECV_BUF];
    let mut fds = [
        libc::pollfd { fd: sock.as_raw_fd(), events: libc::POLLIN, revents: 0 },
        libc::pollfd { fd: stop.0.as_raw_fd(), events: libc::POLLIN, revents: 0 },
    ];
    loop {
        for f in &mut fds {
            f.revents = 0;
        }
        // SAFETY: `fds` is a live array of 2 pollfds for the duration of the call; the fds
        // are owned by `sock` and `stop`, which outlive the loop.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                if let Some(count) = logs.io.hit() {
                    tracing::warn!(error = %e, count, "DHCP poll failed");
                }
                // Not expected (ENOMEM at worst); do not spin, but stop at once if asked.
                if stop.wait(Duration::from_millis(100)) {
                    break;
                }
            }
            continue;
        }
        if fds[1].revents != 0 {
            break;
        }
        if fds[0].revents == 0 {
            continue;
        }
        let n = match sock.recv_from(&mut buf) {
            Ok((n, _)) => n,
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted) => continue,
            Err(e) => {
                if let Some(count) = logs.io.hit() {
                    tracing::warn!(error = %e, count, "DHCP receive failed");
                }
                // Should an error repeat on every read, do not spin, but stop at once if asked.
                if stop.wait(Duration::from_millis(10)) {
                    break;
                }
                continue;
            }
        };
        #[cfg(debug_assertions)]
        match test_panic.as_deref() {
            Some("dhcp") => panic!("{TEST_PANIC_ENV}=dhcp: test-triggered panic in the DHCP server thread"),
            Some("dhcp-contained") => {
                let res = crate::contain::contain(|| panic!("{TEST_PANIC_ENV}=dhcp-contained: test-triggered decoder panic"));
                if let Err(msg) = res {
                    decoder_panic(&mut logs, &msg);
                }
                continue;
            }
            _ => {}
        }
        handle(&sock, &buf[..n], &params, &leases, &macs, &mut logs);
    }
    tracing::debug!("DHCP server stopped");
}

fn decoder_panic(logs: &mut Logs, msg: &str) {
    logs.counters.decoder_panics.fetch_add(1, Ordering::Relaxed);
    if let Some(count) = logs.decoder_panic.hit() {
        tracing::error!(count, panic = %msg, "DHCP decoder panicked on a packet (contained; packet dropped)");
    }
}

/// Answers one datagram if it is a request for one of our MACs.
fn handle(sock: &UdpSocket, datagram: &[u8], params: &ServerParams, leases: &LeaseFile, macs: &OwnedMacs, logs: &mut Logs) {
    let (msg, req) = match parse_request(datagram) {
        Ok(parsed) => parsed,
        Err(Ignored::NotARequest) => return,
        Err(Ignored::Malformed(why)) => {
            logs.counters.malformed.fetch_add(1, Ordering::Relaxed);
            if let Some(count) = logs.malformed.hit() {
                tracing::warn!(count, last = %why, "dropping malformed DHCP packets");
            }
            return;
        }
        Err(Ignored::DecoderPanic(msg)) => {
            decoder_panic(logs, &msg);
            return;
        }
    };
    let owned = macs.lock().unwrap_or_else(|e| e.into_inner()).contains_key(&req.mac);
    if !owned {
        return;
    }
    let reply = decide(&req, params.server_ip(), || match leases.allocate(req.mac) {
        Ok(Some(ip)) => Some(ip),
        Ok(None) => {
            if let Some(count) = logs.reply.hit() {
                tracing::warn!(mac = %req.mac, count, "DHCP pool exhausted");
            }
            None
        }
        Err(e) => {
            if let Some(count) = logs.reply.hit() {
                tracing::warn!(error = %e, count, path = %leases.path().display(), "cannot update DHCP leases");
            }
            None
        }
    });
    let Some(reply) = reply else {
        return;
    };
    let out = build_reply(&msg, params, reply);
    let Some(bytes) = encode(&out) else {
        if let Some(count) = logs.reply.hit() {
            tracing::warn!(mac = %req.mac, count, "cannot encode DHCP reply");
        }
        return;
    };
    match sock.send_to(&bytes, SocketAddrV4::new(Ipv4Addr::BROADCAST, 68)) {
        Ok(_) => tracing::debug!(mac = %req.mac, ?reply, "DHCP reply sent"),
        Err(e) => {
            if let Some(count) = logs.reply.hit() {
                tracing::warn!(error = %e, count, mac = %req.mac, "cannot send DHCP reply");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    /// What makes exits fast: the server thread sleeps in poll() on its socket and the stop
    /// eventfd, with no timeout, so raising the stop ends it at once (it used to notice
    /// only at its next read timeout, ~200 ms later). Checked on a loopback socket, which
    /// `serve` treats like its bridge socket.
    #[test]
    fn server_thread_stops_within_milliseconds_of_being_asked() {
        let mut took = Vec::new();
        for _ in 0..5 {
            let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
            sock.set_nonblocking(true).unwrap();
            let subnet = crate::spec::Subnet::from_octets(10, 200, 9);
            let params = ServerParams { subnet, dns: Vec::new(), lease_secs: 60, mtu: None };
            let leases = LeaseFile::new(std::env::temp_dir().join("mvnet-never-written"), subnet, 60);
            let stop = Arc::new(StopSignal::new().unwrap());
            let s = stop.clone();
            let thread = std::thread::spawn(move || {
                serve(sock, "t".into(), params, leases, Arc::default(), s, Arc::default());
            });
            // Let it reach its wait (it would otherwise see the stop on its first poll).
            std::thread::sleep(Duration::from_millis(30));
            assert!(!thread.is_finished());
            let asked = Instant::now();
            stop.raise();
            thread.join().unwrap();
            took.push(asked.elapsed());
        }
        took.sort();
        println!("DHCP thread stop latency: {took:?}");
        // The median is a wake-up and a join; the worst case allows for a loaded host's
        // scheduling, still far below any timeout-based design.
        assert!(took[2] < Duration::from_millis(10), "{took:?}");
        assert!(took[4] < Duration::from_millis(100), "{took:?}");
    }

    #[test]
    fn back_off_is_cut_short_by_a_stop() {
        let stop = StopSignal::new().unwrap();
        let t = Instant::now();
        assert!(!stop.wait(Duration::from_millis(20)));
        assert!(t.elapsed() >= Duration::from_millis(20));
        stop.raise();
        let t = Instant::now();
        assert!(stop.wait(Duration::from_secs(10)));
        assert!(t.elapsed() < Duration::from_secs(1));
    }
}
