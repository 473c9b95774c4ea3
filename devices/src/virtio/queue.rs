//! The queue side every virtio device shares: one [`DeviceQueue`] per virtqueue holds the
//! queue and its notification eventfd, and runs the notify loop.
//!
//! [`DeviceQueue::process`] pops chains and hands each to the device's closure, which says
//! what became of it ([`Step`]). Around that it does what every device must get right:
//! * notification suppression: notifications are off while chains are processed, and turned
//!   back on (with EVENT_IDX: `avail_event` updated) only when the queue looks empty; chains
//!   published in between are picked up by looking again;
//! * a per-wakeup budget: at most `budget` chains per call. When it is spent the queue kicks its
//!   own eventfd, so the event loop serves its other fds (other devices, SIGTERM) before coming
//!   back. A guest recycling cheap requests cannot keep the loop to itself;
//! * returning chains to the used ring and raising the used-ring interrupt (once per call, if
//!   the driver wants it: `needs_notification` honours EVENT_IDX's `used_event`);
//! * a broken queue (e.g. avail.idx moved more than a queue size ahead) stops processing with
//!   one rate-limited warning.
//!
//! The rings are read and written in place through the queue's [`SplitRing`] (`ring.rs`): one
//! ring setup per call instead of a region lookup per avail entry, descriptor and used
//! element, which was ~25% of virtio-blk's own work on 4 KiB requests. A chain holding an
//! indirect descriptor, and rings not each inside one region, go through virtio-queue
//! instead; the device sees the same [`Chain`] either way.
//!
//! A device may also return many chains at once ([`DeviceQueue::add_used_batch`]: one used
//! index update), and read the rings itself through a [`SplitRing`].

mod ring;
#[cfg(test)]
mod tests;

use std::io;
use std::num::Wrapping;
use std::sync::atomic::{fence, Ordering};

use tracing::error;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

pub use ring::{RingChain, RingError, SplitRing};
use ring::{used_elem, USED_ELEM};

use super::{pop_chain, IrqKind, IrqTrigger};
use crate::guest_log::GuestLog;
use crate::guest_warn;

/// Used elements written to the ring at a time by [`DeviceQueue::add_used_batch`] (a 64 KiB
/// frame in 4 KiB buffers returns 17).
const USED_CHUNK: usize = 32;

/// Chains handled per queue wakeup by default.
pub const DEFAULT_BUDGET: usize = 64;

/// A chain [`DeviceQueue::process`] hands its device: the descriptors, in order, and the
/// head to return it by. Read in place through the queue's [`SplitRing`] (the common case:
/// no region lookup per avail entry or descriptor), or through virtio-queue where that
/// cannot be done (an indirect table in the chain, rings not each inside one region).
/// Either way it yields what virtio-queue's `DescriptorChain` yields (the queue tests check
/// both).
pub enum Chain<'r, 'm> {
    /// Read in place; checked beforehand to hold no indirect descriptor.
    Ring {
        /// Its head descriptor's index.
        head: u16,
        /// Its descriptors.
        descs: RingChain<'r, 'm>,
    },
    /// Through virtio-queue.
    Queue(DescriptorChain<&'m GuestMemoryMmap>),
}

impl Chain<'_, '_> {
    /// The index of its head descriptor (what the used ring returns).
    pub fn head_index(&self) -> u16 {
        match self {
            Chain::Ring { head, .. } => *head,
            Chain::Queue(c) => c.head_index(),
        }
    }
}

impl Iterator for Chain<'_, '_> {
    type Item = Descriptor;

    fn next(&mut self) -> Option<Descriptor> {
        match self {
            Chain::Ring { descs, .. } => descs.next(),
            Chain::Queue(c) => c.next(),
        }
    }
}

/// What the device did with one chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Finished: return it to the used ring with this many bytes written to it.
    Used(u32),
    /// Cannot be handled now (rate limiter out of tokens, backend full): put it back and stop
    /// until the device's own event (timer, backend writable) calls `process` again.
    PutBack,
    /// The device keeps it (to finish later with [`DeviceQueue::add_used`]): stop.
    Hold,
}

