//! The console's state in a VM snapshot: what the driver and the device told each other
//! (DEVICE_READY, each port's PORT_READY and PORT_OPEN), the control messages not yet
//! delivered, and a transmit chain half written to its output. The backends are not saved:
//! a restore gives the ports new ones (the host side of each port is open again).

use serde::{Deserialize, Serialize};
use vm_memory::GuestAddress;

use super::handler::{ConsoleHandler, TxChain};
use super::{rx_queue_index, tx_queue_index, CONTROL_RX_INDEX, CONTROL_TX_INDEX};
use crate::virtio::snapshot::{QueuePosition, SnapshotError};

/// See the module documentation.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsoleState {
    pub device_ready: bool,
    pub ports: Vec<PortState>,
    pub outbox: Vec<Vec<u8>>,
}

/// A transmit chain the output had not taken: (head, [(guest address, length)], bytes
/// written).
pub type PendingChain = (u16, Vec<(u64, usize)>, usize);

/// One port (see [`ConsoleState`]).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortState {
    pub ready: bool,
    pub guest_open: bool,
    pub tx_pending: Option<PendingChain>,
}

impl ConsoleHandler {
    /// Every queue's position, in queue index order.
    pub(crate) fn queue_positions(&self) -> Vec<QueuePosition> {
        let count = 2 * self.ports.len() + 2;
        let mut out = vec![QueuePosition { next_avail: 0, next_used: 0 }; count];
        out[CONTROL_RX_INDEX] = self.ctrl_rx.position();
        out[CONTROL_TX_INDEX] = self.ctrl_tx.position();
        for (i, p) in self.ports.iter().enumerate() {
            out[rx_queue_index(i)] = p.rx.position();
            out[tx_queue_index(i)] = p.tx.position();
        }
        out
    }

    /// See [`ConsoleState`].
    pub(crate) fn state(&self) -> ConsoleState {
        ConsoleState {
            device_ready: self.device_ready,
            ports: self
                .ports
                .iter()
                .map(|p| PortState {
                    ready: p.ready,
                    guest_open: p.guest_open,
                    tx_pending: p.tx_pending.as_ref().map(|t| {
                        (t.head, t.bufs.iter().map(|(a, l)| (a.0, *l)).collect(), t.done)
                    }),
                })
                .collect(),
            outbox: self.outbox.iter().cloned().collect(),
        }
    }

    /// Takes back a saved state (right after activation, before the handler has run).
    pub(crate) fn restore_state(&mut self, s: &ConsoleState) -> Result<(), SnapshotError> {
        if s.ports.len() != self.ports.len() {
            return Err(SnapshotError::Mismatch {
                what: "console port count",
                saved: s.ports.len(),
                configured: self.ports.len(),
            });
        }
        // As many as `send_control` ever queues.
        if s.outbox.len() > 4 * self.ports.len() + 8 {
            return Err(SnapshotError::Inconsistent("console control outbox too long"));
        }
        for (p, saved) in self.ports.iter_mut().zip(&s.ports) {
            if let Some((_, bufs, done)) = &saved.tx_pending {
                let total = bufs.iter().try_fold(0usize, |acc, (_, l)| acc.checked_add(*l));
                let too_long = |t: usize| t > super::MAX_TX_CHAIN || *done > t;
                if bufs.len() > usize::from(u16::MAX) || total.is_none_or(too_long) {
                    return Err(SnapshotError::Inconsistent("console transmit chain"));
                }
            }
            p.ready = saved.ready;
            p.guest_open = saved.guest_open;
            p.tx_pending = saved.tx_pending.as_ref().map(|(head, bufs, done)| TxChain {
                head: *head,
                bufs: bufs.iter().map(|(a, l)| (GuestAddress(*a), *l)).collect(),
                done: *done,
            });
        }
        self.device_ready = s.device_ready;
        self.outbox = s.outbox.iter().cloned().collect();
        Ok(())
    }
}
