//! Waiting for a link to be unregistered, from the kernel's link notifications
//! (RTNLGRP_LINK): deleting a link returns only after the kernel's RCU barrier (20-50 ms
//! here), but the link is gone from every lookup, and carries no frame, well before. Work
//! that must come after the link is gone (a network's firewall rules, see
//! `network::cleanup::teardown_network`) can then start while the deletion still waits.
//!
//! Why by hand: rtnetlink's connection delivers notifications through an async channel of
//! its runtime; this is one blocking socket, polled beside a cancel fd, and all it reads of
//! a notification is two fixed headers (nlmsghdr, ifinfomsg), bounds-checked.

use std::io;
use std::os::fd::{AsFd, AsRawFd};

use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

/// `RTMGRP_LINK`: the link notification group, as a bind mask.
const RTMGRP_LINK: u32 = 1;
/// `RTM_DELLINK`.
const RTM_DELLINK: u16 = 17;
/// `struct nlmsghdr`: len u32, type u16, flags u16, seq u32, pid u32.
const NLMSG_HDR_LEN: usize = 16;
/// `struct ifinfomsg` up to and including `ifi_index` (family u8, pad u8, type u16, index i32).
const IFINFO_INDEX_END: usize = 8;

/// A subscription to link notifications, opened before the deletion it waits for is
/// requested, so that the notification cannot be missed.
pub(crate) struct LinkWatch {
    sock: Socket,
}

impl LinkWatch {
    pub fn open() -> io::Result<LinkWatch> {
        let mut sock = Socket::new(NETLINK_ROUTE)?;
        sock.bind(&SocketAddr::new(0, RTMGRP_LINK))?;
        sock.set_non_blocking(true)?;
        Ok(LinkWatch { sock })
    }

