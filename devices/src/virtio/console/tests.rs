//! Device-level tests: Console behind an MmioTransport, the event manager on its own thread,
//! pipes as host backends; the test plays the guest driver (control handshake, buffers).

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::control::*;
use super::*;
use crate::virtio::test_utils::{
    driver_init, guest_memory, poll_in, wait_irq, EventLoop, TestQueue, D,
};
use crate::virtio::{MmioTransport, VirtioDevice, TYPE_CONSOLE, VIRTIO_F_VERSION_1};

const MEM_SIZE: usize = 0x100_0000;
const BUF_BASE: u64 = 0x20_0000;
const CTRL_BUFS: u16 = 32;

/// A pipe: (read end, write end).
fn pipe() -> (std::fs::File, std::fs::File) {
    let mut fds = [-1 as RawFd; 2];
    // SAFETY: pipe2 writes two fds into the 2-element array on success; checked.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: both fds were just created and are owned by nobody else.
    unsafe {
        (
            std::fs::File::from_raw_fd(fds[0]),
            std::fs::File::from_raw_fd(fds[1]),
        )
    }
}

fn input(f: std::fs::File) -> Option<Box<dyn ConsoleInput>> {
    Some(Box::new(FdInput::new(OwnedFd::from(f)).unwrap()))
}

fn output(f: std::fs::File) -> Option<Box<dyn ConsoleOutput>> {
    Some(Box::new(FdOutput::new(OwnedFd::from(f)).unwrap()))
}

fn port(
    name: &str,
    input: Option<Box<dyn ConsoleInput>>,
    output: Option<Box<dyn ConsoleOutput>>,
) -> PortConfig {
    PortConfig {
        name: name.into(),
        input,
        output,
    }
}

/// A control message as the guest sees it: (id, event, value, extra bytes).
type Msg = (u32, u16, u16, Vec<u8>);

/// The guest driver's side.
struct Guest<'m> {
    mem: &'m GuestMemoryMmap,
    t: MmioTransport,
    flush: ConsoleFlush,
    queues: Vec<TestQueue<'m>>,
    next_desc: Vec<u16>,
    next_buf: u64,
    /// Control RX buffers by head index.
    ctrl_bufs: HashMap<u16, u64>,
    ctrl_seen: u16,
    /// RX buffers by (queue, head).
    rx_bufs: HashMap<(usize, u16), u64>,
    rx_seen: HashMap<usize, u16>,
}

impl<'m> Guest<'m> {
    fn new(mem: &'m GuestMemoryMmap, ev: &EventLoop, ports: Vec<PortConfig>) -> Self {
        let n = ports.len();
        let console = Console::new(ports, ev.endpoint.clone()).unwrap();
        let flush = console.flush_handle();
        let t = MmioTransport::new(mem.clone(), Box::new(console)).unwrap();
        let queues: Vec<TestQueue> = (0..2 * n + 2)
            .map(|i| TestQueue::new(mem, i as u64 * 0x1_0000, QUEUE_SIZE))
            .collect();
        let mut g = Guest {
            mem,
            t,
            flush,
            next_desc: vec![0; queues.len()],
            queues,
            next_buf: BUF_BASE,
            ctrl_bufs: HashMap::new(),
            ctrl_seen: 0,
            rx_bufs: HashMap::new(),
            rx_seen: HashMap::new(),
        };
        let features = (1u64 << VIRTIO_F_VERSION_1) | (1u64 << VIRTIO_CONSOLE_F_MULTIPORT);
        let qs: Vec<&TestQueue> = g.queues.iter().collect();
        driver_init(&mut g.t, features, &qs);
        assert!(g.t.device().is_activated());
        for _ in 0..CTRL_BUFS {
            let addr = g.alloc(256);
            let head = g.chain(CONTROL_RX_INDEX, &[(addr, 256, true)]);
            g.ctrl_bufs.insert(head, addr);
        }
        g
    }

    fn alloc(&mut self, len: u64) -> u64 {
        let a = self.next_buf;
        self.next_buf += len.next_multiple_of(64);
        assert!(self.next_buf < MEM_SIZE as u64);
        a
    }

    /// Publishes a chain on queue `q`; returns its head. Descriptor indexes wrap: the test
    /// must not have more than a queue size of descriptors in flight.
    fn chain(&mut self, q: usize, descs: &[D]) -> u16 {
        let n = descs.len() as u16;
        if self.next_desc[q] + n > QUEUE_SIZE {
            self.next_desc[q] = 0;
        }
        let head = self.next_desc[q];
        self.queues[q].add_chain(head, descs);
        self.next_desc[q] += n;
        head
    }

