//! Direct 64-bit Linux boot: kernel (ELF vmlinux or bzImage) and initrd into guest memory,
//! the zero page with its e820 map, the command line, and an MP table for the vCPUs.

pub mod initramfs;
pub mod mptable;
pub mod regs;

use std::path::{Path, PathBuf};

use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::boot_params;
use linux_loader::loader::bzimage::BzImage;
use linux_loader::loader::elf::Elf;
use linux_loader::loader::{load_cmdline, KernelLoader, KernelLoaderResult};
use thiserror::Error;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

use crate::config::kernel::{open_file, KernelError};
use crate::layout::*;
use crate::memory::{low_ram_end, GuestMemoryMmap};

const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x0100_0000;
const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
/// Offset of the 64-bit entry point from the start of a bzImage's protected-mode code.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;

#[derive(Debug, Error)]
pub enum BootError {
    #[error(transparent)]
    Open(#[from] KernelError),
    #[error("'{path}' is not a kernel microvm can boot (ELF vmlinux or bzImage): {elf}; {bzimage}")]
    NotAKernel {
        path: PathBuf,
        elf: linux_loader::loader::Error,
        bzimage: linux_loader::loader::Error,
    },
    #[error("initrd '{path}' ({size} bytes) does not fit in guest memory below {limit:#x}")]
    InitrdTooBig { path: PathBuf, size: u64, limit: u64 },
    #[error("microvm's initramfs ({size} bytes) does not fit in guest memory below {limit:#x} (more --memory?)")]
    InitramfsTooBig { size: u64, limit: u64 },
    #[error("cannot load microvm's initramfs into guest memory")]
    InitramfsLoad(#[source] vm_memory::GuestMemoryError),
    #[error("cannot load initrd '{path}' into guest memory")]
    InitrdLoad {
        path: PathBuf,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    #[error("kernel command line is invalid or longer than {max} bytes")]
    Cmdline {
        max: usize,
        #[source]
        source: linux_loader::cmdline::Error,
    },
    #[error("cannot write the kernel command line to guest memory")]
    CmdlineLoad(#[source] linux_loader::loader::Error),
    #[error("cannot write the zero page")]
    ZeroPage(#[source] linux_loader::configurator::Error),
    #[error("cannot write the MP table")]
    MpTable(#[from] mptable::MpTableError),
    #[error("cannot set up boot page tables / GDT")]
    Regs(#[from] regs::RegsError),
}

/// Where the vCPUs start.
#[derive(Clone, Copy, Debug)]
pub struct BootInfo {
    pub entry: GuestAddress,
}

/// Loads the kernel, trying ELF first and bzImage second.
pub fn load_kernel(
    mem: &GuestMemoryMmap,
    path: &Path,
) -> Result<(KernelLoaderResult, GuestAddress), BootError> {
    let mut f = open_file("kernel", path)?;
    let elf = match Elf::load(mem, None, &mut f, Some(GuestAddress(HIGH_MEMORY_START))) {
        Ok(r) => {
            let entry = r.kernel_load;
            return Ok((r, entry));
        }
        Err(e) => e,
    };
    let mut f = open_file("kernel", path)?;
    match BzImage::load(mem, None, &mut f, Some(GuestAddress(HIGH_MEMORY_START))) {
        Ok(r) => {
            let entry = r
                .kernel_load
                .unchecked_add(BZIMAGE_64BIT_ENTRY_OFFSET);
            Ok((r, entry))
        }
        Err(bzimage) => Err(BootError::NotAKernel {
            path: path.to_path_buf(),
            elf,
            bzimage,
        }),
    }
}

/// Loads the initrd page-aligned near the top of low RAM; returns (address, size).
pub fn load_initrd(mem: &GuestMemoryMmap, path: &Path) -> Result<(GuestAddress, u64), BootError> {
    let mut f = open_file("initrd", path)?;
    let size = f
        .metadata()
        .map_err(|source| KernelError::Open { kind: "initrd", path: path.to_path_buf(), source })?
        .len();
    let addr = initrd_addr(mem, size).ok_or(BootError::InitrdTooBig {
        path: path.to_path_buf(),
        size,
        limit: low_ram_end(mem),
    })?;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut f, size as usize)
        .map_err(|source| BootError::InitrdLoad {
            path: path.to_path_buf(),
            source,
        })?;
    Ok((GuestAddress(addr), size))
}

/// Loads an initramfs held in memory (microvm's own) where `load_initrd` would put a file.
pub fn load_initrd_bytes(mem: &GuestMemoryMmap, bytes: &[u8]) -> Result<(GuestAddress, u64), BootError> {
    let size = bytes.len() as u64;
    let addr = initrd_addr(mem, size).ok_or(BootError::InitramfsTooBig { size, limit: low_ram_end(mem) })?;
    mem.write_slice(bytes, GuestAddress(addr)).map_err(BootError::InitramfsLoad)?;
    Ok((GuestAddress(addr), size))
}

/// Page-aligned address of an initrd of `size` bytes at the top of low RAM, above the kernel.
fn initrd_addr(mem: &GuestMemoryMmap, size: u64) -> Option<u64> {
    low_ram_end(mem)
        .checked_sub(size)
        .map(|a| a & !0xfff)
        .filter(|a| *a >= HIGH_MEMORY_START)
}

/// Builds a Cmdline from microvm's parts, in order.
pub fn build_cmdline(parts: &[String]) -> Result<Cmdline, BootError> {
    let max = crate::config::CMDLINE_MAX;
    let mut c = Cmdline::new(max).map_err(|source| BootError::Cmdline { max, source })?;
    for p in parts.iter().filter(|p| !p.trim().is_empty()) {
        c.insert_str(p.trim())
            .map_err(|source| BootError::Cmdline { max, source })?;
    }
    Ok(c)
}

/// Writes the command line, the zero page (e820 + setup header + initrd), the MP table,
/// the GDT and identity page tables. Returns the entry point.
pub fn configure(
    mem: &GuestMemoryMmap,
    kernel: &KernelLoaderResult,
    entry: GuestAddress,
    cmdline: &Cmdline,
    initrd: Option<(GuestAddress, u64)>,
    cpus: u8,
) -> Result<BootInfo, BootError> {
    load_cmdline(mem, GuestAddress(CMDLINE_START), cmdline).map_err(BootError::CmdlineLoad)?;
    let cmdline_len = cmdline
        .as_cstring()
        .map(|c| c.as_bytes().len())
        .unwrap_or(0);

    let mut params = boot_params::default();
    if let Some(hdr) = kernel.setup_header {
        params.hdr = hdr;
    } else {
        params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
        params.hdr.header = KERNEL_HDR_MAGIC;
        params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_len as u32;
    if let Some((addr, size)) = initrd {
        params.hdr.ramdisk_image = addr.raw_value() as u32;
        params.hdr.ramdisk_size = size as u32;
    }

    let mut e820 = vec![
        (0, EBDA_START, E820_RAM),
        (EBDA_START, 0xa0000 - EBDA_START, E820_RESERVED),
    ];
    let low_end = low_ram_end(mem);
    e820.push((HIGH_MEMORY_START, low_end - HIGH_MEMORY_START, E820_RAM));
    let high = mem.last_addr().raw_value() + 1;
    if high > MMIO_GAP_END {
        e820.push((MMIO_GAP_END, high - MMIO_GAP_END, E820_RAM));
    }
    for (i, (addr, size, typ)) in e820.iter().enumerate() {
        params.e820_table[i].addr = *addr;
        params.e820_table[i].size = *size;
        params.e820_table[i].r#type = *typ;
    }
    params.e820_entries = e820.len() as u8;

    LinuxBootConfigurator::write_bootparams(
        &BootParams::new(&params, GuestAddress(ZERO_PAGE_START)),
        mem,
    )
    .map_err(BootError::ZeroPage)?;

    mptable::setup(mem, cpus)?;
    regs::setup_gdt_and_page_tables(mem)?;
    Ok(BootInfo { entry })
}
