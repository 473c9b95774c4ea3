//! Data-plane tests: MockSplitQueues (the driver side) over real guest memory, a seqpacket
//! socket pair as the backend (the test holds the peer end). No KVM, no event loop.

mod rx;
mod rx_rings;
mod rx_zero_copy;
mod tx;

use std::os::fd::OwnedFd;
use std::sync::atomic::AtomicU32;
use std::sync::Arc;

use virtio_queue::QueueT;
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::NetHandler;
use crate::rate_limiter::{BucketConfig, RateLimiter, RateLimiterConfig};
use crate::virtio::net::{
    SeqpacketBackend, VIRTIO_NET_F_MRG_RXBUF, VNET_HDR_LEN, VNET_HDR_NUM_BUFFERS,
};
pub(crate) use crate::virtio::test_utils::{fire_timer, guest_memory, RawD, TestQueue, D};
use crate::virtio::{IrqTrigger, VIRTIO_F_VERSION_1};

pub(crate) const MEM_SIZE: usize = 0x40_0000;
/// Where the RX and TX rings live.
const RXQ_BASE: u64 = 0;
const TXQ_BASE: u64 = 0x1_0000;
/// Guest buffers.
pub(crate) const BUF: u64 = 0x10_0000;

pub(crate) fn mem() -> GuestMemoryMmap {
    guest_memory(MEM_SIZE)
}

pub(crate) fn feature(bit: u32) -> u64 {
    1u64 << bit
}

/// VERSION_1 | MRG_RXBUF.
pub(crate) fn default_features() -> u64 {
    feature(VIRTIO_F_VERSION_1) | feature(VIRTIO_NET_F_MRG_RXBUF)
}

/// A handler over two test queues and a seqpacket backend.
pub(crate) struct Setup<'a> {
    pub mem: &'a GuestMemoryMmap,
    pub rxq: TestQueue<'a>,
    pub txq: TestQueue<'a>,
    pub peer: OwnedFd,
    pub h: NetHandler,
    #[allow(dead_code)]
    pub offload: Arc<AtomicU32>,
}

impl<'a> Setup<'a> {
    pub fn new(mem: &'a GuestMemoryMmap, qsize: u16, acked: u64) -> Self {
        let rxq = TestQueue::new(mem, RXQ_BASE, qsize);
        let txq = TestQueue::new(mem, TXQ_BASE, qsize);
        let (backend, peer) = SeqpacketBackend::pair().unwrap();
        let offload = backend.offload_handle();
        let mut rx = rxq.queue();
        let mut tx = txq.queue();
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
            Arc::new(crate::guest_log::GuestLog::new("virtio-net")),
        );
        Setup {
            mem,
            rxq,
            txq,
            peer,
            h,
            offload,
        }
    }

    /// Adds an RX chain at descriptor `first`.
    pub fn add_rx(&self, first: u16, descs: &[D]) {
        self.rxq.add_chain(first, descs);
    }

    /// Adds a TX chain at descriptor `first`.
    pub fn add_tx(&self, first: u16, descs: &[D]) {
        self.txq.add_chain(first, descs);
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
        self.rxq.used.entry(i)
    }

    pub fn tx_used(&self, i: u16) -> (u32, u32) {
        self.txq.used.entry(i)
    }

    pub fn rx_used_idx(&self) -> u16 {
        self.rxq.used.idx()
    }

    pub fn tx_used_idx(&self) -> u16 {
        self.txq.used.idx()
    }

    /// Number of interrupts raised since the last call.
    pub fn irqs(&self) -> u64 {
        self.h.irq.evt().read().unwrap_or(0)
    }

    /// Asserts that used entry `i` returned chain `head` filled with all of frame `f`, found
    /// (with num_buffers = 1) at `addr`.
    #[track_caller]
    pub fn assert_rx_whole(&self, i: u16, head: u32, addr: u64, f: &[u8]) {
        assert_eq!(self.rx_used(i), (head, f.len() as u32));
        assert_eq!(self.read(addr, f.len()), with_num_buffers(f, 1));
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

/// `f` with num_buffers set, as the guest must see it.
pub(crate) fn with_num_buffers(f: &[u8], n: u16) -> Vec<u8> {
    let mut v = f.to_vec();
    v[VNET_HDR_NUM_BUFFERS..VNET_HDR_NUM_BUFFERS + 2].copy_from_slice(&n.to_le_bytes());
    v
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

/// The bytes of used entries `first..first + n` of the RX ring, each chain's buffers given as
/// (address, length) in `layout[head]`, concatenated in used order up to each used length.
fn used_bytes(s: &Setup, first: u16, n: u16, layout: &[Vec<(u64, u32)>]) -> Vec<u8> {
    let mut out = Vec::new();
    for i in first..first + n {
        let (head, len) = s.rx_used(i);
        let mut left = len as usize;
        for &(addr, blen) in &layout[head as usize] {
            let take = left.min(blen as usize);
            out.extend(s.read(addr, take));
            left -= take;
        }
        assert_eq!(left, 0, "used length of chain {head} beyond its buffers");
    }
    out
}
