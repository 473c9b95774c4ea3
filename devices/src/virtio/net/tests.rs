//! Device-level tests: Net behind an MmioTransport, with a real EventManager running on its own
//! thread (as in the VMM) and a seqpacket backend. No KVM: the test plays the guest driver
//! through the register window and mock queues, and the host network through the peer socket.

use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::handler::tests::{frame, with_num_buffers};
use super::*;
use crate::rate_limiter::{BucketConfig, RateLimiterConfig};
use crate::virtio::status::DEVICE_NEEDS_RESET;
use crate::virtio::test_utils::{
    bits, driver_init, guest_memory, r, w, wait_irq, EventLoop, TestQueue, ALL_OK,
};
use crate::virtio::{MmioTransport, VirtioDevice, TYPE_NET, VIRTIO_F_VERSION_1};

const MEM_SIZE: usize = 0x40_0000;
const QSIZE: u16 = 16;
const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
const BUF: u64 = 0x10_0000;

fn config(rx_rate: Option<RateLimiterConfig>, tx_rate: Option<RateLimiterConfig>) -> NetConfig {
    NetConfig {
        mac: MAC,
        rx_rate,
        tx_rate,
    }
}

/// A backend whose first set_offload fails.
struct NoOffload(SeqpacketBackend, bool);

impl AsRawFd for NoOffload {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

impl NetBackend for NoOffload {
    unsafe fn read_frame_into(&mut self, iovs: &[libc::iovec]) -> io::Result<usize> {
        // SAFETY: our caller's guarantee, passed on unchanged.
        unsafe { self.0.read_frame_into(iovs) }
    }
    fn write_frame(&mut self, iovs: &[io::IoSlice]) -> io::Result<usize> {
        self.0.write_frame(iovs)
    }
    fn set_offload(&mut self, flags: u32) -> io::Result<()> {
        if std::mem::replace(&mut self.1, false) {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        self.0.set_offload(flags)
    }
}

/// The guest side of one device: memory, transport, both queues.
struct Guest<'a> {
    mem: &'a GuestMemoryMmap,
    t: MmioTransport,
    rxq: TestQueue<'a>,
    txq: TestQueue<'a>,
}

impl<'a> Guest<'a> {
    /// Queues at `base` (RX) and `base + 0x1_0000` (TX).
    fn new(mem: &'a GuestMemoryMmap, net: Net, base: u64) -> Self {
        let t = MmioTransport::new(mem.clone(), Box::new(net)).unwrap();
        Guest {
            mem,
            t,
            rxq: TestQueue::new(mem, base, QSIZE),
            txq: TestQueue::new(mem, base + 0x1_0000, QSIZE),
        }
    }

    /// Feature negotiation, both queues, DRIVER_OK.
    fn init(&mut self, features: u64) {
        driver_init(&mut self.t, features, &[&self.rxq, &self.txq]);
    }

    fn send(&mut self, first: u16, f: &[u8], addr: u64) {
        self.mem.write_slice(f, GuestAddress(addr)).unwrap();
        self.txq.add_chain(first, &[(addr, f.len() as u32, false)]);
        w(&mut self.t, 0x50, 1);
    }

    fn add_rx_buffer(&self, first: u16, addr: u64, len: u32) {
        self.rxq.add_chain(first, &[(addr, len, true)]);
    }

