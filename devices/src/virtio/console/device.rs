//! The virtio-console device model: ports, features, config space, activation and reset.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use tracing::info;

use crate::virtio::snapshot::{DeviceSnapshot, DeviceState, SnapshotError};
use super::handler::{Backends, ConsoleHandler};
use super::{
    ConsoleError, ConsoleInput, ConsoleOutput, MAX_NAME_LEN, MAX_PORTS, QUEUE_SIZE,
    VIRTIO_CONSOLE_F_MULTIPORT,
};
use crate::virtio::device_base::DeviceBase;
use crate::virtio::{
    lock, ActivateContext, ActivateError, EventEndpoint, VirtioDevice, TYPE_CONSOLE,
    VIRTIO_F_VERSION_1,
};

/// Offset of `max_nr_ports` in the config space (after `cols` and `rows`).
const CONFIG_MAX_NR_PORTS: usize = 4;
/// `cols`, `rows`, `max_nr_ports`, `emerg_wr`.
const CONFIG_SPACE_SIZE: usize = 12;

/// One port: its name, as the guest sees it, and its host backends. A port without an input
/// never has data for the guest; a port without an output discards what the guest writes.
pub struct PortConfig {
    /// Name announced to the guest (`/sys/class/virtio-ports/*/name`): `[A-Za-z0-9._-]`, at
    /// most [`MAX_NAME_LEN`] bytes.
    pub name: String,
    /// Host → guest bytes.
    pub input: Option<Box<dyn ConsoleInput>>,
    /// Guest → host bytes.
    pub output: Option<Box<dyn ConsoleOutput>>,
}

/// A multiport virtio-console.
pub struct Console {
    names: Vec<String>,
    queue_sizes: Vec<u16>,
    base: DeviceBase<ConsoleHandler>,
    /// Lives here while inactive, in the handler while active.
    backends: Option<Backends>,
    /// The active handler, for [`ConsoleFlush`].
    active: Arc<Mutex<Option<Arc<Mutex<ConsoleHandler>>>>>,
}

/// Flushes a console's outputs from outside the event loop.
#[derive(Clone)]
pub struct ConsoleFlush(Arc<Mutex<Option<Arc<Mutex<ConsoleHandler>>>>>);

impl ConsoleFlush {
    /// Writes what the guest left in the transmit queues to the outputs, waiting for slow
    /// readers until `deadline` (see [`ConsoleHandler::flush_outputs`]). True if everything
    /// was written, or the device is not active. Call it after the vCPUs stopped, from any
    /// thread but the event loop's (it takes the handler's lock).
    pub fn flush(&self, deadline: std::time::Instant) -> bool {
        let handler = lock(&self.0).clone();
        handler.is_none_or(|h| lock(&h).flush_outputs(deadline))
    }
}

impl Console {
    /// An inactive console with `ports` (port `i` is `/dev/vport<dev>p<i>` in the guest).
    pub fn new(ports: Vec<PortConfig>, endpoint: EventEndpoint) -> Result<Self, ConsoleError> {
        if ports.is_empty() || ports.len() > MAX_PORTS {
            return Err(ConsoleError::PortCount(ports.len()));
        }
        let mut seen_names = HashSet::new();
        let mut seen_fds = HashSet::new();
        for p in &ports {
            let valid = !p.name.is_empty()
                && p.name.len() <= MAX_NAME_LEN
                && p.name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
            if !valid || !seen_names.insert(p.name.clone()) {
                return Err(ConsoleError::BadName(p.name.clone()));
            }
            let fds = p.input.as_ref().map(|i| i.as_raw_fd()).into_iter();
            for fd in fds.chain(p.output.as_ref().map(|o| o.as_raw_fd())) {
                if !seen_fds.insert(fd) {
                    return Err(ConsoleError::SharedFd(fd));
                }
            }
        }
        let n = ports.len();
        let mut config_space = [0u8; CONFIG_SPACE_SIZE];
        config_space[CONFIG_MAX_NR_PORTS..CONFIG_MAX_NR_PORTS + 4]
            .copy_from_slice(&(n as u32).to_le_bytes());
        let features = (1u64 << VIRTIO_F_VERSION_1) | (1u64 << VIRTIO_CONSOLE_F_MULTIPORT);
        let names = ports.iter().map(|p| p.name.clone()).collect();
        let backends = ports.into_iter().map(|p| (p.input, p.output)).collect();
        Ok(Console {
            names,
            queue_sizes: vec![QUEUE_SIZE; 2 * n + 2],
            base: DeviceBase::new("virtio-console", features, &config_space, endpoint),
            backends: Some(backends),
            active: Arc::new(Mutex::new(None)),
        })
    }

