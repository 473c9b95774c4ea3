//! virtio-rng behind an MmioTransport, with the event manager on its own thread; the test
//! plays the guest driver.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::*;
use crate::virtio::test_utils::{driver_init, guest_memory, wait_irq, EventLoop, TestQueue};
use crate::virtio::MmioTransport;

const MEM_SIZE: usize = 0x40_0000;
const BUF: u64 = 0x10_0000;

fn setup<'m>(ev: &EventLoop, mem: &'m GuestMemoryMmap) -> (MmioTransport, TestQueue<'m>) {
    let mut t = MmioTransport::new(mem.clone(), Box::new(Rng::new(ev.endpoint.clone()))).unwrap();
    assert_eq!(t.device().device_type(), TYPE_RNG);
    let vq = TestQueue::new(mem, 0, QUEUE_SIZE);
    driver_init(&mut t, 1 << VIRTIO_F_VERSION_1, &[&vq]);
    assert!(t.device().is_activated());
    (t, vq)
}

/// Kicks the queue and waits until `n` chains were used.
fn run(t: &MmioTransport, vq: &TestQueue, n: u16) {
    t.queue_evts()[0].write(1).unwrap();
    while vq.used.idx() < n {
        assert!(wait_irq(t.irq_evt()), "stalled at {}", vq.used.idx());
    }
    assert_eq!(vq.used.idx(), n);
}

#[test]
fn fills_writable_buffers_with_random_bytes() {
    let ev = EventLoop::start();
    let mem = guest_memory(MEM_SIZE);
    let (t, vq) = setup(&ev, &mem);
    // One chain of two buffers: 100 bytes then 4000.
    vq.add_chain(0, &[(BUF, 100, true), (BUF + 0x1000, 4000, true)]);
    run(&t, &vq, 1);
    assert_eq!(vq.used.entry(0), (0, 4100));
    let mut a = vec![0u8; 100];
    let mut b = vec![0u8; 4000];
    mem.read_slice(&mut a, GuestAddress(BUF)).unwrap();
    mem.read_slice(&mut b, GuestAddress(BUF + 0x1000)).unwrap();
    // 4100 random bytes are not all zero, and not all alike.
    assert!(b.iter().any(|&x| x != b[0]));
    assert!(a.iter().any(|&x| x != 0));
    let after: u8 = mem.read_obj(GuestAddress(BUF + 0x1000 + 4000)).unwrap();
    assert_eq!(after, 0, "nothing written past the buffer");
}

#[test]
fn big_requests_are_capped() {
    let ev = EventLoop::start();
    let mem = guest_memory(MEM_SIZE);
    let (t, vq) = setup(&ev, &mem);
    vq.add_chain(0, &[(BUF, 0x20_0000, true)]);
    run(&t, &vq, 1);
    assert_eq!(vq.used.entry(0), (0, MAX_BYTES_PER_CHAIN as u32));
    let past: [u8; 16] = mem
        .read_obj(GuestAddress(BUF + MAX_BYTES_PER_CHAIN as u64))
        .unwrap();
    assert_eq!(past, [0; 16], "nothing written past the cap");
}

#[test]
fn hostile_chains_get_nothing_and_the_device_keeps_working() {
    let ev = EventLoop::start();
    let mem = guest_memory(MEM_SIZE);
    let (t, vq) = setup(&ev, &mem);
    // Device-readable buffer.
    vq.add_chain(0, &[(BUF, 64, false)]);
    // Zero length.
    vq.add_chain(1, &[(BUF, 0, true)]);
    // Outside guest memory, and straddling its end.
    vq.add_chain(2, &[(MEM_SIZE as u64 + 0x1000, 64, true)]);
    vq.add_chain(3, &[(MEM_SIZE as u64 - 8, 64, true)]);
    // Writable then readable.
    vq.add_chain(4, &[(BUF, 64, true), (BUF + 64, 64, false)]);
    // Head index beyond the queue.
    vq.publish(QUEUE_SIZE + 7);
    // A good one after all that.
    vq.add_chain(10, &[(BUF + 0x2000, 32, true)]);
    t.queue_evts()[0].write(1).unwrap();
    while vq.used.idx() < 6 {
        assert!(wait_irq(t.irq_evt()), "stalled at {}", vq.used.idx());
    }
    for i in 0..5 {
        assert_eq!(vq.used.entry(i), (u32::from(i), 0), "chain {i}");
    }
    assert_eq!(vq.used.entry(5), (10, 32));
    let mut untouched = [0u8; 64];
    mem.read_slice(&mut untouched, GuestAddress(BUF + 64))
        .unwrap();
    assert_eq!(untouched, [0; 64]);
}

