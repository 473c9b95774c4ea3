//! Guest-free data-plane benchmark (run by `tools/bench-dataplane`, which creates the network
//! namespace, TAPs, bridge and tmpfs file this binary is pointed at, and deletes them).
//!
//! It drives microvm's own virtio-net and virtio-blk data planes ([`NetHandler`],
//! [`BlockHandler`]) with a synthetic guest: guest memory, split rings and a minimal driver
//! that keeps every buffer posted (it republishes each used chain). Beside each, "plain"
//! runs the physical limit measured the same way: a loop of `readv`/`writev` on the same TAP
//! (RX into page-aligned 4 KiB buffers like the guest's, as many per read as the case's
//! largest frame needs), `pread`/`pwrite` on the same file.
//!
//! * `net --taps a,b,.. --src-tap s --dir rx|tx --size 64|65536 --impl handler|copy|plain
//!   --secs S --dst-mac M`: the TAPs and `s` are ports of one bridge; one worker thread per
//!   measured TAP. TX: the worker sends frames into its TAP to the bridge's own MAC `M` (the
//!   bridge delivers them locally, where IP drops them: no flooding). RX: one generator thread
//!   writes frames into `s`, each addressed to a measured NIC's MAC (static FDB entries), so
//!   the bridge forwards it into that TAP's queue (a 64 KiB TSO frame stays one frame, as the
//!   TAPs accept TSO); at most `INFLIGHT` frames are queued per TAP; the worker reads them.
//!   `copy` is the handler with zero-copy RX off (every frame read into a host buffer, then
//!   copied).
//! * `net --taps t --dir rx-tcp --peer-netns P --peer-tap p --impl ...|interleaved`: RX of
//!   the 64 KiB TSO frames a real TCP sender hands the TAP (see `dataplane/tcp.rs`);
//!   `interleaved` runs the handler, the plain loop and the copy path in turns on one stream
//!   and prints an outcome for each.
//! * `net --dir rx-mem --size S --impl handler|plain|interleaved`: no TAP; the handler's
//!   backend copies each frame from memory, plain is that copy alone (see `dataplane/mem.rs`).
//! * `blk --file F --op read|write --size 4096|1048576 --impl handler|plain|interleaved
//!   --secs S`: one worker; the handler keeps a queue of requests in flight, plain does the
//!   same requests one `pread`/`pwrite` at a time; `interleaved` has them take turns (see
//!   `dataplane/blk.rs`).
//!
//! Output: one JSON object per line, per worker: `{"ops", "bytes", "cpu_s", "wall_s"}`;
//! `cpu_s` is the worker's CPU time doing data-plane work ([`Meter`]): not its waits, not the
//! synthetic driver's part, not the generator's.
//!
//! A custom harness (`harness = false`) rather than criterion: each measurement needs a TAP
//! prepared outside the process, runs for seconds against a kernel peer, and reports CPU time
//! next to wall time.

use std::io::{self, IoSlice};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[path = "dataplane/blk.rs"]
mod blk;
#[path = "dataplane/mem.rs"]
mod mem;
#[path = "dataplane/tcp.rs"]
mod tcp;

