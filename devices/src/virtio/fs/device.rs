//! The virtio-fs device model: tag config space, features from the backend, activation and
//! reset through vhost-user.

use std::os::unix::net::UnixStream;

use tracing::{error, info, warn};

use super::vhost::Backend;
use super::{FsError, NUM_QUEUES, QUEUE_SIZE, TAG_MAX_LEN};
use crate::virtio::device_base::take_queues;
use crate::virtio::{
    read_config_bytes, ActivateContext, ActivateError, IrqKind, VirtioDevice, TYPE_FS,
};

/// Config space: tag[36] + num_request_queues (le32).
const CONFIG_SPACE_SIZE: usize = TAG_MAX_LEN + 4;
const QUEUE_SIZES: [u16; NUM_QUEUES] = [QUEUE_SIZE; NUM_QUEUES];

/// A virtio-fs device whose queues a vhost-user backend (virtiofsd) serves.
pub struct Fs {
    tag: String,
    config_space: [u8; CONFIG_SPACE_SIZE],
    backend: Backend,
    avail_features: u64,
    acked_features: u64,
    activated: bool,
    /// A vhost-user request failed: the connection's state is unknown, so the device refuses
    /// to activate again (the guest sees DEVICE_NEEDS_RESET).
    broken: bool,
}

impl Fs {
    /// A device with `tag` (what the guest mounts), driving the backend connected to `stream`.
    /// Does the first part of the vhost-user handshake, so it blocks until the backend answers
    /// (at most a few seconds per request).
    pub fn new(tag: &str, stream: UnixStream) -> Result<Self, FsError> {
        if tag.is_empty() || tag.len() > TAG_MAX_LEN {
            return Err(FsError::Tag(tag.to_string()));
        }
        let mut config_space = [0u8; CONFIG_SPACE_SIZE];
        config_space[..tag.len()].copy_from_slice(tag.as_bytes());
        config_space[TAG_MAX_LEN..].copy_from_slice(&1u32.to_le_bytes());
        let backend = Backend::handshake(stream)?;
        Ok(Fs {
            tag: tag.to_string(),
            config_space,
            avail_features: backend.guest_features(),
            backend,
            acked_features: 0,
            activated: false,
            broken: false,
        })
    }

    fn device_error(e: FsError) -> ActivateError {
        ActivateError::Device(Box::new(e))
    }
}

impl VirtioDevice for Fs {
    fn device_type(&self) -> u32 {
        TYPE_FS
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn avail_features(&self) -> u64 {
        self.avail_features
    }

    fn set_acked_features(&mut self, acked: u64) {
        self.acked_features = acked & self.avail_features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config_space, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        warn!(offset, len = data.len(), "virtio-fs: config space is read-only, write ignored");
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        if self.activated {
            return Err(ActivateError::AlreadyActivated);
        }
        if self.broken {
            return Err(Self::device_error(FsError::Broken));
        }
        let (queues, kicks) = take_queues::<NUM_QUEUES>(ctx.queues, ctx.queue_evts)?;
        // The backend gets its own copies of the eventfds (SCM_RIGHTS); `kicks` are clones of
        // the transport's, dropped at the end of this call: nothing to hand back on reset.
        if let Err(e) =
            self.backend.start(self.acked_features, &ctx.mem, &queues, &kicks, ctx.irq.evt())
        {
            self.broken = true;
            return Err(Self::device_error(e));
        }
        // The backend writes the irqfd itself: InterruptStatus must show VRING for the driver.
        ctx.irq.set_sticky(IrqKind::Vring);
        self.activated = true;
        info!(tag = %self.tag, "virtio-fs: activated");
        Ok(())
    }

    fn reset(&mut self) -> bool {
        if self.activated && !self.broken {
            if let Err(e) = self.backend.stop() {
                error!(tag = %self.tag, reason = %crate::error_chain(&e), "virtio-fs: stopping the backend failed");
                self.broken = true;
            }
        }
        self.activated = false;
        self.acked_features = 0;
        // The guest may go on without this file system; a broken device fails its next
        // activation instead of blocking the reset.
        true
    }

    fn is_activated(&self) -> bool {
        self.activated
    }
}
