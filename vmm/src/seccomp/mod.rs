//! seccomp-bpf filters, one per thread kind, as Firecracker does: a thread that runs guest-
//! facing code may make only the system calls its job needs, so a guest that takes over a
//! device emulator or a vCPU loop cannot open files, spawn programs, or talk to the host's
//! network.
//!
//! | thread kind    | runs                                                  | filter installed      |
//! |----------------|-------------------------------------------------------|-----------------------|
//! | `vcpu-N`       | KVM_RUN, PIO/MMIO dispatch (serial, exit, ACPI PM, virtio-mmio; device activation and reset, including virtio-fs's vhost-user messages to virtiofsd), register dumps; in a `--snapshot-to` run only, reading its own state for the save (KVM_GET_*, see [`Extras`]) | at thread start, before the first KVM_RUN |
//! | `main`         | the event loop: virtio-blk/net/rng/console queues, TAP and disk I/O, stdin, signals, the virtiofsd watcher (pidfd), the `--timeout` timer; after it, pausing the vCPUs for a snapshot, the console post-mortem and the command channel's last flush | after all setup (a boot's or a restore's), right before the event loop |
//! | `microvm-stdin`, `microvm.stdout`, `microvm.stderr`, `microvm-control` | the command channel's pumps (channel.rs): fds 0/1/2 to and from the virtio-console's pipes; a snapshot's READY watcher or a restore's command writer on the control port | at thread start ([`spawn_confined`]) |
//! | `dhcp-NAME`    | the DHCP responder (net crate): UDP socket, stop eventfd, lease file | at thread start (through `net::set_thread_start_hook`) |
//! | `teardown`     | nothing until exit; then the ordered release (TAPs/bridges/nft, then virtiofsd) | **none** (see below)  |
//! | `microvm-release` (a process, not a thread) | holds the VM fd until microvm has exited, so KVM destroys the VM there (crate::release) | its own: poll and exit only; anything else kills it |
//! | `snapshot-save` | `--snapshot-to` runs only: nothing until the init is ready; then the save (VM state, disk metadata, the snapshot's files) while `main` waits ([`Unconfined`]) | **none** |
//!
//! The lists themselves are in [`rules`]; each entry says who needs it. [`enable`] compiles
//! them once; each thread installs its own ([`confine`], [`spawn_confined`]).
//!
//! Teardown (rtnetlink, `nft` fork+exec, stopping virtiofsd, removing state files) needs
//! exactly what a hostile guest must not get, and an exec'd `nft` would inherit any filter
//! of its parent thread. So it runs on the `teardown` thread ([`crate::teardown`]), started
//! before any filtered thread; it takes over the NICs and the virtiofsd daemons at the end
//! of setup and blocks in read(2) on an eventfd until the VM exits, the process panics, or
//! a filtered thread is caught by seccomp. It owns nothing a guest reaches.
//!
//! Snapshots: the save needs KVM_GET_* on the VM fd and creates, writes, syncs and renames
//! files, so the main thread hands it to `snapshot-save`, the other unfiltered thread, which
//! exists only in `--snapshot-to` runs and only ever runs that one job. Each vCPU's state is
//! read on its own thread (`snapshot::PauseHandle::save`), so those threads' filter allows
//! the read-only KVM_GET_* calls in `--snapshot-to` runs, and no other run's. A restore
//! sets every state (KVM_SET_*, device restores on a short-lived helper thread) during
//! setup, before any filter but the channel pumps'; its vCPUs and event loop then run under
//! the same filters as a boot's.
//!
//! A denied system call is not an error return: the filter answers SECCOMP_RET_TRAP, the
//! kernel raises SIGSYS in the offending thread (it can be neither blocked nor ignored),
//! and [`sigsys`]'s handler prints
//! `microvm: seccomp: thread vcpu-0 made a forbidden system call 39 (getpid) at 0x...`,
//! asks the teardown thread to tear the network and the virtiofsd daemons down, and the
//! process exits with status 159 (128 + SIGSYS, `exit::code::SECCOMP_VIOLATION`).
//! `rt_sigaction` is in no list, so a filtered thread cannot replace that handler.
//!
//! # When a test dies with the seccomp report
//! 1. The report names the thread and the system call (x86_64 number and name). Check it is
//!    legitimate: the code path is yours (a new device, a new library call), not a bug.
//! 2. Reproduce with `--no-seccomp` under `strace -f -e trace=<name>` to see the arguments.
//!    To collect every missing call of a test in one run (debug builds), set
//!    `MICROVM_SECCOMP_LOG=1`: denied calls are then allowed and logged by the kernel
//!    (`dmesg | grep type=1326`: `comm=` is the thread, `syscall=` the number).
//! 3. Add the call to the thread kind's list in [`rules`] next to a comment saying who needs
//!    it; narrow it with argument conditions where a number selects the operation (ioctl
//!    requests, fcntl commands, socket domains, mmap protections), as the existing entries
//!    do. A call needed by every filtered thread (memory, locks, logging) goes in
//!    `rules::common`.
//! 4. Run the test again; `rules`' unit tests check every list still compiles to BPF.
//!
//! `--no-seccomp` installs nothing (for debugging with strace/gdb, or on hosts whose libc
//! makes calls the lists lack). Filters are built from Rust at startup (microseconds), not
//! from JSON at build time: the lists use the same libc/KVM constants as the code that
//! makes the calls, so a typo does not compile, and there is no build script or file format
//! to keep in step. Only x86_64 is supported, like the rest of microvm.

