//! The command channel: the guest command's stdin, stdout and stderr, byte-exact, over a
//! multiport virtio-console whose ports are named in resources/init/src/protocol.rs
//! (microvm's init finds them by name and gives them to the command as fds 0, 1, 2).
//!
//! Attached when microvm runs its own init with a command (`wanted`).
//!
//! # Why pump threads
//!
//! The console's backends must be non-blocking, and `O_NONBLOCK` belongs to the open file
//! description, which microvm shares with its parent (a terminal, a shell pipeline) and,
//! for stdout and stderr, often with each other and with the serial console's writer and
//! the logs. Setting it on fds 0/1/2 would make those writers fail with EAGAIN and outlive
//! microvm. Reopening through /proc/self/fd works for pipes and ttys but not for sockets, and
//! changes a regular file's offset. So each stream gets a private pipe: the device's end is
//! non-blocking, and one thread per stream copies between the pipe and fd 0/1/2 with plain
//! blocking reads and writes, whatever those fds are. Flow control is kept: a slow reader
//! of microvm's stdout blocks the pump's write, the pipe fills, the device holds the guest's
//! transmit chains, and the guest's `write()` blocks. At most a pipe (64 KiB) plus one chunk
//! is buffered per stream.
//!
//! # Stdin
//!
//! Bytes are forwarded as they come; EOF on microvm's stdin closes the pipe, so the device
//! closes the port's host side and the command's `read()` returns 0. A terminal on stdin is
//! left in its normal (cooked) mode: the command is not interactive, the terminal's line
//! editing applies, Ctrl-D is EOF and Ctrl-C stops microvm (status 130), as `ssh host cmd`
//! without `-t`. The serial console gets no input then.
//!
//! # The end
//!
//! The guest's last writes may still be in the transmit queues when its init reports the
//! status: [`Channel::finish`] writes them out and lets the pumps drain their pipes,
//! waiting as long as the readers make progress (a reader that takes nothing for
//! [`STALL`] is given up on, with a warning).

use std::fs::File;
use std::io::{self, Read, Write};
use std::mem::ManuallyDrop;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};
use std::sync::Arc;
use std::time::{Duration, Instant};

use devices::virtio::console::{Console, ConsoleError, ConsoleFlush, FdInput, FdOutput, PortConfig};
use thiserror::Error;
use vmm_sys_util::eventfd::EventFd;

use crate::bus::Bus;
use crate::config::VmConfig;
use crate::exit::ExitReason;
use crate::guestinit::{self, protocol};
use crate::virtio::{VirtioError, VirtioSlots};

/// How long the end of a run waits for a host reader that takes nothing.
pub const STALL: Duration = Duration::from_secs(30);
/// Bytes per pump read/write.
const CHUNK: usize = 64 * 1024;

