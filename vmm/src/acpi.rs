//! ACPI tables, so a guest kernel built with CONFIG_ACPI can power the VM off: `poweroff`
//! ends in an S5 write to the PM1a control register (devices::legacy::AcpiPm), which
//! makes microvm exit 0. Without ACPI, Linux can only halt ("Power off not available:
//! System halted instead") and the VMM never learns of it.
//!
//! ```text
//! 0xe0000  RSDP -> XSDT -> FADT (-> DSDT, FACS), MADT      (found by the BIOS-area scan)
//! ```
//! Full (not hardware-reduced) ACPI on purpose: a hardware-reduced FADT makes Linux drop
//! the 8259 PIC and the PIT, and then ISA IRQ numbers are no longer GSIs, so the COM1
//! (IRQ 4) and `virtio_mmio.device=...:IRQ` devices stop working unless every device is
//! also described in the DSDT. Full ACPI only needs the PM1 event/control registers (6
//! I/O ports) and leaves interrupt routing exactly as the MP table describes it, which
//! stays for kernels without ACPI, as do the `virtio_mmio.device=` parameters.

use acpi_tables::aml::{Name, Package, Path};
use acpi_tables::facs::FACS;
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::{Aml, AmlSink};
use devices::legacy::acpi_pm;
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress};
use zerocopy::{Immutable, IntoBytes};

use crate::layout::{
    ACPI_END, ACPI_PM_PORT, ACPI_SCI_IRQ, ACPI_START, APIC_ADDR, I8042_PORT, IOAPIC_ADDR,
};
use crate::memory::GuestMemoryMmap;

const OEM_ID: [u8; 6] = *b"MICRVM";
const OEM_REVISION: u32 = 1;
/// FADT "hypervisor vendor identity": tells the guest who made these tables.
const HYPERVISOR_ID: [u8; 8] = *b"MICROVM ";
/// Every table starts on a 64-byte boundary (the FACS must).
const TABLE_ALIGN: u64 = 64;

/// FADT IA-PC boot architecture flags (ACPI 6.5, 5.2.9.3).
const IAPC_VGA_NOT_PRESENT: u16 = 1 << 2;
const IAPC_MSI_NOT_SUPPORTED: u16 = 1 << 3;
const IAPC_PCIE_ASPM_CONTROLS: u16 = 1 << 4;
const IAPC_CMOS_RTC_NOT_PRESENT: u16 = 1 << 5;
/// The command that pulses the reset line on the i8042 command port.
const I8042_RESET_COMMAND: u8 = 0xfe;

#[derive(Debug, Error)]
pub enum AcpiError {
    #[error("ACPI tables ({0} bytes) do not fit in 0xe0000-0xfffff")]
    TooBig(u64),
    #[error("cannot write the ACPI tables to guest memory")]
    Write(#[source] vm_memory::GuestMemoryError),
}

/// MADT Interrupt Source Override (type 2); acpi_tables has no x86 type for it.
#[repr(C, packed)]
#[derive(Clone, Copy, IntoBytes, Immutable)]
struct InterruptSourceOverride {
    r#type: u8,
    length: u8,
    bus: u8,
    source: u8,
    gsi: u32,
    flags: u16,
}

impl Aml for InterruptSourceOverride {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        sink.vec(self.as_bytes());
    }
}

/// MADT Local APIC NMI (type 4).
#[repr(C, packed)]
#[derive(Clone, Copy, IntoBytes, Immutable)]
struct LocalApicNmi {
    r#type: u8,
    length: u8,
    processor_uid: u8,
    flags: u16,
    lint: u8,
}

impl Aml for LocalApicNmi {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        sink.vec(self.as_bytes());
    }
}

fn bytes(aml: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    aml.to_aml_bytes(&mut v);
    v
}

fn io_gas(port: u16, bits: u8, access: AccessSize) -> GAS {
    GAS::new(AddressSpace::SystemIo, bits, 0, access, u64::from(port))
}

/// DSDT: only `\_S5_` (the sleep type the PM1a control register must see for power-off).
/// The devices are described by the MADT and the kernel command line instead.
fn dsdt() -> Vec<u8> {
    let s5 = Name::new(
        Path::new("_S5_"),
        &Package::new(vec![&acpi_pm::S5_SLP_TYP, &0u8]),
    );
    let mut t = Sdt::new(*b"DSDT", 36, 2, OEM_ID, *b"MVMDSDT ", OEM_REVISION);
    t.append_slice(&bytes(&s5));
    t.as_slice().to_vec()
}

