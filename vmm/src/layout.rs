//! Guest physical memory map (x86_64).
//!
//! ```text
//! 0x0000_0500  GDT            0x0000_7000  boot_params (zero page)
//! 0x0000_9000  PML4           0x0000_a000  PDPT, 0xb000.. 4 page directories (identity 4 GiB)
//! 0x0002_0000  kernel command line
//! 0x0009_fc00  MP table (top of the 640 KiB base memory, reserved in e820)
//! 0x000e_0000  ACPI tables, RSDP first (the BIOS area Linux scans; not RAM in e820)
//! 0x0010_0000  kernel (bzImage protected-mode part; an ELF vmlinux loads at its own p_paddr)
//! ...          initrd near the top of low RAM
//! 0xc000_0000  MMIO gap: 0xd000_0000 exit device, 0xd000_1000.. virtio-mmio windows
//!              0xfec0_0000 IOAPIC, 0xfee0_0000 LAPIC
//! 0x1_0000_0000 RAM above 4 GiB when the guest has more than 3 GiB
//! ```

pub const GDT_START: u64 = 0x500;
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
pub const ZERO_PAGE_START: u64 = 0x7000;
pub const PML4_START: u64 = 0x9000;
pub const PDPT_START: u64 = 0xa000;
pub const PD_START: u64 = 0xb000;
pub const CMDLINE_START: u64 = 0x2_0000;
pub const EBDA_START: u64 = 0x9_fc00;
pub const HIGH_MEMORY_START: u64 = 0x10_0000;

/// Start of the 32-bit MMIO hole; RAM stops here and continues at 4 GiB.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;

/// The exit-status device: a 32-bit write of S here makes microvm exit with status S & 0xff.
pub const EXIT_DEVICE_ADDR: u64 = 0xd000_0000;
pub const EXIT_DEVICE_SIZE: u64 = 0x1000;

/// virtio-mmio windows follow the exit device, one page each.
pub const VIRTIO_MMIO_START: u64 = 0xd000_1000;
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// The GSI of each virtio device, in attach order: the ISA lines a Linux guest sets up as
/// edge-triggered, which is what an irqfd (a pulse per interrupt, no resample) needs.
/// Not these, each checked in a guest's /proc/interrupts:
/// - 9, [`ACPI_SCI_IRQ`]: ACPI makes it level-triggered ("9-fasteoi acpi"). A device
///   sharing it loses every interrupt raised while the line is in service (KVM's IOAPIC
///   drops a level assert while remote IRR is set, and the pulse is over by the EOI): a
///   virtio-console there left its last port uncreated now and then, and the init waiting
///   for it failed.
/// - 16..23: Linux maps IOAPIC pins past the ISA ones only for devices that ACPI or PCI
///   describes, so a command-line virtio-mmio device there fails its probe (EINVAL).
pub const IOAPIC_PINS: u32 = 24;
pub const VIRTIO_GSIS: [u32; 10] = [5, 6, 7, 8, 10, 11, 12, 13, 14, 15];
pub const MAX_VIRTIO_DEVICES: usize = VIRTIO_GSIS.len();

pub const IOAPIC_ADDR: u64 = 0xfec0_0000;
pub const APIC_ADDR: u64 = 0xfee0_0000;
/// KVM needs three pages for the TSS just below the IOAPIC window... any free hole works.
pub const KVM_TSS_ADDR: u64 = 0xfffb_d000;

/// COM1.
pub const SERIAL_PORT: u16 = 0x3f8;
pub const SERIAL_IRQ: u32 = 4;
/// i8042 command/status port (data at 0x60).
pub const I8042_PORT: u16 = 0x60;

/// ACPI tables: the RSDP at the start of the BIOS area, where Linux scans for it.
pub const ACPI_START: u64 = 0xe_0000;
pub const ACPI_END: u64 = 0x10_0000;
/// ACPI PM1a event (4 bytes) and control (2 bytes) registers: guest power-off.
pub const ACPI_PM_PORT: u16 = 0x600;
/// The ACPI SCI line (never raised: microvm signals no ACPI events).
pub const ACPI_SCI_IRQ: u32 = 9;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn virtio_lines_are_edge_triggered_isa_lines_of_their_own() {
        let mut seen = std::collections::HashSet::new();
        for gsi in VIRTIO_GSIS {
            assert!(seen.insert(gsi), "GSI {gsi} given twice");
            // ISA lines (a Linux guest maps them without ACPI device descriptions) past the
            // timer, keyboard and cascade, and none another device or ACPI uses.
            assert!((3..16).contains(&gsi), "GSI {gsi}");
            assert_ne!(gsi, SERIAL_IRQ);
            assert_ne!(gsi, ACPI_SCI_IRQ, "the SCI is level-triggered in the guest");
            assert!(gsi < IOAPIC_PINS);
        }
    }
}
