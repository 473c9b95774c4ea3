//! Snapshot and restore: the state of a paused VM saved to a directory, and a fresh VM built
//! from it that continues where the first one stopped.
//!
//! What the pieces do, and the order a VMM calls them in:
//!
//! Saving (every vCPU paused, device threads quiet):
//! 1. [`pause::PauseHandle::pause_all`] kicks every vCPU out of KVM_RUN (SIGRTMIN +
//!    `immediate_exit`, which also completes a pending port/MMIO read); each vCPU thread parks.
//! 2. [`pause::PauseHandle::save`] runs [`state::capture_vcpu`] on each parked vCPU's own
//!    thread; [`state::capture_vm`] reads PIT, clock and irqchips from the VM fd.
//! 3. [`format::save`] writes DIR atomically: guest RAM as a sparse `memory` file and the
//!    versioned, checksummed `state` file, into `DIR.tmp-<pid>`, fsync'd, then renamed.
//! 4. [`pause::PauseHandle::resume`] lets the vCPUs run on, or the VMM exits.
//!
//! Restoring:
//! 1. [`format::load`] reads and checks `state` (magic, format version, checksum, CPU vendor,
//!    sizes) and opens `memory`; nothing in DIR is trusted before that.
//! 2. A new VM (TSS, irqchip, PIT as for a boot), then [`memory::map`] maps `memory`
//!    MAP_PRIVATE (lazy, copy-on-write: many restores share the page cache) and
//!    [`memory::register`] gives it to KVM.
//! 3. For each vCPU: create it, [`state::restore_vcpu`] (checks TSC frequency and XSAVE size
//!    first). Then [`state::restore_vm`] (PIT, irqchips, clock last). Then run.
//!
//! The guest TSC: restored from MSR 0x10 where KVM allows it. On PVM hosts writes to the TSC
//! succeed and change nothing (../shared/ENVIRONMENT.md), so a restored guest's TSC jumps
//! forward by the downtime; a different TSC frequency is refused instead of scaled.

pub mod format;
pub mod memory;
pub mod pause;
mod pod;
pub mod state;
#[cfg(test)]
mod tests;

use std::path::PathBuf;

use thiserror::Error;

pub use format::{load, save, Snapshot, SnapshotState, FORMAT_VERSION};
pub use pause::PauseHandle;
pub use state::{capture_vcpu, capture_vm, restore_vcpu, restore_vm, KvmCaps, VcpuState, VmState};

#[derive(Debug, Error)]
pub enum SnapshotError {
    #[error("{what} {}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read snapshot file {}", path.display())]
    Unreadable {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} failed")]
    Kvm {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("no snapshot at {}: {reason}", dir.display())]
    Missing { dir: PathBuf, reason: String },
    #[error("{} is not a microvm snapshot (bad magic)", path.display())]
    BadMagic { path: PathBuf },
    #[error("snapshot {} has format version {found}, this microvm reads version {expected}", path.display())]
    Version {
        path: PathBuf,
        found: u32,
        expected: u32,
    },
    #[error("snapshot {} is damaged: {reason}", path.display())]
    Corrupt { path: PathBuf, reason: String },
    #[error("snapshot was taken on a {snapshot} CPU, this host has a {host} CPU")]
    Vendor { snapshot: String, host: String },
    #[error("snapshot was taken with a {snapshot} kHz TSC, this host's is {host} kHz (KVM cannot scale it here)")]
    TscKhz { snapshot: u32, host: u32 },
    #[error("snapshot's XSAVE area is {snapshot} bytes, this host's KVM uses {host}")]
    XsaveSize { snapshot: usize, host: usize },
    #[error("KVM refused MSR {index:#x} of the snapshot")]
    MsrRejected { index: u32 },
    #[error("{} exists and is not a microvm snapshot: not replacing it", dir.display())]
    NotASnapshotDir { dir: PathBuf },
    #[error("cannot encode the snapshot state")]
    Encode(#[source] serde_json::Error),
    #[error("cannot map guest memory from {}", path.display())]
    Mmap {
        path: PathBuf,
        #[source]
        source: vm_memory::mmap::MmapRegionError,
    },
    #[error("bad guest memory layout in the snapshot")]
    Layout(#[source] vm_memory::GuestRegionCollectionError),
    #[error("too many {what} for one KVM call")]
    TooMany { what: &'static str },
    #[error("vCPU {index} did not pause within {ms} ms")]
    PauseTimeout { index: usize, ms: u128 },
    #[error("vCPU {index} is not paused")]
    NotPaused { index: usize },
    #[error("vCPU {index}'s thread is gone")]
    VcpuGone { index: usize },
}

impl SnapshotError {
    /// Errors about the snapshot the user named or the host it is restored on (exit code 2),
    /// as opposed to failures while saving or running (exit code 1).
    pub fn is_usage(&self) -> bool {
        matches!(
            self,
            SnapshotError::Missing { .. }
                | SnapshotError::Unreadable { .. }
                | SnapshotError::BadMagic { .. }
                | SnapshotError::Version { .. }
                | SnapshotError::Corrupt { .. }
                | SnapshotError::Vendor { .. }
                | SnapshotError::TscKhz { .. }
                | SnapshotError::XsaveSize { .. }
                | SnapshotError::MsrRejected { .. }
                | SnapshotError::NotASnapshotDir { .. }
        )
    }
}

pub(crate) fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> SnapshotError {
    move |source| SnapshotError::Kvm { what, source }
}

/// The CPU vendor string of CPUID leaf 0 ("GenuineIntel", "AuthenticAMD", ...).
pub fn host_cpu_vendor() -> String {
    let r = std::arch::x86_64::__cpuid(0);
    let mut v = Vec::with_capacity(12);
    for reg in [r.ebx, r.edx, r.ecx] {
        v.extend_from_slice(&reg.to_le_bytes());
    }
    String::from_utf8_lossy(&v).into_owned()
}
