//! Intel MultiProcessor Specification 1.4 table, so a guest without ACPI sees every vCPU,
//! the IOAPIC and the ISA interrupt routing. Written byte by byte (little endian) instead
//! of through packed structs: no unsafe, and the layout is plain to read against the spec.

use thiserror::Error;
use vm_memory::{Bytes, GuestAddress};

use crate::layout::{APIC_ADDR, EBDA_START, IOAPIC_ADDR, IOAPIC_PINS};
use crate::memory::GuestMemoryMmap;

const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTPROCESSOR: u8 = 2;
const MP_INT: u8 = 0;
const MP_NMI: u8 = 1;
const MP_EXTINT: u8 = 3;
/// Size of the area below 640 KiB we reserve (EBDA_START..0xa0000).
const MAX_TABLE_SIZE: usize = 0xa0000 - EBDA_START as usize;

#[derive(Debug, Error)]
pub enum MpTableError {
    #[error("{0} vCPUs do not fit in the MP table area")]
    TooManyCpus(u8),
    #[error("cannot write the MP table to guest memory")]
    Write(#[source] vm_memory::GuestMemoryError),
}

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)))
}

/// Builds the floating pointer + configuration table for `cpus` vCPUs at `base`.
pub fn build(base: u64, cpus: u8) -> Vec<u8> {
    let table_addr = base + 16;
    let ioapic_id = cpus; // APIC IDs 0..cpus-1 are the vCPUs
    let mut entries = Vec::new();
    let mut count: u16 = 0;
    for cpu in 0..cpus {
        let flags = CPU_ENABLED | if cpu == 0 { CPU_BOOTPROCESSOR } else { 0 };
        entries.extend_from_slice(&[0, cpu, APIC_VERSION, flags]);
        entries.extend_from_slice(&0x600u32.to_le_bytes()); // signature: family 6
        entries.extend_from_slice(&0x201u32.to_le_bytes()); // features: FPU | APIC
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    // Bus 0: ISA.
    entries.extend_from_slice(&[1, 0]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    // The IOAPIC.
    entries.extend_from_slice(&[2, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&(IOAPIC_ADDR as u32).to_le_bytes());
    count += 1;
    // ISA IRQ n -> IOAPIC pin n (KVM's default GSI routing).
    for irq in 0..IOAPIC_PINS as u8 {
        entries.extend_from_slice(&[3, MP_INT, 0, 0, 0, irq, ioapic_id, irq]);
        count += 1;
    }
    // LINT0: ExtINT (the 8259), LINT1: NMI, on all local APICs.
    entries.extend_from_slice(&[4, MP_EXTINT, 0, 0, 0, 0, 0, 0]);
    entries.extend_from_slice(&[4, MP_NMI, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    let mut table = Vec::with_capacity(44 + entries.len());
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&((44 + entries.len()) as u16).to_le_bytes());
    table.push(4); // spec revision 1.4
    table.push(0); // checksum, below
    table.extend_from_slice(b"MICROVM ");
    table.extend_from_slice(b"000000000000");
    table.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    table.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&(APIC_ADDR as u32).to_le_bytes());
    table.extend_from_slice(&0u32.to_le_bytes()); // extended table length + checksum + reserved
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut mpf = Vec::with_capacity(16);
    mpf.extend_from_slice(b"_MP_");
    mpf.extend_from_slice(&(table_addr as u32).to_le_bytes());
    mpf.extend_from_slice(&[1, 4, 0, 0, 0, 0, 0, 0]); // length 1 (x16), rev 1.4, checksum, features
    mpf[10] = checksum(&mpf);

    mpf.extend_from_slice(&table);
    mpf
}

/// Writes the MP table into the reserved area at the top of base memory.
pub fn setup(mem: &GuestMemoryMmap, cpus: u8) -> Result<(), MpTableError> {
    let bytes = build(EBDA_START, cpus);
    if bytes.len() > MAX_TABLE_SIZE {
        return Err(MpTableError::TooManyCpus(cpus));
    }
    mem.write_slice(&bytes, GuestAddress(EBDA_START))
        .map_err(MpTableError::Write)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    #[test]
    fn checksums_and_counts() {
        let b = build(EBDA_START, 4);
        assert_eq!(&b[0..4], b"_MP_");
        assert_eq!(sum(&b[0..16]), 0);
        let t = &b[16..];
        assert_eq!(&t[0..4], b"PCMP");
        let len = u16::from_le_bytes([t[4], t[5]]) as usize;
        assert_eq!(len, t.len());
        assert_eq!(sum(t), 0);
        let count = u16::from_le_bytes([t[34], t[35]]);
        assert_eq!(count as usize, 4 + 1 + 1 + IOAPIC_PINS as usize + 2);
        // Processor entries carry APIC IDs 0..3, the first is the BSP.
        assert_eq!(t[44 + 1], 0);
        assert_eq!(t[44 + 3], CPU_ENABLED | CPU_BOOTPROCESSOR);
        assert_eq!(t[44 + 20 + 1], 1);
        assert_eq!(t[44 + 20 + 3], CPU_ENABLED);
    }

    #[test]
    fn max_cpus_fit() {
        assert!(build(EBDA_START, crate::config::MAX_VCPUS as u8).len() <= MAX_TABLE_SIZE);
    }
}
