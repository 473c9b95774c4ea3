//! What every virtio device model keeps the same way: the offered and acked features, a
//! read-only config space, and the registration of its data-plane handler with the event
//! manager between `activate` and `reset`.

use std::sync::{Arc, Mutex};

use event_manager::SubscriberId;
use tracing::error;
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

use crate::guest_log::GuestLog;
use crate::guest_warn;

use super::snapshot::{DeviceSnapshot, DeviceState, SnapshotError};
use super::{
    lock, read_config_bytes, register_subscriber, unregister_subscriber, ActivateError, DataPlane,
    EventEndpoint, Subscriber,
};

/// The common state of a device whose data plane is a handler of type `H`.
pub(crate) struct DeviceBase<H> {
    /// Log prefix, e.g. "virtio-blk".
    name: &'static str,
    avail_features: u64,
    acked_features: u64,
    config_space: Box<[u8]>,
    endpoint: EventEndpoint,
    /// Guest-triggered warnings (config writes).
    log: GuestLog,
    /// While activated: the handler registered with the event manager, and its id there.
    active: Option<(Arc<Mutex<H>>, SubscriberId)>,
}

impl<H: DataPlane> DeviceBase<H> {
    /// An inactive device offering `avail_features`, with a read-only `config_space`, whose
    /// handler will be registered with `endpoint`.
    pub(crate) fn new(
        name: &'static str,
        avail_features: u64,
        config_space: &[u8],
        endpoint: EventEndpoint,
    ) -> Self {
        DeviceBase {
            name,
            avail_features,
            acked_features: 0,
            config_space: config_space.into(),
            endpoint,
            log: GuestLog::new(name),
            active: None,
        }
    }

    /// [`super::VirtioDevice::avail_features`].
    pub(crate) fn avail_features(&self) -> u64 {
        self.avail_features
    }

    /// Features acked by the driver (0 after reset).
    pub(crate) fn acked_features(&self) -> u64 {
        self.acked_features
    }

    /// Records the driver's features, masked with the offered ones.
    pub(crate) fn set_acked_features(&mut self, acked: u64) {
        self.acked_features = acked & self.avail_features;
    }

    /// [`super::VirtioDevice::read_config`].
    pub(crate) fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config_space, offset, data);
    }

    /// [`super::VirtioDevice::write_config`] of a read-only config space: ignored.
    pub(crate) fn write_config(&self, offset: u64, data: &[u8]) {
        guest_warn!(
            self.log,
            offset,
            len = data.len(),
            "{}: config space is read-only, write ignored",
            self.name
        );
    }

    /// Whether a guest-triggered log line (activation, reset) may be logged now: a guest
    /// resetting in a loop must not flood the logs.
    pub(crate) fn may_log(&self) -> bool {
        self.log.allow()
    }

    /// True between a successful [`DeviceBase::start`] and [`DeviceBase::reset`].
    pub(crate) fn is_activated(&self) -> bool {
        self.active.is_some()
    }

    /// `Err(AlreadyActivated)` if activated: the first check of `activate`.
    pub(crate) fn check_inactive(&self) -> Result<(), ActivateError> {
        match self.active {
            Some(_) => Err(ActivateError::AlreadyActivated),
            None => Ok(()),
        }
    }

    /// The data-plane handler while activated.
    pub(crate) fn handler(&self) -> Option<&Arc<Mutex<H>>> {
        self.active.as_ref().map(|(handler, _)| handler)
    }

    /// The handler's queue positions with `state` (see [`VirtioDevice::snapshot`]); the
    /// handler is locked while `state` reads it.
    pub(crate) fn snapshot(
        &self,
        state: impl FnOnce(&H) -> DeviceState,
    ) -> Result<DeviceSnapshot, SnapshotError> {
        let handler = self
            .handler()
            .ok_or(SnapshotError::Inconsistent("snapshot of an inactive device"))?;
        let h = lock(handler);
        Ok(DeviceSnapshot { queues: h.queue_positions(), state: state(&h) })
    }

    /// Gives the restored handler its state (see [`VirtioDevice::restore`]).
    pub(crate) fn restore(
        &self,
        f: impl FnOnce(&mut H) -> Result<(), SnapshotError>,
    ) -> Result<(), SnapshotError> {
        let handler = self
            .handler()
            .ok_or(SnapshotError::Inconsistent("restore into an inactive device"))?;
        f(&mut lock(handler))
    }

    /// Registers `handler` with the event manager (its `init` adds its fds) and checks that
    /// `init` succeeded; if not, removes it again. On error the device is still inactive and
    /// takes back what it lent the handler (the caller keeps a clone of the `Arc`).
    pub(crate) fn start(&mut self, handler: Arc<Mutex<H>>) -> Result<(), ActivateError> {
        let subscriber: Subscriber = handler.clone();
        let id = register_subscriber(&self.endpoint, subscriber)?;
        let init_error = lock(&handler).take_registration_error();
        if let Some(e) = init_error {
            if let Err(e) = unregister_subscriber(&self.endpoint, id) {
                error!(error = %e, "{}: cannot remove half-registered handler", self.name);
            }
            return Err(ActivateError::Register(e));
        }
        self.active = Some((handler, id));
        Ok(())
    }

    /// Removes the handler from the event manager, if activated, and forgets the acked
    /// features. Returns the handler that was removed, for the device to take back what it
    /// lent it. Err (logged): the event manager refused, the device stays activated.
    pub(crate) fn reset(&mut self) -> Result<Option<Arc<Mutex<H>>>, ActivateError> {
        if let Some((_, id)) = &self.active {
            if let Err(e) = unregister_subscriber(&self.endpoint, *id) {
                error!(error = %e, "{}: cannot remove handler from the event manager", self.name);
                return Err(e);
            }
        }
        self.acked_features = 0;
        Ok(self.active.take().map(|(handler, _)| handler))
    }
}

/// Checks that the transport passed exactly `N` queues and `N` eventfds, all queues ready,
/// and returns them as arrays (in queue index order).
pub(crate) fn take_queues<const N: usize>(
    queues: Vec<Queue>,
    evts: Vec<EventFd>,
) -> Result<([Queue; N], [EventFd; N]), ActivateError> {
    let count_error = ActivateError::QueueCount {
        expected: N,
        queues: queues.len(),
        evts: evts.len(),
    };
    let (Ok(queues), Ok(evts)) = (
        <[Queue; N]>::try_from(queues),
        <[EventFd; N]>::try_from(evts),
    ) else {
        return Err(count_error);
    };
    if let Some(i) = queues.iter().position(|q| !q.ready()) {
        return Err(ActivateError::QueueNotReady(i));
    }
    Ok((queues, evts))
}
