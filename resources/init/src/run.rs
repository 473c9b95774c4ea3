//! The command (or the console shell), PID 1's reaping, and the end: the status to
//! microvm's exit device, then a reboot (microvm exits on reset).

use std::ffi::CString;
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};

use crate::protocol::Params;
use crate::sys::{self, Fail, Result, STATUS_INIT_FAILED, STATUS_NOT_EXECUTABLE, STATUS_NOT_FOUND};

/// The line the tests (and snapshots) wait for: printed right before the command starts.
pub const READY: &str = "MICROVM-INIT-READY";
const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
const SHELL: &str = "/bin/sh";
const PAGE: u64 = 4096;

/// microvm's exit device (0: none known yet), kept where the panic hook can see it.
static EXIT_DEVICE: AtomicU64 = AtomicU64::new(0);

pub fn set_exit_device(addr: Option<u64>) {
    EXIT_DEVICE.store(addr.unwrap_or(0), Ordering::Relaxed);
}

/// A power request sent to PID 1 (busybox `poweroff`/`halt`/`reboot` without `-f`, or
/// `kill` by hand): the signal number, 0 for none.
static POWER_REQUEST: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_power_signal(sig: libc::c_int) {
    POWER_REQUEST.store(sig, Ordering::Relaxed);
}

/// Catches the signals busybox's `poweroff` (SIGUSR2), `halt` (SIGUSR1) and `reboot`
/// (SIGTERM) send to PID 1, without SA_RESTART so that `waitpid` returns EINTR and the
/// reaping loop ends the VM. The command gets default dispositions back at exec.
fn catch_power_signals() {
    for sig in [libc::SIGUSR1, libc::SIGUSR2, libc::SIGTERM] {
        // SAFETY: an all-zero sigaction is valid (empty mask, no flags); the handler only
        // stores to an atomic, which is async-signal-safe.
        let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
        sa.sa_sigaction = on_power_signal as extern "C" fn(libc::c_int) as usize;
        // SAFETY: a valid sigaction for a catchable signal; the old action is not needed.
        unsafe { libc::sigaction(sig, &sa, std::ptr::null_mut()) };
    }
}

/// Sets the environment, enters the working directory, runs the command (or a login
/// shell), reaps every orphan until it ends, and returns its status.
pub fn run(p: &Params) -> Result<u8> {
    for (k, _) in std::env::vars_os() {
        std::env::remove_var(k);
    }
    let term = p.term.as_deref().filter(|t| !t.is_empty()).unwrap_or("linux");
    for (k, v) in [("PATH", PATH), ("HOME", "/root"), ("TERM", term), ("USER", "root"), ("LOGNAME", "root")] {
        std::env::set_var(k, v);
    }
    if let Some(cwd) = &p.cwd {
        let path = std::path::Path::new(std::ffi::OsStr::from_bytes(cwd));
        std::env::set_current_dir(path)
            .map_err(|e| Fail::io(format_args!("cannot enter the working directory {}", path.display()), e))?;
    }
    let (file, argv) = match &p.argv {
        Some(words) => {
            let argv = words.iter().map(|w| sys::cstring(w)).collect::<std::io::Result<Vec<_>>>();
            let argv = argv.map_err(|e| Fail::io("bad command word", e))?;
            let file = argv.first().cloned().ok_or_else(|| Fail::new("empty command"))?;
            (file, argv)
        }
        None => (CString::from(c"/bin/sh"), vec![CString::from(c"-sh")]),
    };
    // A command talks to microvm over the command channel; the shell gets the console.
    let ports = if p.argv.is_some() { crate::channel::open_ports() } else { None };
    let tty = if ports.is_none() { console_tty() } else { None };
    let mut argv_ptrs: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
    argv_ptrs.push(std::ptr::null());
    let shown = String::from_utf8_lossy(if p.argv.is_some() { file.as_bytes() } else { SHELL.as_bytes() }).into_owned();

    catch_power_signals();
    println!("{READY}");
    let _ = std::io::stdout().flush();
    // SAFETY: fork(2) in a single-threaded process; the child only calls async-signal-safe
    // functions until it execs or exits (the error message allocates, which is fine with
    // no other thread to hold a lock).
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(Fail::io("cannot fork", std::io::Error::last_os_error()));
    }
    if pid == 0 {
        // SAFETY: setsid/ioctl/dup2 on our own descriptors (the ports' dups lose
        // O_CLOEXEC; the originals close on exec); execvp with a NULL-terminated
        // array of pointers into `argv`, which is alive until exec replaces the process.
        unsafe {
            libc::setsid();
            if let Some(ports) = &ports {
                // No controlling terminal: the command is not interactive (as `ssh host cmd`).
                for (target, fd) in ports.iter().enumerate() {
                    libc::dup2(fd.as_raw_fd(), target as libc::c_int);
                }
            } else if let Some(fd) = &tty {
                libc::ioctl(fd.as_raw_fd(), libc::TIOCSCTTY, 1);
                for target in 0..3 {
                    libc::dup2(fd.as_raw_fd(), target);
                }
            }
            libc::execvp(file.as_ptr(), argv_ptrs.as_ptr());
        }
        let e = std::io::Error::last_os_error();
        sys::say(format_args!("cannot run '{shown}': {e}"));
        let status = if e.raw_os_error() == Some(libc::ENOENT) { STATUS_NOT_FOUND } else { STATUS_NOT_EXECUTABLE };
        // SAFETY: _exit(2) ends the child without running the parent's atexit state.
        unsafe { libc::_exit(i32::from(status)) };
    }
    // Only the command (and what it starts) keeps the ports open.
    drop(tty);
    drop(ports);
    Ok(wait_for(pid))
}

