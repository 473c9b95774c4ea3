//! The allow-lists, one per thread kind (x86_64 system call numbers from libc). Every
//! entry says who needs it; argument conditions narrow the calls whose arguments select
//! what they do. See the module docs of `seccomp` for how to add one.

use std::collections::BTreeMap;

use seccompiler::{BackendError, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompRule};

type Rules = BTreeMap<i64, Vec<SeccompRule>>;
type Result<T> = std::result::Result<T, BackendError>;

/// KVM ioctl numbers. kvm-ioctls keeps its own private, so they are declared here with
/// vmm-sys-util's macros from the same kvm-bindings types.
mod kvm {
    use kvm_bindings::{
        kvm_cpuid2, kvm_debugregs, kvm_fpu, kvm_lapic_state, kvm_mp_state, kvm_msrs, kvm_regs, kvm_sregs,
        kvm_translation, kvm_vcpu_events, kvm_xcrs, kvm_xsave, KVMIO,
    };
    vmm_sys_util::ioctl_io_nr!(KVM_RUN, KVMIO, 0x80);
    vmm_sys_util::ioctl_ior_nr!(KVM_GET_REGS, KVMIO, 0x81, kvm_regs);
    vmm_sys_util::ioctl_ior_nr!(KVM_GET_SREGS, KVMIO, 0x83, kvm_sregs);
    vmm_sys_util::ioctl_iowr_nr!(KVM_TRANSLATE, KVMIO, 0x85, kvm_translation);
    // What snapshot::capture_vcpu reads.
    vmm_sys_util::ioctl_iowr_nr!(KVM_GET_MSRS, KVMIO, 0x88, kvm_msrs);
    vmm_sys_util::ioctl_ior_nr!(KVM_GET_FPU, KVMIO, 0x8c, kvm_fpu);
    vmm_sys_util::ioctl_ior_nr!(KVM_GET_LAPIC, KVMIO, 0x8e, kvm_lapic_state);
    vmm_sys_util::ioctl_iowr_nr!(KVM_GET_CPUID2, KVMIO, 0x91, kvm_cpuid2);
    vmm_sys_util::ioctl_ior_nr!(KVM_GET_MP_STATE, KVMIO, 0x98, kvm_mp_state);
    vmm_sys_util::ioctl_ior_nr!(KVM_GET_VCPU_EVENTS, KVMIO, 0x9f, kvm_vcpu_events);
    vmm_sys_util::ioctl_ior_nr!(KVM_GET_DEBUGREGS, KVMIO, 0xa1, kvm_debugregs);
    vmm_sys_util::ioctl_io_nr!(KVM_GET_TSC_KHZ, KVMIO, 0xa3);
    vmm_sys_util::ioctl_ior_nr!(KVM_GET_XSAVE, KVMIO, 0xa4, kvm_xsave);
    vmm_sys_util::ioctl_ior_nr!(KVM_GET_XCRS, KVMIO, 0xa6, kvm_xcrs);
    vmm_sys_util::ioctl_ior_nr!(KVM_GET_XSAVE2, KVMIO, 0xcf, kvm_xsave);
}

/// TUNSETOFFLOAD = _IOW('T', 208, unsigned int) (linux/if_tun.h; not in libc).
const TUNSETOFFLOAD: u64 = 0x4004_54d0;

/// An allow-list under construction. `any` allows a call with any arguments; `when` allows
/// it only if one of its rules (each an AND of conditions) matches.
#[derive(Default)]
struct List(Rules);

impl List {
    fn any(&mut self, calls: &[i64]) -> &mut Self {
        for &nr in calls {
            self.0.insert(nr, Vec::new());
        }
        self
    }

    fn when(&mut self, nr: i64, conditions: Vec<SeccompCondition>) -> Result<&mut Self> {
        let rule = SeccompRule::new(conditions)?;
        match self.0.get_mut(&nr) {
            // Already allowed with any arguments: a narrower rule would change nothing.
            Some(rules) if rules.is_empty() => {}
            Some(rules) => rules.push(rule),
            None => {
                self.0.insert(nr, vec![rule]);
            }
        }
        Ok(self)
    }
}

/// Argument `arg` (0-based) equals `value` (compared as 32 bits: ints, ioctl requests).
fn eq(arg: u8, value: u64) -> Result<SeccompCondition> {
    SeccompCondition::new(arg, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, value)
}

