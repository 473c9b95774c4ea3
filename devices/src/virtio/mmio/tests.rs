//! Transport tests against a dummy device: register layout, the status state machine, queue
//! validation, activation/reset, and random guest input.

use std::sync::{Arc, Mutex};

use super::*;
use crate::virtio::test_utils::{configure_queue, guest_memory, negotiate, r, w, ALL_OK};
use crate::virtio::{read_config_bytes, ActivateError, VIRTIO_MMIO_INT_CONFIG};

const FEATURES: u64 = (1 << VIRTIO_F_VERSION_1) | (1 << 3) | (1 << 40);
const MEM_SIZE: usize = 0x10_0000;

#[derive(Default)]
struct Shared {
    acked: Option<u64>,
    ctx: Option<ActivateContext>,
    activations: usize,
    resets: usize,
    fail_activate: bool,
    refuse_reset: bool,
}

struct Dummy {
    sizes: Vec<u16>,
    config: [u8; 8],
    shared: Arc<Mutex<Shared>>,
}

impl VirtioDevice for Dummy {
    fn device_type(&self) -> u32 {
        42
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &self.sizes
    }
    fn avail_features(&self) -> u64 {
        FEATURES
    }
    fn set_acked_features(&mut self, acked: u64) {
        self.shared.lock().unwrap().acked = Some(acked);
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        if let Some(dst) = usize::try_from(offset)
            .ok()
            .and_then(|o| self.config.get_mut(o..o.checked_add(data.len())?))
        {
            dst.copy_from_slice(data);
        }
    }
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        let mut s = self.shared.lock().unwrap();
        if s.fail_activate {
            return Err(ActivateError::QueueNotReady(0));
        }
        s.activations += 1;
        s.ctx = Some(ctx);
        Ok(())
    }
    fn reset(&mut self) -> bool {
        let mut s = self.shared.lock().unwrap();
        if s.refuse_reset && s.ctx.is_some() {
            return false;
        }
        s.resets += 1;
        s.ctx = None;
        true
    }
    fn is_activated(&self) -> bool {
        self.shared.lock().unwrap().ctx.is_some()
    }
}

fn transport(sizes: &[u16]) -> (MmioTransport, Arc<Mutex<Shared>>) {
    let mem = guest_memory(MEM_SIZE);
    let shared = Arc::new(Mutex::new(Shared::default()));
    let dev = Dummy {
        sizes: sizes.to_vec(),
        config: [1, 2, 3, 4, 5, 6, 7, 8],
        shared: shared.clone(),
    };
    (MmioTransport::new(mem, Box::new(dev)).unwrap(), shared)
}

/// Configures queue `idx` with `size` entries at a valid, aligned location.
fn setup_queue(t: &mut MmioTransport, idx: u32, size: u32) {
    let base = 0x1_0000 * u64::from(idx + 1);
    configure_queue(t, idx, size, [base, base + 0x4000, base + 0x8000]);
}

#[test]
fn identity_registers() {
    let (mut t, _) = transport(&[256, 16]);
    assert_eq!(r(&mut t, REG_MAGIC), 0x7472_6976);
    assert_eq!(r(&mut t, REG_VERSION), 2);
    assert_eq!(r(&mut t, REG_DEVICE_ID), 42);
    assert_eq!(r(&mut t, REG_VENDOR_ID), VENDOR_ID);
    assert_eq!(r(&mut t, REG_DEVICE_FEATURES), FEATURES as u32);
    w(&mut t, REG_DEVICE_FEATURES_SEL, 1);
    assert_eq!(r(&mut t, REG_DEVICE_FEATURES), (FEATURES >> 32) as u32);
    w(&mut t, REG_DEVICE_FEATURES_SEL, 7);
    assert_eq!(r(&mut t, REG_DEVICE_FEATURES), 0);
    assert_eq!(r(&mut t, REG_QUEUE_NUM_MAX), 256);
    w(&mut t, REG_QUEUE_SEL, 1);
    assert_eq!(r(&mut t, REG_QUEUE_NUM_MAX), 16);
    w(&mut t, REG_QUEUE_SEL, 2);
    assert_eq!(r(&mut t, REG_QUEUE_NUM_MAX), 0);
    assert_eq!(r(&mut t, REG_QUEUE_READY), 0);
    assert_eq!(r(&mut t, REG_SHM_LEN_LOW), u32::MAX);
    assert_eq!(r(&mut t, REG_CONFIG_GENERATION), 0);
    assert_eq!(t.queue_evts().len(), 2);
}

