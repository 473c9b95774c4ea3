//! Thin checked wrappers over the few system calls the init makes, and its one error type.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// Status reported when the init itself fails (as a shell's 125 for "the tool failed").
pub const STATUS_INIT_FAILED: u8 = 125;
/// The command exists but cannot be executed.
pub const STATUS_NOT_EXECUTABLE: u8 = 126;
/// The command was not found.
pub const STATUS_NOT_FOUND: u8 = 127;

/// A failure of the init: one `microvm-init: ...` line on the console, then this status
/// goes to the exit device.
#[derive(Debug)]
pub struct Fail {
    pub msg: String,
    pub status: u8,
}

impl Fail {
    pub fn new(msg: impl Into<String>) -> Fail {
        Fail { msg: msg.into(), status: STATUS_INIT_FAILED }
    }

    /// `what: error`.
    pub fn io(what: impl std::fmt::Display, e: io::Error) -> Fail {
        Fail::new(format!("{what}: {e}"))
    }
}

pub type Result<T> = std::result::Result<T, Fail>;

/// Prints one `microvm-init: ...` line on the console (stderr is the console).
pub fn say(msg: impl std::fmt::Display) {
    eprintln!("microvm-init: {msg}");
}

pub fn cstring(bytes: &[u8]) -> io::Result<CString> {
    CString::new(bytes).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

pub fn cpath(p: &Path) -> io::Result<CString> {
    cstring(p.as_os_str().as_bytes())
}

fn check(ret: libc::c_int) -> io::Result<()> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// mount(2). `source` and `data` may be empty.
pub fn mount(source: &str, target: &Path, fstype: &str, flags: libc::c_ulong, data: &str) -> io::Result<()> {
    let (source, target, fstype, data) = (cstring(source.as_bytes())?, cpath(target)?, cstring(fstype.as_bytes())?, cstring(data.as_bytes())?);
    let data_ptr = if data.as_bytes().is_empty() { std::ptr::null() } else { data.as_ptr().cast() };
    // SAFETY: every pointer is a NUL-terminated string that outlives the call (or null
    // for no data); the kernel copies them.
    check(unsafe { libc::mount(source.as_ptr(), target.as_ptr(), fstype.as_ptr(), flags, data_ptr) })
}

/// Moves the mount at `from` to `to` (MS_MOVE).
pub fn move_mount(from: &Path, to: &Path) -> io::Result<()> {
    let (from, to) = (cpath(from)?, cpath(to)?);
    // SAFETY: two NUL-terminated paths that outlive the call; no fstype or data.
    check(unsafe { libc::mount(from.as_ptr(), to.as_ptr(), std::ptr::null(), libc::MS_MOVE, std::ptr::null()) })
}

pub fn chroot(p: &Path) -> io::Result<()> {
    let p = cpath(p)?;
    // SAFETY: a NUL-terminated path that outlives the call.
    check(unsafe { libc::chroot(p.as_ptr()) })
}

pub fn sethostname(name: &str) -> io::Result<()> {
    // SAFETY: pointer and length of a live byte slice.
    check(unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) })
}

/// Flushes every filesystem (the root disk must hold the command's writes when the VM ends).
pub fn sync() {
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
}

/// Creates `dir` and its parents with mode 0755, as `mkdir -p`.
pub fn mkdir_p(dir: &Path) -> io::Result<()> {
    std::fs::create_dir_all(dir)
}
