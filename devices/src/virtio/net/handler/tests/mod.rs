//! Data-plane tests: MockSplitQueues (the driver side) over real guest memory, a seqpacket
//! socket pair as the backend (the test holds the peer end). No KVM, no event loop.

mod rx;
mod tx;

use std::os::fd::OwnedFd;
use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::atomic::AtomicU32;
use std::sync::Arc;

use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::NetHandler;
use crate::rate_limiter::{BucketConfig, RateLimiter, RateLimiterConfig};
use crate::virtio::net::{SeqpacketBackend, VIRTIO_NET_F_MRG_RXBUF, VNET_HDR_LEN};
use crate::virtio::{IrqTrigger, VIRTIO_F_VERSION_1};

pub(crate) const MEM_SIZE: usize = 0x40_0000;
/// Where the RX and TX rings live.
const RXQ_BASE: u64 = 0;
const TXQ_BASE: u64 = 0x1_0000;
/// Offset of the used ring from the queue base. MockSplitQueue::create places the used ring
/// over the second half of the avail ring (its `end()` counts elements, not bytes), so we put
/// it elsewhere and read it ourselves.
const USED_OFFSET: u64 = 0x8000;
/// Guest buffers.
pub(crate) const BUF: u64 = 0x10_0000;

/// One descriptor: (guest address, length, device-writable).
pub(crate) type D = (u64, u32, bool);

pub(crate) fn mem() -> GuestMemoryMmap {
    GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
}

pub(crate) fn feature(bit: u32) -> u64 {
    1u64 << bit
}

/// VERSION_1 | MRG_RXBUF.
pub(crate) fn default_features() -> u64 {
    feature(VIRTIO_F_VERSION_1) | feature(VIRTIO_NET_F_MRG_RXBUF)
}

/// A handler over two mock queues and a seqpacket backend.
pub(crate) struct Setup<'a> {
    pub mem: &'a GuestMemoryMmap,
    pub rxq: MockSplitQueue<'a, GuestMemoryMmap>,
    pub txq: MockSplitQueue<'a, GuestMemoryMmap>,
    pub rx_used: UsedRing<'a>,
    pub tx_used: UsedRing<'a>,
    pub qsize: u16,
    pub peer: OwnedFd,
    pub h: NetHandler,
    #[allow(dead_code)]
    pub offload: Arc<AtomicU32>,
}

impl<'a> Setup<'a> {
    pub fn new(mem: &'a GuestMemoryMmap, qsize: u16, acked: u64) -> Self {
        let rxq = MockSplitQueue::create(mem, GuestAddress(RXQ_BASE), qsize);
        let txq = MockSplitQueue::create(mem, GuestAddress(TXQ_BASE), qsize);
        let rx_used = UsedRing::new(mem, RXQ_BASE + USED_OFFSET, qsize);
        let tx_used = UsedRing::new(mem, TXQ_BASE + USED_OFFSET, qsize);
        let (backend, peer) = SeqpacketBackend::pair().unwrap();
        let offload = backend.offload_handle();
        let mut rx: Queue = rxq.create_queue().unwrap();
        let mut tx: Queue = txq.create_queue().unwrap();
        rx.try_set_used_ring_address(rx_used.addr).unwrap();
        tx.try_set_used_ring_address(tx_used.addr).unwrap();
        let event_idx = acked & feature(virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX) != 0;
        rx.set_event_idx(event_idx);
        tx.set_event_idx(event_idx);
        let h = NetHandler::new(
            mem.clone(),
            [rx, tx],
            [
                EventFd::new(EFD_NONBLOCK).unwrap(),
                EventFd::new(EFD_NONBLOCK).unwrap(),
            ],
            Arc::new(IrqTrigger::new().unwrap()),
            Box::new(backend),
            acked,
        );
        Setup {
            mem,
            rxq,
            txq,
            rx_used,
            tx_used,
            qsize,
            peer,
            h,
            offload,
        }
    }

    /// Adds an RX chain at descriptor `first`.
    pub fn add_rx(&self, first: u16, descs: &[D]) {
        add_chain(&self.rxq, self.qsize, first, descs);
    }

    /// Adds a TX chain at descriptor `first`.
    pub fn add_tx(&self, first: u16, descs: &[D]) {
        add_chain(&self.txq, self.qsize, first, descs);
    }

    /// Sends a frame from the "host" to the backend.
    pub fn host_send(&self, frame: &[u8]) {
        assert_eq!(
            SeqpacketBackend::send(&self.peer, frame).unwrap(),
            frame.len()
        );
    }

    /// Next frame the guest sent, if any (waits up to `ms`).
    pub fn host_recv(&self, ms: i32) -> Option<Vec<u8>> {
        SeqpacketBackend::recv_timeout(&self.peer, ms).unwrap()
    }

    pub fn rx_used(&self, i: u16) -> (u32, u32) {
        self.rx_used.entry(i)
    }

