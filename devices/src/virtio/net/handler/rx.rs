//! RX: backend → guest.

use std::io;

use tracing::{debug, error};
use virtio_queue::{DescriptorChain, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryMmap, Permissions};

use super::{ChainError, NetHandler, ProcessStats, RX_BUDGET};
use crate::guest_warn;
use crate::virtio::net::{
    VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_ECN, VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_GUEST_UFO, VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VIRTIO_NET_HDR_GSO_ECN, VIRTIO_NET_HDR_GSO_NONE, VIRTIO_NET_HDR_GSO_TCPV4,
    VIRTIO_NET_HDR_GSO_TCPV6, VIRTIO_NET_HDR_GSO_UDP, VNET_HDR_LEN, VNET_HDR_NUM_BUFFERS,
};
use crate::virtio::pop_chain;

/// The frame in the handler's `rx_buf`.
#[derive(Clone, Copy, Debug)]
pub(super) struct PendingFrame {
    /// Length, vnet header included.
    len: usize,
    /// Its rate-limiter tokens were taken.
    charged: bool,
}

/// A validated RX chain: device-writable buffers, all inside guest memory.
#[derive(Debug)]
pub(super) struct RxChain {
    head: u16,
    bufs: Vec<(GuestAddress, u32)>,
    capacity: usize,
}

/// Outcome of a backend read.
enum Read {
    /// A frame of this length is in `rx_buf`.
    Frame(usize),
    /// Something was read and dropped (or the read was interrupted): try again.
    Skip,
    /// Nothing more to read now.
    Stop,
}

/// Outcome of delivering the frame in `rx_buf`.
enum Delivery {
    Delivered,
    Dropped,
    /// Not enough buffers yet: keep the frame.
    NoBuffers,
    /// The queue is unusable (e.g. avail index too far ahead): keep the frame, stop RX.
    Broken,
}

