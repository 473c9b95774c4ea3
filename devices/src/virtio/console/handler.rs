//! virtio-console data plane: the control queues and each port's receive and transmit queues
//! (see the module documentation of [`super`] for the protocol and the flow control).

use std::collections::VecDeque;
use std::io;
use std::os::unix::io::RawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{debug, warn};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryMmap, Permissions};
use vmm_sys_util::eventfd::EventFd;

use super::control::{
    DEVICE_ADD, DEVICE_READY, LEN as CONTROL_LEN, PORT_NAME, PORT_OPEN, PORT_READY,
};
use super::{
    rx_queue_index, tx_queue_index, ConsoleInput, ConsoleOutput, CHUNK, CONTROL_RX_INDEX,
    CONTROL_TX_INDEX, MAX_TX_CHAIN,
};
use crate::guest_log::GuestLog;
use crate::guest_warn;
use crate::virtio::queue::{DeviceQueue, Step, Stop, DEFAULT_BUDGET};
use crate::virtio::{ActivateContext, IrqTrigger};

/// The host backends of each port, lent to the handler while the device is active.
pub(crate) type Backends = Vec<(
    Option<Box<dyn ConsoleInput>>,
    Option<Box<dyn ConsoleOutput>>,
)>;

/// A transmit chain the output has not taken entirely yet: where its bytes are in guest
/// memory, and how many were written.
#[derive(Debug)]
pub(super) struct TxChain {
    pub(super) head: u16,
    pub(super) bufs: Vec<(GuestAddress, usize)>,
    pub(super) done: usize,
}

/// One port's state.
pub(crate) struct Port {
    pub(super) name: String,
    pub(crate) rx: DeviceQueue,
    pub(crate) tx: DeviceQueue,
    pub(crate) input: Option<Box<dyn ConsoleInput>>,
    pub(crate) output: Option<Box<dyn ConsoleOutput>>,
    /// The guest sent PORT_READY.
    pub(super) ready: bool,
    /// The guest has the port open (PORT_OPEN 1).
    pub(super) guest_open: bool,
    /// The input reported EOF: the host side is closed.
    pub(super) input_eof: bool,
    /// The receive queue had no buffers: the input waits for an RX kick.
    pub(super) rx_starved: bool,
    /// The output failed: what the guest writes is discarded.
    pub(super) output_failed: bool,
    /// The chain being written to the output.
    pub(super) tx_pending: Option<TxChain>,
    /// Whether the input / output fd is registered with the event manager.
    pub(crate) input_watched: bool,
    pub(crate) output_watched: bool,
    /// epoll refused the input / output fd (EPERM: a regular file or /dev/null, which never
    /// block): it is used without being watched.
    pub(crate) input_unpollable: bool,
    pub(crate) output_unpollable: bool,
}

impl Port {
    /// Whether input bytes may go to the guest: the guest has the port open and the input
    /// has not ended.
    fn can_receive(&self) -> bool {
        self.input.is_some() && self.ready && self.guest_open && !self.input_eof
    }

    /// Whether the input fd should be watched: reading it could deliver bytes now.
    pub(crate) fn wants_input(&self) -> bool {
        self.can_receive() && !self.rx_starved && !self.input_unpollable
    }

    /// Whether the output fd should be watched: a chain waits for it.
    pub(crate) fn wants_output(&self) -> bool {
        self.tx_pending.is_some()
            && self.output.is_some()
            && !self.output_failed
            && !self.output_unpollable
    }
}

/// The data plane of one console device.
pub struct ConsoleHandler {
    pub(crate) mem: GuestMemoryMmap,
    pub(crate) irq: Arc<IrqTrigger>,
    pub(crate) log: Arc<GuestLog>,
    pub(crate) ports: Vec<Port>,
    pub(crate) ctrl_rx: DeviceQueue,
    pub(crate) ctrl_tx: DeviceQueue,
    /// The driver sent DEVICE_READY.
    pub(super) device_ready: bool,
    /// Control messages waiting for control receive buffers (bounded: see `send_control`).
    pub(super) outbox: VecDeque<Vec<u8>>,
    /// Scratch buffer of [`CHUNK`] bytes.
    buf: Vec<u8>,
    /// Set by `init` if registering an fd with the event manager failed.
    pub(crate) registration_error: Option<event_manager::Error>,
}