use devices::guest_log::GuestLog;
use devices::virtio::net::handler::{RX_BUDGET, TX_BUDGET};
use devices::virtio::net::{
    tun_offload_flags, NetBackend, NetHandler, MAX_FRAME_LEN, VIRTIO_NET_F_GUEST_CSUM,
    VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_MRG_RXBUF, VNET_HDR_LEN,
};
use devices::virtio::{IrqTrigger, VIRTIO_F_VERSION_1};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const QSIZE: u16 = 256;
/// RX buffer size the synthetic guest posts (a Linux guest's mergeable buffers are 1.5 to
/// 4 KiB).
const RX_BUF: usize = 4096;
/// Frames the RX generator keeps queued in each TAP at most (below its 500-frame queue).
const INFLIGHT: u64 = 256;
const RX_RING: u64 = 0;
const TX_RING: u64 = 0x1_0000;
const BUFS: u64 = 0x10_0000;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // `cargo bench` passes --bench; run only when called by the script.
    let Some(kind) = args.first().filter(|k| *k == "net" || *k == "blk") else {
        eprintln!("dataplane: run by tools/bench-dataplane (net|blk ...)");
        return;
    };
    let opt = |name: &str| -> Option<String> {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1).cloned())
    };
    let need = |name: &str| opt(name).unwrap_or_else(|| die(&format!("missing {name}")));
    let secs: f64 = need("--secs").parse().unwrap_or_else(|_| die("bad --secs"));
    let size: usize = opt("--size").map_or(Ok(0), |s| s.parse()).unwrap_or_else(|_| die("bad --size"));
    let imp = need("--impl");
    let results = if kind == "net" && opt("--dir").as_deref() == Some("rx-mem") {
        mem::rx_mem(size, &imp, secs)
    } else if kind == "net" && opt("--dir").as_deref() == Some("rx-tcp") {
        tcp::rx_tcp(&need("--taps"), &need("--peer-netns"), &need("--peer-tap"), &imp, secs)
    } else if kind == "net" {
        let taps: Vec<String> = need("--taps").split(',').map(str::to_string).collect();
        let dst = opt("--dst-mac").map_or([2, 0, 0, 0, 0, 2], |m| parse_mac(&m));
        net(&taps, &need("--src-tap"), &need("--dir"), size, &imp, secs, dst)
    } else {
        blk::blk(&need("--file"), &need("--op"), size, &imp, secs)
    };
    for r in results {
        println!(
            "{{\"ops\": {}, \"bytes\": {}, \"cpu_s\": {:.6}, \"wall_s\": {:.6}, \"batches\": {}, \"meter_ns\": {:.1}}}",
            r.ops, r.bytes, r.cpu_s, r.wall_s, r.batches, r.meter_ns
        );
    }
}

fn die(msg: &str) -> ! {
    eprintln!("dataplane: {msg}");
    std::process::exit(2);
}

fn parse_mac(s: &str) -> [u8; 6] {
    let v: Vec<u8> = s
        .split(':')
        .map(|x| u8::from_str_radix(x, 16).unwrap_or_else(|_| die("bad --dst-mac")))
        .collect();
    v.try_into().unwrap_or_else(|_| die("bad --dst-mac"))
}

struct Outcome {
    ops: u64,
    bytes: u64,
    cpu_s: f64,
    wall_s: f64,
    /// Timed batches (see [`Meter`]), empty ones included.
    batches: u64,
    /// What the meter itself adds to each batch's CPU time ([`meter_cost_ns`]): the script
    /// subtracts it.
    meter_ns: f64,
}

/// The meter's own cost per batch, in ns: what one clock read adds to a measured interval
/// (the end of the read that starts it and the start of the read that ends it make one
/// read). Calibrated once per process, by the clock itself, over back-to-back reads. A
/// clock read is a system call (this clock has no vDSO path): ~0.3-0.6 µs here, more than
/// microvm's own work on a 64 KiB frame, so a batch of one or two frames would otherwise be
/// measured with it.
fn meter_cost_ns() -> f64 {
    static COST: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *COST.get_or_init(|| {
        const READS: u32 = 2000;
        let t0 = thread_cpu();
        for _ in 0..READS {
            std::hint::black_box(thread_cpu());
        }
        (thread_cpu() - t0).as_nanos() as f64 / f64::from(READS + 1)
    })
}

/// CPU time of the calling thread.
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec through the valid pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Page-aligned anonymous memory, the kind guest memory is. The plain loops use it rather
/// than a heap buffer: a heap buffer starts 16 bytes into a page, and the kernel's copy between
/// differently aligned buffers (page cache or skb to user memory) ran up to 40% slower here,
/// which made the "limit" slower than the handler for 1 MiB block reads.
struct Pool(vm_memory::MmapRegion);

impl Pool {
    fn new(len: usize) -> Self {
        Pool(vm_memory::MmapRegion::new(len).unwrap_or_else(|e| die(&format!("mmap: {e}"))))
    }

    fn as_mut_ptr(&mut self) -> *mut u8 {
        self.0.as_ptr()
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: the mapping is `size()` bytes, readable and writable, alive as long as
        // `self`, and no other reference to it exists while the returned one lives.
        unsafe { std::slice::from_raw_parts_mut(self.0.as_ptr(), self.0.size()) }
    }
}

fn check(ret: libc::c_int, what: &str) {
    if ret < 0 {
        die(&format!("{what}: {}", io::Error::last_os_error()));
    }
}

