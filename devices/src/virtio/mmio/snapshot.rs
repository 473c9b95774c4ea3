//! Saving and restoring a transport's registers and its device (see `virtio::snapshot`).

use std::sync::Arc;

use virtio_queue::{Queue, QueueState, QueueT};

use super::MmioTransport;
use crate::virtio::snapshot::{QueueSnapshot, SnapshotError, TransportSnapshot};
use crate::virtio::status::{DEVICE_NEEDS_RESET, DRIVER_OK, FAILED, FEATURES_OK};
use crate::virtio::{device_name, VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_VRING};

impl MmioTransport {
    /// The transport's registers and, while active, its device's queue positions and state.
    /// Call with the vCPUs paused and the event loop not running the device's handler.
    pub fn save(&self) -> Result<TransportSnapshot, SnapshotError> {
        let device = if self.device.is_activated() {
            let d = self.device.snapshot()?;
            if d.queues.len() != self.queues.len() {
                return Err(SnapshotError::Mismatch {
                    what: "queue count of the data plane",
                    saved: d.queues.len(),
                    configured: self.queues.len(),
                });
            }
            Some(d)
        } else {
            None
        };
        let queues = self
            .queues
            .iter()
            .enumerate()
            .map(|(i, q)| {
                // The transport's copy has the configuration; the data plane the positions.
                let pos = device.as_ref().map(|d| d.queues[i]);
                QueueSnapshot {
                    size: q.size(),
                    ready: q.ready(),
                    desc_table: q.desc_table(),
                    avail_ring: q.avail_ring(),
                    used_ring: q.used_ring(),
                    next_avail: pos.map_or(q.next_avail(), |p| p.next_avail),
                    next_used: pos.map_or(q.next_used(), |p| p.next_used),
                }
            })
            .collect();
        Ok(TransportSnapshot {
            device_type: self.device.device_type(),
            status: self.status,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            queue_sel: self.queue_sel,
            config_generation: self.config_generation,
            interrupt_status: self.irq.status(),
            queues,
            device,
        })
    }

    /// Puts a fresh transport (its device built from the same configuration, inactive) in the
    /// saved state; an active device is activated at the saved queue positions and given its
    /// state. Blocks like a guest's DRIVER_OK (the event loop must run on another thread).
    /// Afterwards every queue is kicked once: notifications the guest sent just before the
    /// snapshot were not saved.
    pub fn restore(&mut self, snap: &TransportSnapshot) -> Result<(), SnapshotError> {
        let configured = self.device.device_type();
        if snap.device_type != configured {
            return Err(SnapshotError::WrongDevice {
                saved: device_name(snap.device_type),
                configured: device_name(configured),
            });
        }
        if self.device.is_activated() || self.status != 0 {
            return Err(SnapshotError::Inconsistent("restoring into a used transport"));
        }
        if snap.queues.len() != self.queues.len() {
            return Err(SnapshotError::Mismatch {
                what: "queue count",
                saved: snap.queues.len(),
                configured: self.queues.len(),
            });
        }
        let active = snap.status & DRIVER_OK != 0 && snap.status & (FAILED | DEVICE_NEEDS_RESET) == 0;
        if active != snap.device.is_some() {
            return Err(SnapshotError::Inconsistent("device state does not match DRIVER_OK"));
        }
        let mut queues = Vec::with_capacity(snap.queues.len());
        for (index, (q, s)) in self.queues.iter().zip(&snap.queues).enumerate() {
            let state = QueueState {
                max_size: q.max_size(),
                next_avail: s.next_avail,
                next_used: s.next_used,
                event_idx_enabled: false,
                size: s.size,
                ready: s.ready,
                desc_table: s.desc_table,
                avail_ring: s.avail_ring,
                used_ring: s.used_ring,
            };
            let queue = Queue::try_from(state).map_err(|source| SnapshotError::Queue { index, source })?;
            if active && queue.ready() && !queue.is_valid(&self.mem) {
                return Err(SnapshotError::Inconsistent("a ready queue lies outside guest memory"));
            }
            queues.push(queue);
        }
        self.queues = queues;
        self.queue_errors.fill(0);
        self.device_features_sel = snap.device_features_sel;
        self.driver_features_sel = snap.driver_features_sel;
        self.driver_features = snap.driver_features;
        self.queue_sel = snap.queue_sel;
        self.config_generation = snap.config_generation;
        if snap.status & FEATURES_OK != 0 {
            self.device.set_acked_features(self.driver_features & self.device.avail_features());
        }
        if let Some(device) = &snap.device {
            self.try_activate().map_err(SnapshotError::Activate)?;
            self.device.restore(device)?;
        }
        self.status = snap.status;
        self.irq.clear();
        self.irq.set_pending(snap.interrupt_status & (VIRTIO_MMIO_INT_VRING | VIRTIO_MMIO_INT_CONFIG));
        if active {
            for evt in &self.queue_evts {
                // A spurious kick finds nothing new; a lost one would stall a queue.
                let _ = evt.write(1);
            }
        }
        Ok(())
    }

    /// The interrupt trigger, for a restore that re-registers the irqfd.
    pub fn irq_trigger(&self) -> &Arc<crate::virtio::IrqTrigger> {
        &self.irq
    }
}