    fn kick(&self, q: usize) {
        self.t.queue_evts()[q].write(1).unwrap();
    }

    /// Waits until `cond` holds, or fails after 5 s.
    #[track_caller]
    fn wait(&self, what: &str, mut cond: impl FnMut(&Self) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !cond(self) {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            wait_irq(self.t.irq_evt());
        }
    }

    fn used(&self, q: usize) -> u16 {
        self.queues[q].used.idx()
    }

    fn send_control(&mut self, id: u32, event: u16, value: u16) {
        let addr = self.alloc(8);
        let mut m = [0u8; 8];
        m[..4].copy_from_slice(&id.to_le_bytes());
        m[4..6].copy_from_slice(&event.to_le_bytes());
        m[6..].copy_from_slice(&value.to_le_bytes());
        self.mem.write_slice(&m, GuestAddress(addr)).unwrap();
        self.chain(CONTROL_TX_INDEX, &[(addr, 8, false)]);
        self.kick(CONTROL_TX_INDEX);
    }

    /// Waits for `count` more control messages from the device.
    #[track_caller]
    fn control(&mut self, count: u16) -> Vec<Msg> {
        let want = self.ctrl_seen + count;
        self.wait("control messages", |g| g.used(CONTROL_RX_INDEX) >= want);
        let mut out = Vec::new();
        for i in self.ctrl_seen..want {
            let (head, len) = self.queues[CONTROL_RX_INDEX].used.entry(i);
            let addr = self.ctrl_bufs[&(head as u16)];
            let mut b = vec![0u8; len as usize];
            self.mem.read_slice(&mut b, GuestAddress(addr)).unwrap();
            assert!(b.len() >= 8, "short control message {b:?}");
            out.push((
                u32::from_le_bytes(b[..4].try_into().unwrap()),
                u16::from_le_bytes(b[4..6].try_into().unwrap()),
                u16::from_le_bytes(b[6..8].try_into().unwrap()),
                b[8..].to_vec(),
            ));
        }
        self.ctrl_seen = want;
        out
    }

    /// DEVICE_READY, then PORT_READY for each of the `n` ports; checks the answers.
    fn handshake(&mut self, names: &[&str]) {
        self.send_control(0xffff_ffff, DEVICE_READY, 1);
        let adds = self.control(names.len() as u16);
        let want: Vec<Msg> = (0..names.len() as u32)
            .map(|i| (i, DEVICE_ADD, 0, vec![]))
            .collect();
        assert_eq!(adds, want);
        for (i, name) in names.iter().enumerate() {
            self.send_control(i as u32, PORT_READY, 1);
            let msgs = self.control(2);
            assert_eq!(
                msgs,
                vec![
                    (i as u32, PORT_NAME, 1, name.as_bytes().to_vec()),
                    (i as u32, PORT_OPEN, 1, vec![]),
                ]
            );
        }
    }

    /// Posts `count` receive buffers of `len` bytes on port `p`.
    fn rx_buffers(&mut self, p: usize, count: usize, len: u32) {
        let q = rx_queue_index(p);
        for _ in 0..count {
            let addr = self.alloc(u64::from(len));
            let head = self.chain(q, &[(addr, len, true)]);
            self.rx_bufs.insert((q, head), addr);
        }
        self.kick(q);
    }

    /// Bytes the device put in port `p`'s receive buffers since the last call.
    fn rx_data(&mut self, p: usize) -> Vec<u8> {
        let q = rx_queue_index(p);
        let seen = self.rx_seen.entry(q).or_default();
        let mut out = Vec::new();
        while *seen != self.queues[q].used.idx() {
            let (head, len) = self.queues[q].used.entry(*seen);
            let mut b = vec![0u8; len as usize];
            let addr = self.rx_bufs[&(q, head as u16)];
            self.mem.read_slice(&mut b, GuestAddress(addr)).unwrap();
            out.extend_from_slice(&b);
            *seen += 1;
        }
        out
    }

