//! Overlay tests: the byte-range API against a model of the disk, saved layers and their
//! refusals, and guest requests through a `BlockHandler` over an overlay disk.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::*;
use crate::guest_log::GuestLog;
use crate::virtio::block::handler::BlockHandler;
use crate::virtio::block::request::Disk;
use crate::virtio::block::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use crate::virtio::test_utils::{guest_memory, TestQueue, D};
use crate::virtio::IrqTrigger;

const C: u64 = CHUNK_SIZE;

/// A scratch directory, removed on drop.
struct Dir(PathBuf);

impl Dir {
    fn new(name: &str) -> Self {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let d = std::env::temp_dir().join(format!("mvovl-{name}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        Dir(d)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    /// Names in the directory.
    fn entries(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(&self.0)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Deterministic, non-repeating-per-chunk bytes: byte i of the base is `seed(i)`.
fn pattern(len: u64, salt: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i.wrapping_mul(31) ^ (i >> 9) ^ (i >> 16)) as u8 ^ salt)
        .collect()
}

/// `dir/base.img` holding `bytes`, opened read-only as the VMM does.
fn base(dir: &Dir, bytes: &[u8]) -> (PathBuf, File) {
    let p = dir.path("base.img");
    std::fs::write(&p, bytes).unwrap();
    let f = File::open(&p).unwrap();
    (p, f)
}

fn read_all(o: &Overlay) -> Vec<u8> {
    let mut v = vec![0u8; o.len() as usize];
    o.read_at(0, &mut v).unwrap();
    v
}

/// A small xorshift generator: reproducible "random" offsets and lengths.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[test]
fn reads_come_from_the_base_until_written() {
    let dir = Dir::new("base-reads");
    let bytes = pattern(3 * C + 1536, 0);
    let (_, f) = base(&dir, &bytes);
    let o = Overlay::new(f, bytes.len() as u64, &dir.0).unwrap();
    assert_eq!(o.len(), bytes.len() as u64);
    assert_eq!(read_all(&o), bytes);
    // A read straddling chunk boundaries, and one of the short last chunk.
    let mut buf = vec![0u8; (C + 1000) as usize];
    o.read_at(C - 500, &mut buf).unwrap();
    assert_eq!(buf, bytes[(C - 500) as usize..(2 * C + 500) as usize]);
    let mut tail = [0u8; 1536];
    o.read_at(3 * C, &mut tail).unwrap();
    assert_eq!(tail[..], bytes[3 * C as usize..]);
    assert_eq!(o.written_chunks(), 0);
}

#[test]
fn read_after_write_across_chunk_boundaries() {
    let dir = Dir::new("raw");
    let bytes = pattern(4 * C, 1);
    let (path, f) = base(&dir, &bytes);
    let o = Overlay::new(f, bytes.len() as u64, &dir.0).unwrap();
    let mut model = bytes.clone();
    // From the last 512 bytes of chunk 0 through chunk 1 into the first 700 of chunk 2.
    let at = C - 512;
    let data = vec![0xa5u8; (512 + C + 700) as usize];
    o.write_at(at, &data).unwrap();
    model[at as usize..at as usize + data.len()].copy_from_slice(&data);
    assert_eq!(o.written_chunks(), 3);
    assert_eq!(read_all(&o), model);
    // Rewriting part of an already copied-up chunk changes only those bytes.
    o.write_at(C + 10, b"again").unwrap();
    model[(C + 10) as usize..(C + 15) as usize].copy_from_slice(b"again");
    assert_eq!(o.written_chunks(), 3);
    assert_eq!(read_all(&o), model);
    // Chunk 3 was never written: it still reads from the base.
    let mut c3 = vec![0u8; C as usize];
    o.read_at(3 * C, &mut c3).unwrap();
    assert_eq!(c3, bytes[3 * C as usize..]);
    assert_eq!(
        std::fs::read(&path).unwrap(),
        bytes,
        "the base never changes"
    );
}

#[test]
fn partial_write_copies_up_the_rest_of_the_chunk() {
    let dir = Dir::new("copyup");
    let bytes = pattern(2 * C, 2);
    let (path, f) = base(&dir, &bytes);
    let o = Overlay::new(f, 2 * C, &dir.0).unwrap();
    o.write_at(C + 4096, &[0u8; 512]).unwrap();
    assert_eq!(o.written_chunks(), 1);
    // The upper holds the whole chunk: the base's bytes around the write, and the write.
    let mut chunk = vec![0u8; C as usize];
    o.upper_file.read_exact_at(&mut chunk, C).unwrap();
    let mut want = bytes[C as usize..].to_vec();
    want[4096..4608].fill(0);
    assert_eq!(chunk, want);
    // Chunk 0 is not in the upper at all.
    let mut c0 = vec![0u8; C as usize];
    o.read_at(0, &mut c0).unwrap();
    assert_eq!(c0, bytes[..C as usize]);
    assert_eq!(std::fs::read(&path).unwrap(), bytes);

    // A write covering a whole chunk needs no copy-up, and lands as written.
    o.write_at(0, &vec![7u8; C as usize]).unwrap();
    o.upper_file.read_exact_at(&mut c0, 0).unwrap();
    assert!(c0.iter().all(|&b| b == 7));
    assert_eq!(o.written_chunks(), 2);
}

#[test]
fn grown_disk_reads_zeros_past_the_base() {
    let dir = Dir::new("grown");
    // A base that ends inside a chunk, grown by two more chunks.
    let bytes = pattern(C + 1024, 3);
    let (path, f) = base(&dir, &bytes);
    let o = Overlay::new(f, 3 * C, &dir.0).unwrap();
    let all = read_all(&o);
    assert_eq!(all[..bytes.len()], bytes[..]);
    assert!(all[bytes.len()..].iter().all(|&b| b == 0));
    // A partial write of the chunk the base ends in copies up base bytes and zeros.
    o.write_at(C + 2048, b"past the base").unwrap();
    let mut model = all;
    model[(C + 2048) as usize..(C + 2061) as usize].copy_from_slice(b"past the base");
    assert_eq!(read_all(&o), model);
    o.write_at(3 * C - 3, b"end").unwrap();
    model[(3 * C - 3) as usize..].copy_from_slice(b"end");
    assert_eq!(read_all(&o), model);
    assert_eq!(std::fs::read(&path).unwrap(), bytes);
    // Smaller than the base is refused, and so is a map too large to hold.
    let f = File::open(&path).unwrap();
    assert!(matches!(
        Overlay::new(f, C, &dir.0),
        Err(OverlayError::Shrink { .. })
    ));
    let f = File::open(&path).unwrap();
    assert!(matches!(
        Overlay::new(f, MAX_LEN + 512, &dir.0),
        Err(OverlayError::TooLarge(_))
    ));
}

#[test]
fn out_of_range_fails_without_writing() {
    let dir = Dir::new("range");
    let bytes = pattern(C, 4);
    let (path, f) = base(&dir, &bytes);
    let o = Overlay::new(f, C, &dir.0).unwrap();
    let mut buf = [0u8; 512];
    for offset in [C, C - 511, u64::MAX, u64::MAX - 100] {
        assert!(
            matches!(
                o.read_at(offset, &mut buf),
                Err(OverlayError::OutOfRange { .. })
            ),
            "read at {offset}"
        );
        assert!(
            matches!(
                o.write_at(offset, &buf),
                Err(OverlayError::OutOfRange { .. })
            ),
            "write at {offset}"
        );
    }
    assert_eq!(o.written_chunks(), 0);
    // Empty accesses at the very end are fine.
    o.read_at(C, &mut []).unwrap();
    o.write_at(C, &[]).unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), bytes);
}

#[test]
fn the_upper_file_has_no_name() {
    let dir = Dir::new("anon");
    let bytes = pattern(C, 5);
    let (_, f) = base(&dir, &bytes);
    let upper = Dir::new("anon-upper");
    let o = Overlay::new(f, C, &upper.0).unwrap();
    o.write_at(0, &[1u8; 4096]).unwrap();
    assert!(upper.entries().is_empty(), "{:?}", upper.entries());
    // Sparse: one chunk written of a large disk takes about one chunk of space.
    drop(o);
    let f = File::open(dir.path("base.img")).unwrap();
    let o = Overlay::new(f, 1 << 30, &upper.0).unwrap();
    o.write_at(512 << 20, &[1u8; 512]).unwrap();
    let md = o.upper_file.metadata().unwrap();
    assert!(md.blocks() * 512 <= 4 * C, "{} blocks", md.blocks());
    // A missing directory is a clear error.
    let f = File::open(dir.path("base.img")).unwrap();
    let e = Overlay::new(f, C, &dir.path("missing")).unwrap_err();
    assert!(matches!(e, OverlayError::CreateUpper { .. }), "{e}");
}

/// Random writes and reads against a model, across a save and two restores.
#[test]
fn random_io_matches_a_model_across_save_and_restore() {
    let dir = Dir::new("model");
    let len = 8 * C + 3 * 512;
    let bytes = pattern(6 * C, 6);
    let (path, f) = base(&dir, &bytes);
    let mut model = bytes.clone();
    model.resize(len as usize, 0);
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut o = Overlay::new(f, len, &dir.0).unwrap();
    for round in 0..3 {
        for i in 0..200 {
            let at = rng.below(len);
            let n = rng.below((len - at).min(3 * C)) as usize;
            if rng.below(3) == 0 {
                let mut got = vec![0u8; n];
                o.read_at(at, &mut got).unwrap();
                assert!(
                    got == model[at as usize..at as usize + n],
                    "round {round} op {i}"
                );
            } else {
                let data: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
                o.write_at(at, &data).unwrap();
                model[at as usize..at as usize + n].copy_from_slice(&data);
            }
        }
        assert!(read_all(&o) == model, "round {round}");
        let (data, map) = (
            dir.path(&format!("d{round}")),
            dir.path(&format!("m{round}")),
        );
        o.save(&data, &map).unwrap();
        // The data file is as long as the disk and sparse where nothing was written.
        assert_eq!(std::fs::metadata(&data).unwrap().len(), len);
        let f = File::open(&path).unwrap();
        o = Overlay::restore(f, &data, &map, &dir.0).unwrap();
        assert_eq!(o.written_chunks(), 0, "a fresh upper");
        assert!(read_all(&o) == model, "restored round {round}");
    }
    assert_eq!(
        std::fs::read(&path).unwrap(),
        bytes,
        "the base never changes"
    );
}

#[test]
fn saved_layers_stay_read_only_and_unchained() {
    let dir = Dir::new("saved");
    let bytes = pattern(4 * C, 7);
    let (path, f) = base(&dir, &bytes);
    let o = Overlay::new(f, 4 * C, &dir.0).unwrap();
    o.write_at(C + 100, b"first run").unwrap();
    let (d1, m1) = (dir.path("d1"), dir.path("m1"));
    o.save(&d1, &m1).unwrap();
    let saved_data = std::fs::read(&d1).unwrap();
    let saved_map = std::fs::read(&m1).unwrap();
    // Two restores of one layer, at once: each writes only to its own upper.
    let r1 = Overlay::restore(File::open(&path).unwrap(), &d1, &m1, &dir.0).unwrap();
    let r2 = Overlay::restore(File::open(&path).unwrap(), &d1, &m1, &dir.0).unwrap();
    r1.write_at(C + 100, b"restore 1").unwrap();
    r1.write_at(3 * C, b"r1 elsewhere").unwrap();
    let mut got = [0u8; 9];
    r2.read_at(C + 100, &mut got).unwrap();
    assert_eq!(&got, b"first run");
    r1.read_at(C + 100, &mut got).unwrap();
    assert_eq!(&got, b"restore 1");
    assert_eq!(std::fs::read(&d1).unwrap(), saved_data);
    assert_eq!(std::fs::read(&m1).unwrap(), saved_map);
    // Saving a restored overlay merges both layers: the new pair alone restores everything,
    // even after the old pair is gone.
    let (d2, m2) = (dir.path("d2"), dir.path("m2"));
    r1.save(&d2, &m2).unwrap();
    let model = read_all(&r1);
    drop((r1, r2));
    std::fs::remove_file(&d1).unwrap();
    std::fs::remove_file(&m1).unwrap();
    let r3 = Overlay::restore(File::open(&path).unwrap(), &d2, &m2, &dir.0).unwrap();
    assert_eq!(read_all(&r3), model);
    assert_eq!(std::fs::read(&path).unwrap(), bytes);
}

/// Saves an overlay with two written chunks; returns (base path, data, map).
fn saved_pair(dir: &Dir) -> (PathBuf, PathBuf, PathBuf) {
    let bytes = pattern(3 * C, 8);
    let (path, f) = base(dir, &bytes);
    let o = Overlay::new(f, 3 * C + 512, &dir.0).unwrap();
    o.write_at(10, b"x").unwrap();
    o.write_at(3 * C, b"y").unwrap();
    let (data, map) = (dir.path("data"), dir.path("map"));
    o.save(&data, &map).unwrap();
    (path, data, map)
}

fn restore(path: &Path, data: &Path, map: &Path, dir: &Dir) -> Result<Overlay, OverlayError> {
    Overlay::restore(File::open(path).unwrap(), data, map, &dir.0)
}

#[test]
fn damaged_saved_layers_are_refused() {
    let dir = Dir::new("damaged");
    let (path, data, map) = saved_pair(&dir);
    restore(&path, &data, &map, &dir).unwrap();
    let good = std::fs::read(&map).unwrap();
    // Header 56 bytes, one bitmap word (4 chunks), CRC.
    assert_eq!(good.len(), 56 + 8 + 4);

    let damaged = |bytes: &[u8]| {
        std::fs::write(&map, bytes).unwrap();
        let e = restore(&path, &data, &map, &dir).unwrap_err();
        assert!(!e.to_string().contains('\n'), "{e}");
        e
    };
    let why = |e: OverlayError| match e {
        OverlayError::Damaged { why, .. } => why,
        other => panic!("not Damaged: {other}"),
    };
    // Any single flipped bit, anywhere, is caught.
    for i in 0..good.len() {
        let mut b = good.clone();
        b[i] ^= 0x10;
        match damaged(&b) {
            OverlayError::Version { .. } if (8..12).contains(&i) => {}
            OverlayError::Damaged { .. } => {}
            other => panic!("byte {i}: {other}"),
        }
    }
    assert_eq!(
        why(damaged(&good[..good.len() - 1])),
        "its length does not match its header"
    );
    assert_eq!(why(damaged(&good[..20])), "shorter than its header");
    assert_eq!(why(damaged(&[])), "shorter than its header");
    let mut longer = good.clone();
    longer.push(0);
    assert_eq!(
        why(damaged(&longer)),
        "its length does not match its header"
    );
    let mut b = good.clone();
    b[60] ^= 1;
    assert_eq!(why(damaged(&b)), "checksum mismatch");
    b[..8].copy_from_slice(b"NOTAMAP!");
    assert_eq!(why(damaged(&b)), "not a microvm disk layer map");

    // A consistent file (CRC recomputed) with a wrong count or a bit past the disk's end.
    let with_crc = |mut b: Vec<u8>| {
        let n = b.len() - 4;
        let crc = crc32fast::hash(&b[..n]);
        b[n..].copy_from_slice(&crc.to_le_bytes());
        b
    };
    let mut b = good.clone();
    b[48] += 1;
    assert_eq!(why(damaged(&with_crc(b))), "chunk count mismatch");
    let mut b = good.clone();
    b[56 + 7] |= 0x80; // chunk 63 of a 4-chunk disk
    b[48] += 1;
    assert_eq!(
        why(damaged(&with_crc(b))),
        "chunks set past the end of the disk"
    );
    let mut b = good.clone();
    b[8] = 9;
    match damaged(&with_crc(b)) {
        OverlayError::Version { found: 9, .. } => {}
        other => panic!("{other}"),
    }
    // A huge disk length in the header is refused before anything is allocated.
    let mut b = good.clone();
    b[16..24].copy_from_slice(&(MAX_LEN + 1).to_le_bytes());
    assert_eq!(why(damaged(&with_crc(b))), "impossible header");
    let mut b = good.clone();
    b[16..24].copy_from_slice(&(MAX_LEN).to_le_bytes());
    assert_eq!(
        why(damaged(&with_crc(b))),
        "its length does not match its header"
    );

    // The data file: truncated, or missing.
    std::fs::write(&map, &good).unwrap();
    let full = std::fs::read(&data).unwrap();
    std::fs::write(&data, &full[..full.len() - 512]).unwrap();
    assert_eq!(
        why(restore(&path, &data, &map, &dir).unwrap_err()),
        "its length is not the disk's"
    );
    std::fs::remove_file(&data).unwrap();
    assert!(matches!(
        restore(&path, &data, &map, &dir),
        Err(OverlayError::Load { .. })
    ));
    std::fs::write(&data, &full).unwrap();
    restore(&path, &data, &map, &dir).unwrap();
}

#[test]
fn a_changed_base_is_refused() {
    let dir = Dir::new("changed");
    let (path, data, map) = saved_pair(&dir);
    // Rewritten with the same length: its modification time moves.
    let bytes = std::fs::read(&path).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(20));
    std::fs::write(&path, &bytes).unwrap();
    let e = restore(&path, &data, &map, &dir).unwrap_err();
    assert!(matches!(e, OverlayError::BaseChanged { .. }), "{e}");
    // Another length.
    std::fs::write(&path, &bytes[..512]).unwrap();
    let e = restore(&path, &data, &map, &dir).unwrap_err();
    assert!(e.to_string().contains("length 512 bytes"), "{e}");
}

