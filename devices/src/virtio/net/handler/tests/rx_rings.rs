//! RX through the rings read in place (`SplitRing`) and its fallbacks: an indirect chain
//! among in-place ones, rings across two memory regions, and the used-ring interrupt when a
//! frame's chains are returned in one batch (EVENT_IDX).

use virtio_bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};
use virtio_queue::desc::split::Descriptor;
use vm_memory::ByteValued;

use super::*;

#[test]
fn rx_indirect_chain_among_in_place_ones_is_delivered() {
    // Chain 1 is an indirect table of two buffers (not offered, but virtio-queue follows
    // it): the in-place pop hands that one chain to virtio-queue and goes on after it.
    let mem = mem();
    let mut s = Setup::new(&mem, 16, default_features());
    let table = BUF + 0x10_0000;
    let layout = vec![
        vec![(BUF, 1000)],
        vec![(BUF + 0x1000, 500), (BUF + 0x2000, 700)],
        vec![(BUF + 0x3000, 4096)],
    ];
    s.add_rx(0, &[(BUF, 1000, true)]);
    let [(a0, l0), (a1, l1)] = [layout[1][0], layout[1][1]];
    let d0 = Descriptor::new(a0, l0, (VRING_DESC_F_WRITE | VRING_DESC_F_NEXT) as u16, 1);
    let d1 = Descriptor::new(a1, l1, VRING_DESC_F_WRITE as u16, 0);
    s.write(table, d0.as_slice());
    s.write(table + 16, d1.as_slice());
    s.rxq.raw_desc(1, table, 32, VRING_DESC_F_INDIRECT, 0);
    s.rxq.publish(1);
    s.add_rx(2, &[(BUF + 0x3000, 4096, true)]);
    // 2012 bytes: chains 0 and 1 (in place); then 1012 bytes: chain 2.
    let f = frame(0, 0, 2000, 0x41);
    let g = frame(0, 0, 1000, 0x42);
    s.host_send(&f);
    s.host_send(&g);
    assert_eq!(s.h.process_rx().completed, 3);
    assert_eq!(s.h.stats().rx_bad_chains, 0);
    assert_eq!(s.rx_used(0), (0, 1000));
    assert_eq!(s.rx_used(1), (1, 1012));
    assert_eq!(s.rx_used(2), (2, g.len() as u32));
    let mut want = with_num_buffers(&f, 2);
    want.extend(with_num_buffers(&g, 1));
    assert_eq!(used_bytes(&s, 0, 3, &layout), want);
}

#[test]
fn rx_rings_across_two_regions_are_used_through_virtio_queue() {
    // The RX used ring (at 0x8000) crosses the boundary of two adjacent regions: no ring
    // access in place; chains are popped and returned one at a time, with the same result.
    let mem = GuestMemoryMmap::<()>::from_ranges(&[
        (GuestAddress(0), 0x8040),
        (GuestAddress(0x8040), MEM_SIZE - 0x8040),
    ])
    .unwrap();
    let mut s = Setup::new(&mem, 16, default_features());
    let layout: Vec<Vec<(u64, u32)>> = (0..6).map(|i| vec![(BUF + i * 0x1000, 2048)]).collect();
    for (i, bufs) in layout.iter().enumerate() {
        s.add_rx(i as u16, &[(bufs[0].0, bufs[0].1, true)]);
    }
    let f = frame(0, 0, 3000, 0x51);
    let g = frame(0, 0, 5000, 0x52);
    s.host_send(&f);
    s.host_send(&g);
    // 3012 bytes: 2 chains; 5012 bytes: 3 chains.
    assert_eq!(s.h.process_rx().completed, 5);
    assert_eq!(s.rx_used_idx(), 5);
    let mut want = with_num_buffers(&f, 2);
    want.extend(with_num_buffers(&g, 3));
    assert_eq!(used_bytes(&s, 0, 5, &layout), want);
    assert_eq!(s.rx_used(4), (4, (g.len() - 4096) as u32));
}

#[test]
fn rx_frame_chains_returned_at_once_interrupt_per_used_event() {
    // EVENT_IDX, used_event 4: a frame filling chains 0..3 does not reach it (no
    // interrupt); the next, filling 3..6, passes it (one interrupt).
    let mem = mem();
    let features = default_features() | feature(VIRTIO_RING_F_EVENT_IDX);
    let mut s = Setup::new(&mem, 16, features);
    for i in 0..8u16 {
        s.add_rx(i, &[(BUF + u64::from(i) * 0x1000, 1024, true)]);
    }
    let used_event = s.rxq.vq.avail_addr().0 + 4 + 2 * 16;
    s.write(used_event, &4u16.to_le_bytes());
    s.host_send(&frame(0, 0, 2500, 0x61));
    assert_eq!(s.h.process_rx().completed, 3);
    assert_eq!(s.irqs(), 0);
    s.host_send(&frame(0, 0, 2500, 0x62));
    assert_eq!(s.h.process_rx().completed, 3);
    assert_eq!(s.irqs(), 1);
    assert_eq!(s.rx_used_idx(), 6);
}