    /// Publishes `data` on port `p`'s transmit queue as chains of `chain_len` bytes, each
    /// split over descriptors of at most `desc_len` bytes. Returns the number of chains.
    fn transmit(&mut self, p: usize, data: &[u8], chain_len: usize, desc_len: usize) -> u16 {
        let q = tx_queue_index(p);
        let mut chains = 0;
        for c in data.chunks(chain_len) {
            let descs: Vec<D> = c
                .chunks(desc_len)
                .map(|d| {
                    let addr = self.alloc(d.len() as u64);
                    self.mem.write_slice(d, GuestAddress(addr)).unwrap();
                    (addr, d.len() as u32, false)
                })
                .collect();
            self.chain(q, &descs);
            chains += 1;
        }
        self.kick(q);
        chains
    }
}

/// Reads from `f` until `n` bytes came, or fails after 5 s.
fn read_exactly(f: &mut std::fs::File, n: usize) -> Vec<u8> {
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    while out.len() < n {
        assert!(Instant::now() < deadline, "got {} of {n} bytes", out.len());
        if !poll_in(f.as_raw_fd(), 100) {
            continue;
        }
        let mut b = vec![0u8; n - out.len()];
        let got = f.read(&mut b).unwrap();
        assert!(got > 0, "pipe closed after {} bytes", out.len());
        out.extend_from_slice(&b[..got]);
    }
    out
}

/// Byte-exact comparison that reports the first difference instead of both buffers.
#[track_caller]
fn assert_same(got: &[u8], want: &[u8]) {
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!(
            "byte {i} differs: got {:?}, want {:?}",
            &got[i..(i + 16).min(got.len())],
            &want[i..(i + 16).min(want.len())]
        );
    }
    assert_eq!(got.len(), want.len(), "lengths differ");
}

fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 8) as u8)
        .collect()
}

#[test]
fn config_space_features_and_bad_configs() {
    let ev = EventLoop::start();
    let ports = vec![port("a", None, None), port("b.c-d_1", None, None)];
    let c = Console::new(ports, ev.endpoint.clone()).unwrap();
    assert_eq!(c.device_type(), TYPE_CONSOLE);
    assert_eq!(c.queue_max_sizes().len(), 6);
    assert_ne!(c.avail_features() & (1 << VIRTIO_CONSOLE_F_MULTIPORT), 0);
    let mut v = [0u8; 4];
    c.read_config(4, &mut v);
    assert_eq!(u32::from_le_bytes(v), 2);

    for names in [vec![], vec!["x"; MAX_PORTS + 1]] {
        let ports = names.iter().map(|n| port(n, None, None)).collect();
        assert!(matches!(
            Console::new(ports, ev.endpoint.clone()),
            Err(ConsoleError::PortCount(_))
        ));
    }
    let long = "n".repeat(MAX_NAME_LEN + 1);
    for bad in [
        vec!["", "a"],
        vec!["a/b"],
        vec!["a", "a"],
        vec![long.as_str()],
    ] {
        let ports = bad.iter().map(|n| port(n, None, None)).collect();
        assert!(matches!(
            Console::new(ports, ev.endpoint.clone()),
            Err(ConsoleError::BadName(_))
        ));
    }
}

#[test]
fn handshake_names_the_ports_and_opens_them() {
    let ev = EventLoop::start();
    let mem = guest_memory(MEM_SIZE);
    let (_r, w) = pipe();
    let ports = vec![
        port("stdin", None, None),
        port("stdout", None, output(w)),
        port("stderr", None, None),
    ];
    let mut g = Guest::new(&mem, &ev, ports);
    g.handshake(&["stdin", "stdout", "stderr"]);
    // A second DEVICE_READY or PORT_READY adds nothing.
    g.send_control(0, DEVICE_READY, 1);
    g.send_control(1, PORT_READY, 1);
    g.wait("control TX", |g| g.used(CONTROL_TX_INDEX) == 6);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(
        g.used(CONTROL_RX_INDEX),
        9,
        "3 DEVICE_ADD, 3 PORT_NAME, 3 PORT_OPEN"
    );
}

#[test]
fn guest_output_arrives_in_order() {
    let ev = EventLoop::start();
    let mem = guest_memory(MEM_SIZE);
    let (mut r, w) = pipe();
    let mut g = Guest::new(&mem, &ev, vec![port("stdout", None, output(w))]);
    g.handshake(&["stdout"]);
    let data = pattern(20_000, 7);
    // Chains of 3000 bytes over descriptors of 1000, 1000 and 1000 bytes (the last shorter).
    let chains = g.transmit(0, &data, 3000, 1000);
    let got = read_exactly(&mut r, data.len());
    assert_same(&got, &data);
    g.wait("TX used", |g| g.used(tx_queue_index(0)) == chains);
}

