//! virtio-mmio transport, version 2 ("modern", virtio 1.x section 4.2.2).
//!
//! The VMM maps each transport at a 0x1000-byte window and:
//! * registers each of [`MmioTransport::queue_evts`] as a KVM ioeventfd on `base + 0x50`
//!   (`QueueNotify`) with `datamatch` = queue index (a write that still reaches the transport
//!   is handled the same way, by signalling the matching eventfd);
//! * registers [`MmioTransport::irq_evt`] as a KVM irqfd for the device's GSI.
//!
//! Everything written by the guest is checked: bad sizes/addresses make the queue invalid and
//! activation fail (`DEVICE_NEEDS_RESET`), out-of-range indexes and accesses are ignored.

mod snapshot;
#[cfg(test)]
mod tests;

use std::io;
use std::sync::Arc;

use tracing::{debug, error, info};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::status::{ACKNOWLEDGE, DEVICE_NEEDS_RESET, DRIVER, DRIVER_OK, FAILED, FEATURES_OK};
use super::{
    ActivateContext, ActivateError, IrqKind, IrqTrigger, VirtioDevice, VIRTIO_F_VERSION_1,
};
use crate::bus::BusDevice;
use crate::guest_log::GuestLog;
use crate::guest_warn;

/// "virt" in little endian.
pub const MMIO_MAGIC_VALUE: u32 = 0x7472_6976;
/// Modern (virtio 1.x) virtio-mmio.
pub const MMIO_VERSION: u32 = 2;
/// Vendor id reported to the guest.
pub const VENDOR_ID: u32 = 0;
/// Size of the MMIO window of one transport.
pub const MMIO_WINDOW_SIZE: u64 = 0x1000;
/// Offset of QueueNotify, where the VMM registers the queue ioeventfds.
pub const NOTIFY_REG_OFFSET: u64 = 0x50;
/// Offset of the device config space.
pub const CONFIG_SPACE_OFFSET: u64 = 0x100;

/// Feature bit for event-index notification suppression.
const VIRTIO_RING_F_EVENT_IDX: u32 = 29;

// Register offsets (all 32-bit). Visible to the test support code (`super::test_utils`) and
// the fuzz targets (`crate::fuzzing`).
pub(crate) const REG_MAGIC: u64 = 0x00;
pub(crate) const REG_VERSION: u64 = 0x04;
pub(crate) const REG_DEVICE_ID: u64 = 0x08;
pub(crate) const REG_VENDOR_ID: u64 = 0x0c;
pub(crate) const REG_DEVICE_FEATURES: u64 = 0x10;
pub(crate) const REG_DEVICE_FEATURES_SEL: u64 = 0x14;
pub(crate) const REG_DRIVER_FEATURES: u64 = 0x20;
pub(crate) const REG_DRIVER_FEATURES_SEL: u64 = 0x24;
pub(crate) const REG_QUEUE_SEL: u64 = 0x30;
pub(crate) const REG_QUEUE_NUM_MAX: u64 = 0x34;
pub(crate) const REG_QUEUE_NUM: u64 = 0x38;
pub(crate) const REG_QUEUE_READY: u64 = 0x44;
pub(crate) const REG_INTERRUPT_STATUS: u64 = 0x60;
pub(crate) const REG_INTERRUPT_ACK: u64 = 0x64;
pub(crate) const REG_STATUS: u64 = 0x70;
pub(crate) const REG_QUEUE_DESC_LOW: u64 = 0x80;
pub(crate) const REG_QUEUE_DESC_HIGH: u64 = 0x84;
pub(crate) const REG_QUEUE_DRIVER_LOW: u64 = 0x90;
pub(crate) const REG_QUEUE_DRIVER_HIGH: u64 = 0x94;
pub(crate) const REG_QUEUE_DEVICE_LOW: u64 = 0xa0;
pub(crate) const REG_QUEUE_DEVICE_HIGH: u64 = 0xa4;
pub(crate) const REG_SHM_SEL: u64 = 0xac;
pub(crate) const REG_SHM_LEN_LOW: u64 = 0xb0;
pub(crate) const REG_SHM_BASE_HIGH: u64 = 0xbc;
pub(crate) const REG_CONFIG_GENERATION: u64 = 0xfc;

