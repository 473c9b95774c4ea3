//! Test support shared by the transport and device tests: an event manager on its own thread
//! (as in the VMM), the guest driver's side of the MMIO register window, and split queues with
//! a safe memory layout.

use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use event_manager::EventManager;
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::mmio::{
    REG_DRIVER_FEATURES, REG_DRIVER_FEATURES_SEL, REG_QUEUE_DESC_LOW, REG_QUEUE_DEVICE_LOW,
    REG_QUEUE_DRIVER_LOW, REG_QUEUE_NUM, REG_QUEUE_READY, REG_QUEUE_SEL, REG_STATUS,
};
use super::status::{ACKNOWLEDGE, DRIVER, DRIVER_OK, FEATURES_OK};
use super::{EventEndpoint, MmioTransport, Subscriber};
use crate::bus::BusDevice;
use crate::rate_limiter::RateLimiter;

/// xorshift64*, seeded: a tiny deterministic generator for randomized tests, so that a
/// failing case reproduces.
pub(crate) struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Below `n` (> 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// One flat region of guest memory at address 0.
pub(crate) fn guest_memory(size: usize) -> GuestMemoryMmap {
    GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), size)]).unwrap()
}

/// OR of `1 << bit` for each bit.
pub(crate) fn bits(list: &[u32]) -> u64 {
    list.iter().fold(0, |a, &b| a | (1u64 << b))
}

/// An `EventManager<Subscriber>` running on its own thread, stopped on drop.
pub(crate) struct EventLoop {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    /// What devices register their handlers with.
    pub endpoint: EventEndpoint,
    /// Kernel thread id of the loop, to read its CPU time.
    tid: Arc<AtomicI32>,
}

impl EventLoop {
    pub fn start() -> Self {
        let mut em: EventManager<Subscriber> = EventManager::new().unwrap();
        let endpoint = em.remote_endpoint();
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let tid = Arc::new(AtomicI32::new(0));
        let tid2 = tid.clone();
        let thread = std::thread::spawn(move || {
            // SAFETY: gettid has no preconditions.
            tid2.store(unsafe { libc::gettid() }, Ordering::SeqCst);
            while !stop2.load(Ordering::SeqCst) {
                em.run_with_timeout(20).unwrap();
            }
        });
        EventLoop {
            stop,
            thread: Some(thread),
            endpoint,
            tid,
        }
    }

    /// CPU time (user + system) the loop thread used so far, in clock ticks.
    pub fn cpu_ticks(&self) -> u64 {
        let tid = self.tid.load(Ordering::SeqCst);
        let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).unwrap();
        // Fields after the ")" that ends the command name: state is field 3; utime, stime are
        // fields 14 and 15.
        let rest = &stat[stat.rfind(')').unwrap() + 2..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
    }
}

impl Drop for EventLoop {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Reads a 32-bit register of the transport.
pub(crate) fn r(t: &mut MmioTransport, off: u64) -> u32 {
    let mut b = [0u8; 4];
    t.read(off, &mut b);
    u32::from_le_bytes(b)
}

/// Writes a 32-bit register of the transport.
pub(crate) fn w(t: &mut MmioTransport, off: u64, v: u32) {
    t.write(off, &v.to_le_bytes());
}

/// Every status step up to DRIVER_OK.
pub(crate) const ALL_OK: u32 = ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK;

/// ACK, DRIVER, accept `driver_features`, FEATURES_OK.
pub(crate) fn negotiate(t: &mut MmioTransport, driver_features: u64) {
    w(t, REG_STATUS, ACKNOWLEDGE);
    w(t, REG_STATUS, ACKNOWLEDGE | DRIVER);
    w(t, REG_DRIVER_FEATURES_SEL, 0);
    w(t, REG_DRIVER_FEATURES, driver_features as u32);
    w(t, REG_DRIVER_FEATURES_SEL, 1);
    w(t, REG_DRIVER_FEATURES, (driver_features >> 32) as u32);
    w(t, REG_STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK);
}

/// Configures queue `idx` with `size` entries and rings at `[desc, driver, device]`, and
/// sets it ready.
pub(crate) fn configure_queue(t: &mut MmioTransport, idx: u32, size: u32, rings: [u64; 3]) {
    w(t, REG_QUEUE_SEL, idx);
    w(t, REG_QUEUE_NUM, size);
    let regs = [
        REG_QUEUE_DESC_LOW,
        REG_QUEUE_DRIVER_LOW,
        REG_QUEUE_DEVICE_LOW,
    ];
    for (lo, addr) in regs.into_iter().zip(rings) {
        w(t, lo, addr as u32);
        w(t, lo + 4, (addr >> 32) as u32);
    }
    w(t, REG_QUEUE_READY, 1);
}

/// What a driver does to bring a device up: reset, negotiate `features`, set up `queues`
/// (queue i at `queues[i]`), DRIVER_OK.
pub(crate) fn driver_init(t: &mut MmioTransport, features: u64, queues: &[&TestQueue]) {
    w(t, REG_STATUS, 0);
    negotiate(t, features);
    for (i, q) in queues.iter().enumerate() {
        configure_queue(t, i as u32, u32::from(q.size), q.rings());
    }
    w(t, REG_STATUS, ALL_OK);
}

/// Waits until `fd` is readable, at most `ms` milliseconds.
pub(crate) fn poll_in(fd: RawFd, ms: i32) -> bool {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: pfd is a valid pollfd array of length 1 that outlives the call.
    unsafe { libc::poll(&mut pfd, 1, ms) == 1 }
}

/// Waits (at most 5 s) for an interrupt and acknowledges it (reads the eventfd).
pub(crate) fn wait_irq(evt: &EventFd) -> bool {
    poll_in(evt.as_raw_fd(), 5000) && evt.read().is_ok()
}

/// Waits (at most 2 s) for a limiter's timer and acknowledges it, like the event loop.
#[track_caller]
pub(crate) fn fire_timer(rl: &mut RateLimiter) {
    assert!(poll_in(rl.as_raw_fd(), 2000), "limiter timer never fired");
    rl.event_handler().unwrap();
}

/// One descriptor: (guest address, length, device-writable).
pub(crate) type D = (u64, u32, bool);

/// A raw descriptor: (index, addr, len, flags, next).
pub(crate) type RawD = (u16, u64, u32, u32, u16);

/// Offset of a [`TestQueue`]'s used ring from its base.
pub(crate) const USED_OFFSET: u64 = 0x8000;

/// The driver side of a split queue at `base`: a MockSplitQueue's descriptor table and avail
/// ring, and a used ring of our own at `base + USED_OFFSET`.
///
/// `MockSplitQueue::create` (virtio-queue 0.18) computes the end of its avail ring from the
/// ring's length in elements, not bytes, so its own used ring overlaps the second half of the
/// avail ring: the device's used entries would overwrite the driver's avail entries once more
/// than a few chains are in flight. Use [`TestQueue::queue`] and [`TestQueue::rings`], never
/// the mock's `used()`, `used_addr()` or `create_queue()`.
pub(crate) struct TestQueue<'a> {
    pub vq: MockSplitQueue<'a, GuestMemoryMmap>,
    pub used: UsedRing<'a>,
    pub size: u16,
}

