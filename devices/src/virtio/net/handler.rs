//! virtio-net data plane.
//!
//! [`NetHandler`] owns everything the data plane touches: both queues and their eventfds, the
//! interrupt, the backend, and one rate limiter per direction. It has no dependency on KVM or
//! on the event loop, so unit tests drive it directly; `event_handler.rs` plugs it into the
//! event manager.
//!
//! * TX ([`NetHandler::process_tx`], `tx.rs`): each chain of device-readable descriptors is
//!   one frame (vnet header first); it is handed to the backend as iovecs pointing straight
//!   into guest memory.
//! * RX ([`NetHandler::process_rx`], `rx.rs`): frames are read from the backend straight into
//!   the guest's buffers (one chain, or several with `MRG_RXBUF`); only a frame bigger than
//!   the buffers the guest has posted goes through an intermediate buffer (see `rx.rs`).
//!   While the guest has no buffer posted, frames stay in the backend (a frame read and too
//!   big for what is posted is kept, "pending"), and the backend fd is not watched
//!   ([`NetHandler::wants_backend`]) until the guest adds buffers (RX queue kick).
//!
//! Guest mistakes never panic: the offending chain is returned with a used length of 0 and the
//! frame is dropped (counted in [`NetStats`]).
//!
//! Each direction does a bounded amount of work per event (`RX_BUDGET`, `TX_BUDGET`) so that a
//! flooding device does not starve the other devices of the event loop.

mod rx;
#[cfg(test)]
pub(crate) mod tests;
mod tx;

use std::io;
use std::os::unix::io::RawFd;
use std::sync::Arc;

use virtio_queue::desc::split::Descriptor;
use virtio_queue::Queue;
use vm_memory::{GuestMemoryError, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::{NetBackend, VIRTIO_NET_F_MRG_RXBUF};
use crate::guest_log::GuestLog;
use crate::rate_limiter::RateLimiter;
use crate::virtio::queue::DeviceQueue;
use crate::virtio::IrqTrigger;

use rx::{HeldChains, PendingFrame, RxExpect};

/// Frames read from the backend per RX event, at most.
pub const RX_BUDGET: usize = 64;
/// Chains processed per TX event, at most; the handler kicks its own TX eventfd to continue.
pub const TX_BUDGET: usize = 64;

/// Why a descriptor chain (or the frame in it) was dropped.
#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    /// Empty chain, bad `next` index, loop, or total length overflowing u32.
    #[error("descriptor chain is empty or broken")]
    Broken,
    /// An RX chain has a device-readable descriptor.
    #[error("RX chain has a device-readable descriptor")]
    ReadableRx,
    /// A TX chain has a device-writable descriptor.
    #[error("TX chain has a device-writable descriptor")]
    WritableTx,
    /// A buffer is not entirely inside guest memory.
    #[error("buffer at {addr:#x} of {len} bytes is outside guest memory")]
    OutsideMemory {
        /// Guest address of the buffer.
        addr: u64,
        /// Its length.
        len: u32,
    },
    /// Not even room for the vnet header (RX), or nothing after the header (TX).
    #[error("chain of {0} bytes is too short")]
    TooShort(usize),
    /// A TX frame larger than [`super::MAX_FRAME_LEN`].
    #[error("frame of {0}+ bytes is too long")]
    TooLong(usize),
    /// Guest memory could not be accessed.
    #[error("guest memory access failed")]
    GuestMemory(#[from] GuestMemoryError),
    /// The device has no backend (cannot happen while activated).
    #[error("no backend")]
    NoBackend,
    /// The backend refused the frame.
    #[error("backend write failed")]
    Backend(#[source] io::Error),
}

/// Counters of one device's data plane.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetStats {
    /// Frames delivered to the guest.
    pub rx_frames: u64,
    /// Bytes delivered to the guest (without vnet headers).
    pub rx_bytes: u64,
    /// Frames read from the backend but dropped (too short, oversized, unacceptable header,
    /// no buffer big enough).
    pub rx_dropped: u64,
    /// Frames delivered by copying from `rx_buf` (bigger than the buffers posted when they
    /// were read, or zero-copy RX off) rather than read straight into the guest's buffers.
    pub rx_copied: u64,
    /// RX chains returned unused because they were malformed.
    pub rx_bad_chains: u64,
    /// Times RX stopped on the rate limiter.
    pub rx_throttled: u64,
    /// Frames sent to the backend.
    pub tx_frames: u64,
    /// Bytes sent to the backend (without vnet headers).
    pub tx_bytes: u64,
    /// TX chains dropped (malformed, or refused by the backend).
    pub tx_dropped: u64,
    /// Times TX stopped on the rate limiter.
    pub tx_throttled: u64,
}

/// What one call to [`NetHandler::process_rx`] or [`NetHandler::process_tx`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProcessStats {
    /// Chains put in the used ring (including dropped ones).
    pub completed: usize,
    /// Processing stopped on the rate limiter.
    pub throttled: bool,
}