// Per-queue record of rejected guest writes; any set bit makes the queue invalid.
const BAD_SIZE: u8 = 1;
const BAD_DESC: u8 = 2;
const BAD_DRIVER: u8 = 4;
const BAD_DEVICE: u8 = 8;

/// The status values a driver walks through, in order (virtio 1.x 3.1.1).
const STATUS_STEPS: [u32; 4] = [ACKNOWLEDGE, DRIVER, FEATURES_OK, DRIVER_OK];

/// Errors creating a transport, or activating its device (the latter are logged and turned
/// into DEVICE_NEEDS_RESET, never returned to the guest).
#[derive(Debug, thiserror::Error)]
pub enum MmioError {
    /// The device declared an invalid maximum queue size.
    #[error("queue {index}: invalid maximum size {size}")]
    InvalidQueueMaxSize {
        /// Queue index.
        index: usize,
        /// The size declared by the device.
        size: u16,
        /// Why virtio-queue refused it.
        #[source]
        source: virtio_queue::Error,
    },
    /// Creating an eventfd failed.
    #[error("creating an eventfd failed")]
    EventFd(#[source] io::Error),
    /// DRIVER_OK on a device that is already active.
    #[error("device is already activated")]
    AlreadyActivated,
    /// A ready queue has a bad size or addresses (misaligned, outside guest memory).
    #[error("queue {0} is ready but invalid")]
    InvalidQueue(usize),
    /// Copying a queue for the device failed.
    #[error("queue {index}: cannot copy its state")]
    QueueState {
        /// Queue index.
        index: usize,
        /// Why virtio-queue refused the state.
        #[source]
        source: virtio_queue::Error,
    },
    /// Duplicating a queue eventfd for the device failed.
    #[error("cloning a queue eventfd failed")]
    CloneEventFd(#[source] io::Error),
    /// The device refused to activate.
    #[error("device activation failed")]
    Activate(#[source] ActivateError),
}

/// A virtio device behind a virtio-mmio register window.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
    queues: Vec<Queue>,
    queue_errors: Vec<u8>,
    queue_evts: Vec<EventFd>,
    irq: Arc<IrqTrigger>,
    /// Guest-triggered warnings of this device (transport and data plane).
    log: Arc<GuestLog>,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    status: u32,
    config_generation: u32,
}

impl MmioTransport {
    /// Wraps `device`, creating one notification eventfd per queue and the interrupt eventfd.
    pub fn new(mem: GuestMemoryMmap, device: Box<dyn VirtioDevice>) -> Result<Self, MmioError> {
        let sizes = device.queue_max_sizes().to_vec();
        let mut queues = Vec::with_capacity(sizes.len());
        let mut queue_evts = Vec::with_capacity(sizes.len());
        for (index, &size) in sizes.iter().enumerate() {
            let q = Queue::new(size).map_err(|source| MmioError::InvalidQueueMaxSize {
                index,
                size,
                source,
            })?;
            queues.push(q);
            queue_evts.push(EventFd::new(EFD_NONBLOCK).map_err(MmioError::EventFd)?);
        }
        let irq = Arc::new(IrqTrigger::new().map_err(MmioError::EventFd)?);
        let log = Arc::new(GuestLog::new(super::device_name(device.device_type())));
        Ok(MmioTransport {
            device,
            mem,
            queue_errors: vec![0; queues.len()],
            queues,
            queue_evts,
            irq,
            log,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            status: 0,
            config_generation: 0,
        })
    }

    /// One eventfd per queue, to register as KVM ioeventfds on `base + 0x50` with
    /// `datamatch` = index.
    pub fn queue_evts(&self) -> &[EventFd] {
        &self.queue_evts
    }

    /// The interrupt eventfd, to register as a KVM irqfd.
    pub fn irq_evt(&self) -> &EventFd {
        self.irq.evt()
    }

    /// The interrupt trigger shared with the device.
    pub fn irq(&self) -> &Arc<IrqTrigger> {
        &self.irq
    }

    /// The wrapped device.
    pub fn device(&self) -> &dyn VirtioDevice {
        self.device.as_ref()
    }

    /// The wrapped device, mutably.
    pub fn device_mut(&mut self) -> &mut dyn VirtioDevice {
        self.device.as_mut()
    }

    /// The device's rate-limited log of guest-triggered warnings.
    pub fn guest_log(&self) -> &Arc<GuestLog> {
        &self.log
    }

    /// Current device status register.
    pub fn status(&self) -> u32 {
        self.status
    }

    /// Tells the driver the config space changed (bumps ConfigGeneration, config interrupt).
    pub fn notify_config_change(&mut self) {
        self.config_generation = self.config_generation.wrapping_add(1);
        if let Err(e) = self.irq.trigger(IrqKind::Config) {
            error!(error = %e, "virtio-mmio: config interrupt failed");
        }
    }

    fn selected_queue(&self) -> Option<&Queue> {
        self.queues.get(self.queue_sel as usize)
    }

    fn read_reg(&self, offset: u64) -> u32 {
        match offset {
            REG_MAGIC => MMIO_MAGIC_VALUE,
            REG_VERSION => MMIO_VERSION,
            REG_DEVICE_ID => self.device.device_type(),
            REG_VENDOR_ID => VENDOR_ID,
            REG_DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device.avail_features() as u32,
                1 => (self.device.avail_features() >> 32) as u32,
                _ => 0,
            },
            REG_QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| u32::from(q.max_size())),
            REG_QUEUE_READY => self.selected_queue().map_or(0, |q| u32::from(q.ready())),
            REG_INTERRUPT_STATUS => self.irq.status(),
            REG_STATUS => self.status,
            REG_CONFIG_GENERATION => self.config_generation,
            // No shared memory regions: length (and base) read as all ones.
            REG_SHM_LEN_LOW..=REG_SHM_BASE_HIGH => u32::MAX,
            _ => {
                debug!(
                    offset,
                    "virtio-mmio: read of unknown or write-only register"
                );
                0
            }
        }
    }

