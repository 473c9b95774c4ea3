//! The virtio-net device model: features, config space, activation and reset.

use std::sync::{Arc, Mutex};

use tracing::{info, warn};

use super::handler::NetHandler;
use super::seqpacket::set_nonblocking;
use super::{
    tun_offload_flags, NetBackend, NetError, QUEUE_SIZES, VIRTIO_NET_F_CSUM,
    VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_NET_F_STATUS, VIRTIO_NET_S_LINK_UP, VIRTIO_RING_F_EVENT_IDX,
};
use crate::rate_limiter::{RateLimiter, RateLimiterConfig};
use crate::virtio::device_base::{take_queues, DeviceBase};
use crate::virtio::snapshot::{DeviceSnapshot, DeviceState, SnapshotError};
use crate::virtio::{
    lock, ActivateContext, ActivateError, EventEndpoint, VirtioDevice, TYPE_NET, VIRTIO_F_VERSION_1,
};

/// Config space: mac[6], status (le16), max_virtqueue_pairs (le16).
const CONFIG_SPACE_SIZE: usize = 10;
const CONFIG_MAC: usize = 0;
const CONFIG_STATUS: usize = 6;
const CONFIG_MAX_VQ_PAIRS: usize = 8;

/// Features offered by every network device.
const AVAIL_FEATURES: &[u32] = &[
    VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_NET_F_MAC,
    VIRTIO_NET_F_STATUS,
    VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_NET_F_CSUM,
    VIRTIO_NET_F_HOST_TSO4,
    VIRTIO_NET_F_HOST_TSO6,
    VIRTIO_NET_F_GUEST_CSUM,
    VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6,
];

/// User-facing configuration of a network device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NetConfig {
    /// The guest's MAC address (non-zero, unicast).
    pub mac: [u8; 6],
    /// Limit on host → guest traffic. Tokens: one op and the frame's bytes (without the vnet
    /// header) per frame.
    pub rx_rate: Option<RateLimiterConfig>,
    /// Limit on guest → host traffic, same tokens.
    pub tx_rate: Option<RateLimiterConfig>,
}

/// A virtio-net device over a [`NetBackend`].
pub struct Net {
    config: NetConfig,
    base: DeviceBase<NetHandler>,
    /// These live here while inactive, in the handler while active.
    backend: Option<Box<dyn NetBackend>>,
    rx_limiter: Option<RateLimiter>,
    tx_limiter: Option<RateLimiter>,
}

impl Net {
    /// Creates an inactive network device. `backend` is the host side (a TAP for the VMM); its
    /// fd is made non-blocking. `endpoint` is the VMM's event manager, where the data plane is
    /// registered on activation.
    pub fn new(
        config: NetConfig,
        backend: Box<dyn NetBackend>,
        endpoint: EventEndpoint,
    ) -> Result<Net, NetError> {
        if config.mac == [0; 6] || config.mac[0] & 1 != 0 {
            return Err(NetError::InvalidMac(config.mac));
        }
        set_nonblocking(backend.as_raw_fd()).map_err(NetError::NonBlocking)?;
        let rx_limiter = config.rx_rate.map(RateLimiter::new).transpose()?;
        let tx_limiter = config.tx_rate.map(RateLimiter::new).transpose()?;
        let avail_features = AVAIL_FEATURES.iter().fold(0u64, |f, &b| f | (1u64 << b));
        let mut config_space = [0u8; CONFIG_SPACE_SIZE];
        config_space[CONFIG_MAC..CONFIG_MAC + 6].copy_from_slice(&config.mac);
        config_space[CONFIG_STATUS..CONFIG_STATUS + 2]
            .copy_from_slice(&VIRTIO_NET_S_LINK_UP.to_le_bytes());
        config_space[CONFIG_MAX_VQ_PAIRS..CONFIG_MAX_VQ_PAIRS + 2]
            .copy_from_slice(&1u16.to_le_bytes());
        info!(
            mac = %format_mac(&config.mac),
            rx_limited = rx_limiter.is_some(),
            tx_limited = tx_limiter.is_some(),
            "virtio-net: device created"
        );
        Ok(Net {
            config,
            base: DeviceBase::new("virtio-net", avail_features, &config_space, endpoint),
            backend: Some(backend),
            rx_limiter,
            tx_limiter,
        })
    }

