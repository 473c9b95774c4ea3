//! RX zero copy: frames read straight into the guest's buffers, and the copy path where the
//! posted buffers do not take the frame.

use super::*;
use crate::virtio::net::handler::rx::{EXPECT_MIN, HOLD_AHEAD};
use crate::virtio::net::MAX_FRAME_LEN;
use crate::virtio::DataPlane;

#[test]
fn rx_frame_is_read_into_guest_buffers_before_delivery() {
    // The limiter holds the second frame back after it was read. With zero copy its payload
    // is already in the guest buffer (not used yet, header not written); through the copy
    // path the buffer is untouched until delivery.
    for zero_copy in [true, false] {
        let mem = mem();
        let mut s = Setup::new(&mem, 16, default_features());
        s.h.set_rx_zero_copy(zero_copy);
        s.h.set_rate_limiters(Some(byte_limiter(100_000, 3_000)), None);
        s.add_rx(0, &[(BUF, 4096, true)]);
        s.add_rx(1, &[(BUF + 0x1000, 4096, true)]);
        let f = frame(0, 0, 2000, 0x21);
        let g = frame(0, 0, 2000, 0x22);
        s.host_send(&f);
        s.host_send(&g);
        let st = s.h.process_rx();
        assert!(st.throttled && st.completed == 1, "{zero_copy}: {st:?}");
        assert_eq!(s.rx_used_idx(), 1);
        let in_guest = s.read(BUF + 0x1000 + VNET_HDR_LEN as u64, 2000) == g[VNET_HDR_LEN..];
        assert_eq!(in_guest, zero_copy);
        assert_eq!(s.read(BUF + 0x1000, VNET_HDR_LEN), vec![0; VNET_HDR_LEN]);

        fire_timer(s.h.rx_limiter.as_mut().unwrap());
        assert_eq!(s.h.process_rx().completed, 1);
        s.assert_rx_whole(0, 0, BUF, &f);
        s.assert_rx_whole(1, 1, BUF + 0x1000, &g);
    }
}

#[test]
fn rx_header_split_over_descriptors_and_buffer_straddling_regions() {
    // Two adjacent regions: chain 1's buffer crosses the boundary (two iovecs); chain 0's
    // first descriptor is shorter than the header.
    let mem = GuestMemoryMmap::<()>::from_ranges(&[
        (GuestAddress(0), 0x20_0000),
        (GuestAddress(0x20_0000), 0x20_0000),
    ])
    .unwrap();
    let mut s = Setup::new(&mem, 16, default_features());
    let straddle = 0x20_0000 - 500;
    let layout = [
        vec![(BUF, 5), (BUF + 0x100, 20)],
        vec![(straddle, 2000)],
        vec![(BUF + 0x3000, 1000)],
    ];
    for (i, bufs) in layout.iter().enumerate() {
        let descs: Vec<D> = bufs.iter().map(|&(a, l)| (a, l, true)).collect();
        s.add_rx((i * 4) as u16, &descs);
    }
    // Chain heads are 0, 4, 8: index the layout by head.
    let by_head: Vec<Vec<(u64, u32)>> = (0..9)
        .map(|h| if h % 4 == 0 { layout[h / 4].clone() } else { Vec::new() })
        .collect();
    let f = frame(0, 0, 2500, 0x31);
    s.host_send(&f);
    assert_eq!(s.h.process_rx().completed, 3);
    assert_eq!(s.rx_used(0), (0, 25));
    assert_eq!(s.rx_used(1), (4, 2000));
    assert_eq!(s.rx_used(2), (8, (f.len() - 2025) as u32));
    assert_eq!(used_bytes(&s, 0, 3, &by_head), with_num_buffers(&f, 3));
}

#[test]
fn rx_frame_bigger_than_the_posted_buffers_takes_the_copy_path() {
    let mem = mem();
    let mut s = Setup::new(&mem, 16, default_features());
    let layout: Vec<Vec<(u64, u32)>> = (0..4u64)
        .map(|i| vec![(BUF + i * 0x1000, if i < 2 { 1024 } else { 2048 })])
        .collect();
    s.add_rx(0, &[(BUF, 1024, true)]);
    s.add_rx(1, &[(BUF + 0x1000, 1024, true)]);
    // Read with 2 KiB posted: its head lands in chains 0 and 1, the rest in the copy buffer.
    let f = frame(0, 0, 3000, 0x41);
    s.host_send(&f);
    assert_eq!(s.h.process_rx().completed, 0);
    assert!(s.h.has_pending_rx() && !s.h.wants_backend());
    s.add_rx(2, &[(BUF + 0x2000, 2048, true)]);
    assert_eq!(s.h.process_rx().completed, 3);
    assert_eq!(used_bytes(&s, 0, 3, &layout), with_num_buffers(&f, 3));
    assert_eq!((s.h.stats().rx_frames, s.h.stats().rx_copied), (1, 1));
    // The next frame fits what is posted: zero copy again.
    s.add_rx(3, &[(BUF + 0x3000, 2048, true)]);
    let g = frame(0, 0, 100, 0x42);
    s.host_send(&g);
    assert_eq!(s.h.process_rx().completed, 1);
    s.assert_rx_whole(3, 3, BUF + 0x3000, &g);
    assert_eq!((s.h.stats().rx_frames, s.h.stats().rx_copied), (2, 1));
}

