//! virtio-mmio transport: any sequence of register and config reads and writes (any offset,
//! size and value), queue notifications, against a device whose data plane is the real
//! virtio-blk handler, so that a queue set up through the registers is also used.

use std::sync::{Arc, Mutex};

use vm_memory::GuestMemoryMmap;

use super::{memory, write_image, FuzzQueue, Input, RINGS};
use crate::bus::BusDevice;
use crate::guest_log::GuestLog;
use crate::virtio::block::handler::BlockHandler;
use crate::virtio::block::request::Disk;
use crate::virtio::mmio::*;
use crate::virtio::status::{ACKNOWLEDGE, DEVICE_NEEDS_RESET, DRIVER, DRIVER_OK, FAILED, FEATURES_OK};
use crate::virtio::{read_config_bytes, ActivateContext, ActivateError, VirtioDevice, VIRTIO_F_VERSION_1};

const FEATURES: u64 = (1 << VIRTIO_F_VERSION_1) | (1 << 29) | (1 << 3) | (1 << 40);

/// Registers the input names by index (most accesses hit a real one).
const REGS: [u64; 26] = [
    REG_MAGIC,
    REG_VERSION,
    REG_DEVICE_ID,
    REG_VENDOR_ID,
    REG_DEVICE_FEATURES,
    REG_DEVICE_FEATURES_SEL,
    REG_DRIVER_FEATURES,
    REG_DRIVER_FEATURES_SEL,
    REG_QUEUE_SEL,
    REG_QUEUE_NUM_MAX,
    REG_QUEUE_NUM,
    REG_QUEUE_READY,
    NOTIFY_REG_OFFSET,
    REG_INTERRUPT_STATUS,
    REG_INTERRUPT_ACK,
    REG_STATUS,
    REG_QUEUE_DESC_LOW,
    REG_QUEUE_DESC_HIGH,
    REG_QUEUE_DRIVER_LOW,
    REG_QUEUE_DRIVER_HIGH,
    REG_QUEUE_DEVICE_LOW,
    REG_QUEUE_DEVICE_HIGH,
    REG_SHM_SEL,
    REG_SHM_LEN_LOW,
    REG_CONFIG_GENERATION,
    CONFIG_SPACE_OFFSET,
];

/// What the device shares with the harness: its data plane once activated.
#[derive(Default)]
struct Shared {
    handler: Option<BlockHandler>,
    acked: Option<u64>,
}

/// A block device whose activation checks what the transport hands over.
struct FuzzDevice {
    sizes: Vec<u16>,
    config: [u8; 8],
    mem: GuestMemoryMmap,
    shared: Arc<Mutex<Shared>>,
    activated: bool,
}

impl VirtioDevice for FuzzDevice {
    fn device_type(&self) -> u32 {
        crate::virtio::TYPE_BLOCK
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &self.sizes
    }
    fn avail_features(&self) -> u64 {
        FEATURES
    }
    fn set_acked_features(&mut self, acked: u64) {
        assert_eq!(acked & !FEATURES, 0, "acked features not offered");
        assert_ne!(acked & (1 << VIRTIO_F_VERSION_1), 0, "VERSION_1 not acked");
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
        assert!(!self.activated, "activated twice");
        let mut s = self.shared.lock().unwrap();
        assert_eq!(Some(ctx.acked_features), s.acked, "activation without FEATURES_OK");
        assert_eq!(ctx.queues.len(), self.sizes.len());
        assert_eq!(ctx.queue_evts.len(), self.sizes.len());
        for q in &ctx.queues {
            if virtio_queue::QueueT::ready(q) {
                assert!(virtio_queue::QueueT::is_valid(q, &self.mem), "invalid ready queue");
            }
        }
        let mut queues = ctx.queues;
        let q0 = queues.swap_remove(0);
        if virtio_queue::QueueT::ready(&q0) {
            let disk = Disk::new(scratch_disk(), 4096, true, "fuzz");
            s.handler = Some(BlockHandler::new(
                ctx.mem,
                q0,
                ctx.queue_evts.into_iter().next().unwrap(),
                ctx.irq,
                Arc::new(disk),
                None,
                Arc::new(GuestLog::new("virtio-blk")),
            ));
        }
        self.activated = true;
        Ok(())
    }
    fn reset(&mut self) -> bool {
        let mut s = self.shared.lock().unwrap();
        s.handler = None;
        s.acked = None;
        self.activated = false;
        true
    }
    fn is_activated(&self) -> bool {
        self.activated
    }
}

