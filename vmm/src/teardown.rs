//! The `teardown` thread: owns the NICs' host attachments and tears them down (TAPs, DHCP,
//! bridges and nftables rules of networks whose last user this VM is) when the VM exits —
//! normally, after a panic in any thread, or after a seccomp violation.
//!
//! Why a thread: teardown needs rtnetlink sockets, fork+exec of `nft` and file removal,
//! which no seccomp filter of a guest-facing thread allows (and an exec'd `nft` would
//! inherit the filter). The thread is started before any filter is installed, so it stays
//! unfiltered, and sleeps in read(2) on an eventfd until asked. The paths that end the
//! process abnormally (the panic hook, the SIGSYS handler) use [`exit_with_teardown`],
//! which is async-signal-safe: it only touches atomics, writes the eventfd, sleeps and
//! calls _exit(2).

use std::cell::Cell;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use vmm_sys_util::eventfd::EventFd;

/// How long an abnormal exit waits for teardown (nft and netlink take milliseconds).
const ABNORMAL_WAIT: Duration = Duration::from_secs(10);
const POLL: Duration = Duration::from_millis(5);

/// The eventfd the thread waits on; -1 when there is no teardown thread (yet).
static WAKE_FD: AtomicI32 = AtomicI32::new(-1);
/// Set when the attachments have been released.
static DONE: AtomicBool = AtomicBool::new(false);

thread_local! {
    static IS_TEARDOWN_THREAD: Cell<bool> = const { Cell::new(false) };
}

/// The running teardown thread. `finish()` it on the normal exit path; dropping it does
/// the same (for early error returns).
pub struct Teardown {
    wake: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl Teardown {
    /// Starts the thread, which takes ownership of `nics`.
    pub fn spawn(nics: Vec<net::Attachment>) -> std::io::Result<Teardown> {
        let wake = EventFd::new(libc::EFD_CLOEXEC)?;
        let fd = wake.try_clone()?;
        let thread = std::thread::Builder::new().name("teardown".into()).spawn(move || {
            IS_TEARDOWN_THREAD.with(|t| t.set(true));
            // Blocks until someone writes the eventfd; an error means the same: go.
            let _ = fd.read();
            // Restores the terminal on the abnormal paths (a no-op when already restored).
            crate::terminal::restore_now();
            // Releases in attach order (TAP, DHCP registration, then the network).
            drop(nics);
            DONE.store(true, Ordering::SeqCst);
        })?;
        WAKE_FD.store(wake.as_raw_fd(), Ordering::SeqCst);
        Ok(Teardown { wake, thread: Some(thread) })
    }

    /// Tears the attachments down and waits until that is done.
    pub fn finish(mut self) {
        self.run();
    }

    fn run(&mut self) {
        if let Some(thread) = self.thread.take() {
            if let Err(e) = self.wake.write(1) {
                tracing::error!("cannot wake the teardown thread: {e}");
                return;
            }
            if thread.join().is_err() {
                tracing::error!("the teardown thread panicked");
            }
            WAKE_FD.store(-1, Ordering::SeqCst);
        }
    }
}

impl Drop for Teardown {
    fn drop(&mut self) {
        self.run();
    }
}

/// Tears the network down (if a teardown thread runs and this is not it) and ends the
/// process with `code`, without unwinding or running destructors. Async-signal-safe.
pub fn exit_with_teardown(code: i32) -> ! {
    let fd = WAKE_FD.load(Ordering::SeqCst);
    if fd >= 0 && !IS_TEARDOWN_THREAD.with(Cell::get) {
        let one = 1u64.to_ne_bytes();
        // SAFETY: writes 8 bytes from a local buffer to the eventfd (async-signal-safe).
        unsafe { libc::write(fd, one.as_ptr().cast(), one.len()) };
        let mut waited = Duration::ZERO;
        while !DONE.load(Ordering::SeqCst) && waited < ABNORMAL_WAIT {
            let ts = libc::timespec { tv_sec: 0, tv_nsec: POLL.as_nanos() as libc::c_long };
            // SAFETY: `ts` is a valid timespec; nanosleep is async-signal-safe.
            unsafe { libc::nanosleep(&ts, std::ptr::null_mut()) };
            waited += POLL;
        }
    }
    // SAFETY: _exit ends the process at once; it is async-signal-safe.
    unsafe { libc::_exit(code) }
}
