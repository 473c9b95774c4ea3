//! The in-place ring access (`SplitRing`, `RingChain`) against virtio-queue's own, and
//! `DeviceQueue`'s used-ring batches and EVENT_IDX interrupt decisions.

use std::num::Wrapping;

use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::{DeviceQueue, SplitRing, Step, Stop, USED_CHUNK};
use crate::guest_log::GuestLog;
use crate::virtio::test_utils::{guest_memory, Rng, TestQueue};
use crate::virtio::IrqTrigger;


fn device_queue(q: Queue) -> DeviceQueue {
    DeviceQueue::new(q, EventFd::new(0).unwrap(), 64, "test queue")
}

/// The used ring's index, as the driver reads it.
fn used_idx(tq: &TestQueue) -> u16 {
    tq.used.idx()
}

/// Sets the driver's `used_event` (after the avail ring entries).
fn set_used_event(mem: &GuestMemoryMmap, tq: &TestQueue, v: u16) {
    let at = tq.vq.avail_addr().0 + 4 + 2 * u64::from(tq.size);
    mem.write_obj(v, GuestAddress(at)).unwrap();
}

fn key(d: &Descriptor) -> (u64, u32, u16, u16) {
    (d.addr().0, d.len(), d.flags(), d.next())
}

/// Writes one random descriptor table into each queue (the same in all): any flags, `next`
/// often beyond the table, lengths near u32::MAX now and then, and now and then an indirect
/// descriptor, whose table (two writable descriptors at 0x4_0000) goes into each memory.
fn random_table(rng: &mut Rng, queues: &[(&GuestMemoryMmap, &TestQueue)]) {
    let size = queues[0].1.size;
    for i in 0..size {
        let flags = (rng.below(8) as u32) & (VRING_DESC_F_NEXT | VRING_DESC_F_WRITE | VRING_DESC_F_INDIRECT);
        // Indirect now and then only.
        let flags = if flags & VRING_DESC_F_INDIRECT != 0 && rng.below(4) != 0 {
            flags & !VRING_DESC_F_INDIRECT
        } else {
            flags
        };
        let len = match rng.below(4) {
            0 => u32::MAX - rng.below(16) as u32,
            _ => rng.below(0x2000) as u32,
        };
        let (addr, len) = if flags & VRING_DESC_F_INDIRECT != 0 { (0x4_0000, 16 * 2) } else { (rng.next(), len) };
        let next = rng.below(u64::from(size) + 2) as u16;
        for (_, tq) in queues {
            tq.raw_desc(i, addr, len, flags, next);
        }
    }
    let table = Descriptor::new(0x5_0000, 100, VRING_DESC_F_WRITE as u16, 0);
    for (mem, _) in queues {
        mem.write_obj(table, GuestAddress(0x4_0000)).unwrap();
        mem.write_obj(table, GuestAddress(0x4_0010)).unwrap();
    }
}

#[test]
fn ring_chain_stops_where_descriptor_chain_does() {
    // Random descriptor tables (any flags, `next` often beyond the table, loops, lengths
    // near u32::MAX) and heads, some beyond the table: a RingChain yields what virtio-queue's
    // DescriptorChain does, or its prefix up to an indirect descriptor (then flagged).
    let mem = guest_memory(0x10_0000);
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut indirect_seen = 0;
    for round in 0..2000 {
        let size = 1u16 << rng.below(5);
        let tq = TestQueue::new(&mem, 0, size);
        random_table(&mut rng, &[(&mem, &tq)]);
        let head = rng.below(u64::from(size) + 1) as u16;
        tq.publish(head);

        let mut q = tq.queue();
        let theirs: Vec<_> = q.iter(&mem).unwrap().next().unwrap().map(|d| key(&d)).collect();
        let q = tq.queue();
        let ring = SplitRing::new(&q, &mem).unwrap();
        assert_eq!(ring.avail_head(0).unwrap(), head);
        let mut chain = ring.chain(head);
        let ours: Vec<_> = chain.by_ref().map(|d| key(&d)).collect();
        assert!(chain.next().is_none(), "round {round}: not fused");
        if chain.indirect() {
            indirect_seen += 1;
            assert!(theirs.starts_with(&ours), "round {round}: {ours:?} vs {theirs:?}");
        } else {
            assert_eq!(ours, theirs, "round {round}");
        }
    }
    assert!(indirect_seen > 10, "{indirect_seen} indirect chains");
}

