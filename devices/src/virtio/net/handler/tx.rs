//! TX: guest → backend, without copying the frame.

use std::io::IoSlice;

use tracing::debug;
use virtio_queue::desc::split::Descriptor;
use vm_memory::volatile_memory::PtrGuard;
use vm_memory::{GuestMemory, GuestMemoryMmap, Permissions};

use super::{ChainError, NetHandler, ProcessStats};
use crate::guest_warn;
use crate::virtio::net::{NetBackend, MAX_FRAME_LEN, VNET_HDR_LEN};
use crate::virtio::queue::Step;

impl NetHandler {
    /// Sends available TX chains to the backend until the queue is empty, the limiter says
    /// stop, or [`TX_BUDGET`](super::TX_BUDGET) chains were done (then the handler re-kicks its own TX eventfd
    /// so the event loop comes back after serving other fds). Raises the used-ring interrupt
    /// if anything was completed. Call on TX queue kick and TX limiter timer.
    pub fn process_tx(&mut self) -> ProcessStats {
        if self.tx_throttled() {
            return ProcessStats {
                completed: 0,
                throttled: true,
            };
        }
        let mut throttled = false;
        let (mem, log) = (&self.mem, &*self.log);
        let (descs, limiter, backend, stats) = (
            &mut self.tx_descs,
            &mut self.tx_limiter,
            &mut self.backend,
            &mut self.stats,
        );
        let pass = self.tx.process(mem, &self.irq, log, |chain| {
            let head = chain.head_index();
            descs.clear();
            let len = match collect_tx_chain(mem, chain, descs) {
                Ok(len) => len,
                Err(e) => {
                    guest_warn!(log, head, error = %e, "virtio-net: dropping malformed TX chain");
                    stats.tx_dropped += 1;
                    return Step::Used(0);
                }
            };
            let payload = (len - VNET_HDR_LEN) as u64;
            if let Some(rl) = limiter.as_mut() {
                if !rl.consume_request(payload) {
                    // Put the chain back; the limiter's timer will wake us up.
                    stats.tx_throttled += 1;
                    throttled = true;
                    return Step::PutBack;
                }
            }
            match send_frame(mem, backend.as_deref_mut(), descs) {
                Ok(_) => {
                    stats.tx_frames += 1;
                    stats.tx_bytes += payload;
                }
                Err(e) => {
                    debug!(head, len, error = %e, "virtio-net: TX frame dropped");
                    stats.tx_dropped += 1;
                }
            }
            Step::Used(0)
        });
        ProcessStats {
            completed: pass.completed,
            throttled,
        }
    }
}

/// Writes the frame described by `descs` to the backend, straight from guest memory.
fn send_frame(
    mem: &GuestMemoryMmap,
    backend: Option<&mut (dyn NetBackend + 'static)>,
    descs: &[Descriptor],
) -> Result<usize, ChainError> {
    let backend = backend.ok_or(ChainError::NoBackend)?;
    // The guards keep the guest memory mapped while the iovecs point into it; declared
    // before `iovs` so they are dropped after it.
    let mut guards: Vec<PtrGuard> = Vec::with_capacity(descs.len());
    for d in descs {
        if d.len() == 0 {
            continue;
        }
        // A buffer may straddle two memory regions: one slice per region.
        for slice in mem.get_slices(d.addr(), d.len() as usize, Permissions::Read)? {
            guards.push(slice?.ptr_guard());
        }
    }
    let iovs: Vec<IoSlice<'_>> = guards
        .iter()
        .map(|g| IoSlice::new(guard_bytes(g)))
        .collect();
    backend.write_frame(&iovs).map_err(ChainError::Backend)
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
    chain: impl Iterator<Item = Descriptor>,
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