/// The data plane of one network device.
pub struct NetHandler {
    pub(crate) mem: GuestMemoryMmap,
    pub(crate) rx: DeviceQueue,
    pub(crate) tx: DeviceQueue,
    pub(crate) irq: Arc<IrqTrigger>,
    /// Guest-triggered warnings of this device.
    pub(crate) log: Arc<GuestLog>,
    /// `None` only after [`NetHandler::take_backend`].
    backend: Option<Box<dyn NetBackend>>,
    backend_fd: RawFd,
    /// The backend hung up: never watch it again.
    backend_failed: bool,
    /// Whether the backend fd is currently registered with the event manager.
    pub(crate) backend_watched: bool,
    pub(crate) rx_limiter: Option<RateLimiter>,
    pub(crate) tx_limiter: Option<RateLimiter>,
    acked_features: u64,
    mrg_rxbuf: bool,
    /// RX header and copy-path buffer, [`super::MAX_FRAME_LEN`] bytes.
    rx_buf: Vec<u8>,
    /// Read RX frames into guest buffers (false: always through `rx_buf`, for benchmarks).
    rx_zero_copy: bool,
    /// A frame read but not delivered yet: waiting for guest buffers or limiter tokens.
    rx_pending: Option<PendingFrame>,
    /// RX kicks were turned off by this handler and not turned on since.
    rx_kicks_off: bool,
    /// The last RX pass found the guest's RX queue drained (no buffer held or posted) and
    /// left the backend's frames where they are until the guest posts buffers (its kick runs
    /// RX again). Reading one anyway would only have kept it in `rx_buf` and copied it later.
    rx_starved: bool,
    /// Validated RX chains popped from the queue but not used yet.
    rx_held: HeldChains,
    /// How much of the held chains an RX read offers (see `rx.rs`, "The window").
    rx_expect: RxExpect,
    /// Scratch list of the descriptors of the TX chain being sent.
    tx_descs: Vec<Descriptor>,
    stats: NetStats,
    /// Set by `init` if registering an fd with the event manager failed.
    pub(crate) registration_error: Option<event_manager::Error>,
}

impl NetHandler {
    /// A handler for an activated device. `queues`/`evts` are `[rx, tx]`; `acked_features`
    /// are the negotiated features (they select mergeable RX buffers and the acceptable RX
    /// offloads).
    pub fn new(
        mem: GuestMemoryMmap,
        queues: [Queue; 2],
        evts: [EventFd; 2],
        irq: Arc<IrqTrigger>,
        backend: Box<dyn NetBackend>,
        acked_features: u64,
        log: Arc<GuestLog>,
    ) -> Self {
        let [rx_queue, tx_queue] = queues;
        let [rx_evt, tx_evt] = evts;
        let backend_fd = backend.as_raw_fd();
        NetHandler {
            mem,
            // RX work is bounded by RX_BUDGET frames read, not by chains popped.
            rx: DeviceQueue::new(rx_queue, rx_evt, usize::MAX, "virtio-net RX queue"),
            tx: DeviceQueue::new(tx_queue, tx_evt, TX_BUDGET, "virtio-net TX queue"),
            irq,
            log,
            backend: Some(backend),
            backend_fd,
            backend_failed: false,
            backend_watched: false,
            rx_limiter: None,
            tx_limiter: None,
            acked_features,
            mrg_rxbuf: acked_features & (1u64 << VIRTIO_NET_F_MRG_RXBUF) != 0,
            rx_buf: vec![0u8; super::MAX_FRAME_LEN],
            rx_zero_copy: true,
            rx_pending: None,
            rx_kicks_off: false,
            rx_starved: false,
            rx_held: HeldChains::default(),
            rx_expect: RxExpect::default(),
            tx_descs: Vec::with_capacity(usize::from(super::QUEUE_SIZE)),
            stats: NetStats::default(),
            registration_error: None,
        }
    }

