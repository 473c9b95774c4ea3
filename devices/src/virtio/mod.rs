//! virtio-mmio transport and virtio devices.
//!
//! # Structure
//!
//! * [`VirtioDevice`] is what every device (block, net, ...) implements: features, config
//!   space, activation, reset. It knows nothing of MMIO.
//! * [`MmioTransport`] owns one `Box<dyn VirtioDevice>`, implements the virtio-mmio (version 2)
//!   register window as a [`crate::bus::BusDevice`], owns the queue-notify eventfds and the
//!   interrupt ([`IrqTrigger`]), and calls [`VirtioDevice::activate`] with an
//!   [`ActivateContext`] when the driver sets `DRIVER_OK`.
//! * The data plane of a device runs on the VMM's event-manager thread.
//!
//! # Activation and the event manager
//!
//! The VMM runs one `EventManager<`[`Subscriber`]`>` on its main thread and hands each device
//! an [`EventEndpoint`] (`event_manager::RemoteEndpoint`) at construction. `activate()` runs on
//! the vCPU thread that wrote `DRIVER_OK`; it builds the device's data-plane handler (which
//! implements `event_manager::MutEventSubscriber` and registers its fds in `init`), and hands
//! it to the event manager with [`register_subscriber`] (`RemoteEndpoint::call_blocking`).
//! `reset()` removes it again with [`unregister_subscriber`].
//!
//! Consequences for the VMM:
//! * the event loop must be running (on another thread than the vCPUs) whenever a guest may
//!   activate or reset a device, otherwise that vCPU blocks;
//! * the event-manager thread must never wait on a lock held by a vCPU during an MMIO exit
//!   (e.g. the transport's mutex), or activation deadlocks.
//!
//! Devices keep a typed `Arc<Mutex<Handler>>` clone of what they registered, so they can get
//! state (e.g. a rate limiter, a tap) back on reset.
//!
//! # Writing a device (virtio-rng is the smallest example; net, console follow blk)
//!
//! The common parts live in `device_base::DeviceBase` (features, read-only config space,
//! handler registration), `device_base::take_queues`, [`queue::DeviceQueue`] (one per
//! virtqueue: the notify loop with notification suppression, a per-wakeup budget, used-ring
//! signalling) and [`crate::guest_log::GuestLog`] (`ctx.log`: every warning a guest can
//! trigger goes through [`crate::guest_warn!`], rate-limited per device).
//!
//! 1. `new(config, host resources..., endpoint: EventEndpoint)`: a `DeviceBase` with the
//!    offered features and the config space; inactive.
//! 2. `activate(ctx)`: `take_queues` checks the queue count and readiness; build the handler
//!    from `ctx` (it owns the queues, the queue eventfds, `ctx.irq`, a clone of `ctx.mem`),
//!    wrap it in `Arc<Mutex<_>>` and `DeviceBase::start` it ([`register_subscriber`], then
//!    [`DataPlane::take_registration_error`]); on failure take back what it was lent.
//! 3. The handler's `MutEventSubscriber::init` adds its fds (`EventSet::IN`) and records a
//!    failure for [`DataPlane::take_registration_error`]; `process` drains the fired eventfd
//!    ([`queue::DeviceQueue::drain_evt`]) and runs the queue with
//!    [`queue::DeviceQueue::process`], whose closure gets each chain as a
//!    [`queue::Chain`] (iterate its descriptors; check each before use) and says what became
//!    of it ([`queue::Step`]); it signals the used ring itself. A
//!    [`crate::rate_limiter::RateLimiter`] is itself an fd to watch.
//! 4. `reset()`: `DeviceBase::reset` ([`unregister_subscriber`]) gives the handler back: take
//!    back what must survive.
//!
//! # Devices served by another process (vhost-user)
//!
//! [`fs::Fs`] has no handler at all: on activation it hands the queues, the queue eventfds
//! (KVM ioeventfds) and `ctx.irq`'s eventfd (the KVM irqfd) to a vhost-user backend, so
//! notifications and interrupts bypass the VMM. Such a device calls
//! [`IrqTrigger::set_sticky`] with [`IrqKind::Vring`]: the backend cannot set InterruptStatus.
//! Guest memory must be file-backed (memfd) for the backend to map it.

