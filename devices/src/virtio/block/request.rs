//! One virtio-blk request: parsing a descriptor chain and executing it on the disk image.
//!
//! Accepted layout (what Linux sends): a device-readable header descriptor of at least 16
//! bytes (`type: le32, reserved: le32, sector: le64`), zero or more data descriptors, and a
//! final device-writable status descriptor whose last byte receives the status.
//!
//! Guest mistakes come in two kinds:
//! * the chain cannot carry a status (broken chain, no writable last descriptor):
//!   [`parse`] returns `Err` and the chain is returned with a used length of 0;
//! * anything else: the request fails with `VIRTIO_BLK_S_IOERR` (or `_UNSUPP`).

use std::fs::File;
use std::io;
use std::os::unix::io::AsRawFd;

use smallvec::SmallVec;
use virtio_queue::desc::split::Descriptor;
use vm_memory::bitmap::BitmapSlice;
use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemoryError, GuestMemoryMmap, Permissions,
    ReadVolatile, VolatileMemoryError, VolatileSlice, WriteVolatile,
};

use super::near::Near;
use super::overlay::{Overlay, OverlayError, CHUNK_SIZE};
use super::{
    REQUEST_HEADER_SIZE, SECTOR_SHIFT, SECTOR_SIZE, VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
};

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// The chain is empty or stops early (bad `next` index, loop, unreadable descriptor).
    #[error("descriptor chain is empty or broken")]
    BrokenChain,
    /// The last descriptor cannot hold a status byte (not device-writable, empty, or not
    /// all inside guest memory).
    #[error("last descriptor is not a device-writable status byte in guest memory")]
    NoStatus,
    /// Only a status descriptor.
    #[error("request has no header")]
    MissingHeader,
    /// The header descriptor is device-writable.
    #[error("request header descriptor is device-writable")]
    HeaderWritable,
    /// The header descriptor is shorter than 16 bytes.
    #[error("request header descriptor too short: {0} bytes")]
    HeaderTooShort(u32),
    /// A data descriptor has the wrong direction for the request type.
    #[error("data descriptor has the wrong direction for this request")]
    DataDirection,
    /// IN/OUT data length not a multiple of 512.
    #[error("data length {0} is not a multiple of 512")]
    DataLenUnaligned(u64),
    /// The request touches sectors beyond the end of the disk.
    #[error("sector {sector} + {len} bytes is beyond the disk ({nsectors} sectors)")]
    OutOfRange {
        /// First sector.
        sector: u64,
        /// Data length.
        len: u64,
        /// Disk size in sectors.
        nsectors: u64,
    },
    /// OUT on a read-only disk.
    #[error("write to a read-only disk")]
    ReadOnly,
    /// Guest memory could not be accessed.
    #[error("guest memory access failed")]
    GuestMemory(#[from] GuestMemoryError),
    /// Host I/O on the image failed.
    #[error("disk image I/O failed")]
    Io(#[source] io::Error),
    /// Unknown request type.
    #[error("unsupported request type {0}")]
    Unsupported(u32),
}

impl RequestError {
    /// Status byte to report, or `None` when no status can be written.
    pub fn status(&self) -> Option<u8> {
        match self {
            RequestError::BrokenChain | RequestError::NoStatus => None,
            RequestError::Unsupported(_) => Some(VIRTIO_BLK_S_UNSUPP),
            _ => Some(VIRTIO_BLK_S_IOERR),
        }
    }
}

/// The backing image, shared by the device and its data plane.
#[derive(Debug)]
pub struct Disk {
    backend: Backend,
    nsectors: u64,
    read_only: bool,
    id: [u8; VIRTIO_BLK_ID_BYTES],
}

/// Where the disk's bytes live.
#[derive(Debug)]
enum Backend {
    /// The image file itself: reads and writes go straight between it and guest memory.
    File(File),
    /// A copy-on-write overlay (`--disk PATH,snapshot`).
    Overlay(Overlay),
}

impl Disk {
    /// `disk_len` bytes of `file` are exposed (rounded down to whole sectors). `id` is the
    /// GET_ID answer, truncated to 20 bytes.
    pub fn new(file: File, disk_len: u64, read_only: bool, id: &str) -> Self {
        Self::with_backend(Backend::File(file), disk_len, read_only, id)
    }

    /// A disk whose writes go to `overlay`, all of it exposed (rounded down to whole
    /// sectors). `read_only` still refuses writes (a pointless overlay, but allowed).
    pub fn with_overlay(overlay: Overlay, read_only: bool, id: &str) -> Self {
        let len = overlay.len();
        Self::with_backend(Backend::Overlay(overlay), len, read_only, id)
    }

    fn with_backend(backend: Backend, disk_len: u64, read_only: bool, id: &str) -> Self {
        let mut id_bytes = [0u8; VIRTIO_BLK_ID_BYTES];
        let n = id.len().min(VIRTIO_BLK_ID_BYTES);
        id_bytes[..n].copy_from_slice(&id.as_bytes()[..n]);
        Disk {
            backend,
            nsectors: disk_len >> SECTOR_SHIFT,
            read_only,
            id: id_bytes,
        }
    }

    /// The overlay, for a `,snapshot` disk.
    pub fn overlay(&self) -> Option<&Overlay> {
        match &self.backend {
            Backend::Overlay(o) => Some(o),
            Backend::File(_) => None,
        }
    }

    /// Capacity in 512-byte sectors.
    pub fn nsectors(&self) -> u64 {
        self.nsectors
    }

    /// Whether writes are refused.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// The GET_ID answer.
    pub fn id(&self) -> &[u8; VIRTIO_BLK_ID_BYTES] {
        &self.id
    }
}

/// Request type, from the header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestType {
    /// Read from the disk.
    In,
    /// Write to the disk.
    Out,
    /// Flush the host cache.
    Flush,
    /// Device id string.
    GetId,
    /// Anything else.
    Unsupported(u32),
}

