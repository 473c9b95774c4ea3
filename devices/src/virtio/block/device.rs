//! The virtio-blk device model: features, config space, activation and reset.

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use tracing::{info, warn};

use super::handler::BlockHandler;
use super::overlay::Overlay;
use super::request::Disk;
use super::{
    BlockError, QUEUE_SIZES, SECTOR_SIZE, SEG_MAX, VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_ID_BYTES,
};
use crate::rate_limiter::{RateLimiter, RateLimiterConfig};
use crate::virtio::device_base::{take_queues, DeviceBase};
use crate::virtio::snapshot::{DeviceSnapshot, DeviceState, SnapshotError};
use crate::virtio::{
    lock, ActivateContext, ActivateError, EventEndpoint, VirtioDevice, TYPE_BLOCK,
    VIRTIO_F_VERSION_1,
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

/// A virtio-blk device backed by an image file.
pub struct Block {
    config: BlockConfig,
    disk: Arc<Disk>,
    base: DeviceBase<BlockHandler>,
    /// Lives here while inactive, in the handler while active.
    rate_limiter: Option<RateLimiter>,
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
        let serial = serial(&config, &file)?;
        let disk = Disk::new(file, disk_len, config.read_only, &serial);
        Self::with_disk(config, disk, disk_len, endpoint)
    }

    /// Creates an inactive block device whose writes go to `overlay` (`--disk PATH,snapshot`);
    /// the guest sees a writable disk of `overlay.len()` bytes (unless `config.read_only`).
    /// The default serial is the base image's, as for a plain disk of that image.
    pub fn with_overlay(
        config: BlockConfig,
        overlay: Overlay,
        endpoint: EventEndpoint,
    ) -> Result<Self, BlockError> {
        let serial = serial(&config, overlay.base())?;
        let disk_len = overlay.len();
        let disk = Disk::with_overlay(overlay, config.read_only, &serial);
        Self::with_disk(config, disk, disk_len, endpoint)
    }

    /// The common part; `disk_len` is the disk's length in bytes before rounding.
    fn with_disk(
        config: BlockConfig,
        disk: Disk,
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
        let rate_limiter = config.rate_limiter.map(RateLimiter::new).transpose()?;
        let disk = Arc::new(disk);

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
            snapshot = disk.overlay().is_some(),
            "virtio-blk: device created"
        );
        Ok(Block {
            config,
            disk,
            base: DeviceBase::new("virtio-blk", avail_features, &config_space, endpoint),
            rate_limiter,
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

    /// The copy-on-write overlay of a `,snapshot` disk (for saving it in a VM snapshot).
    pub fn overlay(&self) -> Option<&Overlay> {
        self.disk.overlay()
    }

    /// The disk, shared with the data plane: the VMM keeps it to save a `,snapshot` disk's
    /// overlay with the VM.
    pub fn disk(&self) -> Arc<Disk> {
        self.disk.clone()
    }

    /// Features acked by the driver.
    pub fn acked_features(&self) -> u64 {
        self.base.acked_features()
    }

    /// The data-plane handler while activated (e.g. for inspection in tests).
    pub fn handler(&self) -> Option<&Arc<Mutex<BlockHandler>>> {
        self.base.handler()
    }
}

/// The GET_ID answer: the configured serial, or one derived from the image file.
fn serial(config: &BlockConfig, file: &File) -> Result<String, BlockError> {
    match &config.serial {
        Some(s) => Ok(s.clone()),
        None => {
            let md = file.metadata().map_err(BlockError::Metadata)?;
            Ok(default_serial(md.dev(), md.ino()))
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
        self.base.avail_features()
    }

    fn set_acked_features(&mut self, acked: u64) {
        self.base.set_acked_features(acked);
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        self.base.read_config(offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        self.base.write_config(offset, data);
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        self.base.check_inactive()?;
        let ([queue], [queue_evt]) = take_queues(ctx.queues, ctx.queue_evts)?;
        self.base.set_acked_features(ctx.acked_features);
        let handler = Arc::new(Mutex::new(BlockHandler::new(
            ctx.mem,
            queue,
            queue_evt,
            ctx.irq,
            self.disk.clone(),
            self.rate_limiter.take(),
            ctx.log,
        )));
        if let Err(e) = self.base.start(handler.clone()) {
            self.rate_limiter = lock(&handler).take_rate_limiter();
            return Err(e);
        }
        if self.base.may_log() {
            info!(path = %self.config.path.display(), "virtio-blk: activated");
        }
        Ok(())
    }

    fn reset(&mut self) -> bool {
        let Ok(stopped) = self.base.reset() else {
            return false;
        };
        if let Some(handler) = stopped {
            self.rate_limiter = lock(&handler).take_rate_limiter();
            if self.base.may_log() {
                info!(path = %self.config.path.display(), "virtio-blk: reset");
            }
        }
        true
    }

    fn is_activated(&self) -> bool {
        self.base.is_activated()
    }

    fn snapshot(&self) -> Result<DeviceSnapshot, SnapshotError> {
        self.base.snapshot(|h| DeviceState::Limited(vec![h.rate_limiter().map(RateLimiter::state)]))
    }

    fn restore(&mut self, saved: &DeviceSnapshot) -> Result<(), SnapshotError> {
        let DeviceState::Limited(levels) = &saved.state else {
            return Err(SnapshotError::Inconsistent("not a block device's state"));
        };
        self.base.restore(|h| {
            if let (Some(l), Some(Some(level))) = (h.rate_limiter_mut(), levels.first()) {
                l.restore_state(level);
            }
            Ok(())
        })
    }
}
