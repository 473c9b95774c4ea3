//! The `teardown` thread: owns the NICs' host attachments and the virtiofsd daemons (from
//! [`Teardown::adopt`], at the end of setup) and releases them, in order, when the VM ends:
//! `nics::release_all` (TAPs, DHCP, bridges and nftables rules of networks whose last user
//! this VM is), then `Shares::release` (virtiofsd stop and wait, state directory removal).
//!
//! Why a thread: teardown needs rtnetlink sockets, fork+exec of `nft`, kill/wait of
//! virtiofsd and file removal, which no seccomp filter of a guest-facing thread allows (and
//! an exec'd `nft` would inherit the filter). The thread is started before any filter is
//! installed, so it stays unfiltered, and sleeps in read(2) on an eventfd until asked.
//!
//! It is the one place teardown runs once it exists:
//! - normal exit: `Vmm::finish` (machine.rs) calls [`Teardown::finish_while`], the ordered release above
//!   (after the command channel's output is delivered);
//! - a panic in any thread or a seccomp violation: the panic hook and the SIGSYS handler call
//!   [`exit_with_teardown`] (async-signal-safe: atomics, a write to the eventfd, sleeps,
//!   _exit), which wakes the thread in emergency mode: it runs the dying-process paths,
//!   `share::kill_all_now` and `net::emergency_teardown` (no locks another thread may
//!   hold, bounded), and the process exits after at most [`ABNORMAL_WAIT`].
//!
//! Before the thread exists (setup, all unfiltered) and on the thread itself,
//! `exit_with_teardown` runs those emergency paths directly.

use std::cell::Cell;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use vmm_sys_util::eventfd::EventFd;

use crate::share::Shares;

/// How long an abnormal exit waits for teardown (netlink and nft take milliseconds; a
/// virtiofsd is killed, not waited for).
pub const ABNORMAL_WAIT: Duration = Duration::from_secs(10);
const POLL: Duration = Duration::from_millis(5);

/// The eventfd the thread waits on; -1 when there is no teardown thread (yet).
static WAKE_FD: AtomicI32 = AtomicI32::new(-1);
/// Set before waking the thread on an abnormal exit: it then runs the emergency paths.
static ABNORMAL: AtomicBool = AtomicBool::new(false);
/// Set when the teardown is over.
static DONE: AtomicBool = AtomicBool::new(false);

thread_local! {
    static IS_TEARDOWN_THREAD: Cell<bool> = const { Cell::new(false) };
}

/// What the teardown thread releases, in this order.
type Owned = (Vec<net::Attachment>, Shares);

/// The running teardown thread. `finish_while()` it on the normal exit path; dropping it does
/// the same (for early error returns).
pub struct Teardown {
    wake: EventFd,
    owned: Arc<Mutex<Option<Owned>>>,
    thread: Option<JoinHandle<()>>,
}

impl Teardown {
    /// Starts the thread. Call before the first thread that runs under a seccomp filter, so
    /// an abnormal exit of that thread finds it; hand it what to release with [`adopt`].
    ///
    /// [`adopt`]: Teardown::adopt
    pub fn spawn() -> std::io::Result<Teardown> {
        let wake = EventFd::new(libc::EFD_CLOEXEC)?;
        let fd = wake.try_clone()?;
        let owned: Arc<Mutex<Option<Owned>>> = Arc::default();
        let to_release = owned.clone();
        let thread = std::thread::Builder::new().name("teardown".into()).spawn(move || {
            IS_TEARDOWN_THREAD.with(|t| t.set(true));
            // Blocks until someone writes the eventfd; an error means the same: go.
            let _ = fd.read();
            if ABNORMAL.load(Ordering::SeqCst) {
                // The process is about to _exit: the emergency paths work from global
                // state and take no lock another (stopped) thread may hold, so what was
                // adopted is left alone.
                crate::terminal::restore_now();
                emergency();
            } else if let Some((nics, daemons)) = crate::bus::lock(&to_release).take() {
                // The NICs on helper threads of their own (started here, so unfiltered),
                // virtiofsd meanwhile.
                let nics = crate::nics::release_all(nics);
                daemons.release();
                nics.wait();
            }
            DONE.store(true, Ordering::SeqCst);
        })?;
        WAKE_FD.store(wake.as_raw_fd(), Ordering::SeqCst);
        Ok(Teardown { wake, owned, thread: Some(thread) })
    }

    /// Takes ownership of the NICs' host attachments and the virtiofsd daemons: from here
    /// they are released on the teardown thread, whichever way the VM ends. Call before the
    /// calling thread confines itself (its filter forbids what releasing them needs).
    pub fn adopt(&self, nics: Vec<net::Attachment>, daemons: Shares) {
        *crate::bus::lock(&self.owned) = Some((nics, daemons));
    }

    /// Releases everything in order and waits until that is done, running `meanwhile` on
    /// this thread while the teardown thread works (the VM fd's close, which waits in the
    /// kernel as a TAP deletion does).
    pub fn finish_while(mut self, meanwhile: impl FnOnce()) {
        self.run(meanwhile);
    }

    fn run(&mut self, meanwhile: impl FnOnce()) {
        if let Some(thread) = self.thread.take() {
            if let Err(e) = self.wake.write(1) {
                tracing::error!("cannot wake the teardown thread: {e}");
                meanwhile();
                return;
            }
            meanwhile();
            if thread.join().is_err() {
                tracing::error!("the teardown thread panicked");
            }
            WAKE_FD.store(-1, Ordering::SeqCst);
        }
        // A panic or seccomp violation elsewhere is ending the process with its own status
        // (e.g. the emergency path killed virtiofsd, which ended this VM's event loop):
        // leave the exit to it rather than race it with this VM's status.
        while ABNORMAL.load(Ordering::SeqCst) {
            std::thread::park();
        }
    }
}

impl Drop for Teardown {
    fn drop(&mut self) {
        self.run(|| ());
    }
}

/// The dying-process paths: SIGKILL the virtiofsd daemons and remove their state, delete
/// this process's TAPs and leave its networks. Unfiltered threads only.
fn emergency() {
    crate::share::kill_all_now();
    net::emergency_teardown();
}

/// Tears everything down and ends the process with `code`, without unwinding or running
/// destructors. From a filtered thread (always the case in the SIGSYS handler) it only
/// wakes the teardown thread and waits, which is async-signal-safe.
pub fn exit_with_teardown(code: i32) -> ! {
    let fd = WAKE_FD.load(Ordering::SeqCst);
    if fd >= 0 && !IS_TEARDOWN_THREAD.with(Cell::get) {
        ABNORMAL.store(true, Ordering::SeqCst);
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
    } else if !crate::seccomp::is_confined() {
        // No teardown thread yet (a panic during setup) or a panic on it: do it here.
        emergency();
    }
    // SAFETY: _exit ends the process at once; it is async-signal-safe.
    unsafe { libc::_exit(code) }
}
