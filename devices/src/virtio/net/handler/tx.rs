//! TX: guest → backend, without copying the frame.

use std::io::IoSlice;

use tracing::{debug, error, warn};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{DescriptorChain, QueueOwnedT, QueueT};
use vm_memory::volatile_memory::PtrGuard;
use vm_memory::{GuestMemory, GuestMemoryMmap, Permissions};

use super::rx::add_used;
use super::{ChainError, NetHandler, ProcessStats, TX_BUDGET};
use crate::virtio::net::{MAX_FRAME_LEN, TX_INDEX, VNET_HDR_LEN};
use crate::virtio::pop_chain;

/// Why a TX pass stopped.
enum Stop {
    /// No more chains.
    Empty,
    /// Out of tokens; the chain was put back.
    Throttled,
    /// [`TX_BUDGET`] chains done; more may be waiting.
    Budget,
    /// The queue is unusable.
    Broken,
}

impl NetHandler {
    /// Sends available TX chains to the backend until the queue is empty, the limiter says
    /// stop, or [`TX_BUDGET`] chains were done (then the handler re-kicks its own TX eventfd
    /// so the event loop comes back after serving other fds). Raises the used-ring interrupt
    /// if anything was completed. Call on TX queue kick and TX limiter timer.
    pub fn process_tx(&mut self) -> ProcessStats {
        let mut stats = ProcessStats::default();
        if self.tx_throttled() {
            stats.throttled = true;
            return stats;
        }
        let mut budget = TX_BUDGET;
        loop {
            if let Err(e) = self.tx_queue.disable_notification(&self.mem) {
                warn!(error = %e, "virtio-net: cannot disable TX notifications");
            }
            match self.drain_tx(&mut stats, &mut budget) {
                Stop::Empty => {}
                Stop::Throttled | Stop::Broken => break,
                Stop::Budget => {
                    if let Err(e) = self.tx_evt.write(1) {
                        error!(error = %e, "virtio-net: cannot re-kick the TX queue");
                    }
                    break;
                }
            }
            match self.tx_queue.enable_notification(&self.mem) {
                // More chains arrived while notifications were off: go again.
                Ok(true) => continue,
                Ok(false) => break,
                Err(e) => {
                    warn!(error = %e, "virtio-net: cannot enable TX notifications");
                    break;
                }
            }
        }
        if stats.completed > 0 {
            self.signal_used(TX_INDEX);
        }
        stats
    }

    fn drain_tx(&mut self, stats: &mut ProcessStats, budget: &mut usize) -> Stop {
        loop {
            if *budget == 0 {
                return Stop::Budget;
            }
            let chain = match pop_chain(&mut self.tx_queue, &self.mem) {
                Ok(Some(c)) => c,
                Ok(None) => return Stop::Empty,
                Err(e) => {
                    error!(error = %e, "virtio-net: TX queue is broken, not processing it");
                    return Stop::Broken;
                }
            };
            let head = chain.head_index();
            self.tx_descs.clear();
            let parsed = collect_tx_chain(&self.mem, chain, &mut self.tx_descs);
            match parsed {
                Err(e) => {
                    warn!(head, error = %e, "virtio-net: dropping malformed TX chain");
                    self.stats.tx_dropped += 1;
                }
                Ok(len) => {
                    let payload = (len - VNET_HDR_LEN) as u64;
                    if let Some(rl) = self.tx_limiter.as_mut() {
                        if !rl.consume_request(payload) {
                            // Put the chain back; the limiter's timer will wake us up.
                            self.tx_queue.go_to_previous_position();
                            self.stats.tx_throttled += 1;
                            stats.throttled = true;
                            return Stop::Throttled;
                        }
                    }
                    match self.send_frame() {
                        Ok(_) => {
                            self.stats.tx_frames += 1;
                            self.stats.tx_bytes += payload;
                        }
                        Err(e) => {
                            debug!(head, len, error = %e, "virtio-net: TX frame dropped");
                            self.stats.tx_dropped += 1;
                        }
                    }
                }
            }
            if add_used(&mut self.tx_queue, &self.mem, head, 0) {
                stats.completed += 1;
            }
            *budget -= 1;
        }
    }

    /// Writes the frame described by `tx_descs` to the backend, straight from guest memory.
    fn send_frame(&mut self) -> Result<usize, ChainError> {
        let backend = self.backend.as_mut().ok_or(ChainError::NoBackend)?;
        // The guards keep the guest memory mapped while the iovecs point into it; declared
        // before `iovs` so they are dropped after it.
        let mut guards: Vec<PtrGuard> = Vec::with_capacity(self.tx_descs.len());
        for d in &self.tx_descs {
            if d.len() == 0 {
                continue;
            }
            // A buffer may straddle two memory regions: one slice per region.
            for slice in self
                .mem
                .get_slices(d.addr(), d.len() as usize, Permissions::Read)?
            {
                guards.push(slice?.ptr_guard());
            }
        }
        let iovs: Vec<IoSlice<'_>> = guards
            .iter()
            .map(|g| IoSlice::new(guard_bytes(g)))
            .collect();
        backend.write_frame(&iovs).map_err(ChainError::Backend)
    }
}

/// The guest bytes behind a guard, as a slice that only the kernel reads (through writev).
fn guard_bytes(guard: &PtrGuard) -> &[u8] {
    // SAFETY: the guard comes from a VolatileSlice of guest memory obtained through
    // `GuestMemory::get_slices`, so `as_ptr()` points to `len()` mapped, readable bytes that
    // stay mapped while the guard (which the returned slice borrows) lives. The slice is only
    // handed to the kernel as an iovec and never read by Rust code, so the guest changing
    // that memory concurrently cannot break any Rust invariant; at worst the frame sent is
    // garbled, which only affects the guest.
    unsafe { std::slice::from_raw_parts(guard.as_ptr(), guard.len()) }
}

/// Validates a TX chain into `out`: every descriptor device-readable and inside guest memory,
/// a vnet header and at least one byte of frame, at most [`MAX_FRAME_LEN`] bytes. Returns the
/// total length.
fn collect_tx_chain(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    out: &mut Vec<Descriptor>,
) -> Result<usize, ChainError> {
    let mut total = 0usize;
    // See parse_rx_chain: a last descriptor flagged NEXT means the chain was cut.
    let mut cut = true;
    for d in chain {
        cut = d.has_next();
        if d.is_write_only() {
            return Err(ChainError::WritableTx);
        }
        total += d.len() as usize;
        if total > MAX_FRAME_LEN {
            return Err(ChainError::TooLong(total));
        }
        if d.len() == 0 {
            continue;
        }
        if !GuestMemory::check_range(mem, d.addr(), d.len() as usize, Permissions::Read) {
            return Err(ChainError::OutsideMemory {
                addr: d.addr().0,
                len: d.len(),
            });
        }
        out.push(d);
    }
    if cut {
        return Err(ChainError::Broken);
    }
    if total <= VNET_HDR_LEN {
        return Err(ChainError::TooShort(total));
    }
    Ok(total)
}