// ---- Guest requests on an overlay disk ----

const HDR: u64 = 0x1_0000;
const DATA: u64 = 0x2_0000;
const STATUS: u64 = 0xf_0000;

/// Runs one request chain; returns (status byte, used length).
fn run(mem: &GuestMemoryMmap, disk: &Arc<Disk>, req: u32, sector: u64, data: &[D]) -> (u8, u32) {
    let mut h = [0u8; 16];
    h[..4].copy_from_slice(&req.to_le_bytes());
    h[8..].copy_from_slice(&sector.to_le_bytes());
    mem.write_slice(&h, GuestAddress(HDR)).unwrap();
    mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    let vq = TestQueue::new(mem, 0, 16);
    let mut descs = vec![(HDR, 16, false)];
    descs.extend_from_slice(data);
    descs.push((STATUS, 1, true));
    vq.add_chain(0, &descs);
    let mut handler = BlockHandler::new(
        mem.clone(),
        vq.queue(),
        EventFd::new(EFD_NONBLOCK).unwrap(),
        Arc::new(IrqTrigger::new().unwrap()),
        disk.clone(),
        None,
        Arc::new(GuestLog::new("virtio-blk")),
    );
    assert_eq!(handler.process_queue().completed, 1);
    (
        mem.read_obj(GuestAddress(STATUS)).unwrap(),
        vq.used.entry(0).1,
    )
}