/// An output that takes at most 7 bytes per write, over a pipe.
struct Trickle(FdOutput);

impl AsRawFd for Trickle {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

impl ConsoleOutput for Trickle {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.write(&buf[..buf.len().min(7)])
    }
}

#[test]
fn slow_reader_holds_the_guest_back_without_buffering() {
    let ev = EventLoop::start();
    let mem = guest_memory(MEM_SIZE);
    let (mut r, w) = pipe();
    // The smallest pipe: one page.
    // SAFETY: fcntl on a valid fd with an integer argument.
    let size = unsafe { libc::fcntl(w.as_raw_fd(), libc::F_SETPIPE_SZ, 4096) };
    assert!(size >= 4096);
    let size = size as usize;
    let out = Trickle(FdOutput::new(OwnedFd::from(w)).unwrap());
    let mut g = Guest::new(&mem, &ev, vec![port("stdout", None, Some(Box::new(out)))]);
    g.handshake(&["stdout"]);
    let data = pattern(48 * 1024, 3);
    // 48 chains of two descriptors: all in the queue at once.
    let chains = g.transmit(0, &data, 1024, 512);
    assert_eq!(chains, 48);

    // Nobody reads: the pipe fills, and the device stops taking chains.
    let q = tx_queue_index(0);
    let start = Instant::now();
    let mut last = u16::MAX;
    while start.elapsed() < Duration::from_millis(300) {
        last = g.used(q);
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        usize::from(last) * 1024 <= size,
        "{last} chains of 1 KiB used with a {size}-byte pipe and no reader"
    );
    assert!(last < chains);

    // Read slowly, in small pieces: everything comes, in order.
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while got.len() < data.len() {
        assert!(Instant::now() < deadline, "stalled at {} bytes", got.len());
        if poll_in(r.as_raw_fd(), 100) {
            let mut b = [0u8; 1000];
            let n = r.read(&mut b).unwrap();
            got.extend_from_slice(&b[..n]);
        }
        // While bytes are still missing, some chains are still in the guest's queue (or held
        // by the device): at most one chain beyond what fits in the pipe.
        let used = usize::from(g.used(q));
        assert!(
            used * 1024 <= got.len() + size + 1024,
            "{used} chains used, {} bytes read",
            got.len()
        );
    }
    assert_same(&got, &data);
    g.wait("all TX used", |g| g.used(q) == chains);
}

#[test]
fn host_input_reaches_the_guest_then_eof() {
    let ev = EventLoop::start();
    let mem = guest_memory(MEM_SIZE);
    let (r, mut w) = pipe();
    let mut g = Guest::new(&mem, &ev, vec![port("stdin", input(r), None)]);
    g.handshake(&["stdin"]);
    let first = pattern(100, 1);
    w.write_all(&first).unwrap();
    // Not read while the guest has not opened the port (Linux would discard it).
    g.rx_buffers(0, 4, 64);
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(g.used(rx_queue_index(0)), 0);

    g.send_control(0, PORT_OPEN, 1);
    g.wait("RX data", |g| g.used(rx_queue_index(0)) >= 2);
    assert_eq!(g.rx_data(0), first);

    // No buffers left for more than 2 more chains: the rest waits for the guest.
    let second = pattern(300, 2);
    w.write_all(&second).unwrap();
    g.wait("RX data", |g| g.used(rx_queue_index(0)) >= 4);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(g.used(rx_queue_index(0)), 4);
    let mut got = g.rx_data(0);
    assert_eq!(got, second[..128]);
    g.rx_buffers(0, 8, 64);
    drop(w);
    // The rest, then the host side closes: PORT_OPEN 0 after the data.
    let eof = g.control(1);
    assert_eq!(eof, vec![(0, PORT_OPEN, 0, vec![])]);
    got.extend(g.rx_data(0));
    assert_same(&got, &second);
    // Nothing more is delivered, no further message.
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(g.used(CONTROL_RX_INDEX), g.ctrl_seen);
}

