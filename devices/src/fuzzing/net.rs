//! virtio-net: TX chains of any shape sent to a fake backend; RX frames of any bytes and
//! length delivered into guest buffers of any shape, with the features (mergeable buffers,
//! receive offloads, EVENT_IDX) chosen by the input.

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{check_used, memory, write_image, FuzzQueue, Input, RINGS};
use crate::guest_log::GuestLog;
use crate::virtio::net::{
    NetBackend, NetHandler, MAX_FRAME_LEN, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_ECN,
    VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_GUEST_UFO,
    VIRTIO_NET_F_MRG_RXBUF, VIRTIO_RING_F_EVENT_IDX, VNET_HDR_LEN,
};
use crate::virtio::{IrqTrigger, VIRTIO_F_VERSION_1};

/// A backend without a host side: frames to read come from the input, written frames are
/// recorded (their lengths).
struct FakeBackend {
    rx: VecDeque<Vec<u8>>,
    /// Bytes handed to the handler by reads.
    read: Arc<Mutex<usize>>,
    sent: Arc<Mutex<Vec<usize>>>,
    fail_writes: bool,
    /// Only for `as_raw_fd`; never watched.
    evt: EventFd,
}

impl AsRawFd for FakeBackend {
    fn as_raw_fd(&self) -> RawFd {
        self.evt.as_raw_fd()
    }
}

impl NetBackend for FakeBackend {
    unsafe fn read_frame_into(&mut self, iovs: &[libc::iovec]) -> io::Result<usize> {
        let f = self
            .rx
            .pop_front()
            .ok_or_else(|| io::Error::from(io::ErrorKind::WouldBlock))?;
        let room: usize = iovs.iter().map(|v| v.iov_len).sum();
        // The handler must always offer room for the largest frame.
        assert!(room >= MAX_FRAME_LEN, "read offered {room} bytes");
        // A TAP truncates a frame to the buffers it is read into (readv).
        let mut off = 0usize;
        for v in iovs {
            let n = v.iov_len.min(f.len() - off);
            // SAFETY: the caller guarantees each iovec is writable for iov_len >= n bytes;
            // the source is our own Vec, which cannot overlap guest memory or rx_buf. Raw
            // copies only: overlapping iovecs are allowed (later ones win, like readv).
            unsafe { std::ptr::copy_nonoverlapping(f[off..].as_ptr(), v.iov_base.cast::<u8>(), n) };
            off += n;
            if off == f.len() {
                break;
            }
        }
        *self.read.lock().unwrap() += off;
        Ok(off)
    }

    fn write_frame(&mut self, iovs: &[IoSlice]) -> io::Result<usize> {
        if self.fail_writes {
            return Err(io::Error::from(io::ErrorKind::OutOfMemory));
        }
        let len = iovs.iter().map(|v| v.len()).sum();
        self.sent.lock().unwrap().push(len);
        Ok(len)
    }

    fn set_offload(&mut self, _tun_flags: u32) -> io::Result<()> {
        Ok(())
    }
}

/// The features a guest may ack, picked by the bits of one input byte.
fn features(inp: &mut Input) -> u64 {
    let b = inp.u8();
    let bits = [
        VIRTIO_NET_F_MRG_RXBUF,
        VIRTIO_NET_F_GUEST_CSUM,
        VIRTIO_NET_F_GUEST_TSO4,
        VIRTIO_NET_F_GUEST_TSO6,
        VIRTIO_NET_F_GUEST_ECN,
        VIRTIO_NET_F_GUEST_UFO,
        VIRTIO_RING_F_EVENT_IDX,
    ];
    bits.iter()
        .enumerate()
        .filter(|(i, _)| b & (1 << i) != 0)
        .fold(1u64 << VIRTIO_F_VERSION_1, |a, (_, &bit)| a | (1u64 << bit))
}

struct Harness {
    handler: NetHandler,
    read: Arc<Mutex<usize>>,
    sent: Arc<Mutex<Vec<usize>>>,
}

fn handler(
    mem: &vm_memory::GuestMemoryMmap,
    rxq: &FuzzQueue,
    txq: &FuzzQueue,
    acked: u64,
    rx_frames: VecDeque<Vec<u8>>,
    fail_writes: bool,
) -> Harness {
    let event_idx = acked & (1u64 << VIRTIO_RING_F_EVENT_IDX) != 0;
    let sent = Arc::new(Mutex::new(Vec::new()));
    let read = Arc::new(Mutex::new(0));
    let backend = FakeBackend {
        rx: rx_frames,
        read: read.clone(),
        sent: sent.clone(),
        fail_writes,
        evt: EventFd::new(EFD_NONBLOCK).unwrap(),
    };
    let handler = NetHandler::new(
        mem.clone(),
        [rxq.queue(event_idx), txq.queue(event_idx)],
        [
            EventFd::new(EFD_NONBLOCK).unwrap(),
            EventFd::new(EFD_NONBLOCK).unwrap(),
        ],
        Arc::new(IrqTrigger::new().unwrap()),
        Box::new(backend),
        acked,
        Arc::new(GuestLog::new("virtio-net")),
    );
    Harness {
        handler,
        read,
        sent,
    }
}

