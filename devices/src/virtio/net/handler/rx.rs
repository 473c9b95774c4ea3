//! RX: backend → guest, read straight into the guest's buffers.
//!
//! # Zero copy
//!
//! Before each read, the handler holds enough validated RX chains to take the frame it
//! expects (the window, below) if the guest has posted that much: with `MRG_RXBUF` as many
//! chains as that takes (a frame may span several, `num_buffers` in its header says how
//! many), without it the next chain (each frame goes in one chain). One `readv` then
//! scatters the frame:
//!
//! * straight into the held chains' buffers, in order, the 12-byte vnet header first;
//! * whatever the held buffers do not cover, up to `MAX_FRAME_LEN`, into `rx_buf` (so a frame
//!   is never truncated).
//!
//! The header is then copied into the handler's `rx_buf` (host memory), checked there against
//! the accepted offloads, `num_buffers` filled in, and written back over the guest's copy
//! before the chains are returned: what the guest gets is the header we checked, whatever it
//! wrote into its buffer meanwhile. (The header used to go to `rx_buf` through an iovec of
//! its own: one more segment per read than the buffers themselves.)
//!
//! # The window
//!
//! A TAP cannot tell the length of its next frame before it is read, so the guest buffers a
//! read offers cover the longest frame seen lately ([`RxExpect`]), not always the largest
//! possible one (64 KiB): offering 17 buffers of 4 KiB for every 1514-byte frame made the
//! kernel allocate and walk a 19-entry iovec array per read (more than its 8 on-stack
//! entries), which cost more than zero copy saved. A frame longer than the window lands
//! partly in `rx_buf` and takes the copy path below, and the window grows to the largest
//! frame at once; it shrinks to the longest frame of the last [`EXPECT_PERIOD`] frames.
//!
//! # The copy path, and when it is still used
//!
//! A frame longer than the buffers it was read into (the guest posted less than a largest
//! frame and this frame is bigger than what it posted; or, without `MRG_RXBUF`, bigger than
//! the one chain) is gathered whole into `rx_buf` (its first bytes copied back from the guest
//! buffers) and delivered by copying, once enough buffers come, exactly as before zero copy
//! (without `MRG_RXBUF`: dropped, it fits no buffer). While the guest has no buffer at all
//! (none held, none posted) nothing is read: the frames wait in the backend, which is not
//! watched until the guest's RX kick (reading one would only have parked it in `rx_buf` and
//! copied it later; with zero copy off, the benchmarks' comparison, it still is). A frame
//! that the rate limiter holds back, or that waits for nothing else, stays where it was
//! read: in the held chains (`in_place`), which nothing else touches until it is delivered.
//!
//! Guest buffers are checked (device-writable, inside guest memory) when their chain is
//! popped and their host addresses noted then; guest memory is never unmapped while the
//! handler lives (it holds `mem`), so those addresses stay valid until the chain is used.

mod chain;

use std::io;

use tracing::{debug, error};
use virtio_queue::QueueT;

use super::{NetHandler, ProcessStats, RX_BUDGET};
use crate::guest_warn;
use crate::virtio::net::{
    MAX_FRAME_LEN, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_ECN, VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_GUEST_UFO, VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VIRTIO_NET_HDR_GSO_ECN, VIRTIO_NET_HDR_GSO_NONE, VIRTIO_NET_HDR_GSO_TCPV4,
    VIRTIO_NET_HDR_GSO_TCPV6, VIRTIO_NET_HDR_GSO_UDP, VNET_HDR_LEN, VNET_HDR_NUM_BUFFERS,
};

pub(super) use chain::HeldChains;
#[cfg(test)]
pub(super) use chain::HOLD_AHEAD;
use chain::Pop;
use crate::virtio::queue::SplitRing;

/// The smallest window: a full-size Ethernet frame with a VLAN tag, and its vnet header.
pub(super) const EXPECT_MIN: usize = VNET_HDR_LEN + 1518;
/// Frames after which the window shrinks to the longest of them.
const EXPECT_PERIOD: u32 = 256;

/// The window of RX reads: how many bytes of guest buffers the next read offers.
#[derive(Debug)]
pub(super) struct RxExpect {
    pub(super) bytes: usize,
    period_max: usize,
    period_frames: u32,
}

impl Default for RxExpect {
    fn default() -> Self {
        RxExpect {
            bytes: EXPECT_MIN,
            period_max: 0,
            period_frames: 0,
        }
    }
}

