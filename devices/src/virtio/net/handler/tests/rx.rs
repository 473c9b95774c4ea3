//! RX path tests.

use std::time::{Duration, Instant};

use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VRING_DESC_F_NEXT};

use super::*;
use crate::virtio::net::handler::RX_BUDGET;
use crate::virtio::net::{
    MAX_FRAME_LEN, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_HDR_F_DATA_VALID,
    VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV4, VIRTIO_NET_HDR_GSO_TCPV6,
};

/// The host sends a frame of `dropped` payload bytes that cannot be delivered, then one of
/// `delivered` bytes: one pass drops the first and puts the second whole in chain 0 at BUF.
#[track_caller]
fn assert_first_dropped_second_delivered(s: &mut Setup, dropped: usize, delivered: usize) {
    s.host_send(&frame(0, 0, dropped, 1));
    let f = frame(0, 0, delivered, 2);
    s.host_send(&f);
    assert_eq!(s.h.process_rx().completed, 1);
    assert_eq!(s.h.stats().rx_dropped, 1);
    s.assert_rx_whole(0, 0, BUF, &f);
}

#[test]
fn rx_frame_lands_in_one_buffer() {
    let mem = mem();
    let mut s = Setup::new(&mem, 16, default_features());
    s.add_rx(0, &[(BUF, 2048, true)]);
    let f = frame(0, 0, 100, 0x44);
    s.host_send(&f);
    let stats = s.h.process_rx();
    assert_eq!(stats.completed, 1);
    s.assert_rx_whole(0, 0, BUF, &f);
    assert_eq!(s.irqs(), 1);
    // The guest's only buffer is used: the backend is left alone until it posts more.
    assert!(!s.h.has_pending_rx() && !s.h.wants_backend());
    let st = s.h.stats();
    assert_eq!((st.rx_frames, st.rx_bytes, st.rx_dropped, st.rx_copied), (1, 100, 0, 0));
    // Nothing more to read.
    assert_eq!(s.h.process_rx().completed, 0);
    assert_eq!(s.irqs(), 0);
}

#[test]
fn rx_chain_with_several_descriptors() {
    let mem = mem();
    let mut s = Setup::new(&mem, 16, default_features());
    s.add_rx(
        2,
        &[
            (BUF, 12, true),
            (BUF + 0x1000, 0, true),
            (BUF + 0x2000, 50, true),
            (BUF + 0x3000, 1000, true),
        ],
    );
    let f = frame(0, 0, 300, 0x55);
    s.host_send(&f);
    assert_eq!(s.h.process_rx().completed, 1);
    assert_eq!(s.rx_used(0), (2, f.len() as u32));
    let want = with_num_buffers(&f, 1);
    assert_eq!(s.read(BUF, 12), want[..12]);
    assert_eq!(s.read(BUF + 0x2000, 50), want[12..62]);
    assert_eq!(s.read(BUF + 0x3000, 250), want[62..]);
}

#[test]
fn rx_mergeable_frame_spans_two_chains() {
    let mem = mem();
    let mut s = Setup::new(&mem, 16, default_features());
    s.add_rx(0, &[(BUF, 1024, true)]);
    s.add_rx(1, &[(BUF + 0x1000, 1024, true)]);
    s.add_rx(2, &[(BUF + 0x2000, 1024, true)]);
    let f = frame(0, 0, 1500, 0x66);
    s.host_send(&f);
    assert_eq!(s.h.process_rx().completed, 2);
    assert_eq!(s.rx_used_idx(), 2);
    assert_eq!(s.rx_used(0), (0, 1024));
    assert_eq!(s.rx_used(1), (1, (f.len() - 1024) as u32));
    let want = with_num_buffers(&f, 2);
    assert_eq!(s.read(BUF, 1024), want[..1024]);
    assert_eq!(s.read(BUF + 0x1000, f.len() - 1024), want[1024..]);
    assert_eq!(s.irqs(), 1);

    // The third chain takes the next frame.
    let g = frame(0, 0, 60, 0x67);
    s.host_send(&g);
    assert_eq!(s.h.process_rx().completed, 1);
    s.assert_rx_whole(2, 2, BUF + 0x2000, &g);
}

