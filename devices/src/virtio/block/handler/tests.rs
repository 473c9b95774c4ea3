//! Data-plane tests: a TestQueue (the driver side) over real guest memory, a temp file as the
//! disk. No KVM.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::sync::Arc;

use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::tempfile::TempFile;

use super::{BlockHandler, BUDGET};
use crate::guest_log::GuestLog;
use crate::rate_limiter::{BucketConfig, RateLimiter, RateLimiterConfig};
use crate::virtio::block::request::Disk;
use crate::virtio::block::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use crate::virtio::test_utils::{fire_timer, guest_memory, RawD, TestQueue, D};
use crate::virtio::{IrqTrigger, VIRTIO_MMIO_INT_VRING};

const QSIZE: u16 = 16;
const MEM_SIZE: usize = 0x10_0000;
const DISK_SECTORS: u64 = 8;
const HDR: u64 = 0x1_0000;
const DATA: u64 = 0x2_0000;
const STATUS: u64 = 0x3_0000;
const SERIAL: &str = "test-serial-0123456789";

struct Harness {
    mem: GuestMemoryMmap,
    file: File,
    _tmp: TempFile,
}

impl Harness {
    fn new() -> Self {
        Self::with_memory(guest_memory(MEM_SIZE))
    }

    fn with_memory(mem: GuestMemoryMmap) -> Self {
        let tmp = TempFile::new().unwrap();
        let mut file = tmp.as_file().try_clone().unwrap();
        let pattern: Vec<u8> = (0..DISK_SECTORS * 512)
            .map(|i| (i / 512) as u8 + 1)
            .collect();
        file.write_all(&pattern).unwrap();
        Harness {
            mem,
            file,
            _tmp: tmp,
        }
    }

    /// A queue at guest address 0 (below the buffers).
    fn queue(&self) -> TestQueue<'_> {
        TestQueue::new(&self.mem, 0, QSIZE)
    }

    fn handler(&self, vq: &TestQueue, read_only: bool) -> BlockHandler {
        let queue = vq.queue();
        let disk = Disk::new(
            self.file.try_clone().unwrap(),
            DISK_SECTORS * 512,
            read_only,
            SERIAL,
        );
        BlockHandler::new(
            self.mem.clone(),
            queue,
            EventFd::new(EFD_NONBLOCK).unwrap(),
            Arc::new(IrqTrigger::new().unwrap()),
            Arc::new(disk),
            None,
            Arc::new(GuestLog::new("virtio-blk")),
        )
    }

    fn header(&self, addr: u64, req_type: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&req_type.to_le_bytes());
        h[8..].copy_from_slice(&sector.to_le_bytes());
        self.mem.write_slice(&h, GuestAddress(addr)).unwrap();
    }

    fn status(&self) -> u8 {
        self.mem.read_obj(GuestAddress(STATUS)).unwrap()
    }

    fn disk_bytes(&mut self) -> Vec<u8> {
        let mut v = Vec::new();
        self.file.seek(SeekFrom::Start(0)).unwrap();
        self.file.read_to_end(&mut v).unwrap();
        v
    }
}

fn hdr() -> D {
    (HDR, 16, false)
}

fn status_desc() -> D {
    (STATUS, 1, true)
}

/// Runs one request chain on a fresh queue; returns (status byte, used len, handler).
fn run_one(h: &Harness, descs: &[D], read_only: bool) -> (u8, u32, BlockHandler) {
    h.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    let vq = h.queue();
    vq.add_chain(0, descs);
    let mut handler = h.handler(&vq, read_only);
    let stats = handler.process_queue();
    assert_eq!(stats.completed, 1);
    assert_eq!(vq.used.idx(), 1);
    let (id, len) = vq.used.entry(0);
    assert_eq!(id, 0);
    (h.status(), len, handler)
}

