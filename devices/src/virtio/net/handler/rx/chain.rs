//! RX chains: popped from the queue and validated ahead of the reads that fill them, held
//! ([`HeldChains`]) until a frame is delivered into them, then returned to the used ring.
//!
//! Chains are popped by reading the rings in place ([`SplitRing`]): one avail-index read per
//! batch, no region lookup per avail entry or descriptor. The chains a frame filled go back
//! in one used-ring update ([`DeviceQueue::add_used_batch`]).
//!
//! [`DeviceQueue::add_used_batch`]: crate::virtio::queue::DeviceQueue::add_used_batch

use std::collections::VecDeque;

use tracing::error;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::super::{ChainError, NetHandler, ProcessStats};
use crate::guest_warn;
use crate::virtio::net::VNET_HDR_LEN;
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
    /// How many segments its buffers are.
    segs: usize,
    /// Bytes its buffers take.
    pub(super) capacity: usize,
}

/// A piece of a held chain's buffers inside one memory region (a buffer is one piece, or
/// one per region it crosses), checked when its chain was popped: guest address for checked
/// accesses, host address for `readv`.
#[derive(Clone, Copy, Debug)]
struct RxSeg {
    addr: GuestAddress,
    host: usize,
    len: usize,
}

/// The RX chains popped but not used yet, oldest first, and their buffers. Two queues for
/// all of them, so that holding and returning a chain allocates nothing once they have
/// grown.
#[derive(Debug, Default)]
pub(in crate::virtio::net::handler) struct HeldChains {
    chains: VecDeque<RxChain>,
    /// The segments of every held chain, in chain order.
    segs: VecDeque<RxSeg>,
}

impl HeldChains {
    pub(super) fn len(&self) -> usize {
        self.chains.len()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.chains.is_empty()
    }

    /// Bytes the first `n` chains take.
    pub(super) fn capacity(&self, n: usize) -> usize {
        self.chains.iter().take(n).map(|c| c.capacity).sum()
    }

    /// How many chains, from the first of the first `n`, a frame of `len` bytes fills; None
    /// if they are too few.
    pub(super) fn needed_for(&self, n: usize, len: usize) -> Option<usize> {
        let mut acc = 0usize;
        for (i, c) in self.chains.iter().take(n).enumerate() {
            acc += c.capacity;
            if acc >= len {
                return Some(i + 1);
            }
        }
        None
    }