    fn read(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }
}

/// The features a Linux guest acks (everything offered but EVENT_IDX, to cover both modes).
fn linux_features() -> u64 {
    bits(&[
        VIRTIO_F_VERSION_1,
        VIRTIO_NET_F_MAC,
        VIRTIO_NET_F_STATUS,
        VIRTIO_NET_F_MRG_RXBUF,
        VIRTIO_NET_F_CSUM,
        VIRTIO_NET_F_HOST_TSO4,
        VIRTIO_NET_F_HOST_TSO6,
        VIRTIO_NET_F_GUEST_CSUM,
        VIRTIO_NET_F_GUEST_TSO4,
        VIRTIO_NET_F_GUEST_TSO6,
    ])
}

fn recv(peer: &OwnedFd) -> Option<Vec<u8>> {
    SeqpacketBackend::recv_timeout(peer, 5000).unwrap()
}

/// Polls until `cond` holds (at most 5 s).
fn eventually(mut cond: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(5) {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    false
}

#[test]
fn features_and_config_space() {
    let ev = EventLoop::start();
    let (backend, _peer) = SeqpacketBackend::pair().unwrap();
    let mut net = Net::new(config(None, None), Box::new(backend), ev.endpoint.clone()).unwrap();
    assert_eq!(net.device_type(), TYPE_NET);
    assert_eq!(net.queue_max_sizes(), &[256, 256]);
    assert_eq!(net.mac(), MAC);
    let f = net.avail_features();
    assert_eq!(f, linux_features() | bits(&[VIRTIO_RING_F_EVENT_IDX]));
    for bit in [
        VIRTIO_NET_F_GUEST_UFO,
        VIRTIO_NET_F_HOST_UFO,
        VIRTIO_NET_F_GUEST_ECN,
    ] {
        assert_eq!(f & (1 << bit), 0, "bit {bit} not offered");
    }
    let mut cfg = [0u8; 10];
    net.read_config(0, &mut cfg);
    assert_eq!(cfg[..6], MAC);
    assert_eq!(u16::from_le_bytes([cfg[6], cfg[7]]), VIRTIO_NET_S_LINK_UP);
    assert_eq!(u16::from_le_bytes([cfg[8], cfg[9]]), 1);
    let mut b = [0xffu8; 4];
    net.read_config(8, &mut b);
    assert_eq!(b, [1, 0, 0, 0]);
    net.read_config(u64::MAX, &mut b);
    assert_eq!(b, [0; 4]);
    // The MAC is read-only.
    net.write_config(0, &[0xff; 6]);
    net.read_config(0, &mut cfg);
    assert_eq!(cfg[..6], MAC);
    net.set_acked_features(u64::MAX);
    assert_eq!(net.acked_features(), f);
    assert!(net.reset() && net.acked_features() == 0);
}

#[test]
fn invalid_config_rejected() {
    let ev = EventLoop::start();
    for mac in [[0u8; 6], [0x01, 0, 0x5e, 0, 0, 1], [0xff; 6]] {
        let (backend, _peer) = SeqpacketBackend::pair().unwrap();
        let cfg = NetConfig {
            mac,
            ..config(None, None)
        };
        assert!(matches!(
            Net::new(cfg, Box::new(backend), ev.endpoint.clone()),
            Err(NetError::InvalidMac(_))
        ));
    }
    let bad = RateLimiterConfig {
        bandwidth: Some(BucketConfig::new(0)),
        ops: None,
    };
    for cfg in [config(Some(bad), None), config(None, Some(bad))] {
        let (backend, _peer) = SeqpacketBackend::pair().unwrap();
        assert!(matches!(
            Net::new(cfg, Box::new(backend), ev.endpoint.clone()),
            Err(NetError::RateLimiter(_))
        ));
    }
}

#[test]
fn end_to_end_through_mmio_and_event_manager() {
    let ev = EventLoop::start();
    let (backend, peer) = SeqpacketBackend::pair().unwrap();
    let offload = backend.offload_handle();
    let limits = RateLimiterConfig::simple(100 << 20, 100_000);
    let net = Net::new(
        config(Some(limits), Some(limits)),
        Box::new(backend),
        ev.endpoint.clone(),
    )
    .unwrap();
    let mem = guest_memory(MEM_SIZE);
    let mut g = Guest::new(&mem, net, 0);
    assert_eq!(r(&mut g.t, 0x08), TYPE_NET);
    assert_eq!(
        r(&mut g.t, 0x100),
        u32::from_le_bytes([MAC[0], MAC[1], MAC[2], MAC[3]])
    );
    g.init(linux_features());
    assert_eq!(r(&mut g.t, 0x70), ALL_OK);
    assert!(g.t.device().is_activated());
    assert_eq!(
        offload.load(Ordering::SeqCst),
        TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6
    );

    // TX: kick through the notify register; the frame reaches the host unchanged.
    let f = frame(VIRTIO_NET_HDR_F_NEEDS_CSUM as u8, 0, 1000, 1);
    g.send(0, &f, BUF);
    assert_eq!(recv(&peer).unwrap(), f);
    assert!(wait_irq(g.t.irq_evt()));
    assert!(eventually(|| g.txq.used.idx() == 1));
    assert_eq!(g.txq.used.entry(0), (0, 0));

    // RX with a buffer posted: the backend fd wakes the loop.
    g.add_rx_buffer(0, BUF + 0x1_0000, 4096);
    let f = frame(0, 0, 1400, 2);
    SeqpacketBackend::send(&peer, &f).unwrap();
    assert!(eventually(|| g.rxq.used.idx() == 1));
    assert_eq!(g.rxq.used.entry(0), (0, f.len() as u32));
    assert_eq!(g.read(BUF + 0x1_0000, f.len()), with_num_buffers(&f, 1));
    assert!(wait_irq(g.t.irq_evt()));

    // RX without buffers: the frame waits; the RX kick delivers it.
    let f = frame(0, 0, 3000, 3);
    SeqpacketBackend::send(&peer, &f).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(g.rxq.used.idx(), 1);
    g.add_rx_buffer(1, BUF + 0x2_0000, 2048);
    g.add_rx_buffer(2, BUF + 0x3_0000, 2048);
    g.t.queue_evts()[0].write(1).unwrap();
    assert!(eventually(|| g.rxq.used.idx() == 3));
    assert_eq!(g.rxq.used.entry(1), (1, 2048));
    assert_eq!(g.rxq.used.entry(2), (2, (f.len() - 2048) as u32));
    let mut got = g.read(BUF + 0x2_0000, 2048);
    got.extend(g.read(BUF + 0x3_0000, f.len() - 2048));
    assert_eq!(got, with_num_buffers(&f, 2));

    // Reset: handler gone, offloads cleared; a second life (no offloads, EVENT_IDX, new
    // queues) works with the same backend.
    w(&mut g.t, 0x70, 0);
    assert!(!g.t.device().is_activated());
    assert_eq!(offload.load(Ordering::SeqCst), 0);
    g.rxq = TestQueue::new(&mem, 0x8_0000, QSIZE);
    g.txq = TestQueue::new(&mem, 0x9_0000, QSIZE);
    g.init(bits(&[VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX]));
    assert!(g.t.device().is_activated());
    assert_eq!(offload.load(Ordering::SeqCst), 0);
    let f = frame(0, 0, 64, 4);
    g.send(0, &f, BUF);
    assert_eq!(recv(&peer).unwrap(), f);
    g.add_rx_buffer(0, BUF + 0x1_0000, 2048);
    // Frames with offloads the guest refused are dropped, the next one gets through.
    SeqpacketBackend::send(&peer, &frame(0, VIRTIO_NET_HDR_GSO_TCPV4 as u8, 100, 5)).unwrap();
    let f = frame(0, 0, 100, 6);
    SeqpacketBackend::send(&peer, &f).unwrap();
    assert!(eventually(|| g.rxq.used.idx() == 1));
    assert_eq!(g.read(BUF + 0x1_0000, f.len()), with_num_buffers(&f, 1));
    w(&mut g.t, 0x70, 0);
}

#[test]
fn failed_activation_keeps_the_backend() {
    let ev = EventLoop::start();
    let (backend, peer) = SeqpacketBackend::pair().unwrap();
    let net = Net::new(
        config(None, None),
        Box::new(NoOffload(backend, true)),
        ev.endpoint.clone(),
    )
    .unwrap();
    let mem = guest_memory(MEM_SIZE);
    let mut g = Guest::new(&mem, net, 0);
    g.init(linux_features());
    assert_ne!(r(&mut g.t, 0x70) & DEVICE_NEEDS_RESET, 0);
    assert!(!g.t.device().is_activated());
    // The backend came back to the device: the next activation uses it.
    w(&mut g.t, 0x70, 0);
    g.init(linux_features());
    assert!(g.t.device().is_activated());
    let f = frame(0, 0, 100, 1);
    g.send(0, &f, BUF);
    assert_eq!(recv(&peer).unwrap(), f);
    w(&mut g.t, 0x70, 0);
    drop(peer);
}

#[test]
fn throttled_tx_resumes_from_the_event_loop() {
    let ev = EventLoop::start();
    let (backend, peer) = SeqpacketBackend::pair().unwrap();
    // One frame per 50 ms.
    let tx = RateLimiterConfig {
        bandwidth: None,
        ops: Some(BucketConfig {
            rate: 20,
            size: Some(1),
            one_time_burst: None,
        }),
    };
    let net = Net::new(
        config(None, Some(tx)),
        Box::new(backend),
        ev.endpoint.clone(),
    )
    .unwrap();
    let mem = guest_memory(MEM_SIZE);
    let mut g = Guest::new(&mem, net, 0);
    g.init(linux_features());
    let start = Instant::now();
    for i in 0..3u16 {
        let f = frame(0, 0, 100, i as u8);
        mem.write_slice(&f, GuestAddress(BUF + u64::from(i) * 0x1000))
            .unwrap();
        g.txq
            .add_chain(i, &[(BUF + u64::from(i) * 0x1000, f.len() as u32, false)]);
    }
    // One kick; the limiter's timer brings the rest through.
    w(&mut g.t, 0x50, 1);
    for i in 0..3u8 {
        assert_eq!(recv(&peer).unwrap(), frame(0, 0, 100, i));
    }
    assert!(start.elapsed() >= Duration::from_millis(90));
    assert!(eventually(|| g.txq.used.idx() == 3));
    w(&mut g.t, 0x70, 0);
}

#[test]
fn flooded_devices_do_not_stall_others_or_spin() {
    let ev = EventLoop::start();
    let mem = guest_memory(MEM_SIZE);
    // A: tiny RX limit. C: no RX buffers at all. Both flooded by the host. B: normal.
    let (backend_a, peer_a) = SeqpacketBackend::pair().unwrap();
    let slow = RateLimiterConfig::simple(0, 5);
    let a = Net::new(
        config(Some(slow), None),
        Box::new(backend_a),
        ev.endpoint.clone(),
    )
    .unwrap();
    let (backend_b, peer_b) = SeqpacketBackend::pair().unwrap();
    let b = Net::new(config(None, None), Box::new(backend_b), ev.endpoint.clone()).unwrap();
    let (backend_c, peer_c) = SeqpacketBackend::pair().unwrap();
    let c = Net::new(config(None, None), Box::new(backend_c), ev.endpoint.clone()).unwrap();
    let mut ga = Guest::new(&mem, a, 0);
    let mut gb = Guest::new(&mem, b, 0x4_0000);
    let mut gc = Guest::new(&mem, c, 0x8_0000);
    ga.init(linux_features());
    gb.init(linux_features());
    gc.init(linux_features());
    for i in 0..QSIZE {
        ga.add_rx_buffer(i, BUF + u64::from(i) * 0x1000, 2048);
    }
    for peer in [&peer_a, &peer_c] {
        let mut sent = 0;
        while sent < 2000 && SeqpacketBackend::send(peer, &frame(0, 0, 100, 0)).is_ok() {
            sent += 1;
        }
        assert!(sent > 10);
    }
    // A took its burst (5 ops) and is throttled, C is waiting for buffers; B's traffic goes
    // through immediately.
    gb.add_rx_buffer(0, BUF + 0x20_0000, 2048);
    let f = frame(0, 0, 500, 7);
    let start = Instant::now();
    SeqpacketBackend::send(&peer_b, &f).unwrap();
    assert!(eventually(|| gb.rxq.used.idx() == 1));
    let g = frame(0, 0, 500, 8);
    gb.send(0, &g, BUF + 0x21_0000);
    assert_eq!(recv(&peer_b).unwrap(), g);
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "{:?}",
        start.elapsed()
    );
    assert!(
        ga.rxq.used.idx() <= 10,
        "A is throttled: {}",
        ga.rxq.used.idx()
    );
    assert_eq!(gc.rxq.used.idx(), 0);

    // With readable backends that cannot make progress, the loop sleeps instead of spinning.
    let before = ev.cpu_ticks();
    std::thread::sleep(Duration::from_millis(300));
    let used = ev.cpu_ticks() - before;
    assert!(used < 10, "event loop used {used} ticks in 300 ms");

    // C gets buffers: the deferred frame and the queued ones flow.
    for i in 0..4 {
        gc.add_rx_buffer(i, BUF + 0x30_0000 + u64::from(i) * 0x1000, 2048);
    }
    w(&mut gc.t, 0x50, 0);
    assert!(eventually(|| gc.rxq.used.idx() == 4));
    for t in [&mut ga.t, &mut gb.t, &mut gc.t] {
        w(t, 0x70, 0);
    }
}
