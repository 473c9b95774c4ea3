//! RX chains: popped from the queue and validated ahead of the reads that fill them, held
//! ([`HeldChains`]) until a frame is delivered into them, then returned to the used ring.
//!
//! Chains are popped by reading the rings in place ([`SplitRing`]): one avail-index read per
//! batch, no region lookup per avail entry or descriptor. A buffer is looked for first in the
//! memory region of the buffer before ([`RegionHint`]), and the common chain (one
//! device-writable descriptor, as a Linux guest posts) is checked and held without the
//! general path's iterator. The chains a frame filled go back in one used-ring update
//! ([`DeviceQueue::add_used_batch`]).
//!
//! [`DeviceQueue::add_used_batch`]: crate::virtio::queue::DeviceQueue::add_used_batch

use std::collections::VecDeque;

use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::{
    Address, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, MemoryRegionAddress,
    VolatileSlice,
};

use super::super::{ChainError, NetHandler, ProcessStats};
use super::MAX_RX_IOVS;
use crate::guest_warn;
use crate::virtio::net::{MAX_FRAME_LEN, VNET_HDR_LEN};
use crate::virtio::pop_chain;
use crate::virtio::queue::SplitRing;

/// A validated RX chain: device-writable buffers, all inside guest memory. Its buffers are
/// in [`HeldChains`], after those of the chains held before it.
#[derive(Debug)]
pub(in crate::virtio::net::handler) struct RxChain {
    pub(super) head: u16,
    /// The avail-ring position it was popped from (a snapshot rewinds to the oldest held
    /// chain, so that the restored device pops it again).
    pub(super) avail_idx: u16,
    /// How many segments its buffers are (at most a queue's descriptors, each in at most
    /// a few regions).
    segs: u32,
    /// Bytes its buffers take (at most u32::MAX: the chain iterators stop before).
    capacity: u32,
}

impl RxChain {
    pub(super) fn capacity(&self) -> usize {
        self.capacity as usize
    }
}

/// A piece of a held chain's buffers inside one memory region (a buffer is one piece, or
/// one per region it crosses), checked when its chain was popped: its host address and
/// length, as the iovec a read takes.
fn seg(host: usize, len: usize) -> libc::iovec {
    libc::iovec {
        iov_base: host as *mut libc::c_void,
        iov_len: len,
    }
}

/// A held segment as a volatile slice (the guest may change it at any time).
fn seg_slice(s: &libc::iovec) -> VolatileSlice<'_> {
    // SAFETY: a held segment's range was checked to lie in one mapped region of guest memory
    // when its chain was popped (`parse_rx_chain`, `push_single`); the handler holding it also
    // holds that memory, which is never unmapped while it lives. The range is only ever
    // reached through volatile accesses and the kernel's readv, never a Rust reference.
    unsafe { VolatileSlice::new(s.iov_base.cast(), s.iov_len) }
}

/// The memory region of the last RX buffer checked: a batch's buffers are nearly always all
/// in one region, and a hit costs two comparisons instead of vm-memory's region search
/// (which was ~15% of microvm's own RX work).
#[derive(Clone, Copy, Debug)]
struct RegionHint {
    start: u64,
    len: u64,
    host: usize,
}

impl RegionHint {
    /// The region holding `addr`, if any.
    fn of(mem: &GuestMemoryMmap, addr: GuestAddress) -> Option<Self> {
        let region = mem.find_region(addr)?;
        let host = region.get_host_address(MemoryRegionAddress(0)).ok()?;
        Some(RegionHint {
            start: region.start_addr().raw_value(),
            len: region.len(),
            host: host as usize,
        })
    }

    /// The host address of the `len` bytes at `addr`, if they lie wholly in this region.
    fn host(&self, addr: GuestAddress, len: usize) -> Option<usize> {
        let off = addr.raw_value().checked_sub(self.start)?;
        let room = self.len.checked_sub(off)?;
        // off < region length <= usize::MAX (the region is mapped).
        (len as u64 <= room).then(|| self.host + off as usize)
    }
}

