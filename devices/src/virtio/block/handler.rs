//! virtio-blk data plane: drains the request queue.
//!
//! [`BlockHandler`] owns everything the data plane touches (queue, eventfd, interrupt, rate
//! limiter) and shares the disk with the device. It has no dependency on KVM or on the event
//! loop, so it is driven directly in unit tests; `event_handler.rs` plugs it into the event
//! manager.

#[cfg(test)]
mod tests;

use std::sync::Arc;

use tracing::{debug, error, warn};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::request::{self, Disk};
use super::VIRTIO_BLK_S_OK;
use crate::rate_limiter::RateLimiter;
use crate::virtio::{pop_chain, IrqKind, IrqTrigger};

/// The data plane of one block device.
#[derive(Debug)]
pub struct BlockHandler {
    pub(crate) mem: GuestMemoryMmap,
    pub(crate) queue: Queue,
    pub(crate) queue_evt: EventFd,
    pub(crate) irq: Arc<IrqTrigger>,
    pub(crate) disk: Arc<Disk>,
    pub(crate) rate_limiter: Option<RateLimiter>,
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
    ) -> Self {
        BlockHandler {
            mem,
            queue,
            queue_evt,
            irq,
            disk,
            rate_limiter,
            registration_error: None,
        }
    }

    /// The queue notification eventfd.
    pub fn queue_evt(&self) -> &EventFd {
        &self.queue_evt
    }

    /// The rate limiter, if any.
    pub fn rate_limiter(&self) -> Option<&RateLimiter> {
        self.rate_limiter.as_ref()
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

    /// Processes every available request (until the rate limiter says stop), then raises the
    /// used-ring interrupt if anything was completed.
    pub fn process_queue(&mut self) -> ProcessStats {
        let mut stats = ProcessStats::default();
        if self.is_throttled() {
            return stats;
        }
        loop {
            if let Err(e) = self.queue.disable_notification(&self.mem) {
                warn!(error = %e, "virtio-blk: cannot disable notifications");
            }
            if self.drain(&mut stats) {
                break;
            }
            match self.queue.enable_notification(&self.mem) {
                // More requests arrived while notifications were off: go again.
                Ok(true) => continue,
                Ok(false) => break,
                Err(e) => {
                    warn!(error = %e, "virtio-blk: cannot enable notifications");
                    break;
                }
            }
        }
        if stats.completed > 0 {
            self.signal_used();
        }
        stats
    }

    /// Runs available chains. Returns true if processing must stop (throttled or broken queue).
    fn drain(&mut self, stats: &mut ProcessStats) -> bool {
        loop {
            let chain = match pop_chain(&mut self.queue, &self.mem) {
                Ok(Some(c)) => c,
                Ok(None) => return false,
                Err(e) => {
                    // E.g. the driver moved avail.idx more than a queue size ahead.
                    error!(error = %e, "virtio-blk: request queue is broken, not processing it");
                    return true;
                }
            };
            let head = chain.head_index();
            let used_len = match request::parse(&self.mem, chain) {
                Err(e) => {
                    warn!(head, error = %e, "virtio-blk: dropping malformed request chain");
                    0
                }
                Ok(parsed) => {
                    if let (Some(rl), Ok(req)) = (self.rate_limiter.as_mut(), &parsed.request) {
                        if !rl.consume_request(req.cost_bytes()) {
                            // Put the chain back; the limiter's timer will wake us up.
                            self.queue.go_to_previous_position();
                            stats.throttled = true;
                            return true;
                        }
                    }
                    let result = parsed
                        .request
                        .and_then(|req| req.execute(&self.mem, &self.disk));
                    let (status, written) = match result {
                        Ok(written) => (VIRTIO_BLK_S_OK, written),
                        Err(e) => {
                            debug!(head, error = %e, "virtio-blk: request failed");
                            // Only BrokenChain/NoStatus have no status, and parse returned
                            // those above.
                            (e.status().unwrap_or(super::VIRTIO_BLK_S_IOERR), 0)
                        }
                    };
                    match self.mem.write_obj(status, parsed.status_addr) {
                        Ok(()) => written.saturating_add(1),
                        Err(e) => {
                            warn!(head, error = %e, "virtio-blk: cannot write request status");
                            0
                        }
                    }
                }
            };
            if let Err(e) = self.queue.add_used(&self.mem, head, used_len) {
                error!(head, error = %e, "virtio-blk: cannot return chain to the used ring");
            }
            stats.completed += 1;
        }
    }

    fn signal_used(&mut self) {
        let needed = self.queue.needs_notification(&self.mem).unwrap_or(true);
        if needed {
            if let Err(e) = self.irq.trigger(IrqKind::Vring) {
                error!(error = %e, "virtio-blk: cannot signal used ring");
            }
        }
    }
}
