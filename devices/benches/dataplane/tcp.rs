//! RX of the frames a real TCP sender hands a TAP: 64 KiB TSO frames.
//!
//! Frames injected into a bridge port are marked untrusted and segmented before they reach
//! another TAP, so the `rx` case can only move 1514-byte frames. Here the frames come from
//! the host's own TCP stack instead, as a guest's downloads do: a sender socket in the bench
//! namespace writes to 10.77.0.2 through the measured TAP (TSO on, so the stack hands it
//! frames of up to 64 KiB). The worker reads them (microvm's handler, or the plain loop) and
//! forwards each frame, written from where it was read, into a peer TAP in a second
//! namespace whose stack owns 10.77.0.2 and receives the stream; a relay thread carries that
//! stack's ACKs back into the measured TAP. The script creates both TAPs, addresses and
//! static neighbour entries (see `tools/bench-dataplane`).
//!
//! Only the reading is measured ([`Meter`]: a batch, until the TAP has no frame or the
//! buffers are full), not the forwarding. `--impl interleaved` has the readers take turns on
//! one stream (see [`interleaved`]): the script's way, since separate runs of a stream
//! differ too much to compare.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use devices::virtio::net::{tun_offload_flags, NetBackend, NetHandler, MAX_FRAME_LEN, VNET_HDR_LEN};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{check, die, open_tap, wait_readable, Meter, Outcome, RxPool, Tap, MAX_FRAME_BUFS};
use super::{net_features, net_handler, rx_buf_addr, rx_guest_memory, rx_outcome, Ring, QSIZE, RX_RING, TX_RING};

const PEER: &str = "10.77.0.2:5001";
/// Frames the plain loop reads before it forwards them (the handler reads what its 256
/// 4 KiB buffers take: about as many 64 KiB frames).
const PLAIN_BATCH: usize = 15;

/// Runs the sender, the peer and the relay around the worker `imp` for `secs` seconds.
pub(super) fn rx_tcp(tap: &str, peer_netns: &str, peer_tap: &str, imp: &str, secs: f64) -> Vec<Outcome> {
    let stop = Arc::new(AtomicBool::new(false));
    let mut measured = open_tap(tap);
    measured
        .set_offload(tun_offload_flags(net_features()))
        .unwrap_or_else(|e| die(&format!("TUNSETOFFLOAD: {e}")));
    // SAFETY: dup of a valid fd; the copy is owned by the relay alone.
    let back = unsafe { libc::fcntl(measured.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) };
    check(back, "dup");

    let (tx, rx) = mpsc::channel();
    let peer = {
        let (stop, ns, name) = (stop.clone(), peer_netns.to_string(), peer_tap.to_string());
        std::thread::spawn(move || peer_side(&ns, &name, &stop, tx))
    };
    let peer_tap: Tap = rx.recv().unwrap_or_else(|_| die("the peer side did not start"));
    let peer_fd = peer_tap.as_raw_fd();
    let relay = {
        let stop = stop.clone();
        std::thread::spawn(move || relay(peer_fd, back, &stop))
    };
    let worker = {
        let stop = stop.clone();
        let imp = imp.to_string();
        std::thread::spawn(move || match imp.as_str() {
            "plain" => vec![plain(measured, peer_fd, &stop)],
            "handler" | "copy" => vec![handler(measured, imp == "handler", peer_fd, &stop)],
            "interleaved" => interleaved(measured, peer_fd, &stop),
            _ => die("bad --impl"),
        })
    };
    let sender = {
        let stop = stop.clone();
        std::thread::spawn(move || send(&stop))
    };
    std::thread::sleep(Duration::from_secs_f64(secs));
    stop.store(true, Ordering::Relaxed);
    let out = worker.join().unwrap();
    for t in [sender, relay] {
        t.join().unwrap();
    }
    peer.join().unwrap();
    drop(peer_tap);
    // SAFETY: `back` is owned here and no longer used by the relay.
    unsafe { libc::close(back) };
    if out.iter().any(|o| o.ops == 0) {
        die("the TCP stream moved nothing");
    }
    out
}

/// In the peer namespace (this thread only): opens the peer TAP, listens, hands the TAP over
/// (the caller keeps it open until the threads using it are joined), then receives and
/// discards the stream.
fn peer_side(netns: &str, tap: &str, stop: &AtomicBool, tx: mpsc::Sender<Tap>) {
    let ns = std::fs::File::open(netns).unwrap_or_else(|e| die(&format!("{netns}: {e}")));
    // SAFETY: setns on a valid namespace fd; it changes this thread's network namespace.
    check(unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) }, "setns");
    let tap = open_tap(tap);
    let listener = TcpListener::bind(PEER).unwrap_or_else(|e| die(&format!("listen {PEER}: {e}")));
    listener.set_nonblocking(true).unwrap();
    tx.send(tap).unwrap();
    let mut conn = loop {
        match listener.accept() {
            Ok((c, _)) => break c,
            Err(_) if !stop.load(Ordering::Relaxed) => std::thread::sleep(Duration::from_millis(1)),
            Err(_) => return,
        }
    };
    conn.set_nonblocking(false).unwrap();
    conn.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    while !stop.load(Ordering::Relaxed) {
        if let Ok(0) = conn.read(&mut buf) {
            break;
        }
    }
}