    /// Queue registers may only be written between FEATURES_OK and DRIVER_OK.
    fn queue_config_allowed(&self) -> bool {
        self.status & (FEATURES_OK | DRIVER_OK | FAILED | DEVICE_NEEDS_RESET) == FEATURES_OK
    }

    fn with_queue(&mut self, reg: u64, f: impl FnOnce(&mut Queue, &mut u8, &GuestLog)) {
        if !self.queue_config_allowed() {
            guest_warn!(
                self.log,
                reg,
                status = self.status,
                "virtio-mmio: queue write in wrong state, ignored"
            );
            return;
        }
        let i = self.queue_sel as usize;
        match (self.queues.get_mut(i), self.queue_errors.get_mut(i)) {
            (Some(q), Some(err)) => f(q, err, &self.log),
            _ => guest_warn!(
                self.log,
                queue = i,
                "virtio-mmio: write to non-existent queue, ignored"
            ),
        }
    }

    fn write_reg(&mut self, offset: u64, v: u32) {
        match offset {
            REG_DEVICE_FEATURES_SEL => self.device_features_sel = v,
            REG_DRIVER_FEATURES => {
                if self.status & (DRIVER | FEATURES_OK | FAILED) != DRIVER {
                    guest_warn!(
                        self.log,
                        status = self.status,
                        "virtio-mmio: driver features write in wrong state"
                    );
                    return;
                }
                match self.driver_features_sel {
                    0 => {
                        self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(v)
                    }
                    1 => {
                        self.driver_features =
                            (self.driver_features & 0xffff_ffff) | (u64::from(v) << 32)
                    }
                    sel => guest_warn!(
                        self.log,
                        sel,
                        "virtio-mmio: driver features page out of range"
                    ),
                }
            }
            REG_DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            REG_QUEUE_SEL => self.queue_sel = v,
            REG_QUEUE_NUM => self.with_queue(offset, |q, err, log| {
                // u16 conversion failure or a bad size both make the queue invalid.
                match u16::try_from(v).ok().map(|s| q.try_set_size(s)) {
                    Some(Ok(())) => *err &= !BAD_SIZE,
                    _ => {
                        guest_warn!(
                            log,
                            size = v,
                            max = q.max_size(),
                            "virtio-mmio: invalid queue size"
                        );
                        *err |= BAD_SIZE;
                    }
                }
            }),
            REG_QUEUE_READY => self.with_queue(offset, |q, _, _| q.set_ready(v == 1)),
            REG_QUEUE_DESC_LOW | REG_QUEUE_DESC_HIGH => self.with_queue(offset, |q, err, log| {
                let addr = merge_half(q.desc_table(), offset == REG_QUEUE_DESC_HIGH, v);
                set_flag(
                    log,
                    err,
                    BAD_DESC,
                    q.try_set_desc_table_address(addr).is_err(),
                );
            }),
            REG_QUEUE_DRIVER_LOW | REG_QUEUE_DRIVER_HIGH => {
                self.with_queue(offset, |q, err, log| {
                    let addr = merge_half(q.avail_ring(), offset == REG_QUEUE_DRIVER_HIGH, v);
                    set_flag(
                        log,
                        err,
                        BAD_DRIVER,
                        q.try_set_avail_ring_address(addr).is_err(),
                    );
                })
            }
            REG_QUEUE_DEVICE_LOW | REG_QUEUE_DEVICE_HIGH => {
                self.with_queue(offset, |q, err, log| {
                    let addr = merge_half(q.used_ring(), offset == REG_QUEUE_DEVICE_HIGH, v);
                    set_flag(
                        log,
                        err,
                        BAD_DEVICE,
                        q.try_set_used_ring_address(addr).is_err(),
                    );
                })
            }
            NOTIFY_REG_OFFSET => match self.queue_evts.get(v as usize) {
                Some(evt) => {
                    if let Err(e) = evt.write(1) {
                        error!(queue = v, error = %e, "virtio-mmio: queue notify failed");
                    }
                }
                None => guest_warn!(
                    self.log,
                    queue = v,
                    "virtio-mmio: notify for non-existent queue"
                ),
            },
            REG_INTERRUPT_ACK => self.irq.ack(v),
            REG_STATUS => self.set_status(v),
            REG_SHM_SEL => {}
            _ => debug!(
                offset,
                value = v,
                "virtio-mmio: write to unknown or read-only register"
            ),
        }
    }

