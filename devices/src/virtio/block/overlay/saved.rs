//! The chunk map of a saved layer: which chunks of its data file hold the disk's bytes, and
//! what base image they were saved on.
//!
//! ```text
//! offset  size  field (integers little-endian)
//!      0     8  magic "MVOVLMAP"
//!      8     4  format version (MAP_VERSION)
//!     12     4  chunk size in bytes (CHUNK_SIZE)
//!     16     8  disk length in bytes
//!     24     8  base image length in bytes
//!     32     8  base image modification time: seconds (signed)
//!     40     4  base image modification time: nanoseconds
//!     44     4  zero
//!     48     8  number of chunks set below
//!     56   8*W  bitmap, W = ceil(ceil(disk length / chunk size) / 64) words:
//!               chunk i is bit i % 64 of word i / 64; no bit at or past the last chunk
//!  56+8W     4  CRC-32 (IEEE) of every byte before it
//! ```
//!
//! Loading refuses anything that does not add up (magic, version, chunk size, a length that
//! does not match the header, a bad CRC, stray bits, a wrong count): a damaged map must never
//! make a restored guest read garbage where its data should be.

use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::path::Path;

use super::{BaseId, ChunkMap, OverlayError, CHUNK_SIZE, MAX_LEN};

/// Version of the map format written by this microvm.
pub const MAP_VERSION: u32 = 1;
const MAGIC: [u8; 8] = *b"MVOVLMAP";
const HEADER_LEN: usize = 56;
const CRC_LEN: usize = 4;

/// The header fields that are not the map itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct MapHeader {
    pub disk_len: u64,
    pub base: BaseId,
}

/// Writes `chunks` and `header` to `path` (created or truncated) and fsyncs it.
pub(super) fn write_map(
    path: &Path,
    header: &MapHeader,
    chunks: &ChunkMap,
) -> Result<(), OverlayError> {
    let mut out = Vec::with_capacity(HEADER_LEN + chunks.words.len() * 8 + CRC_LEN);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&MAP_VERSION.to_le_bytes());
    out.extend_from_slice(&(CHUNK_SIZE as u32).to_le_bytes());
    out.extend_from_slice(&header.disk_len.to_le_bytes());
    out.extend_from_slice(&header.base.len.to_le_bytes());
    out.extend_from_slice(&header.base.mtime_sec.to_le_bytes());
    out.extend_from_slice(&header.base.mtime_nsec.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&chunks.count().to_le_bytes());
    for w in &chunks.words {
        out.extend_from_slice(&w.to_le_bytes());
    }
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    let err = |source| OverlayError::Save {
        path: path.to_path_buf(),
        source,
    };
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .map_err(err)?;
    f.write_all(&out).map_err(err)?;
    f.sync_all().map_err(err)
}

/// Reads and checks the map at `path`.
pub(super) fn read_map(path: &Path) -> Result<(MapHeader, ChunkMap), OverlayError> {
    let damaged = |why| OverlayError::Damaged {
        path: path.to_path_buf(),
        why,
    };
    let load = |source| OverlayError::Load {
        path: path.to_path_buf(),
        source,
    };
    let mut f = std::fs::File::open(path).map_err(load)?;
    let mut head = [0u8; HEADER_LEN];
    f.read_exact(&mut head).map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => damaged("shorter than its header"),
        _ => load(e),
    })?;
    let r = Fields(&head);
    if r.bytes::<8>(0) != MAGIC {
        return Err(damaged("not a microvm disk layer map"));
    }
    let version = r.u32(8);
    if version != MAP_VERSION {
        return Err(OverlayError::Version {
            path: path.to_path_buf(),
            found: version,
        });
    }
    if u64::from(r.u32(12)) != CHUNK_SIZE {
        return Err(damaged("unexpected chunk size"));
    }
    let disk_len = r.u64(16);
    let base = BaseId {
        len: r.u64(24),
        mtime_sec: r.u64(32) as i64,
        mtime_nsec: r.u32(40),
    };
    if disk_len > MAX_LEN || disk_len < base.len || r.u32(44) != 0 {
        return Err(damaged("impossible header"));
    }
    let count = r.u64(48);

    // disk_len <= MAX_LEN bounds the map (128 MiB), and the file's length must match it
    // before anything that size is allocated.
    let body_len = disk_len.div_ceil(CHUNK_SIZE).div_ceil(64) * 8 + CRC_LEN as u64;
    let file_len = f.metadata().map_err(load)?.len();
    if file_len != HEADER_LEN as u64 + body_len {
        return Err(damaged("its length does not match its header"));
    }
    let map = ChunkMap::for_len(disk_len);
    let body_len = map.words.len() * 8 + CRC_LEN;
    let mut body = vec![0u8; body_len];
    f.read_exact(&mut body).map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => damaged("truncated"),
        _ => load(e),
    })?;
    let (words, crc) = body.split_at(body_len - CRC_LEN);
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&head);
    hasher.update(words);
    if Fields(crc).u32(0) != hasher.finalize() {
        return Err(damaged("checksum mismatch"));
    }
    let mut map = map;
    for (w, raw) in map.words.iter_mut().zip(words.chunks_exact(8)) {
        *w = Fields(raw).u64(0);
    }
    let tail_bits = map.nchunks % 64;
    if let (Some(last), true) = (map.words.last(), tail_bits != 0) {
        if last >> tail_bits != 0 {
            return Err(damaged("chunks set past the end of the disk"));
        }
    }
    if map.count() != count {
        return Err(damaged("chunk count mismatch"));
    }
    Ok((MapHeader { disk_len, base }, map))
}

/// Little-endian fields of a byte slice (callers pass offsets inside it).
struct Fields<'a>(&'a [u8]);

impl Fields<'_> {
    fn bytes<const N: usize>(&self, at: usize) -> [u8; N] {
        let mut a = [0u8; N];
        if let Some(s) = self.0.get(at..at + N) {
            a.copy_from_slice(s);
        }
        a
    }

    fn u32(&self, at: usize) -> u32 {
        u32::from_le_bytes(self.bytes(at))
    }

    fn u64(&self, at: usize) -> u64 {
        u64::from_le_bytes(self.bytes(at))
    }
}