// ---------------------------------------------------------------- synthetic guest driver

/// The driver side of one split ring in guest memory.
struct Ring<'a> {
    mem: &'a GuestMemoryMmap,
    base: u64,
    /// Used entries already republished.
    seen: u16,
}

impl<'a> Ring<'a> {
    fn avail(&self) -> u64 {
        self.base + 16 * u64::from(QSIZE)
    }
    fn used(&self) -> u64 {
        (self.avail() + 6 + 2 * u64::from(QSIZE) + 3) & !3
    }

    /// A device-side queue over this ring.
    fn queue(&self) -> Queue {
        let mut q = Queue::new(QSIZE).unwrap();
        q.try_set_desc_table_address(GuestAddress(self.base)).unwrap();
        q.try_set_avail_ring_address(GuestAddress(self.avail())).unwrap();
        q.try_set_used_ring_address(GuestAddress(self.used())).unwrap();
        q.set_ready(true);
        q
    }

    fn desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = self.base + 16 * u64::from(i);
        self.mem.write_obj(addr, GuestAddress(at)).unwrap();
        self.mem.write_obj(len, GuestAddress(at + 8)).unwrap();
        self.mem.write_obj(flags, GuestAddress(at + 12)).unwrap();
        self.mem.write_obj(next, GuestAddress(at + 14)).unwrap();
    }

    fn publish(&self, head: u16) {
        let idx_at = GuestAddress(self.avail() + 2);
        let idx: u16 = self.mem.read_obj(idx_at).unwrap();
        let slot = GuestAddress(self.avail() + 4 + 2 * u64::from(idx % QSIZE));
        self.mem.write_obj(head, slot).unwrap();
        self.mem.write_obj(idx.wrapping_add(1), idx_at).unwrap();
    }

    /// Posts QSIZE one-buffer RX chains (chain i: RX buffer i).
    fn post_rx_buffers(&self) {
        for i in 0..QSIZE {
            self.desc(i, rx_buf_addr(i), RX_BUF as u32, F_WRITE, 0);
            self.publish(i);
        }
    }

    /// Republishes every newly used chain (after `f(head, used length)`); returns how many.
    fn recycle(&mut self, mut f: impl FnMut(u16, u32)) -> usize {
        let used_idx: u16 = self.mem.read_obj(GuestAddress(self.used() + 2)).unwrap();
        let mut n = 0;
        while self.seen != used_idx {
            let at = GuestAddress(self.used() + 4 + 8 * u64::from(self.seen % QSIZE));
            let head: u32 = self.mem.read_obj(at).unwrap();
            let len: u32 = self.mem.read_obj(GuestAddress(at.0 + 4)).unwrap();
            f(head as u16, len);
            self.publish(head as u16);
            self.seen = self.seen.wrapping_add(1);
            n += 1;
        }
        n
    }
}

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;

// ---------------------------------------------------------------- net

/// The TAP as microvm's VMM uses it (vmm/src/nics.rs): readv/writev on the fd.
struct Tap(OwnedFd);

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

impl NetBackend for Tap {
    unsafe fn read_frame_into(&mut self, iovs: &[libc::iovec]) -> io::Result<usize> {
        // SAFETY: the caller's guarantee: every iovec is writable for its length.
        let n = unsafe { libc::readv(self.0.as_raw_fd(), iovs.as_ptr(), iovs.len() as i32) };
        usize::try_from(n).map_err(|_| io::Error::last_os_error())
    }
    fn write_frame(&mut self, iovs: &[IoSlice]) -> io::Result<usize> {
        // SAFETY: IoSlice is ABI-compatible with iovec; each is readable for its length.
        let n = unsafe { libc::writev(self.0.as_raw_fd(), iovs.as_ptr().cast(), iovs.len() as i32) };
        usize::try_from(n).map_err(|_| io::Error::last_os_error())
    }
    fn set_offload(&mut self, flags: u32) -> io::Result<()> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value.
        let rc = unsafe { libc::ioctl(self.0.as_raw_fd(), libc::TUNSETOFFLOAD, libc::c_ulong::from(flags)) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

/// Opens the existing TAP `name` (created by the script with vnet_hdr), non-blocking, with
/// the 12-byte vnet header.
fn open_tap(name: &str) -> Tap {
    let mut config = tun::Configuration::default();
    config.tun_name(name).layer(tun::Layer::L2);
    config.platform_config(|p| {
        p.vnet_hdr(true);
        p.ensure_root_privileges(false);
    });
    let dev = tun::create(&config).unwrap_or_else(|e| die(&format!("TAP {name}: {e}")));
    // SAFETY: dup of the device's valid fd; the new fd is owned by OwnedFd alone.
    let fd = unsafe { libc::fcntl(dev.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) };
    check(fd, "dup");
    // SAFETY: fresh fd owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    drop(dev);
    let size: libc::c_int = VNET_HDR_LEN as libc::c_int;
    // SAFETY: TUNSETVNETHDRSZ reads one c_int through the pointer.
    check(unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETVNETHDRSZ, &size) }, "TUNSETVNETHDRSZ");
    // SAFETY: fcntl with integer arguments.
    let fl = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    // SAFETY: as above.
    check(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK) }, "O_NONBLOCK");
    Tap(fd)
}