impl<'a> TestQueue<'a> {
    pub fn new(mem: &'a GuestMemoryMmap, base: u64, size: u16) -> Self {
        // Descriptor table, then avail ring (flags, idx, ring, used_event).
        let driver_end = 16 * u64::from(size) + 6 + 2 * u64::from(size);
        assert!(driver_end <= USED_OFFSET, "queue of {size} too big");
        TestQueue {
            vq: MockSplitQueue::create(mem, GuestAddress(base), size),
            used: UsedRing::new(mem, base + USED_OFFSET, size),
            size,
        }
    }

    /// A ready device-side queue over these rings.
    pub fn queue(&self) -> Queue {
        let mut q: Queue = self.vq.create_queue().unwrap();
        q.try_set_used_ring_address(self.used.addr).unwrap();
        q
    }

    /// Addresses of the descriptor table, the avail (driver) ring and the used (device) ring.
    pub fn rings(&self) -> [u64; 3] {
        [
            self.vq.desc_table_addr().0,
            self.vq.avail_addr().0,
            self.used.addr.0,
        ]
    }

    /// Writes `descs` as one chain at descriptor index `first` (linked in order) and publishes
    /// it in the avail ring (wrapping correctly, unlike MockSplitQueue::add_desc_chains).
    pub fn add_chain(&self, first: u16, descs: &[D]) {
        for (i, &(addr, len, write)) in descs.iter().enumerate() {
            let last = i + 1 == descs.len();
            let mut flags = if write { VRING_DESC_F_WRITE } else { 0 };
            if !last {
                flags |= VRING_DESC_F_NEXT;
            }
            let next = if last { 0 } else { first + i as u16 + 1 };
            self.raw_desc(first + i as u16, addr, len, flags, next);
        }
        self.publish(first);
    }

    /// Stores a raw descriptor.
    pub fn raw_desc(&self, index: u16, addr: u64, len: u32, flags: u32, next: u16) {
        let raw = RawDescriptor::from(SplitDescriptor::new(addr, len, flags as u16, next));
        self.vq.desc_table().store(index, raw).unwrap();
    }

    /// Writes raw descriptors and publishes head 0.
    pub fn raw_chain(&self, descs: &[RawD]) {
        for &(i, addr, len, flags, next) in descs {
            self.raw_desc(i, addr, len, flags, next);
        }
        self.publish(0);
    }

    /// Appends `head` to the avail ring.
    pub fn publish(&self, head: u16) {
        let avail = self.vq.avail();
        let idx = avail.idx().load();
        avail
            .ring()
            .ref_at(usize::from(idx % self.size))
            .unwrap()
            .store(head);
        avail.idx().store(idx.wrapping_add(1));
    }
}

/// A used ring (device → driver) at a known address.
pub(crate) struct UsedRing<'a> {
    mem: &'a GuestMemoryMmap,
    pub addr: GuestAddress,
    qsize: u16,
}

impl<'a> UsedRing<'a> {
    pub fn new(mem: &'a GuestMemoryMmap, addr: u64, qsize: u16) -> Self {
        let r = UsedRing {
            mem,
            addr: GuestAddress(addr),
            qsize,
        };
        let zeros = vec![0u8; 6 + 8 * usize::from(qsize)];
        mem.write_slice(&zeros, r.addr).unwrap();
        r
    }

    fn u16_at(&self, off: u64) -> u16 {
        self.mem.read_obj(GuestAddress(self.addr.0 + off)).unwrap()
    }

    pub fn flags(&self) -> u16 {
        self.u16_at(0)
    }

    pub fn idx(&self) -> u16 {
        self.u16_at(2)
    }

    /// Entry number `i` (counting from the start, wrapping): (head, len).
    pub fn entry(&self, i: u16) -> (u32, u32) {
        let off = 4 + 8 * u64::from(i % self.qsize);
        let id: u32 = self.mem.read_obj(GuestAddress(self.addr.0 + off)).unwrap();
        let len: u32 = self
            .mem
            .read_obj(GuestAddress(self.addr.0 + off + 4))
            .unwrap();
        (id, len)
    }

    /// avail_event (EVENT_IDX): the avail index at which the device wants a kick.
    pub fn avail_event(&self) -> u16 {
        self.u16_at(4 + 8 * u64::from(self.qsize))
    }
}