impl RxExpect {
    /// Notes a frame of `len` bytes (header included) just read.
    fn note(&mut self, len: usize) {
        self.period_max = self.period_max.max(len);
        self.period_frames += 1;
        if len > self.bytes {
            // Offloaded (GSO) frames vary up to the largest: take the largest at once
            // rather than copy each longer one on the way up.
            self.bytes = MAX_FRAME_LEN;
            self.period_frames = 1;
            self.period_max = len;
        } else if self.period_frames >= EXPECT_PERIOD {
            self.bytes = self.period_max.max(EXPECT_MIN);
            self.period_frames = 0;
            self.period_max = 0;
        }
    }
}

/// Most iovecs one `readv` takes (the kernel's `UIO_MAXIOV`); a window needing more is cut
/// short, and what it does not cover lands in `rx_buf`.
pub(super) const MAX_RX_IOVS: usize = 1024;

/// The frame read last and not delivered yet.
#[derive(Clone, Copy, Debug)]
pub(super) struct PendingFrame {
    /// Length, vnet header included.
    len: usize,
    /// Its rate-limiter tokens were taken.
    charged: bool,
    /// Its header is in `rx_buf[..VNET_HDR_LEN]` and the rest in the held chains (zero
    /// copy); otherwise all of it is in `rx_buf`.
    in_place: bool,
}

/// Outcome of a backend read.
enum Read {
    Frame(PendingFrame),
    /// Something was read and dropped (or the read was interrupted): try again.
    Skip,
    /// Nothing read: the guest has no RX buffer posted (see [`NetHandler::rx_drained`]).
    NoBuffers,
    /// Nothing more to read now.
    Stop,
}

/// Outcome of delivering a frame.
enum Delivery {
    Delivered,
    Dropped,
    /// Not enough buffers yet: keep the frame.
    NoBuffers,
    /// The queue is unusable (e.g. avail index too far ahead): keep the frame, stop RX.
    Broken,
}

impl NetHandler {
    /// Moves frames from the backend to the guest until the backend has none, the guest has
    /// no buffers, the limiter says stop, or [`RX_BUDGET`] frames were read. Raises the
    /// used-ring interrupt if anything was delivered. Call on backend readable, RX queue kick
    /// and RX limiter timer.
    pub fn process_rx(&mut self) -> ProcessStats {
        let mut stats = ProcessStats::default();
        let mut reads = 0usize;
        let mut stuck = false;
        self.rx_starved = false;
        loop {
            let mut frame = match self.rx_pending.take() {
                Some(f) => f,
                None => {
                    if reads >= RX_BUDGET || self.rx_throttled() {
                        break;
                    }
                    reads += 1;
                    match self.read_backend(&mut stats) {
                        Read::Frame(f) => f,
                        Read::Skip => continue,
                        Read::Stop => break,
                        Read::NoBuffers => {
                            if self.wait_for_rx_buffers() {
                                continue;
                            }
                            self.rx_starved = true;
                            stuck = true;
                            break;
                        }
                    }
                }
            };
            if !frame.charged {
                let payload = (frame.len - VNET_HDR_LEN) as u64;
                if let Some(rl) = self.rx_limiter.as_mut() {
                    let was_blocked = rl.is_blocked();
                    if !rl.consume_request(payload) {
                        if !was_blocked {
                            self.stats.rx_throttled += 1;
                        }
                        stats.throttled = true;
                        // An in-place frame stays in the held chains: nothing pops or uses
                        // them while a frame is pending.
                        self.rx_pending = Some(frame);
                        break;
                    }
                }
                frame.charged = true;
            }
            let delivery = if frame.in_place {
                self.deliver_in_place(frame.len, &mut stats)
            } else {
                self.deliver_copy(frame.len, &mut stats)
            };
            match delivery {
                Delivery::Delivered => {
                    self.stats.rx_frames += 1;
                    self.stats.rx_bytes += (frame.len - VNET_HDR_LEN) as u64;
                }
                Delivery::Dropped => self.stats.rx_dropped += 1,
                Delivery::Broken => {
                    self.rx_pending = Some(frame);
                    stuck = true;
                    break;
                }
                Delivery::NoBuffers => {
                    self.rx_pending = Some(frame);
                    if self.wait_for_rx_buffers() {
                        continue;
                    }
                    stuck = true;
                    break;
                }
            }
        }
        if !stuck && stats.completed > 0 && !self.rx_kicks_off {
            // Not waiting for buffers: RX kicks are useless until we run out again. (Once:
            // only the device writes the flag, so it stays off until we turn it on.)
            match self.rx.queue.disable_notification(&self.mem) {
                Ok(()) => self.rx_kicks_off = true,
                Err(e) => guest_warn!(self.log, error = %e, "virtio-net: cannot disable RX notifications"),
            }
        }
        if stats.completed > 0 {
            self.rx.signal_used(&self.mem, &self.irq, &self.log);
        }
        stats
    }