    /// Blocks until the kernel reports link `index` deleted (true), or until `cancel` is
    /// readable or closed (false). If notifications were lost (the socket overran) or cannot
    /// be read, only `cancel` ends the wait: a false "gone" is never returned.
    pub fn wait_deleted(&self, index: u32, cancel: &impl AsFd) -> bool {
        let mut buf = vec![0u8; 64 * 1024];
        let mut watching = true;
        loop {
            let mut fds = [
                libc::pollfd { fd: cancel.as_fd().as_raw_fd(), events: libc::POLLIN, revents: 0 },
                libc::pollfd { fd: self.sock.as_raw_fd(), events: libc::POLLIN, revents: 0 },
            ];
            let n = if watching { 2 } else { 1 };
            // SAFETY: `fds` is a live array of at least `n` pollfds for the duration of the
            // call; both fds are owned by `cancel` and `self`, which outlive it.
            let rc = unsafe { libc::poll(fds.as_mut_ptr(), n as libc::nfds_t, -1) };
            if rc < 0 {
                if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                // Not expected (ENOMEM at worst): the caller then goes on at once, as it
                // would have without a watch once the deletion returned.
                return false;
            }
            if fds[0].revents != 0 {
                return false;
            }
            if !watching || fds[1].revents == 0 {
                continue;
            }
            loop {
                match self.sock.recv(&mut &mut buf[..], 0) {
                    Ok(len) => {
                        if deleted_in(&buf[..len.min(buf.len())], index) {
                            return true;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        tracing::debug!(error = %e, "link notifications lost; waiting for the deletion to return");
                        watching = false;
                        break;
                    }
                }
            }
        }
    }
}

/// Whether a datagram of netlink messages holds an RTM_DELLINK for link `index`.
fn deleted_in(mut buf: &[u8], index: u32) -> bool {
    while buf.len() >= NLMSG_HDR_LEN {
        let len = u32::from_ne_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        if len < NLMSG_HDR_LEN || len > buf.len() {
            return false;
        }
        let kind = u16::from_ne_bytes([buf[4], buf[5]]);
        let body = &buf[NLMSG_HDR_LEN..len];
        if kind == RTM_DELLINK && body.len() >= IFINFO_INDEX_END {
            let ifi_index = i32::from_ne_bytes([body[4], body[5], body[6], body[7]]);
            if u32::try_from(ifi_index).ok() == Some(index) {
                return true;
            }
        }
        // Messages are 4-byte aligned (NLMSG_ALIGN).
        let next = len.checked_add(3).map(|l| l & !3).unwrap_or(usize::MAX);
        buf = buf.get(next..).unwrap_or(&[]);
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(kind: u16, index: i32) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(&(NLMSG_HDR_LEN as u32 + 16 + 2).to_ne_bytes());
        m.extend_from_slice(&kind.to_ne_bytes());
        m.extend_from_slice(&[0; 10]);
        m.extend_from_slice(&[0, 0, 1, 0]);
        m.extend_from_slice(&index.to_ne_bytes());
        m.extend_from_slice(&[0; 8]);
        m.extend_from_slice(&[0xaa, 0xbb, 0, 0]); // 2 bytes of attribute, then alignment
        m
    }

    /// Link notifications, in a test namespace.
    #[test]
    fn reports_the_deletion_and_honours_cancel() {
        microvm_tests::netns::outer();
        let ns = microvm_tests::netns::Netns::new("watch");
        ns.run_inner("bridge::watch::tests::inner_watch", &[]);
    }

    #[test]
    #[ignore = "started by its outer test inside a test namespace"]
    fn inner_watch() {
        use microvm_tests::netns::{link_exists, sh};
        use std::os::unix::net::UnixStream;
        microvm_tests::netns::inner();
        let index = |dev: &str| -> u32 { sh(&format!("cat /sys/class/net/{dev}/ifindex")).trim().parse().unwrap() };
        sh("ip link add mvwatch0 type bridge && ip link add mvwatch1 type bridge");
        let (i0, i1) = (index("mvwatch0"), index("mvwatch1"));

        // Cancelled: the link is still there, and the wait says so.
        let watch = LinkWatch::open().unwrap();
        let (done, returned) = UnixStream::pair().unwrap();
        drop(done);
        assert!(!watch.wait_deleted(i0, &returned));
        assert!(link_exists("mvwatch0"));

        // Another link's deletion does not end the wait; this one's does, while the cancel
        // end is still open.
        let watch = LinkWatch::open().unwrap();
        let (done, returned) = UnixStream::pair().unwrap();
        let deleter = std::thread::spawn(|| sh("ip link del mvwatch1 && ip link del mvwatch0"));
        assert!(watch.wait_deleted(i0, &returned));
        assert!(!link_exists("mvwatch0") && i0 != i1);
        deleter.join().unwrap();
        drop(done);
    }

    #[test]
    fn finds_the_deletion_among_other_messages() {
        let mut buf = msg(16, 7); // RTM_NEWLINK of the same link
        buf.extend(msg(RTM_DELLINK, 8));
        assert!(!deleted_in(&buf, 7));
        buf.extend(msg(RTM_DELLINK, 7));
        assert!(deleted_in(&buf, 7) && deleted_in(&buf, 8));
    }

    #[test]
    fn malformed_datagrams_are_not_a_deletion() {
        let good = msg(RTM_DELLINK, 7);
        for cut in 0..good.len() - 2 {
            // A message cut short (its length beyond the datagram) is never read.
            assert!(!deleted_in(&good[..cut], 7), "cut at {cut}");
        }
        let mut zero_len = good.clone();
        zero_len[..4].copy_from_slice(&0u32.to_ne_bytes());
        assert!(!deleted_in(&zero_len, 7));
        let mut short_body = good.clone();
        short_body[..4].copy_from_slice(&(NLMSG_HDR_LEN as u32 + 4).to_ne_bytes());
        assert!(!deleted_in(&short_body, 7));
        assert!(!deleted_in(&msg(RTM_DELLINK, -1), u32::MAX));
    }
}
