//! Guest RAM in a snapshot: written as one sparse file (all-zero pages become holes, so a
//! 128 MiB guest that touched 30 MiB costs ~30 MiB of disk), and mapped back MAP_PRIVATE:
//! pages load lazily from the page cache on first touch and a guest write copies only that
//! page, so many restores of one snapshot share its memory.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{
    Address, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, GuestRegionMmap,
    MemoryRegionAddress,
};

use super::SnapshotError;
use crate::memory::GuestMemoryMmap;

const PAGE: usize = 4096;
/// Guest memory is read through a bounce buffer of this size (vm-memory's volatile copy:
/// device threads could still write, so no `&[u8]` over guest memory).
const CHUNK: usize = 1 << 20;

/// One guest RAM region and where its bytes are in the `memory` file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryRange {
    pub guest_addr: u64,
    pub size: u64,
    pub file_offset: u64,
}

/// Checks ranges read from a state file: page-aligned, sorted, not overlapping, packed one
/// after another in the file, at most `max_bytes` in all. Returns the file size they need.
pub fn validate_ranges(ranges: &[MemoryRange], max_bytes: u64) -> Result<u64, String> {
    if ranges.is_empty() {
        return Err("no guest memory".into());
    }
    let mut file_end = 0u64;
    let mut guest_end = 0u64;
    for r in ranges {
        let page = PAGE as u64;
        if r.size == 0 || r.size % page != 0 || r.guest_addr % page != 0 {
            return Err(format!(
                "memory range {:#x}+{:#x} is not page-aligned",
                r.guest_addr, r.size
            ));
        }
        if r.guest_addr < guest_end {
            return Err(format!(
                "memory range {:#x} overlaps the one before",
                r.guest_addr
            ));
        }
        if r.file_offset != file_end {
            return Err(format!(
                "memory range {:#x} is at file offset {:#x}, expected {file_end:#x}",
                r.guest_addr, r.file_offset
            ));
        }
        guest_end = r
            .guest_addr
            .checked_add(r.size)
            .ok_or("memory range wraps")?;
        file_end = file_end
            .checked_add(r.size)
            .ok_or("memory size overflows")?;
        if file_end > max_bytes {
            return Err(format!("more than {} MiB of guest memory", max_bytes >> 20));
        }
    }
    Ok(file_end)
}

/// What writing the memory file did.
#[derive(Clone, Copy, Debug, Default)]
pub struct WriteStats {
    /// Size of guest RAM (the file's length).
    pub size: u64,
    /// Bytes actually written (non-zero pages).
    pub written: u64,
}

/// Writes every region of `mem` into `file` (empty, just created), regions one after the
/// other, skipping all-zero pages. The caller fsyncs.
pub fn write(
    file: &File,
    path: &Path,
    mem: &GuestMemoryMmap,
) -> Result<(Vec<MemoryRange>, WriteStats), SnapshotError> {
    let io = |what| {
        move |source| SnapshotError::Io {
            what,
            path: path.to_path_buf(),
            source,
        }
    };
    let mut ranges = Vec::new();
    let mut stats = WriteStats::default();
    let mut buf = vec![0u8; CHUNK];
    let pagemap = Pagemap::open();
    for region in mem.iter() {
        let size = region.len();
        ranges.push(MemoryRange {
            guest_addr: region.start_addr().raw_value(),
            size,
            file_offset: stats.size,
        });
        let base = stats.size;
        stats.size += size;
        // Holes everywhere first; only non-zero pages are written below.
        file.set_len(stats.size).map_err(io("cannot size"))?;
        // Only in anonymous RAM is a never-touched page known to be zero; an unmapped page of
        // a file mapping (a restored guest's RAM) still holds the file's bytes.
        let anonymous = region.file_offset().is_none();
        let mut off = 0u64;
        while off < size {
            let n = (size - off).min(CHUNK as u64) as usize;
            let pages = n.div_ceil(PAGE);
            let touched = match anonymous {
                true => pagemap.touched(region.as_ptr() as usize + off as usize, pages),
                false => None,
            };
            let is_touched = |p: usize| touched.as_ref().is_none_or(|t| t[p]);
            let mut p = 0;
            while p < pages {
                if !is_touched(p) {
                    p += 1;
                    continue;
                }
                let start = p;
                while p < pages && is_touched(p) {
                    p += 1;
                }
                let (from, to) = (start * PAGE, (p * PAGE).min(n));
                let slice = region
                    .get_slice(MemoryRegionAddress(off + from as u64), to - from)
                    .map_err(|e| SnapshotError::Io {
                        what: "cannot read guest memory for",
                        path: path.to_path_buf(),
                        source: std::io::Error::other(e),
                    })?;
                let got = slice.copy_to(&mut buf[..to - from]);
                stats.written += write_nonzero(file, &buf[..got], base + off + from as u64)
                    .map_err(io("cannot write"))?;
            }
            off += n as u64;
        }
    }
    Ok((ranges, stats))
}