/// Why [`DeviceQueue::process`] returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    /// No more chains; notifications are on again.
    Empty,
    /// The budget was spent; the queue's eventfd was kicked to come back.
    Budget,
    /// The device returned [`Step::PutBack`] or [`Step::Hold`].
    Blocked,
    /// The queue is unusable until the driver resets the device.
    Broken,
}

/// What one call to [`DeviceQueue::process`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pass {
    /// Chains put in the used ring.
    pub completed: usize,
    /// Why it stopped.
    pub stop: Stop,
}

/// One virtqueue of an activated device and its notification eventfd.
#[derive(Debug)]
pub struct DeviceQueue {
    /// The queue, as configured by the driver.
    pub queue: Queue,
    /// The queue's notification eventfd (a KVM ioeventfd).
    pub evt: EventFd,
    budget: usize,
    /// For logs, e.g. "virtio-blk request queue".
    name: &'static str,
    /// Chains put in the used ring since the last [`Self::signal_used`] (EVENT_IDX). Kept
    /// here, not by `Queue` (whose count is private), so that a batch can count as many.
    num_added: Wrapping<u16>,
}

impl DeviceQueue {
    /// A queue handling at most `budget` (at least 1) chains per call to [`Self::process`].
    pub fn new(queue: Queue, evt: EventFd, budget: usize, name: &'static str) -> Self {
        DeviceQueue {
            queue,
            evt,
            budget: budget.max(1),
            name,
            num_added: Wrapping(0),
        }
    }

    /// Where the device is in the queue (for a snapshot).
    pub fn position(&self) -> super::snapshot::QueuePosition {
        super::snapshot::QueuePosition {
            next_avail: self.queue.next_avail(),
            next_used: self.queue.next_used(),
        }
    }

    /// Resets the eventfd's counter (call first when it fires, so kicks arriving during
    /// processing fire again). EAGAIN only means it was already reset.
    pub fn drain_evt(&self) {
        if let Err(e) = self.evt.read() {
            if e.kind() != io::ErrorKind::WouldBlock {
                error!(error = %e, "{}: cannot read the eventfd", self.name);
            }
        }
    }

    /// Kicks the queue's own eventfd, so the event loop calls the device again.
    pub fn kick_self(&self) {
        if let Err(e) = self.evt.write(1) {
            error!(error = %e, "{}: cannot re-kick the queue", self.name);
        }
    }