#[test]
fn read_two_segments() {
    let h = Harness::new();
    h.header(HDR, VIRTIO_BLK_T_IN, 1);
    let descs = [
        hdr(),
        (DATA, 512, true),
        (DATA + 0x1000, 1024, true),
        status_desc(),
    ];
    let (status, len, handler) = run_one(&h, &descs, false);
    assert_eq!(status, VIRTIO_BLK_S_OK);
    assert_eq!(len, 1536 + 1);
    let mut buf = [0u8; 512];
    h.mem.read_slice(&mut buf, GuestAddress(DATA)).unwrap();
    assert!(buf.iter().all(|&b| b == 2), "sector 1 holds 2s");
    let mut buf = [0u8; 1024];
    h.mem
        .read_slice(&mut buf, GuestAddress(DATA + 0x1000))
        .unwrap();
    assert!(buf[..512].iter().all(|&b| b == 3) && buf[512..].iter().all(|&b| b == 4));
    assert_eq!(
        handler.irq.status() & VIRTIO_MMIO_INT_VRING,
        VIRTIO_MMIO_INT_VRING
    );
    assert_eq!(handler.irq.evt().read().unwrap(), 1);
}

#[test]
fn requests_across_memory_regions() {
    // Guest memory in two adjacent regions (the queue in the first): a data buffer across
    // their boundary, a header in the second region with the status in the first, a GET_ID
    // answer across the boundary. Each is served as if the memory were one region: a
    // request's accesses outside the region of its first descriptor take the general path.
    const EDGE: u64 = 0x1_8000;
    let mem = GuestMemoryMmap::<()>::from_ranges(&[
        (GuestAddress(0), EDGE as usize),
        (GuestAddress(EDGE), MEM_SIZE - EDGE as usize),
    ])
    .unwrap();
    let mut h = Harness::with_memory(mem);
    h.header(HDR, VIRTIO_BLK_T_IN, 1);
    let (status, len, _) = run_one(&h, &[hdr(), (EDGE - 512, 1024, true), status_desc()], false);
    assert_eq!((status, len), (VIRTIO_BLK_S_OK, 1024 + 1));
    let mut buf = [0u8; 1024];
    h.mem.read_slice(&mut buf, GuestAddress(EDGE - 512)).unwrap();
    assert!(buf[..512].iter().all(|&b| b == 2) && buf[512..].iter().all(|&b| b == 3));

    let far_hdr = EDGE + 0x1000;
    h.header(far_hdr, VIRTIO_BLK_T_OUT, 3);
    h.mem.write_slice(&[0xcdu8; 1024], GuestAddress(EDGE - 256)).unwrap();
    let (status, len, _) = run_one(&h, &[(far_hdr, 16, false), (EDGE - 256, 1024, false), status_desc()], false);
    assert_eq!((status, len), (VIRTIO_BLK_S_OK, 1));
    let disk = h.disk_bytes();
    assert!(disk[1536..2560].iter().all(|&b| b == 0xcd));
    assert!(disk[..1536].iter().chain(&disk[2560..]).all(|&b| b != 0xcd));

    h.header(far_hdr, VIRTIO_BLK_T_GET_ID, 0);
    let (status, len, _) = run_one(&h, &[(far_hdr, 16, false), (EDGE - 8, 20, true), status_desc()], false);
    assert_eq!((status, len), (VIRTIO_BLK_S_OK, 20 + 1));
    let mut id = [0u8; 20];
    h.mem.read_slice(&mut id, GuestAddress(EDGE - 8)).unwrap();
    assert_eq!(&id[..], &SERIAL.as_bytes()[..20]);
}

#[test]
fn write_then_disk_changed() {
    let mut h = Harness::new();
    h.header(HDR, VIRTIO_BLK_T_OUT, 2);
    h.mem
        .write_slice(&[0xabu8; 1024], GuestAddress(DATA))
        .unwrap();
    let descs = [hdr(), (DATA, 1024, false), status_desc()];
    let (status, len, _) = run_one(&h, &descs, false);
    assert_eq!(status, VIRTIO_BLK_S_OK);
    assert_eq!(len, 1);
    let disk = h.disk_bytes();
    assert!(disk[1024..2048].iter().all(|&b| b == 0xab));
    assert!(disk[..1024].iter().all(|&b| b != 0xab));
    assert!(disk[2048..].iter().all(|&b| b != 0xab));
}