#[test]
fn activation_passes_queues_eventfds_and_irq() {
    let (mut t, shared) = transport(&[256]);
    // The driver also acks bit 5, which was not offered: it must be masked.
    negotiate(&mut t, FEATURES | (1 << 5));
    assert_eq!(r(&mut t, REG_STATUS), ACKNOWLEDGE | DRIVER | FEATURES_OK);
    assert_eq!(shared.lock().unwrap().acked, Some(FEATURES));
    setup_queue(&mut t, 0, 128);
    assert_eq!(r(&mut t, REG_QUEUE_READY), 1);
    w(&mut t, REG_STATUS, ALL_OK);
    assert_eq!(r(&mut t, REG_STATUS), ALL_OK);

    let s = shared.lock().unwrap();
    assert_eq!(s.activations, 1);
    let ctx = s.ctx.as_ref().unwrap();
    assert_eq!(ctx.acked_features, FEATURES);
    assert_eq!(ctx.queues.len(), 1);
    let q = &ctx.queues[0];
    assert!(q.ready());
    assert_eq!(q.size(), 128);
    assert_eq!(q.desc_table(), 0x1_0000);
    assert_eq!(q.avail_ring(), 0x1_4000);
    assert_eq!(q.used_ring(), 0x1_8000);
    assert!(!q.event_idx_enabled());
    // The eventfds are clones of the transport's.
    t.queue_evts()[0].write(3).unwrap();
    assert_eq!(ctx.queue_evts[0].read().unwrap(), 3);
    // Same interrupt.
    ctx.irq.trigger(IrqKind::Vring).unwrap();
    drop(s);
    assert_eq!(t.irq_evt().read().unwrap(), 1);
    assert_eq!(r(&mut t, REG_INTERRUPT_STATUS), 1);
    w(&mut t, REG_INTERRUPT_ACK, 1);
    assert_eq!(r(&mut t, REG_INTERRUPT_STATUS), 0);
    // Queue config is frozen after DRIVER_OK.
    w(&mut t, REG_QUEUE_NUM, 64);
    w(&mut t, REG_QUEUE_READY, 0);
    assert_eq!(r(&mut t, REG_QUEUE_READY), 1);
}

#[test]
fn notify_register_writes_eventfd() {
    let (mut t, _) = transport(&[16, 16]);
    w(&mut t, NOTIFY_REG_OFFSET, 1);
    assert_eq!(t.queue_evts()[1].read().unwrap(), 1);
    assert!(t.queue_evts()[0].read().is_err());
    w(&mut t, NOTIFY_REG_OFFSET, 2);
    w(&mut t, NOTIFY_REG_OFFSET, u32::MAX);
}

fn assert_activation_fails(t: &mut MmioTransport, shared: &Arc<Mutex<Shared>>) {
    w(t, REG_STATUS, ALL_OK);
    assert_eq!(r(t, REG_STATUS), ALL_OK | DEVICE_NEEDS_RESET);
    assert_eq!(shared.lock().unwrap().activations, 0);
    assert_eq!(
        r(t, REG_INTERRUPT_STATUS) & VIRTIO_MMIO_INT_CONFIG,
        VIRTIO_MMIO_INT_CONFIG
    );
    assert_eq!(t.irq_evt().read().unwrap(), 1);
}

