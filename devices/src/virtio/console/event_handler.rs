//! event-manager glue for [`ConsoleHandler`]: every queue eventfd; each port's input fd
//! (`EventSet::IN`) while `Port::wants_input` and output fd (`EventSet::OUT`) while
//! `Port::wants_output`, re-evaluated after every event.

use std::os::unix::io::{AsRawFd, RawFd};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use tracing::{debug, error, warn};

use super::handler::ConsoleHandler;
use crate::virtio::DataPlane;

/// Which of our fds fired.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Source {
    ControlRx,
    ControlTx,
    PortRx(usize),
    PortTx(usize),
    Input(usize),
    Output(usize),
    Unknown,
}

impl ConsoleHandler {
    fn source(&self, fd: RawFd) -> Source {
        if fd == self.ctrl_rx.evt.as_raw_fd() {
            return Source::ControlRx;
        }
        if fd == self.ctrl_tx.evt.as_raw_fd() {
            return Source::ControlTx;
        }
        for (i, p) in self.ports.iter().enumerate() {
            if fd == p.rx.evt.as_raw_fd() {
                return Source::PortRx(i);
            }
            if fd == p.tx.evt.as_raw_fd() {
                return Source::PortTx(i);
            }
            if p.input.as_ref().is_some_and(|b| b.as_raw_fd() == fd) {
                return Source::Input(i);
            }
            if p.output.as_ref().is_some_and(|b| b.as_raw_fd() == fd) {
                return Source::Output(i);
            }
        }
        Source::Unknown
    }

    /// Registers or unregisters the backends' fds to match what each port wants.
    fn sync_interest(&mut self, ops: &mut EventOps) {
        for p in &mut self.ports {
            let input = p.input.as_ref().map(|b| b.as_raw_fd());
            let want = p.wants_input();
            let (watched, unpollable) = (&mut p.input_watched, &mut p.input_unpollable);
            sync_fd(ops, input, EventSet::IN, want, watched, unpollable);
            let output = p.output.as_ref().map(|b| b.as_raw_fd());
            let want = p.wants_output();
            let (watched, unpollable) = (&mut p.output_watched, &mut p.output_unpollable);
            sync_fd(ops, output, EventSet::OUT, want, watched, unpollable);
        }
    }
}

fn sync_fd(
    ops: &mut EventOps,
    fd: Option<RawFd>,
    set: EventSet,
    want: bool,
    watched: &mut bool,
    unpollable: &mut bool,
) {
    let Some(fd) = fd else {
        return;
    };
    if want == *watched {
        return;
    }
    let events = Events::new_raw(fd, set);
    let result = if want {
        ops.add(events)
    } else {
        ops.remove(events)
    };
    match result {
        Ok(()) => *watched = want,
        Err(event_manager::Error::Epoll(e)) if want && e.errno() == libc::EPERM => {
            // A regular file or /dev/null: always ready, used without epoll.
            debug!(
                fd,
                "virtio-console: backend fd cannot be polled, used unwatched"
            );
            *unpollable = true;
        }
        Err(e) => error!(fd, want, error = %e, "virtio-console: cannot (un)watch a backend fd"),
    }
}

impl DataPlane for ConsoleHandler {
    fn take_registration_error(&mut self) -> Option<event_manager::Error> {
        self.registration_error.take()
    }
    fn queue_positions(&self) -> Vec<crate::virtio::snapshot::QueuePosition> {
        self.queue_positions()
    }
}

impl MutEventSubscriber for ConsoleHandler {
    /// Registers the queue eventfds; the backend fds are registered when they are wanted.
    fn init(&mut self, ops: &mut EventOps) {
        let mut fds = vec![self.ctrl_rx.evt.as_raw_fd(), self.ctrl_tx.evt.as_raw_fd()];
        for p in &mut self.ports {
            fds.push(p.rx.evt.as_raw_fd());
            fds.push(p.tx.evt.as_raw_fd());
            p.input_watched = false;
            p.output_watched = false;
        }
        for fd in fds {
            if let Err(e) = ops.add(Events::new_raw(fd, EventSet::IN)) {
                error!(fd, error = %e, "virtio-console: cannot register a queue eventfd");
                self.registration_error = Some(e);
                return;
            }
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        let source = self.source(fd);
        match source {
            // Readable, hung up or failed: the read tells which.
            Source::Input(i) => self.process_rx(i),
            // Writable or failed: the write tells which.
            Source::Output(i) => {
                self.process_tx(i);
            }
            _ if !events.event_set().contains(EventSet::IN) => {
                // ERROR or HANG_UP on an eventfd we own: should not happen. Stop watching it,
                // or the level-triggered epoll would spin.
                warn!(fd, events = ?events.event_set(), "virtio-console: unexpected event, unregistering fd");
                if let Err(e) = ops.remove(events) {
                    error!(error = %e, "virtio-console: cannot unregister fd");
                }
            }
            Source::ControlRx => {
                self.ctrl_rx.drain_evt();
                self.flush_control();
            }
            Source::ControlTx => {
                self.ctrl_tx.drain_evt();
                self.process_control();
            }
            Source::PortRx(i) => {
                self.ports[i].rx.drain_evt();
                self.rx_kicked(i);
            }
            Source::PortTx(i) => {
                self.ports[i].tx.drain_evt();
                self.process_tx(i);
            }
            Source::Unknown => warn!(fd, "virtio-console: event on an unknown fd"),
        }
        self.sync_interest(ops);
    }
}
