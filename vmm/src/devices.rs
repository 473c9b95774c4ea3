//! Builds the concrete virtio devices from their configs (the attach path itself is generic:
//! see `virtio.rs`).

use devices::rate_limiter::RateLimiterConfig;
use std::os::unix::net::UnixStream;

use devices::virtio::block::{Block, BlockConfig, BlockError, Overlay};
use devices::virtio::fs::{Fs, FsError};
use devices::virtio::{EventEndpoint, VirtioDevice};

use crate::config::DiskConfig;
use crate::disk::OpenDisk;

/// `None` for an unlimited config, so devices don't run a limiter for nothing.
pub fn limiter(config: RateLimiterConfig) -> Option<RateLimiterConfig> {
    (config != RateLimiterConfig::default()).then_some(config)
}

/// A virtio-blk device for `cfg` over the opened image; a `snapshot` disk gets its
/// copy-on-write overlay here (its upper file in [`crate::disk::overlay_dir`]).
pub fn block_device(
    cfg: &DiskConfig,
    disk: OpenDisk,
    endpoint: EventEndpoint,
) -> Result<Box<dyn VirtioDevice>, BlockError> {
    let config = BlockConfig {
        path: cfg.path.clone(),
        read_only: cfg.read_only,
        rate_limiter: limiter(cfg.rate),
        ..Default::default()
    };
    if cfg.overlay() {
        let overlay = Overlay::new(disk.file, disk.len, &crate::disk::overlay_dir())?;
        return Ok(Box::new(Block::with_overlay(config, overlay, endpoint)?));
    }
    Ok(Box::new(Block::new(config, disk.file, disk.len, endpoint)?))
}

/// A virtio-fs device for share `tag`, served by the virtiofsd at the other end of `conn`.
pub fn fs_device(tag: &str, conn: UnixStream) -> Result<Box<dyn VirtioDevice>, FsError> {
    Ok(Box::new(Fs::new(tag, conn)?))
}
