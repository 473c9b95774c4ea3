//! Guest-visible devices: serial, i8042, virtio-mmio transport, virtio-blk, virtio-net,
//! rate limiter. No host networking and no KVM here: interrupts and queue notifications
//! are plain `EventFd`s that the VMM wires to irqfd/ioeventfd.

pub mod bus;
pub mod legacy;
pub mod rate_limiter;
pub mod virtio;