/// The RX chains popped but not used yet, oldest first, and their buffers' segments, kept
/// as the iovecs a read takes: a read's window is a slice of them, not a copy (the copy
/// and the pass it took were ~8% of microvm's own RX work). Segments of returned chains are
/// dropped from the front by moving `first`, and the vector is compacted once they are most
/// of it, so that holding and returning chains allocates nothing once it has grown.
#[derive(Default)]
pub(in crate::virtio::net::handler) struct HeldChains {
    chains: VecDeque<RxChain>,
    /// `segs[first..]`: the segments of every held chain, in chain order.
    segs: Vec<libc::iovec>,
    first: usize,
    /// Where the last buffer was (see [`RegionHint`]).
    hint: Option<RegionHint>,
    /// Bytes all held chains take.
    bytes: usize,
}

// SAFETY: `libc::iovec` holds a raw pointer, hence !Send. The pointers are host addresses of
// guest memory checked when their chain was popped; they are plain addresses, used only by
// the handler that holds them (for readv and volatile copies), and valid as long as that
// handler's guest memory lives, on whatever thread it runs.
unsafe impl Send for HeldChains {}

impl HeldChains {
    pub(super) fn len(&self) -> usize {
        self.chains.len()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.chains.is_empty()
    }

    /// Whether they can take `want` bytes of frames (without MRG_RXBUF, `mrg` false: a
    /// frame goes in one chain, so one), or are a queue (of `size`) worth.
    fn enough(&self, want: usize, mrg: bool, size: u16) -> bool {
        let held = self.chains.len();
        (if mrg { self.bytes >= want } else { held > 0 }) || held >= usize::from(size)
    }

    /// Bytes the first `n` chains take.
    pub(super) fn capacity(&self, n: usize) -> usize {
        if n >= self.chains.len() {
            self.bytes
        } else {
            self.chains.iter().take(n).map(RxChain::capacity).sum()
        }
    }

    /// How many chains, from the first of the first `n`, a frame of `len` bytes fills; None
    /// if they are too few.
    pub(super) fn needed_for(&self, n: usize, len: usize) -> Option<usize> {
        let mut acc = 0usize;
        for (i, c) in self.chains.iter().take(n).enumerate() {
            acc += c.capacity();
            if acc >= len {
                return Some(i + 1);
            }
        }
        None
    }

    /// The segments of the held chains, in order.
    fn held_segs(&self) -> &[libc::iovec] {
        &self.segs[self.first..]
    }

    /// How many segments the first `n` chains have.
    fn segs_of(&self, n: usize) -> usize {
        if n >= self.chains.len() {
            self.segs.len() - self.first
        } else {
            self.chains.iter().take(n).map(|c| c.segs as usize).sum()
        }
    }

    /// Reads through `read` into the first `n` chains' buffers, as many of them as cover
    /// `expect` bytes (at most `MAX_RX_IOVS - 1` segments), and into `spill` (at least
    /// MAX_FRAME_LEN bytes) after them for what they do not cover up to MAX_FRAME_LEN.
    /// `read` gets the iovecs; returns its result and how many bytes the guest buffers
    /// offered (the longest frame they take whole; 0 if there are none).
    pub(super) fn read_into<R>(
        &mut self,
        n: usize,
        expect: usize,
        spill: &mut [u8],
        read: impl FnOnce(&[libc::iovec]) -> R,
    ) -> (R, usize) {
        debug_assert!(spill.len() >= MAX_FRAME_LEN);
        let avail = self.segs_of(n).min(MAX_RX_IOVS - 1);
        let (mut k, mut covered) = (0usize, 0usize);
        for s in &self.held_segs()[..avail] {
            if covered >= expect {
                break;
            }
            covered += s.iov_len;
            k += 1;
        }
        if covered >= MAX_FRAME_LEN {
            return (read(&self.segs[self.first..self.first + k]), covered);
        }
        // What the guest buffers do not cover goes to `spill`: an iovec after the window's,
        // in the slot of the next held segment (put back after the read) or a new last one.
        let rest = seg(
            // covered < MAX_FRAME_LEN <= spill.len(): in bounds of `spill`.
            spill[covered..].as_mut_ptr() as usize,
            MAX_FRAME_LEN - covered,
        );
        let at = self.first + k;
        let result = if at < self.segs.len() {
            let kept = std::mem::replace(&mut self.segs[at], rest);
            let result = read(&self.segs[self.first..=at]);
            self.segs[at] = kept;
            result
        } else {
            self.segs.push(rest);
            let result = read(&self.segs[self.first..=at]);
            self.segs.pop();
            result
        };
        (result, covered)
    }