/// Argument `arg` has none of the bits of `mask`.
fn without(arg: u8, mask: u64) -> Result<SeccompCondition> {
    SeccompCondition::new(arg, SeccompCmpArgLen::Dword, SeccompCmpOp::MaskedEq(mask), 0)
}

/// What every filtered thread needs: Rust's runtime (allocation, locks, thread exit),
/// logging to stderr, and the exit paths (panic hook, SIGSYS report).
fn common() -> Result<List> {
    let mut l = List::default();
    l.any(&[
        // Allocator: heap and arenas; mremap for realloc of large blocks.
        libc::SYS_brk,
        libc::SYS_munmap,
        libc::SYS_mremap,
        libc::SYS_madvise,
        // Mutex/Condvar/channel/thread join; spin-lock back-off.
        libc::SYS_futex,
        libc::SYS_sched_yield,
        // Time (when the vDSO is not used), the SIGSYS handler's wait for teardown.
        libc::SYS_clock_gettime,
        libc::SYS_clock_nanosleep,
        libc::SYS_nanosleep,
        // Return from the SIGRTMIN kick and other handlers; glibc masks signals at thread
        // exit; Rust's thread exit disables its alternate signal stack.
        libc::SYS_rt_sigreturn,
        // A blocking call (poll, futex, nanosleep) resumed after a signal handler.
        libc::SYS_restart_syscall,
        libc::SYS_rt_sigprocmask,
        libc::SYS_sigaltstack,
        // tracing to stderr, eventfd signalling (interrupts, the exit event), console output.
        libc::SYS_write,
        libc::SYS_close,
        // HashMap seeds, tracing's thread ids.
        libc::SYS_getrandom,
        libc::SYS_gettid,
        libc::SYS_getpid,
        libc::SYS_exit,
        libc::SYS_exit_group,
    ]);
    // Memory that never becomes executable: allocator arenas and thread stacks.
    l.when(libc::SYS_mmap, vec![without(2, libc::PROT_EXEC as u64)?])?;
    l.when(libc::SYS_mprotect, vec![without(2, libc::PROT_EXEC as u64)?])?;
    // The panic hook restores the terminal settings of stdin.
    l.when(libc::SYS_ioctl, vec![eq(0, libc::STDIN_FILENO as u64)?, eq(1, libc::TCSETS)?])?;
    // Debug builds check an fd is open before closing it (std's OwnedFd::drop).
    l.when(libc::SYS_fcntl, vec![eq(1, libc::F_GETFD as u64)?])?;
    // abort() after a panic inside the panic hook raises SIGABRT on itself.
    l.when(libc::SYS_tgkill, vec![eq(2, libc::SIGABRT as u64)?])?;
    Ok(l)
}

/// `vcpu-N`: KVM_RUN and the devices' PIO/MMIO handlers (serial to stdout, exit device,
/// virtio-mmio registers; activation hands the queues to the event loop). With `snapshot`
/// (a `--snapshot-to` run) also what saving a paused vCPU reads on its own thread.
pub(super) fn vcpu(snapshot: bool) -> Result<Rules> {
    let mut l = common()?;
    // virtio-mmio reset drains the queue eventfds; activation duplicates them for the
    // device's handler (std's try_clone is fcntl(F_DUPFD_CLOEXEC)).
    l.any(&[libc::SYS_read]);
    l.when(libc::SYS_fcntl, vec![eq(1, libc::F_DUPFD_CLOEXEC as u64)?])?;
    // virtio-net activation and reset set the TAP's offloads to what the guest acked.
    l.when(libc::SYS_ioctl, vec![eq(1, TUNSETOFFLOAD)?])?;
    // virtio-fs activation and reset talk vhost-user to virtiofsd on the connected socket
    // (the memory table's fds go as SCM_RIGHTS; replies wait under SO_RCVTIMEO).
    l.any(&[libc::SYS_sendmsg, libc::SYS_recvmsg, libc::SYS_poll]);
    // Backends made nonblocking when a device (re)activates.
    l.when(libc::SYS_fcntl, vec![eq(1, libc::F_GETFL as u64)?])?;
    l.when(libc::SYS_fcntl, vec![eq(1, libc::F_SETFL as u64)?])?;
    for request in [kvm::KVM_RUN(), kvm::KVM_GET_REGS(), kvm::KVM_GET_SREGS(), kvm::KVM_TRANSLATE()] {
        // KVM_RUN; the others only for the SIGUSR1 register dump and fault reports.
        l.when(libc::SYS_ioctl, vec![eq(1, request)?])?;
    }
    if snapshot {
        // snapshot::capture_vcpu, run on the parked vCPU's thread by PauseHandle::save
        // (KVM_GET_REGS and KVM_GET_SREGS are allowed above). Read-only: no KVM_SET_*.
        for request in [
            kvm::KVM_GET_MP_STATE(),
            kvm::KVM_GET_FPU(),
            kvm::KVM_GET_XSAVE(),
            kvm::KVM_GET_XSAVE2(),
            kvm::KVM_GET_XCRS(),
            kvm::KVM_GET_DEBUGREGS(),
            kvm::KVM_GET_LAPIC(),
            kvm::KVM_GET_TSC_KHZ(),
            kvm::KVM_GET_CPUID2(),
            kvm::KVM_GET_MSRS(),
            kvm::KVM_GET_VCPU_EVENTS(),
        ] {
            l.when(libc::SYS_ioctl, vec![eq(1, request)?])?;
        }
    }
    Ok(l.0)
}