#[test]
fn invalid_queue_config_fails_activation() {
    type Case<'a> = (&'a str, &'a dyn Fn(&mut MmioTransport));
    let bad: [Case; 7] = [
        ("size not power of 2", &|t| w(t, REG_QUEUE_NUM, 100)),
        ("size above max", &|t| w(t, REG_QUEUE_NUM, 512)),
        ("size 0", &|t| w(t, REG_QUEUE_NUM, 0)),
        ("size above u16", &|t| w(t, REG_QUEUE_NUM, 0x1_0000)),
        ("desc misaligned", &|t| w(t, REG_QUEUE_DESC_LOW, 0x1_0008)),
        ("used misaligned", &|t| w(t, REG_QUEUE_DEVICE_LOW, 0x1_8002)),
        ("avail outside memory", &|t| w(t, REG_QUEUE_DRIVER_HIGH, 1)),
    ];
    for (name, f) in bad {
        let (mut t, shared) = transport(&[256]);
        negotiate(&mut t, FEATURES);
        setup_queue(&mut t, 0, 128);
        f(&mut t);
        println!("case: {name}");
        assert_activation_fails(&mut t, &shared);
    }
    // A bad size corrected later is fine.
    let (mut t, shared) = transport(&[256]);
    negotiate(&mut t, FEATURES);
    setup_queue(&mut t, 0, 100);
    w(&mut t, REG_QUEUE_NUM, 64);
    w(&mut t, REG_STATUS, ALL_OK);
    assert_eq!(shared.lock().unwrap().activations, 1);
}

#[test]
fn device_activation_error_sets_needs_reset() {
    let (mut t, shared) = transport(&[256]);
    shared.lock().unwrap().fail_activate = true;
    negotiate(&mut t, FEATURES);
    setup_queue(&mut t, 0, 256);
    assert_activation_fails(&mut t, &shared);
    // The driver writing the status back with NEEDS_RESET does not confuse the machine.
    w(&mut t, REG_STATUS, ALL_OK | DEVICE_NEEDS_RESET);
    assert_eq!(r(&mut t, REG_STATUS), ALL_OK | DEVICE_NEEDS_RESET);
    // Reset and retry successfully.
    shared.lock().unwrap().fail_activate = false;
    w(&mut t, REG_STATUS, 0);
    assert_eq!(r(&mut t, REG_STATUS), 0);
    assert_eq!(r(&mut t, REG_INTERRUPT_STATUS), 0);
    negotiate(&mut t, FEATURES);
    setup_queue(&mut t, 0, 256);
    w(&mut t, REG_STATUS, ALL_OK);
    assert_eq!(r(&mut t, REG_STATUS), ALL_OK);
    assert_eq!(shared.lock().unwrap().activations, 1);
}

#[test]
fn version_1_required() {
    let (mut t, shared) = transport(&[16]);
    negotiate(&mut t, FEATURES & !(1 << VIRTIO_F_VERSION_1));
    assert_eq!(r(&mut t, REG_STATUS), ACKNOWLEDGE | DRIVER);
    assert_eq!(shared.lock().unwrap().acked, None);
}

#[test]
fn status_state_machine() {
    let (mut t, shared) = transport(&[16]);
    // Skipping steps is refused.
    w(&mut t, REG_STATUS, DRIVER_OK);
    w(&mut t, REG_STATUS, ACKNOWLEDGE | DRIVER_OK);
    w(&mut t, REG_STATUS, ACKNOWLEDGE | FEATURES_OK);
    assert_eq!(r(&mut t, REG_STATUS), 0);
    // Several steps at once are fine.
    w(&mut t, REG_STATUS, ACKNOWLEDGE | DRIVER);
    assert_eq!(r(&mut t, REG_STATUS), ACKNOWLEDGE | DRIVER);
    w(&mut t, REG_DRIVER_FEATURES, FEATURES as u32);
    w(&mut t, REG_DRIVER_FEATURES_SEL, 1);
    w(&mut t, REG_DRIVER_FEATURES, (FEATURES >> 32) as u32);
    // Clearing bits is refused.
    w(&mut t, REG_STATUS, ACKNOWLEDGE);
    assert_eq!(r(&mut t, REG_STATUS), ACKNOWLEDGE | DRIVER);
    w(&mut t, REG_STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK);
    assert_eq!(r(&mut t, REG_STATUS), ACKNOWLEDGE | DRIVER | FEATURES_OK);
    // Features cannot change after FEATURES_OK.
    w(&mut t, REG_DRIVER_FEATURES, 0);
    w(&mut t, REG_STATUS, ALL_OK);
    // Queue 0 was never made ready: the device still gets activated, with a non-ready queue.
    assert_eq!(r(&mut t, REG_STATUS), ALL_OK);
    {
        let s = shared.lock().unwrap();
        let ctx = s.ctx.as_ref().unwrap();
        assert!(!ctx.queues[0].ready());
        assert_eq!(ctx.acked_features, FEATURES);
    }
    // FAILED sticks until reset.
    w(&mut t, REG_STATUS, FAILED);
    assert_eq!(r(&mut t, REG_STATUS) & FAILED, FAILED);
    w(&mut t, REG_STATUS, ALL_OK);
    assert_eq!(r(&mut t, REG_STATUS), ALL_OK | FAILED);
    w(&mut t, REG_STATUS, 0);
    assert_eq!(r(&mut t, REG_STATUS), 0);
    assert!(shared.lock().unwrap().ctx.is_none());
}

