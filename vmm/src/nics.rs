//! Guest NICs: the host side comes from the `net` crate (TAP on a bridge/network), the
//! guest side is devices' virtio-net; this module joins them.

use std::io::{self, IoSlice};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use devices::virtio::net::{Net, NetBackend, NetConfig};
use devices::virtio::{EventEndpoint, VirtioDevice};
use thiserror::Error;

use devices::rate_limiter::RateLimiterConfig;

#[derive(Debug, Error)]
pub enum NicError {
    #[error(transparent)]
    Host(#[from] net::NetError),
    #[error("cannot duplicate the TAP fd")]
    Dup(#[source] io::Error),
    #[error("cannot create the virtio-net device")]
    Device(#[from] devices::virtio::net::NetError),
}

/// The guest side's view of a TAP: a duplicate of the attachment's fd (same open file), so
/// the `Attachment` itself stays with the VM and is torn down when the VM exits.
struct TapBackend(OwnedFd);

impl AsRawFd for TapBackend {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

impl NetBackend for TapBackend {
    unsafe fn read_frame_into(&mut self, iovs: &[libc::iovec]) -> io::Result<usize> {
        // SAFETY: the caller guarantees every iovec is writable for its length during the
        // call; readv writes only through them. The count is the slice's length (at most
        // IOV_MAX, see devices' RX path).
        let n = unsafe { libc::readv(self.0.as_raw_fd(), iovs.as_ptr(), iovs.len() as libc::c_int) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    fn write_frame(&mut self, iovs: &[IoSlice]) -> io::Result<usize> {
        // SAFETY: IoSlice is ABI-compatible with iovec, and every slice is valid for reads
        // during the call; the count is the slice's length.
        let n = unsafe { libc::writev(self.0.as_raw_fd(), iovs.as_ptr().cast(), iovs.len() as libc::c_int) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    fn set_offload(&mut self, tun_flags: u32) -> io::Result<()> {
        net::set_tap_offload(self.0.as_raw_fd(), tun_flags)
    }
}

/// Host side + device for NIC `index`. The attachment must outlive the VM's run; releasing
/// it deletes the TAP (and the network, for its last user). A restore passes the address
/// the guest had (`want_ip`); if a live VM holds it now, the guest gets another, and this
/// says so (the restore then has the guest's init configure the network again).
pub fn create(
    spec: &net::NetSpec,
    vm_id: &str,
    index: u32,
    want_ip: Option<std::net::Ipv4Addr>,
    endpoint: EventEndpoint,
) -> Result<(net::Attachment, Box<dyn VirtioDevice>), NicError> {
    let att = net::attach_wanting(spec, vm_id, index, want_ip)?;
    if let (Some(want), Some(got)) = (want_ip, att.ip()) {
        if want != got {
            eprintln!(
                "microvm: eth{index}: the guest's address {want} is held by another VM on network {}; the guest's init takes {got} instead",
                att.network().unwrap_or("?")
            );
        }
    }
    // SAFETY: dup of a valid fd the attachment owns; the new fd is owned by OwnedFd alone.
    let fd = unsafe { libc::fcntl(att.tap_fd(), libc::F_DUPFD_CLOEXEC, 0) };
    if fd < 0 {
        return Err(NicError::Dup(io::Error::last_os_error()));
    }
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    let backend = TapBackend(unsafe { OwnedFd::from_raw_fd(fd) });
    // The same limits apply to each direction separately.
    let rate = crate::devices::limiter(RateLimiterConfig::simple(
        spec.rate.bytes_per_sec.unwrap_or(0),
        spec.rate.ops_per_sec.unwrap_or(0),
    ));
    let config = NetConfig { mac: att.mac(), rx_rate: rate, tx_rate: rate };
    let device = Net::new(config, Box::new(backend), endpoint)?;
    eprintln!(
        "microvm: eth{index}: TAP {} on {} (MAC {})",
        att.tap_name(),
        att.bridge().unwrap_or("no bridge"),
        net::MacAddr(att.mac())
    );
    Ok((att, Box::new(device)))
}

/// NICs being torn down by [`release_all`]; [`Releasing::wait`] (or drop) waits for them.
pub struct Releasing(Option<std::thread::JoinHandle<()>>);

impl Releasing {
    pub fn wait(mut self) {
        self.join();
    }

    fn join(&mut self) {
        if let Some(handle) = self.0.take() {
            // A panic there ends the process from the panic hook; nothing to add here.
            let _ = handle.join();
        }
    }
}

impl Drop for Releasing {
    fn drop(&mut self) {
        self.join();
    }
}

/// Starts tearing down every NIC's host side when the VM has ended (see
/// `net::Attachment::release`), on a helper thread, each NIC on its own: most of the time
/// goes to the kernel's RCU barrier of each deleted link, and concurrent deletions share
/// it. The caller can meanwhile destroy the VM (which waits in the kernel too), then
/// [`Releasing::wait`]s. Problems are logged, not returned: the exit status stays the VM's.
/// Should no thread start, the attachments are dropped, which releases them (their fallback).
pub fn release_all(attachments: Vec<net::Attachment>) -> Releasing {
    if attachments.is_empty() {
        return Releasing(None);
    }
    let spawned = std::thread::Builder::new().name("nic-release".into()).spawn(move || {
        std::thread::scope(|s| {
            let mut all: Vec<_> = attachments.into_iter().enumerate().collect();
            let last = all.pop();
            for (index, att) in all {
                // Again: no thread, then the attachment's drop releases it.
                let _ = std::thread::Builder::new().name(format!("nic-release-{index}")).spawn_scoped(s, move || release(index, att));
            }
            if let Some((index, att)) = last {
                release(index, att);
            }
        });
    });
    Releasing(spawned.ok())
}

fn release(index: usize, att: net::Attachment) {
    let tap = att.tap_name().to_string();
    if let Err(e) = att.release() {
        tracing::warn!(nic = index, tap, error = %devices::error_chain(&e), "NIC teardown incomplete");
    }
}