/// The peer stack's frames (ACKs) back into the measured TAP, as the sender's stack expects.
fn relay(from: RawFd, to: RawFd, stop: &AtomicBool) {
    let mut buf = vec![0u8; MAX_FRAME_LEN];
    while !stop.load(Ordering::Relaxed) {
        // SAFETY: `buf` is writable for its length.
        let n = unsafe { libc::read(from, buf.as_mut_ptr().cast(), buf.len()) };
        if n > 0 {
            // SAFETY: the first n bytes of `buf` are readable.
            unsafe { libc::write(to, buf.as_ptr().cast(), n as usize) };
        } else {
            wait_readable(from);
        }
    }
}

fn send(stop: &AtomicBool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut s = loop {
        match TcpStream::connect_timeout(&PEER.parse().unwrap(), Duration::from_millis(500)) {
            Ok(s) => break s,
            Err(e) if Instant::now() > deadline || stop.load(Ordering::Relaxed) => {
                die(&format!("connect {PEER}: {e}"))
            }
            Err(_) => {}
        }
    };
    s.set_write_timeout(Some(Duration::from_millis(50))).unwrap();
    let chunk = vec![0x5au8; 1 << 16];
    while !stop.load(Ordering::Relaxed) {
        let _ = s.write(&chunk);
    }
}

/// Writes one frame (vnet header first) from `iovs` into the peer TAP.
fn forward(peer: RawFd, iovs: &[libc::iovec]) {
    // SAFETY: every iovec points at memory readable for its length during the call.
    unsafe { libc::writev(peer, iovs.as_ptr(), iovs.len() as i32) };
}

/// The plain loop's reader: `readv` into the pool, then forwarding from there.
struct PlainReader {
    fd: RawFd,
    /// Written once after each batch that read something, if set: the interrupt a device
    /// owes its guest per batch (the handler's `signal_used`), for "limit + interrupt".
    irq: Option<EventFd>,
    pool: RxPool,
    batch: Vec<(*const u8, usize)>,
    m: Meter,
    ops: u64,
    bytes: u64,
}

impl PlainReader {
    fn new(fd: RawFd) -> Self {
        PlainReader {
            fd,
            irq: None,
            pool: RxPool::new(),
            batch: Vec::with_capacity(PLAIN_BATCH),
            m: Meter::new(),
            ops: 0,
            bytes: 0,
        }
    }

    /// One timed batch (until the TAP is empty or PLAIN_BATCH frames), then its forwarding.
    /// False if it read nothing.
    fn step(&mut self, peer: RawFd) -> bool {
        let (pool, batch, fd, irq) = (&mut self.pool, &mut self.batch, self.fd, &self.irq);
        self.m.time(|| {
            while batch.len() < PLAIN_BATCH {
                let Some(frame) = pool.read(fd, MAX_FRAME_BUFS) else {
                    break;
                };
                batch.push(frame);
            }
            if let (Some(irq), false) = (irq, batch.is_empty()) {
                irq.write(1).unwrap_or_else(|e| die(&format!("eventfd: {e}")));
            }
        });
        for &(frame, len) in &self.batch {
            self.ops += 1;
            self.bytes += (len - VNET_HDR_LEN) as u64;
            // A batch is at most PLAIN_BATCH largest frames: fewer buffers than the pool
            // has, so none was overwritten yet.
            forward(peer, &[libc::iovec { iov_base: frame.cast_mut().cast(), iov_len: len }]);
        }
        let any = !self.batch.is_empty();
        self.batch.clear();
        any
    }

    fn finish(self) -> Outcome {
        self.m.finish(self.ops, self.bytes)
    }
}

/// microvm's handler as a reader: its own guest memory and rings, then forwarding each frame
/// from its chains.
struct HandlerReader<'a> {
    mem: &'a GuestMemoryMmap,
    h: NetHandler,
    rx: Ring<'a>,
    used: Vec<(u16, u32)>,
    iovs: Vec<libc::iovec>,
    m: Meter,
}

impl<'a> HandlerReader<'a> {
    fn new(mem: &'a GuestMemoryMmap, tap: Tap, zero_copy: bool) -> Self {
        let rx = Ring { mem, base: RX_RING, seen: 0 };
        let txr = Ring { mem, base: TX_RING, seen: 0 };
        rx.post_rx_buffers();
        let mut h = net_handler(mem, &rx, &txr, tap);
        h.set_rx_zero_copy(zero_copy);
        let q = usize::from(QSIZE);
        HandlerReader { mem, h, rx, used: Vec::with_capacity(q), iovs: Vec::with_capacity(q), m: Meter::new() }
    }

