//! The SIGSYS handler: reports a denied system call and ends the process.
//!
//! A signal handler may only use async-signal-safe operations: no allocation, no locks, no
//! `format!`, no `tracing`. So the report is assembled in a stack buffer by hand (hence the
//! small number formatting below) and written with one write(2) to stderr; the thread's
//! name was copied into a plain thread-local when its filter was installed.

use std::cell::Cell;

use libc::{c_int, c_void, siginfo_t};

/// `si_code` of a SIGSYS raised by a seccomp filter (SYS_SECCOMP in asm-generic/siginfo.h).
const SYS_SECCOMP: c_int = 1;

const NAME_MAX: usize = 32;

thread_local! {
    /// Whether this thread runs under a filter.
    pub(super) static CONFINED: Cell<bool> = const { Cell::new(false) };
    /// This thread's name, NUL-padded; const-initialised and without a destructor, so
    /// reading it is a plain TLS access (safe in a signal handler).
    static THREAD_NAME: Cell<[u8; NAME_MAX]> = const { Cell::new([0; NAME_MAX]) };
}

/// The SIGSYS member of siginfo_t on x86_64 (`_sigsys` in asm-generic/siginfo.h): after
/// si_signo, si_errno, si_code and padding come the call address, number and audit arch.
/// The libc crate does not expose these fields.
#[repr(C)]
#[allow(dead_code)] // mirrors the kernel's layout; not every field is read
struct SigsysInfo {
    signo: c_int,
    errno: c_int,
    code: c_int,
    _pad: c_int,
    call_addr: *const c_void,
    syscall: c_int,
    arch: u32,
}

/// Copies the calling thread's name for the report (done when its filter is installed).
pub(super) fn remember_thread_name() {
    let current = std::thread::current();
    let name = current.name().unwrap_or("unnamed");
    let mut buf = [0u8; NAME_MAX];
    let n = name.len().min(NAME_MAX);
    buf[..n].copy_from_slice(&name.as_bytes()[..n]);
    THREAD_NAME.with(|c| c.set(buf));
}

pub(super) fn install() -> vmm_sys_util::errno::Result<()> {
    vmm_sys_util::signal::register_signal_handler(libc::SIGSYS, handle_sigsys)
}

extern "C" fn handle_sigsys(num: c_int, info: *mut siginfo_t, _ctx: *mut c_void) {
    if num != libc::SIGSYS || info.is_null() {
        return;
    }
    // SAFETY: the kernel passes a valid siginfo_t for an SA_SIGINFO handler; SigsysInfo
    // mirrors its SIGSYS layout and is no larger than siginfo_t (128 bytes).
    let info = unsafe { &*(info as *const SigsysInfo) };
    let mut msg = Report::default();
    if info.code == SYS_SECCOMP {
        let name = THREAD_NAME.with(Cell::get);
        let len = name.iter().position(|&b| b == 0).unwrap_or(NAME_MAX);
        msg.push(b"microvm: seccomp: thread ");
        msg.push(&name[..len]);
        msg.push(b" made a forbidden system call ");
        msg.push_dec(i64::from(info.syscall));
        msg.push(b" (");
        let sysno = usize::try_from(info.syscall).ok().and_then(syscalls::Sysno::new);
        msg.push(sysno.map_or("unknown", |s| s.name()).as_bytes());
        msg.push(b") at ");
        msg.push_hex(info.call_addr as u64);
        msg.push(b"; see vmm/src/seccomp/mod.rs to allow it, or run with --no-seccomp\n");
    } else {
        msg.push(b"microvm: received SIGSYS from outside seccomp\n");
    }
    msg.write_to_stderr();
    crate::teardown::exit_with_teardown(crate::exit::code::SECCOMP_VIOLATION);
}

/// A fixed-size message built without allocating.
struct Report {
    buf: [u8; 256],
    len: usize,
}

impl Default for Report {
    fn default() -> Self {
        Report { buf: [0; 256], len: 0 }
    }
}

impl Report {
    fn push(&mut self, bytes: &[u8]) {
        let n = bytes.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&bytes[..n]);
        self.len += n;
    }

    fn push_dec(&mut self, v: i64) {
        if v < 0 {
            self.push(b"-");
        }
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        let mut u = v.unsigned_abs();
        loop {
            i -= 1;
            digits[i] = b'0' + (u % 10) as u8;
            u /= 10;
            if u == 0 {
                break;
            }
        }
        self.push(&digits[i..]);
    }

    fn push_hex(&mut self, v: u64) {
        let mut digits = [0u8; 18];
        digits[0] = b'0';
        digits[1] = b'x';
        for (i, d) in digits[2..].iter_mut().enumerate() {
            let nibble = (v >> (60 - 4 * i)) & 0xf;
            *d = b"0123456789abcdef"[nibble as usize];
        }
        self.push(&digits);
    }

    fn write_to_stderr(&self) {
        let mut done = 0;
        while done < self.len {
            // SAFETY: the range is inside `buf`; write(2) is async-signal-safe.
            let n = unsafe { libc::write(libc::STDERR_FILENO, self.buf[done..].as_ptr().cast(), self.len - done) };
            if n <= 0 {
                return;
            }
            done += n as usize;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_formatting() {
        let mut r = Report::default();
        r.push(b"nr ");
        r.push_dec(39);
        r.push(b" ");
        r.push_dec(-1);
        r.push(b" ");
        r.push_dec(0);
        r.push(b" at ");
        r.push_hex(0x7f00_dead_beef);
        assert_eq!(&r.buf[..r.len], b"nr 39 -1 0 at 0x00007f00deadbeef");
        let mut long = Report::default();
        long.push(&[b'x'; 300]);
        assert_eq!(long.len, 256, "truncated, not overflowed");
    }

    #[test]
    fn sigsys_layout_fits_siginfo() {
        assert!(std::mem::size_of::<SigsysInfo>() <= std::mem::size_of::<siginfo_t>());
        assert_eq!(std::mem::offset_of!(SigsysInfo, call_addr), 16);
        assert_eq!(std::mem::offset_of!(SigsysInfo, syscall), 24);
        assert_eq!(syscalls::Sysno::new(39).map(|s| s.name()), Some("getpid"));
    }
}
