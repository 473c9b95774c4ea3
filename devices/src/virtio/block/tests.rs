//! Device-level tests: Block behind an MmioTransport, with a real EventManager running on its
//! own thread (as in the VMM). No KVM: the test plays the guest driver through the register
//! window and a TestQueue.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::tempfile::TempFile;

use super::*;
use crate::rate_limiter::RateLimiterConfig;
use crate::virtio::test_utils::{
    driver_init, guest_memory, negotiate, r, w, wait_irq, EventLoop, TestQueue, ALL_OK,
};
use crate::virtio::{MmioTransport, VirtioDevice, TYPE_BLOCK, VIRTIO_F_VERSION_1};

const MEM_SIZE: usize = 0x20_0000;
const SECTORS: u64 = 16;

fn image() -> (TempFile, std::fs::File) {
    let tmp = TempFile::new().unwrap();
    let file = tmp.as_file().try_clone().unwrap();
    file.set_len(SECTORS * 512).unwrap();
    (tmp, file)
}

fn block(cfg: BlockConfig, ev: &EventLoop) -> (TempFile, Block) {
    let (tmp, file) = image();
    let b = Block::new(cfg, file, SECTORS * 512, ev.endpoint.clone()).unwrap();
    (tmp, b)
}

/// Brings the device up with the queue at `vq`.
fn init(t: &mut MmioTransport, vq: &TestQueue) {
    driver_init(t, 1 << VIRTIO_F_VERSION_1, &[vq]);
}

/// Header at 0x10_0000, data at 0x10_1000, status at 0x10_3000; chain at descriptor `first`.
fn submit(
    mem: &GuestMemoryMmap,
    vq: &TestQueue,
    first: u16,
    req_type: u32,
    sector: u64,
    write_data: bool,
) {
    let mut h = [0u8; 16];
    h[..4].copy_from_slice(&req_type.to_le_bytes());
    h[8..].copy_from_slice(&sector.to_le_bytes());
    mem.write_slice(&h, GuestAddress(0x10_0000)).unwrap();
    let descs = [
        (0x10_0000, 16, false),
        (0x10_1000, 1024, write_data),
        (0x10_3000, 1, true),
    ];
    vq.add_chain(first, &descs);
}

#[test]
fn features_and_config_space() {
    let ev = EventLoop::start();
    let cfg = BlockConfig {
        read_only: true,
        block_size: Some(4096),
        ..Default::default()
    };
    let (_tmp, b) = block(cfg, &ev);
    assert_eq!(b.device_type(), TYPE_BLOCK);
    let f = b.avail_features();
    for bit in [VIRTIO_F_VERSION_1, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_SEG_MAX] {
        assert_ne!(f & (1 << bit), 0, "bit {bit}");
    }
    assert_ne!(f & (1 << VIRTIO_BLK_F_RO), 0);
    assert_ne!(f & (1 << VIRTIO_BLK_F_BLK_SIZE), 0);
    let mut cap = [0u8; 8];
    b.read_config(0, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), SECTORS);
    let mut v = [0u8; 4];
    b.read_config(12, &mut v);
    assert_eq!(u32::from_le_bytes(v), SEG_MAX);
    b.read_config(20, &mut v);
    assert_eq!(u32::from_le_bytes(v), 4096);
    b.read_config(22, &mut v);
    assert_eq!(v, [0, 0, 0, 0]);
    b.read_config(u64::MAX, &mut v);
    assert_eq!(v, [0, 0, 0, 0]);

    let (_tmp, b) = block(BlockConfig::default(), &ev);
    assert_eq!(b.avail_features() & (1 << VIRTIO_BLK_F_RO), 0);
    assert_eq!(b.avail_features() & (1 << VIRTIO_BLK_F_BLK_SIZE), 0);
}