    /// Validates chain `head`, popped from avail position `avail_idx` (its descriptors, as
    /// virtio-queue's `DescriptorChain` or a `RingChain` yields them), and holds it after the
    /// others: every descriptor device-writable and inside guest memory, room for at least
    /// the vnet header (virtio 5.1.6.3.1). Returns its capacity.
    fn push(
        &mut self,
        mem: &GuestMemoryMmap,
        chain: impl Iterator<Item = Descriptor>,
        head: u16,
        avail_idx: u16,
    ) -> Result<usize, ChainError> {
        let mark = self.segs.len();
        match parse_rx_chain(mem, chain, &mut self.segs, &mut self.hint) {
            Ok(capacity) => {
                self.hold(head, avail_idx, self.segs.len() - mark, capacity);
                Ok(capacity)
            }
            Err(e) => {
                self.segs.truncate(mark);
                Err(e)
            }
        }
    }

    /// [`Self::push`] for the common chain, one device-writable descriptor with room for a
    /// vnet header, inside the region of the buffer before: checked and held with no
    /// iterator or error path. False (nothing held) for any other: [`Self::push`] decides.
    fn push_single(&mut self, d: Descriptor, head: u16, avail_idx: u16) -> bool {
        let len = d.len() as usize;
        if d.flags() != VRING_DESC_F_WRITE as u16 || len < VNET_HDR_LEN {
            return false;
        }
        let Some(host) = self.hint.and_then(|h| h.host(d.addr(), len)) else {
            return false;
        };
        self.segs.push(seg(host, len));
        self.hold(head, avail_idx, 1, len);
        true
    }

    /// Holds chain `head` after the others, its `segs` segments just pushed.
    fn hold(&mut self, head: u16, avail_idx: u16, segs: usize, capacity: usize) {
        self.chains.push_back(RxChain {
            head,
            avail_idx,
            // Both fit (see RxChain).
            segs: segs as u32,
            capacity: capacity as u32,
        });
        self.bytes += capacity;
    }

    /// The oldest chain, no longer held.
    pub(super) fn pop_front(&mut self) -> Option<RxChain> {
        let c = self.chains.pop_front()?;
        self.bytes -= c.capacity();
        self.drop_segs(c.segs as usize);
        Some(c)
    }

    /// Drops the first `n` held segments (their chains were returned).
    fn drop_segs(&mut self, n: usize) {
        self.first += n;
        debug_assert!(self.first <= self.segs.len());
        if self.first >= self.segs.len() {
            self.segs.clear();
            self.first = 0;
        } else if self.first >= 64 && self.first * 2 >= self.segs.len() {
            // Compaction moves at most as many as it drops: amortized O(1) per segment.
            self.segs.drain(..self.first);
            self.first = 0;
        }
    }

    /// Copies as much of `data` as fits into the oldest chain, from its start; returns the
    /// bytes written.
    pub(super) fn write_front(&self, data: &[u8]) -> usize {
        let Some(chain) = self.chains.front() else {
            return 0;
        };
        let mut off = 0usize;
        for s in self.held_segs().iter().take(chain.segs as usize) {
            if off == data.len() {
                break;
            }
            let n = s.iov_len.min(data.len() - off);
            seg_slice(s).copy_from(&data[off..off + n]);
            off += n;
        }
        off
    }

    /// Reads the first `out.len()` bytes of the first `n` chains' buffers into `out`. False
    /// if they hold fewer.
    pub(super) fn read(&self, n: usize, mut out: &mut [u8]) -> bool {
        for s in self.held_segs().iter().take(self.segs_of(n)) {
            if out.is_empty() {
                break;
            }
            let len = s.iov_len.min(out.len());
            seg_slice(s).copy_to(&mut out[..len]);
            out = &mut out[len..];
        }
        out.is_empty()
    }
}

/// Outcome of popping one RX chain.
pub(super) enum Pop {
    /// Held, with this capacity.
    Held(usize),
    /// A malformed chain was returned to the guest unused.
    Invalid,
    Empty,
    Broken,
}