#[test]
fn guest_requests_through_the_overlay() {
    let dir = Dir::new("requests");
    let bytes = pattern(4 * C, 9);
    let (path, f) = base(&dir, &bytes);
    let disk = Arc::new(Disk::with_overlay(
        Overlay::new(f, 4 * C, &dir.0).unwrap(),
        false,
        "serial",
    ));
    assert_eq!(disk.nsectors(), 4 * C / 512);
    let mem = guest_memory(0x10_0000);
    // A write from the last sector of chunk 0 into chunk 2, in unevenly split segments
    // (1 KiB, 64 KiB, 3.5 KiB), none aligned to a chunk.
    let data: Vec<u8> = (0..(1024 + C + 3584)).map(|i| (i % 251) as u8).collect();
    mem.write_slice(&data, GuestAddress(DATA)).unwrap();
    let segs = [
        (DATA, 1024, false),
        (DATA + 1024, C as u32, false),
        (DATA + 1024 + C, 3584, false),
    ];
    let sector = (C - 512) / 512;
    assert_eq!(
        run(&mem, &disk, VIRTIO_BLK_T_OUT, sector, &segs),
        (VIRTIO_BLK_S_OK, 1)
    );
    // Read back the whole of chunks 0..3 in two segments.
    let out = DATA + 0x4_0000;
    let (status, used) = run(
        &mem,
        &disk,
        VIRTIO_BLK_T_IN,
        0,
        &[
            (out, 100 * 512, true),
            (out + 100 * 512, (3 * C - 100 * 512) as u32, true),
        ],
    );
    assert_eq!((status, used), (VIRTIO_BLK_S_OK, 3 * C as u32 + 1));
    let mut got = vec![0u8; 3 * C as usize];
    mem.read_slice(&mut got, GuestAddress(out)).unwrap();
    let mut model = bytes[..3 * C as usize].to_vec();
    model[(C - 512) as usize..(C - 512) as usize + data.len()].copy_from_slice(&data);
    assert!(got == model);

    // Beyond the disk, or overflowing: IOERR, nothing written.
    for (sector, len) in [
        (4 * C / 512, 512),
        (4 * C / 512 - 1, 1024),
        (u64::MAX, 512),
        (u64::MAX >> 9, 512),
    ] {
        for req in [VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT] {
            let (status, _) = run(
                &mem,
                &disk,
                req,
                sector,
                &[(DATA, len, req == VIRTIO_BLK_T_IN)],
            );
            assert_eq!(status, VIRTIO_BLK_S_IOERR, "req {req} sector {sector}");
        }
    }
    // Data outside guest memory: IOERR.
    let (status, _) = run(
        &mem,
        &disk,
        VIRTIO_BLK_T_OUT,
        3 * C / 512,
        &[(0x10_0000 - 512, 1024, false)],
    );
    assert_eq!(status, VIRTIO_BLK_S_IOERR);
    assert_eq!(
        run(&mem, &disk, VIRTIO_BLK_T_FLUSH, 0, &[]).0,
        VIRTIO_BLK_S_OK
    );
    assert_eq!(disk.overlay().unwrap().written_chunks(), 3);
    assert_eq!(
        std::fs::read(&path).unwrap(),
        bytes,
        "the base never changes"
    );

    // A read-only overlay disk refuses writes.
    let f = File::open(&path).unwrap();
    let ro = Arc::new(Disk::with_overlay(
        Overlay::new(f, 4 * C, &dir.0).unwrap(),
        true,
        "s",
    ));
    let (status, _) = run(&mem, &ro, VIRTIO_BLK_T_OUT, 0, &[(DATA, 512, false)]);
    assert_eq!(status, VIRTIO_BLK_S_IOERR);
    assert_eq!(ro.overlay().unwrap().written_chunks(), 0);
}