/// Writes the non-zero pages of `data` (read from guest memory) at `at` in `file`, runs of
/// them in one call. Returns the bytes written.
fn write_nonzero(file: &File, data: &[u8], at: u64) -> std::io::Result<u64> {
    let mut written = 0;
    let page_at = |p: usize| &data[p..(p + PAGE).min(data.len())];
    let mut page = 0;
    while page < data.len() {
        if is_zero(page_at(page)) {
            page += PAGE;
            continue;
        }
        let start = page;
        while page < data.len() && !is_zero(page_at(page)) {
            page += PAGE;
        }
        let end = page.min(data.len());
        file.write_all_at(&data[start..end], at + start as u64)?;
        written += (end - start) as u64;
    }
    Ok(written)
}

/// /proc/self/pagemap: which pages of our own anonymous memory were ever touched (present
/// or swapped). Reading a never-touched page would fault the zero page in, one fault per
/// page: ~6 us each on the nested hosts here, 190 ms for an untouched 128 MiB guest, while
/// the pagemap answer costs microseconds. Without pagemap every page is read.
struct Pagemap(Option<File>);

impl Pagemap {
    const PRESENT: u64 = 1 << 63;
    const SWAPPED: u64 = 1 << 62;

    fn open() -> Self {
        Pagemap(File::open("/proc/self/pagemap").ok())
    }

    /// For `pages` pages from host address `addr` (page-aligned): touched or not.
    fn touched(&self, addr: usize, pages: usize) -> Option<Vec<bool>> {
        let file = self.0.as_ref()?;
        let mut raw = vec![0u8; pages * 8];
        file.read_exact_at(&mut raw, (addr / PAGE) as u64 * 8)
            .ok()?;
        Some(
            raw.chunks_exact(8)
                .map(|e| {
                    let v = u64::from_le_bytes(e.try_into().unwrap_or_default());
                    v & (Self::PRESENT | Self::SWAPPED) != 0
                })
                .collect(),
        )
    }
}

/// A slice comparison is a memcmp: fast even in unoptimised builds.
fn is_zero(bytes: &[u8]) -> bool {
    static ZERO: [u8; PAGE] = [0; PAGE];
    bytes == &ZERO[..bytes.len()]
}

/// Maps the snapshot's memory file as guest RAM: MAP_PRIVATE (copy-on-write, the file is
/// never written) and MAP_NORESERVE. `ranges` were checked by `validate_ranges` and the
/// file's length against them (format::load), so every mapping lies inside the file.
pub fn map(
    file: &Arc<File>,
    path: &Path,
    ranges: &[MemoryRange],
) -> Result<GuestMemoryMmap, SnapshotError> {
    let mut regions = Vec::with_capacity(ranges.len());
    for r in ranges {
        let bad = |reason: String| SnapshotError::Corrupt {
            path: path.to_path_buf(),
            reason,
        };
        let size = usize::try_from(r.size)
            .map_err(|_| bad(format!("memory range of {:#x} bytes", r.size)))?;
        let mapping = MmapRegionBuilder::new(size)
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
            .with_file_offset(FileOffset::from_arc(file.clone(), r.file_offset))
            .build()
            .map_err(|source| SnapshotError::Mmap {
                path: path.to_path_buf(),
                source,
            })?;
        let region =
            GuestRegionMmap::new(mapping, GuestAddress(r.guest_addr)).ok_or_else(|| {
                bad(format!(
                    "memory range {:#x}+{:#x} wraps",
                    r.guest_addr, r.size
                ))
            })?;
        regions.push(region);
    }
    GuestMemoryMmap::from_regions(regions).map_err(SnapshotError::Layout)
}

