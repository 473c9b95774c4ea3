//! Builds the concrete virtio devices from their configs (the attach path itself is generic:
//! see `virtio.rs`).

use devices::rate_limiter::RateLimiterConfig;
use std::os::unix::net::UnixStream;

use std::sync::Arc;

use devices::virtio::block::{Block, BlockConfig, BlockError, Disk, Overlay};
use devices::virtio::fs::{Fs, FsError};
use devices::virtio::{EventEndpoint, VirtioDevice};

use crate::config::DiskConfig;
use crate::disk::OpenDisk;

/// `None` for an unlimited config, so devices don't run a limiter for nothing.
pub fn limiter(config: RateLimiterConfig) -> Option<RateLimiterConfig> {
    (config != RateLimiterConfig::default()).then_some(config)
}

/// A virtio-blk device for `cfg` over the opened image, and its disk (for a snapshot); a
/// `snapshot` disk gets its copy-on-write overlay here (its upper file in
/// [`crate::disk::overlay_dir`]), stacked on the saved layer of a restored snapshot.
pub fn block_device(
    cfg: &DiskConfig,
    disk: OpenDisk,
    endpoint: EventEndpoint,
) -> Result<(Box<dyn VirtioDevice>, Arc<Disk>), BlockError> {
    let config = BlockConfig {
        path: cfg.path.clone(),
        read_only: cfg.read_only,
        rate_limiter: limiter(cfg.rate),
        ..Default::default()
    };
    let block = match &cfg.layer {
        Some(layer) => {
            let (data, map) = layer_files(layer);
            let overlay = Overlay::restore(disk.file, &data, &map, &crate::disk::overlay_dir())?;
            Block::with_overlay(config, overlay, endpoint)?
        }
        None if cfg.overlay() => {
            let overlay = Overlay::new(disk.file, disk.len, &crate::disk::overlay_dir())?;
            Block::with_overlay(config, overlay, endpoint)?
        }
        None => Block::new(config, disk.file, disk.len, endpoint)?,
    };
    let shared = block.disk();
    Ok((Box::new(block), shared))
}

/// The (data, map) files of a saved overlay layer named `prefix` (`DIR/disk-N`).
pub fn layer_files(prefix: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf) {
    (prefix.with_extension("data"), prefix.with_extension("map"))
}

/// A virtio-fs device for share `tag`, served by the virtiofsd at the other end of `conn`.
pub fn fs_device(tag: &str, conn: UnixStream) -> Result<Box<dyn VirtioDevice>, FsError> {
    Ok(Box::new(Fs::new(tag, conn)?))
}