    /// The buffers of the first `n` chains, in order, as (host address, length).
    pub(super) fn host_segs(&self, n: usize) -> impl Iterator<Item = (usize, usize)> + '_ {
        let segs = self.chains.iter().take(n).map(|c| c.segs).sum();
        self.segs.iter().take(segs).map(|s| (s.host, s.len))
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
        match parse_rx_chain(mem, chain, &mut self.segs) {
            Ok(capacity) => {
                self.chains.push_back(RxChain {
                    head,
                    avail_idx,
                    segs: self.segs.len() - mark,
                    capacity,
                });
                Ok(capacity)
            }
            Err(e) => {
                self.segs.truncate(mark);
                Err(e)
            }
        }
    }

    /// The oldest chain, no longer held.
    pub(super) fn pop_front(&mut self) -> Option<RxChain> {
        let c = self.chains.pop_front()?;
        self.segs.drain(..c.segs);
        Some(c)
    }

    /// Copies as much of `data` as fits into the oldest chain, from its start; returns the
    /// bytes written.
    pub(super) fn write_front(&self, mem: &GuestMemoryMmap, data: &[u8]) -> usize {
        let Some(chain) = self.chains.front() else {
            return 0;
        };
        let mut off = 0usize;
        for s in self.segs.iter().take(chain.segs) {
            if off == data.len() {
                break;
            }
            let n = s.len.min(data.len() - off);
            // Checked against guest memory when the chain was popped.
            if let Err(e) = mem.write_slice(&data[off..off + n], s.addr) {
                error!(head = chain.head, error = %e, "virtio-net: RX write to guest memory failed");
                break;
            }
            off += n;
        }
        off
    }

    /// Reads the bytes at `skip..skip + out.len()` of the first `n` chains' buffers into
    /// `out`. False if they hold fewer, or guest memory could not be read (logged).
    pub(super) fn read(&self, mem: &GuestMemoryMmap, n: usize, mut skip: usize, mut out: &mut [u8]) -> bool {
        let segs = self.chains.iter().take(n).map(|c| c.segs).sum();
        for s in self.segs.iter().take(segs) {
            if out.is_empty() {
                break;
            }
            if skip >= s.len {
                skip -= s.len;
                continue;
            }
            let len = (s.len - skip).min(out.len());
            // skip < s.len: inside the segment, which was checked.
            let at = GuestAddress(s.addr.0 + skip as u64);
            if let Err(e) = mem.read_slice(&mut out[..len], at) {
                error!(error = %e, "virtio-net: RX read back from guest memory failed");
                return false;
            }
            out = &mut out[len..];
            skip = 0;
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

impl NetHandler {
    /// Pops chains until the window can take the expected frame, the queue has no more, or
    /// a queue's worth was popped (a guest reposting invalid chains cannot keep us here).
    /// The avail index is read once for them all, and the rings are read in place
    /// ([`SplitRing`]); malformed chains are returned to the guest after the others.
    pub(super) fn hold_rx_chains(&mut self, stats: &mut ProcessStats) {
        let mut have = self.rx_held.capacity(usize::MAX);
        let size = self.rx.queue.size();
        let mrg = self.mrg_rxbuf;
        let want = self.rx_expect.bytes;
        let enough = |have: usize, held: usize| {
            (if mrg { have >= want } else { held > 0 }) || held >= usize::from(size)
        };
        if enough(have, self.rx_held.len()) {
            return;
        }
        let mem = &self.mem;
        let Ok(ring) = SplitRing::new(&self.rx.queue, mem) else {
            return self.hold_rx_chains_slow(have, stats);
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
        while pos != avail && !enough(have, self.rx_held.len()) {
            let Ok(mut head) = ring.avail_head(pos) else {
                break;
            };
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
            match held {
                Ok(capacity) => have += capacity,
                Err(e) => {
                    guest_warn!(self.log, head, error = %e, "virtio-net: returning malformed RX chain unused");
                    self.stats.rx_bad_chains += 1;
                    bad.push(head);
                }
            }
            pos = pos.wrapping_add(1);
        }
        self.rx.queue.set_next_avail(pos);
        self.return_unused(bad, stats);
    }

    /// [`Self::hold_rx_chains`] for rings that are not each inside one memory region:
    /// through virtio-queue, one avail-ring iterator for them all.
    fn hold_rx_chains_slow(&mut self, mut have: usize, stats: &mut ProcessStats) {
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
            if enough(have, self.rx_held.len(), self.mrg_rxbuf, self.rx_expect.bytes) {
                break;
            }
            let Some(chain) = chains.next() else {
                break;
            };
            let head = chain.head_index();
            match self.rx_held.push(&self.mem, chain, head, avail_idx) {
                Ok(capacity) => have += capacity,
                Err(e) => {
                    guest_warn!(self.log, head, error = %e, "virtio-net: returning malformed RX chain unused");
                    self.stats.rx_bad_chains += 1;
                    bad.push(head);
                }
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
    /// the oldest held chain got (`fill` gets guest memory and `rx_buf` too, to write them),
    /// in one used-ring update.
    pub(super) fn complete_rx_chains<F>(&mut self, count: usize, stats: &mut ProcessStats, mut fill: F)
    where
        F: FnMut(&GuestMemoryMmap, &[u8], &HeldChains) -> usize,
    {
        let (mem, buf, held) = (&self.mem, &self.rx_buf, &mut self.rx_held);
        let used = (0..count).map_while(|_| {
            let written = fill(mem, buf, held);
            let chain = held.pop_front()?;
            // written <= capacity <= u32::MAX (checked by the chain iterator).
            Some((chain.head, written as u32))
        });
        stats.completed += self.rx.add_used_batch(mem, &self.log, used);
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
    segs: &mut VecDeque<RxSeg>,
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
        // Nearly always inside one memory region: one lookup. A buffer may straddle two
        // regions: then one piece per region. Without an error the pieces cover the whole
        // buffer (vm-memory's guarantee): no separate range check.
        if let Ok(slice) = GuestMemoryBackend::get_slice(mem, addr, len) {
            segs.push_back(RxSeg {
                addr,
                host: slice.ptr_guard_mut().as_ptr() as usize,
                len,
            });
        } else {
            let mut at = addr;
            for slice in GuestMemoryBackend::get_slices(mem, addr, len) {
                let slice = slice.map_err(|_| ChainError::OutsideMemory {
                    addr: addr.0,
                    len: d.len(),
                })?;
                segs.push_back(RxSeg {
                    addr: at,
                    host: slice.ptr_guard_mut().as_ptr() as usize,
                    len: slice.len(),
                });
                // The next piece (unused after the last, which may end at 2^64).
                at = GuestAddress(at.0.wrapping_add(slice.len() as u64));
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
