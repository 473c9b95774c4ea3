//! A split virtqueue's rings read and written in place: [`SplitRing`] looks each of the
//! three areas (descriptor table, avail ring, used ring) up once, as one slice of one guest
//! memory region, and then reaches their elements at offsets in those slices, without a
//! region lookup per access (virtio-queue's `Queue` looks the region up at every avail entry,
//! descriptor and used element).
//!
//! Every access is bounds-checked against its slice (vm-memory's `VolatileSlice`), so a
//! guest index can at worst make one fail; nothing here trusts a value read from the guest.
//! A queue whose areas are not each inside one region (possible only if regions are
//! adjacent) has no `SplitRing`: its users take virtio-queue's path.

use std::sync::atomic::Ordering;

use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::volatile_memory::Error as VolatileMemoryError;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, VolatileMemory, VolatileSlice};

/// Why a queue has no [`SplitRing`], or a ring access failed.
#[derive(Debug, thiserror::Error)]
pub enum RingError {
    /// Not ready, or reset and not set up again (virtio-queue's own test).
    #[error("the queue is not ready")]
    NotReady,
    /// A ring area is not inside one memory region.
    #[error("the {area} ({len} bytes at {addr:#x}) is not inside one memory region")]
    Area {
        /// Which area.
        area: &'static str,
        /// Its guest address.
        addr: u64,
        /// Its length.
        len: usize,
    },
    /// The driver's avail index is more than a queue's worth ahead of the device's (what
    /// virtio-queue calls an invalid avail ring index): the queue is broken.
    #[error("avail index {avail} is more than a queue's worth ahead of {next}")]
    AvailAhead {
        /// The driver's avail index.
        avail: u16,
        /// The device's next avail position.
        next: u16,
    },
    /// An element could not be reached in its area (out of bounds, misaligned).
    #[error("ring access failed")]
    Access(#[from] VolatileMemoryError),
}

/// Bytes of a descriptor-table entry.
const DESC_SIZE: usize = 16;
/// Bytes before the first avail-ring entry (flags, idx), and of each entry.
const AVAIL_HEADER: usize = 4;
const AVAIL_ELEM: usize = 2;
/// Bytes before the first used-ring entry (flags, idx), and of each entry (id, len).
const USED_HEADER: usize = 4;
pub const USED_ELEM: usize = 8;

/// A used-ring element `{ le32 id; le32 len }`: chain `head`, `len` bytes written.
pub fn used_elem(head: u16, len: u32) -> [u8; USED_ELEM] {
    (u64::from(head) | (u64::from(len) << 32)).to_le_bytes()
}

/// Offset of `idx` in both rings.
const IDX: usize = 2;

/// The rings of one split virtqueue, each area checked to lie inside one memory region (see
/// the module documentation). Borrows the guest memory it points into.
#[derive(Debug)]
pub struct SplitRing<'m> {
    desc: VolatileSlice<'m>,
    avail: VolatileSlice<'m>,
    used: VolatileSlice<'m>,
    size: u16,
}

