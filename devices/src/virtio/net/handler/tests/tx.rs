//! TX path tests.

use std::time::{Duration, Instant};

use virtio_bindings::virtio_ring::VRING_DESC_F_NEXT;
use vm_memory::{GuestAddress, GuestMemoryMmap};

use super::*;
use crate::virtio::net::handler::TX_BUDGET;
use crate::virtio::net::{MAX_FRAME_LEN, VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV4};

#[test]
fn tx_frame_arrives_with_header_intact() {
    let mem = mem();
    let mut s = Setup::new(&mem, 16, default_features());
    // A TSO frame with a partial checksum: the header must pass through untouched.
    let mut f = frame(
        VIRTIO_NET_HDR_F_NEEDS_CSUM as u8,
        VIRTIO_NET_HDR_GSO_TCPV4 as u8,
        1500,
        0x11,
    );
    f[2..10].copy_from_slice(&[54, 0, 0xa8, 0x05, 34, 0, 16, 0]);
    s.write(BUF, &f);
    s.add_tx(0, &[(BUF, f.len() as u32, false)]);
    let stats = s.h.process_tx();
    assert_eq!(stats.completed, 1);
    assert!(!stats.throttled);
    assert_eq!(s.host_recv(1000).unwrap(), f);
    assert_eq!(s.tx_used_idx(), 1);
    assert_eq!(s.tx_used(0), (0, 0));
    assert_eq!(s.irqs(), 1);
    let st = s.h.stats();
    assert_eq!((st.tx_frames, st.tx_bytes, st.tx_dropped), (1, 1500, 0));
    // Nothing more: no frame, no interrupt.
    assert_eq!(s.h.process_tx().completed, 0);
    assert_eq!(s.host_recv(0), None);
    assert_eq!(s.irqs(), 0);
}

#[test]
fn tx_chain_spanning_several_descriptors() {
    let mem = mem();
    let mut s = Setup::new(&mem, 16, default_features());
    let f = frame(0, 0, 3000, 0x22);
    // Header alone, an empty descriptor, then the payload in three scattered pieces.
    let pieces: [(u64, std::ops::Range<usize>); 4] = [
        (BUF, 0..12),
        (BUF + 0x8000, 12..1000),
        (BUF + 0x2000, 1000..1001),
        (BUF + 0x4000, 1001..3012),
    ];
    for (addr, r) in &pieces {
        s.write(*addr, &f[r.clone()]);
    }
    let mut descs: Vec<D> = pieces
        .iter()
        .map(|(a, r)| (*a, r.len() as u32, false))
        .collect();
    descs.insert(1, (BUF + 0x9000, 0, false));
    s.add_tx(3, &descs);
    assert_eq!(s.h.process_tx().completed, 1);
    assert_eq!(s.host_recv(1000).unwrap(), f);
    assert_eq!(s.tx_used(0), (3, 0));
}

#[test]
fn tx_buffer_straddling_two_memory_regions() {
    // Two adjacent regions: one descriptor crossing the boundary becomes two iovecs.
    let mem = GuestMemoryMmap::<()>::from_ranges(&[
        (GuestAddress(0), 0x20_0000),
        (GuestAddress(0x20_0000), 0x20_0000),
    ])
    .unwrap();
    let mut s = Setup::new(&mem, 16, default_features());
    let f = frame(0, 0, 4000, 0x33);
    let start = 0x20_0000 - 1000;
    s.write(start, &f);
    s.add_tx(0, &[(start, f.len() as u32, false)]);
    assert_eq!(s.h.process_tx().completed, 1);
    assert_eq!(s.host_recv(1000).unwrap(), f);
}

#[test]
fn tx_several_frames_one_interrupt_and_budget() {
    let mem = mem();
    let qsize = 128;
    let mut s = Setup::new(&mem, qsize, default_features());
    let n = TX_BUDGET as u16 + 10;
    for i in 0..n {
        let f = frame(0, 0, 60, i as u8);
        let addr = BUF + u64::from(i) * 0x100;
        s.write(addr, &f);
        s.add_tx(i, &[(addr, f.len() as u32, false)]);
    }
    // The first pass stops at the budget and re-kicks the TX eventfd.
    let stats = s.h.process_tx();
    assert_eq!(stats.completed, TX_BUDGET);
    assert_eq!(s.h.tx_evt().read().unwrap(), 1, "self-kick");
    assert_eq!(s.irqs(), 1);
    assert_eq!(s.h.process_tx().completed, 10);
    assert!(s.h.tx_evt().read().is_err(), "no self-kick when done");
    for i in 0..n {
        assert_eq!(
            s.host_recv(1000).unwrap(),
            frame(0, 0, 60, i as u8),
            "frame {i}"
        );
        assert_eq!(s.tx_used(i), (u32::from(i), 0));
    }
}

