//! Copy-on-write overlay for `--disk PATH,snapshot` (QEMU's `-snapshot`): the guest sees a
//! writable disk, its writes go to a private anonymous file that vanishes with the process,
//! and the image itself is only ever read, so every run starts from the same bytes and many
//! VMs can share one image.
//!
//! # Layers
//!
//! * **lower**, read-only: the base image (opened read-only by the VMM, under a shared lock),
//!   optionally topped by a *saved layer* (a sparse data file and its chunk map, written by
//!   [`Overlay::save`] when a VM was snapshotted). The lower is never written.
//! * **upper**, private: an anonymous sparse file (`O_TMPFILE`) holding the chunks the guest
//!   wrote since this overlay was created, at their disk offsets, and an in-memory bitmap
//!   of those chunks.
//!
//! The disk is cut into [`CHUNK_SIZE`] chunks. A read takes each chunk from the upper if it
//! was written, else from the saved layer if that has it, else from the base (zeros past the
//! base's end, when `size=` made the disk larger than the image). A write to a chunk not yet
//! in the upper first copies it up: the whole chunk is read from the lower, the write is laid
//! over it, and the full chunk is written to the upper; only then is its bit set, so a
//! failed write leaves the chunk reading from the lower as before.
//!
//! 64 KiB chunks: a copy-up costs one 64 KiB read and write, small next to a guest request
//! (Linux sends up to 128 KiB+), and the bitmap stays small (1 bit per 64 KiB: 2 KiB per
//! GiB). Smaller chunks waste less upper space on scattered 4 KiB writes but grow the map.
//!
//! # The upper file
//!
//! Created with `O_TMPFILE` in the directory the VMM names ($TMPDIR, else /var/tmp, like
//! QEMU: not beside the image, whose directory may be read-only or shared by many VMs, and
//! not /tmp by default, often a small tmpfs). An `O_TMPFILE` file never has a name, so
//! nothing is left behind, even after `kill -9`. Filesystems without `O_TMPFILE` get a named
//! file that is unlinked at once. Flushes do nothing: the upper is thrown away at exit and the
//! lower never changes, so there is nothing a crash could lose that would be used again.
//!
//! # Snapshots
//!
//! [`Overlay::save`] writes the chunks the guest has written so far (upper and saved layer
//! merged, so saved layers never chain) to a sparse data file and their map to a small
//! versioned, CRC-checked file (format in `overlay/saved.rs`); [`Overlay::restore`] stacks
//! such a pair on the base as the read-only lower, with a fresh private upper on top.

mod saved;
#[cfg(test)]
mod tests;

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::virtio::lock;

pub use saved::MAP_VERSION;

/// Granularity of copy-on-write, in bytes.
pub const CHUNK_SIZE: u64 = 64 * 1024;
/// Largest overlay disk: 64 TiB, a 128 MiB bitmap (allocated zeroed, so untouched parts cost
/// no memory). Larger `size=` values are refused rather than allocating a huge map.
pub const MAX_LEN: u64 = 1 << 46;

