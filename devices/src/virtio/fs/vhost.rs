//! The vhost-user frontend side of virtio-fs: the handshake at creation, starting the rings on
//! activation and stopping them on reset. Every request asks for an acknowledgement
//! (REPLY_ACK) when the backend supports it, so a refusal is seen at the request that caused it.

use std::os::unix::net::UnixStream;
use std::time::Duration;

use ::vhost::vhost_user::message::{
    VhostUserHeaderFlag, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use ::vhost::vhost_user::{Frontend, VhostUserFrontend};
use ::vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use super::{FsError, NUM_QUEUES};

/// How long one vhost-user request may wait for its reply. Requests are control-plane messages
/// a healthy backend answers in microseconds; a stuck one must not hold a vCPU for ever.
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// The virtio features the device passes on to the guest when the backend has them. Anything
/// else the backend offers (e.g. VHOST_F_LOG_ALL for migration) is not the guest's business.
const GUEST_FEATURES: u64 = (1 << VIRTIO_F_VERSION_1)
    | (1 << VIRTIO_RING_F_INDIRECT_DESC)
    | (1 << VIRTIO_RING_F_EVENT_IDX);

/// Protocol features the frontend uses when offered: MQ (to check the queue count),
/// REPLY_ACK (errors per request), RESET_DEVICE (a clean FUSE session after a guest reset).
fn wanted_protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::RESET_DEVICE
}

fn vhost_err(what: &'static str) -> impl FnOnce(::vhost::Error) -> FsError {
    move |source| FsError::Vhost { what, source }
}

/// A connected, owned vhost-user backend.
pub(super) struct Backend {
    frontend: Frontend,
    /// GET_FEATURES answer.
    features: u64,
    /// Protocol features both sides use.
    protocol: VhostUserProtocolFeatures,
}

impl Backend {
    /// Takes ownership of the backend behind `stream` and learns its features.
    pub(super) fn handshake(stream: UnixStream) -> Result<Self, FsError> {
        stream.set_read_timeout(Some(REPLY_TIMEOUT)).map_err(FsError::Socket)?;
        stream.set_write_timeout(Some(REPLY_TIMEOUT)).map_err(FsError::Socket)?;
        let mut frontend = Frontend::from_stream(stream, NUM_QUEUES as u64);
        frontend.set_owner().map_err(vhost_err("SET_OWNER"))?;
        let features = frontend.get_features().map_err(vhost_err("GET_FEATURES"))?;
        if features & (1 << VIRTIO_F_VERSION_1) == 0 {
            return Err(FsError::MissingFeature("VIRTIO_F_VERSION_1"));
        }
        let mut protocol = VhostUserProtocolFeatures::empty();
        if features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0 {
            let offered = frontend
                .get_protocol_features()
                .map_err(vhost_err("GET_PROTOCOL_FEATURES"))?;
            protocol = offered & wanted_protocol_features();
            frontend
                .set_protocol_features(protocol)
                .map_err(vhost_err("SET_PROTOCOL_FEATURES"))?;
            if protocol.contains(VhostUserProtocolFeatures::REPLY_ACK) {
                frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
            }
            if protocol.contains(VhostUserProtocolFeatures::MQ) {
                let got = frontend.get_queue_num().map_err(vhost_err("GET_QUEUE_NUM"))?;
                if got < NUM_QUEUES as u64 {
                    return Err(FsError::Queues { got });
                }
            }
        }
        Ok(Backend { frontend, features, protocol })
    }

    /// The features to offer the guest.
    pub(super) fn guest_features(&self) -> u64 {
        self.features & GUEST_FEATURES
    }

    fn uses_protocol_features(&self) -> bool {
        self.features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0
    }

    /// Hands the rings to the backend: features, memory table, then each queue, then enables
    /// them. `acked` are the guest's features (a subset of [`Backend::guest_features`]).
    pub(super) fn start(
        &mut self,
        acked: u64,
        mem: &GuestMemoryMmap,
        queues: &[Queue; NUM_QUEUES],
        kicks: &[EventFd; NUM_QUEUES],
        call: &EventFd,
    ) -> Result<(), FsError> {
        let mut features = acked & self.guest_features();
        if self.uses_protocol_features() {
            features |= VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        }
        self.frontend.set_features(features).map_err(vhost_err("SET_FEATURES"))?;

        let regions = mem
            .iter()
            .map(|r| {
                VhostUserMemoryRegionInfo::from_guest_region(r)
                    .map_err(|_| FsError::MemoryNotShared(r.start_addr().0))
            })
            .collect::<Result<Vec<_>, _>>()?;
        self.frontend.set_mem_table(&regions).map_err(vhost_err("SET_MEM_TABLE"))?;

        for (index, (queue, kick)) in queues.iter().zip(kicks).enumerate() {
            let ring = |addr: GuestAddress, len: usize| host_address(mem, index, addr, len);
            let size = usize::from(queue.size());
            // Ring sizes of a split virtqueue (virtio 1.2, 2.7): 16-byte descriptors; avail
            // and used rings have flags + idx + one entry per descriptor + the event field.
            let config = VringConfigData {
                queue_max_size: queue.max_size(),
                queue_size: queue.size(),
                flags: 0,
                desc_table_addr: ring(GuestAddress(queue.desc_table()), 16 * size)?,
                used_ring_addr: ring(GuestAddress(queue.used_ring()), 6 + 8 * size)?,
                avail_ring_addr: ring(GuestAddress(queue.avail_ring()), 6 + 2 * size)?,
                log_addr: None,
            };
            let f = &self.frontend;
            f.set_vring_num(index, queue.size()).map_err(vhost_err("SET_VRING_NUM"))?;
            f.set_vring_addr(index, &config).map_err(vhost_err("SET_VRING_ADDR"))?;
            f.set_vring_base(index, queue.next_avail()).map_err(vhost_err("SET_VRING_BASE"))?;
            f.set_vring_call(index, call).map_err(vhost_err("SET_VRING_CALL"))?;
            f.set_vring_kick(index, kick).map_err(vhost_err("SET_VRING_KICK"))?;
        }
        if self.uses_protocol_features() {
            for index in 0..NUM_QUEUES {
                self.frontend
                    .set_vring_enable(index, true)
                    .map_err(vhost_err("SET_VRING_ENABLE"))?;
            }
        }
        Ok(())
    }

    /// Stops every ring (GET_VRING_BASE) and resets the backend's device state, so a new
    /// activation starts a new FUSE session.
    pub(super) fn stop(&mut self) -> Result<(), FsError> {
        for index in 0..NUM_QUEUES {
            self.frontend.get_vring_base(index).map_err(vhost_err("GET_VRING_BASE"))?;
        }
        if self.protocol.contains(VhostUserProtocolFeatures::RESET_DEVICE) {
            self.frontend.reset_device().map_err(vhost_err("RESET_DEVICE"))?;
        }
        Ok(())
    }
}

/// vhost-user ring addresses are the frontend's virtual addresses (the backend translates them
/// through the memory table): `addr..addr + len` must lie within one guest memory region.
fn host_address(
    mem: &GuestMemoryMmap,
    queue: usize,
    addr: GuestAddress,
    len: usize,
) -> Result<u64, FsError> {
    let bad = || FsError::Ring { queue, addr: addr.0 };
    let slice = mem.get_slice(addr, len).map_err(|_| bad())?;
    Ok(slice.ptr_guard().as_ptr() as u64)
}