/// A vnet header and an Ethernet/IPv4/TCP frame of `size` bytes after it (a 64 KiB one as a
/// TSO frame with a partial checksum, as a guest or the host stack hands them over).
fn make_frame(size: usize, src: [u8; 6], dst: [u8; 6]) -> Vec<u8> {
    let size = size.clamp(64, 14 + 65_535);
    let mut f = vec![0u8; VNET_HDR_LEN + size];
    let tso = size > 1514;
    if tso {
        f[0] = 1; // NEEDS_CSUM
        f[1] = 1; // GSO_TCPV4
        f[2..4].copy_from_slice(&54u16.to_le_bytes()); // hdr_len
        f[4..6].copy_from_slice(&1448u16.to_le_bytes()); // gso_size
        f[6..8].copy_from_slice(&34u16.to_le_bytes()); // csum_start
        f[8..10].copy_from_slice(&16u16.to_le_bytes()); // csum_offset
    }
    let e = &mut f[VNET_HDR_LEN..];
    e[0..6].copy_from_slice(&dst);
    e[6..12].copy_from_slice(&src);
    e[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    let ip = &mut e[14..34];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&((size - 14) as u16).to_be_bytes());
    ip[8] = 64;
    ip[9] = 6;
    ip[12..16].copy_from_slice(&[10, 0, 0, 1]);
    ip[16..20].copy_from_slice(&[10, 0, 0, 2]);
    let mut sum = 0u32;
    for c in ip.chunks(2) {
        sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    ip[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    let tcp = &mut e[34..54];
    tcp[0..2].copy_from_slice(&40000u16.to_be_bytes());
    tcp[2..4].copy_from_slice(&5201u16.to_be_bytes());
    tcp[12] = 0x50;
    tcp[13] = 0x10; // ACK
    f
}

fn net(taps: &[String], src: &str, dir: &str, size: usize, imp: &str, secs: f64, dst: [u8; 6]) -> Vec<Outcome> {
    let stop = Arc::new(AtomicBool::new(false));
    let consumed: Arc<Vec<AtomicU64>> = Arc::new(taps.iter().map(|_| AtomicU64::new(0)).collect());
    let generator = (dir == "rx").then(|| {
        let (stop, consumed) = (stop.clone(), consumed.clone());
        let (src, n) = (src.to_string(), taps.len());
        std::thread::spawn(move || generate(&src, n, size, &stop, &consumed))
    });
    let workers: Vec<_> = taps
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let mut tap = open_tap(name);
            // The offloads a Linux guest accepts, for the handler and the plain loop alike.
            tap.set_offload(tun_offload_flags(net_features()))
                .unwrap_or_else(|e| die(&format!("TUNSETOFFLOAD: {e}")));
            let (stop, consumed) = (stop.clone(), consumed.clone());
            let (dir, imp) = (dir.to_string(), imp.to_string());
            let src = nic_mac(i);
            std::thread::spawn(move || {
                let counter = &consumed[i];
                match (dir.as_str(), imp.as_str()) {
                    ("tx", "plain") => plain_tx(tap, size, src, dst, &stop),
                    ("tx", _) => handler_tx(tap, size, src, dst, &stop),
                    ("rx", "plain") => plain_rx(tap, &stop, counter),
                    ("rx", i) => handler_rx(tap, i != "copy", &stop, counter),
                    _ => die("bad --dir/--impl"),
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs_f64(secs));
    stop.store(true, Ordering::Relaxed);
    let out = workers.into_iter().map(|w| w.join().unwrap()).collect();
    if let Some(g) = generator {
        g.join().unwrap();
    }
    out
}

/// RX source: writes frames into the source TAP, a port of the same bridge as the measured
/// TAPs; the bridge forwards each (static FDB entry for its destination MAC) into the
/// measured TAP's queue, which its worker reads. At most INFLIGHT frames per TAP are queued
/// ahead of what its worker took.
fn generate(src: &str, n: usize, size: usize, stop: &AtomicBool, consumed: &[AtomicU64]) {
    let src = open_tap(src);
    let frames: Vec<Vec<u8>> = (0..n).map(|i| make_frame(size, [2, 0, 0, 0, 0, 1], nic_mac(i))).collect();
    let mut sent = vec![0u64; n];
    let mut stalled_since = vec![None::<Instant>; n];
    let mut warned = false;
    while !stop.load(Ordering::Relaxed) {
        let mut progress = false;
        for (i, frame) in frames.iter().enumerate() {
            let done = consumed[i].load(Ordering::Relaxed);
            if sent[i] >= done + INFLIGHT {
                // A frame the bridge or TAP dropped is never consumed: after 20 ms without
                // progress, count the queue as drained.
                let t = *stalled_since[i].get_or_insert_with(Instant::now);
                if t.elapsed() > Duration::from_millis(20) {
                    sent[i] = done;
                    stalled_since[i] = None;
                }
                continue;
            }
            stalled_since[i] = None;
            // SAFETY: `frame` is readable for its length.
            let n = unsafe { libc::write(src.as_raw_fd(), frame.as_ptr().cast(), frame.len()) };
            if n > 0 {
                sent[i] += 1;
                progress = true;
            } else if !warned {
                warned = true;
                eprintln!("dataplane: generator: write: {}", io::Error::last_os_error());
            }
        }
        if !progress {
            std::thread::yield_now();
        }
    }
}

/// The MAC of measured NIC `i` (the script adds a static FDB entry for it on its TAP).
fn nic_mac(i: usize) -> [u8; 6] {
    [2, 0, 0, 0, 1, i as u8]
}

fn wait_readable(fd: RawFd) {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    unsafe { libc::poll(&mut p, 1, 5) };
}

/// Measures the data-plane work only: thread CPU time from before to after each batch of
/// it (the handler's `process_*` call; the plain loop's syscalls for as many operations). The
/// synthetic guest driver's part (posting buffers, reading used rings: a guest's vCPUs do
/// that) and the waits for work are not counted. Two clock reads per batch, for both; their
/// share ([`meter_cost_ns`] per batch) is reported with the batch count, and subtracted.
struct Meter {
    start: Instant,
    busy: Duration,
    batches: u64,
}

impl Meter {
    fn new() -> Self {
        meter_cost_ns();
        Meter { start: Instant::now(), busy: Duration::ZERO, batches: 0 }
    }

    fn time<T>(&mut self, work: impl FnOnce() -> T) -> T {
        let t = thread_cpu();
        let out = work();
        self.busy += thread_cpu() - t;
        self.batches += 1;
        out
    }

    fn finish(self, ops: u64, bytes: u64) -> Outcome {
        Outcome {
            ops,
            bytes,
            cpu_s: self.busy.as_secs_f64(),
            wall_s: self.start.elapsed().as_secs_f64(),
            batches: self.batches,
            meter_ns: meter_cost_ns(),
        }
    }
}

/// Guest-sized buffers a largest frame needs.
const MAX_FRAME_BUFS: usize = MAX_FRAME_LEN.div_ceil(RX_BUF);

/// The plain loops' RX memory: QSIZE buffers of RX_BUF bytes (as much as the guest posts),
/// used in turn, and room after the last for a frame that starts there.
struct RxPool {
    pool: Pool,
    at: usize,
}

impl RxPool {
    const RING: usize = QSIZE as usize * RX_BUF;

    fn new() -> Self {
        RxPool { pool: Pool::new(Self::RING + MAX_FRAME_BUFS * RX_BUF), at: 0 }
    }

    /// One `readv` of the next frame into `bufs` consecutive buffers from the current one:
    /// the shape of the guest's buffers, as many as the case's largest frame needs (the
    /// handler's window holds as many). Returns where the frame is and its length.
    fn read(&mut self, fd: RawFd, bufs: usize) -> Option<(*const u8, usize)> {
        debug_assert!(bufs <= MAX_FRAME_BUFS);
        let base = self.pool.as_mut_ptr();
        let mut iovs = [libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 }; MAX_FRAME_BUFS];
        for (i, iov) in iovs.iter_mut().take(bufs).enumerate() {
            // at < RING and i < MAX_FRAME_BUFS: inside the pool (see `new`).
            iov.iov_base = base.wrapping_add(self.at + i * RX_BUF).cast();
            iov.iov_len = RX_BUF;
        }
        // SAFETY: the first `bufs` iovecs point into the pool, alive and unborrowed during
        // the call.
        let n = unsafe { libc::readv(fd, iovs.as_ptr(), bufs as i32) };
        let n = usize::try_from(n).ok().filter(|&n| n > 0)?;
        let frame = base.wrapping_add(self.at).cast_const();
        self.at = (self.at + n.next_multiple_of(RX_BUF)) % Self::RING;
        Some((frame, n))
    }

    /// Copies `frame` into the next buffers: `read` without the kernel (see `mem.rs`).
    fn copy_in(&mut self, frame: &[u8]) {
        assert!(frame.len() <= MAX_FRAME_BUFS * RX_BUF);
        // SAFETY: at < RING and the frame fits MAX_FRAME_BUFS buffers: inside the pool (see
        // `new`), which nothing else borrows.
        unsafe { std::ptr::copy_nonoverlapping(frame.as_ptr(), self.pool.as_mut_ptr().add(self.at), frame.len()) };
        self.at = (self.at + frame.len().next_multiple_of(RX_BUF)) % Self::RING;
    }
}

fn plain_rx(tap: Tap, stop: &AtomicBool, consumed: &AtomicU64) -> Outcome {
    // Frames from the bridge are at most 1514 bytes (see `generate`): one buffer each.
    let bufs = (VNET_HDR_LEN + 1514).div_ceil(RX_BUF);
    let mut pool = RxPool::new();
    let mut m = Meter::new();
    let (mut ops, mut bytes) = (0u64, 0u64);
    while !stop.load(Ordering::Relaxed) {
        // A batch: until the TAP is empty or RX_BUDGET frames, as the handler's.
        let (n, b) = m.time(|| {
            let (mut n, mut b) = (0u64, 0u64);
            while n < RX_BUDGET as u64 {
                let Some((_, len)) = pool.read(tap.as_raw_fd(), bufs) else {
                    break;
                };
                n += 1;
                b += (len - VNET_HDR_LEN) as u64;
            }
            (n, b)
        });
        ops += n;
        bytes += b;
        consumed.fetch_add(n, Ordering::Relaxed);
        if n == 0 {
            wait_readable(tap.as_raw_fd());
        }
    }
    m.finish(ops, bytes)
}

/// VERSION_1, MRG_RXBUF, GUEST_CSUM, GUEST_TSO4: what a Linux guest acks (of what matters).
fn net_features() -> u64 {
    [
        VIRTIO_F_VERSION_1,
        VIRTIO_NET_F_MRG_RXBUF,
        VIRTIO_NET_F_GUEST_CSUM,
        VIRTIO_NET_F_GUEST_TSO4,
    ]
    .iter()
    .fold(0u64, |a, b| a | 1 << b)
}

fn net_handler(mem: &GuestMemoryMmap, rx: &Ring, tx: &Ring, tap: Tap) -> NetHandler {
    net_handler_with(mem, rx, tx, Box::new(tap))
}

fn net_handler_with(mem: &GuestMemoryMmap, rx: &Ring, tx: &Ring, backend: Box<dyn NetBackend>) -> NetHandler {
    NetHandler::new(
        mem.clone(),
        [rx.queue(), tx.queue()],
        [EventFd::new(EFD_NONBLOCK).unwrap(), EventFd::new(EFD_NONBLOCK).unwrap()],
        Arc::new(IrqTrigger::new().unwrap()),
        backend,
        net_features(),
        Arc::new(GuestLog::new("virtio-net")),
    )
}

/// Guest memory of the RX cases (rings and QSIZE buffers of RX_BUF bytes).
fn rx_guest_memory() -> GuestMemoryMmap {
    GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x200_0000)]).unwrap()
}