#[test]
fn hostile_guest_is_survived() {
    let ev = EventLoop::start();
    let mem = guest_memory(MEM_SIZE);
    let (mut out_r, out_w) = pipe();
    let (in_r, mut in_w) = pipe();
    let mut g = Guest::new(&mem, &ev, vec![port("io", input(in_r), output(out_w))]);
    // Control messages before DEVICE_READY, with bad ids, short, writable, outside memory.
    g.send_control(5, PORT_READY, 1);
    g.send_control(0, PORT_OPEN, 1);
    g.send_control(0, 999, 1);
    let a = g.alloc(8);
    g.chain(CONTROL_TX_INDEX, &[(a, 4, false)]);
    g.chain(CONTROL_TX_INDEX, &[(a, 8, true)]);
    g.chain(CONTROL_TX_INDEX, &[(MEM_SIZE as u64 - 4, 8, false)]);
    g.chain(CONTROL_TX_INDEX, &[(u64::MAX - 2, 8, false)]);
    g.kick(CONTROL_TX_INDEX);
    g.wait("bad control messages", |g| g.used(CONTROL_TX_INDEX) == 7);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(g.used(CONTROL_RX_INDEX), 0, "nothing answered");

    g.handshake(&["io"]);
    g.send_control(0, PORT_OPEN, 1);
    // Bad TX chains: a writable descriptor, outside memory, a zero-length one, too long.
    let tx = tx_queue_index(0);
    g.chain(tx, &[(a, 8, false), (a, 8, true)]);
    g.chain(tx, &[(MEM_SIZE as u64, 16, false)]);
    g.chain(tx, &[(a, 0, false)]);
    g.chain(tx, &[(BUF_BASE, MAX_TX_CHAIN as u32 + 1, false)]);
    // Bad RX chains: readable, outside memory.
    let rx = rx_queue_index(0);
    g.chain(rx, &[(a, 8, false)]);
    g.chain(rx, &[(MEM_SIZE as u64 - 8, 64, true)]);
    g.kick(tx);
    g.kick(rx);
    g.wait("bad chains returned", |g| g.used(tx) == 4);
    in_w.write_all(b"hello").unwrap();
    g.wait("bad RX chains returned", |g| g.used(rx) == 2);
    for i in 0..2 {
        assert_eq!(g.queues[rx].used.entry(i).1, 0);
    }
    // The device still works both ways.
    g.transmit(0, b"still here", 100, 100);
    assert_eq!(read_exactly(&mut out_r, 10), b"still here");
    g.rx_buffers(0, 1, 64);
    g.wait("RX", |g| g.used(rx) == 3);
    let (head, len) = g.queues[rx].used.entry(2);
    assert_eq!(len, 5);
    let mut b = [0u8; 5];
    mem.read_slice(&mut b, GuestAddress(g.rx_bufs[&(rx, head as u16)]))
        .unwrap();
    assert_eq!(&b, b"hello");
}

#[test]
fn closed_output_discards_instead_of_blocking_the_guest() {
    let ev = EventLoop::start();
    let mem = guest_memory(MEM_SIZE);
    let (r, w) = pipe();
    let mut g = Guest::new(&mem, &ev, vec![port("stdout", None, output(w))]);
    g.handshake(&["stdout"]);
    drop(r);
    let chains = g.transmit(0, &pattern(10_000, 0), 1000, 1000);
    g.wait("TX used", |g| g.used(tx_queue_index(0)) == chains);
}

#[test]
fn reset_gives_the_backends_back_for_a_second_life() {
    let ev = EventLoop::start();
    let mem = guest_memory(MEM_SIZE);
    let (mut r, w) = pipe();
    let mut g = Guest::new(&mem, &ev, vec![port("stdout", None, output(w))]);
    g.handshake(&["stdout"]);
    g.transmit(0, b"one", 100, 100);
    assert_eq!(read_exactly(&mut r, 3), b"one");
    crate::virtio::test_utils::w(&mut g.t, crate::virtio::mmio::REG_STATUS, 0);
    assert!(!g.t.device().is_activated());

    // The same transport, new rings.
    let queues: Vec<TestQueue> = (0..4)
        .map(|i| TestQueue::new(&mem, 0x10_0000 + i as u64 * 0x1_0000, QUEUE_SIZE))
        .collect();
    let features = (1u64 << VIRTIO_F_VERSION_1) | (1u64 << VIRTIO_CONSOLE_F_MULTIPORT);
    let qs: Vec<&TestQueue> = queues.iter().collect();
    driver_init(&mut g.t, features, &qs);
    assert!(g.t.device().is_activated());
    g.queues = queues;
    g.next_desc = vec![0; 4];
    g.ctrl_seen = 0;
    g.ctrl_bufs.clear();
    for _ in 0..CTRL_BUFS {
        let addr = g.alloc(256);
        let head = g.chain(CONTROL_RX_INDEX, &[(addr, 256, true)]);
        g.ctrl_bufs.insert(head, addr);
    }
    g.handshake(&["stdout"]);
    g.transmit(0, b"two", 100, 100);
    assert_eq!(read_exactly(&mut r, 3), b"two");
}