#[derive(Debug, Error)]
pub enum ChannelError {
    #[error("cannot create a pipe for the command channel")]
    Pipe(#[source] io::Error),
    #[error("cannot create the command channel's stop event")]
    Event(#[source] io::Error),
    #[error("cannot start a command channel thread")]
    Thread(#[source] crate::seccomp::SeccompError),
    #[error("cannot create the command channel's virtio-console")]
    Console(#[source] ConsoleError),
    #[error(transparent)]
    Attach(#[from] VirtioError),
}

/// Whether the command gets the channel: microvm's own init runs a command (now, or in
/// the restores of the snapshot this run takes).
pub fn wanted(config: &VmConfig) -> bool {
    guestinit::own_init(config).is_some()
        && (!config.command.is_empty() || config.snapshot_to.is_some() || config.from_snapshot)
}

/// What the channel is for in this run.
pub enum Mode {
    /// The command is on the kernel command line: stdin, stdout, stderr.
    Command,
    /// `--snapshot-to`: the init waits for its command on the control port; its READY
    /// sets the flag and wakes the main loop. stdin is not read (a restore's is).
    SnapshotTo { ready: Arc<AtomicBool>, wake: EventFd },
    /// The command line for the waiting init (protocol::command_message), sent on the
    /// control port: `--restore`, or a boot whose command is too long for the kernel
    /// command line; `stdin`: whether microvm's stdin is the command's (not for a shell on
    /// the console).
    /// `hold`: keep the port's host side open after the line, until the channel ends (a
    /// boot: the init writes READY after it opened the port, and the guest's write would
    /// block for ever on a port whose host side closed; a restored init wrote it before
    /// the snapshot, and sees the port close after the line).
    SendCommand { message: Vec<u8>, stdin: bool, hold: bool },
}

/// The host side of the command channel while the VM runs.
pub struct Channel {
    flush: ConsoleFlush,
    /// Output pumps (stdout, stderr).
    pumps: Vec<Pump>,
    ended: Arc<Ended>,
    stop: Arc<EventFd>,
}

struct Pump {
    name: &'static str,
    /// Bytes written to the host fd so far.
    written: Arc<AtomicU64>,
    done: Arc<AtomicBool>,
}

/// How many pumps have ended, and a condition variable that wakes `Channel::finish` the
/// moment one does (the exit path waits for the pumps, never polls them).
#[derive(Default)]
struct Ended {
    count: Mutex<usize>,
    cv: Condvar,
}

impl Ended {
    fn one(&self) {
        *crate::bus::lock(&self.count) += 1;
        self.cv.notify_all();
    }
}

/// Attaches the console with ports stdin (port 0: the init relies on it being announced
/// first, see resources/init/src/channel.rs), stdout and stderr, and starts the pumps.
/// Call after the termination signals are blocked (the threads inherit the mask).
pub fn attach(slots: &mut VirtioSlots, bus: &mut Bus, mode: Mode) -> Result<Channel, ChannelError> {
    let stop = Arc::new(EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(ChannelError::Event)?);
    let stdin: Option<Box<dyn devices::virtio::console::ConsoleInput>> = match mode {
        Mode::SnapshotTo { .. } | Mode::SendCommand { stdin: false, .. } => None,
        _ => {
            let (stdin_rx, stdin_tx) = pipe()?;
            spawn("microvm-stdin", move || pump_stdin(stdin_tx))?;
            Some(Box::new(FdInput::new(stdin_rx).map_err(ChannelError::Console)?))
        }
    };
    let mut ports = vec![PortConfig { name: protocol::PORT_STDIN.into(), input: stdin, output: None }];
    let mut pumps = Vec::new();
    let ended = Arc::new(Ended::default());
    for (name, fd) in [(protocol::PORT_STDOUT, libc::STDOUT_FILENO), (protocol::PORT_STDERR, libc::STDERR_FILENO)] {
        let (rx, tx) = pipe()?;
        let written = Arc::new(AtomicU64::new(0));
        let done = Arc::new(AtomicBool::new(false));
        let (w, d, s, e) = (written.clone(), done.clone(), stop.clone(), ended.clone());
        spawn(name, move || {
            pump_out(name, rx, fd, &w, &s);
            d.store(true, Ordering::SeqCst);
            e.one();
        })?;
        pumps.push(Pump { name, written, done });
        ports.push(PortConfig {
            name: name.into(),
            input: None,
            output: Some(Box::new(FdOutput::new(tx).map_err(ChannelError::Console)?)),
        });
    }
    if let Some(control) = control_port(mode, &stop)? {
        ports.push(control);
    }
    let console = Console::new(ports, slots.endpoint()).map_err(ChannelError::Console)?;
    let flush = console.flush_handle();
    slots.attach(bus, Box::new(console))?;
    Ok(Channel { flush, pumps, ended, stop })
}

impl Channel {
    /// Delivers what the command wrote: the transmit queues into the pipes, the pipes to
    /// microvm's stdout and stderr. Call from the main thread once the event loop stopped.
    /// After a signal (the user stops microvm) only what is already in the pipes is written.
    pub fn finish(self, reason: &ExitReason) {
        let progress = || self.pumps.iter().map(|p| p.written.load(Ordering::Relaxed)).sum::<u64>();
        let mut last = (progress(), Instant::now());
        let stalled = |last: &mut (u64, Instant)| {
            let now = progress();
            if now != last.0 {
                *last = (now, Instant::now());
            }
            last.1.elapsed() >= STALL
        };
        let mut complete = true;
        if !matches!(reason, ExitReason::Signal(_)) {
            while !self.flush.flush(Instant::now() + Duration::from_millis(200)) {
                if stalled(&mut last) {
                    complete = false;
                    break;
                }
            }
        }
        if let Err(e) = self.stop.write(1) {
            tracing::error!("command channel: cannot stop the pumps: {e}");
            return;
        }
        let mut ended = crate::bus::lock(&self.ended.count);
        while complete && *ended < self.pumps.len() {
            // Woken the moment a pump ends; the timeout only paces the stall check.
            ended = self.ended.cv.wait_timeout(ended, Duration::from_millis(200)).unwrap_or_else(|e| e.into_inner()).0;
            if *ended < self.pumps.len() && stalled(&mut last) {
                complete = false;
            }
        }
        drop(ended);
        if !complete {
            let stuck: Vec<&str> = self.pumps.iter().filter(|p| !p.done.load(Ordering::SeqCst)).map(|p| p.name).collect();
            eprintln!(
                "microvm: the command's output was cut: its reader took nothing for {}s ({})",
                STALL.as_secs(),
                stuck.join(", ")
            );
        }
    }
}

/// The control port (protocol::PORT_CONTROL) of a snapshot or a restore: the init's READY
/// in, the command line out.
fn control_port(mode: Mode, stop: &Arc<EventFd>) -> Result<Option<PortConfig>, ChannelError> {
    match mode {
        Mode::Command => Ok(None),
        Mode::SnapshotTo { ready, wake } => {
            let (rx, tx) = pipe()?;
            spawn("microvm-control", move || watch_ready(rx, &ready, &wake))?;
            Ok(Some(PortConfig {
                name: protocol::PORT_CONTROL.into(),
                input: None,
                output: Some(Box::new(FdOutput::new(tx).map_err(ChannelError::Console)?)),
            }))
        }
        Mode::SendCommand { message, hold, .. } => {
            let (rx, tx) = pipe()?;
            let stop = stop.clone();
            spawn("microvm-control", move || {
                let mut tx = File::from(tx);
                if let Err(e) = tx.write_all(&message) {
                    tracing::error!("command channel: cannot send the command: {e}");
                }
                if hold {
                    // Polled, not read: the pumps poll the same stop eventfd.
                    crate::fdwait::readable(stop.as_raw_fd(), None);
                }
                // Then the pipe closes: the port reads as closed.
            })?;
            Ok(Some(PortConfig {
                name: protocol::PORT_CONTROL.into(),
                input: Some(Box::new(FdInput::new(rx).map_err(ChannelError::Console)?)),
                output: None,
            }))
        }
    }
}

/// Reads what the init says on the control port until READY, then raises `ready`.
fn watch_ready(pipe: OwnedFd, ready: &AtomicBool, wake: &EventFd) {
    let mut pipe = File::from(pipe);
    let mut said = Vec::new();
    let mut buf = [0u8; 256];
    loop {
        match pipe.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => said.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return,
        }
        if said.windows(protocol::READY_MESSAGE.len()).any(|w| w == protocol::READY_MESSAGE) {
            ready.store(true, Ordering::SeqCst);
            if let Err(e) = wake.write(1) {
                tracing::error!("command channel: cannot wake the main loop: {e}");
            }
            return;
        }
        // A guest that never says READY must not grow this without bound.
        if said.len() > 4096 {
            said.drain(..said.len() - protocol::READY_MESSAGE.len());
        }
    }
}

fn spawn(name: &str, f: impl FnOnce() + Send + 'static) -> Result<(), ChannelError> {
    // Detached: the stdin pump may sit in a read() of a terminal until microvm exits.
    // Each pump runs under its seccomp filter (seccomp/rules.rs: `channel`).
    let kind = crate::seccomp::ThreadKind::Channel;
    crate::seccomp::spawn_confined(kind, name.into(), f).map(drop).map_err(ChannelError::Thread)
}

/// A close-on-exec pipe: (read end, write end).
fn pipe() -> Result<(OwnedFd, OwnedFd), ChannelError> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors into the live array; checked before use.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(ChannelError::Pipe(io::Error::last_os_error()));
    }
    // SAFETY: both descriptors are fresh and owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// A `File` over one of fds 0/1/2 that never closes it.
fn std_fd(fd: RawFd) -> ManuallyDrop<File> {
    // SAFETY: fds 0/1/2 stay open for the process's life; ManuallyDrop never closes them.
    ManuallyDrop::new(unsafe { File::from_raw_fd(fd) })
}

fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl on our own pipe with integer arguments; results checked.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    // SAFETY: as above.
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// microvm's stdin → the pipe, until EOF (or an error, or the device dropped the pipe);
/// closing the pipe is the command's EOF.
fn pump_stdin(pipe: OwnedFd) {
    let mut pipe = File::from(pipe);
    let mut stdin = std_fd(libc::STDIN_FILENO);
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = match stdin.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::warn!("command channel: reading stdin failed, the command gets EOF: {e}");
                break;
            }
        };
        if let Err(e) = pipe.write_all(&buf[..n]) {
            tracing::debug!("command channel: stdin pipe closed: {e}");
            break;
        }
    }
}