#[test]
fn rx_largest_frame_across_many_chains() {
    let mem = mem();
    let mut s = Setup::new(&mem, 64, default_features());
    for i in 0..40u16 {
        s.add_rx(i, &[(BUF + u64::from(i) * 0x1000, 2048, true)]);
    }
    let f = frame(0, 0, MAX_FRAME_LEN - VNET_HDR_LEN, 0x68);
    s.host_send(&f);
    let chains = f.len().div_ceil(2048);
    assert_eq!(s.h.process_rx().completed, chains);
    let mut got = Vec::new();
    for i in 0..chains as u16 {
        let (head, len) = s.rx_used(i);
        assert_eq!(head, u32::from(i));
        got.extend(s.read(BUF + u64::from(i) * 0x1000, len as usize));
    }
    assert_eq!(got, with_num_buffers(&f, chains as u16));
}

#[test]
fn rx_without_mrg_rxbuf_uses_one_chain() {
    let mem = mem();
    let mut s = Setup::new(&mem, 16, feature(crate::virtio::VIRTIO_F_VERSION_1));
    s.add_rx(0, &[(BUF, 1024, true)]);
    s.add_rx(1, &[(BUF + 0x1000, 1024, true)]);
    // Too big for one buffer: dropped, the buffer is kept for the next frame.
    assert_first_dropped_second_delivered(&mut s, 1500, 500);
}

#[test]
fn rx_without_buffers_defers_until_kick() {
    let mem = mem();
    let mut s = Setup::new(&mem, 16, default_features());
    let f = frame(0, 0, 200, 0x77);
    let g = frame(0, 0, 201, 0x78);
    s.host_send(&f);
    s.host_send(&g);
    let stats = s.h.process_rx();
    assert_eq!(stats.completed, 0);
    // Nothing read: the frames wait in the backend, not in the handler's buffer.
    assert!(!s.h.has_pending_rx());
    assert!(!s.h.wants_backend(), "backend unwatched while no buffers");
    assert_eq!(s.irqs(), 0);
    // RX notifications are on, so the guest will kick.
    assert_eq!(s.rxq.used.flags(), 0);
    // A spurious wake-up changes nothing.
    assert_eq!(s.h.process_rx().completed, 0);

    // The guest adds buffers (one more than the frames) and kicks.
    s.add_rx(0, &[(BUF, 2048, true)]);
    s.add_rx(1, &[(BUF + 0x1000, 2048, true)]);
    s.add_rx(2, &[(BUF + 0x2000, 2048, true)]);
    assert_eq!(s.h.process_rx().completed, 2);
    assert!(!s.h.has_pending_rx() && s.h.wants_backend());
    assert_eq!(s.read(BUF, f.len()), with_num_buffers(&f, 1));
    assert_eq!(s.read(BUF + 0x1000, g.len()), with_num_buffers(&g, 1));
    // Both were read straight into the buffers.
    assert_eq!(s.h.stats().rx_copied, 0);
    // Not waiting for buffers any more: RX kicks are turned off.
    assert_ne!(s.rxq.used.flags(), 0);
}

#[test]
fn rx_event_idx_asks_for_a_kick_when_stuck() {
    let mem = mem();
    let features = default_features() | feature(VIRTIO_RING_F_EVENT_IDX);
    let mut s = Setup::new(&mem, 16, features);
    s.add_rx(0, &[(BUF, 2048, true)]);
    s.host_send(&frame(0, 0, 100, 1));
    s.host_send(&frame(0, 0, 100, 2));
    assert_eq!(s.h.process_rx().completed, 1);
    // The second frame waits in the backend, unwatched, for buffers.
    assert!(!s.h.has_pending_rx() && !s.h.wants_backend());
    // avail_event (after the used ring entries) = next avail index we wait for.
    assert_eq!(s.rxq.used.avail_event(), 1);
    s.add_rx(1, &[(BUF + 0x1000, 2048, true)]);
    s.add_rx(2, &[(BUF + 0x2000, 2048, true)]);
    assert_eq!(s.h.process_rx().completed, 1);
    assert!(!s.h.has_pending_rx() && s.h.wants_backend());
    assert_eq!(s.h.stats().rx_copied, 0);
}