/// A read-only 4 KiB disk of zeros (a memfd).
fn scratch_disk() -> std::fs::File {
    use std::os::unix::io::FromRawFd;
    // SAFETY: the name is a valid NUL-terminated string; the call has no other inputs.
    let fd = unsafe { libc::memfd_create(c"fuzz-mmio-disk".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create failed");
    // SAFETY: fd is a new, valid file descriptor that nothing else owns.
    let f = unsafe { std::fs::File::from_raw_fd(fd) };
    f.set_len(4096).unwrap();
    f
}

/// A value to write: often one that makes sense for some register (status steps, features,
/// the addresses and size of the prepared queue), otherwise any u32.
fn value(inp: &mut Input, fq: &FuzzQueue) -> u32 {
    let ring = |i: usize| fq.rings[i];
    match inp.u8() % 16 {
        0 => 0,
        1 => 1,
        2 => ACKNOWLEDGE,
        3 => ACKNOWLEDGE | DRIVER,
        4 => ACKNOWLEDGE | DRIVER | FEATURES_OK,
        5 => ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK,
        6 => FEATURES as u32,
        7 => (FEATURES >> 32) as u32,
        8 => u32::from(fq.size),
        9 => ring(usize::from(inp.u8() % 3)) as u32,
        10 => (RINGS >> 32) as u32,
        11 => u32::from(inp.u8()),
        _ => inp.u32(),
    }
}

/// Input: number of queues (1..=2) and their maximum size, a prepared queue (see
/// [`FuzzQueue::build`]; the driver may or may not point the device at it), the length of
/// the guest memory image and the image, then operations until the input ends.
///
/// Invariants: the device is active exactly when the status says DRIVER_OK without
/// NEEDS_RESET (checked after every operation); activation only happens after FEATURES_OK
/// with VERSION_1 and offered features, with every ready queue valid; the identity registers
/// never change; a reset clears the status.
pub fn mmio_transport(data: &[u8]) {
    let mut inp = Input::new(data);
    let nqueues = 1 + usize::from(inp.u8() % 2);
    let max = 1u16 << (inp.u8() % 9);
    let mem = memory();
    let fq = FuzzQueue::build(&mem, RINGS, &mut inp);
    let image_len = usize::from(inp.u16());
    write_image(&mem, inp.bytes(image_len));
    let shared = Arc::new(Mutex::new(Shared::default()));
    let dev = FuzzDevice {
        sizes: vec![max; nqueues],
        config: [1, 2, 3, 4, 5, 6, 7, 8],
        mem: mem.clone(),
        shared: shared.clone(),
        activated: false,
    };
    let mut t = MmioTransport::new(mem, Box::new(dev)).unwrap();

    for _ in 0..512 {
        if inp.rest_len() == 0 {
            break;
        }
        let op = inp.u8();
        let off = if op & 0x80 == 0 {
            REGS[usize::from(inp.u8()) % REGS.len()]
        } else {
            u64::from(inp.u16() % 0x1100)
        };
        let len = if op & 0x40 == 0 { 4 } else { usize::from(inp.u8() % 9) };
        match op % 4 {
            0 => {
                let mut buf = vec![0xa5u8; len];
                t.read(off, &mut buf);
                if len == 4 {
                    let v = u32::from_le_bytes(buf[..4].try_into().unwrap());
                    match off {
                        REG_MAGIC => assert_eq!(v, MMIO_MAGIC_VALUE),
                        REG_VERSION => assert_eq!(v, MMIO_VERSION),
                        REG_STATUS => assert_eq!(v, t.status()),
                        _ => {}
                    }
                }
            }
            1 | 2 => {
                let v = value(&mut inp, &fq);
                let mut bytes = v.to_le_bytes().to_vec();
                bytes.resize(len, 0);
                t.write(off, &bytes);
                if off == REG_STATUS && len == 4 && v == 0 {
                    assert_eq!(t.status(), 0, "reset did not clear the status");
                    assert!(!t.device().is_activated(), "active after reset");
                }
            }
            _ => {
                // The ioeventfd fired: the data plane runs.
                if let Some(h) = shared.lock().unwrap().handler.as_mut() {
                    h.process_queue();
                }
            }
        }
        let status = t.status();
        let live = status & DRIVER_OK != 0 && status & DEVICE_NEEDS_RESET == 0;
        let active = t.device().is_activated();
        if status & FAILED == 0 {
            assert_eq!(live, active, "status {status:#x}, activated {active}");
        } else {
            assert!(!active || status & DRIVER_OK != 0, "status {status:#x}");
        }
    }
}