    /// Asks the guest for a kick when it posts RX buffers, then looks again in case they
    /// came before it could see the request: true if they did.
    fn wait_for_rx_buffers(&mut self) -> bool {
        self.rx_kicks_off = false;
        match self.rx.queue.enable_notification(&self.mem) {
            Ok(more) => more,
            Err(e) => {
                guest_warn!(self.log, error = %e, "virtio-net: cannot enable RX notifications");
                false
            }
        }
    }

    /// Whether the guest has no RX buffer for a frame: none held and none posted (the avail
    /// ring readable and empty). A broken ring is not drained: the delivery that needs it
    /// reports it, as before.
    fn rx_drained(&self) -> bool {
        self.rx_held.is_empty()
            && SplitRing::new(&self.rx.queue, &self.mem).is_ok_and(|ring| {
                let next = self.rx.queue.next_avail();
                ring.avail_idx(next).is_ok_and(|avail| avail == next)
            })
    }

    /// Reads one frame: into the held chains where they cover it, else into `rx_buf` (see
    /// the module documentation). Reads nothing while the guest has no buffer at all: the
    /// frame would only wait in `rx_buf` and be copied later, where in the backend it waits
    /// for free.
    fn read_backend(&mut self, stats: &mut ProcessStats) -> Read {
        if self.backend_failed || self.backend.is_none() {
            return Read::Stop;
        }
        if self.rx_zero_copy {
            self.hold_rx_chains(stats);
            if self.rx_drained() {
                return Read::NoBuffers;
            }
        }
        let window = self.rx_window();
        // Without MRG_RXBUF a frame goes in one chain: offer all of it (its descriptors are
        // the only iovecs there can be).
        let expect = if self.mrg_rxbuf {
            self.rx_expect.bytes.min(MAX_FRAME_LEN)
        } else {
            MAX_FRAME_LEN
        };
        let Some(backend) = self.backend.as_mut() else {
            return Read::Stop;
        };
        let (result, in_place_limit) = self.rx_held.read_into(window, expect, &mut self.rx_buf, |iovs| {
            // SAFETY: `read_into` gives iovecs that point either into `rx_buf` (a live Vec of
            // MAX_FRAME_LEN bytes, lent to `read_into` for the call) or into guest memory that
            // was checked to be inside a mapped region when its chain was popped; the regions
            // stay mapped while `self.mem` lives, i.e. for the whole call. No Rust reference to
            // that guest memory exists; the guest may change it concurrently or make two
            // buffers overlap, which can only garble its own frame.
            unsafe { backend.read_frame_into(iovs) }
        });
        if let Ok(n) = result {
            self.rx_expect.note(n);
        }
        match result {
            // EOF on a socket backend; never for a TAP.
            Ok(0) => Read::Stop,
            Ok(n) if n <= VNET_HDR_LEN || n > MAX_FRAME_LEN => {
                debug!(len = n, "virtio-net: dropping RX frame with a bad length");
                self.stats.rx_dropped += 1;
                Read::Skip
            }
            Ok(n) => {
                let in_place = n <= in_place_limit;
                // In place: the header, to check and complete in host memory (see "Zero
                // copy"). The copy path: what went into the guest buffers, so that the whole
                // frame is in rx_buf.
                let gather = if in_place { VNET_HDR_LEN } else { in_place_limit };
                if gather > 0 && !self.gather_held(gather) {
                    self.stats.rx_dropped += 1;
                    return Read::Skip;
                }
                Read::Frame(PendingFrame {
                    len: n,
                    charged: false,
                    in_place,
                })
            }
            Err(e) => match e.kind() {
                io::ErrorKind::WouldBlock => Read::Stop,
                io::ErrorKind::Interrupted => Read::Skip,
                io::ErrorKind::InvalidData => {
                    debug!(error = %e, "virtio-net: dropping oversized RX frame");
                    self.stats.rx_dropped += 1;
                    Read::Skip
                }
                _ => {
                    guest_warn!(self.log, error = %e, "virtio-net: backend read failed");
                    Read::Stop
                }
            },
        }
    }

    /// Chains a read may use: with MRG_RXBUF all held ones, else the first.
    fn rx_window(&self) -> usize {
        if self.mrg_rxbuf {
            self.rx_held.len()
        } else {
            self.rx_held.len().min(1)
        }
    }

    /// Copies frame bytes `..limit`, read into the window's buffers, to the same place in
    /// `rx_buf`. False if the window holds fewer.
    fn gather_held(&mut self, limit: usize) -> bool {
        let window = self.rx_window();
        let out = &mut self.rx_buf[..limit];
        self.rx_held.read(window, out)
    }