#[test]
fn tx_hostile_chains_are_dropped() {
    let mem = mem();
    let big = (MAX_FRAME_LEN / 2 + 1) as u32;
    let cases: Vec<(&str, Vec<D>)> = vec![
        (
            "writable descriptor",
            vec![(BUF, 12, false), (BUF + 0x1000, 100, true)],
        ),
        ("outside memory", vec![(MEM_SIZE as u64 - 50, 100, false)]),
        ("address wraps", vec![(u64::MAX - 10, 100, false)]),
        ("header only", vec![(BUF, 12, false)]),
        ("empty", vec![(BUF, 0, false)]),
        ("too long", vec![(BUF, big, false), (BUF, big, false)]),
    ];
    for (name, descs) in cases {
        let mut s = Setup::new(&mem, 16, default_features());
        s.add_tx(0, &descs);
        assert_eq!(s.h.process_tx().completed, 1, "{name}");
        assert_eq!(s.tx_used(0), (0, 0), "{name}");
        assert_eq!(s.host_recv(0), None, "{name}");
        assert_eq!(s.h.stats().tx_dropped, 1, "{name}");
    }
}

#[test]
fn tx_broken_chains_are_dropped() {
    let mem = mem();
    let n = VRING_DESC_F_NEXT;
    let cases: Vec<(&str, Vec<RawD>)> = vec![
        ("next out of range", vec![(0, BUF, 100, n, 200)]),
        ("loop", vec![(0, BUF, 100, n, 1), (1, BUF, 100, n, 0)]),
        ("self loop", vec![(0, BUF, 100, n, 0)]),
        (
            "length overflow",
            vec![(0, BUF, u32::MAX, n, 1), (1, BUF, 100, 0, 0)],
        ),
    ];
    for (name, descs) in cases {
        let mut s = Setup::new(&mem, 16, default_features());
        s.txq.raw_chain(&descs);
        assert_eq!(s.h.process_tx().completed, 1, "{name}");
        assert_eq!(s.tx_used(0), (0, 0), "{name}");
        assert_eq!(s.host_recv(0), None, "{name}");
    }
    // Then a good frame still goes through.
    let mut s = Setup::new(&mem, 16, default_features());
    s.txq.raw_chain(&[(0, BUF, 100, n, 0)]);
    let f = frame(0, 0, 100, 1);
    s.write(BUF + 0x1000, &f);
    s.add_tx(5, &[(BUF + 0x1000, f.len() as u32, false)]);
    assert_eq!(s.h.process_tx().completed, 2);
    assert_eq!(s.host_recv(1000).unwrap(), f);
}

#[test]
fn tx_bad_avail_ring() {
    let mem = mem();
    // Head index beyond the queue: dropped, nothing can go in the used ring.
    let mut s = Setup::new(&mem, 16, default_features());
    s.txq.publish(100);
    assert_eq!(s.h.process_tx().completed, 0);
    assert_eq!(s.tx_used_idx(), 0);
    assert_eq!(s.host_recv(0), None);

    // avail.idx far ahead: the queue is refused, nothing happens.
    let mut s = Setup::new(&mem, 16, default_features());
    s.txq.vq.avail().idx().store(16 * 3);
    assert_eq!(s.h.process_tx().completed, 0);
    assert_eq!(s.tx_used_idx(), 0);
}

#[test]
fn tx_backend_gone_drops_frames() {
    let mem = mem();
    let mut s = Setup::new(&mem, 16, default_features());
    let f = frame(0, 0, 100, 3);
    s.write(BUF, &f);
    s.add_tx(0, &[(BUF, f.len() as u32, false)]);
    // Closing the peer: the write fails with EPIPE (and no SIGPIPE kills the test).
    let (_, other) = crate::virtio::net::SeqpacketBackend::pair().unwrap();
    s.peer = other;
    assert_eq!(s.h.process_tx().completed, 1);
    assert_eq!(s.tx_used(0), (0, 0));
    assert_eq!(s.h.stats().tx_dropped, 1);
    assert_eq!(s.h.stats().tx_frames, 0);
}

#[test]
fn tx_rate_limited_resumes_on_timer() {
    let mem = mem();
    let mut s = Setup::new(&mem, 16, default_features());
    // 100 KB/s, 20 KB burst: two 10 KB frames pass, the third waits ~100 ms.
    s.h.set_rate_limiters(None, Some(byte_limiter(100_000, 20_000)));
    for i in 0..3u16 {
        let f = frame(0, 0, 10_000, i as u8);
        let addr = BUF + u64::from(i) * 0x4000;
        s.write(addr, &f);
        s.add_tx(i, &[(addr, f.len() as u32, false)]);
    }
    let start = Instant::now();
    let stats = s.h.process_tx();
    assert_eq!(stats.completed, 2);
    assert!(stats.throttled && s.h.tx_throttled());
    assert_eq!(s.tx_used_idx(), 2);
    // A guest kick while throttled does nothing.
    let stats = s.h.process_tx();
    assert_eq!(stats.completed, 0);
    assert!(stats.throttled);
    for i in 0..2 {
        assert_eq!(s.host_recv(1000).unwrap(), frame(0, 0, 10_000, i));
    }
    assert_eq!(s.host_recv(0), None);

    fire_timer(s.h.tx_limiter.as_mut().unwrap());
    assert!(!s.h.tx_throttled());
    assert_eq!(s.h.process_tx().completed, 1);
    assert!(start.elapsed() >= Duration::from_millis(80));
    assert_eq!(s.host_recv(1000).unwrap(), frame(0, 0, 10_000, 2));
    assert_eq!(s.tx_used(2), (2, 0));
    assert_eq!(s.h.stats().tx_throttled, 1);
}