fn fadt(dsdt: u64, facs: u64) -> Vec<u8> {
    let evt = u32::from(ACPI_PM_PORT);
    let cnt = u32::from(ACPI_PM_PORT) + u32::from(acpi_pm::PM1_EVT_LEN);
    let mut f = FADTBuilder::new(OEM_ID, *b"MVMFACP ", OEM_REVISION)
        .dsdt_64(dsdt)
        .firmware_ctrl_64(facs)
        // No fixed power/sleep buttons, no RTC wake status: nothing in PM1 but sleep.
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton)
        .flag(Flags::FixRtc)
        .flag(Flags::ResetRegSup);
    // No SMI command port: the platform is in ACPI mode from the start.
    f.sci_int = (ACPI_SCI_IRQ as u16).into();
    f.pm1a_evt_blk = evt.into();
    f.pm1a_cnt_blk = cnt.into();
    f.pm1_evt_len = acpi_pm::PM1_EVT_LEN;
    f.pm1_cnt_len = acpi_pm::PM1_CNT_LEN;
    f.x_pm1a_evt_blk = io_gas(evt as u16, acpi_pm::PM1_EVT_LEN * 8, AccessSize::WordAccess);
    f.x_pm1a_cnt_blk = io_gas(cnt as u16, acpi_pm::PM1_CNT_LEN * 8, AccessSize::WordAccess);
    f.iapc_boot_arch = (IAPC_VGA_NOT_PRESENT
        | IAPC_MSI_NOT_SUPPORTED
        | IAPC_PCIE_ASPM_CONTROLS
        | IAPC_CMOS_RTC_NOT_PRESENT)
        .into();
    // ACPI reset = the i8042 reset pulse microvm already handles (a guest reset).
    f.reset_reg = io_gas(I8042_PORT + 4, 8, AccessSize::ByteAccess);
    f.reset_value = I8042_RESET_COMMAND;
    f.hypervisor_vendor_identity = u64::from_le_bytes(HYPERVISOR_ID).into();
    bytes(&f.finalize())
}

/// MADT: one local APIC per vCPU, the IOAPIC (same IDs as the MP table), ISA IRQ 0 on
/// GSI 0 as KVM's default routing has it, and LINT1 = NMI on every CPU.
fn madt(cpus: u8) -> Vec<u8> {
    let mut m = MADT::new(
        OEM_ID,
        *b"MVMAPIC ",
        OEM_REVISION,
        LocalInterruptController::Address(APIC_ADDR as u32),
    );
    for cpu in 0..cpus {
        m.add_structure(ProcessorLocalApic::new(cpu, cpu, EnabledStatus::Enabled));
    }
    m.add_structure(IoApic::new(cpus, IOAPIC_ADDR as u32, 0));
    m.add_structure(InterruptSourceOverride {
        r#type: 2,
        length: 10,
        bus: 0,
        source: 0,
        gsi: 0,
        flags: 0,
    });
    m.add_structure(LocalApicNmi {
        r#type: 4,
        length: 6,
        processor_uid: 0xff,
        flags: 0,
        lint: 1,
    });
    bytes(&m)
}

/// Builds every table for `cpus` vCPUs; returns (address, bytes) pairs to write.
pub fn build(cpus: u8) -> Result<Vec<(u64, Vec<u8>)>, AcpiError> {
    let mut next = ACPI_START + TABLE_ALIGN; // the RSDP goes at ACPI_START
    let mut place = |len: usize| {
        let at = next;
        next = (at + len as u64).next_multiple_of(TABLE_ALIGN);
        at
    };
    let dsdt = dsdt();
    let dsdt_at = place(dsdt.len());
    let facs = bytes(&FACS::new());
    let facs_at = place(facs.len());
    let fadt = fadt(dsdt_at, facs_at);
    let fadt_at = place(fadt.len());
    let madt = madt(cpus);
    let madt_at = place(madt.len());
    let mut xsdt = XSDT::new(OEM_ID, *b"MVMXSDT ", OEM_REVISION);
    xsdt.add_entry(fadt_at);
    xsdt.add_entry(madt_at);
    let xsdt = bytes(&xsdt);
    let xsdt_at = place(xsdt.len());
    let end = place(0);
    if end > ACPI_END {
        return Err(AcpiError::TooBig(end - ACPI_START));
    }
    let rsdp = bytes(&Rsdp::new(OEM_ID, xsdt_at));
    Ok(vec![
        (ACPI_START, rsdp),
        (dsdt_at, dsdt),
        (facs_at, facs),
        (fadt_at, fadt),
        (madt_at, madt),
        (xsdt_at, xsdt),
    ])
}