/// `main` after setup: the event loop (epoll; device handlers are added and removed when
/// the guest activates or resets a device), stdin and the signalfd, virtio-blk disk I/O,
/// virtio-net TAP I/O, rate-limiter timers, and kicking vCPUs for register dumps.
pub(super) fn event_loop() -> Result<Rules> {
    let mut l = common()?;
    l.any(&[
        libc::SYS_epoll_wait,
        libc::SYS_epoll_pwait,
        libc::SYS_epoll_ctl,
        // stdin, signalfd, eventfds, timerfds, TAP frames.
        libc::SYS_read,
        libc::SYS_readv,
        libc::SYS_writev,
        // virtio-blk requests and flushes.
        libc::SYS_pread64,
        libc::SYS_pwrite64,
        libc::SYS_preadv,
        libc::SYS_pwritev,
        libc::SYS_fdatasync,
        libc::SYS_fsync,
        // Rate limiters re-arm their timerfds.
        libc::SYS_timerfd_settime,
        // virtio-console waits (bounded) for a full output backend.
        libc::SYS_poll,
        // The seqpacket network backend's frames (an already connected socket).
        libc::SYS_sendto,
        libc::SYS_recvfrom,
        libc::SYS_sendmsg,
    ]);
    // The virtiofsd watcher reads a dead daemon's status through its pidfd (WNOWAIT).
    l.when(libc::SYS_waitid, vec![eq(0, libc::P_PIDFD as u64)?])?;
    l.when(libc::SYS_fcntl, vec![eq(1, libc::F_GETFL as u64)?])?;
    l.when(libc::SYS_fcntl, vec![eq(1, libc::F_SETFL as u64)?])?;
    // SIGUSR1 register dump and --timeout: kick each vCPU thread with SIGRTMIN.
    l.when(libc::SYS_tgkill, vec![eq(2, vmm_sys_util::signal::SIGRTMIN() as u64)?])?;
    // After the run, the console post-mortem asks whether stdout is a terminal (isatty:
    // TCGETS) or the same file as stderr (fstat, which glibc makes newfstatat(fd, "",
    // AT_EMPTY_PATH)). Only on fds 1 and 2; newfstatat's path cannot be checked by a
    // filter, so an absolute one would reach any file's metadata, never its contents.
    l.when(libc::SYS_ioctl, vec![eq(0, libc::STDOUT_FILENO as u64)?, eq(1, libc::TCGETS)?])?;
    for fd in [libc::STDOUT_FILENO, libc::STDERR_FILENO] {
        l.when(libc::SYS_fstat, vec![eq(0, fd as u64)?])?;
        l.when(libc::SYS_newfstatat, vec![eq(0, fd as u64)?, eq(3, libc::AT_EMPTY_PATH as u64)?])?;
    }
    Ok(l.0)
}

/// The command channel's pumps (channel.rs): `microvm-stdin` copies microvm's stdin into
/// a pipe, `microvm.stdout`/`microvm.stderr` copy pipes to fds 1 and 2 (blocking reads and
/// writes; poll on the pipe and the stop eventfd; the pipe made nonblocking to drain it).
pub(super) fn channel() -> Result<Rules> {
    let mut l = common()?;
    l.any(&[libc::SYS_read, libc::SYS_poll]);
    l.when(libc::SYS_fcntl, vec![eq(1, libc::F_GETFL as u64)?])?;
    l.when(libc::SYS_fcntl, vec![eq(1, libc::F_SETFL as u64)?])?;
    Ok(l.0)
}

