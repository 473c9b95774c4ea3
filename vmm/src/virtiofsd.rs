//! The virtiofsd processes behind the shares (see share.rs for the whole picture): start,
//! connect, watch, stop; and microvm's private state directory that holds their sockets.

use std::fs::DirBuilder;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;

use crate::exit::{ExitReason, ExitSignal};
use crate::share::{Share, ShareError};

/// How long virtiofsd may take to listen on its socket.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a virtiofsd may take to exit once its connection is shut down, and again after
/// SIGTERM, before it gets SIGKILL.
const STOP_TIMEOUT: Duration = Duration::from_secs(2);
/// `sun_path` holds 108 bytes including the NUL.
const SOCKET_PATH_MAX: usize = 107;

/// What the panic hook needs to clean up without the `Shares` (which it cannot reach):
/// the daemons' pids and the state directory.
static LIVE: Mutex<(Vec<u32>, Option<PathBuf>)> = Mutex::new((Vec::new(), None));

/// For the panic hook: SIGKILL every virtiofsd and remove the state directory. (They would
/// die anyway through PR_SET_PDEATHSIG; this also removes their sockets.)
pub fn kill_all_now() {
    let Ok(mut live) = LIVE.try_lock() else { return };
    for pid in live.0.drain(..) {
        // SAFETY: kill(2) on a child of ours that has not been reaped (pids leave LIVE
        // before they are waited for).
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
    }
    if let Some(dir) = live.1.take() {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// microvm's private directory for this run: `$MICROVM_RUN_DIR` (as root default
/// `/run/microvm`, else `$XDG_RUNTIME_DIR/microvm`) `/vm-<pid>`, mode 0700. Removed on release;
/// one left behind by a killed microvm is removed by the next one.
struct StateDir(PathBuf);

impl StateDir {
    fn create() -> Result<StateDir, ShareError> {
        let base = base_dir();
        let err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| ShareError::StateDir { path, source }
        };
        DirBuilder::new().recursive(true).mode(0o755).create(&base).map_err(err(&base))?;
        remove_stale(&base);
        let dir = base.join(format!("vm-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        DirBuilder::new().mode(0o700).create(&dir).map_err(err(&dir))?;
        crate::bus::lock(&LIVE).1 = Some(dir.clone());
        Ok(StateDir(dir))
    }
}

impl Drop for StateDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.0) {
            tracing::warn!("cannot remove {}: {e}", self.0.display());
        }
        crate::bus::lock(&LIVE).1 = None;
    }
}

fn base_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os(net::RUN_DIR_ENV).filter(|v| !v.is_empty()) {
        return PathBuf::from(dir);
    }
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        return PathBuf::from(net::DEFAULT_RUN_DIR);
    }
    match std::env::var_os("XDG_RUNTIME_DIR").filter(|v| !v.is_empty()) {
        Some(dir) => PathBuf::from(dir).join("microvm"),
        // SAFETY: getuid cannot fail.
        None => std::env::temp_dir().join(format!("microvm-{}", unsafe { libc::getuid() })),
    }
}

/// Removes the `vm-<pid>` directories of microvm processes that no longer exist.
fn remove_stale(base: &Path) {
    let Ok(entries) = std::fs::read_dir(base) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.strip_prefix("vm-")).and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            tracing::info!("removing stale state directory {}", entry.path().display());
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// One running virtiofsd.
struct Daemon {
    tag: String,
    host: PathBuf,
    child: Child,
    pidfd: OwnedFd,
    socket: PathBuf,
    /// A second handle on the vhost-user connection (the device owns the first): shutting it
    /// down is how virtiofsd is asked to exit.
    conn: Option<UnixStream>,
}

/// The virtiofsd processes of one VM. `release()` stops them (Drop does it too, as a fallback).
pub struct Shares {
    daemons: Vec<Daemon>,
    dir: Option<StateDir>,
}

impl Shares {
    /// No shares: nothing to run.
    pub fn none() -> Shares {
        Shares { daemons: Vec::new(), dir: None }
    }