/// Writes the tables into guest memory (the RSDP at 0xe0000, where Linux scans for it).
pub fn setup(mem: &GuestMemoryMmap, cpus: u8) -> Result<(), AcpiError> {
    for (addr, table) in build(cpus)? {
        mem.write_slice(&table, GuestAddress(addr))
            .map_err(AcpiError::Write)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }
    fn u16_at(b: &[u8], off: usize) -> u16 {
        u16::from_le_bytes(b[off..off + 2].try_into().unwrap())
    }
    fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
    }
    fn u64_at(b: &[u8], off: usize) -> u64 {
        u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
    }

    /// Follows the pointers from the RSDP the way the guest does, checking every table's
    /// signature, length and checksum, and the fields power-off depends on.
    #[test]
    fn tables_link_up_and_checksum() {
        let tables = build(4).unwrap();
        let at = |addr: u64| -> &[u8] {
            &tables
                .iter()
                .find(|(a, _)| *a == addr)
                .unwrap_or_else(|| panic!("no table at {addr:#x}"))
                .1
        };
        let rsdp = at(ACPI_START);
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert_eq!(sum(&rsdp[..20]), 0);
        assert_eq!(sum(rsdp), 0);
        let xsdt = at(u64_at(rsdp, 24));
        assert_eq!(&xsdt[..4], b"XSDT");
        assert_eq!(u32_at(xsdt, 4) as usize, xsdt.len());
        assert_eq!(sum(xsdt), 0);
        let entries: Vec<u64> = (36..xsdt.len())
            .step_by(8)
            .map(|o| u64_at(xsdt, o))
            .collect();
        assert_eq!(entries.len(), 2);

        let fadt = at(entries[0]);
        assert_eq!(&fadt[..4], b"FACP");
        assert_eq!(u32_at(fadt, 4) as usize, fadt.len());
        assert_eq!(sum(fadt), 0);
        assert_eq!(u16_at(fadt, 46), ACPI_SCI_IRQ as u16);
        assert_eq!(
            u32_at(fadt, 48),
            0,
            "no SMI command port: already in ACPI mode"
        );
        assert_eq!(u32_at(fadt, 56), u32::from(ACPI_PM_PORT), "PM1a_EVT_BLK");
        assert_eq!(
            u32_at(fadt, 64),
            u32::from(ACPI_PM_PORT) + 4,
            "PM1a_CNT_BLK"
        );
        assert_eq!((fadt[88], fadt[89]), (4, 2), "PM1_EVT_LEN, PM1_CNT_LEN");
        let flags = u32_at(fadt, 112);
        assert_eq!(flags & Flags::HwReducedAcpi as u32, 0);
        assert_ne!(flags & Flags::ResetRegSup as u32, 0);
        assert_eq!(fadt[116], 1, "reset register in I/O space");
        assert_eq!(u64_at(fadt, 120), u64::from(I8042_PORT) + 4);
        assert_eq!(fadt[128], I8042_RESET_COMMAND);
        // X_PM1a_CNT_BLK (offset 172) agrees with the 32-bit field.
        assert_eq!(
            (fadt[172], u64_at(fadt, 176)),
            (1, u64::from(ACPI_PM_PORT) + 4)
        );

        let dsdt = at(u64_at(fadt, 140));
        assert_eq!(&dsdt[..4], b"DSDT");
        assert_eq!(u32_at(dsdt, 4) as usize, dsdt.len());
        assert_eq!(sum(dsdt), 0);
        // NameOp "_S5_" PackageOp len count=2 BytePrefix 5 Zero
        let s5 = dsdt
            .windows(4)
            .position(|w| w == b"_S5_")
            .expect("_S5_ in the DSDT");
        assert_eq!(
            &dsdt[s5 + 4..],
            &[0x12, 0x05, 0x02, 0x0a, acpi_pm::S5_SLP_TYP, 0x00]
        );
        let facs = at(u64_at(fadt, 132));
        assert_eq!(&facs[..4], b"FACS");
        assert_eq!(
            u64_at(fadt, 132) % 64,
            0,
            "the FACS must be 64-byte aligned"
        );

        let madt = at(entries[1]);
        assert_eq!(&madt[..4], b"APIC");
        assert_eq!(u32_at(madt, 4) as usize, madt.len());
        assert_eq!(sum(madt), 0);
        assert_eq!(u32_at(madt, 36), APIC_ADDR as u32);
        let mut types = Vec::new();
        let mut off = 44;
        while off < madt.len() {
            types.push((madt[off], madt[off + 2], madt[off + 3]));
            off += madt[off + 1] as usize;
        }
        assert_eq!(off, madt.len());
        let lapics: Vec<_> = types.iter().filter(|t| t.0 == 0).collect();
        assert_eq!(lapics, vec![&(0, 0, 0), &(0, 1, 1), &(0, 2, 2), &(0, 3, 3)]);
        assert_eq!(types.iter().filter(|t| t.0 == 1).count(), 1);
        assert!(types.contains(&(2, 0, 0)), "ISA IRQ 0 override");
        assert!(types.contains(&(4, 0xff, 0)), "LINT1 NMI");
    }

    #[test]
    fn max_cpus_fit() {
        let tables = build(crate::config::MAX_VCPUS as u8).unwrap();
        assert!(tables.iter().all(|(a, t)| a + t.len() as u64 <= ACPI_END));
    }
}
