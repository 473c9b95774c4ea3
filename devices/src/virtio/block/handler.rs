//! virtio-blk data plane: drains the request queue.
//!
//! [`BlockHandler`] owns everything the data plane touches (queue, eventfd, interrupt, rate
//! limiter) and shares the disk with the device. It has no dependency on KVM or on the event
//! loop, so it is driven directly in unit tests; `event_handler.rs` plugs it into the event
//! manager.

#[cfg(test)]
mod tests;

use std::sync::Arc;

use tracing::debug;
use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::request::{self, Disk};
use super::VIRTIO_BLK_S_OK;
use crate::guest_log::GuestLog;
use crate::guest_warn;
use crate::rate_limiter::RateLimiter;
use crate::virtio::queue::{Chain, DeviceQueue, Step, Stop};
use crate::virtio::IrqTrigger;

/// Requests handled per queue wakeup, at most; the handler kicks its own eventfd to continue
/// after the event loop served its other fds.
pub const BUDGET: usize = 64;

/// The data plane of one block device.
#[derive(Debug)]
pub struct BlockHandler {
    pub(crate) mem: GuestMemoryMmap,
    pub(crate) queue: DeviceQueue,
    pub(crate) irq: Arc<IrqTrigger>,
    pub(crate) disk: Arc<Disk>,
    pub(crate) rate_limiter: Option<RateLimiter>,
    /// Guest-triggered warnings of this device.
    pub(crate) log: Arc<GuestLog>,
    /// Set by `init` if registering an fd with the event manager failed.
    pub(crate) registration_error: Option<event_manager::Error>,
}

/// What one pass over the queue did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProcessStats {
    /// Chains returned to the guest (including failed ones).
    pub completed: usize,
    /// Processing stopped because the rate limiter is out of tokens.
    pub throttled: bool,
    /// Processing stopped after [`BUDGET`] requests; the queue eventfd was kicked to resume.
    pub yielded: bool,
}

impl BlockHandler {
    /// A handler for an activated device.
    pub fn new(
        mem: GuestMemoryMmap,
        queue: Queue,
        queue_evt: EventFd,
        irq: Arc<IrqTrigger>,
        disk: Arc<Disk>,
        rate_limiter: Option<RateLimiter>,
        log: Arc<GuestLog>,
    ) -> Self {
        BlockHandler {
            mem,
            queue: DeviceQueue::new(queue, queue_evt, BUDGET, "virtio-blk request queue"),
            irq,
            disk,
            rate_limiter,
            log,
            registration_error: None,
        }
    }

    /// The queue notification eventfd.
    pub fn queue_evt(&self) -> &EventFd {
        &self.queue.evt
    }

    /// The rate limiter, if any.
    pub fn rate_limiter(&self) -> Option<&RateLimiter> {
        self.rate_limiter.as_ref()
    }

    /// The rate limiter, to restore its levels.
    pub fn rate_limiter_mut(&mut self) -> Option<&mut RateLimiter> {
        self.rate_limiter.as_mut()
    }

    /// Takes the rate limiter back (device reset).
    pub fn take_rate_limiter(&mut self) -> Option<RateLimiter> {
        self.rate_limiter.take()
    }

    /// True while the rate limiter waits for its timer.
    pub fn is_throttled(&self) -> bool {
        self.rate_limiter
            .as_ref()
            .is_some_and(RateLimiter::is_blocked)
    }

    /// Processes available requests until the queue is empty, the rate limiter says stop or
    /// [`BUDGET`] requests were done, then raises the used-ring interrupt if anything was
    /// completed.
    pub fn process_queue(&mut self) -> ProcessStats {
        if self.is_throttled() {
            return ProcessStats {
                throttled: true,
                ..Default::default()
            };
        }
        let mut throttled = false;
        let (mem, disk, log) = (&self.mem, &self.disk, &*self.log);
        let limiter = &mut self.rate_limiter;
        let pass = self.queue.process(mem, &self.irq, log, |chain| {
            run_request(mem, disk, log, limiter, &mut throttled, chain)
        });
        ProcessStats {
            completed: pass.completed,
            throttled,
            yielded: pass.stop == Stop::Budget,
        }
    }
}

/// Parses and executes one request chain; writes its status.
fn run_request(
    mem: &GuestMemoryMmap,
    disk: &Disk,
    log: &GuestLog,
    limiter: &mut Option<RateLimiter>,
    throttled: &mut bool,
    chain: Chain<'_, '_>,
) -> Step {
    let head = chain.head_index();
    let parsed = match request::parse(mem, chain) {
        Ok(p) => p,
        Err(e) => {
            guest_warn!(log, head, error = %e, "virtio-blk: dropping malformed request chain");
            return Step::Used(0);
        }
    };
    if let (Some(rl), Ok(req)) = (limiter.as_mut(), &parsed.request) {
        if !rl.consume_request(req.cost_bytes()) {
            // Put the chain back; the limiter's timer will wake us up.
            *throttled = true;
            return Step::PutBack;
        }
    }
    let result = parsed.request.and_then(|req| req.execute(&parsed.mem, disk));
    let (status, written) = match result {
        Ok(written) => (VIRTIO_BLK_S_OK, written),
        Err(e) => {
            debug!(head, error = %e, "virtio-blk: request failed");
            // Only BrokenChain/NoStatus have no status, and parse returned those above.
            (e.status().unwrap_or(super::VIRTIO_BLK_S_IOERR), 0)
        }
    };
    match parsed.mem.write_slice(&[status], parsed.status_addr) {
        Ok(()) => Step::Used(written.saturating_add(1)),
        Err(e) => {
            guest_warn!(log, head, error = %e, "virtio-blk: cannot write request status");
            Step::Used(0)
        }
    }
}
