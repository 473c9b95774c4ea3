//! The VM configuration a snapshot keeps, and the configuration of a restore made from it.
//!
//! A snapshot keeps the VM's shape as the user gave it: `--cpus`, `--memory`, and the
//! `--disk` and `--net` specs as strings, with the directory they were relative to. A restore
//! reads the specs again with the same parser, so the devices are re-created exactly as
//! booted (same order, hence same slots). It refuses a disk that changed since the snapshot
//! (length or modification time): the guest's page cache in the saved memory describes the
//! image as it was. It also keeps each NIC's address on its network, which the guest still
//! has configured: a restore asks the network for it again.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::{Snapshot, SnapshotError};
use crate::config::{ConfigError, Specs, VmConfig};

/// What a snapshot keeps of the configuration (`SnapshotState::config`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedConfig {
    /// The directory relative `--disk` paths were given from.
    pub cwd: PathBuf,
    pub cpus: u32,
    pub memory_mib: u64,
    pub quirks: bool,
    pub specs: Specs,
    /// Each disk image as it was when the snapshot was taken, in `--disk` order.
    pub disks: Vec<DiskIdentity>,
    /// Each NIC's address on its named network when the snapshot was taken (the guest still
    /// has it configured), in `--net` order; None where the NIC is on no named network.
    /// Snapshots written before it have none.
    #[serde(default)]
    pub nic_addresses: Vec<Option<std::net::Ipv4Addr>>,
}

/// What identifies a disk image's contents cheaply: its length and modification time.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskIdentity {
    pub path: PathBuf,
    pub len: u64,
    pub mtime_ns: i128,
}

#[derive(Debug, Error)]
pub enum SavedConfigError {
    #[error("cannot read disk '{}' to record it in the snapshot", path.display())]
    Stat {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("disk '{}' changed since the snapshot was taken ({what}): restoring would show the guest another disk than the one it booted with", path.display())]
    DiskChanged { path: PathBuf, what: &'static str },
    #[error("the snapshot's disk '{}' is gone", path.display())]
    DiskGone {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl SavedConfigError {
    /// A changed or missing disk is the user's to fix (exit 2).
    pub fn is_usage(&self) -> bool {
        !matches!(self, SavedConfigError::Stat { .. })
    }
}

fn identity(path: &Path) -> std::io::Result<DiskIdentity> {
    let meta = std::fs::metadata(path)?;
    Ok(DiskIdentity {
        path: path.to_path_buf(),
        len: meta.len(),
        mtime_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
    })
}

/// The configuration to save with a snapshot of `config` (its disks as they are now: call
/// it with the VM paused).
pub fn describe(config: &VmConfig, nic_addresses: &[Option<std::net::Ipv4Addr>]) -> Result<serde_json::Value, SnapshotError> {
    let cwd = std::env::current_dir().map_err(|source| SnapshotError::Io {
        what: "cannot read the current directory for",
        path: PathBuf::from("."),
        source,
    })?;
    let mut disks = Vec::with_capacity(config.disks.len());
    for d in &config.disks {
        let path = cwd.join(&d.path);
        disks.push(identity(&path).map_err(|source| SnapshotError::Saved(SavedConfigError::Stat { path, source }))?);
    }
    let saved = SavedConfig {
        cwd,
        cpus: config.cpus,
        memory_mib: config.memory_mib,
        quirks: config.quirks,
        specs: config.specs.clone(),
        disks,
        nic_addresses: nic_addresses.to_vec(),
    };
    serde_json::to_value(&saved).map_err(SnapshotError::Encode)
}

/// The configuration of a restore of `snap`: the snapshot's VM shape, with `runtime`'s
/// command, console, timeout and verbosity.
pub fn config(snap: &Snapshot, runtime: VmConfig) -> Result<VmConfig, crate::vm::VmError> {
    let saved: SavedConfig = serde_json::from_value(snap.state.config.clone()).map_err(|e| SnapshotError::Corrupt {
        path: snap.dir.join(super::format::STATE_FILE),
        reason: format!("configuration: {e}"),
    })?;
    let parsed = |(index, s): (usize, &String)| -> Result<crate::config::DiskConfig, ConfigError> {
        let mut d: crate::config::DiskConfig = s.parse()?;
        d.path = saved.cwd.join(&d.path);
        // Restores never write the image (`,snapshot` by default): every restore starts
        // from the same disk, and many can use it at once. A disk that was `,snapshot`
        // when saved has its overlay in DIR.
        if !d.read_only {
            d.snapshot = true;
        }
        let layer = snap.dir.join(crate::machine::layer_name(index));
        if crate::devices::layer_files(&layer).1.exists() {
            d.layer = Some(layer);
        }
        Ok(d)
    };
    let disks = saved.specs.disks.iter().enumerate().map(parsed).collect::<Result<Vec<_>, _>>()?;
    let nets = saved
        .specs
        .nets
        .iter()
        .map(|n| n.parse::<net::NetSpec>())
        .filter(|n| !matches!(n, Ok(s) if s.is_none()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(ConfigError::from)?;
    if disks.len() != saved.disks.len() {
        return Err(SnapshotError::Corrupt {
            path: snap.dir.join(super::format::STATE_FILE),
            reason: "disk list".into(),
        }
        .into());
    }
    for was in &saved.disks {
        let now = identity(&was.path)
            .map_err(|source| SnapshotError::Saved(SavedConfigError::DiskGone { path: was.path.clone(), source }))?;
        let what = if now.len != was.len {
            Some("its length")
        } else if now.mtime_ns != was.mtime_ns {
            Some("it was written to")
        } else {
            None
        };
        if let Some(what) = what {
            return Err(SnapshotError::Saved(SavedConfigError::DiskChanged { path: was.path.clone(), what }).into());
        }
    }
    let config = VmConfig {
        cpus: saved.cpus,
        memory_mib: saved.memory_mib,
        quirks: saved.quirks,
        disks,
        nets,
        specs: saved.specs,
        nic_addresses: saved.nic_addresses,
        from_snapshot: true,
        ..runtime
    };
    config.validate()?;
    if config.cpus as usize != snap.state.vcpus.len() {
        return Err(SnapshotError::Corrupt {
            path: snap.dir.join(super::format::STATE_FILE),
            reason: "vCPU count".into(),
        }
        .into());
    }
    Ok(config)
}
