//! microvm's own RX work, without the kernel: the backend hands over a frame by copying it
//! from memory, so what the handler costs beyond that copy is its own (popping, checking
//! and returning chains, the header). Beside it, "plain" is the copy alone into the same
//! 4 KiB buffers. The difference, divided by the chains a frame fills, is the per-chain
//! bookkeeping that README "Data plane" names as what keeps 64 KiB RX from its limit.

use std::io::{self, IoSlice};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use devices::virtio::net::handler::RX_BUDGET;
use devices::virtio::net::{NetBackend, VNET_HDR_LEN};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{make_frame, net_handler_with, rx_guest_memory, rx_outcome, Meter, Outcome, Ring, RxPool, QSIZE, RX_BUF};
use super::{RX_RING, TX_RING};

/// A backend whose frames are copies of one frame in memory: `left` of them, then none.
struct MemBackend {
    frame: Vec<u8>,
    left: Arc<AtomicU64>,
    /// Only for `AsRawFd` (the handler registers the backend's fd; never readable here).
    fd: EventFd,
}

impl AsRawFd for MemBackend {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl NetBackend for MemBackend {
    unsafe fn read_frame_into(&mut self, iovs: &[libc::iovec]) -> io::Result<usize> {
        if self.left.load(Ordering::Relaxed) == 0 {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        self.left.fetch_sub(1, Ordering::Relaxed);
        let mut off = 0;
        for v in iovs {
            let n = v.iov_len.min(self.frame.len() - off);
            // SAFETY: the caller's guarantee: the iovec is writable for iov_len >= n bytes;
            // `frame[off..off + n]` is in bounds.
            unsafe { std::ptr::copy_nonoverlapping(self.frame.as_ptr().add(off), v.iov_base.cast(), n) };
            off += n;
            if off == self.frame.len() {
                break;
            }
        }
        Ok(self.frame.len())
    }
    fn write_frame(&mut self, _: &[IoSlice]) -> io::Result<usize> {
        Ok(0)
    }
    fn set_offload(&mut self, _: u32) -> io::Result<()> {
        Ok(())
    }
}

/// `--dir rx-mem --size S --impl handler|plain|interleaved`: frames of `size` (as in the TAP
/// cases) for `secs` seconds, in batches of as many frames as the posted buffers take (at
/// most RX_BUDGET), for both: each timed batch costs the same two clock reads.
/// `interleaved` alternates a batch of each in one run and returns both outcomes (handler
/// first): separate runs of this case differ by up to ~20% here.
pub(super) fn rx_mem(size: usize, imp: &str, secs: f64) -> Vec<Outcome> {
    let frame = make_frame(size, [2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 1, 0]);
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    // As many frames per batch as the posted buffers take (the handler stops when they are
    // used up, the driver reposts them between batches).
    let per = (usize::from(QSIZE) / size.div_ceil(RX_BUF).max(1) - 1).min(RX_BUDGET) as u64;
    let (mut pool, mut pm, mut plain_ops) = (RxPool::new(), Meter::new(), 0u64);
    let mut plain_batch = || {
        pm.time(|| {
            for _ in 0..per {
                pool.copy_in(&frame);
            }
        });
        plain_ops += per;
    };
    let mem = rx_guest_memory();
    let mut rx = Ring { mem: &mem, base: RX_RING, seen: 0 };
    let tx = Ring { mem: &mem, base: TX_RING, seen: 0 };
    rx.post_rx_buffers();
    let left = Arc::new(AtomicU64::new(0));
    let backend = MemBackend { frame: frame.clone(), left: left.clone(), fd: EventFd::new(EFD_NONBLOCK).unwrap() };
    let mut h = net_handler_with(&mem, &rx, &tx, Box::new(backend));
    let mut hm = Meter::new();
    let mut handler_batch = || {
        left.store(per, Ordering::Relaxed);
        hm.time(|| h.process_rx());
        rx.recycle(|_, _| {});
    };
    while Instant::now() < deadline {
        match imp {
            "plain" => plain_batch(),
            "handler" => handler_batch(),
            _ => {
                handler_batch();
                plain_batch();
            }
        }
    }
    let payload = (frame.len() - VNET_HDR_LEN) as u64;
    let plain = pm.finish(plain_ops, plain_ops * payload);
    let handler = rx_outcome(&h, hm);
    match imp {
        "plain" => vec![plain],
        "handler" => vec![handler],
        _ => vec![handler, plain],
    }
}
