//! Long-mode entry state: GDT, identity page tables, and the vCPU registers the Linux
//! 64-bit boot protocol expects (Documentation/arch/x86/boot.rst, "64-bit boot protocol").

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress};

use crate::layout::{BOOT_STACK_POINTER, GDT_START, PDPT_START, PD_START, PML4_START, ZERO_PAGE_START};
use crate::memory::GuestMemoryMmap;

const X86_CR0_PE: u64 = 0x1;
const X86_CR0_ET: u64 = 0x10;
const X86_CR0_PG: u64 = 0x8000_0000;
const X86_CR4_PAE: u64 = 0x20;
const EFER_LME: u64 = 0x100;
const EFER_LMA: u64 = 0x400;
/// Pages of 1 GiB directories to identity-map: the first 4 GiB.
const IDENTITY_MAP_GIB: u64 = 4;

/// The boot protocol wants __BOOT_CS = 0x10 and __BOOT_DS = 0x18.
const GDT: [u64; 5] = [
    0,                                 // null
    0,                                 // unused
    gdt_entry(0xa09b, 0, 0xfffff),     // 0x10: 64-bit code
    gdt_entry(0xc093, 0, 0xfffff),     // 0x18: data
    gdt_entry(0x808b, 0, 0xfffff),     // 0x20: TSS
];
const CODE_SELECTOR: usize = 2;
const DATA_SELECTOR: usize = 3;
const TSS_SELECTOR: usize = 4;

#[derive(Debug, Error)]
pub enum RegsError {
    #[error("cannot write boot structures to guest memory")]
    Write(#[source] vm_memory::GuestMemoryError),
}

const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << (56 - 24))
        | ((flags as u64 & 0x0000_f0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << (48 - 16))
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

fn segment_from_gdt(entry: u64, index: usize) -> kvm_segment {
    let base = ((entry >> 16) & 0xff_ffff) | ((entry >> 32) & 0xff00_0000);
    let limit = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
    let g = ((entry >> 55) & 1) as u8;
    kvm_segment {
        base,
        // With 4 KiB granularity the byte limit is (limit << 12) | 0xfff.
        limit: if g == 1 { (limit << 12) | 0xfff } else { limit },
        selector: (index * 8) as u16,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        unusable: if (entry >> 47) & 1 == 0 { 1 } else { 0 },
        padding: 0,
    }
}

/// Writes the GDT and the identity-mapped page tables (2 MiB pages, first 4 GiB).
pub fn setup_gdt_and_page_tables(mem: &GuestMemoryMmap) -> Result<(), RegsError> {
    for (i, e) in GDT.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(GDT_START + 8 * i as u64))
            .map_err(RegsError::Write)?;
    }
    mem.write_obj(PDPT_START | 0x03, GuestAddress(PML4_START))
        .map_err(RegsError::Write)?;
    for gib in 0..IDENTITY_MAP_GIB {
        let pd = PD_START + gib * 0x1000;
        mem.write_obj(pd | 0x03, GuestAddress(PDPT_START + gib * 8))
            .map_err(RegsError::Write)?;
        for i in 0..512u64 {
            let addr = (gib << 30) | (i << 21);
            mem.write_obj(addr | 0x83, GuestAddress(pd + i * 8))
                .map_err(RegsError::Write)?;
        }
    }
    Ok(())
}

/// Special registers for 64-bit entry, on top of what KVM_GET_SREGS returned.
pub fn long_mode_sregs(mut sregs: kvm_sregs) -> kvm_sregs {
    let code = segment_from_gdt(GDT[CODE_SELECTOR], CODE_SELECTOR);
    let data = segment_from_gdt(GDT[DATA_SELECTOR], DATA_SELECTOR);
    let tss = segment_from_gdt(GDT[TSS_SELECTOR], TSS_SELECTOR);
    sregs.gdt.base = GDT_START;
    sregs.gdt.limit = (std::mem::size_of_val(&GDT) - 1) as u16;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    sregs.cr0 |= X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
    sregs.cr3 = PML4_START;
    sregs.cr4 |= X86_CR4_PAE;
    sregs.efer |= EFER_LME | EFER_LMA;
    sregs
}

/// General registers: entry point, boot stack, RSI = zero page.
pub fn boot_regs(entry: u64) -> kvm_regs {
    kvm_regs {
        rflags: 0x2,
        rip: entry,
        rsp: BOOT_STACK_POINTER,
        rbp: BOOT_STACK_POINTER,
        rsi: ZERO_PAGE_START,
        ..Default::default()
    }
}

/// x87/SSE state after reset: FCW 0x37f, MXCSR 0x1f80.
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn code_segment_is_64bit() {
        let cs = segment_from_gdt(GDT[CODE_SELECTOR], CODE_SELECTOR);
        assert_eq!(cs.selector, 0x10);
        assert_eq!(cs.l, 1);
        assert_eq!(cs.present, 1);
        assert_eq!(cs.limit, 0xffff_ffff);
        let ds = segment_from_gdt(GDT[DATA_SELECTOR], DATA_SELECTOR);
        assert_eq!(ds.selector, 0x18);
        assert_eq!(ds.db, 1);
    }

    #[test]
    fn identity_map() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        setup_gdt_and_page_tables(&mem).unwrap();
        let pml4: u64 = mem.read_obj(GuestAddress(PML4_START)).unwrap();
        assert_eq!(pml4, PDPT_START | 3);
        let pde: u64 = mem.read_obj(GuestAddress(PD_START + 0x1000 + 8)).unwrap();
        assert_eq!(pde, (1 << 30) | (1 << 21) | 0x83);
    }
}
