//! The virtio-blk device model: features, config space, activation and reset.

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use event_manager::SubscriberId;
use tracing::{error, info, warn};
use virtio_queue::QueueT;

use super::handler::BlockHandler;
use super::request::Disk;
use super::{
    BlockError, QUEUE_SIZES, SECTOR_SIZE, SEG_MAX, VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_ID_BYTES,
};
use crate::rate_limiter::{RateLimiter, RateLimiterConfig};
use crate::virtio::{
    lock, read_config_bytes, register_subscriber, unregister_subscriber, ActivateContext,
    ActivateError, EventEndpoint, Subscriber, VirtioDevice, TYPE_BLOCK, VIRTIO_F_VERSION_1,
};

/// Size of the config space we expose: capacity, size_max, seg_max, geometry, blk_size.
const CONFIG_SPACE_SIZE: usize = 24;
const CONFIG_CAPACITY: usize = 0;
const CONFIG_SEG_MAX: usize = 12;
const CONFIG_BLK_SIZE: usize = 20;

/// User-facing configuration of a block device.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BlockConfig {
    /// Path of the image (for logs; the VMM opens the file).
    pub path: PathBuf,
    /// Refuse writes and offer VIRTIO_BLK_F_RO.
    pub read_only: bool,
    /// GET_ID answer (truncated to 20 bytes). Default: derived from the file's device and
    /// inode numbers.
    pub serial: Option<String>,
    /// Logical block size to advertise (VIRTIO_BLK_F_BLK_SIZE); power of two in 512..=4096.
    pub block_size: Option<u32>,
    /// Bandwidth / IOPS limit. Tokens: one op and `len` bytes per read or write request, one
    /// op per other request.
    pub rate_limiter: Option<RateLimiterConfig>,
}

/// Lifecycle of the device.
enum State {
    /// Not activated, or reset.
    Inactive,
    /// The handler is registered with the event manager.
    Activated {
        handler: Arc<Mutex<BlockHandler>>,
        id: SubscriberId,
    },
}

/// A virtio-blk device backed by an image file.
pub struct Block {
    config: BlockConfig,
    disk: Arc<Disk>,
    avail_features: u64,
    acked_features: u64,
    config_space: [u8; CONFIG_SPACE_SIZE],
    /// Lives here while inactive, in the handler while active.
    rate_limiter: Option<RateLimiter>,
    endpoint: EventEndpoint,
    state: State,
}

impl Block {
    /// Creates an inactive block device over `file`, of which `disk_len` bytes are exposed
    /// (rounded down to 512-byte sectors). `endpoint` is the VMM's event manager, where the data
    /// plane is registered on activation.
    pub fn new(
        config: BlockConfig,
        file: File,
        disk_len: u64,
        endpoint: EventEndpoint,
    ) -> Result<Self, BlockError> {
        if let Some(bs) = config.block_size {
            if !(512..=4096).contains(&bs) || !bs.is_power_of_two() {
                return Err(BlockError::InvalidBlockSize(bs));
            }
        }
        if !disk_len.is_multiple_of(SECTOR_SIZE) {
            warn!(
                path = %config.path.display(),
                disk_len,
                "virtio-blk: image size is not a multiple of 512, the tail is not visible"
            );
        }
        let serial = match &config.serial {
            Some(s) => s.clone(),
            None => {
                let md = file.metadata().map_err(BlockError::Metadata)?;
                default_serial(md.dev(), md.ino())
            }
        };
        let rate_limiter = config.rate_limiter.map(RateLimiter::new).transpose()?;
        let disk = Arc::new(Disk::new(file, disk_len, config.read_only, &serial));

        let mut avail_features = (1u64 << VIRTIO_F_VERSION_1)
            | (1u64 << VIRTIO_BLK_F_FLUSH)
            | (1u64 << VIRTIO_BLK_F_SEG_MAX);
        if config.read_only {
            avail_features |= 1u64 << VIRTIO_BLK_F_RO;
        }
        let mut config_space = [0u8; CONFIG_SPACE_SIZE];
        config_space[CONFIG_CAPACITY..CONFIG_CAPACITY + 8]
            .copy_from_slice(&disk.nsectors().to_le_bytes());
        config_space[CONFIG_SEG_MAX..CONFIG_SEG_MAX + 4].copy_from_slice(&SEG_MAX.to_le_bytes());
        if let Some(bs) = config.block_size {
            avail_features |= 1u64 << VIRTIO_BLK_F_BLK_SIZE;
            config_space[CONFIG_BLK_SIZE..CONFIG_BLK_SIZE + 4].copy_from_slice(&bs.to_le_bytes());
        }
        info!(
            path = %config.path.display(),
            sectors = disk.nsectors(),
            read_only = config.read_only,
            "virtio-blk: device created"
        );
        Ok(Block {
            config,
            disk,
            avail_features,
            acked_features: 0,
            config_space,
            rate_limiter,
            endpoint,
            state: State::Inactive,
        })
    }