#[test]
fn process_hands_over_what_virtio_queue_pops() {
    // Random descriptor tables (`random_table`) and published heads, some beyond the table:
    // `process` hands its device the same chains,
    // and returns them to the used ring the same way, as popping and returning them through
    // virtio-queue does; whether it reads the rings in place (one region) or cannot (the used
    // ring across two regions).
    let log = GuestLog::new("test");
    let irq = IrqTrigger::new().unwrap();
    let memory = |split: bool| {
        if split {
            GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x8004), (GuestAddress(0x8004), 0xf_7ffc)])
                .unwrap()
        } else {
            guest_memory(0x10_0000)
        }
    };
    let mut rng = Rng(0x51f1_5eed_0bad_cafe);
    let mut indirect_seen = 0;
    for round in 0..1000 {
        let split = round % 4 == 3;
        let (mem, ref_mem) = (memory(split), memory(split));
        let size = 1u16 << rng.below(5);
        let (tq, ref_tq) = (TestQueue::new(&mem, 0, size), TestQueue::new(&ref_mem, 0, size));
        random_table(&mut rng, &[(&mem, &tq), (&ref_mem, &ref_tq)]);
        for _ in 0..rng.below(u64::from(size) + 1) {
            let head = rng.below(u64::from(size) + 1) as u16;
            tq.publish(head);
            ref_tq.publish(head);
        }
        let used_len = |head: u16| u32::from(head) * 3 + 1;

        let mut theirs = Vec::new();
        let mut reference = ref_tq.queue();
        while let Some(chain) = reference.iter(&ref_mem).unwrap().next() {
            let head = chain.head_index();
            let descs: Vec<_> = chain.map(|d| key(&d)).collect();
            indirect_seen += usize::from(descs.first().is_some_and(|d| d.0 == 0x5_0000));
            theirs.push((head, descs));
            // Refused (as by `process`) for a head beyond the queue.
            let _ = reference.add_used(&ref_mem, head, used_len(head));
        }

        let mut ours = Vec::new();
        let mut dq = device_queue(tq.queue());
        let pass = dq.process(&mem, &irq, &log, |chain| {
            let head = chain.head_index();
            ours.push((head, chain.map(|d| key(&d)).collect::<Vec<_>>()));
            Step::Used(used_len(head))
        });
        assert_eq!(ours, theirs, "round {round}, split {split}");
        assert_eq!(pass.stop, Stop::Empty);
        assert_eq!(dq.queue.next_avail(), reference.next_avail(), "round {round}");
        assert_eq!(dq.queue.next_used(), reference.next_used(), "round {round}");
        assert_eq!(used_idx(&tq), ref_tq.used.idx(), "round {round}");
        for i in 0..used_idx(&tq) {
            assert_eq!(tq.used.entry(i), ref_tq.used.entry(i), "round {round}, used entry {i}");
        }
    }
    assert!(indirect_seen > 10, "{indirect_seen} indirect chains");
}

#[test]
fn process_puts_back_and_stops_on_a_broken_queue() {
    // A chain put back is handed over again on the next call (in place, as through
    // virtio-queue); an avail index more than a queue's worth ahead stops the queue.
    let mem = guest_memory(0x2_0000);
    let (log, irq) = (GuestLog::new("test"), IrqTrigger::new().unwrap());
    let tq = TestQueue::new(&mem, 0, 16);
    tq.add_chain(0, &[(0x1_0000, 64, false)]);
    tq.add_chain(1, &[(0x1_0100, 64, true), (0x1_0200, 16, true)]);
    let mut dq = device_queue(tq.queue());
    let mut seen = Vec::new();
    let pass = dq.process(&mem, &irq, &log, |chain| {
        seen.push(chain.head_index());
        if chain.head_index() == 1 { Step::PutBack } else { Step::Used(0) }
    });
    assert_eq!((pass.completed, pass.stop), (1, Stop::Blocked));
    let pass = dq.process(&mem, &irq, &log, |chain| {
        seen.push(chain.head_index());
        assert_eq!(chain.map(|d| d.len()).collect::<Vec<_>>(), [64, 16]);
        Step::Used(80)
    });
    assert_eq!((pass.completed, pass.stop), (1, Stop::Empty));
    assert_eq!(seen, [0, 1, 1]);
    assert_eq!((used_idx(&tq), tq.used.entry(1)), (2, (1, 80)));

    // The driver claims 17 more chains on a queue of 16.
    let avail_idx = GuestAddress(tq.vq.avail_addr().0 + 2);
    mem.write_obj(2u16 + 17, avail_idx).unwrap();
    let pass = dq.process(&mem, &irq, &log, |_| panic!("no chain may be handed over"));
    assert_eq!((pass.completed, pass.stop), (0, Stop::Broken));
}

