//! Guest power-off through ACPI, without a Linux guest: the payload finds microvm's ACPI
//! tables where Linux looks for them and writes the PM1a control register itself.

use std::time::Duration;

use microvm_tests::payload::{write_elf, Asm};
use microvm_tests::{run_microvm, scratch_dir};

const T: Duration = Duration::from_secs(60);
/// PM1a_CNT (the FADT's PM1a control block): SLP_TYP in bits 10-12, SLP_EN bit 13.
const PM1A_CNT: u16 = 0x604;
const SLP_EN: u16 = 1 << 13;
/// The DSDT's \_S5_ sleep type.
const S5: u16 = 5 << 10;

/// SLP_EN with SLP_TYP = S5 powers the VM off: exit 0 at once (the exit-status write after
/// it never runs). A sleep type the DSDT does not offer is ignored.
#[test]
fn s5_write_powers_off() {
    let dir = scratch_dir("poweroff");
    let k = dir.join("k.elf");
    let asm = Asm::default()
        .out16(PM1A_CNT, (3 << 10) | SLP_EN)
        .print("S3 ignored\n")
        .out16(PM1A_CNT, S5)
        .print("SLP_TYP alone ignored\n")
        .out16(PM1A_CNT, S5 | SLP_EN)
        .print("still running after S5\n")
        .exit(9)
        .halt();
    write_elf(&k, &asm.code);
    let r = run_microvm(&["--kernel", k.to_str().unwrap()], T);
    assert_eq!(r.code(), 0, "{r:?}");
    assert!(
        r.stdout.contains("S3 ignored\nSLP_TYP alone ignored\n"),
        "{r:?}"
    );
    assert!(!r.stdout.contains("still running"), "{r:?}");
    assert!(r.elapsed < Duration::from_secs(5), "{r:?}");
}

/// The RSDP is at 0xe0000, where Linux's BIOS-area scan finds it first.
#[test]
fn rsdp_is_in_the_bios_area() {
    let dir = scratch_dir("rsdp");
    let k = dir.join("k.elf");
    let asm = Asm::default()
        .if_mmio_eq(
            0xe0000,
            u32::from_le_bytes(*b"RSD "),
            "rsd ok\n",
            "rsd missing\n",
        )
        .if_mmio_eq(
            0xe0004,
            u32::from_le_bytes(*b"PTR "),
            "ptr ok\n",
            "ptr missing\n",
        )
        .exit(0)
        .halt();
    write_elf(&k, &asm.code);
    let r = run_microvm(&["--kernel", k.to_str().unwrap()], T);
    assert_eq!(r.code(), 0, "{r:?}");
    assert!(r.stdout.contains("rsd ok\nptr ok\n"), "{r:?}");
}