mod rules;
mod sigsys;
mod unconfined;

use std::collections::BTreeMap;
use std::sync::OnceLock;
use std::thread::JoinHandle;

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, SeccompRule, TargetArch};
use thiserror::Error;

pub use unconfined::Unconfined;

/// The thread kinds that run under a filter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThreadKind {
    Vcpu,
    /// The main thread's event loop, after setup.
    EventLoop,
    /// The net crate's DHCP responder threads.
    Dhcp,
    /// The command channel's pumps (channel.rs): microvm's stdin/stdout/stderr to and
    /// from the virtio-console's pipes.
    Channel,
}

/// What a run's filters allow beyond a plain run's (set by [`enable`] from the configuration).
#[derive(Clone, Copy, Debug, Default)]
pub struct Extras {
    /// `--snapshot-to`: the vCPU threads read their own state for the save
    /// (`snapshot::PauseHandle::save`). Other runs' vCPUs cannot.
    pub snapshot: bool,
}

impl ThreadKind {
    fn rules(self, extras: Extras) -> Result<BTreeMap<i64, Vec<SeccompRule>>, seccompiler::BackendError> {
        match self {
            ThreadKind::Vcpu => rules::vcpu(extras.snapshot),
            ThreadKind::EventLoop => rules::event_loop(),
            ThreadKind::Dhcp => rules::dhcp(),
            ThreadKind::Channel => rules::channel(),
        }
    }
}