    fn set_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        if v & FAILED != 0 {
            if self.log.allow() {
                info!("virtio-mmio: driver marked the device FAILED");
            }
            self.status |= FAILED;
            return;
        }
        // The driver writes back what it read, possibly including DEVICE_NEEDS_RESET.
        let wanted = v & !DEVICE_NEEDS_RESET;
        let current = self.status & !DEVICE_NEEDS_RESET;
        let valid_step = (1..=STATUS_STEPS.len())
            .any(|n| STATUS_STEPS[..n].iter().fold(0, |a, b| a | b) == wanted);
        if !valid_step || wanted & current != current || self.status & FAILED != 0 {
            guest_warn!(
                self.log,
                status = self.status,
                wanted = v,
                "virtio-mmio: invalid status transition"
            );
            return;
        }
        for step in STATUS_STEPS {
            if wanted & step == 0 || current & step != 0 {
                continue;
            }
            match step {
                FEATURES_OK if !self.negotiate_features() => return,
                DRIVER_OK => {
                    self.status |= DRIVER_OK;
                    self.activate();
                    return;
                }
                _ => {}
            }
            self.status |= step;
        }
    }

    /// On FEATURES_OK: accepts the negotiation only if VERSION_1 was acked.
    fn negotiate_features(&mut self) -> bool {
        let avail = self.device.avail_features();
        let unknown = self.driver_features & !avail;
        if unknown != 0 {
            guest_warn!(
                self.log,
                unknown,
                "virtio-mmio: driver acked features not offered, masked"
            );
        }
        let acked = self.driver_features & avail;
        if acked & (1 << VIRTIO_F_VERSION_1) == 0 {
            guest_warn!(
                self.log,
                "virtio-mmio: driver did not accept VIRTIO_F_VERSION_1, refusing FEATURES_OK"
            );
            return false;
        }
        self.device.set_acked_features(acked);
        true
    }

    fn activate(&mut self) {
        if let Err(e) = self.try_activate() {
            // The guest can cause this (bad queue setup) as often as it likes.
            if self.log.allow() {
                error!(reason = %crate::error_chain(&e), "virtio-mmio: activation failed, device needs reset");
            }
            self.status |= DEVICE_NEEDS_RESET;
            if let Err(e) = self.irq.trigger(IrqKind::Config) {
                error!(error = %e, "virtio-mmio: config interrupt failed");
            }
        }
    }

    fn try_activate(&mut self) -> Result<(), MmioError> {
        if self.device.is_activated() {
            return Err(MmioError::AlreadyActivated);
        }
        let acked = self.driver_features & self.device.avail_features();
        let event_idx = acked & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        let mut queues = Vec::with_capacity(self.queues.len());
        for (i, q) in self.queues.iter().enumerate() {
            if q.ready() && (self.queue_errors[i] != 0 || !q.is_valid(&self.mem)) {
                return Err(MmioError::InvalidQueue(i));
            }
            let mut copy = Queue::try_from(q.state())
                .map_err(|source| MmioError::QueueState { index: i, source })?;
            copy.set_event_idx(event_idx);
            queues.push(copy);
        }
        let queue_evts = self
            .queue_evts
            .iter()
            .map(EventFd::try_clone)
            .collect::<io::Result<Vec<_>>>()
            .map_err(MmioError::CloneEventFd)?;
        let ctx = ActivateContext {
            mem: self.mem.clone(),
            queues,
            queue_evts,
            irq: self.irq.clone(),
            acked_features: acked,
            log: self.log.clone(),
        };
        self.device.activate(ctx).map_err(MmioError::Activate)
    }

    fn reset(&mut self) {
        if !self.device.reset() {
            error!("virtio-mmio: device does not support reset, marking it FAILED");
            self.status |= FAILED;
            return;
        }
        self.status = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
        for q in &mut self.queues {
            q.reset();
        }
        self.queue_errors.fill(0);
        for evt in &self.queue_evts {
            // Drop notifications that were not consumed; EAGAIN just means none.
            let _ = evt.read();
        }
        self.irq.clear();
    }
}