#[test]
fn split_ring_needs_each_area_inside_one_region() {
    // Adjacent regions, the used ring across their boundary: no SplitRing (its users take
    // virtio-queue's path); the same rings inside one region: a SplitRing.
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x8004), (GuestAddress(0x8004), 0x1_0000)])
        .unwrap();
    let tq = TestQueue::new(&mem, 0, 16);
    assert!(SplitRing::new(&tq.queue(), &mem).is_err());
    let mem = guest_memory(0x2_0000);
    let tq = TestQueue::new(&mem, 0, 16);
    assert!(SplitRing::new(&tq.queue(), &mem).is_ok());
    let mut q = tq.queue();
    q.set_ready(false);
    assert!(SplitRing::new(&q, &mem).is_err());
}

#[test]
fn used_batch_writes_every_element_then_the_index_once() {
    // With in-place rings and without (used ring across two regions): the same used ring.
    let one = guest_memory(0x2_0000);
    let two = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x8010), (GuestAddress(0x8010), 0x1_0000)])
        .unwrap();
    for (mem, in_place) in [(&one, true), (&two, false)] {
        let tq = TestQueue::new(mem, 0, 8);
        let mut q = tq.queue();
        // Start near the end of the ring: the batch wraps.
        q.set_next_used(6);
        mem.write_obj(6u16, GuestAddress(tq.used.addr.0 + 2)).unwrap();
        assert_eq!(SplitRing::new(&q, mem).is_ok(), in_place);
        let mut dq = device_queue(q);
        let log = GuestLog::new("test");
        let batch = [(3u16, 100u32), (1, 0), (9, 5), (7, 4096), (0, u32::MAX), (2, 1)];
        let mut seen = Vec::new();
        let n = dq.add_used_batch(
            mem,
            &log,
            batch.iter().map(|&e| {
                seen.push(used_idx(&tq));
                e
            }),
        );
        // Head 9 is beyond the queue: skipped.
        assert_eq!(n, 5);
        if in_place {
            // The driver saw nothing until the whole batch was written.
            assert_eq!(seen, vec![6; batch.len()]);
        }
        assert_eq!(used_idx(&tq), 11);
        let want: [(u16, u32); 5] = [(3, 100), (1, 0), (7, 4096), (0, u32::MAX), (2, 1)];
        for (i, &(head, len)) in want.iter().enumerate() {
            assert_eq!(tq.used.entry(6 + i as u16), (u32::from(head), len), "entry {i}");
        }
        assert_eq!(dq.position().next_used, 11);
        assert_eq!(dq.queue.next_used(), 11);
        // An empty batch changes nothing.
        assert_eq!(dq.add_used_batch(mem, &log, std::iter::empty()), 0);
        assert_eq!(used_idx(&tq), 11);
    }
}

#[test]
fn used_batch_longer_than_a_chunk_wraps_and_stops_at_a_queue() {
    // More elements than are written at a time, from near the ring's end: every one lands in
    // order across the wrap; a batch longer than the queue stops at a queue's worth.
    let mem = guest_memory(0x2_0000);
    let tq = TestQueue::new(&mem, 0, 64);
    let mut q = tq.queue();
    q.set_next_used(50);
    mem.write_obj(50u16, GuestAddress(tq.used.addr.0 + 2)).unwrap();
    let mut dq = device_queue(q);
    let log = GuestLog::new("test");
    let n = USED_CHUNK as u16 + 9;
    assert_eq!(dq.add_used_batch(&mem, &log, (0..n).map(|h| (h, u32::from(h) * 3))), usize::from(n));
    assert_eq!(used_idx(&tq), 50 + n);
    for h in 0..n {
        assert_eq!(tq.used.entry(50 + h), (u32::from(h), u32::from(h) * 3), "entry {h}");
    }
    let before = used_idx(&tq);
    assert_eq!(dq.add_used_batch(&mem, &log, (0..100u16).map(|h| (h % 64, 1))), 64);
    assert_eq!(used_idx(&tq), before.wrapping_add(64));
}