#[test]
fn rx_mergeable_waits_for_enough_chains() {
    let mem = mem();
    let mut s = Setup::new(&mem, 16, default_features());
    s.add_rx(0, &[(BUF, 1024, true)]);
    let f = frame(0, 0, 1500, 0x79);
    s.host_send(&f);
    assert_eq!(s.h.process_rx().completed, 0, "one chain is not enough");
    assert!(s.h.has_pending_rx());
    s.add_rx(1, &[(BUF + 0x1000, 1024, true)]);
    assert_eq!(s.h.process_rx().completed, 2);
    assert_eq!(s.rx_used(0), (0, 1024));
    assert_eq!(s.rx_used(1), (1, (f.len() - 1024) as u32));
}

#[test]
fn rx_frame_bigger_than_the_whole_queue_is_dropped() {
    let mem = mem();
    let mut s = Setup::new(&mem, 4, default_features());
    for i in 0..4u16 {
        s.add_rx(i, &[(BUF + u64::from(i) * 0x1000, 100, true)]);
    }
    assert_first_dropped_second_delivered(&mut s, 1000, 50);
}

#[test]
fn rx_hostile_chains_are_returned_unused() {
    let mem = mem();
    let mut s = Setup::new(&mem, 16, default_features());
    let n = VRING_DESC_F_NEXT;
    let w = virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
    // 0: readable descriptor; 1: outside memory; 2: smaller than a vnet header;
    // 3 -> 4 -> 3: loop; 5: next out of range; 6: the only good one.
    s.add_rx(0, &[(BUF, 2048, false)]);
    s.add_rx(1, &[(MEM_SIZE as u64 - 100, 2048, true)]);
    s.add_rx(2, &[(BUF, 8, true)]);
    s.rxq.raw_desc(3, BUF, 1024, w | n, 4);
    s.rxq.raw_desc(4, BUF, 1024, w | n, 3);
    s.rxq.publish(3);
    s.rxq.raw_desc(5, BUF, 1024, w | n, 300);
    s.rxq.publish(5);
    s.add_rx(6, &[(BUF + 0x1000, 2048, true)]);
    let f = frame(0, 0, 100, 9);
    s.host_send(&f);
    assert_eq!(s.h.process_rx().completed, 6);
    for (i, head) in [0, 1, 2, 3, 5].into_iter().enumerate() {
        assert_eq!(s.rx_used(i as u16), (head, 0), "chain {head}");
    }
    s.assert_rx_whole(5, 6, BUF + 0x1000, &f);
    assert_eq!(s.h.stats().rx_bad_chains, 5);

    // Head index out of range (it cannot be returned either), then a broken avail ring: no
    // panic, the frame is kept: first in the backend (no buffer), then read and pending.
    s.rxq.publish(100);
    s.host_send(&f);
    assert_eq!(s.h.process_rx().completed, 0);
    assert!(!s.h.has_pending_rx() && !s.h.wants_backend());
    let avail_idx = s.rxq.vq.avail().idx();
    avail_idx.store(avail_idx.load().wrapping_add(50));
    assert_eq!(s.h.process_rx().completed, 0);
    assert!(s.h.has_pending_rx() && !s.h.wants_backend());
}

#[test]
fn rx_bad_frames_from_the_backend_are_dropped() {
    let mem = mem();
    let mut s = Setup::new(&mem, 16, default_features());
    s.add_rx(0, &[(BUF, 2048, true)]);
    s.host_send(&vec![0u8; MAX_FRAME_LEN + 100]);
    s.host_send(&[1, 2, 3]);
    s.host_send(&[0u8; VNET_HDR_LEN]);
    let f = frame(0, 0, 64, 3);
    s.host_send(&f);
    assert_eq!(s.h.process_rx().completed, 1);
    assert_eq!(s.h.stats().rx_dropped, 3);
    assert_eq!(s.read(BUF, f.len()), with_num_buffers(&f, 1));
}

