//! event-manager glue for [`BlockHandler`]: fds to watch and what to do when they fire.

use std::os::unix::io::AsRawFd;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use tracing::{error, warn};

use super::handler::BlockHandler;
use crate::virtio::DataPlane;

impl DataPlane for BlockHandler {
    fn take_registration_error(&mut self) -> Option<event_manager::Error> {
        self.registration_error.take()
    }
    fn queue_positions(&self) -> Vec<crate::virtio::snapshot::QueuePosition> {
        vec![self.queue.position()]
    }
}

impl MutEventSubscriber for BlockHandler {
    /// Registers the queue eventfd and, if any, the rate limiter's timerfd. A failure is
    /// recorded for the device's `activate` to report (init cannot return errors).
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.queue.evt, EventSet::IN)) {
            error!(error = %e, "virtio-blk: cannot register the queue eventfd");
            self.registration_error = Some(e);
            return;
        }
        if let Some(rl) = &self.rate_limiter {
            if let Err(e) = ops.add(Events::new(rl, EventSet::IN)) {
                error!(error = %e, "virtio-blk: cannot register the rate limiter timerfd");
                self.registration_error = Some(e);
            }
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        if !events.event_set().contains(EventSet::IN) {
            // ERROR or HANG_UP on an fd we own: should not happen. Stop watching it, or the
            // level-triggered epoll would spin.
            warn!(fd, events = ?events.event_set(), "virtio-blk: unexpected event, unregistering fd");
            if let Err(e) = ops.remove(events) {
                error!(error = %e, "virtio-blk: cannot unregister fd");
            }
            return;
        }
        if fd == self.queue.evt.as_raw_fd() {
            // Reset the counter first so notifications arriving during processing re-fire.
            self.queue.drain_evt();
            // While throttled, the timer event will resume processing.
            self.process_queue();
        } else if self
            .rate_limiter
            .as_ref()
            .is_some_and(|rl| rl.as_raw_fd() == fd)
        {
            if let Some(rl) = self.rate_limiter.as_mut() {
                if let Err(e) = rl.event_handler() {
                    error!(error = %e, "virtio-blk: rate limiter timer error");
                }
            }
            self.process_queue();
        } else {
            warn!(fd, "virtio-blk: event on an unknown fd");
        }
    }
}