#[test]
fn write_refused_on_read_only() {
    let mut h = Harness::new();
    let before = h.disk_bytes();
    h.header(HDR, VIRTIO_BLK_T_OUT, 0);
    h.mem
        .write_slice(&[0xabu8; 512], GuestAddress(DATA))
        .unwrap();
    let descs = [hdr(), (DATA, 512, false), status_desc()];
    let (status, len, _) = run_one(&h, &descs, true);
    assert_eq!(status, VIRTIO_BLK_S_IOERR);
    assert_eq!(len, 1);
    assert_eq!(h.disk_bytes(), before);
}

#[test]
fn flush_and_get_id() {
    let h = Harness::new();
    h.header(HDR, VIRTIO_BLK_T_FLUSH, 0);
    let (status, _, _) = run_one(&h, &[hdr(), status_desc()], false);
    assert_eq!(status, VIRTIO_BLK_S_OK);
    // Flush on a read-only disk is harmless.
    let (status, _, _) = run_one(&h, &[hdr(), status_desc()], true);
    assert_eq!(status, VIRTIO_BLK_S_OK);

    h.header(HDR, VIRTIO_BLK_T_GET_ID, 0);
    let (status, len, _) = run_one(&h, &[hdr(), (DATA, 64, true), status_desc()], false);
    assert_eq!(status, VIRTIO_BLK_S_OK);
    assert_eq!(len, 21);
    let mut id = [0u8; 20];
    h.mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(&id, &SERIAL.as_bytes()[..20]);
}

#[test]
fn unsupported_type() {
    let h = Harness::new();
    h.header(HDR, 11 /* DISCARD, not offered */, 0);
    let (status, len, _) = run_one(&h, &[hdr(), (DATA, 16, false), status_desc()], false);
    assert_eq!(status, VIRTIO_BLK_S_UNSUPP);
    assert_eq!(len, 1);
}

#[test]
fn out_of_range_and_unaligned() {
    let h = Harness::new();
    for (sector, len) in [
        (DISK_SECTORS, 512),      // starts at the end
        (DISK_SECTORS - 1, 1024), // straddles the end
        (u64::MAX, 512),          // sector + len overflows
        (u64::MAX >> 9, 512),     // byte offset would overflow
        (0, 100),                 // not a multiple of 512
    ] {
        for t in [VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT] {
            h.header(HDR, t, sector);
            let write = t == VIRTIO_BLK_T_IN;
            let (status, _, _) = run_one(&h, &[hdr(), (DATA, len, write), status_desc()], false);
            assert_eq!(
                status, VIRTIO_BLK_S_IOERR,
                "type {t} sector {sector} len {len}"
            );
        }
    }
    // The last sector itself is fine.
    h.header(HDR, VIRTIO_BLK_T_IN, DISK_SECTORS - 1);
    let (status, _, _) = run_one(&h, &[hdr(), (DATA, 512, true), status_desc()], false);
    assert_eq!(status, VIRTIO_BLK_S_OK);
}

#[test]
fn malformed_requests_get_ioerr() {
    let h = Harness::new();
    h.header(HDR, VIRTIO_BLK_T_IN, 0);
    let cases: Vec<(&str, Vec<D>)> = vec![
        ("no header", vec![status_desc()]),
        (
            "header too short",
            vec![(HDR, 8, false), (DATA, 512, true), status_desc()],
        ),
        (
            "header writable",
            vec![(HDR, 16, true), (DATA, 512, true), status_desc()],
        ),
        (
            "IN data readable",
            vec![hdr(), (DATA, 512, false), status_desc()],
        ),
        (
            "header outside memory",
            vec![(MEM_SIZE as u64, 16, false), status_desc()],
        ),
        (
            "data outside memory",
            vec![hdr(), (MEM_SIZE as u64 - 256, 512, true), status_desc()],
        ),
        (
            "data address wraps",
            vec![hdr(), (u64::MAX - 100, 512, true), status_desc()],
        ),
    ];
    for (name, descs) in cases {
        let (status, len, _) = run_one(&h, &descs, false);
        assert_eq!(status, VIRTIO_BLK_S_IOERR, "{name}");
        assert_eq!(len, 1, "{name}");
    }
    h.header(HDR, VIRTIO_BLK_T_OUT, 0);
    let (status, _, _) = run_one(&h, &[hdr(), (DATA, 512, true), status_desc()], false);
    assert_eq!(status, VIRTIO_BLK_S_IOERR, "OUT data writable");
}

