//! Device-level tests: Block behind an MmioTransport, with a real EventManager running on its
//! own thread (as in the VMM). No KVM: the test plays the guest driver through the register
//! window and a MockSplitQueue.

use std::os::unix::io::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use event_manager::EventManager;
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::tempfile::TempFile;

use super::*;
use crate::bus::BusDevice;
use crate::rate_limiter::RateLimiterConfig;
use crate::virtio::status::{ACKNOWLEDGE, DRIVER, DRIVER_OK, FEATURES_OK};
use crate::virtio::{MmioTransport, Subscriber, VirtioDevice, TYPE_BLOCK, VIRTIO_F_VERSION_1};

const MEM_SIZE: usize = 0x20_0000;
const SECTORS: u64 = 16;

struct EventLoop {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    endpoint: crate::virtio::EventEndpoint,
}

impl EventLoop {
    fn start() -> Self {
        let mut em: EventManager<Subscriber> = EventManager::new().unwrap();
        let endpoint = em.remote_endpoint();
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let thread = std::thread::spawn(move || {
            while !stop2.load(Ordering::SeqCst) {
                em.run_with_timeout(20).unwrap();
            }
        });
        EventLoop {
            stop,
            thread: Some(thread),
            endpoint,
        }
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

fn r(t: &mut MmioTransport, off: u64) -> u32 {
    let mut b = [0u8; 4];
    t.read(off, &mut b);
    u32::from_le_bytes(b)
}

fn w(t: &mut MmioTransport, off: u64, v: u32) {
    t.write(off, &v.to_le_bytes());
}

fn wait_readable(evt: &EventFd) -> bool {
    let mut pfd = libc::pollfd {
        fd: evt.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: pfd is a valid pollfd array of length 1 that outlives the call.
    let ret = unsafe { libc::poll(&mut pfd, 1, 5000) };
    ret == 1 && evt.read().is_ok()
}

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
fn driver_init(t: &mut MmioTransport, vq: &MockSplitQueue<GuestMemoryMmap>) {
    w(t, 0x70, 0);
    w(t, 0x70, ACKNOWLEDGE);
    w(t, 0x70, ACKNOWLEDGE | DRIVER);
    w(t, 0x24, 1);
    w(t, 0x20, 1); // VIRTIO_F_VERSION_1 is bit 32
    w(t, 0x70, ACKNOWLEDGE | DRIVER | FEATURES_OK);
    w(t, 0x30, 0);
    w(t, 0x38, u32::from(QUEUE_SIZE));
    for (reg, addr) in [
        (0x80, vq.desc_table_addr()),
        (0x90, vq.avail_addr()),
        (0xa0, vq.used_addr()),
    ] {
        w(t, reg, addr.0 as u32);
        w(t, reg + 4, (addr.0 >> 32) as u32);
    }
    w(t, 0x44, 1);
    w(t, 0x70, ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
}

/// Header at 0x10_0000, data at 0x10_1000, status at 0x10_3000; chain at descriptor `first`.
fn submit(
    mem: &GuestMemoryMmap,
    vq: &MockSplitQueue<GuestMemoryMmap>,
    first: u16,
    req_type: u32,
    sector: u64,
    write_data: bool,
) {
    let mut h = [0u8; 16];
    h[..4].copy_from_slice(&req_type.to_le_bytes());
    h[8..].copy_from_slice(&sector.to_le_bytes());
    mem.write_slice(&h, GuestAddress(0x10_0000)).unwrap();
    let data_flags = if write_data { VRING_DESC_F_WRITE } else { 0 };
    let n = VRING_DESC_F_NEXT;
    let descs = [
        (0x10_0000, 16, n),
        (0x10_1000, 1024, n | data_flags),
        (0x10_3000, 1, VRING_DESC_F_WRITE),
    ];
    let raw: Vec<RawDescriptor> = descs
        .iter()
        .enumerate()
        .map(|(i, &(a, l, f))| {
            RawDescriptor::from(SplitDescriptor::new(a, l, f as u16, first + i as u16 + 1))
        })
        .collect();
    vq.add_desc_chains(&raw, first).unwrap();
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
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    let mut t = MmioTransport::new(mem.clone(), Box::new(b)).unwrap();
    assert_eq!(r(&mut t, 0x08), TYPE_BLOCK);
    assert_eq!(r(&mut t, 0x100), SECTORS as u32);

    let vq = MockSplitQueue::create(&mem, GuestAddress(0x1_0000), QUEUE_SIZE);
    driver_init(&mut t, &vq);
    assert_eq!(
        r(&mut t, 0x70),
        ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK
    );
    assert!(t.device().is_activated());

    // Write 1 KiB at sector 3, kicking through the notify register.
    mem.write_slice(&[0x5a; 1024], GuestAddress(0x10_1000))
        .unwrap();
    submit(&mem, &vq, 0, VIRTIO_BLK_T_OUT, 3, false);
    w(&mut t, 0x50, 0);
    assert!(wait_readable(t.irq_evt()), "no interrupt after OUT");
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
    assert!(wait_readable(t.irq_evt()), "no interrupt after IN");
    let mut back = [0u8; 1024];
    mem.read_slice(&mut back, GuestAddress(0x10_1000)).unwrap();
    assert!(back.iter().all(|&b| b == 0x5a));
    assert_eq!(vq.used().idx().load(), 2);

    // Reset unregisters the handler; a second life works with a new queue.
    w(&mut t, 0x70, 0);
    assert!(!t.device().is_activated());
    assert_eq!(r(&mut t, 0x70), 0);
    let vq2 = MockSplitQueue::create(&mem, GuestAddress(0x8_0000), QUEUE_SIZE);
    driver_init(&mut t, &vq2);
    assert!(t.device().is_activated());
    submit(&mem, &vq2, 0, VIRTIO_BLK_T_GET_ID, 0, true);
    w(&mut t, 0x50, 0);
    assert!(wait_readable(t.irq_evt()), "no interrupt after GET_ID");
    let mut id = [0u8; 4];
    mem.read_slice(&mut id, GuestAddress(0x10_1000)).unwrap();
    assert_eq!(&id, b"e2e\0");
    w(&mut t, 0x70, 0);
}

#[test]
fn activation_without_ready_queue_fails() {
    let ev = EventLoop::start();
    let (_tmp, b) = block(BlockConfig::default(), &ev);
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    let mut t = MmioTransport::new(mem, Box::new(b)).unwrap();
    w(&mut t, 0x70, ACKNOWLEDGE);
    w(&mut t, 0x70, ACKNOWLEDGE | DRIVER);
    w(&mut t, 0x24, 1);
    w(&mut t, 0x20, 1);
    w(&mut t, 0x70, ACKNOWLEDGE | DRIVER | FEATURES_OK);
    w(&mut t, 0x70, ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
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
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    let mut t = MmioTransport::new(mem.clone(), Box::new(b)).unwrap();
    let vq = MockSplitQueue::create(&mem, GuestAddress(0x1_0000), QUEUE_SIZE);
    driver_init(&mut t, &vq);
    submit(&mem, &vq, 0, VIRTIO_BLK_T_IN, 0, true);
    submit(&mem, &vq, 3, VIRTIO_BLK_T_IN, 1, true);
    submit(&mem, &vq, 6, VIRTIO_BLK_T_FLUSH, 0, true);
    let start = std::time::Instant::now();
    w(&mut t, 0x50, 0);
    // One kick; the limiter's timer brings the rest through (1 op per 50 ms).
    while vq.used().idx().load() < 3 {
        assert!(
            wait_readable(t.irq_evt()),
            "stalled at {}",
            vq.used().idx().load()
        );
    }
    assert!(start.elapsed() >= std::time::Duration::from_millis(90));
    w(&mut t, 0x70, 0);
}
