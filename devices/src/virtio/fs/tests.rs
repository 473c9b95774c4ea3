//! virtio-fs behind an MmioTransport, against a scripted vhost-user backend on a socketpair
//! (a thread that answers the requests and records them). No virtiofsd, no KVM.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::tempfile::TempFile;

use super::*;
use crate::virtio::mmio::{REG_INTERRUPT_ACK, REG_INTERRUPT_STATUS, REG_STATUS};
use crate::virtio::status::DEVICE_NEEDS_RESET;
use crate::virtio::test_utils::{bits, driver_init, r, w, TestQueue};
use crate::virtio::{MmioTransport, VirtioDevice, TYPE_FS, VIRTIO_F_VERSION_1, VIRTIO_MMIO_INT_VRING};

// vhost-user request codes (vhost-user spec).
const SET_FEATURES: u32 = 2;
const SET_MEM_TABLE: u32 = 5;
const SET_VRING_NUM: u32 = 8;
const SET_VRING_ADDR: u32 = 9;
const GET_VRING_BASE: u32 = 11;
const SET_VRING_KICK: u32 = 12;
const SET_VRING_CALL: u32 = 13;
const SET_PROTOCOL_FEATURES: u32 = 16;
const SET_VRING_ENABLE: u32 = 18;
const RESET_DEVICE: u32 = 34;
const NEED_REPLY: u32 = 0x8;

const LOG_ALL: u64 = 1 << 26;
const PROTOCOL_FEATURES: u64 = 1 << 30;
/// MQ, REPLY_ACK, CONFIG, RESET_DEVICE, BACKEND_REQ.
const OFFERED_PROTOCOL: u64 = 0x1 | 0x8 | 0x200 | 0x2000 | 0x20;
const MEM_SIZE: u64 = 0x20_0000;

/// One recorded request: (code, body).
type Log = Arc<Mutex<Vec<(u32, Vec<u8>)>>>;

/// Answers like virtiofsd would, except that `refuse` (if set) gets a non-zero REPLY_ACK.
fn fake_backend(refuse: Option<u32>) -> (UnixStream, Log, JoinHandle<()>) {
    let (ours, mut theirs) = UnixStream::pair().unwrap();
    let log: Log = Arc::default();
    let log2 = log.clone();
    let offered = bits(&[VIRTIO_F_VERSION_1, VIRTIO_RING_F_INDIRECT_DESC, VIRTIO_RING_F_EVENT_IDX])
        | PROTOCOL_FEATURES
        | LOG_ALL;
    let thread = std::thread::spawn(move || loop {
        let mut hdr = [0u8; 12];
        if theirs.read_exact(&mut hdr).is_err() {
            return;
        }
        let word = |i: usize| u32::from_le_bytes(hdr[i..i + 4].try_into().unwrap());
        let (code, flags, size) = (word(0), word(4), word(8));
        let mut body = vec![0u8; size as usize];
        theirs.read_exact(&mut body).unwrap();
        log2.lock().unwrap().push((code, body.clone()));
        let reply: Option<Vec<u8>> = match code {
            1 => Some(offered.to_le_bytes().to_vec()),          // GET_FEATURES
            15 => Some(OFFERED_PROTOCOL.to_le_bytes().to_vec()), // GET_PROTOCOL_FEATURES
            17 => Some(2u64.to_le_bytes().to_vec()),             // GET_QUEUE_NUM
            GET_VRING_BASE => Some([&body[..4], &0u32.to_le_bytes()[..]].concat()),
            _ if flags & NEED_REPLY != 0 => Some(u64::from(refuse == Some(code)).to_le_bytes().to_vec()),
            _ => None,
        };
        if let Some(payload) = reply {
            let mut msg = Vec::new();
            msg.extend_from_slice(&code.to_le_bytes());
            msg.extend_from_slice(&(0x1u32 | 0x4).to_le_bytes()); // version 1, REPLY
            msg.extend_from_slice(&(payload.len() as u32).to_le_bytes());
            msg.extend_from_slice(&payload);
            if theirs.write_all(&msg).is_err() {
                return;
            }
        }
    });
    (ours, log, thread)
}

