//! Guest-visible devices: serial, i8042, virtio-mmio transport, virtio-blk, virtio-net,
//! virtio-rng, virtio-console, rate limiter. No host networking and no KVM here: interrupts
//! and queue notifications are plain `EventFd`s that the VMM wires to irqfd/ioeventfd.

pub mod bus;
pub mod guest_log;
pub mod legacy;
pub mod rate_limiter;
pub mod virtio;

/// Entry points for the cargo-fuzz targets in `devices/fuzz` (feature `fuzzing`); not API.
#[cfg(feature = "fuzzing")]
pub mod fuzzing;

/// An error and its causes on one line, "outer: cause: root cause" (logs and CLI messages).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(inner) = cur {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        cur = inner.source();
    }
    s
}
