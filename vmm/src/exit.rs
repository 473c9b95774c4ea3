//! Why the VM stopped. Whoever sees it first (a vCPU thread, a device, a signal) records
//! it; the main thread wakes up on the eventfd and exits the process with its code.

use std::sync::Mutex;

use vmm_sys_util::eventfd::EventFd;

/// Exit codes of the `microvm` process (also in the README and `--help`).
pub mod code {
    /// The guest powered off, rebooted / reset, or the guest command exited 0.
    pub const OK: i32 = 0;
    /// microvm or the VM failed at run time (vCPU fault, KVM error, I/O error).
    pub const VM_FAILURE: i32 = 1;
    /// Bad usage or configuration: nothing was started.
    pub const USAGE: i32 = 2;
    /// The guest kernel panicked (seen on the console) and reset.
    pub const GUEST_PANIC: i32 = 101;
    /// `--timeout` expired (the status `timeout(1)` uses).
    pub const TIMEOUT: i32 = 124;
    /// A microvm thread made a system call its seccomp filter forbids (128 + SIGSYS).
    pub const SECCOMP_VIOLATION: i32 = 128 + libc::SIGSYS;
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest wrote its status to the exit device.
    GuestStatus(u8),
    /// The guest reset itself (i8042, triple fault or a KVM system event).
    Reset(&'static str),
    /// The guest powered off (ACPI S5).
    PowerOff,
    /// `--timeout` expired.
    Timeout(std::time::Duration),
    /// A vCPU failed; the message says where.
    Fault(String),
    /// microvm got a termination signal.
    Signal(i32),
    /// `--snapshot-to`: the VM was saved (or saving it failed) and is not resumed.
    Saved,
}

pub struct ExitSignal {
    reason: Mutex<Option<ExitReason>>,
    evt: EventFd,
}

impl ExitSignal {
    pub fn new() -> std::io::Result<Self> {
        Ok(ExitSignal {
            reason: Mutex::new(None),
            evt: EventFd::new(libc::EFD_NONBLOCK)?,
        })
    }

    /// Records `reason` unless one is recorded already (the first one wins).
    pub fn set(&self, reason: ExitReason) {
        let mut r = crate::bus::lock(&self.reason);
        if r.is_none() {
            tracing::debug!(?reason, "VM exit requested");
            *r = Some(reason);
            if let Err(e) = self.evt.write(1) {
                tracing::error!("cannot wake the main loop: {e}");
            }
        }
    }

    pub fn get(&self) -> Option<ExitReason> {
        crate::bus::lock(&self.reason).clone()
    }

    pub fn is_set(&self) -> bool {
        crate::bus::lock(&self.reason).is_some()
    }

    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }
}