#[test]
fn rx_window_longer_than_iov_max_is_cut() {
    // 128 chains of 8 descriptors of 16 bytes: 1024 guest iovecs, more than one readv takes
    // with the copy buffer's. A first frame filling them all grows the window to the largest
    // frame (it takes the copy path: the window began at a full-size Ethernet frame); the
    // same frame again, into all 128 reposted chains, is read into a window cut at the
    // iovec limit and finished through the copy buffer.
    let mem = mem();
    let mut s = Setup::new(&mem, 1024, default_features());
    let layout: Vec<Vec<(u64, u32)>> = (0..128u64)
        .map(|c| (0..8u64).map(|d| (BUF + c * 0x400 + d * 0x20, 16)).collect())
        .collect();
    let mut by_head = vec![Vec::new(); 1024];
    let post = |s: &Setup| {
        for (c, bufs) in layout.iter().enumerate() {
            let descs: Vec<D> = bufs.iter().map(|&(a, l)| (a, l, true)).collect();
            s.add_rx((c * 8) as u16, &descs);
        }
    };
    for (c, bufs) in layout.iter().enumerate() {
        by_head[c * 8] = bufs.clone();
    }
    let f = frame(0, 0, 128 * 128 - VNET_HDR_LEN, 0x51);
    for round in 0..2u16 {
        post(&s);
        s.host_send(&f);
        assert_eq!(s.h.process_rx().completed, 128, "round {round}");
        assert!(used_bytes(&s, round * 128, 128, &by_head) == with_num_buffers(&f, 128));
        assert_eq!(s.h.rx_expect.bytes, MAX_FRAME_LEN);
    }
}

#[test]
fn rx_window_follows_the_frames() {
    // 1 KiB buffers, reposted as they are used. Small frames: the window covers a full-size
    // Ethernet frame (2 chains), and popping takes HOLD_AHEAD windows' worth at once. A
    // longer frame takes the copy path once and the window grows to the largest frame (65
    // chains; popping takes all the guest posted); it shrinks to the longest frame of the
    // last EXPECT_PERIOD frames, then to the minimum. Every frame arrives whole.
    let mem = mem();
    let mut s = Setup::new(&mem, 256, default_features());
    let layout: Vec<Vec<(u64, u32)>> =
        (0..256u64).map(|i| vec![(BUF + i * 0x400, 1024)]).collect();
    let mut posted = 0u16;
    let mut used = 0u16;
    let mut post = |s: &Setup, n: u16| {
        for _ in 0..n {
            let slot = posted % 256;
            s.add_rx(slot, &[(BUF + u64::from(slot) * 0x400, 1024, true)]);
            posted += 1;
        }
    };
    post(&s, 200);
    let mut deliver = |s: &mut Setup, f: &[u8], chains: u16| {
        s.host_send(f);
        assert_eq!(s.h.process_rx().completed, usize::from(chains));
        assert_eq!(used_bytes(s, used, chains, &layout), with_num_buffers(f, chains));
        used += chains;
        used
    };
    let small = frame(0, 0, 100, 0x81);
    let used_now = deliver(&mut s, &small, 1);
    // Popped for the first read: HOLD_AHEAD full-size frames' worth of 1 KiB chains; one
    // took the frame, the rest are held (and enough for the next read: no more popped).
    let ahead = (HOLD_AHEAD * EXPECT_MIN).div_ceil(1024) as u16;
    assert_eq!(s.h.process_rx().completed, 0);
    assert_eq!(s.h.rx.queue.next_avail(), ahead);
    assert_eq!(s.h.rx.queue.next_avail() - used_now, ahead - 1);
    let big = frame(0, 0, 5000, 0x82);
    deliver(&mut s, &big, 5);
    assert_eq!(s.h.rx_expect.bytes, MAX_FRAME_LEN);
    // Too few held for a largest frame: pops what the guest posted (less than HOLD_AHEAD
    // largest frames).
    assert_eq!(s.h.process_rx().completed, 0);
    assert_eq!(s.h.rx.queue.next_avail(), 200);
    // The big frame and 255 more make a period: the window becomes the big frame's length.
    for i in 0..255u16 {
        assert_eq!(s.h.rx_expect.bytes, MAX_FRAME_LEN, "frame {i}");
        post(&s, 1);
        deliver(&mut s, &frame(0, 0, 200, i as u8), 1);
    }
    assert_eq!(s.h.rx_expect.bytes, big.len());
    for i in 0..256u16 {
        post(&s, 1);
        deliver(&mut s, &frame(0, 0, 300, i as u8), 1);
    }
    assert_eq!(s.h.rx_expect.bytes, EXPECT_MIN);
}

