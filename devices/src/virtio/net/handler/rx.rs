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
//! * the 12-byte vnet header into the handler's `rx_buf` (host memory), where it is checked
//!   against the accepted offloads and `num_buffers` is filled in before it is written to the
//!   guest: the guest never gets a header it could change between our check and our write;
//! * the rest straight into the held chains' buffers, after the header's 12 bytes, in order;
//! * whatever the held buffers do not cover, up to `MAX_FRAME_LEN`, into `rx_buf` (so a frame
//!   is never truncated).
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
//! (without `MRG_RXBUF`: dropped, it fits no buffer). The copy path also serves a read made
//! while the guest has no buffer at all. A frame that the rate limiter holds back, or that
//! waits for nothing else, stays where it was read: in the held chains (`in_place`), which
//! nothing else touches until it is delivered.
//!
//! Guest buffers are checked (device-writable, inside guest memory) when their chain is
//! popped and their host addresses noted then; guest memory is never unmapped while the
//! handler lives (it holds `mem`), so those addresses stay valid until the chain is used.

use std::io;

use tracing::{debug, error};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::{ChainError, NetHandler, ProcessStats, RX_BUDGET};
use crate::guest_warn;
use crate::virtio::net::{
    MAX_FRAME_LEN, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_ECN, VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_GUEST_UFO, VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VIRTIO_NET_HDR_GSO_ECN, VIRTIO_NET_HDR_GSO_NONE, VIRTIO_NET_HDR_GSO_TCPV4,
    VIRTIO_NET_HDR_GSO_TCPV6, VIRTIO_NET_HDR_GSO_UDP, VNET_HDR_LEN, VNET_HDR_NUM_BUFFERS,
};
use crate::virtio::pop_chain;
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

/// Used chains kept for their vectors (a largest frame in 4 KiB buffers takes 17).
const RX_SPARE_MAX: usize = 32;

/// Most iovecs one `readv` takes (the kernel's `UIO_MAXIOV`); a window needing more is cut
/// short, and what it does not cover lands in `rx_buf`.
const MAX_RX_IOVS: usize = 1024;

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

/// A validated RX chain: device-writable buffers, all inside guest memory.
#[derive(Debug)]
pub(super) struct RxChain {
    head: u16,
    /// The avail-ring position it was popped from (a snapshot rewinds to the oldest held
    /// chain, so that the restored device pops it again).
    pub(super) avail_idx: u16,
    /// Guest address and length of each non-empty buffer (checked writes: copy path).
    bufs: Vec<(GuestAddress, u32)>,
    /// The same bytes as host addresses, one piece per memory region crossed (readv).
    host: Vec<HostSeg>,
    capacity: usize,
}

/// Host address and length of guest memory, checked when the chain was popped.
#[derive(Clone, Copy, Debug)]
struct HostSeg {
    addr: usize,
    len: usize,
}

/// The iovecs of one read (scratch space, empty between reads).
#[derive(Default)]
pub(super) struct RxIovecs(Vec<libc::iovec>);

// SAFETY: `libc::iovec` holds a raw pointer, hence !Send; the vector is scratch space filled
// and emptied within one `read_backend` call on one thread, so no pointer in it is ever used
// after the handler moves to another thread.
unsafe impl Send for RxIovecs {}