#[test]
fn without_multiport_the_device_refuses_to_start() {
    let ev = EventLoop::start();
    let mem = guest_memory(MEM_SIZE);
    let c = Console::new(vec![port("a", None, None)], ev.endpoint.clone()).unwrap();
    let mut t = MmioTransport::new(mem.clone(), Box::new(c)).unwrap();
    let queues: Vec<TestQueue> = (0..4)
        .map(|i| TestQueue::new(&mem, i as u64 * 0x1_0000, QUEUE_SIZE))
        .collect();
    let qs: Vec<&TestQueue> = queues.iter().collect();
    driver_init(&mut t, 1u64 << VIRTIO_F_VERSION_1, &qs);
    assert!(!t.device().is_activated());
    let status = crate::virtio::test_utils::r(&mut t, crate::virtio::mmio::REG_STATUS);
    assert_ne!(status & crate::virtio::status::DEVICE_NEEDS_RESET, 0);
}

#[test]
fn regular_files_work_without_epoll() {
    // epoll refuses regular files (EPERM); they never block, so the device uses them unwatched.
    let ev = EventLoop::start();
    let mem = guest_memory(MEM_SIZE);
    let dir = vmm_sys_util::tempdir::TempDir::new().unwrap();
    let in_path = dir.as_path().join("in");
    let out_path = dir.as_path().join("out");
    let data = pattern(10_000, 9);
    std::fs::write(&in_path, &data).unwrap();
    let in_file = std::fs::File::open(&in_path).unwrap();
    let out_file = std::fs::File::create(&out_path).unwrap();
    let ports = vec![
        port("stdin", input(in_file), None),
        port("stdout", None, output(out_file)),
    ];
    let mut g = Guest::new(&mem, &ev, ports);
    g.handshake(&["stdin", "stdout"]);
    // More chains than one wakeup handles: the input is wanted between wakeups, and epoll
    // refuses it.
    g.rx_buffers(0, 100, 128);
    g.send_control(0, PORT_OPEN, 1);
    g.wait("RX", |g| g.used(rx_queue_index(0)) == 79);
    assert_same(&g.rx_data(0), &data);
    assert_eq!(g.control(1), vec![(0, PORT_OPEN, 0, vec![])]);

    let chains = g.transmit(1, &data, 3000, 1000);
    g.wait("TX", |g| g.used(tx_queue_index(1)) == chains);
    assert_same(&std::fs::read(&out_path).unwrap(), &data);
}

#[test]
fn flush_writes_what_the_guest_left_to_a_slow_reader() {
    let ev = EventLoop::start();
    let mem = guest_memory(MEM_SIZE);
    let (mut r, w) = pipe();
    // SAFETY: fcntl on a valid fd with an integer argument.
    assert!(unsafe { libc::fcntl(w.as_raw_fd(), libc::F_SETPIPE_SZ, 4096) } >= 4096);
    let out = Trickle(FdOutput::new(OwnedFd::from(w)).unwrap());
    let mut g = Guest::new(&mem, &ev, vec![port("stdout", None, Some(Box::new(out)))]);
    g.handshake(&["stdout"]);
    let data = pattern(48 * 1024, 5);
    let chains = g.transmit(0, &data, 1024, 512);
    // Nobody reads: the deadline passes.
    let start = Instant::now();
    assert!(!g.flush.flush(start + Duration::from_millis(200)));
    assert!(
        start.elapsed() >= Duration::from_millis(200),
        "{:?}",
        start.elapsed()
    );
    // A slow reader: the flush waits for it and returns when everything was written.
    let want = data.len();
    let reader = std::thread::spawn(move || {
        let mut got = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        while got.len() < want && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
            if poll_in(r.as_raw_fd(), 100) {
                let mut b = [0u8; 1000];
                let n = r.read(&mut b).unwrap();
                got.extend_from_slice(&b[..n]);
            }
        }
        got
    });
    assert!(g.flush.flush(Instant::now() + Duration::from_secs(20)));
    assert_eq!(
        g.used(tx_queue_index(0)),
        chains,
        "every chain was returned"
    );
    assert_same(&reader.join().unwrap(), &data);
    // Nothing left: an immediate flush succeeds.
    assert!(g.flush.flush(Instant::now()));
}