#[test]
fn rx_without_mrg_rxbuf_reads_a_large_frame_into_its_one_chain() {
    // "Big packets" guests (GUEST_TSO without MRG_RXBUF) post one large chain per frame.
    let mem = mem();
    let mut s = Setup::new(&mem, 16, feature(crate::virtio::VIRTIO_F_VERSION_1));
    s.add_rx(0, &[(BUF, 12, true), (BUF + 0x1000, MAX_FRAME_LEN as u32, true)]);
    s.add_rx(2, &[(BUF + 0x2_0000, MAX_FRAME_LEN as u32, true)]);
    let f = frame(0, 0, 60_000, 0x61);
    let g = frame(0, 0, 100, 0x62);
    s.host_send(&f);
    s.host_send(&g);
    assert_eq!(s.h.process_rx().completed, 2);
    assert_eq!(s.rx_used(0), (0, f.len() as u32));
    assert_eq!(s.read(BUF, 12), with_num_buffers(&f, 1)[..12]);
    assert!(s.read(BUF + 0x1000, f.len() - 12) == f[12..]);
    s.assert_rx_whole(1, 2, BUF + 0x2_0000, &g);
}

#[test]
fn rx_without_mrg_rxbuf_offers_the_whole_chain_to_a_read() {
    // The window (a full-size Ethernet frame at first) limits only MRG_RXBUF reads: without
    // it a large frame is read straight into its one chain. The limiter holds the large frame
    // back after it was read, so its payload is in the guest buffer before delivery.
    let mem = mem();
    let mut s = Setup::new(&mem, 64, feature(crate::virtio::VIRTIO_F_VERSION_1));
    s.h.set_rate_limiters(Some(byte_limiter(100_000, 200)), None);
    s.add_rx(0, &[(BUF, 12, true), (BUF + 0x1000, MAX_FRAME_LEN as u32, true)]);
    // A "big packets" chain as Linux posts it: 4 KiB pieces, 17 descriptors.
    let pieces: Vec<D> = (0..17u64).map(|i| (BUF + 0x2_0000 + i * 0x1000, 0x1000, true)).collect();
    s.add_rx(2, &pieces);
    let f = frame(0, 0, 100, 0x63);
    let g = frame(0, 0, 60_000, 0x64);
    s.host_send(&f);
    s.host_send(&g);
    let st = s.h.process_rx();
    assert!(st.throttled && st.completed == 1, "{st:?}");
    assert!(s.read(BUF + 0x2_0000 + VNET_HDR_LEN as u64, g.len() - VNET_HDR_LEN) == g[VNET_HDR_LEN..]);
    assert_eq!(s.read(BUF + 0x2_0000, VNET_HDR_LEN), vec![0; VNET_HDR_LEN]);
}

#[test]
fn rx_bad_descriptor_behind_held_chains_fails_only_that_chain() {
    let mem = mem();
    let mut s = Setup::new(&mem, 16, default_features());
    s.add_rx(0, &[(BUF, 1024, true)]);
    // Crosses the end of guest memory, then readable: both returned unused.
    s.add_rx(1, &[(MEM_SIZE as u64 - 16, 1024, true)]);
    s.add_rx(2, &[(BUF + 0x1000, 1024, false)]);
    s.add_rx(3, &[(BUF + 0x2000, 1024, true)]);
    let f = frame(0, 0, 1500, 0x71);
    s.host_send(&f);
    // Holding chains for the read returns the two bad ones first; the frame spans 0 and 3.
    assert_eq!(s.h.process_rx().completed, 4);
    assert_eq!(s.rx_used(0), (1, 0));
    assert_eq!(s.rx_used(1), (2, 0));
    assert_eq!(s.rx_used(2), (0, 1024));
    assert_eq!(s.rx_used(3), (3, (f.len() - 1024) as u32));
    let mut got = s.read(BUF, 1024);
    got.extend(s.read(BUF + 0x2000, f.len() - 1024));
    assert_eq!(got, with_num_buffers(&f, 2));
    assert_eq!(s.h.stats().rx_bad_chains, 2);
}

#[test]
fn rx_snapshot_resumes_at_the_oldest_held_chain() {
    let mem = mem();
    let mut s = Setup::new(&mem, 16, default_features());
    for i in 0..3u16 {
        s.add_rx(i, &[(BUF + u64::from(i) * 0x1000, 1024, true)]);
    }
    // Nothing to read, but chains are held for the next read (all three: fewer than
    // HOLD_AHEAD full-size frames take).
    assert_eq!(s.h.process_rx().completed, 0);
    assert_eq!(s.h.rx.queue.next_avail(), 3);
    assert_eq!(s.h.queue_positions()[0].next_avail, 0);
    s.host_send(&frame(0, 0, 100, 1));
    assert_eq!(s.h.process_rx().completed, 1);
    let pos = s.h.queue_positions()[0];
    assert_eq!((pos.next_avail, pos.next_used), (1, 1));
}