impl From<u32> for RequestType {
    fn from(t: u32) -> Self {
        match t {
            VIRTIO_BLK_T_IN => RequestType::In,
            VIRTIO_BLK_T_OUT => RequestType::Out,
            VIRTIO_BLK_T_FLUSH => RequestType::Flush,
            VIRTIO_BLK_T_GET_ID => RequestType::GetId,
            t => RequestType::Unsupported(t),
        }
    }
}

/// Descriptors of a request held inline: what Linux sends (header, one or two data buffers,
/// status) allocates nothing; a longer chain spills to the heap. An allocation and a free per
/// request were ~5% of the handler's time on 4 KiB reads.
pub type Descriptors = SmallVec<[Descriptor; 4]>;

/// A parsed request.
#[derive(Debug)]
pub struct Request {
    /// Request type.
    pub req_type: RequestType,
    /// First sector (IN/OUT).
    pub sector: u64,
    /// Data descriptors, in order.
    pub data: Descriptors,
    /// Total data length.
    pub data_len: u64,
}

/// Where the status goes, and the request (or why it is invalid).
#[derive(Debug)]
pub struct ParsedChain<'a> {
    /// Guest memory as the request reaches it (see [`Near`]).
    pub mem: Near<'a>,
    /// Address of the status byte.
    pub status_addr: GuestAddress,
    /// The request, or the error to report through the status byte.
    pub request: Result<Request, RequestError>,
}

/// Parses a chain. `Err` means no status byte can be written (drop the chain).
pub fn parse(
    mem: &GuestMemoryMmap,
    chain: impl Iterator<Item = Descriptor>,
) -> Result<ParsedChain<'_>, RequestError> {
    // The chain iterator stops at QUEUE_SIZE descriptors (loops) and on bad indexes; a last
    // descriptor still flagged NEXT means the chain was cut.
    let descs: Descriptors = chain.collect();
    let (first, last) = descs.first().zip(descs.last()).ok_or(RequestError::BrokenChain)?;
    let mem = Near::new(mem, first.addr());
    if last.has_next() {
        return Err(RequestError::BrokenChain);
    }
    if !last.is_write_only() || last.len() == 0 {
        return Err(RequestError::NoStatus);
    }
    // The whole status descriptor must be guest memory, not just its last byte: a 4 GiB
    // "status buffer" that starts in RAM and ends in another region (crossing a hole) is a
    // malformed chain, not a licence to write wherever its end lands (found by fuzzing:
    // devices/fuzz/regressions/virtio_blk/status-into-used-ring).
    if !mem.writable(last.addr(), last.len() as usize) {
        return Err(RequestError::NoStatus);
    }
    let status_addr = last
        .addr()
        .checked_add(u64::from(last.len()) - 1)
        .ok_or(RequestError::NoStatus)?;
    Ok(ParsedChain {
        mem,
        status_addr,
        request: parse_request(&mem, &descs[..descs.len() - 1]),
    })
}