#[derive(Debug, Error)]
pub enum SeccompError {
    #[error("cannot build the {kind:?} seccomp filter")]
    Build {
        kind: ThreadKind,
        #[source]
        source: seccompiler::BackendError,
    },
    #[error("cannot install the {kind:?} seccomp filter (--no-seccomp runs without)")]
    Install {
        kind: ThreadKind,
        #[source]
        source: seccompiler::Error,
    },
    #[error("cannot install the SIGSYS handler")]
    Handler(#[source] vmm_sys_util::errno::Error),
    #[error("cannot start thread {name}")]
    Spawn {
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the {0:?} filter is installed by net's thread-start hook, not by confine()")]
    NotHere(ThreadKind),
}

/// Compiles the filter of `kind`: allowed calls pass, anything else traps (SIGSYS).
fn compile(kind: ThreadKind, extras: Extras) -> Result<BpfProgram, SeccompError> {
    let build = |source| SeccompError::Build { kind, source };
    let filter = SeccompFilter::new(
        kind.rules(extras).map_err(build)?,
        if log_only() { SeccompAction::Log } else { SeccompAction::Trap },
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(build)?;
    BpfProgram::try_from(filter).map_err(build)
}

/// Installs the SIGSYS reporter (once per process; call before any filter).
fn install_handler() -> Result<(), SeccompError> {
    sigsys::install().map_err(SeccompError::Handler)
}

/// Installs `program` (compiled for `kind`) on the calling thread, for the rest of its life.
fn apply(kind: ThreadKind, program: &BpfProgram) -> Result<(), SeccompError> {
    sigsys::remember_thread_name();
    seccompiler::apply_filter(program).map_err(|source| SeccompError::Install { kind, source })?;
    sigsys::CONFINED.with(|c| c.set(true));
    tracing::debug!(?kind, thread = std::thread::current().name().unwrap_or("?"), "seccomp filter installed");
    Ok(())
}

/// Developer aid (debug builds only): `MICROVM_SECCOMP_LOG=1` lets denied calls through
/// and has the kernel log each (`dmesg | grep type=1326` shows `syscall=NR` and the
/// thread's `comm`), to collect everything a new code path needs in one run.
fn log_only() -> bool {
    cfg!(debug_assertions) && std::env::var_os("MICROVM_SECCOMP_LOG").is_some_and(|v| v == "1")
}

/// Whether the calling thread runs under a filter (then a panic report must not capture a
/// backtrace: symbolising it opens files, which no filter allows).
pub fn is_confined() -> bool {
    sigsys::CONFINED.with(|c| c.get())
}

/// Test-only path (debug builds; release builds ignore the variable), run right after a
/// thread installs its filter: `MICROVM_TEST_FAULT=vcpu:syscall` makes vCPU 0 call
/// getppid(2), which no list allows (the process must die with the seccomp report);
/// `vcpu:panic` makes it panic (the panic hook must still report and tear down). `main:`
/// does the same on the event loop thread, `channel:` on the command channel's stdout pump.
fn test_fault(kind: ThreadKind) {
    if !cfg!(debug_assertions) {
        return;
    }
    let name = std::thread::current().name().map(str::to_owned);
    let thread = match kind {
        ThreadKind::Vcpu if name.as_deref() == Some("vcpu-0") => "vcpu",
        ThreadKind::EventLoop => "main",
        ThreadKind::Channel if name.as_deref() == Some("microvm.stdout") => "channel",
        ThreadKind::Vcpu | ThreadKind::Dhcp | ThreadKind::Channel => return,
    };
    let Ok(fault) = std::env::var("MICROVM_TEST_FAULT") else {
        return;
    };
    match fault.strip_prefix(thread).and_then(|f| f.strip_prefix(':')) {
        // SAFETY: getppid has no arguments and no side effects.
        Some("syscall") => unsafe {
            libc::syscall(libc::SYS_getppid);
        },
        Some("panic") => panic!("test fault requested by MICROVM_TEST_FAULT={fault}"),
        _ => {}
    }
}

/// The compiled filters of the threads microvm starts, set once per process by [`enable`].
struct Filters {
    vcpu: BpfProgram,
    event_loop: BpfProgram,
    channel: BpfProgram,
}

static FILTERS: OnceLock<Filters> = OnceLock::new();

/// Turns the filters on for the rest of the process (unless `config` says `--no-seccomp`):
/// installs the SIGSYS reporter, compiles every list (with what `config`'s run needs beyond
/// a plain one, see [`Extras`]), and has net install the DHCP filter in its threads. Call
/// before starting any thread that runs guest-facing code; each then calls [`confine`] (or
/// is started by [`spawn_confined`]).
pub fn enable(config: &crate::config::VmConfig) -> Result<(), SeccompError> {
    if !config.seccomp {
        return Ok(());
    }
    let extras = Extras { snapshot: config.snapshot_to.is_some() };
    let started = std::time::Instant::now();
    install_handler()?;
    let dhcp = compile(ThreadKind::Dhcp, extras)?;
    net::set_thread_start_hook(Box::new(move |_kind| {
        apply(ThreadKind::Dhcp, &dhcp)?;
        Ok(())
    }));
    let filters = Filters {
        vcpu: compile(ThreadKind::Vcpu, extras)?,
        event_loop: compile(ThreadKind::EventLoop, extras)?,
        channel: compile(ThreadKind::Channel, extras)?,
    };
    // A second VM in the same process would compile the same lists: keep the first.
    let _ = FILTERS.set(filters);
    tracing::debug!(elapsed = ?started.elapsed(), ?extras, "seccomp filters compiled");
    Ok(())
}

/// Whether [`enable`] turned the filters on.
fn enabled() -> bool {
    FILTERS.get().is_some()
}

/// Installs the filter of `kind` on the calling thread if [`enable`] was called (else
/// nothing), then runs the test-only fault path of `kind` (see [`test_fault`]).
pub fn confine(kind: ThreadKind) -> Result<(), SeccompError> {
    if let Some(f) = FILTERS.get() {
        let program = match kind {
            ThreadKind::Vcpu => &f.vcpu,
            ThreadKind::EventLoop => &f.event_loop,
            ThreadKind::Channel => &f.channel,
            ThreadKind::Dhcp => return Err(SeccompError::NotHere(kind)),
        };
        apply(kind, program)?;
    } else if kind == ThreadKind::Dhcp {
        return Err(SeccompError::NotHere(kind));
    }
    test_fault(kind);
    Ok(())
}

/// Starts thread `name` running `f` under the filter of `kind` ([`confine`] at its start,
/// before `f`). Returns once the filter is installed, so a failure fails the caller's setup.
pub fn spawn_confined(
    kind: ThreadKind,
    name: String,
    f: impl FnOnce() + Send + 'static,
) -> Result<JoinHandle<()>, SeccompError> {
    let (confined_tx, confined_rx) = std::sync::mpsc::sync_channel(1);
    let handle = std::thread::Builder::new()
        .name(name.clone())
        .spawn(move || {
            let confined = confine(kind);
            let ok = confined.is_ok();
            let _ = confined_tx.send(confined);
            if ok {
                f();
            }
        })
        .map_err(|source| SeccompError::Spawn { name: name.clone(), source })?;
    match confined_rx.recv() {
        Ok(Ok(())) => Ok(handle),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(SeccompError::Spawn { name, source: std::io::Error::other("the thread ended at start") }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spawned_threads_run_under_their_filter() {
        enable(&crate::config::VmConfig::default()).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        spawn_confined(ThreadKind::Channel, "test-pump".into(), move || tx.send(is_confined()).unwrap())
            .unwrap()
            .join()
            .unwrap();
        assert!(rx.recv().unwrap(), "the thread ran confined");
        assert!(!is_confined(), "the caller is not");
        assert!(matches!(confine(ThreadKind::Dhcp), Err(SeccompError::NotHere(ThreadKind::Dhcp))));
    }
}