/// Guest memory in a file, as a vhost-user backend needs it.
fn shared_memory() -> (TempFile, GuestMemoryMmap) {
    let tmp = TempFile::new().unwrap();
    let file = tmp.as_file().try_clone().unwrap();
    file.set_len(MEM_SIZE).unwrap();
    let range = (GuestAddress(0), MEM_SIZE as usize, Some(FileOffset::new(file, 0)));
    (tmp, GuestMemoryMmap::from_ranges_with_files([range]).unwrap())
}

fn codes(log: &Log) -> Vec<u32> {
    log.lock().unwrap().iter().map(|(c, _)| *c).collect()
}

fn u64_body(log: &Log, code: u32) -> u64 {
    let log = log.lock().unwrap();
    let (_, body) = log.iter().find(|(c, _)| *c == code).unwrap();
    u64::from_le_bytes(body[..8].try_into().unwrap())
}

#[test]
fn config_space_and_features_come_from_tag_and_backend() {
    let (stream, log, _t) = fake_backend(None);
    let fs = Fs::new("src", stream).unwrap();
    assert_eq!(fs.device_type(), TYPE_FS);
    let mut cfg = [0xffu8; 40];
    fs.read_config(0, &mut cfg);
    assert_eq!(&cfg[..3], b"src");
    assert!(cfg[3..36].iter().all(|b| *b == 0), "tag NUL padded");
    assert_eq!(u32::from_le_bytes(cfg[36..40].try_into().unwrap()), 1, "one request queue");
    // Only what the guest may see: no LOG_ALL, no PROTOCOL_FEATURES.
    let guest = bits(&[VIRTIO_F_VERSION_1, VIRTIO_RING_F_INDIRECT_DESC, VIRTIO_RING_F_EVENT_IDX]);
    assert_eq!(fs.avail_features(), guest);
    // MQ | REPLY_ACK | RESET_DEVICE: not CONFIG (the tag is ours), not BACKEND_REQ.
    assert_eq!(u64_body(&log, SET_PROTOCOL_FEATURES), 0x1 | 0x8 | 0x2000);
    assert!(Fs::new("", UnixStream::pair().unwrap().0).is_err());
    assert!(matches!(Fs::new(&"x".repeat(37), UnixStream::pair().unwrap().0), Err(FsError::Tag(_))));
}

