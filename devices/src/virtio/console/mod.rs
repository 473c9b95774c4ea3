//! virtio-console (virtio 1.x, 5.3) with `VIRTIO_CONSOLE_F_MULTIPORT`: named byte-stream ports
//! between host backends and the guest, for the command channel (a command's stdin, stdout and
//! stderr).
//!
//! # Why one multiport device, not one device per stream
//!
//! * **EOF.** A console port has no in-band end of stream. With MULTIPORT the host can close
//!   its side of a port (`VIRTIO_CONSOLE_PORT_OPEN` = 0): Linux's driver then marks the port
//!   `!host_connected`, and a guest `read()` that finds no data returns 0 (EOF), after the data
//!   already in the port's receive queue has been read (drivers/char/virtio_console.c,
//!   `port_fops_read`). Without MULTIPORT there is no control queue and no way to say EOF.
//! * **Names.** Each port is announced with `VIRTIO_CONSOLE_PORT_NAME`; the guest gets
//!   `/dev/vport<dev>p<id>` with `/sys/class/virtio-ports/vport<dev>p<id>/name` (and udev's
//!   `/dev/virtio-ports/<name>`), as virtme-ng and QEMU's virtserialport use. The guest finds
//!   "stdin"/"stdout"/"stderr" by name, not by probe order.
//! * One device, one MMIO slot and one IRQ instead of three.
//!
//! No port is a console (`VIRTIO_CONSOLE_CONSOLE_PORT` is never sent): the guest's console
//! stays on the serial port.
//!
//! # Flow control
//!
//! * guest → host (a port's transmit queue): a chain is written to the port's
//!   [`ConsoleOutput`]; if the output takes only part of it, or nothing (`WouldBlock`), the
//!   handler keeps that one chain (its guest addresses and how much was written, no copy of
//!   the data) and stops taking chains from the queue until the output's fd is writable. A slow
//!   host reader therefore fills the guest's queue and blocks the guest's `write()`; nothing is
//!   buffered on the host beyond one chunk, dropped or reordered.
//! * host → guest (a port's receive queue): the [`ConsoleInput`] is read only into a guest
//!   buffer that is already there, and only while the guest has the port open (the Linux driver
//!   discards data that arrives for a closed port). When the guest has no buffers, the input fd
//!   is not watched until it adds some. When the input reports EOF, the host side of the port
//!   is closed (`PORT_OPEN` = 0) after all the data before it was delivered.
//! * A failing output (e.g. `EPIPE`: the host reader went away) makes the port discard what the
//!   guest writes to it, so the guest does not block forever; this is logged once.
//!
//! # For the VMM
//!
//! * Build the ports (e.g. "stdin" with an [`FdInput`], "stdout" and "stderr" with an
//!   [`FdOutput`]) and attach the [`Console`] like any device. Backends must have distinct fd
//!   numbers (dup them); regular files and `/dev/null` work (epoll refuses them, they are used
//!   unwatched). [`FdInput::new`]/[`FdOutput::new`] set `O_NONBLOCK`, which applies to the
//!   whole open file description: on microvm's own stdout that would also make the serial
//!   console's writes to it fail with EAGAIN when a pipe reader is slow, and it outlives
//!   microvm for the parent shell. Give the console pipes (or clear the flag on exit).
//! * When the guest is done, the last bytes it wrote may still sit in the transmit queues
//!   (a Linux `write()` returns once its buffer is queued): keep a [`ConsoleFlush`] from
//!   [`Console::flush_handle`] and call [`ConsoleFlush::flush`] with a deadline after the
//!   vCPUs stopped, before exiting.
//! * Checked against Linux 6.12's driver in the test guest (by hand, with a temporary
//!   wiring): ports appear as `/dev/vport<dev>p<id>` named stdin/stdout/stderr; 300 KB of
//!   host input arrived byte-exact and `cat` saw EOF (a second `cat` got EOF at once); 200 KB
//!   and 50 KB written by the guest arrived byte-exact, the latter to a reader taking 100
//!   bytes per 2 ms.
//!
//! # Layout
//!
//! * [`device`]: [`Console`] implements [`super::VirtioDevice`]: ports, config space,
//!   activation and reset (the backends are lent to the handler while active).
//! * [`handler`]: the data plane, [`ConsoleHandler`]: control messages and port queues.
//! * [`event_handler`]: `event_manager::MutEventSubscriber` glue.
//! * [`fd`]: [`FdInput`] and [`FdOutput`], backends over non-blocking file descriptors (pipes,
//!   sockets, ttys).