/// Errors of the overlay: creating it, its I/O, saving and loading saved layers.
#[derive(Debug, thiserror::Error)]
pub enum OverlayError {
    /// The private upper file could not be created.
    #[error("cannot create the snapshot overlay file in '{dir}'")]
    CreateUpper {
        /// Directory it was to be created in.
        dir: PathBuf,
        /// The failure.
        #[source]
        source: io::Error,
    },
    /// The base image's metadata could not be read.
    #[error("cannot read the base image's metadata")]
    BaseMetadata(#[source] io::Error),
    /// The disk would be smaller than its base image.
    #[error("overlay disk of {len} bytes is smaller than its base image ({base_len} bytes)")]
    Shrink {
        /// Requested disk length.
        len: u64,
        /// Base image length.
        base_len: u64,
    },
    /// The disk is larger than [`MAX_LEN`].
    #[error("overlay disk of {0} bytes is larger than the maximum ({MAX_LEN} bytes)")]
    TooLarge(u64),
    /// A byte range beyond the disk.
    #[error("bytes {offset}..+{len} are beyond the disk ({disk_len} bytes)")]
    OutOfRange {
        /// First byte.
        offset: u64,
        /// Length.
        len: u64,
        /// Disk length.
        disk_len: u64,
    },
    /// Reading or writing a layer failed.
    #[error("overlay I/O failed")]
    Io(#[source] io::Error),
    /// Writing a saved layer failed.
    #[error("cannot write the saved disk layer '{path}'")]
    Save {
        /// The file being written.
        path: PathBuf,
        /// The failure.
        #[source]
        source: io::Error,
    },
    /// Opening or reading a saved layer failed.
    #[error("cannot read the saved disk layer '{path}'")]
    Load {
        /// The file being read.
        path: PathBuf,
        /// The failure.
        #[source]
        source: io::Error,
    },
    /// A saved layer is truncated or corrupt.
    #[error("saved disk layer '{path}' is damaged: {why}")]
    Damaged {
        /// The damaged file.
        path: PathBuf,
        /// What is wrong.
        why: &'static str,
    },
    /// A saved map of another format version.
    #[error("saved disk layer '{path}' has format version {found}; this microvm reads version {MAP_VERSION}")]
    Version {
        /// The map file.
        path: PathBuf,
        /// Its version.
        found: u32,
    },
    /// The base image is not the one the layer was saved on.
    #[error("the disk image changed since its layer was saved ({what})")]
    BaseChanged {
        /// What differs (length or modification time).
        what: String,
    },
}

/// What identifies the base image a layer was saved on: its length and modification time.
/// A read-only user never changes either; a writer (or a copy) does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct BaseId {
    len: u64,
    mtime_sec: i64,
    mtime_nsec: u32,
}

impl BaseId {
    fn of(base: &File) -> Result<Self, OverlayError> {
        let md = base.metadata().map_err(OverlayError::BaseMetadata)?;
        Ok(BaseId {
            len: md.len(),
            mtime_sec: md.mtime(),
            // st_mtime_nsec is in 0..1e9.
            mtime_nsec: u32::try_from(md.mtime_nsec()).unwrap_or(0),
        })
    }
}

/// One bit per chunk: set once the chunk is in the layer's file.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct ChunkMap {
    words: Vec<u64>,
    nchunks: u64,
}

impl ChunkMap {
    /// An empty map for a disk of `len` bytes (at most [`MAX_LEN`]).
    fn for_len(len: u64) -> Self {
        let nchunks = len.div_ceil(CHUNK_SIZE);
        // nchunks <= 2^30 (MAX_LEN): the word count fits any usize we run on.
        ChunkMap {
            words: vec![0; nchunks.div_ceil(64) as usize],
            nchunks,
        }
    }

    fn get(&self, chunk: u64) -> bool {
        self.words
            .get((chunk / 64) as usize)
            .is_some_and(|w| w & (1 << (chunk % 64)) != 0)
    }

    /// Callers pass chunks below `nchunks` (checked ranges); others are ignored.
    fn set(&mut self, chunk: u64) {
        if let Some(w) = self.words.get_mut((chunk / 64) as usize) {
            *w |= 1 << (chunk % 64);
        }
    }

    fn count(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    fn union(&mut self, other: &ChunkMap) {
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a |= b;
        }
    }

    /// The set chunks, in order.
    fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        self.words.iter().enumerate().flat_map(|(i, &w)| {
            (0..64u64)
                .filter(move |b| w & (1 << b) != 0)
                .map(move |b| i as u64 * 64 + b)
        })
    }
}

impl std::fmt::Debug for ChunkMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ChunkMap({} of {} chunks)", self.count(), self.nchunks)
    }
}

/// A layer saved by [`Overlay::save`], opened read-only.
#[derive(Debug)]
struct SavedLayer {
    file: File,
    map: ChunkMap,
}

/// The read-only part: the base image and, after a restore, a saved layer over it.
#[derive(Debug)]
struct Lower {
    base: File,
    base_id: BaseId,
    saved: Option<SavedLayer>,
}

impl Lower {
    /// Reads `buf.len()` bytes at `pos`, all inside one chunk.
    fn read_at(&self, pos: u64, buf: &mut [u8]) -> io::Result<()> {
        if let Some(saved) = &self.saved {
            if saved.map.get(pos / CHUNK_SIZE) {
                return saved.file.read_exact_at(buf, pos);
            }
        }
        // Past the base's end (a disk grown by size=) reads as zeros.
        let in_base = self.base_id.len.saturating_sub(pos).min(buf.len() as u64) as usize;
        let (head, tail) = buf.split_at_mut(in_base);
        self.base.read_exact_at(head, pos)?;
        tail.fill(0);
        Ok(())
    }
}

/// What writes change, behind one lock.
#[derive(Debug)]
struct Upper {
    /// Chunks present in the upper file.
    map: ChunkMap,
    /// One chunk, for copy-ups.
    scratch: Vec<u8>,
}

/// A copy-on-write disk: reads from the layers, writes to a private upper file.
pub struct Overlay {
    lower: Lower,
    upper_file: File,
    /// Disk length in bytes (at least the base's).
    len: u64,
    upper: Mutex<Upper>,
}