/// `dhcp-NAME` (net crate): one UDP socket on the bridge, and the network's lease file
/// (opened, flock'ed, read, rewritten in place, synced for each allocation).
pub(super) fn dhcp() -> Result<Rules> {
    let mut l = common()?;
    l.any(&[
        // The socket and the stop eventfd, woken together.
        libc::SYS_poll,
        libc::SYS_recvfrom,
        libc::SYS_sendto,
        libc::SYS_openat,
        libc::SYS_flock,
        libc::SYS_read,
        libc::SYS_lseek,
        libc::SYS_ftruncate,
        libc::SYS_fdatasync,
        libc::SYS_statx,
        libc::SYS_fstat,
    ]);
    Ok(l.0)
}

#[cfg(test)]
mod tests {
    use super::super::{compile, Extras, ThreadKind};
    use super::*;

    #[test]
    fn every_list_compiles() {
        for kind in [ThreadKind::Vcpu, ThreadKind::EventLoop, ThreadKind::Dhcp, ThreadKind::Channel] {
            for extras in [Extras::default(), Extras { snapshot: true }] {
                let bpf = compile(kind, extras).unwrap();
                assert!(!bpf.is_empty() && bpf.len() < 4096, "{kind:?} {extras:?}: {} instructions", bpf.len());
            }
        }
    }

    #[test]
    fn ioctl_numbers_match_the_kernel() {
        // Values from the kernel headers (linux/kvm.h, linux/if_tun.h) on x86_64.
        assert_eq!(kvm::KVM_RUN(), 0xae80);
        assert_eq!(kvm::KVM_GET_REGS(), 0x8090_ae81);
        assert_eq!(kvm::KVM_GET_SREGS(), 0x8138_ae83);
        assert_eq!(kvm::KVM_TRANSLATE(), 0xc018_ae85);
        assert_eq!(kvm::KVM_GET_MP_STATE(), 0x8004_ae98);
        assert_eq!(kvm::KVM_GET_FPU(), 0x81a0_ae8c);
        assert_eq!(kvm::KVM_GET_XSAVE(), 0x9000_aea4);
        assert_eq!(kvm::KVM_GET_XSAVE2(), 0x9000_aecf);
        assert_eq!(kvm::KVM_GET_XCRS(), 0x8188_aea6);
        assert_eq!(kvm::KVM_GET_DEBUGREGS(), 0x8080_aea1);
        assert_eq!(kvm::KVM_GET_LAPIC(), 0x8400_ae8e);
        assert_eq!(kvm::KVM_GET_TSC_KHZ(), 0xaea3);
        assert_eq!(kvm::KVM_GET_CPUID2(), 0xc008_ae91);
        assert_eq!(kvm::KVM_GET_MSRS(), 0xc008_ae88);
        assert_eq!(kvm::KVM_GET_VCPU_EVENTS(), 0x8040_ae9f);
        assert_eq!(TUNSETOFFLOAD, 0x4004_54d0);
    }

    #[test]
    fn only_snapshot_runs_let_vcpus_read_their_state() {
        let ioctls = |snapshot| vcpu(snapshot).unwrap()[&libc::SYS_ioctl].len();
        assert_eq!(ioctls(true), ioctls(false) + 11, "the KVM_GET_* of capture_vcpu");
        assert_eq!(vcpu(true).unwrap().len(), vcpu(false).unwrap().len(), "no other call");
    }

    #[test]
    fn narrow_rules_do_not_override_any() {
        let mut l = List::default();
        l.any(&[libc::SYS_ioctl]);
        l.when(libc::SYS_ioctl, vec![eq(1, 1).unwrap()]).unwrap();
        assert!(l.0[&libc::SYS_ioctl].is_empty());
        assert!(!vcpu(true).unwrap().contains_key(&libc::SYS_openat), "vCPUs open no files");
        assert!(!event_loop().unwrap().contains_key(&libc::SYS_execve));
        assert!(!channel().unwrap().contains_key(&libc::SYS_openat), "pumps open no files");
        for rules in [vcpu(false).unwrap(), vcpu(true).unwrap(), event_loop().unwrap(), dhcp().unwrap(), channel().unwrap()] {
            assert!(!rules.contains_key(&libc::SYS_rt_sigaction), "the SIGSYS handler must stay");
        }
    }
}
