//! Is an address in use on the other hosts of an overlay? An ARP probe (RFC 5227: sender
//! address 0.0.0.0, so nobody's ARP cache learns anything) sent straight out of the
//! network's VXLAN device, which floods it to every peer; a guest anywhere holding the
//! address answers. Run while joining, before the guest exists, in the unconfined setup
//! thread (the DHCP thread only hands out the lease chosen here), under the lease file's
//! lock.
//!
//! The socket is an AF_PACKET socket bound to the VXLAN device for all protocols: taps of
//! that kind see a frame arriving from the overlay before the bridge takes it (a socket for
//! ARP alone would be served after the bridge, which consumes the frame). Hand-written with
//! libc: a send and a poll loop over one socket, for which no crate's abstraction helps.

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

/// How long one address is probed: three probes over this time, any answer ends it.
pub(crate) const PROBE_TIME: Duration = Duration::from_millis(900);
const PROBES: u32 = 3;

const ETH_P_ARP: u16 = 0x0806;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_ALL: u16 = 0x0003;
const ARP_REQUEST: u16 = 1;
/// Ethernet header (14) + ARP for IPv4 over Ethernet (28).
const FRAME_LEN: usize = 42;

/// An ARP probe for `ip` from `mac`, broadcast.
pub(crate) fn probe_frame(mac: [u8; 6], ip: Ipv4Addr) -> [u8; FRAME_LEN] {
    let mut f = [0u8; FRAME_LEN];
    f[0..6].copy_from_slice(&[0xff; 6]);
    f[6..12].copy_from_slice(&mac);
    f[12..14].copy_from_slice(&ETH_P_ARP.to_be_bytes());
    f[14..16].copy_from_slice(&1u16.to_be_bytes()); // hardware: Ethernet
    f[16..18].copy_from_slice(&ETH_P_IP.to_be_bytes());
    f[18] = 6;
    f[19] = 4;
    f[20..22].copy_from_slice(&ARP_REQUEST.to_be_bytes());
    f[22..28].copy_from_slice(&mac); // sender MAC; sender IP 0.0.0.0
    // target MAC 0; target IP:
    f[38..42].copy_from_slice(&ip.octets());
    f
}

/// Whether a received frame says `ip` is taken: an ARP packet (not ours) whose sender is
/// `ip` (a reply to the probe, or any ARP of the holder), or another probe for `ip` (a host
/// choosing the same address at this moment: both move on).
pub(crate) fn shows_conflict(frame: &[u8], ip: Ipv4Addr, own_mac: [u8; 6]) -> bool {
    let Some(arp) = frame.get(14..FRAME_LEN) else {
        return false;
    };
    let be16 = |b: &[u8]| u16::from_be_bytes([b[0], b[1]]);
    if be16(&frame[12..14]) != ETH_P_ARP || be16(&arp[0..2]) != 1 || be16(&arp[2..4]) != ETH_P_IP || arp[4] != 6 || arp[5] != 4 {
        return false;
    }
    let sender_mac = &arp[8..14];
    if sender_mac == own_mac || frame[6..12] == own_mac {
        return false;
    }
    let sender_ip = Ipv4Addr::new(arp[14], arp[15], arp[16], arp[17]);
    let target_ip = Ipv4Addr::new(arp[24], arp[25], arp[26], arp[27]);
    sender_ip == ip || (be16(&arp[6..8]) == ARP_REQUEST && sender_ip.is_unspecified() && target_ip == ip)
}

/// A packet socket on one VXLAN device.
pub(crate) struct Prober {
    fd: OwnedFd,
    mac: [u8; 6],
}