pub mod block;
pub mod console;
mod device_base;
pub mod fs;
pub mod mmio;
pub mod net;
pub mod queue;
pub mod rng;
pub mod snapshot;
// Also built for the fuzz targets (feature `fuzzing`), which use only part of it.
#[cfg(any(test, feature = "fuzzing"))]
#[cfg_attr(not(test), allow(dead_code))]
pub(crate) mod test_utils;

use std::io;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use event_manager::{MutEventSubscriber, RemoteEndpoint, SubscriberId};
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::guest_log::GuestLog;

pub use mmio::{MmioError, MmioTransport};

/// virtio device id of a network card.
pub const TYPE_NET: u32 = 1;
/// virtio device id of a block device.
pub const TYPE_BLOCK: u32 = 2;
/// virtio device id of a file system device (virtio-fs).
pub const TYPE_FS: u32 = 26;

/// virtio device id of a console.
pub const TYPE_CONSOLE: u32 = 3;
/// virtio device id of an entropy source.
pub const TYPE_RNG: u32 = 4;

/// Name of a device type for logs ("virtio-blk", ...).
pub fn device_name(device_type: u32) -> &'static str {
    match device_type {
        TYPE_NET => "virtio-net",
        TYPE_BLOCK => "virtio-blk",
        TYPE_CONSOLE => "virtio-console",
        TYPE_RNG => "virtio-rng",
        TYPE_FS => "virtio-fs",
        _ => "virtio",
    }
}

/// Feature bit: the device complies with virtio 1.x (mandatory for the mmio v2 transport).
pub const VIRTIO_F_VERSION_1: u32 = virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;

/// Device status bits (virtio 1.x, 2.1).
pub mod status {
    use virtio_bindings::virtio_config as c;
    /// Guest OS found the device.
    pub const ACKNOWLEDGE: u32 = c::VIRTIO_CONFIG_S_ACKNOWLEDGE;
    /// Guest OS knows how to drive the device.
    pub const DRIVER: u32 = c::VIRTIO_CONFIG_S_DRIVER;
    /// Feature negotiation complete.
    pub const FEATURES_OK: u32 = c::VIRTIO_CONFIG_S_FEATURES_OK;
    /// Driver is ready: the device may be activated.
    pub const DRIVER_OK: u32 = c::VIRTIO_CONFIG_S_DRIVER_OK;
    /// The device hit an error it cannot recover from without a reset.
    pub const DEVICE_NEEDS_RESET: u32 = c::VIRTIO_CONFIG_S_NEEDS_RESET;
    /// The driver gave up on the device.
    pub const FAILED: u32 = c::VIRTIO_CONFIG_S_FAILED;
}

/// Interrupt status bit: a used ring was updated.
pub const VIRTIO_MMIO_INT_VRING: u32 = virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_VRING;
/// Interrupt status bit: the configuration (or device status) changed.
pub const VIRTIO_MMIO_INT_CONFIG: u32 = virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_CONFIG;

/// A device's data-plane handler, as the device registers it with the event manager.
pub trait DataPlane: MutEventSubscriber + Send + 'static {
    /// Takes the error recorded by `init` (which cannot return one) if registering one of the
    /// handler's fds failed.
    fn take_registration_error(&mut self) -> Option<event_manager::Error>;
    /// Where the handler is in each of its queues, in queue index order (for a snapshot).
    fn queue_positions(&self) -> Vec<snapshot::QueuePosition>;
}

/// What the VMM's event manager holds: any data-plane handler.
pub type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;
/// Handle to the VMM's event manager, usable from any thread.
pub type EventEndpoint = RemoteEndpoint<Subscriber>;