impl ConsoleHandler {
    /// A handler for an activated device: `ctx` has `2 * names.len() + 2` ready queues.
    pub(crate) fn new(ctx: ActivateContext, names: Vec<String>, backends: Backends) -> Self {
        let mut queues: Vec<Option<(Queue, EventFd)>> = ctx
            .queues
            .into_iter()
            .zip(ctx.queue_evts)
            .map(Some)
            .collect();
        let mut take = |i: usize, name: &'static str| {
            let (q, evt) = queues[i].take().expect("queue count checked by the device");
            DeviceQueue::new(q, evt, DEFAULT_BUDGET, name)
        };
        let ctrl_rx = take(CONTROL_RX_INDEX, "virtio-console control RX queue");
        let ctrl_tx = take(CONTROL_TX_INDEX, "virtio-console control TX queue");
        let ports = names
            .into_iter()
            .zip(backends)
            .enumerate()
            .map(|(i, (name, (input, output)))| Port {
                name,
                rx: take(rx_queue_index(i), "virtio-console port RX queue"),
                tx: take(tx_queue_index(i), "virtio-console port TX queue"),
                input,
                output,
                ready: false,
                guest_open: false,
                input_eof: false,
                rx_starved: false,
                output_failed: false,
                tx_pending: None,
                input_watched: false,
                output_watched: false,
                input_unpollable: false,
                output_unpollable: false,
            })
            .collect();
        ConsoleHandler {
            mem: ctx.mem,
            irq: ctx.irq,
            log: ctx.log,
            ports,
            ctrl_rx,
            ctrl_tx,
            device_ready: false,
            outbox: VecDeque::new(),
            buf: vec![0u8; CHUNK],
            registration_error: None,
        }
    }

    /// Takes the backends back (device reset). The handler must not run afterwards.
    pub(crate) fn take_backends(&mut self) -> Backends {
        self.ports
            .iter_mut()
            .map(|p| (p.input.take(), p.output.take()))
            .collect()
    }

    /// Queues a control message for the guest. The outbox holds at most four messages per
    /// port plus a few: each port gets at most DEVICE_ADD, PORT_NAME and two PORT_OPEN.
    fn send_control(&mut self, id: usize, event: u16, value: u16, extra: &[u8]) {
        if self.outbox.len() >= 4 * self.ports.len() + 8 {
            guest_warn!(
                self.log,
                id,
                event,
                "virtio-console: control messages not read, dropped"
            );
            return;
        }
        let mut msg = Vec::with_capacity(CONTROL_LEN + extra.len());
        // id < MAX_PORTS.
        msg.extend_from_slice(&(id as u32).to_le_bytes());
        msg.extend_from_slice(&event.to_le_bytes());
        msg.extend_from_slice(&value.to_le_bytes());
        msg.extend_from_slice(extra);
        self.outbox.push_back(msg);
    }

    /// Puts queued control messages in the control receive queue's buffers.
    pub(crate) fn flush_control(&mut self) {
        if self.outbox.is_empty() {
            return;
        }
        let (mem, log, outbox) = (&self.mem, &*self.log, &mut self.outbox);
        let pass = self.ctrl_rx.process(mem, &self.irq, log, |chain| {
            let Some(msg) = outbox.pop_front() else {
                return Step::PutBack;
            };
            let head = chain.head_index();
            match writable_bufs(mem, chain, msg.len()) {
                Ok((bufs, cap)) if cap >= msg.len() => {
                    write_bufs(mem, &bufs, &msg);
                    // A control message is at most 8 + MAX_NAME_LEN bytes.
                    Step::Used(msg.len() as u32)
                }
                Ok(_) | Err(_) => {
                    guest_warn!(
                        log,
                        head,
                        "virtio-console: bad control RX buffer, message dropped"
                    );
                    Step::Used(0)
                }
            }
        });
        debug!(sent = pass.completed, waiting = self.outbox.len(), "virtio-console: control messages to the guest");
    }

    /// Handles the guest's control messages, then answers them.
    pub(crate) fn process_control(&mut self) {
        let mut msgs = Vec::new();
        let (mem, log) = (&self.mem, &*self.log);
        self.ctrl_tx.process(mem, &self.irq, log, |chain| {
            let head = chain.head_index();
            match read_control(mem, chain) {
                Some(m) => msgs.push(m),
                None => guest_warn!(log, head, "virtio-console: malformed control message"),
            }
            Step::Used(0)
        });
        let mut opened = Vec::new();
        for (id, event, value) in msgs {
            let port = usize::try_from(id).ok().filter(|&i| i < self.ports.len());
            match (event, port) {
                (DEVICE_READY, _) if value == 1 && !self.device_ready => {
                    debug!("virtio-console: driver ready");
                    self.device_ready = true;
                    for i in 0..self.ports.len() {
                        self.send_control(i, DEVICE_ADD, 0, &[]);
                    }
                }
                (DEVICE_READY, _) => {
                    guest_warn!(
                        self.log,
                        value,
                        "virtio-console: driver failed or repeated DEVICE_READY"
                    );
                }
                (PORT_READY, Some(i)) if value == 1 && !self.ports[i].ready => {
                    debug!(port = %self.ports[i].name, "virtio-console: port ready");
                    self.ports[i].ready = true;
                    let name = self.ports[i].name.clone().into_bytes();
                    self.send_control(i, PORT_NAME, 1, &name);
                    self.send_control(i, PORT_OPEN, 1, &[]);
                }
                (PORT_OPEN, Some(i)) if self.ports[i].ready => {
                    let p = &mut self.ports[i];
                    p.guest_open = value != 0;
                    debug!(port = %p.name, open = p.guest_open, "virtio-console: guest side");
                    if p.guest_open {
                        p.rx_starved = false;
                        opened.push(i);
                    }
                }
                _ => {
                    guest_warn!(
                        self.log,
                        id,
                        event,
                        value,
                        "virtio-console: unexpected control message"
                    );
                }
            }
        }
        for i in opened {
            self.process_rx(i);
        }
        self.flush_control();
    }

    /// Port `i`'s receive queue was kicked: it has new buffers.
    pub(crate) fn rx_kicked(&mut self, i: usize) {
        if let Some(p) = self.ports.get_mut(i) {
            p.rx_starved = false;
        }
        self.process_rx(i);
    }

    /// Moves input bytes into port `i`'s receive buffers (call on RX kick and input
    /// readable). On EOF, closes the host side once the bytes before it are in the guest.
    pub(crate) fn process_rx(&mut self, i: usize) {
        let Some(p) = self.ports.get_mut(i) else {
            return;
        };
        if !p.can_receive() {
            return;
        }
        let (mem, log, buf) = (&self.mem, &*self.log, &mut self.buf);
        let (input, eof) = (&mut p.input, &mut p.input_eof);
        let pass = p.rx.process(mem, &self.irq, log, |chain| {
            let Some(input) = input.as_mut() else {
                return Step::PutBack;
            };
            let head = chain.head_index();
            let (bufs, cap) = match writable_bufs(mem, chain, CHUNK) {
                Ok(b) => b,
                Err(e) => {
                    guest_warn!(log, head, error = %e, "virtio-console: bad RX chain returned unused");
                    return Step::Used(0);
                }
            };
            if cap == 0 {
                return Step::Used(0);
            }
            match input.read(&mut buf[..cap]) {
                Ok(0) => {
                    *eof = true;
                    Step::PutBack
                }
                Ok(n) => {
                    let n = n.min(cap);
                    write_bufs(mem, &bufs, &buf[..n]);
                    // n <= CHUNK.
                    Step::Used(n as u32)
                }
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted) => {
                    Step::PutBack
                }
                Err(e) => {
                    // Once per activation; a guest resetting in a loop makes it repeat.
                    guest_warn!(log, port = i, error = %e, "virtio-console: input failed, closing it");
                    *eof = true;
                    Step::PutBack
                }
            }
        });
        p.rx_starved = pass.stop == Stop::Empty;
        if p.input_eof {
            debug!(port = %p.name, "virtio-console: host input ended");
            self.send_control(i, PORT_OPEN, 0, &[]);
            self.flush_control();
        }
    }

    /// Writes port `i`'s transmit chains to its output, in order, until the output is full
    /// (call on TX kick and output writable).
    /// Returns why it stopped.
    pub(crate) fn process_tx(&mut self, i: usize) -> Stop {
        let Some(p) = self.ports.get_mut(i) else {
            return Stop::Empty;
        };
        let (mem, log, buf) = (&self.mem, &*self.log, &mut self.buf);
        if let Some(mut pending) = p.tx_pending.take() {
            if !write_out(
                mem,
                log,
                &mut p.output,
                &mut p.output_failed,
                buf,
                &mut pending,
            ) {
                p.tx_pending = Some(pending);
                return Stop::Blocked;
            }
            if p.tx.add_used(mem, log, pending.head, 0) {
                p.tx.signal_used(mem, &self.irq, log);
            }
        }
        let (output, failed, pending) = (&mut p.output, &mut p.output_failed, &mut p.tx_pending);
        let pass = p.tx.process(mem, &self.irq, log, |chain| {
            let head = chain.head_index();
            let mut tx = match readable_bufs(mem, chain) {
                Ok(bufs) => TxChain {
                    head,
                    bufs,
                    done: 0,
                },
                Err(e) => {
                    guest_warn!(log, head, error = %e, "virtio-console: bad TX chain dropped");
                    return Step::Used(0);
                }
            };
            if write_out(mem, log, output, failed, buf, &mut tx) {
                Step::Used(0)
            } else {
                *pending = Some(tx);
                Step::Hold
            }
        });
        pass.stop
    }

    /// Writes everything the guest has put in the transmit queues to the outputs, waiting for
    /// slow outputs, until `deadline`. For the VMM when the guest is done (its last writes may
    /// still be in the queues). Returns false if some output still had data at the deadline.
    pub fn flush_outputs(&mut self, deadline: Instant) -> bool {
        for i in 0..self.ports.len() {
            loop {
                match self.process_tx(i) {
                    Stop::Empty | Stop::Broken => break,
                    Stop::Budget => continue,
                    Stop::Blocked => {
                        let Some(fd) = self.ports[i].output.as_ref().map(|o| o.as_raw_fd()) else {
                            break;
                        };
                        let left = deadline.saturating_duration_since(Instant::now());
                        if left.is_zero() || !poll_out(fd, left) {
                            return false;
                        }
                    }
                }
            }
            // The queue kicked itself when it ran out of budget: that kick is stale now.
            self.ports[i].tx.drain_evt();
        }
        true
    }
}