    /// Starts one virtiofsd per share and connects to each. Returns the connections, in
    /// `shares` order, for the virtio-fs devices. Nothing is left running on error.
    pub fn start(shares: &[Share], bin: &Path) -> Result<(Shares, Vec<UnixStream>), ShareError> {
        let mut this = Shares::none();
        if shares.is_empty() {
            return Ok((this, Vec::new()));
        }
        let dir = StateDir::create()?;
        let sockets: Vec<PathBuf> = (0..shares.len()).map(|i| dir.0.join(format!("fs{i}.sock"))).collect();
        this.dir = Some(dir);
        for (share, socket) in shares.iter().zip(&sockets) {
            if socket.as_os_str().len() > SOCKET_PATH_MAX {
                return Err(ShareError::SocketPath(socket.clone()));
            }
            this.daemons.push(spawn(bin, share, socket)?);
        }
        // All daemons start in parallel; connect to each in turn.
        let deadline = Instant::now() + START_TIMEOUT;
        let mut streams = Vec::new();
        for d in &mut this.daemons {
            let stream = d.connect(deadline)?;
            d.conn = Some(stream.try_clone().map_err(|source| ShareError::Spawn { bin: bin.into(), source })?);
            streams.push(stream);
        }
        Ok((this, streams))
    }

    /// The event-loop subscriber that ends the VM when a virtiofsd dies.
    pub fn watcher(&self, exit: Arc<ExitSignal>) -> Result<ShareWatch, ShareError> {
        let mut watched = Vec::new();
        for d in &self.daemons {
            let fd = d.pidfd.try_clone().map_err(ShareError::Pidfd)?;
            watched.push((fd, d.tag.clone(), d.host.clone(), d.child.id()));
        }
        Ok(ShareWatch { watched, exit })
    }

    /// Stops every virtiofsd (shut the connection down, wait; SIGTERM, wait; SIGKILL) and
    /// removes the state directory with their sockets.
    pub fn release(mut self) {
        self.stop_all();
    }

    fn stop_all(&mut self) {
        // Shut every connection down first, so the daemons exit in parallel.
        let mut connected = Vec::new();
        for d in &mut self.daemons {
            let conn = d.conn.take();
            if let Some(conn) = &conn {
                let _ = conn.shutdown(std::net::Shutdown::Both);
            }
            connected.push(conn.is_some());
        }
        for (mut d, connected) in self.daemons.drain(..).zip(connected) {
            crate::bus::lock(&LIVE).0.retain(|p| *p != d.child.id());
            let status = d.stop(connected);
            tracing::debug!(tag = %d.tag, ?status, "virtiofsd stopped");
            let _ = std::fs::remove_file(&d.socket);
        }
        self.dir = None;
    }
}

impl Drop for Shares {
    fn drop(&mut self) {
        self.stop_all();
    }
}

fn spawn(bin: &Path, share: &Share, socket: &Path) -> Result<Daemon, ShareError> {
    let mut cmd = Command::new(bin);
    // SAFETY: geteuid cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    cmd.arg("--shared-dir")
        .arg(&share.host)
        .arg("--socket-path")
        .arg(socket)
        // As root, virtiofsd isolates itself in new mount/pid/net namespaces; without root the
        // user namespace it would need is often disabled, and it can reach no more than the user.
        .args(["--sandbox", if root { "namespace" } else { "none" }])
        // Close-to-open consistency with the host: a file edited on the host is seen anew.
        .args(["--cache", "auto"])
        .args(["--log-level", &log_level()])
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    if share.read_only {
        cmd.arg("--readonly");
    }
    // SAFETY: getpid cannot fail.
    let parent = unsafe { libc::getpid() };
    // SAFETY: the closure runs in the forked child before exec and only makes
    // async-signal-safe calls (setpgid, sigprocmask, prctl, getppid).
    unsafe {
        cmd.pre_exec(move || {
            // Its own process group: the terminal's Ctrl-C goes to microvm (and the guest).
            libc::setpgid(0, 0);
            // microvm blocks its termination signals (signalfd): the child must not inherit that.
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
            // Die with microvm, even on SIGKILL (sent when the forking thread, microvm's main
            // thread, exits). virtiofsd passes SIGTERM on to its own sandboxed child.
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(io::Error::last_os_error());
            }
            if libc::getppid() != parent {
                return Err(io::Error::other("microvm exited while starting virtiofsd"));
            }
            Ok(())
        });
    }
    let child = cmd.spawn().map_err(|source| ShareError::Spawn { bin: bin.into(), source })?;
    crate::bus::lock(&LIVE).0.push(child.id());
    let pidfd = match pidfd_open(child.id()) {
        Ok(fd) => fd,
        Err(e) => {
            let mut d = child;
            let _ = d.kill();
            let _ = d.wait();
            return Err(ShareError::Pidfd(e));
        }
    };
    tracing::info!(tag = %share.tag, host = %share.host.display(), pid = child.id(), "virtiofsd started");
    Ok(Daemon { tag: share.tag.clone(), host: share.host.clone(), child, pidfd, socket: socket.into(), conn: None })
}

