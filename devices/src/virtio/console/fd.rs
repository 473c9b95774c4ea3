//! Console port backends over file descriptors (pipes, sockets, ttys), made non-blocking. A
//! reader that went away is an `EPIPE` error, not a signal: Rust programs ignore SIGPIPE.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use super::{ConsoleError, ConsoleInput, ConsoleOutput};
use crate::virtio::net::seqpacket::set_nonblocking;

/// A guest-bound byte source over a non-blocking fd.
#[derive(Debug)]
pub struct FdInput(File);

impl FdInput {
    /// Takes `fd` and sets `O_NONBLOCK` on it (which affects every fd sharing its open file
    /// description).
    pub fn new(fd: OwnedFd) -> Result<Self, ConsoleError> {
        set_nonblocking(fd.as_raw_fd()).map_err(ConsoleError::NonBlocking)?;
        Ok(FdInput(File::from(fd)))
    }
}

impl AsRawFd for FdInput {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

impl ConsoleInput for FdInput {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf)
    }
}

/// A host-bound byte sink over a non-blocking fd.
#[derive(Debug)]
pub struct FdOutput(File);

impl FdOutput {
    /// Takes `fd` and sets `O_NONBLOCK` on it (which affects every fd sharing its open file
    /// description).
    pub fn new(fd: OwnedFd) -> Result<Self, ConsoleError> {
        set_nonblocking(fd.as_raw_fd()).map_err(ConsoleError::NonBlocking)?;
        Ok(FdOutput(File::from(fd)))
    }
}

impl AsRawFd for FdOutput {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

impl ConsoleOutput for FdOutput {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write(buf)
    }
}