#[test]
fn invalid_config_rejected() {
    let ev = EventLoop::start();
    for bs in [0, 256, 1000, 8192] {
        let (_tmp, file) = image();
        let cfg = BlockConfig {
            block_size: Some(bs),
            ..Default::default()
        };
        assert!(matches!(
            Block::new(cfg, file, 512, ev.endpoint.clone()),
            Err(BlockError::InvalidBlockSize(_))
        ));
    }
    let (_tmp, file) = image();
    let cfg = BlockConfig {
        rate_limiter: Some(RateLimiterConfig {
            bandwidth: Some(crate::rate_limiter::BucketConfig::new(0)),
            ops: None,
        }),
        ..Default::default()
    };
    assert!(matches!(
        Block::new(cfg, file, 512, ev.endpoint.clone()),
        Err(BlockError::RateLimiter(_))
    ));
    // Odd sizes are rounded down.
    let (_tmp, file) = image();
    let b = Block::new(BlockConfig::default(), file, 1000, ev.endpoint.clone()).unwrap();
    assert_eq!(b.nsectors(), 1);
}

#[test]
fn end_to_end_through_mmio_and_event_manager() {
    let ev = EventLoop::start();
    let cfg = BlockConfig {
        serial: Some("e2e".into()),
        rate_limiter: Some(RateLimiterConfig::simple(10 << 20, 1000)),
        ..Default::default()
    };
    let (tmp, b) = block(cfg, &ev);
    let mem = guest_memory(MEM_SIZE);
    let mut t = MmioTransport::new(mem.clone(), Box::new(b)).unwrap();
    assert_eq!(r(&mut t, 0x08), TYPE_BLOCK);
    assert_eq!(r(&mut t, 0x100), SECTORS as u32);

    let vq = TestQueue::new(&mem, 0x1_0000, QUEUE_SIZE);
    init(&mut t, &vq);
    assert_eq!(r(&mut t, 0x70), ALL_OK);
    assert!(t.device().is_activated());

    // Write 1 KiB at sector 3, kicking through the notify register.
    mem.write_slice(&[0x5a; 1024], GuestAddress(0x10_1000))
        .unwrap();
    submit(&mem, &vq, 0, VIRTIO_BLK_T_OUT, 3, false);
    w(&mut t, 0x50, 0);
    assert!(wait_irq(t.irq_evt()), "no interrupt after OUT");
    assert_eq!(r(&mut t, 0x60) & 1, 1);
    w(&mut t, 0x64, 1);
    assert_eq!(
        mem.read_obj::<u8>(GuestAddress(0x10_3000)).unwrap(),
        VIRTIO_BLK_S_OK
    );
    let disk = std::fs::read(tmp.as_path()).unwrap();
    assert!(disk[3 * 512..5 * 512].iter().all(|&b| b == 0x5a));
    assert!(disk[..3 * 512].iter().all(|&b| b == 0));

    // Read it back, kicking the eventfd directly like KVM's ioeventfd would.
    mem.write_slice(&[0u8; 1024], GuestAddress(0x10_1000))
        .unwrap();
    submit(&mem, &vq, 3, VIRTIO_BLK_T_IN, 3, true);
    t.queue_evts()[0].write(1).unwrap();
    assert!(wait_irq(t.irq_evt()), "no interrupt after IN");
    let mut back = [0u8; 1024];
    mem.read_slice(&mut back, GuestAddress(0x10_1000)).unwrap();
    assert!(back.iter().all(|&b| b == 0x5a));
    assert_eq!(vq.used.idx(), 2);

    // Reset unregisters the handler; a second life works with a new queue.
    w(&mut t, 0x70, 0);
    assert!(!t.device().is_activated());
    assert_eq!(r(&mut t, 0x70), 0);
    let vq2 = TestQueue::new(&mem, 0x8_0000, QUEUE_SIZE);
    init(&mut t, &vq2);
    assert!(t.device().is_activated());
    submit(&mem, &vq2, 0, VIRTIO_BLK_T_GET_ID, 0, true);
    w(&mut t, 0x50, 0);
    assert!(wait_irq(t.irq_evt()), "no interrupt after GET_ID");
    let mut id = [0u8; 4];
    mem.read_slice(&mut id, GuestAddress(0x10_1000)).unwrap();
    assert_eq!(&id, b"e2e\0");
    w(&mut t, 0x70, 0);
}