#[test]
fn queue_writes_only_between_features_ok_and_driver_ok() {
    let (mut t, _) = transport(&[16]);
    w(&mut t, REG_QUEUE_READY, 1);
    assert_eq!(r(&mut t, REG_QUEUE_READY), 0);
    negotiate(&mut t, FEATURES);
    w(&mut t, REG_QUEUE_READY, 1);
    assert_eq!(r(&mut t, REG_QUEUE_READY), 1);
    // Non-existent queue: ignored.
    w(&mut t, REG_QUEUE_SEL, 9);
    w(&mut t, REG_QUEUE_READY, 1);
    w(&mut t, REG_QUEUE_NUM, 4);
    assert_eq!(r(&mut t, REG_QUEUE_READY), 0);
}

#[test]
fn reset_restores_initial_state() {
    let (mut t, shared) = transport(&[256]);
    negotiate(&mut t, FEATURES);
    setup_queue(&mut t, 0, 64);
    w(&mut t, REG_STATUS, ALL_OK);
    t.queue_evts()[0].write(1).unwrap();
    t.irq().trigger(IrqKind::Vring).unwrap();
    w(&mut t, REG_STATUS, 0);
    assert_eq!(shared.lock().unwrap().resets, 1);
    assert_eq!(r(&mut t, REG_STATUS), 0);
    assert_eq!(r(&mut t, REG_QUEUE_READY), 0);
    assert_eq!(r(&mut t, REG_INTERRUPT_STATUS), 0);
    assert!(
        t.queue_evts()[0].read().is_err(),
        "stale notification drained"
    );
    // Second life: the queue got its max size back.
    negotiate(&mut t, FEATURES);
    w(&mut t, REG_QUEUE_SEL, 0);
    w(&mut t, REG_QUEUE_READY, 1);
    w(&mut t, REG_STATUS, ALL_OK);
    let s = shared.lock().unwrap();
    assert_eq!(s.activations, 2);
    assert_eq!(s.ctx.as_ref().unwrap().queues[0].size(), 256);
}

#[test]
fn reset_refused_marks_failed() {
    let (mut t, shared) = transport(&[16]);
    shared.lock().unwrap().refuse_reset = true;
    negotiate(&mut t, FEATURES);
    w(&mut t, REG_STATUS, ALL_OK);
    w(&mut t, REG_STATUS, 0);
    assert_eq!(r(&mut t, REG_STATUS), ALL_OK | FAILED);
}

#[test]
fn config_space_and_access_widths() {
    let (mut t, _) = transport(&[16]);
    let mut b = [0u8; 2];
    t.read(0x102, &mut b);
    assert_eq!(b, [3, 4]);
    let mut b = [0xffu8; 8];
    t.read(0x104, &mut b);
    assert_eq!(b, [5, 6, 7, 8, 0, 0, 0, 0]);
    t.write(0x100, &[9]);
    let mut b = [0u8; 1];
    t.read(0x100, &mut b);
    assert_eq!(b, [9]);
    // Past the window.
    let mut b = [0xffu8; 8];
    t.read(0xffc, &mut b);
    assert_eq!(b, [0; 8]);
    t.read(u64::MAX - 2, &mut b);
    assert_eq!(b, [0; 8]);
    // Registers need aligned 32-bit accesses.
    let mut b = [0xffu8; 2];
    t.read(REG_MAGIC, &mut b);
    assert_eq!(b, [0, 0]);
    let mut b = [0xffu8; 4];
    t.read(REG_MAGIC + 1, &mut b);
    assert_eq!(b, [0; 4]);
    t.write(REG_STATUS, &[1, 0]);
    assert_eq!(r(&mut t, REG_STATUS), 0);
    t.write(REG_STATUS, &[]);
    t.read(REG_STATUS, &mut []);
}

