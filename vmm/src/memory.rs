//! Guest RAM: host memory mmap'd by vm-memory and registered with KVM. Anonymous private
//! memory, unless another process must map it too (a vhost-user backend such as virtiofsd):
//! then one memfd mapped MAP_SHARED, whose fd and offsets go to the backend.

use std::fs::File;
use std::os::fd::FromRawFd;

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use thiserror::Error;
use vm_memory::{Address, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::layout::{MMIO_GAP_END, MMIO_GAP_START};

pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<()>;

#[derive(Debug, Error)]
pub enum MemoryError {
    #[error("cannot create a {mib} MiB memfd for shareable guest memory")]
    Memfd {
        mib: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot map {mib} MiB of guest memory")]
    Mmap {
        mib: u64,
        #[source]
        source: vm_memory::mmap::FromRangesError,
    },
    #[error("KVM refused guest memory slot {slot}")]
    Register {
        slot: u32,
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// RAM ranges for `size` bytes: below the MMIO gap first, the rest from 4 GiB.
pub fn ram_ranges(size: u64) -> Vec<(GuestAddress, usize)> {
    let low = size.min(MMIO_GAP_START);
    let mut ranges = vec![(GuestAddress(0), low as usize)];
    if size > low {
        ranges.push((GuestAddress(MMIO_GAP_END), (size - low) as usize));
    }
    ranges
}

/// Allocates guest RAM (`shared`: in a memfd, mapped MAP_SHARED) and registers every region
/// with KVM.
pub fn create(vm: &VmFd, mib: u64, shared: bool) -> Result<GuestMemoryMmap, MemoryError> {
    let ranges = ram_ranges(mib << 20);
    let mem = if shared {
        let file = memfd(mib)?;
        let mut offset = 0u64;
        let with_files: Vec<_> = ranges
            .iter()
            .map(|&(addr, len)| {
                let r = (addr, len, Some(FileOffset::new(file.try_clone()?, offset)));
                offset += len as u64;
                Ok(r)
            })
            .collect::<std::io::Result<_>>()
            .map_err(|source| MemoryError::Memfd { mib, source })?;
        GuestMemoryMmap::from_ranges_with_files(with_files)
    } else {
        GuestMemoryMmap::from_ranges(&ranges)
    }
    .map_err(|source| MemoryError::Mmap { mib, source })?;
    for (slot, region) in mem.iter().enumerate() {
        let slot = slot as u32;
        let region_desc = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: region.start_addr().raw_value(),
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
        };
        // SAFETY: the host range belongs to `mem`, which the caller keeps alive (it is
        // owned by the Vm, which outlives every vCPU), and the slots don't overlap.
        unsafe { vm.set_user_memory_region(region_desc) }
            .map_err(|source| MemoryError::Register { slot, source })?;
    }
    Ok(mem)
}

/// A memfd of `mib` MiB (sparse: pages are allocated when first touched, as with anonymous
/// memory).
fn memfd(mib: u64) -> Result<File, MemoryError> {
    let err = |source| MemoryError::Memfd { mib, source };
    // SAFETY: a static NUL-terminated name and valid flags; returns a new fd or -1.
    let fd = unsafe { libc::memfd_create(c"microvm-guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(err(std::io::Error::last_os_error()));
    }
    // SAFETY: a fresh descriptor nobody else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(mib << 20).map_err(err)?;
    Ok(file)
}

/// End of RAM below the MMIO gap (exclusive).
pub fn low_ram_end(mem: &GuestMemoryMmap) -> u64 {
    mem.iter()
        .map(|r| r.start_addr().raw_value() + r.len())
        .filter(|end| *end <= MMIO_GAP_START)
        .max()
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_split_around_the_gap() {
        assert_eq!(ram_ranges(128 << 20), vec![(GuestAddress(0), 128 << 20)]);
        let r = ram_ranges(4 << 30);
        assert_eq!(r[0], (GuestAddress(0), MMIO_GAP_START as usize));
        assert_eq!(r[1], (GuestAddress(MMIO_GAP_END), ((4 << 30) - MMIO_GAP_START) as usize));
    }

    #[test]
    fn shared_memory_is_one_memfd_at_consecutive_offsets() {
        let kvm = kvm_ioctls::Kvm::new().unwrap();
        let vm = kvm.create_vm().unwrap();
        let mib = (MMIO_GAP_START >> 20) + 64; // both sides of the gap
        let mem = create(&vm, mib, true).unwrap();
        let regions: Vec<_> = mem.iter().collect();
        assert_eq!(regions.len(), 2);
        let f0 = regions[0].file_offset().expect("low region is file backed");
        let f1 = regions[1].file_offset().expect("high region is file backed");
        assert_eq!((f0.start(), f1.start()), (0, MMIO_GAP_START));
        assert_eq!(f0.file().metadata().unwrap().len(), mib << 20);
        // The same bytes through the mapping and through the file.
        use std::os::unix::fs::FileExt;
        use vm_memory::Bytes;
        mem.write_obj(0xabcd_u16, GuestAddress(MMIO_GAP_END)).unwrap();
        let mut b = [0u8; 2];
        f1.file().read_exact_at(&mut b, MMIO_GAP_START).unwrap();
        assert_eq!(u16::from_le_bytes(b), 0xabcd);
        let private = create(&kvm.create_vm().unwrap(), 64, false).unwrap();
        assert!(private.iter().all(|r| r.file_offset().is_none()));
    }
}