    /// One timed `process_rx`, then forwarding every frame it delivered (num_buffers in its
    /// header says how many chains), before the buffers are posted again. False if it
    /// delivered nothing.
    fn step(&mut self, peer: RawFd) -> bool {
        let h = &mut self.h;
        let st = self.m.time(|| h.process_rx());
        let used = &mut self.used;
        self.rx.recycle(|head, len| used.push((head, len)));
        let host = |addr: u64| self.mem.get_host_address(GuestAddress(addr)).unwrap();
        let mut k = 0;
        while k < used.len() {
            let first = rx_buf_addr(used[k].0);
            let mut nb = [0u8; 2];
            // SAFETY: the header's num_buffers field is inside the chain's buffer.
            unsafe { std::ptr::copy_nonoverlapping(host(first + 10), nb.as_mut_ptr(), 2) };
            let n = usize::from(u16::from_le_bytes(nb)).clamp(1, used.len() - k);
            self.iovs.clear();
            for &(head, len) in &used[k..k + n] {
                self.iovs.push(libc::iovec { iov_base: host(rx_buf_addr(head)).cast(), iov_len: len as usize });
            }
            forward(peer, &self.iovs);
            k += n;
        }
        used.clear();
        st.completed > 0
    }

    fn finish(self) -> Outcome {
        rx_outcome(&self.h, self.m)
    }
}

fn plain(tap: Tap, peer: RawFd, stop: &AtomicBool) -> Outcome {
    let mut r = PlainReader::new(tap.as_raw_fd());
    while !stop.load(Ordering::Relaxed) {
        if !r.step(peer) {
            wait_readable(tap.as_raw_fd());
        }
    }
    r.finish()
}

fn handler(tap: Tap, zero_copy: bool, peer: RawFd, stop: &AtomicBool) -> Outcome {
    let fd = tap.as_raw_fd();
    let mem = rx_guest_memory();
    let mut r = HandlerReader::new(&mem, tap, zero_copy);
    while !stop.load(Ordering::Relaxed) {
        if !r.step(peer) {
            wait_readable(fd);
        }
    }
    r.finish()
}

/// `--impl interleaved`: the handler, the plain loop, the handler with zero-copy RX off and
/// the plain loop with an interrupt per batch take turns, a batch each, on the same TAP and
/// the same TCP stream, so that all see the same frames, sender and load (separate runs of a
/// TCP stream vary by up to ~30% between runs on this host). Each has its own meter;
/// outcomes in that order.
fn interleaved(tap: Tap, peer: RawFd, stop: &AtomicBool) -> Vec<Outcome> {
    let fd = tap.as_raw_fd();
    let second = dup_tap(&tap);
    let (mem_z, mem_c) = (rx_guest_memory(), rx_guest_memory());
    let mut zero = HandlerReader::new(&mem_z, tap, true);
    let mut plain = PlainReader::new(fd);
    let mut copy = HandlerReader::new(&mem_c, second, false);
    let mut plain_irq = PlainReader::new(fd);
    plain_irq.irq = Some(EventFd::new(EFD_NONBLOCK).unwrap_or_else(|e| die(&format!("eventfd: {e}"))));
    // A batch each, in a cycle in which every reader follows every other reader exactly
    // once: a reader's batch is larger when the one before it was slow (more frames queued
    // meanwhile), and larger batches spend less per frame on what each batch costs once (the
    // read that finds the TAP empty, the meter's clock reads). An earlier Latin square of
    // four rounds had the plain loop follow the slow copy path twice as often as the others.
    const CYCLE: [usize; 12] = [0, 1, 2, 3, 0, 2, 1, 3, 2, 0, 3, 1];
    let mut at = 0usize;
    while !stop.load(Ordering::Relaxed) {
        let read = match CYCLE[at % CYCLE.len()] {
            0 => zero.step(peer),
            1 => plain.step(peer),
            2 => copy.step(peer),
            _ => plain_irq.step(peer),
        };
        if !read {
            wait_readable(fd);
        }
        at += 1;
    }
    vec![zero.finish(), plain.finish(), copy.finish(), plain_irq.finish()]
}

/// A second handle on the same TAP queue (for a second handler).
fn dup_tap(tap: &Tap) -> Tap {
    // SAFETY: dup of a valid fd; the copy is owned by the returned Tap alone.
    let fd = unsafe { libc::fcntl(tap.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) };
    check(fd, "dup");
    // SAFETY: a fresh fd owned by nobody else.
    Tap(unsafe { OwnedFd::from_raw_fd(fd) })
}