    /// Installs the per-direction rate limiters (before registration with the event manager).
    pub fn set_rate_limiters(&mut self, rx: Option<RateLimiter>, tx: Option<RateLimiter>) {
        self.rx_limiter = rx;
        self.tx_limiter = tx;
    }

    /// Whether RX reads frames straight into guest buffers (the default). Off, every frame
    /// is read into an intermediate buffer and copied: only to compare the two in benchmarks.
    #[doc(hidden)]
    pub fn set_rx_zero_copy(&mut self, on: bool) {
        self.rx_zero_copy = on;
    }

    /// Takes the rate limiters back (device reset): `(rx, tx)`.
    pub fn take_rate_limiters(&mut self) -> (Option<RateLimiter>, Option<RateLimiter>) {
        (self.rx_limiter.take(), self.tx_limiter.take())
    }

    /// Takes the backend back (device reset). The handler must not be processed afterwards.
    pub fn take_backend(&mut self) -> Option<Box<dyn NetBackend>> {
        self.backend.take()
    }

    /// Data-plane counters.
    pub fn stats(&self) -> NetStats {
        self.stats
    }

    /// The RX queue notification eventfd.
    pub fn rx_evt(&self) -> &EventFd {
        &self.rx.evt
    }

    /// The TX queue notification eventfd.
    pub fn tx_evt(&self) -> &EventFd {
        &self.tx.evt
    }

    /// The backend's fd.
    pub fn backend_fd(&self) -> RawFd {
        self.backend_fd
    }

    /// The RX rate limiter, if any.
    /// Both rate limiters (RX, TX), to restore their levels.
    pub fn rate_limiters_mut(&mut self) -> (Option<&mut RateLimiter>, Option<&mut RateLimiter>) {
        (self.rx_limiter.as_mut(), self.tx_limiter.as_mut())
    }

    pub fn rx_rate_limiter(&self) -> Option<&RateLimiter> {
        self.rx_limiter.as_ref()
    }

    /// The TX rate limiter, if any.
    pub fn tx_rate_limiter(&self) -> Option<&RateLimiter> {
        self.tx_limiter.as_ref()
    }

    /// True while the RX limiter waits for its timer.
    pub fn rx_throttled(&self) -> bool {
        self.rx_limiter
            .as_ref()
            .is_some_and(RateLimiter::is_blocked)
    }

    /// True while the TX limiter waits for its timer.
    pub fn tx_throttled(&self) -> bool {
        self.tx_limiter
            .as_ref()
            .is_some_and(RateLimiter::is_blocked)
    }

    /// True if a frame read from the backend waits for guest buffers or tokens.
    pub fn has_pending_rx(&self) -> bool {
        self.rx_pending.is_some()
    }

    /// Whether the backend fd should be watched: only when a frame read from it could make
    /// progress (no frame already waiting, guest buffers posted, not throttled). Otherwise
    /// the level-triggered fd would wake the loop for nothing; the RX kick or the limiter's
    /// timer resumes RX.
    pub fn wants_backend(&self) -> bool {
        self.backend.is_some()
            && !self.backend_failed
            && self.rx_pending.is_none()
            && !self.rx_starved
            && !self.rx_throttled()
    }

    /// The backend reported a hang-up or error: stop watching it for good.
    pub(crate) fn set_backend_failed(&mut self) {
        self.backend_failed = true;
    }

    fn has_feature(&self, bit: u32) -> bool {
        self.acked_features & (1u64 << bit) != 0
    }
}