/// Waits until `fd` is writable (or failed), at most `timeout`.
fn poll_out(fd: RawFd, timeout: Duration) -> bool {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLOUT,
        revents: 0,
    };
    // Rounded up: never return before the deadline.
    let ms = i32::try_from(timeout.as_micros().div_ceil(1000)).unwrap_or(i32::MAX);
    // SAFETY: pfd is a valid pollfd array of length 1 that outlives the call.
    unsafe { libc::poll(&mut pfd, 1, ms) == 1 }
}

/// Writes what is left of `tx` to `output`. True when the chain is done (all written, or
/// discarded because there is no working output); false when the output is full.
fn write_out(
    mem: &GuestMemoryMmap,
    log: &GuestLog,
    output: &mut Option<Box<dyn ConsoleOutput>>,
    failed: &mut bool,
    buf: &mut [u8],
    tx: &mut TxChain,
) -> bool {
    let Some(out) = output.as_mut().filter(|_| !*failed) else {
        return true;
    };
    let mut skip = tx.done;
    for &(addr, len) in &tx.bufs {
        if skip >= len {
            skip -= len;
            continue;
        }
        let mut off = skip;
        skip = 0;
        while off < len {
            let n = (len - off).min(buf.len());
            // off < len, and the buffer was checked to be inside guest memory.
            let at = GuestAddress(addr.0 + off as u64);
            if let Err(e) = mem.read_slice(&mut buf[..n], at) {
                warn!(error = %e, "virtio-console: cannot read a TX buffer, chain dropped");
                return true;
            }
            match out.write(&buf[..n]) {
                Ok(0) => return false,
                Ok(m) => {
                    let m = m.min(n);
                    off += m;
                    tx.done += m;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
                Err(e) => {
                    guest_warn!(log, error = %e, "virtio-console: output failed, discarding what the guest writes");
                    *failed = true;
                    return true;
                }
            }
        }
    }
    true
}

/// Why a chain was refused.
#[derive(Debug, thiserror::Error)]
enum ChainError {
    #[error("descriptor of the wrong direction")]
    Direction,
    #[error("buffer at {0:#x} of {1} bytes is outside guest memory")]
    OutsideMemory(u64, u32),
    #[error("chain too long")]
    TooLong,
}

/// The device-writable buffers of a chain, all inside guest memory, up to `max` bytes in all;
/// and their total size.
fn writable_bufs(
    mem: &GuestMemoryMmap,
    chain: impl Iterator<Item = Descriptor>,
    max: usize,
) -> Result<(Vec<(GuestAddress, usize)>, usize), ChainError> {
    let mut bufs = Vec::new();
    let mut total = 0usize;
    for d in chain {
        if !d.is_write_only() {
            return Err(ChainError::Direction);
        }
        if !GuestMemory::check_range(mem, d.addr(), d.len() as usize, Permissions::Write) {
            return Err(ChainError::OutsideMemory(d.addr().0, d.len()));
        }
        let n = (d.len() as usize).min(max - total);
        if n > 0 {
            bufs.push((d.addr(), n));
            total += n;
        }
    }
    Ok((bufs, total))
}

/// The device-readable buffers of a chain, all inside guest memory, at most
/// [`MAX_TX_CHAIN`] bytes in all.
fn readable_bufs(
    mem: &GuestMemoryMmap,
    chain: impl Iterator<Item = Descriptor>,
) -> Result<Vec<(GuestAddress, usize)>, ChainError> {
    let mut bufs = Vec::new();
    let mut total = 0usize;
    for d in chain {
        if d.is_write_only() {
            return Err(ChainError::Direction);
        }
        if !GuestMemory::check_range(mem, d.addr(), d.len() as usize, Permissions::Read) {
            return Err(ChainError::OutsideMemory(d.addr().0, d.len()));
        }
        total += d.len() as usize;
        if total > MAX_TX_CHAIN {
            return Err(ChainError::TooLong);
        }
        if d.len() > 0 {
            bufs.push((d.addr(), d.len() as usize));
        }
    }
    Ok(bufs)
}

/// Copies `data` into `bufs` (checked to hold it); returns nothing: guest memory was checked.
fn write_bufs(mem: &GuestMemoryMmap, bufs: &[(GuestAddress, usize)], data: &[u8]) {
    let mut off = 0;
    for &(addr, len) in bufs {
        if off == data.len() {
            break;
        }
        let n = len.min(data.len() - off);
        if let Err(e) = mem.write_slice(&data[off..off + n], addr) {
            warn!(error = %e, "virtio-console: cannot write a guest buffer");
            return;
        }
        off += n;
    }
}

/// Reads one guest → host control message: (id, event, value).
fn read_control(
    mem: &GuestMemoryMmap,
    chain: impl Iterator<Item = Descriptor>,
) -> Option<(u32, u16, u16)> {
    let bufs = readable_bufs(mem, chain).ok()?;
    let mut msg = [0u8; CONTROL_LEN];
    let mut off = 0;
    for (addr, len) in bufs {
        if off == CONTROL_LEN {
            break;
        }
        let n = len.min(CONTROL_LEN - off);
        mem.read_slice(&mut msg[off..off + n], addr).ok()?;
        off += n;
    }
    if off < CONTROL_LEN {
        return None;
    }
    let id = u32::from_le_bytes([msg[0], msg[1], msg[2], msg[3]]);
    let event = u16::from_le_bytes([msg[4], msg[5]]);
    let value = u16::from_le_bytes([msg[6], msg[7]]);
    Some((id, event, value))
}
