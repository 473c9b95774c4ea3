//! `kill -USR1 <microvm pid>` prints every vCPU's registers to stderr: the way to tell a
//! slow guest from a hung one (RIP is named from the kernel's System.map when microvm
//! found one, see `symbols`). The main thread
//! flags each vCPU and kicks its thread with SIGRTMIN, which makes KVM_RUN return EINTR;
//! the vCPU thread then prints its own state (only it may use its vCPU fd).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, Once};
use std::time::{Duration, Instant};

use kvm_ioctls::VcpuFd;

use crate::symbols::Symbols;

/// Bit N set: vCPU N should print its state.
static DUMP_REQUESTS: AtomicU64 = AtomicU64::new(0);
/// Bit N set: vCPU N has printed its state since the last `dump_and_wait`.
static DUMPS_DONE: (Mutex<u64>, Condvar) = (Mutex::new(0), Condvar::new());

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Installs the (empty) SIGRTMIN handler whose only job is to interrupt KVM_RUN.
pub fn install_kick_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if let Err(e) = vmm_sys_util::signal::register_signal_handler(vmm_sys_util::signal::SIGRTMIN(), kick_handler) {
            tracing::warn!("no vCPU kick handler, SIGUSR1 dumps won't work: {e}");
        }
    });
}

pub fn request_dump(threads: &[libc::pthread_t]) {
    for (i, t) in threads.iter().enumerate().take(64) {
        DUMP_REQUESTS.fetch_or(1 << i, Ordering::SeqCst);
        // SAFETY: `t` is a live vCPU thread of this process (they run until exit).
        unsafe { libc::pthread_kill(*t, vmm_sys_util::signal::SIGRTMIN()) };
    }
}

/// Like `request_dump`, but returns only when every vCPU has printed (or after `limit`,
/// e.g. for a vCPU thread that is gone): the caller's next lines follow the dump.
pub fn dump_and_wait(threads: &[libc::pthread_t], limit: Duration) {
    let all = threads.iter().take(64).enumerate().fold(0u64, |m, (i, _)| m | 1 << i);
    *crate::bus::lock(&DUMPS_DONE.0) &= !all;
    request_dump(threads);
    let deadline = Instant::now() + limit;
    let mut done = crate::bus::lock(&DUMPS_DONE.0);
    while *done & all != all {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            eprintln!("microvm: not every vCPU answered the register dump request");
            return;
        }
        done = DUMPS_DONE.1.wait_timeout(done, left).unwrap_or_else(|e| e.into_inner()).0;
    }
}

/// Called by vCPU `index` after printing its state.
pub fn dump_done(index: u8) {
    *crate::bus::lock(&DUMPS_DONE.0) |= 1u64 << index.min(63);
    DUMPS_DONE.1.notify_all();
}

pub fn take_dump_request(index: u8) -> bool {
    let bit = 1u64 << index.min(63);
    DUMP_REQUESTS.fetch_and(!bit, Ordering::SeqCst) & bit != 0
}

/// Runs on the vCPU's own thread after the kick (not in a signal handler): it may allocate.
pub fn print_state(index: u8, fd: &VcpuFd, symbols: &Symbols) {
    match (fd.get_regs(), fd.get_sregs()) {
        (Ok(r), Ok(s)) => eprintln!(
            "microvm: vcpu-{index}: RIP={:#018x}{} RSP={:#018x} RFLAGS={:#x} CPL={} CR3={:#x} RAX={:#x} RCX={:#x}",
            r.rip,
            symbols.describe(r.rip),
            r.rsp,
            r.rflags,
            s.cs.selector & 3,
            s.cr3,
            r.rax,
            r.rcx
        ),
        (Err(e), _) | (_, Err(e)) => eprintln!("microvm: vcpu-{index}: cannot read registers: {e}"),
    }
}
