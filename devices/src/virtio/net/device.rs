//! The virtio-net device model: features, config space, activation and reset.

use std::sync::{Arc, Mutex};

use event_manager::SubscriberId;
use tracing::{error, info, warn};
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

use super::handler::NetHandler;
use super::seqpacket::set_nonblocking;
use super::{
    tun_offload_flags, NetBackend, NetError, QUEUE_SIZES, RX_INDEX, TX_INDEX, VIRTIO_NET_F_CSUM,
    VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_NET_F_STATUS, VIRTIO_NET_S_LINK_UP, VIRTIO_RING_F_EVENT_IDX,
};
use crate::rate_limiter::{RateLimiter, RateLimiterConfig};
use crate::virtio::{
    lock, read_config_bytes, register_subscriber, unregister_subscriber, ActivateContext,
    ActivateError, EventEndpoint, Subscriber, VirtioDevice, TYPE_NET, VIRTIO_F_VERSION_1,
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

/// Lifecycle of the device.
enum State {
    /// Not activated, or reset.
    Inactive,
    /// The handler is registered with the event manager.
    Activated {
        handler: Arc<Mutex<NetHandler>>,
        id: SubscriberId,
    },
}

/// A virtio-net device over a [`NetBackend`].
pub struct Net {
    config: NetConfig,
    avail_features: u64,
    acked_features: u64,
    config_space: [u8; CONFIG_SPACE_SIZE],
    /// These live here while inactive, in the handler while active.
    backend: Option<Box<dyn NetBackend>>,
    rx_limiter: Option<RateLimiter>,
    tx_limiter: Option<RateLimiter>,
    endpoint: EventEndpoint,
    state: State,
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
            avail_features,
            acked_features: 0,
            config_space,
            backend: Some(backend),
            rx_limiter,
            tx_limiter,
            endpoint,
            state: State::Inactive,
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
        self.acked_features
    }

    /// The data-plane handler while activated (e.g. for statistics or tests).
    pub fn handler(&self) -> Option<&Arc<Mutex<NetHandler>>> {
        match &self.state {
            State::Activated { handler, .. } => Some(handler),
            State::Inactive => None,
        }
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

/// Splits the transport's queues/eventfds into `[rx, tx]` and checks readiness.
fn take_queues(ctx_queues: Vec<Queue>, ctx_evts: Vec<EventFd>) -> Result<QueuePair, ActivateError> {
    let (queues, evts) = (ctx_queues.len(), ctx_evts.len());
    let count_error = || ActivateError::QueueCount {
        expected: QUEUE_SIZES.len(),
        queues,
        evts,
    };
    let qs: [Queue; 2] = ctx_queues.try_into().map_err(|_| count_error())?;
    let es: [EventFd; 2] = ctx_evts.try_into().map_err(|_| count_error())?;
    for (i, q) in [(RX_INDEX, &qs[RX_INDEX]), (TX_INDEX, &qs[TX_INDEX])] {
        if !q.ready() {
            return Err(ActivateError::QueueNotReady(i));
        }
    }
    Ok((qs, es))
}

type QueuePair = ([Queue; 2], [EventFd; 2]);

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        TYPE_NET
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
        // virtio 1.x: mac is read-only for the driver without CTRL_MAC_ADDR (not offered).
        warn!(
            offset,
            len = data.len(),
            "virtio-net: config space is read-only, write ignored"
        );
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        if matches!(self.state, State::Activated { .. }) {
            return Err(ActivateError::AlreadyActivated);
        }
        let (queues, evts) = take_queues(ctx.queues, ctx.queue_evts)?;
        let acked = ctx.acked_features & self.avail_features;
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
        self.acked_features = acked;
        let mut handler = NetHandler::new(ctx.mem, queues, evts, ctx.irq, backend, acked);
        handler.set_rate_limiters(self.rx_limiter.take(), self.tx_limiter.take());
        let handler = Arc::new(Mutex::new(handler));
        let subscriber: Subscriber = handler.clone();
        let id = match register_subscriber(&self.endpoint, subscriber) {
            Ok(id) => id,
            Err(e) => {
                self.reclaim(&handler);
                return Err(e);
            }
        };
        let init_error = lock(&handler).take_registration_error();
        if let Some(e) = init_error {
            if let Err(e) = unregister_subscriber(&self.endpoint, id) {
                error!(error = %e, "virtio-net: cannot remove half-registered handler");
            }
            self.reclaim(&handler);
            return Err(ActivateError::Register(e));
        }
        info!(
            mac = %format_mac(&self.config.mac),
            acked_features = format_args!("{acked:#x}"),
            tun_offload = format_args!("{flags:#x}"),
            "virtio-net: activated"
        );
        self.state = State::Activated { handler, id };
        Ok(())
    }

    fn reset(&mut self) -> bool {
        if let State::Activated { handler, id } = &self.state {
            if let Err(e) = unregister_subscriber(&self.endpoint, *id) {
                error!(error = %e, "virtio-net: cannot remove handler from the event manager");
                return false;
            }
            let handler = handler.clone();
            self.reclaim(&handler);
            // Stop the TAP from queueing offloaded frames nobody agreed to any more.
            if let Some(b) = self.backend.as_mut() {
                if let Err(e) = b.set_offload(0) {
                    warn!(error = %e, "virtio-net: cannot clear backend offloads on reset");
                }
            }
            info!(mac = %format_mac(&self.config.mac), "virtio-net: reset");
        }
        self.state = State::Inactive;
        self.acked_features = 0;
        true
    }

    fn is_activated(&self) -> bool {
        matches!(self.state, State::Activated { .. })
    }
}