pub mod device;
pub mod event_handler;
pub mod fd;
pub mod handler;
pub mod snapshot;

#[cfg(test)]
mod tests;

use std::io;
use std::os::unix::io::AsRawFd;

pub use device::{Console, ConsoleFlush, PortConfig};
pub use fd::{FdInput, FdOutput};
pub use handler::ConsoleHandler;
pub use snapshot::{ConsoleState, PortState};

/// Feature bit: ports and control queues (virtio 5.3.3).
pub const VIRTIO_CONSOLE_F_MULTIPORT: u32 = 1;

/// Control events (virtio 5.3.6.2), `struct virtio_console_control { le32 id; le16 event;
/// le16 value; }`.
pub mod control {
    /// Guest → host: the driver is ready (value 1) or failed (0).
    pub const DEVICE_READY: u16 = 0;
    /// Host → guest: port `id` exists.
    pub const DEVICE_ADD: u16 = 1;
    /// Host → guest: port `id` is gone.
    pub const DEVICE_REMOVE: u16 = 2;
    /// Guest → host: port `id` is ready (value 1) or failed (0).
    pub const PORT_READY: u16 = 3;
    /// Host → guest: port `id` is a console.
    pub const CONSOLE_PORT: u16 = 4;
    /// Host → guest: console size changed.
    pub const RESIZE: u16 = 5;
    /// Both ways: that side of port `id` is open (value 1) or closed (0).
    pub const PORT_OPEN: u16 = 6;
    /// Host → guest: port `id`'s name follows the message.
    pub const PORT_NAME: u16 = 7;
    /// Size of the message header.
    pub const LEN: usize = 8;
}

/// Most ports a device may have: 2 queues each plus the 2 control queues stay below 64.
pub const MAX_PORTS: usize = 31;
/// Longest port name.
pub const MAX_NAME_LEN: usize = 64;
/// Size of every queue.
pub const QUEUE_SIZE: u16 = 128;
/// Bytes moved per receive chain and per backend read or write, at most.
pub const CHUNK: usize = 64 * 1024;
/// Longest transmit chain; longer ones are dropped (Linux sends at most 32 KiB per buffer).
/// One wakeup thus moves at most the queue budget times this many bytes.
pub const MAX_TX_CHAIN: usize = 256 * 1024;

/// Index of port `port`'s receive (host → guest) queue.
pub fn rx_queue_index(port: usize) -> usize {
    if port == 0 {
        0
    } else {
        2 * port + 2
    }
}

/// Index of port `port`'s transmit (guest → host) queue.
pub fn tx_queue_index(port: usize) -> usize {
    rx_queue_index(port) + 1
}

/// Index of the control receive (host → guest) queue.
pub const CONTROL_RX_INDEX: usize = 2;
/// Index of the control transmit (guest → host) queue.
pub const CONTROL_TX_INDEX: usize = 3;

/// Host side of a port, guest-bound: a non-blocking byte source. Its fd is watched for
/// `EPOLLIN`.
pub trait ConsoleInput: Send + AsRawFd {
    /// Reads available bytes. `Ok(0)` is end of input; `Err(WouldBlock)` means none now.
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize>;
}

/// Host side of a port, host-bound: a non-blocking byte sink. Its fd is watched for `EPOLLOUT`
/// while it has refused bytes.
pub trait ConsoleOutput: Send + AsRawFd {
    /// Writes some of `buf`, returning how many bytes it took; `Err(WouldBlock)` means none now.
    fn write(&mut self, buf: &[u8]) -> io::Result<usize>;
}

/// Errors creating a console device.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    /// No ports, or more than [`MAX_PORTS`].
    #[error("a console needs 1 to {MAX_PORTS} ports, got {0}")]
    PortCount(usize),
    /// A port name is empty, too long, repeated or has characters other than `[A-Za-z0-9._-]`.
    #[error("invalid or repeated port name '{0}'")]
    BadName(String),
    /// An input and an output (of any ports) share one fd number: epoll could not tell them
    /// apart.
    #[error("backend fd {0} is used twice (dup it)")]
    SharedFd(i32),
    /// A backend fd could not be made non-blocking.
    #[error("making a backend fd non-blocking failed")]
    NonBlocking(#[source] io::Error),
}