/// Input: features, backend-fails flag, the TX queue (see [`FuzzQueue::build`]), then the
/// guest memory image.
///
/// Invariants: every completed chain is in the used ring with length 0 (TX writes nothing);
/// each chain taken is either sent or counted dropped, and all but those naming a head
/// beyond the queue are returned; every frame the backend got has a
/// vnet header and at least one byte, at most MAX_FRAME_LEN bytes; the byte counter matches.
pub fn virtio_net_tx(data: &[u8]) {
    let mut inp = Input::new(data);
    let acked = features(&mut inp);
    let fail_writes = inp.u8() == 0xff;
    let mem = memory();
    let rxq = FuzzQueue::build(&mem, RINGS, &mut Input::new(&[]));
    let txq = FuzzQueue::build(&mem, RINGS + 0x2000, &mut inp);
    write_image(&mem, inp.rest());
    let used = txq.used(&mem);
    let mut h = handler(&mem, &rxq, &txq, acked, VecDeque::new(), fail_writes);

    let stats = h.handler.process_tx();
    assert!(!stats.throttled);
    check_used(&used, &txq, stats.completed, 0);
    let sent = h.sent.lock().unwrap();
    let ns = h.handler.stats();
    assert_eq!(ns.tx_frames as usize, sent.len());
    // Every chain taken is sent or dropped; all but those with a head beyond the queue get
    // a used entry.
    let taken = (ns.tx_frames + ns.tx_dropped) as usize;
    assert!(
        taken >= stats.completed && taken - stats.completed <= usize::from(txq.bad_heads),
        "{ns:?}, {} used",
        stats.completed
    );
    for &len in sent.iter() {
        assert!(len > VNET_HDR_LEN && len <= MAX_FRAME_LEN, "frame of {len}");
    }
    let bytes: usize = sent.iter().map(|l| l - VNET_HDR_LEN).sum();
    assert_eq!(ns.tx_bytes as usize, bytes);
}

/// Input: features, frame count (0..8), each frame (length, then its bytes: the vnet header
/// first, so flags and GSO type are fuzzed too), whether RX copies instead of reading into
/// guest buffers, the RX queue, then the guest memory image.
///
/// Invariants: every read offers room for the largest frame (checked by the backend); the
/// used ring holds exactly the completed chains; the bytes given to the guest (sum of used
/// lengths) are exactly the delivered frames, headers included, and never more than was read;
/// each frame is delivered at most once and counted delivered or dropped.
pub fn virtio_net_rx(data: &[u8]) {
    let mut inp = Input::new(data);
    let acked = features(&mut inp);
    let nframes = inp.u8() % 8;
    let mut frames = VecDeque::new();
    for _ in 0..nframes {
        let len = match inp.u8() {
            0..=199 => usize::from(inp.u16() % 2048),
            _ => usize::from(inp.u16()) + usize::from(inp.u8()) * 64,
        };
        let mut f = vec![0u8; len];
        let b = inp.bytes(len.min(64));
        f[..b.len()].copy_from_slice(b);
        frames.push_back(f);
    }
    let copy = inp.u8() & 1 == 1;
    let payload_bytes: usize = frames
        .iter()
        .map(|f| f.len().min(MAX_FRAME_LEN).saturating_sub(VNET_HDR_LEN))
        .sum();
    let mem = memory();
    let rxq = FuzzQueue::build(&mem, RINGS, &mut inp);
    let txq = FuzzQueue::build(&mem, RINGS + 0x2000, &mut Input::new(&[]));
    write_image(&mem, inp.rest());
    let used = rxq.used(&mem);
    let mut h = handler(&mem, &rxq, &txq, acked, frames, false);
    h.handler.set_rx_zero_copy(!copy);

    let first = h.handler.process_rx();
    let second = h.handler.process_rx();
    assert!(!first.throttled && !second.throttled);
    let completed = first.completed + second.completed;
    let lens = check_used(&used, &rxq, completed, MAX_FRAME_LEN as u32);
    let given: usize = lens.iter().map(|&l| l as usize).sum();
    let read = *h.read.lock().unwrap();
    assert!(given <= read, "gave {given} bytes, read {read}");
    let ns = h.handler.stats();
    assert_eq!(
        given as u64,
        ns.rx_bytes + ns.rx_frames * VNET_HDR_LEN as u64,
        "{ns:?}: used lengths {lens:?}"
    );
    assert!(
        ns.rx_frames + ns.rx_dropped <= u64::from(nframes),
        "{ns:?} of {nframes} frames"
    );
    assert!(ns.rx_bytes as usize <= payload_bytes, "{ns:?}");
}