    pub fn tx_used(&self, i: u16) -> (u32, u32) {
        self.tx_used.entry(i)
    }

    pub fn rx_used_idx(&self) -> u16 {
        self.rx_used.idx()
    }

    pub fn tx_used_idx(&self) -> u16 {
        self.tx_used.idx()
    }

    /// Number of interrupts raised since the last call.
    pub fn irqs(&self) -> u64 {
        self.h.irq.evt().read().unwrap_or(0)
    }

    pub fn read(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        vm_memory::Bytes::read_slice(self.mem, &mut v, GuestAddress(addr)).unwrap();
        v
    }

    pub fn write(&self, addr: u64, data: &[u8]) {
        vm_memory::Bytes::write_slice(self.mem, data, GuestAddress(addr)).unwrap();
    }
}

/// Writes `descs` as one chain at descriptor index `first` (linked in order) and publishes it
/// in the avail ring (wrapping correctly, unlike MockSplitQueue::add_desc_chains).
pub(crate) fn add_chain(vq: &MockSplitQueue<GuestMemoryMmap>, qsize: u16, first: u16, descs: &[D]) {
    for (i, &(addr, len, write)) in descs.iter().enumerate() {
        let last = i + 1 == descs.len();
        let mut flags = if write { VRING_DESC_F_WRITE } else { 0 };
        if !last {
            flags |= VRING_DESC_F_NEXT;
        }
        let next = if last { 0 } else { first + i as u16 + 1 };
        let raw = RawDescriptor::from(SplitDescriptor::new(addr, len, flags as u16, next));
        vq.desc_table().store(first + i as u16, raw).unwrap();
    }
    publish(vq, qsize, first);
}

/// Stores a raw descriptor.
pub(crate) fn raw_desc(
    vq: &MockSplitQueue<GuestMemoryMmap>,
    index: u16,
    addr: u64,
    len: u32,
    flags: u32,
    next: u16,
) {
    let raw = RawDescriptor::from(SplitDescriptor::new(addr, len, flags as u16, next));
    vq.desc_table().store(index, raw).unwrap();
}

/// Appends `head` to the avail ring.
pub(crate) fn publish(vq: &MockSplitQueue<GuestMemoryMmap>, qsize: u16, head: u16) {
    let idx = vq.avail().idx().load();
    vq.avail()
        .ring()
        .ref_at(usize::from(idx % qsize))
        .unwrap()
        .store(head);
    vq.avail().idx().store(idx.wrapping_add(1));
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
        vm_memory::Bytes::write_slice(mem, &zeros, r.addr).unwrap();
        r
    }

    fn u16_at(&self, off: u64) -> u16 {
        vm_memory::Bytes::read_obj(self.mem, GuestAddress(self.addr.0 + off)).unwrap()
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
        let id: u32 =
            vm_memory::Bytes::read_obj(self.mem, GuestAddress(self.addr.0 + off)).unwrap();
        let len: u32 =
            vm_memory::Bytes::read_obj(self.mem, GuestAddress(self.addr.0 + off + 4)).unwrap();
        (id, len)
    }

    /// avail_event (EVENT_IDX): the avail index at which the device wants a kick.
    pub fn avail_event(&self) -> u16 {
        self.u16_at(4 + 8 * u64::from(self.qsize))
    }
}

/// A frame as the TAP carries it: 12-byte vnet header (flags, gso_type, zeros) + payload.
pub(crate) fn frame(flags: u8, gso_type: u8, payload_len: usize, seed: u8) -> Vec<u8> {
    let mut f = vec![0u8; VNET_HDR_LEN + payload_len];
    f[0] = flags;
    f[1] = gso_type;
    for (i, b) in f[VNET_HDR_LEN..].iter_mut().enumerate() {
        *b = (i as u8).wrapping_mul(7) ^ seed;
    }
    f
}

/// A limiter allowing `burst` bytes at once, refilled at `rate` bytes/s.
pub(crate) fn byte_limiter(rate: u64, burst: u64) -> RateLimiter {
    RateLimiter::new(RateLimiterConfig {
        bandwidth: Some(BucketConfig {
            rate,
            size: Some(burst),
            one_time_burst: None,
        }),
        ops: None,
    })
    .unwrap()
}

/// Waits until `fd` is readable (e.g. a limiter's timer), at most 2 s.
pub(crate) fn wait_readable(fd: RawFd) -> bool {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: pfd is a valid pollfd array of length 1 that outlives the call.
    unsafe { libc::poll(&mut pfd, 1, 2000) == 1 }
}

/// Waits for a limiter's timer and acknowledges it, like the event loop.
pub(crate) fn fire_timer(rl: &mut RateLimiter) {
    assert!(wait_readable(rl.as_raw_fd()), "limiter timer never fired");
    rl.event_handler().unwrap();
}