/// Outcome of a backend read.
enum Read {
    Frame(PendingFrame),
    /// Something was read and dropped (or the read was interrupted): try again.
    Skip,
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
                    match self.read_backend(&mut stats) {
                        Read::Frame(f) => f,
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

    /// Reads one frame: into the held chains where they cover it, else into `rx_buf` (see
    /// the module documentation).
    fn read_backend(&mut self, stats: &mut ProcessStats) -> Read {
        if self.backend_failed || self.backend.is_none() {
            return Read::Stop;
        }
        if self.rx_zero_copy {
            self.hold_rx_chains(stats);
        }
        let in_place_limit = self.build_rx_iovs();
        let Some(backend) = self.backend.as_mut() else {
            return Read::Stop;
        };
        // SAFETY: `build_rx_iovs` made every iovec point either into `rx_buf` (a live Vec of
        // MAX_FRAME_LEN bytes not otherwise borrowed during the call) or into guest memory
        // that was checked to be inside a mapped region when its chain was popped; the
        // regions stay mapped while `self.mem` lives, i.e. for the whole call. No Rust
        // reference to that guest memory exists; the guest may change it concurrently or
        // make two buffers overlap, which can only garble its own frame.
        let result = unsafe { backend.read_frame_into(&self.rx_iovs.0) };
        self.rx_iovs.0.clear();
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
            Ok(n) if n <= in_place_limit => Read::Frame(PendingFrame {
                len: n,
                charged: false,
                in_place: true,
            }),
            Ok(n) => {
                // The copy path: bring back what went into the guest buffers, so that the
                // whole frame is in rx_buf.
                if in_place_limit > VNET_HDR_LEN && !self.gather_held(in_place_limit) {
                    self.stats.rx_dropped += 1;
                    return Read::Skip;
                }
                Read::Frame(PendingFrame {
                    len: n,
                    charged: false,
                    in_place: false,
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
            self.rx_chains.len()
        } else {
            self.rx_chains.len().min(1)
        }
    }

    /// Pops chains until the window can take the expected frame, the queue has no more, or
    /// a queue's worth was popped (a guest reposting invalid chains cannot keep us here).
    /// The avail index is read once for them all, and the rings are read in place
    /// ([`SplitRing`]); malformed chains are returned to the guest after the others.
    fn hold_rx_chains(&mut self, stats: &mut ProcessStats) {
        let mut have: usize = self.rx_chains.iter().map(|c| c.capacity).sum();
        let size = self.rx.queue.size();
        let mrg = self.mrg_rxbuf;
        let want = self.rx_expect.bytes;
        let enough = |have: usize, held: usize| {
            (if mrg { have >= want } else { held > 0 }) || held >= usize::from(size)
        };
        if enough(have, self.rx_chains.len()) {
            return;
        }
        let mem = &self.mem;
        let Ok(ring) = SplitRing::new(&self.rx.queue, mem) else {
            return self.hold_rx_chains_slow(stats);
        };
        let start = self.rx.queue.next_avail();
        // A broken queue (avail index unreadable, or more than a queue's worth ahead, as
        // virtio-queue checks) is reported by the delivery that needs it.
        let Ok(avail) = ring.avail_idx() else {
            return;
        };
        if avail.wrapping_sub(start) > size {
            return;
        }
        // Malformed chains met on the way (only a hostile guest posts them: no allocation
        // otherwise).
        let mut bad: Vec<u16> = Vec::new();
        let mut pos = start;
        while pos != avail && !enough(have, self.rx_chains.len()) {
            let Ok(head) = ring.avail_head(pos) else {
                break;
            };
            let mut descs = ring.chain(head);
            let mut parsed = parse_rx_chain(mem, &mut descs, head, pos, self.rx_spare.pop());
            let mut head = head;
            if descs.indirect() {
                // Not offered, but virtio-queue follows indirect tables: let it.
                self.rx.queue.set_next_avail(pos);
                match pop_chain(&mut self.rx.queue, mem) {
                    Ok(Some(chain)) => {
                        head = chain.head_index();
                        parsed = parse_rx_chain(mem, chain, head, pos, None);
                    }
                    _ => break,
                }
            }
            match parsed {
                Ok(c) => {
                    have += c.capacity;
                    self.rx_chains.push_back(c);
                }
                Err(e) => {
                    guest_warn!(self.log, head, error = %e, "virtio-net: returning malformed RX chain unused");
                    self.stats.rx_bad_chains += 1;
                    bad.push(head);
                }
            }
            pos = pos.wrapping_add(1);
        }
        self.rx.queue.set_next_avail(pos);
        for head in bad {
            if self.rx.add_used(&self.mem, &self.log, head, 0) {
                stats.completed += 1;
            }
        }
    }

    /// [`Self::hold_rx_chains`] for rings that are not each inside one memory region:
    /// through virtio-queue, one avail-ring iterator for them all.
    fn hold_rx_chains_slow(&mut self, stats: &mut ProcessStats) {
        let mut have: usize = self.rx_chains.iter().map(|c| c.capacity).sum();
        let size = usize::from(self.rx.queue.size());
        let enough = |have: usize, held: usize, mrg: bool, want: usize| {
            (if mrg { have >= want } else { held > 0 }) || held >= size
        };
        let mut avail_idx = self.rx.queue.next_avail();
        let mut bad: Vec<u16> = Vec::new();
        // A broken queue is reported by the delivery that needs it.
        let Ok(mut chains) = self.rx.queue.iter(&self.mem) else {
            return;
        };
        for _ in 0..size {
            if enough(have, self.rx_chains.len(), self.mrg_rxbuf, self.rx_expect.bytes) {
                break;
            }
            let Some(chain) = chains.next() else {
                break;
            };
            let head = chain.head_index();
            match parse_rx_chain(&self.mem, chain, head, avail_idx, self.rx_spare.pop()) {
                Ok(c) => {
                    have += c.capacity;
                    self.rx_chains.push_back(c);
                }
                Err(e) => {
                    guest_warn!(self.log, head, error = %e, "virtio-net: returning malformed RX chain unused");
                    self.stats.rx_bad_chains += 1;
                    bad.push(head);
                }
            }
            avail_idx = avail_idx.wrapping_add(1);
        }
        for head in bad {
            if self.rx.add_used(&self.mem, &self.log, head, 0) {
                stats.completed += 1;
            }
        }
    }

    /// Fills `rx_iovs` for the next read: the header into `rx_buf`, the rest into the window's
    /// buffers (after the first chain's first VNET_HDR_LEN bytes, which get the header later)
    /// until they cover the expected frame, and what they do not cover into `rx_buf`. Returns
    /// the longest frame the guest buffers take whole (0 if there are none).
    fn build_rx_iovs(&mut self) -> usize {
        let window = self.rx_window();
        // Without MRG_RXBUF a frame goes in one chain: offer all of it (its descriptors are
        // the only iovecs there can be).
        let expect = if self.mrg_rxbuf {
            self.rx_expect.bytes.min(MAX_FRAME_LEN)
        } else {
            MAX_FRAME_LEN
        };
        let iovs = &mut self.rx_iovs.0;
        debug_assert!(iovs.is_empty() && self.rx_buf.len() >= MAX_FRAME_LEN);
        let buf = self.rx_buf.as_mut_ptr();
        iovs.push(libc::iovec {
            iov_base: buf.cast(),
            iov_len: VNET_HDR_LEN,
        });
        let mut covered = VNET_HDR_LEN;
        let mut skip = VNET_HDR_LEN;
        'chains: for chain in self.rx_chains.iter().take(window) {
            for seg in &chain.host {
                if skip >= seg.len {
                    skip -= seg.len;
                    continue;
                }
                // Keep one iovec for the rest of rx_buf.
                if covered >= expect || iovs.len() + 1 >= MAX_RX_IOVS {
                    break 'chains;
                }
                let len = (seg.len - skip).min(MAX_FRAME_LEN - covered);
                iovs.push(libc::iovec {
                    // The checked host address of the segment, plus skip < seg.len.
                    iov_base: (seg.addr + skip) as *mut libc::c_void,
                    iov_len: len,
                });
                covered += len;
                skip = 0;
            }
        }
        let in_place_limit = if iovs.len() > 1 { covered } else { 0 };
        if covered < MAX_FRAME_LEN {
            iovs.push(libc::iovec {
                // SAFETY: covered < MAX_FRAME_LEN <= rx_buf.len(): in bounds of rx_buf.
                iov_base: unsafe { buf.add(covered) }.cast(),
                iov_len: MAX_FRAME_LEN - covered,
            });
        }
        in_place_limit
    }

    /// Copies frame bytes `VNET_HDR_LEN..limit`, read into the window's buffers, to the same
    /// place in `rx_buf`. False if guest memory could not be read (logged).
    fn gather_held(&mut self, limit: usize) -> bool {
        let window = self.rx_window();
        let mut out = &mut self.rx_buf[VNET_HDR_LEN..limit];
        let mut skip = VNET_HDR_LEN;
        for chain in self.rx_chains.iter().take(window) {
            for &(addr, len) in &chain.bufs {
                let len = len as usize;
                if skip >= len {
                    skip -= len;
                    continue;
                }
                if out.is_empty() {
                    return true;
                }
                let n = (len - skip).min(out.len());
                // skip < len <= u32::MAX: the address was checked with the whole buffer.
                let at = GuestAddress(addr.0 + skip as u64);
                if let Err(e) = self.mem.read_slice(&mut out[..n], at) {
                    error!(error = %e, "virtio-net: RX read back from guest memory failed");
                    return false;
                }
                out = &mut out[n..];
                skip = 0;
            }
        }
        out.is_empty()
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
        let Some(count) = chains_for(self.rx_chains.iter().take(self.rx_window()), len) else {
            // Cannot happen: the frame was read into these chains.
            error!(len, "virtio-net: in-place RX frame larger than its chains, dropped");
            return Delivery::Dropped;
        };
        self.set_num_buffers(count);
        if let Some(first) = self.rx_chains.front() {
            if write_chain(&self.mem, first, &self.rx_buf[..VNET_HDR_LEN]) != VNET_HDR_LEN {
                // Logged by write_chain; the chains were checked, so this is not expected.
                return Delivery::Dropped;
            }
        }
        let mut left = len;
        self.complete_rx_chains(count, stats, |_, _, chain| {
            let written = chain.capacity.min(left);
            left -= written;
            written
        });
        Delivery::Delivered
    }

    /// Puts `rx_buf[..len]` in the guest by copying: one chain, or as many as needed with
    /// MRG_RXBUF.
    fn deliver_copy(&mut self, len: usize, stats: &mut ProcessStats) -> Delivery {
        if !self.accept_rx_header() {
            return self.drop_unacceptable_header();
        }
        let mut have: usize = self
            .rx_chains
            .iter()
            .take(self.rx_window())
            .map(|c| c.capacity)
            .sum();
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
        let Some(count) = chains_for(self.rx_chains.iter(), len) else {
            return Delivery::Dropped;
        };
        self.set_num_buffers(count);
        let mut off = 0usize;
        self.complete_rx_chains(count, stats, |mem, buf, chain| {
            let written = write_chain(mem, chain, &buf[off..len]);
            off += written;
            written
        });
        Delivery::Delivered
    }

    fn pop_rx_chain(&mut self, stats: &mut ProcessStats) -> Pop {
        let avail_idx = self.rx.queue.next_avail();
        let chain = match pop_chain(&mut self.rx.queue, &self.mem) {
            Ok(Some(c)) => c,
            Ok(None) => return Pop::Empty,
            Err(e) => {
                guest_warn!(self.log, error = %e, "virtio-net: RX queue is broken, not using it");
                return Pop::Broken;
            }
        };
        let head = chain.head_index();
        match parse_rx_chain(&self.mem, chain, head, avail_idx, self.rx_spare.pop()) {
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

    /// Returns the first `count` held chains to the guest, each with the bytes `fill` says it
    /// got (`fill` gets guest memory and `rx_buf` too, to write them), in one used-ring
    /// update, and keeps their vectors for the next chains popped (no allocation per frame).
    fn complete_rx_chains<F>(&mut self, count: usize, stats: &mut ProcessStats, mut fill: F)
    where
        F: FnMut(&GuestMemoryMmap, &[u8], &RxChain) -> usize,
    {
        let (mem, buf) = (&self.mem, &self.rx_buf);
        let (chains, spare) = (&mut self.rx_chains, &mut self.rx_spare);
        let used = (0..count).map_while(|_| chains.pop_front()).map(|chain| {
            let written = fill(mem, buf, &chain);
            let head = chain.head;
            if spare.len() < RX_SPARE_MAX {
                spare.push(chain);
            }
            // written <= capacity <= u32::MAX (checked by the chain iterator).
            (head, written as u32)
        });
        stats.completed += self.rx.add_used_batch(mem, &self.log, used);
    }

    /// Where a snapshot should resume the RX queue: at the oldest chain held but not used
    /// (its frame, if any, is lost; the chain is popped again after restore), else where
    /// the queue is. Invalid chains popped after it (only a hostile guest makes them) are
    /// then returned a second time.
    pub(crate) fn rx_resume_avail(&self) -> u16 {
        self.rx_chains
            .front()
            .map_or(self.rx.queue.next_avail(), |c| c.avail_idx)
    }
}

/// How many chains, from the first, a frame of `len` bytes fills; None if they are too few.
fn chains_for<'a>(chains: impl Iterator<Item = &'a RxChain>, len: usize) -> Option<usize> {
    let mut acc = 0usize;
    for (i, c) in chains.enumerate() {
        acc += c.capacity;
        if acc >= len {
            return Some(i + 1);
        }
    }
    None
}

/// Validates RX chain `head` (its descriptors, as virtio-queue's `DescriptorChain` or a
/// [`RingChain`] yields them): every descriptor device-writable and inside guest memory, room
/// for at least the vnet header (virtio 5.1.6.3.1). Notes the host address of every buffer,
/// in `spare`'s vectors if given (a used chain's).
fn parse_rx_chain(
    mem: &GuestMemoryMmap,
    chain: impl Iterator<Item = Descriptor>,
    head: u16,
    avail_idx: u16,
    spare: Option<RxChain>,
) -> Result<RxChain, ChainError> {
    let (mut bufs, mut host) = spare.map_or_else(Default::default, |c| (c.bufs, c.host));
    bufs.clear();
    host.clear();
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
        // Nearly always inside one memory region: one lookup. A buffer may straddle two
        // regions: then one piece per region. Without an error the pieces cover the whole
        // buffer (vm-memory's guarantee): no separate range check.
        if let Ok(slice) = GuestMemoryBackend::get_slice(mem, d.addr(), d.len() as usize) {
            host.push(HostSeg {
                addr: slice.ptr_guard_mut().as_ptr() as usize,
                len: slice.len(),
            });
        } else {
            let outside = |_| ChainError::OutsideMemory {
                addr: d.addr().0,
                len: d.len(),
            };
            for slice in GuestMemoryBackend::get_slices(mem, d.addr(), d.len() as usize) {
                let slice = slice.map_err(outside)?;
                host.push(HostSeg {
                    addr: slice.ptr_guard_mut().as_ptr() as usize,
                    len: slice.len(),
                });
            }
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
        avail_idx,
        bufs,
        host,
        capacity,
    })
}

/// Copies as much of `data` as fits into the chain, from its start; returns the bytes
/// written.
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
