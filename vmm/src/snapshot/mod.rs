//! Snapshot and restore: the state of a paused VM saved to a directory, and a fresh VM built
//! from it that continues where the first one stopped.
//!
//! Saving (every vCPU paused, device threads quiet):
//!
//! ```text
//! // each vCPU thread: Vcpu::new(..)?.with_pause(handle.clone()).spawn(..)
//! PauseHandle::pause_all(&handles, timeout)?;          // SIGRTMIN + immediate_exit, parked
//! let caps = Arc::new(KvmCaps::new(&kvm, &vm_fd)?);     // MSR list, XSAVE size
//! let vcpus = handles.iter().map(|h| h.save(&caps)).collect::<Result<Vec<_>, _>>()?;
//! let state = SnapshotState::new(capture_vm(&vm_fd)?, vcpus, config_json, devices_json);
//! snapshot::save(dir, &state, &guest_memory)?;          // DIR.tmp-<pid>, fsync, rename
//! for h in &handles { h.resume() }  // or h.exit(): the vCPU loop returns
//! ```
//!
//! Restoring:
//!
//! ```text
//! let snap = snapshot::load(dir)?;                      // magic, version, CRC, vendor, sizes
//! let vm_fd = kvm.create_vm()?;  // + TSS, irqchip, PIT2 exactly as for a boot
//! let mem = snap.map_memory()?;                         // MAP_PRIVATE of DIR/memory
//! snapshot::memory::register(&vm_fd, &mem)?;
//! let caps = KvmCaps::new(&kvm, &vm_fd)?;
//! for (i, v) in snap.state.vcpus.iter().enumerate() {
//!     let fd = vm_fd.create_vcpu(i as u64)?;
//!     restore_vcpu(&fd, v, &caps)?;                     // refuses another TSC kHz / XSAVE size
//!     // Vcpu::restored(i as u8, fd).with_pause(..).spawn(..) after restore_vm
//! }
//! restore_vm(&vm_fd, &snap.state.vm)?;                  // PIT, irqchips, clock last
//! ```
//!
//! `SnapshotState::config` and `::devices` are opaque JSON values for the VMM and the
//! devices crate to define. Errors are one `SnapshotError`; `is_usage()` tells the ones
//! about the snapshot or the host (exit code 2) from failures while saving (exit code 1).
//!
//! The guest TSC: restored from MSR 0x10 where KVM allows it. On PVM hosts writes to the TSC
//! succeed and change nothing (../shared/ENVIRONMENT.md), so a restored guest's TSC jumps
//! forward by the downtime; a different TSC frequency is refused instead of scaled.

pub mod format;
pub mod memory;
pub mod pause;
pub mod saved;
mod pod;
pub mod state;
#[cfg(test)]
mod tests;

use std::path::PathBuf;

use thiserror::Error;

pub use format::{load, save, save_with, Snapshot, SnapshotState, FORMAT_VERSION};
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
    #[error(transparent)]
    Saved(#[from] saved::SavedConfigError),
    #[error("cannot save the overlay of disk {index}")]
    Overlay {
        index: usize,
        #[source]
        source: devices::virtio::block::OverlayError,
    },
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
        ) || matches!(self, SnapshotError::Saved(e) if e.is_usage())
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
