//! Waiting for one descriptor to turn readable: the command channel's stop eventfd, a
//! virtiofsd's pidfd. Written here rather than pulled in: a one-fd poll(2) with EINTR retried
//! and an optional deadline is a dozen lines; `vmm_sys_util::poll` is an epoll context.

use std::os::fd::RawFd;
use std::time::Instant;

/// Blocks until `fd` is readable (true) or `deadline` passes (false; never before it). Other
/// poll errors (none expected for a live fd) return false rather than spin.
pub fn readable(fd: RawFd, deadline: Option<Instant>) -> bool {
    let mut pfd = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
    loop {
        let ms = deadline.map_or(-1, |d| {
            let left = d.saturating_duration_since(Instant::now());
            libc::c_int::try_from(left.as_micros().div_ceil(1000)).unwrap_or(libc::c_int::MAX)
        });
        // SAFETY: one live pollfd, its count passed with it; the caller keeps `fd` open.
        match unsafe { libc::poll(&mut pfd, 1, ms) } {
            r if r > 0 => return true,
            0 => return false,
            _ if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted => {}
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;
    use std::time::Duration;
    use vmm_sys_util::eventfd::EventFd;

    #[test]
    fn waits_for_the_deadline_or_the_event() {
        let e = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let start = Instant::now();
        assert!(!readable(e.as_raw_fd(), Some(start + Duration::from_millis(30))));
        assert!(start.elapsed() >= Duration::from_millis(30));
        e.write(1).unwrap();
        assert!(readable(e.as_raw_fd(), None));
        assert!(readable(e.as_raw_fd(), Some(Instant::now())));
    }
}
