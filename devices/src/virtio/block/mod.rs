//! virtio-blk: a disk image file exposed as a virtio block device (virtio 1.x, 5.2).
//!
//! * [`device`]: [`Block`] implements [`super::VirtioDevice`] (features, config space,
//!   activation/reset); it is given an already-opened file by the VMM.
//! * [`request`]: parsing and execution of one request chain against the disk image.
//! * [`handler`]: the data plane, [`BlockHandler`]: drains the request queue, applies the rate
//!   limiter, signals the guest. Testable without KVM.
//! * [`event_handler`]: `event_manager::MutEventSubscriber` glue for [`BlockHandler`].
//! * [`overlay`]: the copy-on-write [`Overlay`] behind `--disk PATH,snapshot`.
//!
//! # Snapshot disks and VM snapshots
//!
//! A `,snapshot` disk is a [`Block`] built with [`Block::with_overlay`] over an
//! [`Overlay`]: the image opened read-only (the VMM holds a shared lock on it) and a private
//! anonymous upper file that takes the guest's writes and vanishes with the process. For a
//! VM snapshot, the VMM (with the VM paused):
//!
//! * `block.overlay()` -> `Some(overlay)`: `overlay.save(&data, &map)` writes what the guest
//!   wrote so far (a sparse data file and a small CRC-checked map, fsynced);
//! * on restore, `Overlay::restore(base, &data, &map, &upper_dir)` stacks that pair over the
//!   image read-only, with a fresh private upper, and `Block::with_overlay` makes the device;
//!   it refuses a damaged map or data file, another map version, and an image whose length
//!   or modification time changed since the save;
//! * a plain (not `,snapshot`) disk of a snapshotted VM restores as `Overlay::new(base, len,
//!   &upper_dir)`: its image is as the snapshot left it, and a restore must not change it.

pub mod device;
pub mod event_handler;
pub mod handler;
pub mod near;
pub mod overlay;
pub mod request;

#[cfg(test)]
mod tests;

use std::io;

pub use device::{Block, BlockConfig};
pub use handler::{BlockHandler, ProcessStats};
pub use overlay::{Overlay, OverlayError};
pub use request::{Disk, RequestError};

use crate::rate_limiter::RateLimiterError;

/// Sector size used by the virtio-blk protocol, whatever the logical block size.
pub const SECTOR_SIZE: u64 = 512;
/// log2 of [`SECTOR_SIZE`].
pub const SECTOR_SHIFT: u32 = 9;
/// Size of the (single) request queue.
pub const QUEUE_SIZE: u16 = 256;
/// Queue sizes of the device: one request queue.
pub const QUEUE_SIZES: &[u16] = &[QUEUE_SIZE];
/// Maximum number of data segments in a request: a chain is at most `QUEUE_SIZE` descriptors
/// (we do not offer indirect descriptors), two of which are the header and the status.
pub const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
/// Length of the GET_ID answer.
pub const VIRTIO_BLK_ID_BYTES: usize = virtio_bindings::virtio_blk::VIRTIO_BLK_ID_BYTES as usize;
/// Size of the request header (type, reserved, sector).
pub const REQUEST_HEADER_SIZE: u32 = 16;

/// Feature bits offered by the block device.
pub use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX,
};
/// Request types (virtio 1.x 5.2.6).
pub use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};

/// Request status: success.
pub const VIRTIO_BLK_S_OK: u8 = virtio_bindings::virtio_blk::VIRTIO_BLK_S_OK as u8;
/// Request status: I/O error (also: read-only device, out-of-range sector, malformed request).
pub const VIRTIO_BLK_S_IOERR: u8 = virtio_bindings::virtio_blk::VIRTIO_BLK_S_IOERR as u8;
/// Request status: request type not supported.
pub const VIRTIO_BLK_S_UNSUPP: u8 = virtio_bindings::virtio_blk::VIRTIO_BLK_S_UNSUPP as u8;

/// Errors creating a block device.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The configured logical block size is not a power of two in 512..=4096.
    #[error("invalid block size {0}: must be a power of two between 512 and 4096")]
    InvalidBlockSize(u32),
    /// Reading the disk file's metadata failed.
    #[error("reading the disk image metadata failed")]
    Metadata(#[source] io::Error),
    /// The rate limiter could not be created.
    #[error("creating the rate limiter failed")]
    RateLimiter(#[from] RateLimiterError),
    /// The copy-on-write overlay of a `,snapshot` disk could not be created.
    #[error("creating the snapshot overlay failed")]
    Overlay(#[from] OverlayError),
}
