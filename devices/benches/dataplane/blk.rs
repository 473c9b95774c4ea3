//! virtio-blk against a file: microvm's [`BlockHandler`] with a queue of requests in flight,
//! and the plain loop doing the same requests one `pread`/`pwrite` at a time.
//!
//! `--impl interleaved` has the two take turns in one run, a batch each (the handler's
//! `process_queue` call, or as many plain requests as the queue holds), the one going first
//! alternating: separate 1-s runs of one build differed by up to ~12% here (1 MiB reads: 88%
//! and 100% of the limit in two runs of the same code), so the ratio is taken within a run.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use devices::guest_log::GuestLog;
use devices::virtio::block::{BlockHandler, Disk};
use devices::virtio::IrqTrigger;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{die, Meter, Outcome, Pool, Ring, F_NEXT, F_WRITE};

/// Requests kept in flight by the synthetic guest (3 descriptors each).
const BLK_DEPTH: u16 = 32;

/// `blk --file F --op read|write --size S --impl handler|plain|interleaved`: outcomes in
/// that order (interleaved: handler, then plain).
pub(super) fn blk(path: &str, op: &str, size: usize, imp: &str, secs: f64) -> Vec<Outcome> {
    let file = File::options().read(true).write(true).open(path).unwrap_or_else(|e| die(&format!("{path}: {e}")));
    let len = file.metadata().unwrap().len();
    let slots = len / size as u64;
    if slots == 0 {
        die("file smaller than one request");
    }
    let write = match op {
        "read" => false,
        "write" => true,
        _ => die("bad --op"),
    };
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let mut plain = (imp != "handler").then(|| Plain::new(file.try_clone().unwrap(), size, slots, write));
    let mem = (imp != "plain").then(|| guest_memory(size));
    let mut handler = mem.as_ref().map(|mem| Guest::new(mem, file, len, size, slots, write));
    let mut round = 0u64;
    while Instant::now() < deadline {
        // Interleaved: handler first in even rounds, plain first in odd ones.
        if round.is_multiple_of(2) {
            handler.as_mut().map(Guest::step);
            plain.as_mut().map(Plain::step);
        } else {
            plain.as_mut().map(Plain::step);
            handler.as_mut().map(Guest::step);
        }
        round += 1;
    }
    handler.map(Guest::finish).into_iter().chain(plain.map(Plain::finish)).collect()
}

/// The plain loop: batches of BLK_DEPTH requests into page-aligned buffers used in turn (the
/// same memory as the guest's).
struct Plain {
    file: File,
    pool: Pool,
    size: usize,
    slots: u64,
    write: bool,
    m: Meter,
    ops: u64,
}

impl Plain {
    fn new(file: File, size: usize, slots: u64, write: bool) -> Self {
        let mut pool = Pool::new(usize::from(BLK_DEPTH) * size);
        pool.as_mut_slice().fill(0xa5);
        Plain { file, pool, size, slots, write, m: Meter::new(), ops: 0 }
    }

    /// A batch of BLK_DEPTH requests, as many as the handler finds queued.
    fn step(&mut self) {
        let Plain { file, pool, size, slots, write, m, ops } = self;
        let (size, fd) = (*size, file.as_raw_fd());
        let pool = pool.as_mut_slice();
        m.time(|| {
            for _ in 0..BLK_DEPTH {
                let off = (*ops % *slots) * size as u64;
                let at = (*ops as usize % usize::from(BLK_DEPTH)) * size;
                let buf = &mut pool[at..at + size];
                // SAFETY: `buf` is valid for `size` bytes of reads or writes during the call.
                let n = unsafe {
                    if *write {
                        libc::pwrite(fd, buf.as_ptr().cast(), size, off as i64)
                    } else {
                        libc::pread(fd, buf.as_mut_ptr().cast(), size, off as i64)
                    }
                };
                if n != size as isize {
                    die(&format!("pread/pwrite: {n}: {}", io::Error::last_os_error()));
                }
                *ops += 1;
            }
        });
    }

