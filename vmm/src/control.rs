//! The main thread's own event sources: host stdin → serial, termination signals, and the
//! exit eventfd that wakes the loop when the VM must stop.

use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::{Arc, Mutex};

use devices::legacy::SerialDevice;
use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;

use crate::exit::{ExitReason, ExitSignal};

/// Ctrl-A: the escape key; Ctrl-A x quits microvm, Ctrl-A Ctrl-A sends one Ctrl-A.
const ESCAPE: u8 = 0x01;
const SIGNALS: [libc::c_int; 4] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGUSR1];

/// Blocks the termination signals in the calling thread (and every thread it spawns after)
/// and returns a signalfd that reports them.
pub fn block_signals() -> std::io::Result<OwnedFd> {
    // SAFETY: sigset_t is plain data, initialised by sigemptyset before use.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t; the calls only edit it / the thread's mask.
    unsafe {
        libc::sigemptyset(&mut set);
        for s in SIGNALS {
            libc::sigaddset(&mut set, s);
        }
        if libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    // SAFETY: `set` is valid; -1 asks for a new descriptor.
    let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: signalfd returned a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

pub struct Control {
    serial: Arc<Mutex<SerialDevice>>,
    exit: Arc<ExitSignal>,
    signals: OwnedFd,
    escape_pending: bool,
    /// Whether stdin feeds the serial console (not when it is the guest command's).
    stdin_to_serial: bool,
    /// The vCPU threads, to kick for a register dump.
    vcpus: Vec<libc::pthread_t>,
}

impl Control {
    pub fn new(serial: Arc<Mutex<SerialDevice>>, exit: Arc<ExitSignal>, signals: OwnedFd) -> Self {
        Control {
            serial,
            exit,
            signals,
            escape_pending: false,
            stdin_to_serial: true,
            vcpus: Vec::new(),
        }
    }

    /// Whether microvm's stdin goes to the serial console (the default).
    pub fn set_stdin_to_serial(&mut self, on: bool) {
        self.stdin_to_serial = on;
    }

    pub fn set_vcpu_threads(&mut self, threads: Vec<libc::pthread_t>) {
        self.vcpus = threads;
    }

    fn handle_stdin(&mut self, ops: &mut EventOps) {
        let mut buf = [0u8; 64];
        let n = match std::io::stdin().lock().read(&mut buf) {
            Ok(0) | Err(_) => {
                // EOF or error: stop watching stdin; the guest keeps running.
                let _ = ops.remove(Events::empty_raw(libc::STDIN_FILENO));
                return;
            }
            Ok(n) => n,
        };
        let mut out = Vec::with_capacity(n);
        for &b in &buf[..n] {
            if self.escape_pending {
                self.escape_pending = false;
                match b {
                    b'x' | b'X' => {
                        self.exit.set(ExitReason::Signal(0));
                        return;
                    }
                    _ => out.push(b),
                }
            } else if b == ESCAPE && crate::terminal::is_raw() {
                self.escape_pending = true;
            } else {
                out.push(b);
            }
        }
        let taken = crate::bus::lock(&self.serial).enqueue_input(&out);
        if taken < out.len() {
            tracing::debug!(dropped = out.len() - taken, "guest serial FIFO full");
        }
    }

    fn handle_signal(&mut self) {
        // SAFETY: signalfd_siginfo is plain data; read fills at most its size.
        let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
        let size = std::mem::size_of::<libc::signalfd_siginfo>();
        // SAFETY: the buffer is `size` writable bytes owned by `info`.
        let n = unsafe { libc::read(self.signals.as_raw_fd(), &mut info as *mut _ as *mut libc::c_void, size) };
        if n != size as isize {
            return;
        }
        if info.ssi_signo as i32 == libc::SIGUSR1 {
            // Not a stop request: print every vCPU's registers (see debug.rs).
            crate::debug::request_dump(&self.vcpus);
        } else {
            self.exit.set(ExitReason::Signal(info.ssi_signo as i32));
        }
    }
}

impl MutEventSubscriber for Control {
    fn init(&mut self, ops: &mut EventOps) {
        for fd in [self.signals.as_raw_fd(), self.exit.eventfd().as_raw_fd()] {
            if let Err(e) = ops.add(Events::new_raw(fd, EventSet::IN)) {
                tracing::error!("cannot watch fd {fd}: {e:?}");
            }
        }
        if !self.stdin_to_serial {
            return;
        }
        // stdin goes to the guest's console. A regular file or /dev/null on stdin can't be
        // polled (EPERM): then there is simply no console input; at EOF we stop watching.
        if let Err(e) = ops.add(Events::new_raw(libc::STDIN_FILENO, EventSet::IN)) {
            tracing::debug!("stdin is not pollable, no console input: {e:?}");
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        if fd == libc::STDIN_FILENO {
            if events.event_set().intersects(EventSet::HANG_UP | EventSet::ERROR) && !events.event_set().contains(EventSet::IN) {
                let _ = ops.remove(Events::empty_raw(fd));
            } else {
                self.handle_stdin(ops);
            }
        } else if fd == self.signals.as_raw_fd() {
            self.handle_signal();
        } else if fd == self.exit.eventfd().as_raw_fd() {
            let _ = self.exit.eventfd().read();
        }
    }
}