impl Prober {
    /// Opens the socket on device `ifindex`, whose address is `mac`.
    pub fn open(ifindex: u32, mac: [u8; 6]) -> io::Result<Prober> {
        let proto = ETH_P_ALL.to_be();
        // SAFETY: socket(2) takes no pointers; the result is checked.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK, i32::from(proto)) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: sockaddr_ll is plain old data; all-zero is a valid value.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = proto;
        addr.sll_ifindex = i32::try_from(ifindex).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: `addr` is a live sockaddr_ll and the length is its size.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Prober { fd, mac })
    }

    /// Probes `ip` for [`PROBE_TIME`]; true if someone answered for it.
    pub fn in_use(&self, ip: Ipv4Addr) -> io::Result<bool> {
        let frame = probe_frame(self.mac, ip);
        let start = Instant::now();
        let mut buf = [0u8; 128];
        for i in 0..PROBES {
            // SAFETY: sends FRAME_LEN bytes from a live array on our bound packet socket.
            let rc = unsafe { libc::send(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
            if rc < 0 {
                return Err(io::Error::last_os_error());
            }
            let until = PROBE_TIME * (i + 1) / PROBES;
            loop {
                let left = until.saturating_sub(start.elapsed());
                if left.is_zero() {
                    break;
                }
                let mut pfd = libc::pollfd { fd: self.fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
                let ms = libc::c_int::try_from(left.as_millis().max(1)).unwrap_or(libc::c_int::MAX);
                // SAFETY: one live pollfd for the duration of the call.
                if unsafe { libc::poll(&mut pfd, 1, ms) } <= 0 {
                    continue;
                }
                // Drain what is queued (nonblocking socket).
                loop {
                    // SAFETY: receives into a live buffer of the given length.
                    let n = unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
                    if n < 0 {
                        break;
                    }
                    let n = usize::try_from(n).unwrap_or(0).min(buf.len());
                    if shows_conflict(&buf[..n], ip, self.mac) {
                        return Ok(true);
                    }
                }
            }
        }
        Ok(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OWN: [u8; 6] = [0x02, 0, 0, 0, 0, 1];
    const OTHER: [u8; 6] = [0x52, 0x54, 0, 0, 0, 9];

    fn ip(n: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, 77, 0, n)
    }

    /// An ARP packet from `mac` (op, sender ip, target ip).
    fn arp(mac: [u8; 6], op: u16, spa: Ipv4Addr, tpa: Ipv4Addr) -> Vec<u8> {
        let mut f = probe_frame(mac, tpa).to_vec();
        f[20..22].copy_from_slice(&op.to_be_bytes());
        f[28..32].copy_from_slice(&spa.octets());
        f
    }

    #[test]
    fn probe_layout() {
        let f = probe_frame(OWN, ip(7));
        assert_eq!(&f[0..6], &[0xff; 6]);
        assert_eq!(&f[6..12], &OWN);
        assert_eq!(&f[12..14], &[0x08, 0x06]);
        assert_eq!(&f[14..22], &[0, 1, 0x08, 0, 6, 4, 0, 1]);
        assert_eq!(&f[22..28], &OWN);
        assert_eq!(&f[28..32], &[0, 0, 0, 0], "a probe: sender IP 0.0.0.0");
        assert_eq!(&f[32..38], &[0; 6]);
        assert_eq!(&f[38..42], &[10, 77, 0, 7]);
    }

    #[test]
    fn what_counts_as_taken() {
        // The holder answers (a reply to the probe goes to 0.0.0.0).
        assert!(shows_conflict(&arp(OTHER, 2, ip(7), Ipv4Addr::UNSPECIFIED), ip(7), OWN));
        // The holder asks for someone else.
        assert!(shows_conflict(&arp(OTHER, 1, ip(7), ip(3)), ip(7), OWN));
        // Another host probes for the same address now.
        assert!(shows_conflict(&arp(OTHER, 1, Ipv4Addr::UNSPECIFIED, ip(7)), ip(7), OWN));
        // Not about ip 7, or our own probe seen going out.
        assert!(!shows_conflict(&arp(OTHER, 2, ip(8), ip(7)), ip(7), OWN));
        assert!(!shows_conflict(&arp(OTHER, 1, ip(3), ip(7)), ip(7), OWN), "someone asking for it is no holder");
        assert!(!shows_conflict(&probe_frame(OWN, ip(7)), ip(7), OWN));
        // Not ARP, truncated, garbage.
        let mut ipv4 = arp(OTHER, 2, ip(7), ip(1));
        ipv4[12..14].copy_from_slice(&[0x08, 0x00]);
        assert!(!shows_conflict(&ipv4, ip(7), OWN));
        assert!(!shows_conflict(&arp(OTHER, 2, ip(7), ip(1))[..41], ip(7), OWN));
        assert!(!shows_conflict(&[], ip(7), OWN));
        assert!(!shows_conflict(&[0xff; 60], ip(7), OWN));
    }
}