/// Parses header + data descriptors (the chain without its status descriptor).
fn parse_request(mem: &Near<'_>, descs: &[Descriptor]) -> Result<Request, RequestError> {
    let (header, data) = descs.split_first().ok_or(RequestError::MissingHeader)?;
    if header.is_write_only() {
        return Err(RequestError::HeaderWritable);
    }
    if header.len() < REQUEST_HEADER_SIZE {
        return Err(RequestError::HeaderTooShort(header.len()));
    }
    let mut raw = [0u8; REQUEST_HEADER_SIZE as usize];
    mem.read_slice(&mut raw, header.addr())?;
    let (t, rest) = raw.split_at(4);
    let mut t4 = [0u8; 4];
    t4.copy_from_slice(t);
    let mut s8 = [0u8; 8];
    s8.copy_from_slice(&rest[4..12]);
    let req_type = RequestType::from(u32::from_le_bytes(t4));
    let sector = u64::from_le_bytes(s8);

    let writable = match req_type {
        RequestType::In | RequestType::GetId => Some(true),
        RequestType::Out => Some(false),
        // Flush carries no data; anything present is ignored.
        RequestType::Flush => None,
        RequestType::Unsupported(t) => return Err(RequestError::Unsupported(t)),
    };
    if let Some(w) = writable {
        if data.iter().any(|d| d.is_write_only() != w) {
            return Err(RequestError::DataDirection);
        }
    }
    let data_len = data.iter().map(|d| u64::from(d.len())).sum();
    Ok(Request {
        req_type,
        sector,
        data: Descriptors::from_slice(data),
        data_len,
    })
}

impl Request {
    /// Bytes charged to the bandwidth rate limiter.
    pub fn cost_bytes(&self) -> u64 {
        match self.req_type {
            RequestType::In | RequestType::Out => self.data_len,
            _ => 0,
        }
    }

    /// Runs the request; returns the number of bytes written into guest data buffers.
    pub fn execute(&self, mem: &Near<'_>, disk: &Disk) -> Result<u32, RequestError> {
        match self.req_type {
            RequestType::In | RequestType::Out => {
                self.check_range(disk)?;
                let write = self.req_type == RequestType::Out;
                if write && disk.read_only {
                    return Err(RequestError::ReadOnly);
                }
                // check_range ensures this cannot overflow.
                let offset = self.sector << SECTOR_SHIFT;
                let file = match &disk.backend {
                    Backend::File(file) => file,
                    Backend::Overlay(overlay) => {
                        overlay_io(mem.mem, overlay, offset, &self.data, self.data_len, write)?;
                        return Ok(if write { 0 } else { self.data_len as u32 });
                    }
                };
                let mut file = FileAt { file, offset };
                for d in &self.data {
                    if write {
                        guest_to_file(mem, d.addr(), d.len() as usize, &mut file)?;
                    } else {
                        file_to_guest(mem, d.addr(), d.len() as usize, &mut file)?;
                    }
                }
                // A chain is at most 2^32 - 1 bytes long (checked by virtio-queue).
                Ok(if write { 0 } else { self.data_len as u32 })
            }
            RequestType::Flush => {
                // An overlay has nothing to make durable: its upper file is thrown away at
                // exit and its lower layers are never written.
                if let Backend::File(file) = &disk.backend {
                    file.sync_data().map_err(RequestError::Io)?;
                }
                Ok(0)
            }
            RequestType::GetId => {
                let mut id: &[u8] = &disk.id;
                let mut written = 0u32;
                for d in &self.data {
                    if id.is_empty() {
                        break;
                    }
                    let n = id.len().min(d.len() as usize);
                    mem.write_slice(&id[..n], d.addr())?;
                    id = &id[n..];
                    written += n as u32;
                }
                Ok(written)
            }
            RequestType::Unsupported(t) => Err(RequestError::Unsupported(t)),
        }
    }

