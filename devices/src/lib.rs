//! Guest-visible devices: serial, i8042, virtio-mmio transport, virtio-blk, virtio-net, rate limiter.