impl std::fmt::Debug for Overlay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Overlay")
            .field("len", &self.len)
            .field("base_len", &self.lower.base_id.len)
            .field("saved", &self.lower.saved.as_ref().map(|s| &s.map))
            // try_lock: never wait (or deadlock) for a log line.
            .field("upper", &self.upper.try_lock().map(|u| u.map.count()).ok())
            .finish()
    }
}

impl Overlay {
    /// An overlay of `len` bytes over `base` (opened read-only; the caller holds its lock for
    /// as long as the overlay lives, which owns the file). `len` may exceed the base's length:
    /// the rest reads as zeros until written. The upper file is created in `upper_dir`.
    pub fn new(base: File, len: u64, upper_dir: &Path) -> Result<Self, OverlayError> {
        let base_id = BaseId::of(&base)?;
        let lower = Lower {
            base,
            base_id,
            saved: None,
        };
        Self::build(lower, len, upper_dir)
    }

    /// The overlay a snapshot restores: `base` (as for [`new`](Self::new)) with the layer
    /// [`save`](Self::save) wrote to `data` and `map` over it, both read-only, and a fresh
    /// private upper in `upper_dir`. The disk has the length it had when saved. Refused: a
    /// damaged or truncated map or data file, another map version, a base whose length or
    /// modification time differs from the one the layer was saved on.
    pub fn restore(
        base: File,
        data: &Path,
        map: &Path,
        upper_dir: &Path,
    ) -> Result<Self, OverlayError> {
        let base_id = BaseId::of(&base)?;
        let (header, chunks) = saved::read_map(map)?;
        if header.base != base_id {
            return Err(OverlayError::BaseChanged {
                what: base_id.differences(&header.base),
            });
        }
        let load = |source| OverlayError::Load {
            path: data.to_path_buf(),
            source,
        };
        let file = File::open(data).map_err(load)?;
        if file.metadata().map_err(load)?.len() != header.disk_len {
            return Err(OverlayError::Damaged {
                path: data.to_path_buf(),
                why: "its length is not the disk's",
            });
        }
        let lower = Lower {
            base,
            base_id,
            saved: Some(SavedLayer { file, map: chunks }),
        };
        Self::build(lower, header.disk_len, upper_dir)
    }

    fn build(lower: Lower, len: u64, upper_dir: &Path) -> Result<Self, OverlayError> {
        if len < lower.base_id.len {
            return Err(OverlayError::Shrink {
                len,
                base_len: lower.base_id.len,
            });
        }
        if len > MAX_LEN {
            return Err(OverlayError::TooLarge(len));
        }
        let upper_file = anonymous_file(upper_dir).map_err(|source| OverlayError::CreateUpper {
            dir: upper_dir.to_path_buf(),
            source,
        })?;
        Ok(Overlay {
            lower,
            upper_file,
            len,
            upper: Mutex::new(Upper {
                map: ChunkMap::for_len(len),
                scratch: vec![0; CHUNK_SIZE as usize],
            }),
        })
    }

    /// Disk length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the disk has no bytes at all.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The base image (e.g. for its device and inode numbers).
    pub fn base(&self) -> &File {
        &self.lower.base
    }

    /// Chunks written since this overlay was created (its upper layer).
    pub fn written_chunks(&self) -> u64 {
        lock(&self.upper).map.count()
    }

    fn check(&self, offset: u64, len: usize) -> Result<(), OverlayError> {
        let len = len as u64;
        match offset.checked_add(len) {
            Some(end) if end <= self.len => Ok(()),
            _ => Err(OverlayError::OutOfRange {
                offset,
                len,
                disk_len: self.len,
            }),
        }
    }