    /// The configuration the device was built with.
    pub fn config(&self) -> &BlockConfig {
        &self.config
    }

    /// Capacity in 512-byte sectors.
    pub fn nsectors(&self) -> u64 {
        self.disk.nsectors()
    }

    /// Features acked by the driver.
    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }

    /// The data-plane handler while activated (e.g. for inspection in tests).
    pub fn handler(&self) -> Option<&Arc<Mutex<BlockHandler>>> {
        match &self.state {
            State::Activated { handler, .. } => Some(handler),
            State::Inactive => None,
        }
    }
}

/// A stable id for the image: its device and inode numbers, in hex, at most 20 bytes.
fn default_serial(dev: u64, ino: u64) -> String {
    let mut s = format!("{dev:x}{ino:x}");
    s.truncate(VIRTIO_BLK_ID_BYTES);
    s
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        TYPE_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        QUEUE_SIZES
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
        warn!(
            offset,
            len = data.len(),
            "virtio-blk: config space is read-only, write ignored"
        );
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        if matches!(self.state, State::Activated { .. }) {
            return Err(ActivateError::AlreadyActivated);
        }
        let (queues, evts) = (ctx.queues.len(), ctx.queue_evts.len());
        let (Some(queue), Some(queue_evt), 1, 1) = (
            ctx.queues.into_iter().next(),
            ctx.queue_evts.into_iter().next(),
            queues,
            evts,
        ) else {
            return Err(ActivateError::QueueCount {
                expected: QUEUE_SIZES.len(),
                queues,
                evts,
            });
        };
        if !queue.ready() {
            return Err(ActivateError::QueueNotReady(0));
        }
        self.acked_features = ctx.acked_features & self.avail_features;
        let handler = Arc::new(Mutex::new(BlockHandler::new(
            ctx.mem,
            queue,
            queue_evt,
            ctx.irq,
            self.disk.clone(),
            self.rate_limiter.take(),
        )));
        let subscriber: Subscriber = handler.clone();
        let id = match register_subscriber(&self.endpoint, subscriber) {
            Ok(id) => id,
            Err(e) => {
                self.rate_limiter = lock(&handler).take_rate_limiter();
                return Err(e);
            }
        };
        let init_error = lock(&handler).take_registration_error();
        if let Some(e) = init_error {
            if let Err(e) = unregister_subscriber(&self.endpoint, id) {
                error!(error = %e, "virtio-blk: cannot remove half-registered handler");
            }
            self.rate_limiter = lock(&handler).take_rate_limiter();
            return Err(ActivateError::Register(e));
        }
        info!(path = %self.config.path.display(), "virtio-blk: activated");
        self.state = State::Activated { handler, id };
        Ok(())
    }

    fn reset(&mut self) -> bool {
        if let State::Activated { handler, id } = &self.state {
            if let Err(e) = unregister_subscriber(&self.endpoint, *id) {
                error!(error = %e, "virtio-blk: cannot remove handler from the event manager");
                return false;
            }
            self.rate_limiter = lock(handler).take_rate_limiter();
            info!(path = %self.config.path.display(), "virtio-blk: reset");
        }
        self.state = State::Inactive;
        self.acked_features = 0;
        true
    }

    fn is_activated(&self) -> bool {
        matches!(self.state, State::Activated { .. })
    }
}
