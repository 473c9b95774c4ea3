//! Entry points for the cargo-fuzz targets in `devices/fuzz`: each takes the fuzzer's bytes,
//! builds what a hostile guest controls (guest memory, descriptor tables, avail rings, MMIO
//! register accesses) from them, drives the real code and asserts invariants that must hold
//! whatever the guest did. Compiled only with the `fuzzing` feature.
//!
//! The input is decoded by a small byte reader of our own ([`Input`]) rather than the
//! `arbitrary` crate: the layouts are simple, and a reader that yields zeros once the input is
//! exhausted keeps every input meaningful, which helps libFuzzer's mutations.

mod blk;
mod mmio;
mod net;

pub use blk::virtio_blk;
pub use mmio::mmio_transport;
pub use net::{virtio_net_rx, virtio_net_tx};

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::virtio::test_utils::UsedRing;

/// A cursor over the fuzz input; reads past the end yield zeros.
pub(crate) struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Input { data }
    }

    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let (a, b) = self.data.split_at(n.min(self.data.len()));
        self.data = b;
        a
    }

    /// Everything not read yet.
    pub fn rest(&mut self) -> &'a [u8] {
        self.bytes(self.data.len())
    }

    fn array<const N: usize>(&mut self) -> [u8; N] {
        let mut a = [0u8; N];
        let b = self.bytes(N);
        a[..b.len()].copy_from_slice(b);
        a
    }

    pub fn rest_len(&self) -> usize {
        self.data.len()
    }

    pub fn u8(&mut self) -> u8 {
        self.array::<1>()[0]
    }

    pub fn bool(&mut self) -> bool {
        self.u8() & 1 != 0
    }

    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.array())
    }

    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.array())
    }

    pub fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.array())
    }
}

/// Size of the data region of the guest memory of the queue-driven targets (at 0).
pub(crate) const MEM_SIZE: u64 = 0x2_0000;
/// Where the guest-controlled bytes (headers, frames, indirect tables) are copied.
pub(crate) const IMAGE: u64 = 0x8000;
/// A second region holding the rings, so that data the device writes for a request cannot
/// overwrite the used ring whose contents the targets check (a guest may do that, but then
/// nothing can be asserted about the used ring). Descriptor addresses decoded by [`addr`]
/// never point into it.
pub(crate) const RINGS: u64 = 0x1_0000_0000;
const RINGS_SIZE: u64 = 0x4000;

/// A guest address: mostly inside the image, sometimes anywhere in the data region, rarely
/// any 64-bit value (outside memory, straddling its end, overflowing), but never in [`RINGS`].
pub(crate) fn addr(inp: &mut Input) -> u64 {
    match inp.u8() {
        0..=199 => IMAGE + u64::from(inp.u16()),
        200..=239 => u64::from(inp.u16()) * 2,
        _ => match inp.u64() {
            a if (RINGS - 0x1_0000..RINGS + RINGS_SIZE).contains(&a) => a ^ RINGS,
            a => a,
        },
    }
}

/// A buffer length: mostly small, sometimes any u32.
fn len(inp: &mut Input) -> u32 {
    if inp.u8() < 230 {
        u32::from(inp.u16())
    } else {
        inp.u32()
    }
}

/// One split queue whose descriptor table, avail ring and image all come from the input.
pub(crate) struct FuzzQueue {
    pub size: u16,
    /// Base of each ring: descriptor table, avail (driver) ring, used (device) ring.
    pub rings: [u64; 3],
    /// Chains published in the avail ring.
    pub published: u16,
    /// How many of them name a head beyond the queue: the device drops those without a used
    /// entry (there is no valid id to return).
    pub bad_heads: u16,
}