#[test]
fn activation_without_ready_queue_fails() {
    let ev = EventLoop::start();
    let (_tmp, b) = block(BlockConfig::default(), &ev);
    let mem = guest_memory(MEM_SIZE);
    let mut t = MmioTransport::new(mem, Box::new(b)).unwrap();
    negotiate(&mut t, 1 << VIRTIO_F_VERSION_1);
    w(&mut t, 0x70, ALL_OK);
    assert_ne!(
        r(&mut t, 0x70) & crate::virtio::status::DEVICE_NEEDS_RESET,
        0
    );
    assert!(!t.device().is_activated());
}

#[test]
fn throttled_queue_resumes_from_the_event_loop() {
    let ev = EventLoop::start();
    let cfg = BlockConfig {
        rate_limiter: Some(RateLimiterConfig {
            bandwidth: None,
            ops: Some(crate::rate_limiter::BucketConfig {
                rate: 20,
                size: Some(1),
                one_time_burst: None,
            }),
        }),
        ..Default::default()
    };
    let (_tmp, b) = block(cfg, &ev);
    let mem = guest_memory(MEM_SIZE);
    let mut t = MmioTransport::new(mem.clone(), Box::new(b)).unwrap();
    let vq = TestQueue::new(&mem, 0x1_0000, QUEUE_SIZE);
    init(&mut t, &vq);
    submit(&mem, &vq, 0, VIRTIO_BLK_T_IN, 0, true);
    submit(&mem, &vq, 3, VIRTIO_BLK_T_IN, 1, true);
    submit(&mem, &vq, 6, VIRTIO_BLK_T_FLUSH, 0, true);
    let start = std::time::Instant::now();
    w(&mut t, 0x50, 0);
    // One kick; the limiter's timer brings the rest through (1 op per 50 ms).
    while vq.used.idx() < 3 {
        assert!(wait_irq(t.irq_evt()), "stalled at {}", vq.used.idx());
    }
    assert!(start.elapsed() >= std::time::Duration::from_millis(90));
    w(&mut t, 0x70, 0);
}

#[test]
fn more_requests_than_the_budget_complete_after_one_kick() {
    // The handler stops after BUDGET requests and kicks itself; the event loop brings it back
    // until the queue is empty.
    let ev = EventLoop::start();
    let (_tmp, b) = block(BlockConfig::default(), &ev);
    let mem = guest_memory(MEM_SIZE);
    let mut t = MmioTransport::new(mem.clone(), Box::new(b)).unwrap();
    let vq = TestQueue::new(&mem, 0x1_0000, QUEUE_SIZE);
    init(&mut t, &vq);
    let n = (handler::BUDGET + handler::BUDGET / 2) as u16;
    assert!(2 * n <= QUEUE_SIZE);
    let mut h = [0u8; 16];
    h[..4].copy_from_slice(&VIRTIO_BLK_T_FLUSH.to_le_bytes());
    mem.write_slice(&h, GuestAddress(0x10_0000)).unwrap();
    for i in 0..n {
        let status = 0x10_3000 + u64::from(i);
        mem.write_obj(0xffu8, GuestAddress(status)).unwrap();
        vq.add_chain(2 * i, &[(0x10_0000, 16, false), (status, 1, true)]);
    }
    t.queue_evts()[0].write(1).unwrap();
    while vq.used.idx() < n {
        assert!(wait_irq(t.irq_evt()), "stalled at {}", vq.used.idx());
    }
    assert_eq!(vq.used.idx(), n);
    for i in 0..n {
        let s: u8 = mem.read_obj(GuestAddress(0x10_3000 + u64::from(i))).unwrap();
        assert_eq!(s, VIRTIO_BLK_S_OK, "request {i}");
    }
    w(&mut t, 0x70, 0);
}