/// Gives every region of `mem` to KVM as a memory slot (slots 0, 1, ... in address order).
pub fn register(vm: &VmFd, mem: &GuestMemoryMmap) -> Result<(), SnapshotError> {
    for (slot, region) in mem.iter().enumerate() {
        let desc = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: region.start_addr().raw_value(),
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
        };
        // SAFETY: the host range is a live mapping owned by `mem`; the caller keeps `mem`
        // alive as long as the VM (as for booted guests, see crate::memory::create), and the
        // regions of a GuestMemoryMmap do not overlap.
        unsafe { vm.set_user_memory_region(desc) }
            .map_err(super::kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(guest_addr: u64, size: u64, file_offset: u64) -> MemoryRange {
        MemoryRange {
            guest_addr,
            size,
            file_offset,
        }
    }

    #[test]
    fn ranges_are_checked() {
        let low = 0xc000_0000;
        assert_eq!(
            validate_ranges(&[r(0, 128 << 20, 0)], 1 << 40),
            Ok(128 << 20)
        );
        assert_eq!(
            validate_ranges(&[r(0, low, 0), r(1 << 32, 1 << 30, low)], 1 << 40),
            Ok(low + (1 << 30))
        );
        for bad in [
            vec![],
            vec![r(0, 4095, 0)],
            vec![r(0, 0, 0)],
            vec![r(0, 8192, 0), r(4096, 4096, 8192)],
            vec![r(0, 4096, 4096)],
            vec![r(u64::MAX - 4095, 8192, 0)],
            vec![r(0, 2 << 40, 0)],
        ] {
            assert!(validate_ranges(&bad, 1 << 40).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn sparse_write_and_private_map() {
        let dir = crate::snapshot::tests::tempdir("sparse");
        let path = dir.join("memory");
        let mem = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 8 << 20),
            (GuestAddress(1 << 32), 1 << 20),
        ])
        .unwrap();
        use vm_memory::Bytes;
        // Touch 3 pages, two of them adjacent, one in the high region; one byte at a page's end.
        mem.write_slice(&[1u8; PAGE * 2], GuestAddress(0x10000))
            .unwrap();
        mem.write_obj(0xabu8, GuestAddress(0x40fff)).unwrap();
        mem.write_obj(0x5a5a_5a5au32, GuestAddress((1 << 32) + 0x2000))
            .unwrap();
        let file = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .unwrap();
        let (ranges, stats) = write(&file, &path, &mem).unwrap();
        assert_eq!(ranges, vec![r(0, 8 << 20, 0), r(1 << 32, 1 << 20, 8 << 20)]);
        assert_eq!(stats.size, 9 << 20);
        assert_eq!(stats.written, 4 * PAGE as u64);
        let meta = file.metadata().unwrap();
        assert_eq!(meta.len(), 9 << 20);
        use std::os::unix::fs::MetadataExt;
        assert!(
            meta.blocks() * 512 <= 64 << 10,
            "file is not sparse: {} blocks",
            meta.blocks()
        );

        let file = Arc::new(File::open(&path).unwrap());
        let back = map(&file, &path, &ranges).unwrap();
        let mut a = vec![0u8; 8 << 20];
        let mut b = vec![0u8; 8 << 20];
        mem.read_slice(&mut a, GuestAddress(0)).unwrap();
        back.read_slice(&mut b, GuestAddress(0)).unwrap();
        assert!(a == b, "low region differs after the round trip");
        assert_eq!(
            back.read_obj::<u32>(GuestAddress((1 << 32) + 0x2000))
                .unwrap(),
            0x5a5a_5a5a
        );
        // Private: writing the mapping leaves the file alone.
        back.write_obj(0xffu8, GuestAddress(0x10000)).unwrap();
        let mut byte = [0u8];
        file.read_exact_at(&mut byte, 0x10000).unwrap();
        assert_eq!(byte[0], 1);

        // Saving a restored guest: its never-touched pages are file pages, not zeros, and
        // must be read (only anonymous memory is skipped by the pagemap).
        let back = map(&file, &path, &ranges).unwrap();
        let again = dir.join("again");
        let out = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&again)
            .unwrap();
        let (_, stats) = write(&out, &again, &back).unwrap();
        assert_eq!(stats.written, 4 * PAGE as u64);
        assert!(std::fs::read(&path).unwrap() == std::fs::read(&again).unwrap());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