#[test]
fn rx_header_must_match_accepted_offloads() {
    let mem = mem();
    let csum = VIRTIO_NET_HDR_F_NEEDS_CSUM as u8;
    let valid = VIRTIO_NET_HDR_F_DATA_VALID as u8;
    let tso4 = VIRTIO_NET_HDR_GSO_TCPV4 as u8;
    let tso6 = VIRTIO_NET_HDR_GSO_TCPV6 as u8;

    // No offloads: partial checksums and GSO are dropped, DATA_VALID is cleared.
    let mut s = Setup::new(&mem, 16, default_features());
    for i in 0..3u16 {
        s.add_rx(i, &[(BUF + u64::from(i) * 0x1000, 2048, true)]);
    }
    s.host_send(&frame(csum, 0, 100, 1));
    s.host_send(&frame(0, tso4, 100, 2));
    s.host_send(&frame(0, 200, 100, 3));
    let f = frame(valid, 0, 100, 4);
    s.host_send(&f);
    assert_eq!(s.h.process_rx().completed, 1);
    assert_eq!(s.h.stats().rx_dropped, 3);
    let mut want = with_num_buffers(&f, 1);
    want[0] = 0;
    assert_eq!(s.read(BUF, f.len()), want);

    // GUEST_CSUM + GUEST_TSO4: passed through unchanged; TSO6 still refused.
    let acked =
        default_features() | feature(VIRTIO_NET_F_GUEST_CSUM) | feature(VIRTIO_NET_F_GUEST_TSO4);
    let mut s = Setup::new(&mem, 16, acked);
    s.add_rx(0, &[(BUF, 4096, true)]);
    s.add_rx(1, &[(BUF + 0x1000, 4096, true)]);
    let f = frame(csum | valid, tso4, 2000, 5);
    s.host_send(&frame(csum, tso6, 100, 6));
    s.host_send(&f);
    assert_eq!(s.h.process_rx().completed, 1);
    assert_eq!(s.h.stats().rx_dropped, 1);
    assert_eq!(s.read(BUF, f.len()), with_num_buffers(&f, 1));
}

#[test]
fn rx_budget_bounds_one_pass() {
    let mem = mem();
    let mut s = Setup::new(&mem, 128, default_features());
    let n = RX_BUDGET as u16 + 5;
    for i in 0..n {
        s.add_rx(i, &[(BUF + u64::from(i) * 0x100, 256, true)]);
        s.host_send(&frame(0, 0, 60, i as u8));
    }
    assert_eq!(s.h.process_rx().completed, RX_BUDGET);
    // Still readable: the level-triggered backend fd brings us back.
    assert!(s.h.wants_backend());
    assert_eq!(s.h.process_rx().completed, 5);
    assert_eq!(s.h.stats().rx_frames, u64::from(n));
}

#[test]
fn rx_rate_limited_resumes_on_timer() {
    let mem = mem();
    let mut s = Setup::new(&mem, 16, default_features());
    s.h.set_rate_limiters(Some(byte_limiter(100_000, 20_000)), None);
    for i in 0..4u16 {
        s.add_rx(i, &[(BUF + u64::from(i) * 0x4000, 0x4000, true)]);
    }
    for i in 0..3u8 {
        s.host_send(&frame(0, 0, 10_000, i));
    }
    let start = Instant::now();
    let stats = s.h.process_rx();
    assert_eq!(stats.completed, 2);
    assert!(stats.throttled && s.h.rx_throttled());
    assert!(s.h.has_pending_rx() && !s.h.wants_backend());
    // A kick while throttled delivers nothing.
    assert_eq!(s.h.process_rx().completed, 0);

    fire_timer(s.h.rx_limiter.as_mut().unwrap());
    assert!(s.h.wants_backend() || s.h.has_pending_rx());
    assert_eq!(s.h.process_rx().completed, 1);
    assert!(start.elapsed() >= Duration::from_millis(80));
    assert_eq!(
        s.read(BUF + 0x8000, VNET_HDR_LEN + 10_000),
        with_num_buffers(&frame(0, 0, 10_000, 2), 1)
    );
    assert!(!s.h.has_pending_rx() && s.h.wants_backend());
    assert_eq!(s.h.stats().rx_throttled, 1);
}

#[test]
fn rx_backend_eof_stops_reading() {
    let mem = mem();
    let mut s = Setup::new(&mem, 16, default_features());
    s.add_rx(0, &[(BUF, 2048, true)]);
    let f = frame(0, 0, 100, 1);
    s.host_send(&f);
    let (_, other) = SeqpacketBackend::pair().unwrap();
    s.peer = other; // closes the peer: the queued frame, then EOF
    assert_eq!(s.h.process_rx().completed, 1);
    assert_eq!(s.h.process_rx().completed, 0);
}