/// virtiofsd's log level: microvm's (`MICROVM_LOG`) when it is a plain level, else errors only.
fn log_level() -> String {
    match std::env::var("MICROVM_LOG").as_deref() {
        Ok(l @ ("error" | "warn" | "info" | "debug" | "trace")) => l.to_string(),
        _ => "error".to_string(),
    }
}

fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

impl Daemon {
    /// Connects to the socket once virtiofsd listens. virtiofsd serves exactly one
    /// connection, so this is the real one, not a probe.
    fn connect(&mut self, deadline: Instant) -> Result<UnixStream, ShareError> {
        loop {
            if let Ok(stream) = UnixStream::connect(&self.socket) {
                return Ok(stream);
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(ShareError::EarlyExit { tag: self.tag.clone(), host: self.host.clone(), status: describe(status) });
            }
            if Instant::now() >= deadline {
                return Err(ShareError::StartTimeout {
                    tag: self.tag.clone(),
                    socket: self.socket.clone(),
                    secs: START_TIMEOUT.as_secs(),
                });
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Waits for the daemon to exit (when `connected`, its connection is already shut down,
    /// which makes it exit), then SIGTERM, then SIGKILL. Always reaps it.
    fn stop(&mut self, connected: bool) -> io::Result<ExitStatus> {
        if connected {
            if let Some(status) = self.wait_for(STOP_TIMEOUT)? {
                return Ok(status);
            }
            tracing::warn!(tag = %self.tag, "virtiofsd did not exit with its connection closed; sending SIGTERM");
        }
        // SAFETY: kill(2) on our unreaped child.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        if let Some(status) = self.wait_for(STOP_TIMEOUT)? {
            return Ok(status);
        }
        let _ = self.child.kill();
        self.child.wait()
    }

    fn wait_for(&mut self, timeout: Duration) -> io::Result<Option<ExitStatus>> {
        let deadline = Instant::now() + timeout;
        if let Some(status) = self.child.try_wait()? {
            return Ok(Some(status));
        }
        // The pidfd turns readable the moment the child exits: the exit path waits for that
        // instead of polling.
        crate::fdwait::readable(self.pidfd.as_raw_fd(), Some(deadline));
        self.child.try_wait()
    }
}

fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(sig)) => format!("killed by signal {sig}"),
        _ => status.to_string(),
    }
}

/// Ends the VM with an error when a virtiofsd exits: the guest's requests to that file system
/// would never be answered.
pub struct ShareWatch {
    /// (pidfd, tag, host dir, pid)
    watched: Vec<(OwnedFd, String, PathBuf, u32)>,
    exit: Arc<ExitSignal>,
}

impl MutEventSubscriber for ShareWatch {
    fn init(&mut self, ops: &mut EventOps) {
        for (fd, tag, ..) in &self.watched {
            if let Err(e) = ops.add(Events::new_raw(fd.as_raw_fd(), EventSet::IN)) {
                // Unwatched, its death would hang the guest's file system: stop now.
                self.exit.set(ExitReason::Fault(format!("cannot watch virtiofsd for share '{tag}': {e:?}")));
            }
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        let _ = ops.remove(Events::empty_raw(fd));
        let Some((pidfd, tag, host, pid)) = self.watched.iter().find(|w| w.0.as_raw_fd() == fd) else { return };
        let status = peek_status(pidfd).unwrap_or_else(|| "status unknown".into());
        self.exit.set(ExitReason::Fault(format!(
            "virtiofsd for share '{tag}' ({}, pid {pid}) exited unexpectedly ({status}); the guest lost that file system",
            host.display()
        )));
    }
}

/// The exit status of the process behind `pidfd`, leaving it to be reaped by `Shares`.
fn peek_status(pidfd: &OwnedFd) -> Option<String> {
    // SAFETY: siginfo_t is plain data, filled by waitid.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: valid pidfd and siginfo pointer; WNOWAIT leaves the child unreaped.
    let r = unsafe {
        libc::waitid(libc::P_PIDFD, pidfd.as_raw_fd() as libc::id_t, &mut info, libc::WEXITED | libc::WNOHANG | libc::WNOWAIT)
    };
    if r != 0 {
        return None;
    }
    // SAFETY: waitid filled a SIGCHLD siginfo: si_status is valid.
    let status = unsafe { info.si_status() };
    match info.si_code {
        libc::CLD_EXITED => Some(format!("exit status {status}")),
        libc::CLD_KILLED | libc::CLD_DUMPED => Some(format!("killed by signal {status}")),
        _ => None,
    }
}
