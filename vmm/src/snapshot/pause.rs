//! Pausing vCPUs: a vCPU is only saved outside KVM_RUN, and only its own thread uses its fd.
//!
//! One `PauseHandle` per vCPU thread, shared (Arc) by the thread and the VMM:
//!
//! ```text
//! VMM                                   vCPU thread (owns the VcpuFd)
//!                                       let _a = handle.attach(&mut fd);
//! handle.request_pause()  ──────────►   loop {
//!   want = Pause, kvm_run.immediate_exit = 1,   match fd.run() {
//!   SIGRTMIN to the thread                         exits => handle them,
//! handle.wait_paused(timeout)                      Err(EINTR) => match handle.on_interrupted(&mut fd) {
//!                                   ◄──────────        Resume::Continue => continue,
//!   parked                                             Resume::Exit => break } } }
//! handle.save(caps) ── job ─────────►   capture_vcpu(&fd) on the vCPU thread
//! handle.resume() / handle.exit()
//! ```
//!
//! Why both the flag and the signal: `immediate_exit` makes the *next* KVM_RUN return EINTR
//! at once (no race with a thread about to enter), the signal (the debug.rs kick, whose
//! handler does nothing) gets a thread out of a KVM_RUN it is already in. That EINTR-returning
//! KVM_RUN also completes a pending port/MMIO read, so the registers saved are consistent.

use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use kvm_ioctls::VcpuFd;

use super::state::{capture_vcpu, KvmCaps, VcpuState};
use super::SnapshotError;

type Job = Box<dyn FnOnce(&mut VcpuFd) + Send>;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Want {
    Run,
    Pause,
    Exit,
}

/// What the vCPU loop does after `on_interrupted`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resume {
    /// Call KVM_RUN again.
    Continue,
    /// Leave the run loop (the VMM called `exit`).
    Exit,
}

/// `kvm_run.immediate_exit` of the attached vCPU.
struct ExitFlag(*mut u8);
// SAFETY: the pointer is into the vCPU's kvm_run mapping, which lives as long as its VcpuFd;
// it is only used under the handle's mutex while the vCPU thread is attached (the Attached
// guard clears it before the thread can drop the fd).
unsafe impl Send for ExitFlag {}

impl ExitFlag {
    fn set(&self, value: u8) {
        // SAFETY: see `unsafe impl Send`: the mapping is live while the pointer is stored. It is
        // a byte of a MAP_SHARED page the kernel reads at KVM_RUN entry; KVM documents it as the
        // flag other contexts (signal handlers, other threads) set to stop the vCPU.
        unsafe { self.0.write_volatile(value) }
    }
}

struct Inner {
    flag: Option<ExitFlag>,
    thread: Option<libc::pthread_t>,
    want: Want,
    parked: bool,
    /// The vCPU thread attached once and has since detached (its loop ended).
    gone: bool,
    job: Option<Job>,
}

pub struct PauseHandle {
    index: usize,
    inner: Mutex<Inner>,
    cond: Condvar,
}

/// While alive, the VMM can kick the vCPU; dropped (before the VcpuFd) when the loop ends.
pub struct Attached<'a>(&'a PauseHandle);

impl Drop for Attached<'_> {
    fn drop(&mut self) {
        let mut inner = self.0.lock();
        inner.flag = None;
        inner.thread = None;
        inner.parked = false;
        inner.gone = true;
        inner.job = None;
        self.0.cond.notify_all();
    }
}