/// Errors of device activation (and of the event-manager glue).
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// The transport passed a different number of queues or eventfds than the device has.
    #[error("expected {expected} queues, got {queues} queues and {evts} eventfds")]
    QueueCount {
        /// Queues the device has.
        expected: usize,
        /// Queues passed.
        queues: usize,
        /// Queue eventfds passed.
        evts: usize,
    },
    /// A queue the device needs was not set ready by the driver.
    #[error("queue {0} is not ready")]
    QueueNotReady(usize),
    /// `activate` called twice without a reset.
    #[error("device is already activated")]
    AlreadyActivated,
    /// Talking to the event manager failed.
    #[error("event manager call failed")]
    EventManager(#[source] event_manager::Error),
    /// The handler could not register its fds with the event manager.
    #[error("registering the device handler's fds failed")]
    Register(#[source] event_manager::Error),
    /// Device-specific failure (e.g. a tap device error).
    #[error("device-specific activation failure")]
    Device(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// Everything a device needs to start its data plane.
pub struct ActivateContext {
    /// Guest memory.
    pub mem: GuestMemoryMmap,
    /// One queue per entry of [`VirtioDevice::queue_max_sizes`], as configured by the driver.
    /// Queues the driver left not ready have `ready() == false`.
    pub queues: Vec<Queue>,
    /// One notification eventfd per queue (clones of the transport's, which the VMM registered
    /// as KVM ioeventfds).
    pub queue_evts: Vec<EventFd>,
    /// The device's interrupt.
    pub irq: Arc<IrqTrigger>,
    /// Features acked by the driver (already masked with the offered ones).
    pub acked_features: u64,
    /// The device's rate-limited log for guest-triggered warnings (shared with the transport).
    pub log: Arc<GuestLog>,
}

/// A virtio device, independent of the transport.
pub trait VirtioDevice: Send {
    /// virtio device id ([`TYPE_BLOCK`], [`TYPE_NET`], ...).
    fn device_type(&self) -> u32;
    /// Maximum size of each queue (each a power of two, at most 32768).
    fn queue_max_sizes(&self) -> &[u16];
    /// Offered features; includes [`VIRTIO_F_VERSION_1`].
    fn avail_features(&self) -> u64;
    /// Called with the driver's features (masked with `avail_features`) on `FEATURES_OK`.
    fn set_acked_features(&mut self, acked: u64);
    /// Reads the config space. `offset`/`data.len()` are guest-controlled: bytes out of range
    /// read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the config space. Guest-controlled; out-of-range or read-only writes are ignored.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Starts the data plane.
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError>;
    /// Stops the data plane and goes back to the inactive state, forgetting acked features.
    /// Called on every guest reset (status 0), activated or not: on an inactive device it must
    /// succeed. Returns false if the device cannot be reset (the transport then marks it
    /// FAILED).
    fn reset(&mut self) -> bool;
    /// True between a successful `activate` and `reset`.
    fn is_activated(&self) -> bool;
    /// While activated: the data plane's queue positions and the device's own state, for a
    /// VM snapshot (see [`snapshot`]). Called with the vCPUs paused, on the event-loop
    /// thread. Devices whose state cannot be saved keep this default.
    fn snapshot(&self) -> Result<snapshot::DeviceSnapshot, snapshot::SnapshotError> {
        Err(snapshot::SnapshotError::Unsupported(device_name(self.device_type())))
    }
    /// Right after a restore activated the device at the saved queue positions: takes back
    /// the rest of what [`VirtioDevice::snapshot`] saved.
    fn restore(&mut self, state: &snapshot::DeviceSnapshot) -> Result<(), snapshot::SnapshotError> {
        let _ = state;
        Err(snapshot::SnapshotError::Unsupported(device_name(self.device_type())))
    }
}

/// Which interrupt cause to raise.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IrqKind {
    /// A used ring was updated.
    Vring,
    /// The config space or the device status changed.
    Config,
}

impl IrqKind {
    fn bit(self) -> u32 {
        match self {
            IrqKind::Vring => VIRTIO_MMIO_INT_VRING,
            IrqKind::Config => VIRTIO_MMIO_INT_CONFIG,
        }
    }
}

/// The interrupt line of one virtio-mmio device: the InterruptStatus register plus the eventfd
/// that the VMM registers as a KVM irqfd.
#[derive(Debug)]
pub struct IrqTrigger {
    status: AtomicU32,
    /// Causes that read as pending whatever the driver acked: for a device whose backend
    /// signals the eventfd directly (vhost-user), which cannot set `status` itself.
    sticky: AtomicU32,
    evt: EventFd,
}

impl IrqTrigger {
    /// A new, non-blocking interrupt eventfd with no cause pending.
    pub fn new() -> io::Result<Self> {
        Ok(IrqTrigger {
            status: AtomicU32::new(0),
            sticky: AtomicU32::new(0),
            evt: EventFd::new(EFD_NONBLOCK)?,
        })
    }

    /// Sets the cause bit and signals the eventfd.
    pub fn trigger(&self, kind: IrqKind) -> io::Result<()> {
        self.status.fetch_or(kind.bit(), Ordering::SeqCst);
        self.evt.write(1)
    }

    /// Current InterruptStatus value.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst) | self.sticky.load(Ordering::SeqCst)
    }

    /// Makes `kind` read as pending until [`IrqTrigger::clear`] (device reset). For a device
    /// whose queues are served by another process that writes the eventfd directly: Linux'
    /// virtio-mmio driver only looks at the used rings when InterruptStatus has the VRING bit,
    /// and nobody else would set it. A spurious look finds nothing new and costs little.
    pub fn set_sticky(&self, kind: IrqKind) {
        self.sticky.fetch_or(kind.bit(), Ordering::SeqCst);
    }

    /// Sets causes as pending without signalling (a restore: the interrupt controller's
    /// saved state already has the line's level).
    pub fn set_pending(&self, bits: u32) {
        self.status.fetch_or(bits, Ordering::SeqCst);
    }

    /// InterruptACK: clears the given bits.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// Clears every pending cause, sticky ones included (device reset).
    pub fn clear(&self) {
        self.status.store(0, Ordering::SeqCst);
        self.sticky.store(0, Ordering::SeqCst);
    }

    /// The eventfd to register as a KVM irqfd.
    pub fn evt(&self) -> &EventFd {
        &self.evt
    }
}

/// Copies `config[offset..offset + data.len()]` into `data`; bytes out of range read as zero.
/// For [`VirtioDevice::read_config`] implementations.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    if start >= config.len() {
        return;
    }
    let n = data.len().min(config.len() - start);
    data[..n].copy_from_slice(&config[start..start + n]);
}