/// Reaps every child (PID 1 inherits all orphans) until `pid` ends; its status as a shell
/// reports it (128+N when killed by signal N).
fn wait_for(pid: libc::pid_t) -> u8 {
    loop {
        if POWER_REQUEST.load(Ordering::Relaxed) != 0 {
            power_off(0); // asked for while we were not waiting
        }
        let mut st: libc::c_int = 0;
        // SAFETY: waitpid(2) writes the status into a live c_int.
        let r = unsafe { libc::waitpid(-1, &mut st, 0) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINTR) {
                match POWER_REQUEST.load(Ordering::Relaxed) {
                    0 => continue,
                    // The guest asked to power off, halt or reboot: the VM ends with 0.
                    _ => power_off(0),
                }
            }
            sys::say(format_args!("lost the command: waitpid: {e}"));
            return STATUS_INIT_FAILED;
        }
        if r != pid {
            continue;
        }
        if libc::WIFEXITED(st) {
            return libc::WEXITSTATUS(st) as u8;
        }
        if libc::WIFSIGNALED(st) {
            return (128 + libc::WTERMSIG(st)) as u8;
        }
    }
}

/// The console's real tty (e.g. /dev/ttyS0), which can be a controlling terminal where
/// /dev/console cannot: the last entry of /sys/class/tty/console/active, as busybox
/// cttyhack finds it.
fn console_tty() -> Option<OwnedFd> {
    let active = std::fs::read_to_string("/sys/class/tty/console/active").ok()?;
    let name = active.split_whitespace().last()?;
    let path = sys::cstring(format!("/dev/{name}").as_bytes()).ok()?;
    // SAFETY: a NUL-terminated path; the descriptor is checked and then owned.
    let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC) };
    if fd < 0 {
        sys::say(format_args!("cannot open /dev/{name}: {}; no job control", std::io::Error::last_os_error()));
        return None;
    }
    // SAFETY: fd is fresh and owned by nobody else.
    Some(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Syncs, reports `status` to microvm's exit device, and reboots when that did not end
/// the VM (no exit device, no /dev/mem, or not under microvm). Never returns.
pub fn power_off(status: u8) -> ! {
    sys::sync();
    let addr = EXIT_DEVICE.load(Ordering::Relaxed);
    if addr == 0 {
        sys::say(format_args!("no exit device (microvm.exitdev=): rebooting; the status {status} is lost"));
    } else if let Err(e) = write_exit_device(addr, status) {
        sys::say(format_args!("cannot reach the exit device through /dev/mem ({e}; CONFIG_DEVMEM?): rebooting; the status {status} is lost"));
    }
    // SAFETY: reboot(2) with a constant command; PID 1 may reboot.
    unsafe { libc::reboot(libc::RB_AUTOBOOT) };
    loop {
        // SAFETY: pause(2) takes no arguments.
        unsafe { libc::pause() };
    }
}

/// One 32-bit write of `status` at physical address `addr`, through /dev/mem.
fn write_exit_device(addr: u64, status: u8) -> std::io::Result<()> {
    let file = std::fs::OpenOptions::new().read(true).write(true).custom_flags(libc::O_SYNC).open("/dev/mem")?;
    let base = addr & !(PAGE - 1);
    let offset = usize::try_from(addr - base).map_err(std::io::Error::other)?;
    if !offset.is_multiple_of(4) {
        return Err(std::io::Error::other(format!("exit device address {addr:#x} is not 4-byte aligned")));
    }
    let base = libc::off_t::try_from(base).map_err(std::io::Error::other)?;
    // SAFETY: a fresh shared mapping of one page of /dev/mem; checked before use.
    let p = unsafe {
        libc::mmap(std::ptr::null_mut(), PAGE as usize, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, file.as_raw_fd(), base)
    };
    if p == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: offset < PAGE and 4-aligned (checked above): a u32 inside the mapping.
    unsafe { std::ptr::write_volatile(p.cast::<u8>().add(offset).cast::<u32>(), u32::from(status)) };
    // Only reached when the write did not stop the VM.
    // SAFETY: unmapping the mapping made above.
    unsafe { libc::munmap(p, PAGE as usize) };
    Err(std::io::Error::other("the write did not stop the VM (not running under microvm?)"))
}
