//! What a VM snapshot keeps of each virtio device, and the errors of saving and restoring it.
//!
//! A device is saved as its transport's registers ([`TransportSnapshot`]: status, features,
//! each queue's configuration) plus, while it is active, the positions its data plane has
//! reached in each queue and the device's own state ([`DeviceSnapshot`]). Everything else
//! (descriptors, buffers, rings) is in guest memory, which the VMM saves.
//!
//! Restoring builds the device anew from the same configuration with fresh host resources
//! (files, TAPs, pipes), writes the saved registers into a fresh transport and, for an active
//! device, activates it with queues at the saved positions and hands it its own state:
//! [`crate::virtio::MmioTransport::restore`]. Saved values are checked like guest writes
//! (queue sizes and addresses through `virtio_queue`), since a snapshot file may be damaged.
//!
//! Only state that a restore can re-create is saved: a device whose state lives in another
//! process (virtio-fs: virtiofsd holds the guest's open files) answers
//! [`SnapshotError::Unsupported`].

use serde::{Deserialize, Serialize};

/// One virtqueue: the driver's configuration and, while the device is active, where the
/// device is in it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSnapshot {
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
    pub next_avail: u16,
    pub next_used: u16,
}

/// A queue position reached by an active device's data plane.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueuePosition {
    pub next_avail: u16,
    pub next_used: u16,
}

/// What an active device adds to its transport's registers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceSnapshot {
    /// One per queue, in queue index order.
    pub queues: Vec<QueuePosition>,
    pub state: DeviceState,
}

/// A device's own state beyond its queues.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeviceState {
    /// Nothing beyond the queues (rng).
    #[default]
    None,
    /// The token buckets of a device's rate limiters (blk: one; net: RX, TX), `None` where
    /// it has none.
    Limited(Vec<Option<crate::rate_limiter::LimiterState>>),
    /// The multiport console's ports.
    Console(super::console::ConsoleState),
}

/// A virtio-mmio transport and its device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransportSnapshot {
    pub device_type: u32,
    pub status: u32,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub driver_features: u64,
    pub queue_sel: u32,
    pub config_generation: u32,
    pub interrupt_status: u32,
    pub queues: Vec<QueueSnapshot>,
    /// Present while the device is active.
    pub device: Option<DeviceSnapshot>,
}

/// Errors saving or restoring a device.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The device keeps state a snapshot cannot hold.
    #[error("{0} devices cannot be saved in a snapshot")]
    Unsupported(&'static str),
    /// The saved device is not the one configured at this slot.
    #[error("the snapshot has a {saved} device here, the configuration a {configured}")]
    WrongDevice {
        /// Device name in the snapshot.
        saved: &'static str,
        /// Device name configured.
        configured: &'static str,
    },
    /// Queue count, port count and the like differ.
    #[error("the snapshot's {what} ({saved}) does not match the device ({configured})")]
    Mismatch {
        /// What differs.
        what: &'static str,
        /// Saved value.
        saved: usize,
        /// Configured value.
        configured: usize,
    },
    /// A saved queue is not a valid queue for this device.
    #[error("saved queue {index} is invalid")]
    Queue {
        /// Queue index.
        index: usize,
        /// Why virtio-queue refused it.
        #[source]
        source: virtio_queue::Error,
    },
    /// The saved state is inconsistent (e.g. active without DRIVER_OK).
    #[error("inconsistent device state: {0}")]
    Inconsistent(&'static str),
    /// Activating the restored device failed.
    #[error("cannot activate the restored device")]
    Activate(#[source] super::MmioError),
}
