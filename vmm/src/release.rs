//! The VM's release process: KVM destroys the VM after microvm has exited, not during its exit.
//!
//! Whoever drops the last reference to a VM fd runs `kvm_destroy_vm`. That call waits for
//! SRCU grace periods, and on this host they cost ~25 ms in all, more than the rest of a
//! payload VM's life. The waits, sampled with `perf record -e sched:sched_switch -g`:
//! - the PIT's removal from two I/O buses and from the IRQ-ack notifiers;
//! - the MMU notifier's unregistration;
//! - the irqfd workqueue's flush.
//!
//! None of them is work microvm's caller waits for: the guest is gone, its memory is
//! unmapped and the network is released before microvm exits. So right after KVM_CREATE_VM,
//! [`delegate`] forks a small process, `microvm-release`, that holds a second reference to
//! the VM fd until microvm has exited, and then drops it. The last reference is then the
//! release process's, and the destruction runs there. QEMU's `-run-with async-teardown=on`
//! moves the address space's teardown into a similar process.
//!
//! The release process holds nothing else:
//! - Every other fd is closed, stdio included. A caller reading microvm's output sees EOF
//!   when microvm exits, and no TAP, disk or socket lives on in it.
//! - It moves to `/`, so it keeps no directory busy (a tmpfs can be unmounted).
//! - It blocks every signal that can be blocked: a Ctrl-C or a supervisor's SIGTERM to the
//!   process group, or a `pkill -USR1 microvm` meant for microvm's register dump, cannot
//!   make it drop its reference before microvm does. SIGKILL still works, and only makes
//!   the destruction synchronous again.
//! - A seccomp filter allows only `poll`, `restart_syscall` and the exits, and kills the
//!   process for anything else.
//!
//! It waits on a pidfd of microvm, opened before the fork. The pidfd becomes readable only
//! when microvm's last thread has exited, so after the kernel has closed all of microvm's
//! fds: the vCPU fds, which also hold VM references, are gone by then. A pipe's EOF would
//! come too early: the kernel closes a process's fds in fd order, so a vCPU fd could still be
//! open when the pipe's last writer closes. Then `_exit` drops the VM reference.
//!
//! Why a process: a process's exit waits for all its threads, and a thread inside
//! `kvm_destroy_vm` cannot be interrupted. Why fork, not spawn a helper binary: the fork
//! comes before the guest memory is mapped, so it copies little, and it needs no exec
//! and no dynamic linking. The child runs only async-signal-safe system calls, so the
//! fork is safe in a process that already has threads.
//!
//! If anything fails (pidfd_open on an old kernel, fork at a process limit, the filter), the
//! VM is destroyed at microvm's exit as before: this only moves work, it never changes what
//! is released.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter};

/// The release process's name (`comm`, at most 15 bytes), for `ps` and for tests.
pub const PROCESS_NAME: &std::ffi::CStr = c"microvm-release";

/// Forks the release process for `vm` (see the module documentation). Returns its pid, or
/// None if it could not be started; then the VM is destroyed at microvm's exit as before.
pub fn delegate(vm: &impl AsRawFd) -> Option<libc::pid_t> {
    let program = match filter() {
        Ok(p) => p,
        Err(e) => {
            tracing::debug!(error = %e, "release process: no seccomp filter, not started");
            return None;
        }
    };
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1; no memory is passed.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, libc::getpid(), 0) };
    if pidfd < 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "release process: no pidfd, not started");
        return None;
    }
    // SAFETY: pidfd_open returned a new fd that nothing else owns.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd as RawFd) };
    // SAFETY: fork has no arguments. The child runs only `release_child`, which makes
    // async-signal-safe system calls on data prepared before the fork and never returns.
    match unsafe { libc::fork() } {
        // SAFETY: see `release_child`: called once, in the child, right after the fork.
        0 => unsafe { release_child(vm.as_raw_fd(), pidfd.as_raw_fd(), PROCESS_NAME.as_ptr(), &program) },
        -1 => {
            tracing::debug!(error = %std::io::Error::last_os_error(), "release process: fork failed");
            None
        }
        pid => {
            tracing::debug!(pid, "release process started");
            Some(pid)
        }
    }
}

/// The release process's seccomp filter: wait, then exit; anything else kills it.
fn filter() -> Result<BpfProgram, seccompiler::BackendError> {
    let allowed = [libc::SYS_poll, libc::SYS_restart_syscall, libc::SYS_exit, libc::SYS_exit_group];
    let filter = SeccompFilter::new(
        allowed.into_iter().map(|nr| (nr, Vec::new())).collect(),
        SeccompAction::KillProcess,
        SeccompAction::Allow,
        seccompiler::TargetArch::x86_64,
    )?;
    BpfProgram::try_from(filter)
}

/// The release process: keeps `vm` and `pidfd` (microvm's) open and nothing else, waits until
/// microvm has exited, and exits, which drops the last VM reference.
///
/// # Safety
/// Call only in the child of a fork, once. It allocates nothing and takes no lock (another
/// thread of the parent may have held one at the fork), makes raw system calls only, and
/// never returns. `name` must be a NUL-terminated string of at most 16 bytes.
unsafe fn release_child(vm: RawFd, pidfd: RawFd, name: *const libc::c_char, program: &BpfProgram) -> ! {
    close_all_but(vm, pidfd);
    // SAFETY: system calls on integers, the constant string `name` and a signal set on this
    // stack; none allocates or takes a lock.
    unsafe {
        libc::chdir(c"/".as_ptr());
        let mut blocked: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut blocked);
        libc::sigprocmask(libc::SIG_BLOCK, &blocked, std::ptr::null_mut());
        // Last before the filter: whoever finds the process by its name finds it holding
        // only its two fds, in `/`, with its signals blocked.
        libc::prctl(libc::PR_SET_NAME, name, 0, 0, 0);
    }
    // Allocates nothing: a prctl and a seccomp call on the program built before the fork.
    // Without the filter, the process still only waits and exits.
    let _ = seccompiler::apply_filter(program);
    let mut pfd = libc::pollfd { fd: pidfd, events: libc::POLLIN, revents: 0 };
    loop {
        // SAFETY: poll(2) on one pollfd on this stack; the raw call is the one the filter
        // allows (libc's poll() may use ppoll).
        let n = unsafe { libc::syscall(libc::SYS_poll, &mut pfd as *mut libc::pollfd, 1, -1) };
        if n > 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            break;
        }
    }
    // SAFETY: _exit(2) ends the process without running any of the parent's destructors.
    unsafe { libc::_exit(0) }
}

/// Closes every fd of the calling process but `a` and `b`.
fn close_all_but(a: RawFd, b: RawFd) {
    let (lo, hi) = (a.min(b) as u32, a.max(b) as u32);
    for (first, last) in [(0, lo.checked_sub(1)), (lo + 1, hi.checked_sub(1)), (hi + 1, Some(u32::MAX))] {
        let Some(last) = last.filter(|l| *l >= first) else { continue };
        // SAFETY: close_range(2) takes integers; closing fds this process no longer uses.
        let r = unsafe { libc::syscall(libc::SYS_close_range, first, last, 0) };
        if r != 0 {
            // Kernels before 5.9: close them one by one, up to a bound.
            for fd in first..=last.min(65535) {
                // SAFETY: close(2) on an integer; EBADF for fds that are not open.
                unsafe { libc::close(fd as RawFd) };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_filter_compiles() {
        assert!(!filter().unwrap().is_empty());
    }
}