    fn check_range(&self, disk: &Disk) -> Result<(), RequestError> {
        if !self.data_len.is_multiple_of(SECTOR_SIZE) {
            return Err(RequestError::DataLenUnaligned(self.data_len));
        }
        let end = self.sector.checked_add(self.data_len >> SECTOR_SHIFT);
        match end {
            Some(end) if end <= disk.nsectors => Ok(()),
            _ => Err(RequestError::OutOfRange {
                sector: self.sector,
                len: self.data_len,
                nsectors: disk.nsectors,
            }),
        }
    }
}

/// IN/OUT on an overlay disk, through a bounce buffer. The guest's data is treated as one
/// stream over its descriptors and cut at chunk boundaries, so each overlay call covers as
/// much of one chunk as the request does (a request covering a whole chunk needs no
/// copy-up). Not zero-copy, unlike plain disks: a copy-up must merge the guest's bytes with
/// the lower chunk in a buffer anyway, and the bounce keeps the overlay a byte-range API that
/// knows nothing of guest memory; one memcpy per request is small next to its syscalls.
fn overlay_io(
    mem: &GuestMemoryMmap,
    overlay: &Overlay,
    offset: u64,
    data: &[Descriptor],
    data_len: u64,
    write: bool,
) -> Result<(), RequestError> {
    let mut buf = vec![0u8; data_len.min(CHUNK_SIZE) as usize];
    let mut guest = GuestStream {
        mem,
        descs: data,
        done: 0,
    };
    let mut pos = offset;
    let mut remaining = data_len;
    while remaining > 0 {
        // The part of the request inside pos's chunk.
        let n = (CHUNK_SIZE - pos % CHUNK_SIZE).min(remaining) as usize;
        let piece = &mut buf[..n];
        if write {
            guest.read(piece)?;
            overlay.write_at(pos, piece).map_err(overlay_to_request)?;
        } else {
            overlay.read_at(pos, piece).map_err(overlay_to_request)?;
            guest.write(piece)?;
        }
        pos += n as u64;
        remaining -= n as u64;
    }
    Ok(())
}

fn overlay_to_request(e: OverlayError) -> RequestError {
    match e {
        OverlayError::Io(e) => RequestError::Io(e),
        // check_range already refused requests beyond the disk.
        other => RequestError::Io(io::Error::other(other)),
    }
}

/// The data descriptors of a request as one byte stream.
struct GuestStream<'a> {
    mem: &'a GuestMemoryMmap,
    descs: &'a [Descriptor],
    /// Bytes of `descs[0]` already consumed.
    done: u32,
}

impl GuestStream<'_> {
    /// The next `want` bytes' place: (address, length) inside the current descriptor.
    fn next(&mut self, want: usize) -> Result<(GuestAddress, usize), RequestError> {
        while let Some(d) = self.descs.first() {
            if self.done < d.len() {
                let n = ((d.len() - self.done) as usize).min(want);
                let addr =
                    d.addr()
                        .checked_add(u64::from(self.done))
                        .ok_or(RequestError::GuestMemory(
                            GuestMemoryError::InvalidGuestAddress(d.addr()),
                        ))?;
                // n <= d.len() - done, so done + n <= d.len().
                self.done += n as u32;
                return Ok((addr, n));
            }
            self.descs = &self.descs[1..];
            self.done = 0;
        }
        // Unreachable: the pieces add up to data_len, the descriptors' total.
        Err(RequestError::Io(io::ErrorKind::UnexpectedEof.into()))
    }

    /// Fills `buf` from guest memory.
    fn read(&mut self, mut buf: &mut [u8]) -> Result<(), RequestError> {
        while !buf.is_empty() {
            let (addr, n) = self.next(buf.len())?;
            let (head, tail) = buf.split_at_mut(n);
            self.mem.read_slice(head, addr)?;
            buf = tail;
        }
        Ok(())
    }

    /// Copies `buf` into guest memory.
    fn write(&mut self, mut buf: &[u8]) -> Result<(), RequestError> {
        while !buf.is_empty() {
            let (addr, n) = self.next(buf.len())?;
            let (head, tail) = buf.split_at(n);
            self.mem.write_slice(head, addr)?;
            buf = tail;
        }
        Ok(())
    }
}