    fn finish(self) -> Outcome {
        self.m.finish(self.ops, self.ops * self.size as u64)
    }
}

/// Where the request buffers start in guest memory.
const DATA: u64 = 0x10_0000;

/// Guest memory for BLK_DEPTH requests of `size` bytes.
fn guest_memory(size: usize) -> GuestMemoryMmap {
    let mem_len = DATA + u64::from(BLK_DEPTH) * ((size as u64 + 0xfff) & !0xfff);
    GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), mem_len as usize)]).unwrap()
}

/// Guest address of request `r`'s header (its status byte is at +16).
fn hdr(r: u16) -> u64 {
    0x2_0000 + u64::from(r) * 32
}

/// The synthetic guest and microvm's handler: BLK_DEPTH requests always in flight, each
/// given the next slot of the file when it comes back.
struct Guest<'m> {
    mem: &'m GuestMemoryMmap,
    ring: Ring<'m>,
    h: BlockHandler,
    size: usize,
    slots: u64,
    write: bool,
    next_slot: u64,
    m: Meter,
    ops: u64,
}

impl<'m> Guest<'m> {
    fn new(mem: &'m GuestMemoryMmap, file: File, len: u64, size: usize, slots: u64, write: bool) -> Self {
        let ring = Ring { mem, base: 0, seen: 0 };
        let mut next_slot = 0u64;
        for r in 0..BLK_DEPTH {
            let d = r * 3;
            let buf = DATA + u64::from(r) * ((size as u64 + 0xfff) & !0xfff);
            ring.desc(d, hdr(r), 16, F_NEXT, d + 1);
            // Filled like the plain loop's buffers: untouched pages would all be the kernel's
            // one shared zero page, always in cache, and make writes look faster than they are.
            mem.write_slice(&vec![0xa5u8; size], GuestAddress(buf)).unwrap();
            ring.desc(d + 1, buf, size as u32, F_NEXT | if write { 0 } else { F_WRITE }, d + 2);
            ring.desc(d + 2, hdr(r) + 16, 1, F_WRITE, 0);
            set_sector(mem, r, next_slot % slots, size, write);
            next_slot += 1;
            ring.publish(d);
        }
        let disk = Arc::new(Disk::new(file, len, false, "bench"));
        let h = BlockHandler::new(
            mem.clone(),
            ring.queue(),
            EventFd::new(EFD_NONBLOCK).unwrap(),
            Arc::new(IrqTrigger::new().unwrap()),
            disk,
            None,
            Arc::new(GuestLog::new("virtio-blk")),
        );
        Guest { mem, ring, h, size, slots, write, next_slot, m: Meter::new(), ops: 0 }
    }

    /// One timed `process_queue`, then the driver's part: check and requeue what came back.
    fn step(&mut self) {
        let h = &mut self.h;
        self.m.time(|| h.process_queue());
        let (mem, size, slots, write, next_slot) = (self.mem, self.size, self.slots, self.write, &mut self.next_slot);
        self.ops += self.ring.recycle(|head, _| {
            let r = head / 3;
            let status: u8 = mem.read_obj(GuestAddress(hdr(r) + 16)).unwrap();
            if status != 0 {
                die(&format!("request failed with status {status}"));
            }
            set_sector(mem, r, *next_slot % slots, size, write);
            *next_slot += 1;
        }) as u64;
    }

    fn finish(self) -> Outcome {
        self.m.finish(self.ops, self.ops * self.size as u64)
    }
}

/// Writes request `r`'s header: its type and the sector of file slot `slot`, status unset.
fn set_sector(mem: &GuestMemoryMmap, r: u16, slot: u64, size: usize, write: bool) {
    mem.write_obj(u32::from(write), GuestAddress(hdr(r))).unwrap();
    mem.write_obj(slot * size as u64 / 512, GuestAddress(hdr(r) + 8)).unwrap();
    mem.write_obj(0xffu8, GuestAddress(hdr(r) + 16)).unwrap();
}