impl PauseHandle {
    pub fn new(index: usize) -> Arc<Self> {
        Arc::new(PauseHandle {
            index,
            inner: Mutex::new(Inner {
                flag: None,
                thread: None,
                want: Want::Run,
                parked: false,
                gone: false,
                job: None,
            }),
            cond: Condvar::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    // ---- vCPU thread side ----

    /// Called by the vCPU thread before its run loop. The guard must be dropped before `fd`.
    pub fn attach(&self, fd: &mut VcpuFd) -> Attached<'_> {
        crate::debug::install_kick_handler();
        let flag = ExitFlag(std::ptr::addr_of_mut!(fd.get_kvm_run().immediate_exit));
        let mut inner = self.lock();
        if inner.want != Want::Run {
            flag.set(1);
        }
        inner.flag = Some(flag);
        // SAFETY: pthread_self has no preconditions.
        inner.thread = Some(unsafe { libc::pthread_self() });
        inner.gone = false;
        Attached(self)
    }

    /// Called by the vCPU thread when KVM_RUN returned EINTR. Parks while a pause is
    /// requested, running the VMM's jobs (e.g. `save`) on this thread with `fd`.
    pub fn on_interrupted(&self, fd: &mut VcpuFd) -> Resume {
        let mut inner = self.lock();
        loop {
            match inner.want {
                Want::Run => {
                    fd.set_kvm_immediate_exit(0);
                    inner.parked = false;
                    return Resume::Continue;
                }
                Want::Exit => {
                    inner.parked = false;
                    return Resume::Exit;
                }
                Want::Pause => {
                    if !inner.parked {
                        inner.parked = true;
                        self.cond.notify_all();
                    }
                    if let Some(job) = inner.job.take() {
                        drop(inner);
                        job(fd);
                        inner = self.lock();
                        continue;
                    }
                    inner = self.cond.wait(inner).unwrap_or_else(|p| p.into_inner());
                }
            }
        }
    }

    // ---- VMM side ----

    /// Asks the vCPU to stop at its next chance; returns at once (see `wait_paused`).
    pub fn request_pause(&self) {
        self.kick(Want::Pause);
    }

    fn kick(&self, want: Want) {
        let mut inner = self.lock();
        inner.want = want;
        if let Some(flag) = &inner.flag {
            flag.set(1);
        }
        if let Some(thread) = inner.thread {
            // SAFETY: `thread` is the attached vCPU thread, alive while attached (the guard
            // clears it under this lock before the thread ends); SIGRTMIN's handler is installed.
            unsafe { libc::pthread_kill(thread, vmm_sys_util::signal::SIGRTMIN()) };
        }
        self.cond.notify_all();
    }

    /// Waits until the vCPU parked (after `request_pause`), at most `timeout`.
    pub fn wait_paused(&self, timeout: Duration) -> Result<(), SnapshotError> {
        self.wait_until(Instant::now() + timeout, timeout)
    }

    fn wait_until(&self, deadline: Instant, timeout: Duration) -> Result<(), SnapshotError> {
        let mut inner = self.lock();
        while !inner.parked {
            if inner.gone {
                return Err(SnapshotError::VcpuGone { index: self.index });
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(SnapshotError::PauseTimeout {
                    index: self.index,
                    ms: timeout.as_millis(),
                });
            }
            inner = self
                .cond
                .wait_timeout(inner, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        Ok(())
    }

    /// Pauses every vCPU (kicks them all, then waits), or fails after `timeout`.
    pub fn pause_all(handles: &[Arc<PauseHandle>], timeout: Duration) -> Result<(), SnapshotError> {
        let deadline = Instant::now() + timeout;
        for h in handles {
            h.request_pause();
        }
        for h in handles {
            h.wait_until(deadline, timeout)?;
        }
        Ok(())
    }

    pub fn is_paused(&self) -> bool {
        self.lock().parked
    }

    /// Runs `f` with the vCPU fd on the (parked) vCPU thread and returns its result.
    pub fn run_on_vcpu<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut VcpuFd) -> R + Send + 'static,
    ) -> Result<R, SnapshotError> {
        let (tx, rx) = mpsc::sync_channel(1);
        {
            let mut inner = self.lock();
            if !inner.parked {
                return Err(SnapshotError::NotPaused { index: self.index });
            }
            inner.job = Some(Box::new(move |fd| {
                let _ = tx.send(f(fd));
            }));
            self.cond.notify_all();
        }
        // The sender is dropped unrun if the thread detaches first.
        rx.recv()
            .map_err(|_| SnapshotError::VcpuGone { index: self.index })
    }

    /// Captures the paused vCPU's state on its own thread.
    pub fn save(&self, caps: &Arc<KvmCaps>) -> Result<VcpuState, SnapshotError> {
        let caps = caps.clone();
        self.run_on_vcpu(move |fd| capture_vcpu(fd, &caps))?
    }

    /// Lets a paused vCPU run on.
    pub fn resume(&self) {
        let mut inner = self.lock();
        inner.want = Want::Run;
        self.cond.notify_all();
    }

    /// Makes the vCPU leave its run loop (`Resume::Exit`), whether paused or running.
    pub fn exit(&self) {
        self.kick(Want::Exit);
    }
}