    /// The data-plane handler while activated.
    pub fn handler(&self) -> Option<&Arc<Mutex<ConsoleHandler>>> {
        self.base.handler()
    }

    /// A handle the VMM keeps (the device itself goes into the transport) to flush the
    /// outputs when the guest is done: see [`ConsoleFlush::flush`].
    pub fn flush_handle(&self) -> ConsoleFlush {
        ConsoleFlush(self.active.clone())
    }
}

impl VirtioDevice for Console {
    fn device_type(&self) -> u32 {
        TYPE_CONSOLE
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }
    fn avail_features(&self) -> u64 {
        self.base.avail_features()
    }
    fn set_acked_features(&mut self, acked: u64) {
        self.base.set_acked_features(acked);
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        self.base.read_config(offset, data);
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // emerg_wr is only writable with VIRTIO_CONSOLE_F_EMERG_WRITE, not offered.
        self.base.write_config(offset, data);
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        self.base.check_inactive()?;
        let expected = self.queue_sizes.len();
        if ctx.queues.len() != expected || ctx.queue_evts.len() != expected {
            return Err(ActivateError::QueueCount {
                expected,
                queues: ctx.queues.len(),
                evts: ctx.queue_evts.len(),
            });
        }
        if let Some(i) = ctx
            .queues
            .iter()
            .position(|q| !virtio_queue::QueueT::ready(q))
        {
            return Err(ActivateError::QueueNotReady(i));
        }
        if ctx.acked_features & (1u64 << VIRTIO_CONSOLE_F_MULTIPORT) == 0 {
            // Without the control queues the ports could not be named or closed.
            return Err(ActivateError::Device(
                "the driver did not accept VIRTIO_CONSOLE_F_MULTIPORT".into(),
            ));
        }
        let Some(backends) = self.backends.take() else {
            return Err(ActivateError::Device(
                "the console lost its backends".into(),
            ));
        };
        self.base.set_acked_features(ctx.acked_features);
        let handler = Arc::new(Mutex::new(ConsoleHandler::new(
            ctx,
            self.names.clone(),
            backends,
        )));
        if let Err(e) = self.base.start(handler.clone()) {
            self.backends = Some(lock(&handler).take_backends());
            return Err(e);
        }
        *lock(&self.active) = Some(handler);
        if self.base.may_log() {
            info!(ports = ?self.names, "virtio-console: activated");
        }
        Ok(())
    }

    fn reset(&mut self) -> bool {
        let Ok(stopped) = self.base.reset() else {
            return false;
        };
        if let Some(handler) = stopped {
            *lock(&self.active) = None;
            self.backends = Some(lock(&handler).take_backends());
            if self.base.may_log() {
                info!("virtio-console: reset");
            }
        }
        true
    }

    fn is_activated(&self) -> bool {
        self.base.is_activated()
    }

    fn snapshot(&self) -> Result<DeviceSnapshot, SnapshotError> {
        self.base.snapshot(|h| DeviceState::Console(h.state()))
    }

    fn restore(&mut self, saved: &DeviceSnapshot) -> Result<(), SnapshotError> {
        let DeviceState::Console(state) = &saved.state else {
            return Err(SnapshotError::Inconsistent("not a console's state"));
        };
        self.base.restore(|h| h.restore_state(state))
    }
}