/// Pops the next available chain of `queue`: `Ok(None)` when there is none, `Err` when the
/// queue is broken (e.g. the driver moved avail.idx more than a queue size ahead).
pub(crate) fn pop_chain<'m>(
    queue: &mut Queue,
    mem: &'m GuestMemoryMmap,
) -> Result<Option<DescriptorChain<&'m GuestMemoryMmap>>, virtio_queue::Error> {
    Ok(queue.iter(mem)?.next())
}

/// Locks a mutex, recovering the data if a previous holder panicked.
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Adds `handler` to the event manager (its `init` registers its fds). Blocks until the
/// event-manager thread has done it: never call this from that thread.
pub fn register_subscriber(
    endpoint: &EventEndpoint,
    handler: Subscriber,
) -> Result<SubscriberId, ActivateError> {
    endpoint
        .call_blocking(move |ops| -> Result<SubscriberId, event_manager::Error> {
            Ok(ops.add_subscriber(handler))
        })
        .map_err(ActivateError::EventManager)
}

/// Removes a handler from the event manager (its fds are unregistered) and drops the manager's
/// reference to it. Blocks like [`register_subscriber`].
pub fn unregister_subscriber(
    endpoint: &EventEndpoint,
    id: SubscriberId,
) -> Result<(), ActivateError> {
    endpoint
        .call_blocking(move |ops| ops.remove_subscriber(id).map(drop))
        .map_err(ActivateError::EventManager)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn irq_trigger_sets_and_acks() {
        let irq = IrqTrigger::new().unwrap();
        irq.trigger(IrqKind::Vring).unwrap();
        irq.trigger(IrqKind::Config).unwrap();
        assert_eq!(irq.status(), VIRTIO_MMIO_INT_VRING | VIRTIO_MMIO_INT_CONFIG);
        assert_eq!(irq.evt().read().unwrap(), 2);
        irq.ack(VIRTIO_MMIO_INT_VRING);
        assert_eq!(irq.status(), VIRTIO_MMIO_INT_CONFIG);
        irq.clear();
        assert_eq!(irq.status(), 0);
        irq.set_sticky(IrqKind::Vring);
        irq.ack(VIRTIO_MMIO_INT_VRING);
        assert_eq!(irq.status(), VIRTIO_MMIO_INT_VRING, "sticky survives the ack");
        irq.clear();
        assert_eq!(irq.status(), 0, "reset clears sticky causes");
    }

    #[test]
    fn config_bytes_bounds() {
        let cfg = [1u8, 2, 3, 4];
        let mut d = [0xffu8; 3];
        read_config_bytes(&cfg, 2, &mut d);
        assert_eq!(d, [3, 4, 0]);
        read_config_bytes(&cfg, 4, &mut d);
        assert_eq!(d, [0, 0, 0]);
        read_config_bytes(&cfg, u64::MAX, &mut d);
        assert_eq!(d, [0, 0, 0]);
        let mut empty = [0u8; 0];
        read_config_bytes(&cfg, 0, &mut empty);
    }
}