#[test]
fn activation_hands_rings_and_eventfds_to_the_backend_and_reset_stops_them() {
    let (stream, log, _t) = fake_backend(None);
    let (_tmp, mem) = shared_memory();
    let mut t = MmioTransport::new(mem.clone(), Box::new(Fs::new("t", stream).unwrap())).unwrap();
    let hiprio = TestQueue::new(&mem, 0x1_0000, 16);
    let request = TestQueue::new(&mem, 0x2_0000, 32);
    let features = bits(&[VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX]);
    log.lock().unwrap().clear();
    driver_init(&mut t, features, &[&hiprio, &request]);
    assert_eq!(r(&mut t, REG_STATUS) & DEVICE_NEEDS_RESET, 0, "activation failed");
    assert!(t.device().is_activated());
    // The guest's features plus PROTOCOL_FEATURES, never LOG_ALL.
    assert_eq!(u64_body(&log, SET_FEATURES), features | PROTOCOL_FEATURES);
    let c = codes(&log);
    let per_queue = [SET_VRING_NUM, SET_VRING_ADDR, 10, SET_VRING_CALL, SET_VRING_KICK];
    let mut want = vec![SET_FEATURES, SET_MEM_TABLE];
    want.extend(per_queue);
    want.extend(per_queue);
    want.extend([SET_VRING_ENABLE, SET_VRING_ENABLE]);
    assert_eq!(c, want);
    {
        let log = log.lock().unwrap();
        // SET_VRING_NUM: index 1, size 32.
        let nums: Vec<&Vec<u8>> = log.iter().filter(|(c, _)| *c == SET_VRING_NUM).map(|(_, b)| b).collect();
        assert_eq!(nums[1][..8], [1, 0, 0, 0, 32, 0, 0, 0]);
        // SET_VRING_ADDR carries our virtual addresses: index, flags, desc, used, avail, log.
        let addr = log.iter().filter(|(c, _)| *c == SET_VRING_ADDR).nth(1).unwrap().1.clone();
        let field = |i: usize| u64::from_le_bytes(addr[8 + 8 * i..16 + 8 * i].try_into().unwrap());
        let host = |gpa: u64| mem.get_host_address(GuestAddress(gpa)).unwrap() as u64;
        let [desc, avail, used] = request.rings();
        assert_eq!((field(0), field(1), field(2)), (host(desc), host(used), host(avail)));
        // Both rings enabled.
        assert!(log.iter().filter(|(c, _)| *c == SET_VRING_ENABLE).all(|(_, b)| b[4] == 1));
    }
    // The backend raises the irqfd itself: VRING stays visible to the driver after an ack.
    w(&mut t, REG_INTERRUPT_ACK, VIRTIO_MMIO_INT_VRING);
    assert_eq!(r(&mut t, REG_INTERRUPT_STATUS) & VIRTIO_MMIO_INT_VRING, VIRTIO_MMIO_INT_VRING);

    log.lock().unwrap().clear();
    w(&mut t, REG_STATUS, 0);
    assert_eq!(codes(&log), vec![GET_VRING_BASE, GET_VRING_BASE, RESET_DEVICE]);
    assert!(!t.device().is_activated());
    assert_eq!(r(&mut t, REG_INTERRUPT_STATUS), 0);
    // And it comes up again.
    driver_init(&mut t, features, &[&hiprio, &request]);
    assert!(t.device().is_activated());
}

#[test]
fn a_refusing_backend_makes_the_device_need_reset_for_good() {
    let (stream, log, _t) = fake_backend(Some(SET_MEM_TABLE));
    let (_tmp, mem) = shared_memory();
    let mut t = MmioTransport::new(mem.clone(), Box::new(Fs::new("t", stream).unwrap())).unwrap();
    let (q0, q1) = (TestQueue::new(&mem, 0x1_0000, 16), TestQueue::new(&mem, 0x2_0000, 16));
    driver_init(&mut t, 1 << VIRTIO_F_VERSION_1, &[&q0, &q1]);
    assert_ne!(r(&mut t, REG_STATUS) & DEVICE_NEEDS_RESET, 0);
    assert!(!t.device().is_activated());
    // The connection's state is unknown now: no more requests, activation keeps failing.
    log.lock().unwrap().clear();
    driver_init(&mut t, 1 << VIRTIO_F_VERSION_1, &[&q0, &q1]);
    assert_ne!(r(&mut t, REG_STATUS) & DEVICE_NEEDS_RESET, 0);
    assert!(codes(&log).is_empty(), "{:?}", codes(&log));
}

#[test]
fn private_memory_is_refused_before_the_backend_sees_it() {
    let (stream, log, _t) = fake_backend(None);
    let mem = crate::virtio::test_utils::guest_memory(MEM_SIZE as usize);
    let mut t = MmioTransport::new(mem.clone(), Box::new(Fs::new("t", stream).unwrap())).unwrap();
    let (q0, q1) = (TestQueue::new(&mem, 0x1_0000, 16), TestQueue::new(&mem, 0x2_0000, 16));
    log.lock().unwrap().clear();
    driver_init(&mut t, 1 << VIRTIO_F_VERSION_1, &[&q0, &q1]);
    assert_ne!(r(&mut t, REG_STATUS) & DEVICE_NEEDS_RESET, 0);
    assert!(!codes(&log).contains(&SET_MEM_TABLE));
}

#[test]
fn a_backend_that_hangs_up_is_an_error_not_a_panic() {
    let (ours, theirs) = UnixStream::pair().unwrap();
    drop(theirs);
    assert!(matches!(Fs::new("t", ours), Err(FsError::Vhost { .. })));
}