    /// Reads `buf.len()` bytes of the disk at `offset`.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), OverlayError> {
        self.check(offset, buf.len())?;
        let upper = lock(&self.upper);
        let mut pos = offset;
        let mut rest = buf;
        while !rest.is_empty() {
            let (piece, tail) = rest.split_at_mut(piece_len(pos, rest.len()));
            self.read_chunk_piece(&upper.map, pos, piece)
                .map_err(OverlayError::Io)?;
            // In range (checked above).
            pos += piece.len() as u64;
            rest = tail;
        }
        Ok(())
    }

    /// The current bytes of `buf.len()` bytes at `pos`, inside one chunk.
    fn read_chunk_piece(&self, upper: &ChunkMap, pos: u64, buf: &mut [u8]) -> io::Result<()> {
        if upper.get(pos / CHUNK_SIZE) {
            self.upper_file.read_exact_at(buf, pos)
        } else {
            self.lower.read_at(pos, buf)
        }
    }

    /// Writes `data` to the disk at `offset` (into the upper layer, copying up the partly
    /// written chunks first).
    pub fn write_at(&self, offset: u64, data: &[u8]) -> Result<(), OverlayError> {
        self.check(offset, data.len())?;
        let mut upper = lock(&self.upper);
        let Upper { map, scratch } = &mut *upper;
        let mut pos = offset;
        let mut rest = data;
        while !rest.is_empty() {
            let (piece, tail) = rest.split_at(piece_len(pos, rest.len()));
            self.write_chunk_piece(map, scratch, pos, piece)
                .map_err(OverlayError::Io)?;
            pos += piece.len() as u64;
            rest = tail;
        }
        Ok(())
    }

    fn write_chunk_piece(
        &self,
        map: &mut ChunkMap,
        scratch: &mut [u8],
        pos: u64,
        piece: &[u8],
    ) -> io::Result<()> {
        let chunk = pos / CHUNK_SIZE;
        if map.get(chunk) {
            return self.upper_file.write_all_at(piece, pos);
        }
        let start = chunk * CHUNK_SIZE;
        // The last chunk may be short; start <= pos < len.
        let chunk_len = (self.len - start).min(CHUNK_SIZE) as usize;
        if piece.len() == chunk_len {
            self.upper_file.write_all_at(piece, start)?;
        } else {
            let buf = &mut scratch[..chunk_len];
            self.lower.read_at(start, buf)?;
            let at = (pos - start) as usize;
            buf[at..at + piece.len()].copy_from_slice(piece);
            self.upper_file.write_all_at(buf, start)?;
        }
        map.set(chunk);
        Ok(())
    }

    /// Saves what the guest wrote (this overlay's upper and the saved layer it was restored
    /// from, merged) for [`restore`](Self::restore): the chunks to `data`, a sparse file as long as
    /// the disk, and their map to `map` (format in `overlay/saved.rs`). Both files are created
    /// or truncated, written and fsynced; making the pair appear atomically (a temporary
    /// directory renamed into place) is the caller's part. Writes wait meanwhile; call it
    /// with the VM paused so the guest's view and the saved layer agree.
    pub fn save(&self, data: &Path, map: &Path) -> Result<(), OverlayError> {
        let upper = lock(&self.upper);
        let mut chunks = upper.map.clone();
        if let Some(saved) = &self.lower.saved {
            chunks.union(&saved.map);
        }
        let err = |source| OverlayError::Save {
            path: data.to_path_buf(),
            source,
        };
        let out = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(data)
            .map_err(err)?;
        out.set_len(self.len).map_err(err)?;
        let mut buf = vec![0u8; CHUNK_SIZE as usize];
        for chunk in chunks.iter() {
            let start = chunk * CHUNK_SIZE;
            let chunk_len = (self.len - start).min(CHUNK_SIZE) as usize;
            let buf = &mut buf[..chunk_len];
            self.read_chunk_piece(&upper.map, start, buf)
                .map_err(OverlayError::Io)?;
            out.write_all_at(buf, start).map_err(err)?;
        }
        out.sync_all().map_err(err)?;
        let header = saved::MapHeader {
            disk_len: self.len,
            base: self.lower.base_id,
        };
        saved::write_map(map, &header, &chunks)
    }
}

impl BaseId {
    /// What differs from `saved`, for the error message.
    fn differences(&self, saved: &BaseId) -> String {
        if self.len != saved.len {
            format!("length {} bytes, was {}", self.len, saved.len)
        } else {
            "modified since".to_string()
        }
    }
}

/// Length of the piece of an `max`-byte range at `pos` that lies in `pos`'s chunk.
fn piece_len(pos: u64, max: usize) -> usize {
    let to_boundary = CHUNK_SIZE - pos % CHUNK_SIZE;
    // to_boundary <= CHUNK_SIZE, so it fits usize when it is the minimum.
    to_boundary.min(max as u64) as usize
}

/// A new read-write file without a name in `dir`: `O_TMPFILE`, or where the filesystem lacks
/// it, a fresh file unlinked right after creation.
fn anonymous_file(dir: &Path) -> io::Result<File> {
    match OpenOptions::new()
        .read(true)
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_TMPFILE | libc::O_CLOEXEC)
        .open(dir)
    {
        Ok(f) => return Ok(f),
        // EOPNOTSUPP: the filesystem has no O_TMPFILE; EISDIR: the kernel predates it.
        Err(e) if matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP | libc::EISDIR)) => {}
        Err(e) => return Err(e),
    }
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let path = dir.join(format!(".microvm-overlay-{}-{stamp:x}", std::process::id()));
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)?;
    std::fs::remove_file(&path)?;
    Ok(f)
}