/// Replaces the low or high 32 bits of `addr`.
fn merge_half(addr: u64, high: bool, v: u32) -> GuestAddress {
    GuestAddress(if high {
        (addr & 0xffff_ffff) | (u64::from(v) << 32)
    } else {
        (addr & !0xffff_ffff) | u64::from(v)
    })
}

fn set_flag(log: &GuestLog, flags: &mut u8, flag: u8, on: bool) {
    if on {
        guest_warn!(log, flag, "virtio-mmio: misaligned queue address");
        *flags |= flag;
    } else {
        *flags &= !flag;
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let in_window = offset
            .checked_add(data.len() as u64)
            .is_some_and(|end| end <= MMIO_WINDOW_SIZE);
        if !in_window {
            data.fill(0);
        } else if offset >= CONFIG_SPACE_OFFSET {
            self.device.read_config(offset - CONFIG_SPACE_OFFSET, data);
        } else if data.len() == 4 && offset.is_multiple_of(4) {
            data.copy_from_slice(&self.read_reg(offset).to_le_bytes());
        } else {
            debug!(
                offset,
                len = data.len(),
                "virtio-mmio: bad register read size"
            );
            data.fill(0);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let in_window = offset
            .checked_add(data.len() as u64)
            .is_some_and(|end| end <= MMIO_WINDOW_SIZE);
        if !in_window {
            return;
        }
        if offset >= CONFIG_SPACE_OFFSET {
            self.device.write_config(offset - CONFIG_SPACE_OFFSET, data);
        } else if let (Ok(bytes), 0) = (<[u8; 4]>::try_from(data), offset % 4) {
            self.write_reg(offset, u32::from_le_bytes(bytes));
        } else {
            debug!(
                offset,
                len = data.len(),
                "virtio-mmio: bad register write size"
            );
        }
    }
}
