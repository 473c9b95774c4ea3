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
//! buffers are full), not the forwarding.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use devices::virtio::net::{tun_offload_flags, NetBackend, MAX_FRAME_LEN, VNET_HDR_LEN};
use vm_memory::{GuestAddress, GuestMemoryBackend};

use super::{check, die, open_tap, wait_readable, Meter, Outcome, RxPool, Tap, MAX_FRAME_BUFS};
use super::{net_features, net_handler, rx_buf_addr, rx_guest_memory, rx_outcome, Ring, QSIZE, RX_RING, TX_RING};

const PEER: &str = "10.77.0.2:5001";
/// Frames the plain loop reads before it forwards them (the handler reads what its 256
/// 4 KiB buffers take: about as many 64 KiB frames).
const PLAIN_BATCH: usize = 15;

/// Runs the sender, the peer and the relay around the worker `imp` for `secs` seconds.
pub(super) fn rx_tcp(tap: &str, peer_netns: &str, peer_tap: &str, imp: &str, secs: f64) -> Outcome {
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
            "plain" => plain(measured, peer_fd, &stop),
            "handler" | "copy" => handler(measured, imp == "handler", peer_fd, &stop),
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
    if out.ops == 0 {
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

fn plain(tap: Tap, peer: RawFd, stop: &AtomicBool) -> Outcome {
    let mut pool = RxPool::new();
    let mut batch: Vec<(*const u8, usize)> = Vec::with_capacity(PLAIN_BATCH);
    let mut m = Meter::new();
    let (mut ops, mut bytes) = (0u64, 0u64);
    while !stop.load(Ordering::Relaxed) {
        m.time(|| {
            while batch.len() < PLAIN_BATCH {
                let Some((frame, n)) = pool.read(tap.as_raw_fd(), MAX_FRAME_BUFS) else {
                    break;
                };
                batch.push((frame, n));
                ops += 1;
                bytes += (n - VNET_HDR_LEN) as u64;
            }
        });
        if batch.is_empty() {
            wait_readable(tap.as_raw_fd());
            continue;
        }
        for &(frame, len) in &batch {
            // A batch is at most PLAIN_BATCH largest frames: fewer buffers than the pool
            // has, so none was overwritten yet.
            forward(peer, &[libc::iovec { iov_base: frame.cast_mut().cast(), iov_len: len }]);
        }
        batch.clear();
    }
    m.finish(ops, bytes)
}

fn handler(tap: Tap, zero_copy: bool, peer: RawFd, stop: &AtomicBool) -> Outcome {
    let mem = rx_guest_memory();
    let mut rx = Ring { mem: &mem, base: RX_RING, seen: 0 };
    let txr = Ring { mem: &mem, base: TX_RING, seen: 0 };
    rx.post_rx_buffers();
    let fd = tap.as_raw_fd();
    let mut h = net_handler(&mem, &rx, &txr, tap);
    h.set_rx_zero_copy(zero_copy);
    let host = |addr: u64| mem.get_host_address(GuestAddress(addr)).unwrap();
    let mut used: Vec<(u16, u32)> = Vec::with_capacity(usize::from(QSIZE));
    let mut iovs: Vec<libc::iovec> = Vec::with_capacity(usize::from(QSIZE));
    let mut m = Meter::new();
    while !stop.load(Ordering::Relaxed) {
        let st = m.time(|| h.process_rx());
        // Forward every frame from its chains (num_buffers in its header says how many),
        // before the buffers are posted again.
        rx.recycle(|head, len| used.push((head, len)));
        let mut k = 0;
        while k < used.len() {
            let first = rx_buf_addr(used[k].0);
            let mut nb = [0u8; 2];
            // SAFETY: the header's num_buffers field is inside the chain's buffer.
            unsafe { std::ptr::copy_nonoverlapping(host(first + 10), nb.as_mut_ptr(), 2) };
            let n = usize::from(u16::from_le_bytes(nb)).clamp(1, used.len() - k);
            iovs.clear();
            for &(head, len) in &used[k..k + n] {
                iovs.push(libc::iovec { iov_base: host(rx_buf_addr(head)).cast(), iov_len: len as usize });
            }
            forward(peer, &iovs);
            k += n;
        }
        used.clear();
        if st.completed == 0 {
            wait_readable(fd);
        }
    }
    rx_outcome(&h, m)
}