/// The pipe → host fd `fd`, until `stop` is signalled and the pipe is empty. A host fd
/// that fails (EPIPE: its reader went away) is reported once; the pipe is still drained
/// so the guest never blocks on it.
fn pump_out(name: &str, pipe: OwnedFd, fd: RawFd, written: &AtomicU64, stop: &EventFd) {
    let mut out = std_fd(fd);
    let mut failed = false;
    let mut buf = vec![0u8; CHUNK];
    let mut stopping = false;
    let mut pipe = File::from(pipe);
    loop {
        if !stopping {
            let mut pfds = [
                libc::pollfd { fd: pipe.as_raw_fd(), events: libc::POLLIN, revents: 0 },
                libc::pollfd { fd: stop.as_raw_fd(), events: libc::POLLIN, revents: 0 },
            ];
            // SAFETY: a live array of two pollfds, its length passed with it.
            let r = unsafe { libc::poll(pfds.as_mut_ptr(), 2, -1) };
            if r < 0 {
                continue; // EINTR
            }
            if pfds[1].revents != 0 {
                stopping = true;
                if let Err(e) = set_nonblocking(pipe.as_raw_fd()) {
                    tracing::error!("command channel: {name}: cannot drain the pipe: {e}");
                    break;
                }
            }
            if pfds[0].revents == 0 {
                continue;
            }
        }
        let n = match pipe.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break, // stopping, and empty
            Err(e) => {
                tracing::error!("command channel: {name}: reading the pipe failed: {e}");
                break;
            }
        };
        if !failed {
            if let Err(e) = out.write_all(&buf[..n]) {
                tracing::warn!("command channel: writing the command's {name} failed, discarding the rest: {e}");
                failed = true;
            }
        }
        written.fetch_add(n as u64, Ordering::Relaxed);
    }
}
