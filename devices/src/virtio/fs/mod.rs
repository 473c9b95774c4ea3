//! virtio-fs (device id 26): a host directory the guest mounts with `mount -t virtiofs TAG`.
//!
//! Unlike virtio-blk and virtio-net, this device has no data plane in the VMM. Its queues are
//! served by a separate process, `virtiofsd`, over the vhost-user protocol (rust-vmm `vhost`
//! crate, frontend side):
//!
//! * [`Fs::new`] takes a connected vhost-user socket and does the first part of the handshake
//!   (SET_OWNER, GET_FEATURES, protocol features), so the features offered to the guest are the
//!   ones the backend has.
//! * On `DRIVER_OK` ([`crate::virtio::VirtioDevice::activate`]) the device sends the guest memory table (the
//!   backend maps guest RAM itself: the VMM must back it with shareable memory, e.g. a memfd
//!   mapped `MAP_SHARED`), then for each queue its size, ring addresses, base index, the call
//!   eventfd (the transport's interrupt eventfd, a KVM irqfd) and the kick eventfd (the queue's
//!   KVM ioeventfd). Guest notifications and interrupts then go straight between KVM and the
//!   backend: the VMM is not on the I/O path at all.
//! * On reset it stops the rings (GET_VRING_BASE) and resets the backend's device state.
//!
//! The VMM owns the backend process and must notice its death (the guest's requests would wait
//! for ever otherwise); see vmm's `share.rs`.
//!
//! Config space (virtio 1.2, 5.11.4): `tag` (36 bytes, UTF-8, NUL padded) and
//! `num_request_queues` (le32). One request queue: virtiofsd serves one.

mod device;
mod vhost;

pub use device::Fs;

/// Longest tag the config space holds.
pub const TAG_MAX_LEN: usize = 36;
/// Queue 0 is the high-priority queue (FUSE_INTERRUPT, FORGET), queue 1 the request queue.
pub const NUM_QUEUES: usize = 2;
/// Size of each queue (virtiofsd accepts up to 32768).
pub const QUEUE_SIZE: u16 = 1024;

/// Errors of the virtio-fs device and its vhost-user backend.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    /// The tag is empty or longer than the config space holds.
    #[error("virtio-fs tag '{0}' must be 1 to {TAG_MAX_LEN} bytes")]
    Tag(String),
    /// Configuring the socket to the backend failed.
    #[error("cannot configure the vhost-user socket")]
    Socket(#[source] std::io::Error),
    /// A vhost-user request failed (the backend refused it, or the connection broke).
    #[error("vhost-user {what} failed")]
    Vhost {
        /// The request, e.g. "SET_MEM_TABLE".
        what: &'static str,
        /// The vhost crate's error.
        #[source]
        source: ::vhost::Error,
    },
    /// The backend lacks a feature the device cannot do without.
    #[error("the vhost-user backend does not offer {0}")]
    MissingFeature(&'static str),
    /// The backend has fewer queues than virtio-fs needs.
    #[error("the vhost-user backend has {got} queues, virtio-fs needs {NUM_QUEUES}")]
    Queues {
        /// Queues the backend reported.
        got: u64,
    },
    /// A guest memory region is not backed by a file the backend could map.
    #[error("guest memory is not shareable (no file behind region at {0:#x}): the VMM must back it with a memfd")]
    MemoryNotShared(u64),
    /// A ring does not lie within one guest memory region.
    #[error("queue {queue}: ring at {addr:#x} is not inside guest memory")]
    Ring {
        /// Queue index.
        queue: usize,
        /// Guest physical address of the ring part.
        addr: u64,
    },
    /// An earlier vhost-user failure left the connection in an unknown state.
    #[error("the vhost-user connection failed earlier and is no longer usable")]
    Broken,
}

#[cfg(test)]
mod tests;