impl<'m> SplitRing<'m> {
    /// The rings `queue` is configured with, in `mem`.
    pub fn new(queue: &Queue, mem: &'m GuestMemoryMmap) -> Result<Self, RingError> {
        let size = queue.size();
        // The same test as virtio-queue's `iter` (a size of 0 cannot be set, but costs nothing
        // to refuse).
        if !queue.ready() || queue.avail_ring() == 0 || size == 0 {
            return Err(RingError::NotReady);
        }
        let n = usize::from(size);
        let area = |area: &'static str, addr: u64, len: usize| {
            GuestMemoryBackend::get_slice(mem, GuestAddress(addr), len)
                .map_err(|_| RingError::Area { area, addr, len })
        };
        Ok(SplitRing {
            desc: area("descriptor table", queue.desc_table(), DESC_SIZE * n)?,
            // Flags, idx, the entries, used_event.
            avail: area("avail ring", queue.avail_ring(), AVAIL_HEADER + AVAIL_ELEM * n + 2)?,
            // Flags, idx, the entries, avail_event.
            used: area("used ring", queue.used_ring(), USED_HEADER + USED_ELEM * n + 2)?,
            size,
        })
    }

    /// The queue size.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// The driver's avail index (acquire: the entries and descriptors it publishes are read
    /// after it), checked against the device's next avail position `next`: more than a
    /// queue's worth ahead is a broken queue, as virtio-queue's own iterator says.
    pub fn avail_idx(&self, next: u16) -> Result<u16, RingError> {
        let avail = u16::from_le(self.avail.load(IDX, Ordering::Acquire)?);
        if avail.wrapping_sub(next) > self.size {
            return Err(RingError::AvailAhead { avail, next });
        }
        Ok(avail)
    }

    /// The head published at avail position `pos` (taken modulo the size).
    pub fn avail_head(&self, pos: u16) -> Result<u16, RingError> {
        let at = AVAIL_HEADER + AVAIL_ELEM * usize::from(pos % self.size);
        Ok(u16::from_le(self.avail.load(at, Ordering::Acquire)?))
    }

    /// The driver's `used_event` (EVENT_IDX).
    pub fn used_event(&self) -> Result<u16, RingError> {
        let at = AVAIL_HEADER + AVAIL_ELEM * usize::from(self.size);
        Ok(u16::from_le(self.avail.load(at, Ordering::Relaxed)?))
    }

    /// Descriptor `index` of the table (an index beyond it fails).
    pub fn desc(&self, index: u16) -> Result<Descriptor, RingError> {
        Ok(self.desc.get_ref::<Descriptor>(DESC_SIZE * usize::from(index))?.load())
    }

    /// The descriptors of the chain starting at `head`.
    pub fn chain(&self, head: u16) -> RingChain<'_, 'm> {
        RingChain {
            ring: self,
            next: head,
            ttl: self.size,
            bytes: 0,
            indirect: false,
        }
    }

    /// Writes used elements from position `pos` on (taken modulo the size; wrapping at the
    /// ring's end), each as `used_elem` gives it. The driver sees them once
    /// [`Self::publish_used`] moves the used index past them. One bounds check per contiguous
    /// run, not per element.
    pub fn write_used(&self, pos: u16, elems: &[[u8; USED_ELEM]]) -> Result<(), RingError> {
        let size = usize::from(self.size);
        let mut at = usize::from(pos % self.size);
        let mut rest = elems;
        while !rest.is_empty() {
            let n = rest.len().min(size - at);
            let run = self.used.subslice(USED_HEADER + USED_ELEM * at, USED_ELEM * n)?;
            run.copy_from(rest[..n].as_flattened());
            rest = &rest[n..];
            at = 0;
        }
        Ok(())
    }

    /// Sets the used index to `idx` (release: the elements written before it are visible to a
    /// driver that reads it).
    pub fn publish_used(&self, idx: u16) -> Result<(), RingError> {
        Ok(self.used.store(idx.to_le(), IDX, Ordering::Release)?)
    }
}

/// The descriptors of one chain, read from the table of a [`SplitRing`]. Stops where
/// virtio-queue's `DescriptorChain` does: after `size` descriptors (a loop), at a `next`
/// index beyond the table, or when the total length would overflow u32; the last descriptor
/// then still has NEXT set, which is how a caller tells a cut chain. An indirect descriptor
/// also stops it, with [`RingChain::indirect`] set: the caller takes that chain through
/// virtio-queue, which follows indirect tables.
#[derive(Debug)]
pub struct RingChain<'r, 'm> {
    ring: &'r SplitRing<'m>,
    next: u16,
    /// Descriptors it may still yield.
    ttl: u16,
    bytes: u32,
    indirect: bool,
}

impl RingChain<'_, '_> {
    /// Stopped at an indirect descriptor.
    pub fn indirect(&self) -> bool {
        self.indirect
    }
}

impl Iterator for RingChain<'_, '_> {
    type Item = Descriptor;

    fn next(&mut self) -> Option<Descriptor> {
        if self.ttl == 0 || self.next >= self.ring.size {
            return None;
        }
        // Only stop from here on: a chain ends once.
        let ttl = std::mem::take(&mut self.ttl);
        let d = self.ring.desc(self.next).ok()?;
        if d.refers_to_indirect_table() {
            self.indirect = true;
            return None;
        }
        // Virtio 2.7.5.2: a chain is at most 2^32 bytes long.
        self.bytes = self.bytes.checked_add(d.len())?;
        if d.has_next() {
            self.next = d.next();
            self.ttl = ttl - 1;
        }
        Some(d)
    }
}

impl std::iter::FusedIterator for RingChain<'_, '_> {}
