//! virtio-net: a network card (virtio 1.x, 5.1) backed by a host frame source/sink.
//!
//! * [`NetBackend`]: what the device reads frames from and writes frames to. The VMM implements
//!   it for a TAP fd opened with `IFF_VNET_HDR` and a 12-byte vnet header; [`SeqpacketBackend`]
//!   implements it over a `socketpair(AF_UNIX, SOCK_SEQPACKET)` for tests.
//! * [`device`]: [`Net`] implements [`super::VirtioDevice`] (features, config space,
//!   activation/reset).
//! * [`handler`]: the data plane, [`NetHandler`]: RX (backend → guest, with mergeable RX
//!   buffers) and TX (guest → backend, zero copy), per-direction rate limiting. Testable
//!   without KVM.
//! * [`event_handler`]: `event_manager::MutEventSubscriber` glue for [`NetHandler`].
//!
//! # Offloads
//!
//! Every frame crossing the device carries the 12-byte `virtio_net_hdr_v1`, which is exactly
//! what a TAP with `IFF_VNET_HDR` and `TUNSETVNETHDRSZ = 12` produces and consumes. Offloads are
//! therefore passed through by forwarding the header unchanged:
//! * guest → host (`CSUM`, `HOST_TSO4/6`): the TAP always accepts partial checksums and GSO
//!   frames described by the header;
//! * host → guest (`GUEST_CSUM`, `GUEST_TSO4/6`): the TAP only produces them when told to with
//!   `TUNSETOFFLOAD`, so on activation the device calls [`NetBackend::set_offload`] with
//!   [`tun_offload_flags`] of the acked features. Frames whose header the guest did not agree
//!   to (stale frames queued before a reset) are dropped on RX.
//!
//! UFO is not offered: Linux hosts no longer produce UFO frames and Linux guests no longer send
//! them.

pub mod device;
pub mod event_handler;
pub mod handler;
pub mod seqpacket;

#[cfg(test)]
mod tests;

use std::io;
use std::os::unix::io::AsRawFd;

pub use device::{Net, NetConfig};
pub use handler::{NetHandler, NetStats};
pub use seqpacket::SeqpacketBackend;

use crate::rate_limiter::RateLimiterError;

/// Feature bits (virtio 1.x 5.1.3).
pub use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_ECN, VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_GUEST_UFO, VIRTIO_NET_F_HOST_ECN, VIRTIO_NET_F_HOST_TSO4,
    VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_HOST_UFO, VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_NET_F_STATUS,
};
/// Header flags and GSO types (virtio 1.x 5.1.6).
pub use virtio_bindings::virtio_net::{
    VIRTIO_NET_HDR_F_DATA_VALID, VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_ECN,
    VIRTIO_NET_HDR_GSO_NONE, VIRTIO_NET_HDR_GSO_TCPV4, VIRTIO_NET_HDR_GSO_TCPV6,
    VIRTIO_NET_HDR_GSO_UDP,
};
/// Feature bit: used/avail event index notification suppression.
pub use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;

/// Config space status bit: the link is up.
pub const VIRTIO_NET_S_LINK_UP: u16 = virtio_bindings::virtio_net::VIRTIO_NET_S_LINK_UP as u16;

/// Size of the RX and TX queues.
pub const QUEUE_SIZE: u16 = 256;
/// Index of the receive queue.
pub const RX_INDEX: usize = 0;
/// Index of the transmit queue.
pub const TX_INDEX: usize = 1;
/// Queue sizes of the device: receiveq1, transmitq1 (no control queue, one pair).
pub const QUEUE_SIZES: &[u16] = &[QUEUE_SIZE, QUEUE_SIZE];

/// Size of `struct virtio_net_hdr_v1` (flags, gso_type, hdr_len, gso_size, csum_start,
/// csum_offset, num_buffers), the header in front of every frame.
pub const VNET_HDR_LEN: usize = 12;
/// Offset of `num_buffers` (le16) in the header.
pub const VNET_HDR_NUM_BUFFERS: usize = 10;
/// Largest frame we move: a 64 KiB GSO frame plus Ethernet header (65550) plus the vnet header.
pub const MAX_FRAME_LEN: usize = 65_550 + VNET_HDR_LEN;

/// `TUNSETOFFLOAD` flags (linux/if_tun.h): the TAP may hand us partially checksummed frames.
pub const TUN_F_CSUM: u32 = 0x01;
/// The TAP may hand us TCPv4 GSO frames.
pub const TUN_F_TSO4: u32 = 0x02;
/// The TAP may hand us TCPv6 GSO frames.
pub const TUN_F_TSO6: u32 = 0x04;
/// The TAP may hand us TSO frames with the ECN (CWR) bit.
pub const TUN_F_TSO_ECN: u32 = 0x08;
/// The TAP may hand us UFO frames.
pub const TUN_F_UFO: u32 = 0x10;