/// Copies `len` bytes of the image at `file.offset` into guest memory (pread, no bounce).
fn file_to_guest(mem: &Near<'_>, addr: GuestAddress, len: usize, file: &mut FileAt<'_>) -> Result<(), RequestError> {
    mem.for_each_slice(addr, len, Permissions::Write, |mut slice| {
        file.read_exact_volatile(&mut slice).map_err(volatile_to_request)
    })
}

/// Copies `len` bytes of guest memory into the image at `file.offset` (pwrite, no bounce).
fn guest_to_file(mem: &Near<'_>, addr: GuestAddress, len: usize, file: &mut FileAt<'_>) -> Result<(), RequestError> {
    mem.for_each_slice(addr, len, Permissions::Read, |slice| {
        file.write_all_volatile(&slice).map_err(volatile_to_request)
    })
}

fn volatile_to_request(e: VolatileMemoryError) -> RequestError {
    match e {
        VolatileMemoryError::IOError(e) => RequestError::Io(e),
        other => RequestError::GuestMemory(GuestMemoryError::from(other)),
    }
}

/// A file cursor doing positioned I/O (pread/pwrite) straight into/out of guest memory.
struct FileAt<'a> {
    file: &'a File,
    offset: u64,
}

impl FileAt<'_> {
    fn off(&self) -> Result<libc::off64_t, VolatileMemoryError> {
        libc::off64_t::try_from(self.offset)
            .map_err(|_| VolatileMemoryError::IOError(io::Error::from(io::ErrorKind::InvalidInput)))
    }
}

impl ReadVolatile for FileAt<'_> {
    fn read_volatile<B: BitmapSlice>(
        &mut self,
        buf: &mut VolatileSlice<B>,
    ) -> Result<usize, VolatileMemoryError> {
        let off = self.off()?;
        let guard = buf.ptr_guard_mut();
        // SAFETY: the fd is valid for the life of `self.file`; `guard` points to `buf.len()`
        // bytes of mapped guest memory, valid for writes while the guard lives (VolatileSlice
        // invariant). pread writes at most `buf.len()` bytes there.
        let ret = unsafe {
            libc::pread64(
                self.file.as_raw_fd(),
                guard.as_ptr().cast::<libc::c_void>(),
                buf.len(),
                off,
            )
        };
        if ret < 0 {
            buf.bitmap().mark_dirty(0, buf.len());
            return Err(VolatileMemoryError::IOError(io::Error::last_os_error()));
        }
        // ret is in 0..=buf.len().
        let n = ret as usize;
        buf.bitmap().mark_dirty(0, n);
        self.offset += n as u64;
        Ok(n)
    }
}

impl WriteVolatile for FileAt<'_> {
    fn write_volatile<B: BitmapSlice>(
        &mut self,
        buf: &VolatileSlice<B>,
    ) -> Result<usize, VolatileMemoryError> {
        let off = self.off()?;
        let guard = buf.ptr_guard();
        // SAFETY: the fd is valid for the life of `self.file`; `guard` points to `buf.len()`
        // bytes of mapped guest memory, valid for reads while the guard lives. pwrite only
        // reads from it.
        let ret = unsafe {
            libc::pwrite64(
                self.file.as_raw_fd(),
                guard.as_ptr().cast::<libc::c_void>(),
                buf.len(),
                off,
            )
        };
        if ret < 0 {
            return Err(VolatileMemoryError::IOError(io::Error::last_os_error()));
        }
        let n = ret as usize;
        self.offset += n as u64;
        Ok(n)
    }
}