    /// Runs available chains through `f` (see the module documentation) and signals the used
    /// ring if anything was completed.
    pub fn process<F>(
        &mut self,
        mem: &GuestMemoryMmap,
        irq: &IrqTrigger,
        log: &GuestLog,
        mut f: F,
    ) -> Pass
    where
        F: FnMut(Chain<'_, '_>) -> Step,
    {
        let mut completed = 0usize;
        let mut budget = self.budget;
        // Rings across regions (or not ready): every chain through virtio-queue.
        let ring = SplitRing::new(&self.queue, mem).ok();
        let stop = 'pass: loop {
            if let Err(e) = self.queue.disable_notification(mem) {
                guest_warn!(log, error = %e, "{}: cannot disable notifications", self.name);
            }
            loop {
                if budget == 0 {
                    self.kick_self();
                    break 'pass Stop::Budget;
                }
                let chain = match self.pop(ring.as_ref(), mem) {
                    Ok(Some(c)) => c,
                    Ok(None) => break,
                    Err(e) => {
                        guest_warn!(log, error = %e, "{}: queue is broken, not processing it", self.name);
                        break 'pass Stop::Broken;
                    }
                };
                budget -= 1;
                let head = chain.head_index();
                match f(chain) {
                    Step::Used(len) => {
                        completed += self.add_used_via(ring.as_ref(), mem, log, [(head, len)]);
                    }
                    Step::PutBack => {
                        self.queue.go_to_previous_position();
                        break 'pass Stop::Blocked;
                    }
                    Step::Hold => break 'pass Stop::Blocked,
                }
            }
            match self.queue.enable_notification(mem) {
                // More chains arrived while notifications were off: go again.
                Ok(true) => continue,
                Ok(false) => break Stop::Empty,
                Err(e) => {
                    guest_warn!(log, error = %e, "{}: cannot enable notifications", self.name);
                    break Stop::Empty;
                }
            }
        };
        if completed > 0 {
            self.signal_used(mem, irq, log);
        }
        Pass { completed, stop }
    }

    /// The next available chain (see [`Chain`]): read in place through `ring` if given and
    /// the chain has no indirect descriptor, else through virtio-queue. `Err` if the queue is
    /// broken (avail index more than a queue's worth ahead, or unreadable), as virtio-queue
    /// says.
    fn pop<'r, 'm>(
        &mut self,
        ring: Option<&'r SplitRing<'m>>,
        mem: &'m GuestMemoryMmap,
    ) -> Result<Option<Chain<'r, 'm>>, virtio_queue::Error> {
        let Some(ring) = ring else {
            return Ok(pop_chain(&mut self.queue, mem)?.map(Chain::Queue));
        };
        let pos = self.queue.next_avail();
        // The same checks as virtio-queue's `iter`: one avail-index read per chain, as there.
        let avail = ring.avail_idx(pos).map_err(|_| virtio_queue::Error::InvalidAvailRingIndex)?;
        if avail == pos {
            return Ok(None);
        }
        let head = ring.avail_head(pos).map_err(|_| virtio_queue::Error::InvalidAvailRingIndex)?;
        // An indirect table (not offered, but virtio-queue follows one): that chain through
        // virtio-queue. The walk reads a few descriptors the device reads again, from cache.
        let mut walk = ring.chain(head);
        walk.by_ref().for_each(drop);
        if walk.indirect() {
            return Ok(pop_chain(&mut self.queue, mem)?.map(Chain::Queue));
        }
        self.queue.set_next_avail(pos.wrapping_add(1));
        Ok(Some(Chain::Ring { head, descs: ring.chain(head) }))
    }

    /// Puts chain `head` in the used ring with `len` bytes written. False (logged) if the used
    /// ring cannot be written.
    pub fn add_used(&mut self, mem: &GuestMemoryMmap, log: &GuestLog, head: u16, len: u32) -> bool {
        match self.queue.add_used(mem, head, len) {
            Ok(()) => {
                self.num_added += 1;
                true
            }
            Err(e) => {
                guest_warn!(log, head, error = %e, "{}: cannot return a chain to the used ring", self.name);
                false
            }
        }
    }

    /// Puts each `(head, len)` of `used` in the used ring, in order, and then moves the used
    /// index past them all at once (one release store: the driver sees the whole batch or
    /// none of it). Returns how many were put; a head beyond the queue is skipped (logged),
    /// as [`Self::add_used`] refuses it. At most a queue's worth: the driver gave no more.
    pub fn add_used_batch<I>(&mut self, mem: &GuestMemoryMmap, log: &GuestLog, used: I) -> usize
    where
        I: IntoIterator<Item = (u16, u32)>,
    {
        let ring = SplitRing::new(&self.queue, mem).ok();
        self.add_used_via(ring.as_ref(), mem, log, used)
    }

    /// [`Self::add_used_batch`] through the queue's `ring`, or without one (rings across
    /// regions) one at a time through virtio-queue.
    fn add_used_via<I>(
        &mut self,
        ring: Option<&SplitRing<'_>>,
        mem: &GuestMemoryMmap,
        log: &GuestLog,
        used: I,
    ) -> usize
    where
        I: IntoIterator<Item = (u16, u32)>,
    {
        match ring {
            Some(ring) => self.add_used_batch_in(ring, log, used),
            None => used
                .into_iter()
                .filter(|&(head, len)| self.add_used(mem, log, head, len))
                .count(),
        }
    }

    /// [`Self::add_used_batch`] through the queue's `ring`.
    fn add_used_batch_in<I>(&mut self, ring: &SplitRing<'_>, log: &GuestLog, used: I) -> usize
    where
        I: IntoIterator<Item = (u16, u32)>,
    {
        let start = Wrapping(self.queue.next_used());
        let mut next = start;
        // Elements go to the ring a chunk at a time (one bounds check each), the chunk ending
        // at `next`.
        let mut chunk = [[0u8; USED_ELEM]; USED_CHUNK];
        let mut n = 0usize;
        let name = self.name;
        let flush = |next: Wrapping<u16>, elems: &[[u8; USED_ELEM]]| {
            let at = next - Wrapping(elems.len() as u16);
            ring.write_used(at.0, elems)
                // Cannot happen (the ring was checked): the chains stay unreturned.
                .map_err(|e| guest_warn!(log, error = %e, "{name}: cannot return chains to the used ring"))
                .is_ok()
        };
        for (head, len) in used {
            if head >= ring.size() {
                guest_warn!(log, head, "{}: cannot return a chain beyond the queue", self.name);
                continue;
            }
            chunk[n] = used_elem(head, len);
            n += 1;
            next += 1;
            if n == USED_CHUNK {
                if !flush(next, &chunk) {
                    return 0;
                }
                n = 0;
            }
            if next - start == Wrapping(ring.size()) {
                // A queue's worth: the driver gave no more.
                break;
            }
        }
        if n > 0 && !flush(next, &chunk[..n]) {
            return 0;
        }
        if next == start {
            return 0;
        }
        if let Err(e) = ring.publish_used(next.0) {
            // Cannot happen (the ring was checked): the chains stay unreturned.
            guest_warn!(log, error = %e, "{}: cannot update the used index", self.name);
            return 0;
        }
        self.queue.set_next_used(next.0);
        let added = next - start;
        self.num_added += added;
        usize::from(added.0)
    }

    /// Raises the used-ring interrupt if the driver wants it (with EVENT_IDX: if `used_event`
    /// is among the chains returned since the last call); if that cannot be read, interrupts
    /// anyway. (virtio-queue ignores `VRING_AVAIL_F_NO_INTERRUPT`, and so does this.)
    pub fn signal_used(&mut self, mem: &GuestMemoryMmap, irq: &IrqTrigger, log: &GuestLog) {
        let needed = match self.needs_notification(mem) {
            Ok(n) => n,
            Err(e) => {
                guest_warn!(log, error = %e, "{}: cannot read used_event, interrupting", self.name);
                true
            }
        };
        if needed {
            if let Err(e) = irq.trigger(IrqKind::Vring) {
                error!(error = %e, "{}: cannot signal the used ring", self.name);
            }
        }
    }

    /// `Queue::needs_notification`, with this queue's count of chains returned (the same test
    /// as Linux's `vring_need_event`): `used_event` in `[old, new)` of the used index.
    fn needs_notification(&mut self, mem: &GuestMemoryMmap) -> Result<bool, virtio_queue::Error> {
        let added = std::mem::take(&mut self.num_added);
        if !self.queue.event_idx_enabled() {
            return Ok(true);
        }
        // The used ring writes (and the used index) before the read of used_event: pairs with
        // the driver's barrier between its used_event write and its used index read.
        fence(Ordering::SeqCst);
        let at = GuestAddress(self.queue.avail_ring())
            .checked_add(4 + 2 * u64::from(self.queue.size()))
            .ok_or(virtio_queue::Error::AddressOverflow)?;
        let used_event: u16 = mem
            .load(at, Ordering::Relaxed)
            .map_err(virtio_queue::Error::GuestMemory)?;
        let new = Wrapping(self.queue.next_used());
        let used_event = Wrapping(u16::from_le(used_event));
        Ok(new - used_event - Wrapping(1) < added)
    }
}