/// `TUNSETOFFLOAD` flags for the receive offloads the guest accepted (`acked` = acked feature
/// bits).
///
/// * `GUEST_CSUM` → `TUN_F_CSUM`;
/// * `GUEST_TSO4` → `TUN_F_TSO4`, `GUEST_TSO6` → `TUN_F_TSO6`, `GUEST_ECN` → `TUN_F_TSO_ECN`
///   (only with TSO4 or TSO6), `GUEST_UFO` → `TUN_F_UFO`;
/// * every segmentation offload requires `GUEST_CSUM` (virtio 5.1.3.1, and the kernel refuses
///   `TUNSETOFFLOAD` otherwise): without it the result is 0.
pub fn tun_offload_flags(acked: u64) -> u32 {
    let has = |bit: u32| acked & (1u64 << bit) != 0;
    if !has(VIRTIO_NET_F_GUEST_CSUM) {
        return 0;
    }
    let mut flags = TUN_F_CSUM;
    if has(VIRTIO_NET_F_GUEST_TSO4) {
        flags |= TUN_F_TSO4;
    }
    if has(VIRTIO_NET_F_GUEST_TSO6) {
        flags |= TUN_F_TSO6;
    }
    if has(VIRTIO_NET_F_GUEST_ECN) && flags & (TUN_F_TSO4 | TUN_F_TSO6) != 0 {
        flags |= TUN_F_TSO_ECN;
    }
    if has(VIRTIO_NET_F_GUEST_UFO) {
        flags |= TUN_F_UFO;
    }
    flags
}

/// Host side of a network device: a source and sink of frames, each prefixed by the 12-byte
/// `virtio_net_hdr_v1`. The fd is watched for `EPOLLIN` by the event loop.
pub trait NetBackend: Send + AsRawFd {
    /// Reads one frame, prefixed by the 12-byte virtio_net_hdr_v1 (the TAP is opened with
    /// IFF_VNET_HDR and TUNSETVNETHDRSZ=12), scattered over `iovs` in order (`readv`); returns
    /// its length. Err(WouldBlock) when none is pending (the fd is non-blocking). The caller
    /// always offers at least [`MAX_FRAME_LEN`] bytes; a frame longer than that is discarded
    /// (Err(InvalidData)) or truncated, never split over two reads.
    ///
    /// # Safety
    ///
    /// Every iovec must describe memory valid for writes of `iov_len` bytes for the whole
    /// call. It may be guest memory that the guest changes concurrently, and two iovecs may
    /// overlap (the guest chose them): implementations hand the iovecs to the kernel only and
    /// never make Rust references to that memory.
    unsafe fn read_frame_into(&mut self, iovs: &[libc::iovec]) -> io::Result<usize>;
    /// Writes one frame given as iovecs (header first).
    fn write_frame(&mut self, iovs: &[io::IoSlice]) -> io::Result<usize>;
    /// Applies the receive offloads the guest accepted: `tun_flags` is a combination of
    /// `TUN_F_*`, see [`tun_offload_flags`].
    fn set_offload(&mut self, tun_flags: u32) -> io::Result<()>;
}

/// Errors creating or activating a network device.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The MAC address is all zeros or a multicast address.
    #[error("invalid MAC address {0:02x?}: must be a non-zero unicast address")]
    InvalidMac([u8; 6]),
    /// The backend fd could not be made non-blocking.
    #[error("making the backend fd non-blocking failed")]
    NonBlocking(#[source] io::Error),
    /// A rate limiter could not be created.
    #[error("creating a rate limiter failed")]
    RateLimiter(#[from] RateLimiterError),
    /// Applying the negotiated offloads to the backend failed (on activation).
    #[error("setting backend offloads {flags:#x} failed")]
    SetOffload {
        /// The `TUN_F_*` flags.
        flags: u32,
        /// Why the backend refused.
        #[source]
        source: io::Error,
    },
    /// The backend was lost by a previous failed reset.
    #[error("the device has no backend")]
    NoBackend,
}

#[cfg(test)]
mod offload_tests {
    use super::*;
    use crate::virtio::test_utils::bits;

    #[test]
    fn offload_flags_follow_guest_features() {
        assert_eq!(tun_offload_flags(0), 0);
        assert_eq!(
            tun_offload_flags(bits(&[VIRTIO_NET_F_GUEST_CSUM])),
            TUN_F_CSUM
        );
        assert_eq!(
            tun_offload_flags(bits(&[
                VIRTIO_NET_F_GUEST_CSUM,
                VIRTIO_NET_F_GUEST_TSO4,
                VIRTIO_NET_F_GUEST_TSO6,
                VIRTIO_NET_F_GUEST_ECN,
                VIRTIO_NET_F_GUEST_UFO,
            ])),
            TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN | TUN_F_UFO
        );
        // Host-side offloads do not matter.
        assert_eq!(
            tun_offload_flags(bits(&[
                VIRTIO_NET_F_CSUM,
                VIRTIO_NET_F_HOST_TSO4,
                VIRTIO_NET_F_HOST_TSO6,
                VIRTIO_NET_F_HOST_UFO,
            ])),
            0
        );
        // TSO without GUEST_CSUM is invalid: nothing.
        assert_eq!(tun_offload_flags(bits(&[VIRTIO_NET_F_GUEST_TSO4])), 0);
        // ECN without TSO: ignored.
        assert_eq!(
            tun_offload_flags(bits(&[VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_ECN])),
            TUN_F_CSUM
        );
    }
}