#[test]
fn chains_without_status_are_dropped() {
    let h = Harness::new();
    h.header(HDR, VIRTIO_BLK_T_IN, 0);
    let cases: Vec<(&str, Vec<D>)> = vec![
        ("only header", vec![hdr()]),
        ("last is readable", vec![hdr(), (DATA, 512, false)]),
        (
            "status len 0",
            vec![hdr(), (DATA, 512, true), (STATUS, 0, true)],
        ),
        (
            "status outside memory",
            vec![hdr(), (MEM_SIZE as u64 + 10, 1, true)],
        ),
    ];
    for (name, descs) in cases {
        let (status, len, _) = run_one(&h, &descs, false);
        assert_eq!(status, 0xff, "{name}: status untouched");
        assert_eq!(len, 0, "{name}");
    }
}

#[test]
fn broken_chains_are_dropped() {
    let h = Harness::new();
    h.header(HDR, VIRTIO_BLK_T_IN, 0);
    let n = VRING_DESC_F_NEXT;
    let w = VRING_DESC_F_WRITE;
    let cases: Vec<(&str, Vec<RawD>)> = vec![
        // next points past the table
        ("next out of range", vec![(0, HDR, 16, n, 200)]),
        // 0 -> 1 -> 0 -> ...
        ("loop", vec![(0, HDR, 16, n, 1), (1, STATUS, 1, w | n, 0)]),
        // self loop
        ("self loop", vec![(0, HDR, 16, n, 0)]),
        // total length overflows u32
        (
            "length overflow",
            vec![(0, HDR, u32::MAX, n, 1), (1, STATUS, 16, w, 0)],
        ),
    ];
    for (name, descs) in cases {
        h.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        let vq = h.queue();
        vq.raw_chain(&descs);
        let mut handler = h.handler(&vq, false);
        assert_eq!(handler.process_queue().completed, 1, "{name}");
        assert_eq!(vq.used.idx(), 1, "{name}");
        assert_eq!(vq.used.entry(0), (0, 0), "{name}");
        assert_eq!(h.status(), 0xff, "{name}");
    }
}

#[test]
fn bad_avail_ring_entries() {
    let h = Harness::new();
    let vq = h.queue();
    // Head index beyond the queue: chain is empty, and cannot be put in the used ring.
    vq.publish(100);
    let mut handler = h.handler(&vq, false);
    assert_eq!(handler.process_queue().completed, 0);
    assert_eq!(vq.used.idx(), 0);

    // avail.idx far ahead of what we processed: the queue is refused, nothing happens.
    let vq = h.queue();
    vq.vq.avail().idx().store(QSIZE * 3);
    let mut handler = h.handler(&vq, false);
    assert_eq!(handler.process_queue().completed, 0);
    assert_eq!(vq.used.idx(), 0);
}

#[test]
fn several_requests_one_interrupt() {
    let h = Harness::new();
    h.header(HDR, VIRTIO_BLK_T_IN, 0);
    h.header(HDR + 0x100, VIRTIO_BLK_T_FLUSH, 0);
    let vq = h.queue();
    vq.add_chain(0, &[hdr(), (DATA, 512, true), status_desc()]);
    vq.add_chain(3, &[(HDR + 0x100, 16, false), (STATUS + 1, 1, true)]);
    let mut handler = h.handler(&vq, false);
    assert_eq!(handler.process_queue().completed, 2);
    assert_eq!(vq.used.idx(), 2);
    assert_eq!(vq.used.entry(0), (0, 513));
    assert_eq!(vq.used.entry(1), (3, 1));
    assert_eq!(handler.irq.evt().read().unwrap(), 1);
    // Nothing new: no interrupt.
    assert_eq!(handler.process_queue().completed, 0);
    assert!(handler.irq.evt().read().is_err());
}