#[test]
fn used_batches_interrupt_as_virtio_queue_would() {
    // Random returns (single chains and batches) and random used_event values: the interrupt
    // decisions match those of a virtio-queue `Queue` returning the same chains one by one.
    for event_idx in [true, false] {
        let mem = guest_memory(0x2_0000);
        let ref_mem = guest_memory(0x2_0000);
        let tq = TestQueue::new(&mem, 0, 16);
        let ref_tq = TestQueue::new(&ref_mem, 0, 16);
        let mut q = tq.queue();
        q.set_event_idx(event_idx);
        let mut dq = device_queue(q);
        let mut reference = ref_tq.queue();
        reference.set_event_idx(event_idx);
        let irq = IrqTrigger::new().unwrap();
        let log = GuestLog::new("test");
        let mut rng = Rng(0x1234_5678_9abc_def1 ^ u64::from(event_idx));
        let (mut interrupts, mut quiet) = (0, 0);
        for round in 0..3000 {
            for _ in 0..rng.below(3) {
                let n = rng.below(17) as usize;
                let items: Vec<(u16, u32)> = (0..n).map(|_| (rng.below(16) as u16, rng.below(5000) as u32)).collect();
                if rng.below(2) == 0 {
                    assert_eq!(dq.add_used_batch(&mem, &log, items.iter().copied()), n);
                } else {
                    for &(head, len) in &items {
                        assert!(dq.add_used(&mem, &log, head, len));
                    }
                }
                for &(head, len) in &items {
                    reference.add_used(&ref_mem, head, len).unwrap();
                }
            }
            // used_event near the used index, ahead of it or behind.
            let near = Wrapping(reference.next_used()) + Wrapping(rng.below(40) as u16) - Wrapping(20);
            set_used_event(&mem, &tq, near.0);
            set_used_event(&ref_mem, &ref_tq, near.0);
            let want = reference.needs_notification(&ref_mem).unwrap();
            dq.signal_used(&mem, &irq, &log);
            let got = irq.evt().read().is_ok();
            assert_eq!(got, want, "round {round}, event_idx {event_idx}");
            assert_eq!(dq.queue.next_used(), reference.next_used());
            if got {
                interrupts += 1;
            } else {
                quiet += 1;
            }
        }
        if event_idx {
            assert!(interrupts > 100 && quiet > 100, "{interrupts} interrupts, {quiet} not");
        } else {
            assert_eq!(quiet, 0);
        }
    }
}

#[test]
fn used_batch_interrupt_follows_used_event_across_the_batch() {
    // EVENT_IDX: the driver wants an interrupt when the used index passes used_event.
    let mem = guest_memory(0x2_0000);
    let tq = TestQueue::new(&mem, 0, 16);
    let mut q = tq.queue();
    q.set_event_idx(true);
    let mut dq = device_queue(q);
    let irq = IrqTrigger::new().unwrap();
    let log = GuestLog::new("test");
    let batch = |dq: &mut DeviceQueue, n: u16, used_event: u16| {
        set_used_event(&mem, &tq, used_event);
        assert_eq!(dq.add_used_batch(&mem, &log, (0..n).map(|h| (h, 1))), usize::from(n));
        dq.signal_used(&mem, &irq, &log);
        irq.evt().read().is_ok()
    };
    // 0 -> 3 passes entry 2 (used_event 2): interrupt; 3 -> 6 does not pass entry 6.
    assert!(batch(&mut dq, 3, 2));
    assert!(!batch(&mut dq, 3, 6));
    // 6 -> 7 passes 6 (asked for before the previous batch and not yet passed).
    assert!(batch(&mut dq, 1, 6));
    // A single return and a batch between two signals count together: 7 -> 10 passes 8.
    set_used_event(&mem, &tq, 8);
    assert!(dq.add_used(&mem, &log, 0, 1));
    assert_eq!(dq.add_used_batch(&mem, &log, [(1, 1), (2, 1)]), 2);
    dq.signal_used(&mem, &irq, &log);
    assert!(irq.evt().read().is_ok());
    // Nothing returned since: no interrupt, whatever used_event says.
    set_used_event(&mem, &tq, 9);
    dq.signal_used(&mem, &irq, &log);
    assert!(irq.evt().read().is_err());
}