#[test]
fn config_change_notification() {
    let (mut t, _) = transport(&[16]);
    t.notify_config_change();
    assert_eq!(r(&mut t, REG_CONFIG_GENERATION), 1);
    assert_eq!(r(&mut t, REG_INTERRUPT_STATUS), VIRTIO_MMIO_INT_CONFIG);
}

#[test]
fn random_guest_accesses_never_panic() {
    let (mut t, shared) = transport(&[256, 8]);
    let mut rng = crate::virtio::test_utils::Rng(0x1234_5678_9abc_def1);
    let interesting = [0u32, 1, 2, 3, 4, 7, 8, 0xf, 64, 128, 256, 0x1000, u32::MAX];
    for i in 0..200_000u32 {
        let x = rng.next();
        // Mostly registers, sometimes config space or anywhere.
        let offset = match x % 8 {
            0 => x >> 8,
            1 => 0x100 + (x >> 8) % 0x100,
            _ => ((x >> 8) % 0x40) * 4,
        };
        let len = [1usize, 2, 4, 4, 4, 8][((x >> 40) % 6) as usize];
        let v = if x & (1 << 50) != 0 {
            interesting[((x >> 51) as usize) % interesting.len()]
        } else {
            (x >> 16) as u32
        };
        let mut buf = vec![0u8; len];
        if x & (1 << 60) != 0 {
            t.read(offset, &mut buf);
        } else {
            buf.copy_from_slice(&v.to_le_bytes().repeat(2)[..len]);
            t.write(offset, &buf);
        }
        // Now and then drive a legitimate init with random queue parameters.
        if i % 1000 == 0 {
            w(&mut t, REG_STATUS, 0);
            negotiate(&mut t, rng.next());
            w(&mut t, REG_QUEUE_SEL, (rng.next() % 3) as u32);
            w(&mut t, REG_QUEUE_NUM, (rng.next() % 300) as u32);
            w(&mut t, REG_QUEUE_DESC_LOW, rng.next() as u32);
            w(&mut t, REG_QUEUE_READY, 1);
            w(&mut t, REG_STATUS, ALL_OK);
        }
    }
    // The transport is still usable.
    w(&mut t, REG_STATUS, 0);
    shared.lock().unwrap().refuse_reset = false;
    w(&mut t, REG_STATUS, 0);
    negotiate(&mut t, FEATURES);
    setup_queue(&mut t, 0, 256);
    w(&mut t, REG_STATUS, ALL_OK);
    assert_eq!(r(&mut t, REG_STATUS), ALL_OK);
}

/// A tracing writer that collects everything logged, for counting lines.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn guest_flood_of_bad_writes_is_rate_limited() {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::WARN)
        .finish();
    let (mut t, _) = transport(&[4]);
    let start = std::time::Instant::now();
    tracing::subscriber::with_default(subscriber, || {
        for i in 0..10_000u32 {
            // Queue writes before FEATURES_OK, and notifies for queues that do not exist.
            if i % 2 == 0 {
                w(&mut t, REG_QUEUE_NUM, 4);
            } else {
                w(&mut t, NOTIFY_REG_OFFSET, 1000 + i);
            }
        }
        drop(t);
    });
    let windows = start.elapsed().as_secs() + 1;
    let text = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    let lines = text.lines().count() as u64;
    let limit = windows * (u64::from(crate::guest_log::LINES_PER_WINDOW) + 1);
    assert!(lines >= 2, "the first warnings are logged:\n{text}");
    assert!(
        lines <= limit,
        "{lines} lines for 10000 bad writes (limit {limit}):\n{text}"
    );
    assert!(
        text.contains("more guest-triggered warnings were suppressed"),
        "{text}"
    );
}