#[test]
fn rate_limited_requests_resume_on_timer() {
    let h = Harness::new();
    h.header(HDR, VIRTIO_BLK_T_IN, 0);
    let vq = h.queue();
    vq.add_chain(0, &[hdr(), (DATA, 512, true), status_desc()]);
    vq.add_chain(3, &[hdr(), (DATA, 512, true), (STATUS + 1, 1, true)]);
    let mut handler = h.handler(&vq, false);
    // 1 op of capacity, refilled at 50 ops/s: the second request waits ~20ms.
    let cfg = RateLimiterConfig {
        bandwidth: None,
        ops: Some(BucketConfig {
            rate: 50,
            size: Some(1),
            one_time_burst: None,
        }),
    };
    handler.rate_limiter = Some(RateLimiter::new(cfg).unwrap());
    let stats = handler.process_queue();
    assert_eq!(stats.completed, 1);
    assert!(stats.throttled && handler.is_throttled());
    assert_eq!(vq.used.idx(), 1);
    // A guest kick while throttled does nothing.
    assert_eq!(handler.process_queue().completed, 0);

    // Wait for the timer like the event loop would, then resume.
    fire_timer(handler.rate_limiter.as_mut().unwrap());
    let stats = handler.process_queue();
    assert_eq!(stats.completed, 1);
    assert_eq!(vq.used.idx(), 2);
    assert_eq!(vq.used.entry(1), (3, 513));
}

#[test]
fn requests_across_the_whole_avail_ring() {
    // Two rounds of 8 two-descriptor chains use all 16 avail ring slots. (The second half of
    // the avail ring is where MockSplitQueue puts its own used ring.)
    let h = Harness::new();
    h.header(HDR, VIRTIO_BLK_T_FLUSH, 0);
    let vq = h.queue();
    let mut handler = h.handler(&vq, false);
    for round in 0..2u16 {
        for i in 0..8u16 {
            h.mem
                .write_obj(0xffu8, GuestAddress(STATUS + u64::from(i)))
                .unwrap();
            vq.add_chain(2 * i, &[hdr(), (STATUS + u64::from(i), 1, true)]);
        }
        assert_eq!(handler.process_queue().completed, 8, "round {round}");
        assert_eq!(vq.used.idx(), 8 * (round + 1));
        for i in 0..8u16 {
            assert_eq!(vq.used.entry(8 * round + i), (u32::from(2 * i), 1));
            let status: u8 = h.mem.read_obj(GuestAddress(STATUS + u64::from(i))).unwrap();
            assert_eq!(status, VIRTIO_BLK_S_OK);
        }
    }
}

#[test]
fn budget_spreads_a_full_queue_over_several_wakeups() {
    // More flush requests than one wakeup may handle, in a queue big enough to hold them.
    const SIZE: u16 = 256;
    let chains = BUDGET as u16 + BUDGET as u16 / 2;
    assert!(2 * chains <= SIZE);
    let h = Harness::new();
    h.header(HDR, VIRTIO_BLK_T_FLUSH, 0);
    let vq = TestQueue::new(&h.mem, 0, SIZE);
    for i in 0..chains {
        let status = GuestAddress(STATUS + u64::from(i));
        h.mem.write_obj(0xffu8, status).unwrap();
        vq.add_chain(2 * i, &[hdr(), (status.0, 1, true)]);
    }
    let mut handler = h.handler(&vq, false);
    let first = handler.process_queue();
    assert_eq!(first.completed, BUDGET);
    assert!(first.yielded && !first.throttled);
    assert_eq!(vq.used.idx(), BUDGET as u16);
    // The handler re-armed its own eventfd: the event loop comes back after its other fds.
    assert_eq!(handler.queue_evt().read().unwrap(), 1);
    assert_eq!(handler.irq.evt().read().unwrap(), 1);

    let second = handler.process_queue();
    assert_eq!(second.completed, usize::from(chains) - BUDGET);
    assert!(!second.yielded);
    assert_eq!(vq.used.idx(), chains);
    assert!(
        handler.queue_evt().read().is_err(),
        "no kick once the queue is empty"
    );
    for i in 0..chains {
        assert_eq!(vq.used.entry(i), (u32::from(2 * i), 1));
        let status: u8 = h.mem.read_obj(GuestAddress(STATUS + u64::from(i))).unwrap();
        assert_eq!(status, VIRTIO_BLK_S_OK);
    }
}
