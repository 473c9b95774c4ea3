//! virtio-rng (virtio 1.x, 5.4): one request queue; each chain of device-writable buffers is
//! filled with bytes from the host's `getrandom(2)`, at most [`MAX_BYTES_PER_CHAIN`] per chain.
//! No features besides VERSION_1, no config space.

#[cfg(test)]
mod tests;

use std::io;
use std::os::unix::io::AsRawFd;
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use tracing::error;
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestMemoryMmap};

use super::device_base::{take_queues, DeviceBase};
use super::queue::{DeviceQueue, Step, DEFAULT_BUDGET};
use super::snapshot::{DeviceSnapshot, DeviceState, SnapshotError};
use super::{
    ActivateContext, ActivateError, DataPlane, EventEndpoint, IrqTrigger, VirtioDevice, TYPE_RNG,
    VIRTIO_F_VERSION_1,
};
use crate::guest_log::GuestLog;
use crate::guest_warn;

/// Size of the request queue.
pub const QUEUE_SIZE: u16 = 256;
/// Bytes produced per chain, at most: a wakeup produces at most this times the queue budget.
pub const MAX_BYTES_PER_CHAIN: usize = 64 * 1024;

/// Fills `buf` from the host's entropy pool (getrandom(2), retrying on EINTR and short reads).
pub fn fill_random(buf: &mut [u8]) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let rest = &mut buf[done..];
        // SAFETY: `rest` is a valid, writable buffer of `rest.len()` bytes for the whole call.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        done += n as usize;
    }
    Ok(())
}

/// The virtio-rng device.
pub struct Rng {
    base: DeviceBase<RngHandler>,
}

impl Rng {
    /// An inactive entropy device whose data plane will run on `endpoint`'s event manager.
    pub fn new(endpoint: EventEndpoint) -> Self {
        let features = 1u64 << VIRTIO_F_VERSION_1;
        Rng {
            base: DeviceBase::new("virtio-rng", features, &[], endpoint),
        }
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        TYPE_RNG
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
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
        self.base.write_config(offset, data);
    }
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        self.base.check_inactive()?;
        let ([queue], [evt]) = take_queues(ctx.queues, ctx.queue_evts)?;
        self.base.set_acked_features(ctx.acked_features);
        let handler = RngHandler {
            mem: ctx.mem,
            queue: DeviceQueue::new(queue, evt, DEFAULT_BUDGET, "virtio-rng queue"),
            irq: ctx.irq,
            log: ctx.log,
            buf: vec![0u8; MAX_BYTES_PER_CHAIN],
            registration_error: None,
        };
        self.base.start(Arc::new(Mutex::new(handler)))
    }
    fn reset(&mut self) -> bool {
        self.base.reset().is_ok()
    }
    fn is_activated(&self) -> bool {
        self.base.is_activated()
    }

    fn snapshot(&self) -> Result<DeviceSnapshot, SnapshotError> {
        self.base.snapshot(|_| DeviceState::None)
    }

    fn restore(&mut self, saved: &DeviceSnapshot) -> Result<(), SnapshotError> {
        match saved.state {
            DeviceState::None => Ok(()),
            _ => Err(SnapshotError::Inconsistent("not an entropy device's state")),
        }
    }
}

/// The data plane: fills the request queue's buffers.
pub struct RngHandler {
    mem: GuestMemoryMmap,
    queue: DeviceQueue,
    irq: Arc<IrqTrigger>,
    log: Arc<GuestLog>,
    /// Scratch buffer of [`MAX_BYTES_PER_CHAIN`] bytes.
    buf: Vec<u8>,
    registration_error: Option<event_manager::Error>,
}

impl RngHandler {
    /// Serves available requests (at most the queue's budget per call). Returns the number
    /// of chains completed.
    pub fn process_queue(&mut self) -> usize {
        let (mem, log, buf) = (&self.mem, &*self.log, &mut self.buf);
        let pass = self.queue.process(mem, &self.irq, log, |chain| {
            let head = chain.head_index();
            match fill_chain(mem, chain, buf) {
                Ok(n) => Step::Used(n),
                Err(e) => {
                    guest_warn!(log, head, error = %e, "virtio-rng: request not served");
                    Step::Used(0)
                }
            }
        });
        pass.completed
    }
}

/// Writes random bytes into the chain's buffers, up to [`MAX_BYTES_PER_CHAIN`] in all. A chain
/// with a device-readable buffer, or a buffer outside guest memory, gets nothing.
fn fill_chain(
    mem: &GuestMemoryMmap,
    chain: impl Iterator<Item = Descriptor>,
    buf: &mut [u8],
) -> io::Result<u32> {
    let mut bufs = Vec::new();
    let mut total = 0usize;
    for d in chain {
        if !d.is_write_only() {
            return Err(io::Error::other("device-readable descriptor in a request"));
        }
        let n = (d.len() as usize).min(buf.len() - total);
        if n > 0 {
            bufs.push((d.addr(), n));
            total += n;
        }
    }
    fill_random(&mut buf[..total])?;
    let mut off = 0;
    for (addr, n) in bufs {
        mem.write_slice(&buf[off..off + n], addr)
            .map_err(io::Error::other)?;
        off += n;
    }
    // total <= MAX_BYTES_PER_CHAIN.
    Ok(total as u32)
}

impl DataPlane for RngHandler {
    fn take_registration_error(&mut self) -> Option<event_manager::Error> {
        self.registration_error.take()
    }
    fn queue_positions(&self) -> Vec<super::snapshot::QueuePosition> {
        vec![self.queue.position()]
    }
}

impl MutEventSubscriber for RngHandler {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.queue.evt, EventSet::IN)) {
            error!(error = %e, "virtio-rng: cannot register the queue eventfd");
            self.registration_error = Some(e);
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if events.fd() != self.queue.evt.as_raw_fd() || !events.event_set().contains(EventSet::IN) {
            error!(
                fd = events.fd(),
                "virtio-rng: unexpected event, unregistering fd"
            );
            if let Err(e) = ops.remove(events) {
                error!(error = %e, "virtio-rng: cannot unregister fd");
            }
            return;
        }
        self.queue.drain_evt();
        self.process_queue();
    }
}
