//! Builds the concrete virtio devices from their configs (the attach path itself is generic:
//! see `virtio.rs`).

use devices::rate_limiter::RateLimiterConfig;
use devices::virtio::block::{Block, BlockConfig, BlockError};
use devices::virtio::{EventEndpoint, VirtioDevice};

use crate::config::{DiskConfig, RateLimit};
use crate::disk::OpenDisk;

impl RateLimit {
    /// The device-side limiter config, `None` when unlimited.
    pub fn limiter(&self) -> Option<RateLimiterConfig> {
        (!self.is_unlimited()).then(|| {
            RateLimiterConfig::simple(self.bytes_per_sec.unwrap_or(0), self.ops_per_sec.unwrap_or(0))
        })
    }
}

pub fn block_device(
    cfg: &DiskConfig,
    disk: OpenDisk,
    endpoint: EventEndpoint,
) -> Result<Box<dyn VirtioDevice>, BlockError> {
    let config = BlockConfig {
        path: cfg.path.clone(),
        read_only: cfg.read_only,
        rate_limiter: cfg.rate.limiter(),
        ..Default::default()
    };
    Ok(Box::new(Block::new(config, disk.file, disk.len, endpoint)?))
}