    /// The configuration the device was built with.
    pub fn config(&self) -> &NetConfig {
        &self.config
    }

    /// The guest's MAC address.
    pub fn mac(&self) -> [u8; 6] {
        self.config.mac
    }

    /// Features acked by the driver.
    pub fn acked_features(&self) -> u64 {
        self.base.acked_features()
    }

    /// The data-plane handler while activated (e.g. for statistics or tests).
    pub fn handler(&self) -> Option<&Arc<Mutex<NetHandler>>> {
        self.base.handler()
    }

    /// Takes back what a handler borrowed (failed activation or reset).
    fn reclaim(&mut self, handler: &Mutex<NetHandler>) {
        let mut h = lock(handler);
        if let Some(b) = h.take_backend() {
            self.backend = Some(b);
        }
        let (rx, tx) = h.take_rate_limiters();
        self.rx_limiter = rx;
        self.tx_limiter = tx;
    }
}

/// "aa:bb:cc:dd:ee:ff".
fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        TYPE_NET
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
        // virtio 1.x: mac is read-only for the driver without CTRL_MAC_ADDR (not offered).
        self.base.write_config(offset, data);
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        self.base.check_inactive()?;
        let (queues, evts) = take_queues(ctx.queues, ctx.queue_evts)?;
        let acked = ctx.acked_features & self.base.avail_features();
        let mut backend = self
            .backend
            .take()
            .ok_or_else(|| ActivateError::Device(Box::new(NetError::NoBackend)))?;
        let flags = tun_offload_flags(acked);
        if let Err(source) = backend.set_offload(flags) {
            self.backend = Some(backend);
            return Err(ActivateError::Device(Box::new(NetError::SetOffload {
                flags,
                source,
            })));
        }
        self.base.set_acked_features(acked);
        let mut handler = NetHandler::new(ctx.mem, queues, evts, ctx.irq, backend, acked, ctx.log);
        handler.set_rate_limiters(self.rx_limiter.take(), self.tx_limiter.take());
        let handler = Arc::new(Mutex::new(handler));
        if let Err(e) = self.base.start(handler.clone()) {
            self.reclaim(&handler);
            return Err(e);
        }
        if self.base.may_log() {
            info!(
                mac = %format_mac(&self.config.mac),
                acked_features = format_args!("{acked:#x}"),
                tun_offload = format_args!("{flags:#x}"),
                "virtio-net: activated"
            );
        }
        Ok(())
    }

    fn reset(&mut self) -> bool {
        let Ok(stopped) = self.base.reset() else {
            return false;
        };
        if let Some(handler) = stopped {
            self.reclaim(&handler);
            // Stop the TAP from queueing offloaded frames nobody agreed to any more.
            if let Some(b) = self.backend.as_mut() {
                if let Err(e) = b.set_offload(0) {
                    warn!(error = %e, "virtio-net: cannot clear backend offloads on reset");
                }
            }
            if self.base.may_log() {
                info!(mac = %format_mac(&self.config.mac), "virtio-net: reset");
            }
        }
        true
    }

    fn is_activated(&self) -> bool {
        self.base.is_activated()
    }

    fn snapshot(&self) -> Result<DeviceSnapshot, SnapshotError> {
        self.base.snapshot(|h| {
            DeviceState::Limited(vec![
                h.rx_rate_limiter().map(RateLimiter::state),
                h.tx_rate_limiter().map(RateLimiter::state),
            ])
        })
    }

    fn restore(&mut self, saved: &DeviceSnapshot) -> Result<(), SnapshotError> {
        let DeviceState::Limited(levels) = &saved.state else {
            return Err(SnapshotError::Inconsistent("not a network card's state"));
        };
        self.base.restore(|h| {
            let (rx, tx) = h.rate_limiters_mut();
            for (limiter, level) in [rx, tx].into_iter().zip(levels) {
                if let (Some(l), Some(level)) = (limiter, level) {
                    l.restore_state(level);
                }
            }
            Ok(())
        })
    }
}