    /// Checks the frame's header (in `rx_buf`) against the negotiated offloads (frames
    /// queued in the TAP before a renegotiation may carry offloads the guest refused) and
    /// clears the flags when the guest did not accept checksum offload. False: drop the frame.
    fn accept_rx_header(&mut self) -> bool {
        let flags = u32::from(self.rx_buf[0]);
        let gso = u32::from(self.rx_buf[1]);
        if !self.has_feature(VIRTIO_NET_F_GUEST_CSUM) {
            if flags & VIRTIO_NET_HDR_F_NEEDS_CSUM != 0 {
                return false;
            }
            // virtio 5.1.6.4.1: without GUEST_CSUM flags must be zero (no DATA_VALID).
            self.rx_buf[0] = 0;
        }
        let gso_ok = match gso & !VIRTIO_NET_HDR_GSO_ECN {
            VIRTIO_NET_HDR_GSO_NONE => gso & VIRTIO_NET_HDR_GSO_ECN == 0,
            VIRTIO_NET_HDR_GSO_TCPV4 => self.has_feature(VIRTIO_NET_F_GUEST_TSO4),
            VIRTIO_NET_HDR_GSO_TCPV6 => self.has_feature(VIRTIO_NET_F_GUEST_TSO6),
            VIRTIO_NET_HDR_GSO_UDP => self.has_feature(VIRTIO_NET_F_GUEST_UFO),
            _ => false,
        };
        gso_ok && (gso & VIRTIO_NET_HDR_GSO_ECN == 0 || self.has_feature(VIRTIO_NET_F_GUEST_ECN))
    }

    fn drop_unacceptable_header(&mut self) -> Delivery {
        debug!(
            flags = self.rx_buf[0],
            gso_type = self.rx_buf[1],
            "virtio-net: dropping RX frame with offloads the guest did not accept"
        );
        Delivery::Dropped
    }

    /// Sets `num_buffers` in the header in `rx_buf`.
    fn set_num_buffers(&mut self, count: usize) {
        // count <= queue size <= 32768.
        let num_buffers = count as u16;
        self.rx_buf[VNET_HDR_NUM_BUFFERS..VNET_HDR_NUM_BUFFERS + 2]
            .copy_from_slice(&num_buffers.to_le_bytes());
    }

    /// Completes a frame read into the held chains: writes its header into the first one and
    /// returns as many as it fills.
    fn deliver_in_place(&mut self, len: usize, stats: &mut ProcessStats) -> Delivery {
        if !self.accept_rx_header() {
            // The chains stay held for the next frame.
            return self.drop_unacceptable_header();
        }
        let Some(count) = self.rx_held.needed_for(self.rx_window(), len) else {
            // Cannot happen: the frame was read into these chains.
            error!(len, "virtio-net: in-place RX frame larger than its chains, dropped");
            return Delivery::Dropped;
        };
        self.set_num_buffers(count);
        if self.rx_held.write_front(&self.rx_buf[..VNET_HDR_LEN]) != VNET_HDR_LEN {
            // Cannot happen: every held chain takes a header (checked when popped).
            error!(len, "virtio-net: in-place RX frame's first chain shorter than a header, dropped");
            return Delivery::Dropped;
        }
        self.complete_rx_in_place(count, len, stats);
        Delivery::Delivered
    }

    /// Puts `rx_buf[..len]` in the guest by copying: one chain, or as many as needed with
    /// MRG_RXBUF.
    fn deliver_copy(&mut self, len: usize, stats: &mut ProcessStats) -> Delivery {
        if !self.accept_rx_header() {
            return self.drop_unacceptable_header();
        }
        let mut have = self.rx_held.capacity(self.rx_window());
        while self.rx_held.is_empty() || have < len {
            if !self.rx_held.is_empty() && !self.mrg_rxbuf {
                debug!(
                    len,
                    capacity = have,
                    "virtio-net: RX frame too big for the buffer, dropped"
                );
                return Delivery::Dropped;
            }
            if self.rx_held.len() >= usize::from(self.rx.queue.size()) {
                debug!(
                    len,
                    capacity = have,
                    "virtio-net: RX frame too big for the whole queue, dropped"
                );
                return Delivery::Dropped;
            }
            match self.pop_rx_chain(stats) {
                Pop::Held(capacity) => have += capacity,
                Pop::Invalid => {}
                Pop::Empty => return Delivery::NoBuffers,
                Pop::Broken => return Delivery::Broken,
            }
        }
        let Some(count) = self.rx_held.needed_for(usize::MAX, len) else {
            return Delivery::Dropped;
        };
        self.set_num_buffers(count);
        let mut off = 0usize;
        self.complete_rx_chains(count, stats, |buf, held| {
            let written = held.write_front(&buf[off..len]);
            off += written;
            written
        });
        self.stats.rx_copied += 1;
        Delivery::Delivered
    }
}