/// Guest address of RX buffer `head` (chain `head` is that one buffer).
fn rx_buf_addr(head: u16) -> u64 {
    BUFS + u64::from(head) * RX_BUF as u64
}

/// The outcome of an RX handler run; a dropped frame or bad chain fails the run.
fn rx_outcome(h: &NetHandler, m: Meter) -> Outcome {
    let s = h.stats();
    if s.rx_dropped + s.rx_bad_chains > 0 {
        die(&format!("RX dropped frames: {s:?}"));
    }
    m.finish(s.rx_frames, s.rx_bytes)
}

fn handler_rx(tap: Tap, zero_copy: bool, stop: &AtomicBool, consumed: &AtomicU64) -> Outcome {
    let mem = rx_guest_memory();
    let mut rx = Ring { mem: &mem, base: RX_RING, seen: 0 };
    let tx = Ring { mem: &mem, base: TX_RING, seen: 0 };
    rx.post_rx_buffers();
    let fd = tap.as_raw_fd();
    let mut h = net_handler(&mem, &rx, &tx, tap);
    h.set_rx_zero_copy(zero_copy);
    let mut m = Meter::new();
    let mut frames = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let st = m.time(|| h.process_rx());
        rx.recycle(|_, _| {});
        let now = h.stats().rx_frames;
        consumed.fetch_add(now - frames, Ordering::Relaxed);
        frames = now;
        if st.completed == 0 {
            wait_readable(fd);
        }
    }
    rx_outcome(&h, m)
}