#[test]
fn many_chains_over_several_wakeups() {
    let ev = EventLoop::start();
    let mem = guest_memory(MEM_SIZE);
    let (t, vq) = setup(&ev, &mem);
    let n = (DEFAULT_BUDGET * 3) as u16;
    for i in 0..n {
        vq.add_chain(i, &[(BUF + u64::from(i) * 16, 16, true)]);
    }
    run(&t, &vq, n);
    for i in 0..n {
        assert_eq!(vq.used.entry(i), (u32::from(i), 16));
    }
}

#[test]
fn fill_random_handles_large_buffers() {
    let mut buf = vec![0u8; 1 << 20];
    fill_random(&mut buf).unwrap();
    assert!(buf[buf.len() - 4096..].iter().any(|&b| b != 0));
}

/// Save an active device after some requests, restore it into a fresh transport (as a VM
/// restore does, on the same guest memory): it is active at once and carries on where the
/// first left off; the first transport's queue is untouched afterwards.
#[test]
fn save_and_restore_continue_at_the_saved_queue_position() {
    use crate::virtio::snapshot::SnapshotError;
    use crate::virtio::test_utils::{r, ALL_OK};
    let ev = EventLoop::start();
    let mem = guest_memory(MEM_SIZE);
    let (t, vq) = setup(&ev, &mem);
    for i in 0..3u16 {
        vq.add_chain(i, &[(BUF + u64::from(i) * 16, 16, true)]);
    }
    run(&t, &vq, 3);
    let snap = t.save().unwrap();
    assert_eq!(snap.status, ALL_OK);
    let pos = &snap.device.as_ref().unwrap().queues[0];
    assert_eq!((pos.next_avail, pos.next_used), (3, 3));
    // The JSON the VMM writes round-trips.
    let json = serde_json::to_string(&snap).unwrap();
    let snap: crate::virtio::snapshot::TransportSnapshot = serde_json::from_str(&json).unwrap();
    drop(t);

    let mut t2 = MmioTransport::new(mem.clone(), Box::new(Rng::new(ev.endpoint.clone()))).unwrap();
    t2.restore(&snap).unwrap();
    assert!(t2.device().is_activated());
    assert_eq!(r(&mut t2, crate::virtio::mmio::REG_STATUS), ALL_OK);
    // A request published after the snapshot is served by the restored device, in the next
    // used slot.
    vq.add_chain(3, &[(BUF + 0x1000, 32, true)]);
    run(&t2, &vq, 4);
    assert_eq!(vq.used.entry(3), (3, 32));

    // A restore refuses a damaged state instead of running on it.
    let mut bad = snap.clone();
    bad.queues[0].size = 3; // not a power of two
    let mut t3 = MmioTransport::new(mem.clone(), Box::new(Rng::new(ev.endpoint.clone()))).unwrap();
    assert!(matches!(t3.restore(&bad), Err(SnapshotError::Queue { index: 0, .. })));
    let mut bad = snap.clone();
    bad.device = None; // DRIVER_OK without the device's state
    assert!(matches!(t3.restore(&bad), Err(SnapshotError::Inconsistent(_))));
    let mut bad = snap.clone();
    bad.queues[0].used_ring = MEM_SIZE as u64 + 0x1000;
    assert!(matches!(t3.restore(&bad), Err(SnapshotError::Inconsistent(_))));
    let mut bad = snap;
    bad.device_type = crate::virtio::TYPE_BLOCK;
    assert!(matches!(t3.restore(&bad), Err(SnapshotError::WrongDevice { .. })));
}