impl FuzzQueue {
    /// Decodes a queue at `base` (rings in the 0x2000 bytes there, inside [`RINGS`]) into `mem`: size, up to
    /// `size` raw descriptors (any address, length, flags and next index, including
    /// INDIRECT), then the published heads (any u16).
    pub fn build(mem: &GuestMemoryMmap, base: u64, inp: &mut Input) -> Self {
        let size = 1u16 << (inp.u8() % 9); // 1..=256: tables fit in 0x1000 bytes.
        let rings = [base, base + 0x1000, base + 0x1400];
        let ndesc = u16::from(inp.u8()).min(size);
        for i in 0..ndesc {
            let a = addr(inp);
            let l = len(inp);
            let flags = match inp.u8() {
                f @ 0..=239 => u16::from(f & 7), // NEXT, WRITE, INDIRECT
                _ => inp.u16(),
            };
            let next = match inp.u8() {
                0..=199 => (i + 1) % size,
                200..=239 => u16::from(inp.u8()) % size,
                _ => inp.u16(),
            };
            let mut raw = [0u8; 16];
            raw[..8].copy_from_slice(&a.to_le_bytes());
            raw[8..12].copy_from_slice(&l.to_le_bytes());
            raw[12..14].copy_from_slice(&flags.to_le_bytes());
            raw[14..].copy_from_slice(&next.to_le_bytes());
            mem.write_slice(&raw, GuestAddress(rings[0] + 16 * u64::from(i)))
                .unwrap();
        }
        let published = u16::from(inp.u8() % 64);
        let mut bad_heads = 0;
        for i in 0..published {
            let head = match inp.u8() {
                h @ 0..=239 => u16::from(h) % size,
                _ => inp.u16(),
            };
            bad_heads += u16::from(head >= size);
            let slot = rings[1] + 4 + 2 * u64::from(i % size);
            mem.write_obj(head, GuestAddress(slot)).unwrap();
        }
        mem.write_obj(published, GuestAddress(rings[1] + 2)).unwrap();
        FuzzQueue {
            size,
            rings,
            published,
            bad_heads,
        }
    }

    /// A ready device-side queue over these rings.
    pub fn queue(&self, event_idx: bool) -> Queue {
        let mut q = Queue::new(256).unwrap();
        q.try_set_size(self.size).unwrap();
        q.try_set_desc_table_address(GuestAddress(self.rings[0]))
            .unwrap();
        q.try_set_avail_ring_address(GuestAddress(self.rings[1]))
            .unwrap();
        q.try_set_used_ring_address(GuestAddress(self.rings[2]))
            .unwrap();
        q.set_event_idx(event_idx);
        q.set_ready(true);
        q
    }

    pub fn used<'m>(&self, mem: &'m GuestMemoryMmap) -> UsedRing<'m> {
        UsedRing::new(mem, self.rings[2], self.size)
    }
}

/// Guest memory: the data region at 0 and the ring region at [`RINGS`], zeroed.
pub(crate) fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::<()>::from_ranges(&[
        (GuestAddress(0), MEM_SIZE as usize),
        (GuestAddress(RINGS), RINGS_SIZE as usize),
    ])
    .unwrap()
}

/// Copies `image` (as much as fits) at [`IMAGE`], with every address it could name inside
/// [`RINGS`] moved out of it (see [`keep_out_of_rings`]).
pub(crate) fn write_image(mem: &GuestMemoryMmap, image: &[u8]) {
    let n = image.len().min((MEM_SIZE - IMAGE) as usize);
    let mut image = image[..n].to_vec();
    keep_out_of_rings(&mut image);
    mem.write_slice(&image, GuestAddress(IMAGE)).unwrap();
}

/// The image holds descriptors the device reads as they are (indirect tables), so any 8
/// bytes of it may be a buffer address. A guest may well point a buffer at its own used
/// ring, but then nothing can be asserted about that ring, which the targets check; so no
/// little-endian u64 at any offset of the image may lie in [`RINGS`] (a buffer starting
/// below it crosses unmapped memory first, which the device refuses). Each such value loses
/// its bit 32 (byte 4: 0x01 -> 0x00); clearing bits only creates in-range windows at lower
/// offsets, hence the passes until none is left (a handful at most).
fn keep_out_of_rings(image: &mut [u8]) {
    loop {
        let mut changed = false;
        for i in 0..image.len().saturating_sub(7) {
            let a = u64::from_le_bytes(image[i..i + 8].try_into().unwrap());
            if (RINGS..RINGS + RINGS_SIZE).contains(&a) {
                image[i + 4] &= !0x01;
                changed = true;
            }
        }
        if !changed {
            return;
        }
    }
}

/// Checks the used ring after a pass that completed `completed` chains out of `published`:
/// the index moved by exactly that much, every entry names a head inside the queue, and no
/// used length exceeds `max_len`. Returns the used lengths.
pub(crate) fn check_used(
    used: &UsedRing,
    q: &FuzzQueue,
    completed: usize,
    max_len: u32,
) -> Vec<u32> {
    assert!(
        completed <= usize::from(q.published),
        "{completed} chains used, {} published",
        q.published
    );
    assert_eq!(usize::from(used.idx()), completed, "used idx vs completed");
    (0..used.idx())
        .map(|i| {
            let (id, len) = used.entry(i);
            assert!(id < u32::from(q.size), "used id {id} beyond queue of {}", q.size);
            assert!(len <= max_len, "used len {len} > {max_len}");
            len
        })
        .collect()
}
