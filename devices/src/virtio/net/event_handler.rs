//! event-manager glue for [`NetHandler`]: fds to watch and what to do when they fire.
//!
//! Watched: the RX and TX queue eventfds, the rate limiters' timerfds, and the backend fd
//! (`EventSet::IN`) only while [`NetHandler::wants_backend`], re-evaluated after every event.

use std::os::unix::io::{AsRawFd, RawFd};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use tracing::{error, warn};

use super::handler::NetHandler;
use crate::virtio::DataPlane;

/// Which of our fds fired.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Source {
    Backend,
    RxQueue,
    TxQueue,
    RxLimiter,
    TxLimiter,
    Unknown,
}

impl NetHandler {
    fn source(&self, fd: RawFd) -> Source {
        let is =
            |l: Option<&crate::rate_limiter::RateLimiter>| l.is_some_and(|rl| rl.as_raw_fd() == fd);
        if fd == self.backend_fd() {
            Source::Backend
        } else if fd == self.rx.evt.as_raw_fd() {
            Source::RxQueue
        } else if fd == self.tx.evt.as_raw_fd() {
            Source::TxQueue
        } else if is(self.rx_limiter.as_ref()) {
            Source::RxLimiter
        } else if is(self.tx_limiter.as_ref()) {
            Source::TxLimiter
        } else {
            Source::Unknown
        }
    }

    /// Registers or unregisters the backend fd to match [`NetHandler::wants_backend`].
    fn sync_backend_interest(&mut self, ops: &mut EventOps) {
        let want = self.wants_backend();
        if want == self.backend_watched {
            return;
        }
        let events = Events::new_raw(self.backend_fd(), EventSet::IN);
        let result = if want {
            ops.add(events)
        } else {
            ops.remove(events)
        };
        match result {
            Ok(()) => self.backend_watched = want,
            Err(e) => error!(error = %e, want, "virtio-net: cannot (un)watch the backend fd"),
        }
    }
}

impl DataPlane for NetHandler {
    fn take_registration_error(&mut self) -> Option<event_manager::Error> {
        self.registration_error.take()
    }
    fn queue_positions(&self) -> Vec<crate::virtio::snapshot::QueuePosition> {
        let mut rx = self.rx.position();
        rx.next_avail = self.rx_resume_avail();
        vec![rx, self.tx.position()]
    }
}

impl MutEventSubscriber for NetHandler {
    /// Registers the queue eventfds, the limiters' timerfds and the backend fd. A failure is
    /// recorded for the device's `activate` to report (init cannot return errors).
    fn init(&mut self, ops: &mut EventOps) {
        let mut fds = vec![self.rx.evt.as_raw_fd(), self.tx.evt.as_raw_fd()];
        fds.extend(self.rx_limiter.as_ref().map(AsRawFd::as_raw_fd));
        fds.extend(self.tx_limiter.as_ref().map(AsRawFd::as_raw_fd));
        for fd in fds {
            if let Err(e) = ops.add(Events::new_raw(fd, EventSet::IN)) {
                error!(fd, error = %e, "virtio-net: cannot register fd");
                self.registration_error = Some(e);
                return;
            }
        }
        self.backend_watched = false;
        if self.wants_backend() {
            let events = Events::new_raw(self.backend_fd(), EventSet::IN);
            match ops.add(events) {
                Ok(()) => self.backend_watched = true,
                Err(e) => {
                    error!(error = %e, "virtio-net: cannot register the backend fd");
                    self.registration_error = Some(e);
                }
            }
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        let set = events.event_set();
        let source = self.source(fd);
        if source == Source::Backend {
            if set.contains(EventSet::IN) {
                self.process_rx();
            }
            if set.intersects(EventSet::HANG_UP | EventSet::ERROR) {
                error!(fd, events = ?set, "virtio-net: backend hung up, RX stops");
                self.set_backend_failed();
            }
            self.sync_backend_interest(ops);
            return;
        }
        if !set.contains(EventSet::IN) {
            // ERROR or HANG_UP on an eventfd/timerfd we own: should not happen. Stop watching
            // it, or the level-triggered epoll would spin.
            warn!(fd, events = ?set, "virtio-net: unexpected event, unregistering fd");
            if let Err(e) = ops.remove(events) {
                error!(error = %e, "virtio-net: cannot unregister fd");
            }
            return;
        }
        match source {
            Source::RxQueue => {
                // Reset the counter first so kicks arriving during processing re-fire.
                self.rx.drain_evt();
                self.process_rx();
            }
            Source::TxQueue => {
                self.tx.drain_evt();
                self.process_tx();
            }
            Source::RxLimiter => {
                if let Some(rl) = self.rx_limiter.as_mut() {
                    if let Err(e) = rl.event_handler() {
                        error!(error = %e, "virtio-net: RX rate limiter timer error");
                    }
                }
                self.process_rx();
            }
            Source::TxLimiter => {
                if let Some(rl) = self.tx_limiter.as_mut() {
                    if let Err(e) = rl.event_handler() {
                        error!(error = %e, "virtio-net: TX rate limiter timer error");
                    }
                }
                self.process_tx();
            }
            Source::Backend | Source::Unknown => {
                warn!(fd, "virtio-net: event on an unknown fd");
            }
        }
        self.sync_backend_interest(ops);
    }
}
