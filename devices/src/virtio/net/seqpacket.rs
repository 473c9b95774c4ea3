//! A [`NetBackend`] over one end of a `socketpair(AF_UNIX, SOCK_SEQPACKET)`: each message is one
//! frame with its 12-byte vnet header. For tests (of this crate and of the VMM): the other end
//! plays the host network.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use super::NetBackend;

/// One end of a seqpacket socket pair, non-blocking.
#[derive(Debug)]
pub struct SeqpacketBackend {
    fd: OwnedFd,
    offload: Arc<AtomicU32>,
}

impl SeqpacketBackend {
    /// A connected pair: the backend (non-blocking) and the peer socket (blocking), on which
    /// the test sends frames to the guest and receives the guest's frames.
    pub fn pair() -> io::Result<(SeqpacketBackend, OwnedFd)> {
        let mut fds = [-1 as RawFd; 2];
        // SAFETY: socketpair writes two fds into the 2-element array on success; return value
        // checked.
        let ret = unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
                0,
                fds.as_mut_ptr(),
            )
        };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: both fds were just created by socketpair and are owned by nobody else.
        let (ours, peer) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        set_nonblocking(ours.as_raw_fd())?;
        Ok((
            SeqpacketBackend {
                fd: ours,
                offload: Arc::new(AtomicU32::new(0)),
            },
            peer,
        ))
    }

    /// Shared view of the last flags passed to [`NetBackend::set_offload`].
    pub fn offload_handle(&self) -> Arc<AtomicU32> {
        self.offload.clone()
    }

    /// Sends one message on a seqpacket socket (e.g. the peer end) without blocking:
    /// `Err(WouldBlock)` when the receiver's queue is full.
    pub fn send(fd: &impl AsRawFd, frame: &[u8]) -> io::Result<usize> {
        // SAFETY: `frame` is a valid readable buffer of `frame.len()` bytes for the duration of
        // the call.
        let ret = unsafe {
            libc::send(
                fd.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
            )
        };
        cvt(ret)
    }

    /// Receives one message from a seqpacket socket, waiting at most `timeout_ms` (for the
    /// peer end). `Ok(None)` on timeout.
    pub fn recv_timeout(fd: &impl AsRawFd, timeout_ms: i32) -> io::Result<Option<Vec<u8>>> {
        let mut pfd = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: pfd is a valid pollfd array of length 1 that outlives the call.
        let ret = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        if ret == 0 {
            return Ok(None);
        }
        let mut buf = vec![0u8; super::MAX_FRAME_LEN + 1];
        // SAFETY: `buf` is a valid writable buffer of `buf.len()` bytes for the call.
        let ret = unsafe {
            libc::recv(
                fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        };
        let n = cvt(ret)?;
        buf.truncate(n);
        Ok(Some(buf))
    }
}

impl AsRawFd for SeqpacketBackend {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl NetBackend for SeqpacketBackend {
    /// A message longer than the iovecs is discarded and reported as `InvalidData`.
    unsafe fn read_frame_into(&mut self, iovs: &[libc::iovec]) -> io::Result<usize> {
        // SAFETY: an all-zero msghdr is valid (no name, no control data).
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = iovs.as_ptr().cast_mut();
        msg.msg_iovlen = iovs.len() as _;
        // SAFETY: the caller guarantees every iovec is writable for its length during the
        // call (our contract); recvmsg writes only through them and does not keep them. With
        // MSG_TRUNC the return value is the real message length, possibly more than written.
        let ret = unsafe {
            libc::recvmsg(
                self.fd.as_raw_fd(),
                &mut msg,
                libc::MSG_DONTWAIT | libc::MSG_TRUNC,
            )
        };
        let n = cvt(ret)?;
        let room: usize = iovs.iter().map(|v| v.iov_len).sum();
        if n > room || msg.msg_flags & libc::MSG_TRUNC != 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{n}-byte message does not fit in {room} bytes"),
            ));
        }
        Ok(n)
    }

    fn write_frame(&mut self, iovs: &[io::IoSlice]) -> io::Result<usize> {
        // SAFETY: an all-zero msghdr is valid (no name, no control data).
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        // IoSlice is ABI-compatible with struct iovec on Unix; sendmsg only reads through it.
        msg.msg_iov = iovs.as_ptr().cast_mut().cast::<libc::iovec>();
        msg.msg_iovlen = iovs.len() as _;
        // SAFETY: `msg` points to `iovs.len()` iovecs, each describing readable memory that the
        // caller keeps valid for the duration of the call. MSG_NOSIGNAL: EPIPE instead of
        // SIGPIPE when the peer is gone.
        let ret = unsafe {
            libc::sendmsg(
                self.fd.as_raw_fd(),
                &msg,
                libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
            )
        };
        cvt(ret)
    }

    fn set_offload(&mut self, tun_flags: u32) -> io::Result<()> {
        self.offload.store(tun_flags, Ordering::SeqCst);
        Ok(())
    }
}

fn cvt(ret: isize) -> io::Result<usize> {
    usize::try_from(ret).map_err(|_| io::Error::last_os_error())
}

/// Sets `O_NONBLOCK` on `fd`.
pub(crate) fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl on a valid fd with integer arguments only; return value checked.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    if flags & libc::O_NONBLOCK != 0 {
        return Ok(());
    }
    // SAFETY: as above.
    let ret = unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