/// Frames' worth of chains (of the window's size) popped at a time, once popping at all.
pub(in crate::virtio::net::handler) const HOLD_AHEAD: usize = 8;

impl NetHandler {
    /// Pops chains when the window cannot take the expected frame: then until it can take
    /// [`HOLD_AHEAD`] of them, the queue has no more, or a queue's worth was popped (a guest
    /// reposting invalid chains cannot keep us here). The avail index is read once for them
    /// all, and the rings are read in place ([`SplitRing`]); malformed chains are returned to
    /// the guest after the others.
    pub(super) fn hold_rx_chains(&mut self, stats: &mut ProcessStats) {
        let (mrg, size) = (self.mrg_rxbuf, self.rx.queue.size());
        if self.rx_held.enough(self.rx_expect.bytes, mrg, size) {
            return;
        }
        // Popping anyway: pop for the next frames too, so that one ring setup and avail-index
        // read serve several frames (about 1% of a 64 KiB frame's RX cost, measured with the
        // benchmark's interleaved TCP case).
        let want = self.rx_expect.bytes.saturating_mul(HOLD_AHEAD);
        let mem = &self.mem;
        let Ok(ring) = SplitRing::new(&self.rx.queue, mem) else {
            return self.hold_rx_chains_slow(want, stats);
        };
        let start = self.rx.queue.next_avail();
        // A broken queue (avail index unreadable, or more than a queue's worth ahead, as
        // virtio-queue checks) is reported by the delivery that needs it.
        let Ok(avail) = ring.avail_idx(start) else {
            return;
        };
        // Malformed chains met on the way (only a hostile guest posts them: no allocation
        // otherwise).
        let mut bad: Vec<u16> = Vec::new();
        let mut pos = start;
        while pos != avail && !self.rx_held.enough(want, mrg, size) {
            let Ok(mut head) = ring.avail_head(pos) else {
                break;
            };
            // A Linux guest's mergeable buffers: one device-writable descriptor each.
            if ring.desc(head).is_ok_and(|d| self.rx_held.push_single(d, head, pos)) {
                pos = pos.wrapping_add(1);
                continue;
            }
            let mut descs = ring.chain(head);
            let mut held = self.rx_held.push(mem, &mut descs, head, pos);
            if descs.indirect() {
                // Not offered, but virtio-queue follows indirect tables: let it.
                self.rx.queue.set_next_avail(pos);
                match pop_chain(&mut self.rx.queue, mem) {
                    Ok(Some(chain)) => {
                        head = chain.head_index();
                        held = self.rx_held.push(mem, chain, head, pos);
                    }
                    _ => break,
                }
            }
            if let Err(e) = held {
                guest_warn!(self.log, head, error = %e, "virtio-net: returning malformed RX chain unused");
                self.stats.rx_bad_chains += 1;
                bad.push(head);
            }
            pos = pos.wrapping_add(1);
        }
        self.rx.queue.set_next_avail(pos);
        self.return_unused(bad, stats);
    }

    /// [`Self::hold_rx_chains`] for rings that are not each inside one memory region:
    /// through virtio-queue, one avail-ring iterator for them all.
    fn hold_rx_chains_slow(&mut self, want: usize, stats: &mut ProcessStats) {
        let (mrg, size) = (self.mrg_rxbuf, self.rx.queue.size());
        let mut avail_idx = self.rx.queue.next_avail();
        let mut bad: Vec<u16> = Vec::new();
        // A broken queue is reported by the delivery that needs it.
        let Ok(mut chains) = self.rx.queue.iter(&self.mem) else {
            return;
        };
        for _ in 0..size {
            if self.rx_held.enough(want, mrg, size) {
                break;
            }
            let Some(chain) = chains.next() else {
                break;
            };
            let head = chain.head_index();
            if let Err(e) = self.rx_held.push(&self.mem, chain, head, avail_idx) {
                guest_warn!(self.log, head, error = %e, "virtio-net: returning malformed RX chain unused");
                self.stats.rx_bad_chains += 1;
                bad.push(head);
            }
            avail_idx = avail_idx.wrapping_add(1);
        }
        self.return_unused(bad, stats);
    }