/// Outcome of popping one RX chain.
enum Pop {
    Chain(RxChain),
    /// A malformed chain was returned to the guest unused.
    Invalid,
    Empty,
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
        loop {
            let mut frame = match self.rx_pending.take() {
                Some(f) => f,
                None => {
                    if reads >= RX_BUDGET || self.rx_throttled() {
                        break;
                    }
                    reads += 1;
                    match self.read_backend() {
                        Read::Frame(len) => PendingFrame {
                            len,
                            charged: false,
                        },
                        Read::Skip => continue,
                        Read::Stop => break,
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
                        self.rx_pending = Some(frame);
                        break;
                    }
                }
                frame.charged = true;
            }
            match self.deliver(frame.len, &mut stats) {
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
                    // Ask for a kick when buffers come, then look again in case they came
                    // before the driver could see the request.
                    match self.rx.queue.enable_notification(&self.mem) {
                        Ok(true) => continue,
                        Ok(false) => {}
                        Err(e) => {
                            guest_warn!(self.log, error = %e, "virtio-net: cannot enable RX notifications")
                        }
                    }
                    stuck = true;
                    break;
                }
            }
        }
        if !stuck && stats.completed > 0 {
            // Not waiting for buffers: RX kicks are useless until we run out again.
            if let Err(e) = self.rx.queue.disable_notification(&self.mem) {
                guest_warn!(self.log, error = %e, "virtio-net: cannot disable RX notifications");
            }
        }
        if stats.completed > 0 {
            self.rx.signal_used(&self.mem, &self.irq, &self.log);
        }
        stats
    }

    fn read_backend(&mut self) -> Read {
        if self.backend_failed {
            return Read::Stop;
        }
        let Some(backend) = self.backend.as_mut() else {
            return Read::Stop;
        };
        match backend.read_frame(&mut self.rx_buf) {
            // EOF on a socket backend; never for a TAP.
            Ok(0) => Read::Stop,
            Ok(n) if n <= VNET_HDR_LEN || n > self.rx_buf.len() => {
                debug!(len = n, "virtio-net: dropping RX frame with a bad length");
                self.stats.rx_dropped += 1;
                Read::Skip
            }
            Ok(n) => Read::Frame(n),
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

    /// Checks the frame's header against the negotiated offloads (frames queued in the TAP
    /// before a renegotiation may carry offloads the guest refused) and clears the flags when
    /// the guest did not accept checksum offload. False: drop the frame.
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

    /// Puts `rx_buf[..len]` in the guest: one chain, or as many as needed with MRG_RXBUF.
    fn deliver(&mut self, len: usize, stats: &mut ProcessStats) -> Delivery {
        if !self.accept_rx_header() {
            debug!(
                flags = self.rx_buf[0],
                gso_type = self.rx_buf[1],
                "virtio-net: dropping RX frame with offloads the guest did not accept"
            );
            return Delivery::Dropped;
        }
        let mut have: usize = if self.mrg_rxbuf {
            self.rx_chains.iter().map(|c| c.capacity).sum()
        } else {
            self.rx_chains.front().map_or(0, |c| c.capacity)
        };
        while self.rx_chains.is_empty() || have < len {
            if !self.rx_chains.is_empty() && !self.mrg_rxbuf {
                debug!(
                    len,
                    capacity = have,
                    "virtio-net: RX frame too big for the buffer, dropped"
                );
                return Delivery::Dropped;
            }
            if self.rx_chains.len() >= usize::from(self.rx.queue.size()) {
                debug!(
                    len,
                    capacity = have,
                    "virtio-net: RX frame too big for the whole queue, dropped"
                );
                return Delivery::Dropped;
            }
            match self.pop_rx_chain(stats) {
                Pop::Chain(c) => {
                    have += c.capacity;
                    self.rx_chains.push_back(c);
                }
                Pop::Invalid => {}
                Pop::Empty => return Delivery::NoBuffers,
                Pop::Broken => return Delivery::Broken,
            }
        }

        // How many of the held chains the frame fills.
        let mut count = 0usize;
        let mut acc = 0usize;
        for c in &self.rx_chains {
            count += 1;
            acc += c.capacity;
            if acc >= len {
                break;
            }
        }
        // count <= queue size <= 32768.
        let num_buffers = count as u16;
        self.rx_buf[VNET_HDR_NUM_BUFFERS..VNET_HDR_NUM_BUFFERS + 2]
            .copy_from_slice(&num_buffers.to_le_bytes());
        let mut off = 0usize;
        for _ in 0..count {
            let Some(chain) = self.rx_chains.pop_front() else {
                break;
            };
            let written = write_chain(&self.mem, &chain, &self.rx_buf[off..len]);
            off += written;
            // written <= capacity <= u32::MAX (checked by the chain iterator).
            if self
                .rx
                .add_used(&self.mem, &self.log, chain.head, written as u32)
            {
                stats.completed += 1;
            }
        }
        Delivery::Delivered
    }

    fn pop_rx_chain(&mut self, stats: &mut ProcessStats) -> Pop {
        let chain = match pop_chain(&mut self.rx.queue, &self.mem) {
            Ok(Some(c)) => c,
            Ok(None) => return Pop::Empty,
            Err(e) => {
                guest_warn!(self.log, error = %e, "virtio-net: RX queue is broken, not using it");
                return Pop::Broken;
            }
        };
        let head = chain.head_index();
        match parse_rx_chain(&self.mem, chain) {
            Ok(c) => Pop::Chain(c),
            Err(e) => {
                guest_warn!(self.log, head, error = %e, "virtio-net: returning malformed RX chain unused");
                self.stats.rx_bad_chains += 1;
                if self.rx.add_used(&self.mem, &self.log, head, 0) {
                    stats.completed += 1;
                }
                Pop::Invalid
            }
        }
    }
}

/// Validates an RX chain: every descriptor device-writable and inside guest memory, room for
/// at least the vnet header (virtio 5.1.6.3.1).
fn parse_rx_chain(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
) -> Result<RxChain, ChainError> {
    let head = chain.head_index();
    let mut bufs = Vec::new();
    let mut capacity = 0usize;
    // The iterator stops at queue-size descriptors (loops), on bad indexes and on a total
    // length overflowing u32: a last descriptor still flagged NEXT means the chain was cut.
    let mut cut = true;
    for d in chain {
        cut = d.has_next();
        if !d.is_write_only() {
            return Err(ChainError::ReadableRx);
        }
        if d.len() == 0 {
            continue;
        }
        if !GuestMemory::check_range(mem, d.addr(), d.len() as usize, Permissions::Write) {
            return Err(ChainError::OutsideMemory {
                addr: d.addr().0,
                len: d.len(),
            });
        }
        bufs.push((d.addr(), d.len()));
        capacity += d.len() as usize;
    }
    if cut {
        return Err(ChainError::Broken);
    }
    if capacity < VNET_HDR_LEN {
        return Err(ChainError::TooShort(capacity));
    }
    Ok(RxChain {
        head,
        bufs,
        capacity,
    })
}

/// Copies as much of `data` as fits into the chain; returns the bytes written.
fn write_chain(mem: &GuestMemoryMmap, chain: &RxChain, data: &[u8]) -> usize {
    let mut off = 0usize;
    for &(addr, len) in &chain.bufs {
        if off == data.len() {
            break;
        }
        let n = (len as usize).min(data.len() - off);
        // Checked against guest memory when the chain was parsed.
        if let Err(e) = mem.write_slice(&data[off..off + n], addr) {
            error!(head = chain.head, error = %e, "virtio-net: RX write to guest memory failed");
            break;
        }
        off += n;
    }
    off
}