fn handler_tx(tap: Tap, size: usize, src: [u8; 6], dst: [u8; 6], stop: &AtomicBool) -> Outcome {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1400_0000)]).unwrap();
    let rx = Ring { mem: &mem, base: RX_RING, seen: 0 };
    let mut tx = Ring { mem: &mem, base: TX_RING, seen: 0 };
    let frame = make_frame(size, src, dst);
    let stride = (MAX_FRAME_LEN as u64 + 0xfff) & !0xfff;
    for i in 0..QSIZE {
        let at = BUFS + u64::from(i) * stride;
        mem.write_slice(&frame, GuestAddress(at)).unwrap();
        tx.desc(i, at, frame.len() as u32, 0, 0);
        tx.publish(i);
    }
    let mut h = net_handler(&mem, &rx, &tx, tap);
    let mut m = Meter::new();
    while !stop.load(Ordering::Relaxed) {
        m.time(|| h.process_tx());
        tx.recycle(|_, _| {});
    }
    let s = h.stats();
    if s.tx_dropped > 0 {
        die(&format!("TX dropped frames: {s:?}"));
    }
    m.finish(s.tx_frames, s.tx_bytes)
}

fn plain_tx(tap: Tap, size: usize, src: [u8; 6], dst: [u8; 6], stop: &AtomicBool) -> Outcome {
    // The same memory as the guest's: QSIZE copies of the frame, sent in turn.
    let frame = make_frame(size, src, dst);
    let stride = (MAX_FRAME_LEN + 0xfff) & !0xfff;
    let mut mapping = Pool::new(usize::from(QSIZE) * stride);
    let pool = mapping.as_mut_slice();
    for i in 0..usize::from(QSIZE) {
        pool[i * stride..i * stride + frame.len()].copy_from_slice(&frame);
    }
    let mut m = Meter::new();
    let mut ops = 0u64;
    while !stop.load(Ordering::Relaxed) {
        // A batch of TX_BUDGET frames, as the handler's.
        m.time(|| {
            for _ in 0..TX_BUDGET {
                let at = (ops as usize % usize::from(QSIZE)) * stride;
                let iov = [IoSlice::new(&pool[at..at + frame.len()])];
                // SAFETY: IoSlice is ABI-compatible with iovec and readable for its length.
                let n = unsafe { libc::writev(tap.as_raw_fd(), iov.as_ptr().cast(), 1) };
                if n < 0 {
                    die(&format!("writev: {}", io::Error::last_os_error()));
                }
                ops += 1;
            }
        });
    }
    m.finish(ops, ops * (frame.len() - VNET_HDR_LEN) as u64)
}