    /// Pops one chain (through virtio-queue: the copy path, one chain at a time) and holds it.
    pub(super) fn pop_rx_chain(&mut self, stats: &mut ProcessStats) -> Pop {
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
        match self.rx_held.push(&self.mem, chain, head, avail_idx) {
            Ok(capacity) => Pop::Held(capacity),
            Err(e) => {
                guest_warn!(self.log, head, error = %e, "virtio-net: returning malformed RX chain unused");
                self.stats.rx_bad_chains += 1;
                self.return_unused([head], stats);
                Pop::Invalid
            }
        }
    }

    /// Returns malformed chains to the guest unused (nothing written).
    fn return_unused(&mut self, heads: impl IntoIterator<Item = u16>, stats: &mut ProcessStats) {
        for head in heads {
            if self.rx.add_used(&self.mem, &self.log, head, 0) {
                stats.completed += 1;
            }
        }
    }

    /// Returns the first `count` held chains to the guest, each with the bytes `fill` says
    /// the oldest held chain got (`fill` gets `rx_buf` too, to write them),
    /// in one used-ring update.
    pub(super) fn complete_rx_chains<F>(&mut self, count: usize, stats: &mut ProcessStats, mut fill: F)
    where
        F: FnMut(&[u8], &HeldChains) -> usize,
    {
        let (mem, buf, held) = (&self.mem, &self.rx_buf, &mut self.rx_held);
        let used = (0..count).map_while(|_| {
            let written = fill(buf, held);
            let chain = held.pop_front()?;
            // written <= capacity <= u32::MAX (checked by the chain iterator).
            Some((chain.head, written as u32))
        });
        stats.completed += self.rx.add_used_batch(mem, &self.log, used);
    }

    /// Returns the first `count` held chains to the guest, filled in order by a frame of
    /// `len` bytes read into them, in one used-ring update.
    pub(super) fn complete_rx_in_place(&mut self, count: usize, len: usize, stats: &mut ProcessStats) {
        let held = &mut self.rx_held;
        let mut left = len;
        let used = (0..count).map_while(|_| {
            let chain = held.pop_front()?;
            let written = chain.capacity().min(left);
            left -= written;
            // written <= capacity <= u32::MAX.
            Some((chain.head, written as u32))
        });
        stats.completed += self.rx.add_used_batch(&self.mem, &self.log, used);
    }

    /// Where a snapshot should resume the RX queue: at the oldest chain held but not used
    /// (its frame, if any, is lost; the chain is popped again after restore), else where
    /// the queue is. Invalid chains popped after it (only a hostile guest makes them) are
    /// then returned a second time.
    pub(crate) fn rx_resume_avail(&self) -> u16 {
        self.rx_held
            .chains
            .front()
            .map_or(self.rx.queue.next_avail(), |c| c.avail_idx)
    }
}

/// Checks the descriptors of an RX chain (see [`HeldChains::push`]) and appends its buffers
/// to `segs`; returns its capacity. On error, `segs` may have some of them appended.
fn parse_rx_chain(
    mem: &GuestMemoryMmap,
    chain: impl Iterator<Item = Descriptor>,
    segs: &mut Vec<libc::iovec>,
    hint: &mut Option<RegionHint>,
) -> Result<usize, ChainError> {
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
        let (addr, len) = (d.addr(), d.len() as usize);
        // Nearly always inside the region of the buffer before. A buffer may straddle two
        // regions: then one piece per region. Without an error the pieces cover the whole
        // buffer (vm-memory's guarantee): no separate range check.
        let mut host = hint.and_then(|h| h.host(addr, len));
        if host.is_none() {
            *hint = RegionHint::of(mem, addr);
            host = hint.and_then(|h| h.host(addr, len));
        }
        if let Some(host) = host {
            segs.push(seg(host, len));
        } else {
            for slice in GuestMemoryBackend::get_slices(mem, addr, len) {
                let slice = slice.map_err(|_| ChainError::OutsideMemory {
                    addr: addr.0,
                    len: d.len(),
                })?;
                segs.push(seg(slice.ptr_guard_mut().as_ptr() as usize, slice.len()));
            }
        }
        capacity += len;
    }
    if cut {
        return Err(ChainError::Broken);
    }
    if capacity < VNET_HDR_LEN {
        return Err(ChainError::TooShort(capacity));
    }
    Ok(capacity)
}
