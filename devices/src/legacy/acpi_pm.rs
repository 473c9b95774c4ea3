//! The ACPI PM1a register block (port I/O), just enough for a guest to power the VM off:
//!
//! ```text
//! +0  PM1a_STS  16 bit  status, write 1 to clear (no event is ever raised: reads 0)
//! +2  PM1a_EN   16 bit  event enables, read/write (kept so the guest's read-back works)
//! +4  PM1a_CNT  16 bit  SCI_EN (always 1), SLP_TYP (bits 10-12), SLP_EN (bit 13, write-only)
//! ```
//! Writing SLP_EN with SLP_TYP = `S5_SLP_TYP` (the value the DSDT's `\_S5_` package
//! gives) is "soft off": the device calls `on_power_off`. Other sleep states are not
//! offered in the DSDT; a write asking for one is ignored.

use crate::bus::BusDevice;

/// Bytes of the PM1 event block (status + enable) and of the control block.
pub const PM1_EVT_LEN: u8 = 4;
pub const PM1_CNT_LEN: u8 = 2;
/// The whole register block, event then control.
pub const PM1_BLOCK_LEN: u64 = (PM1_EVT_LEN + PM1_CNT_LEN) as u64;
/// SLP_TYP for S5 (soft off), as published in the DSDT.
pub const S5_SLP_TYP: u8 = 5;

const STATUS: usize = 0;
const ENABLE: usize = 1;
const CONTROL: usize = 2;
/// PM1 enable bits defined by ACPI: TMR, GBL, PWRBTN, SLPBTN, RTC, PCIEXP_WAKE_DIS.
const ENABLE_MASK: u16 = 1 | 1 << 5 | 1 << 8 | 1 << 9 | 1 << 10 | 1 << 14;
const SCI_EN: u16 = 1;
const GBL_RLS: u16 = 1 << 2;
const SLP_TYP_SHIFT: u16 = 10;
const SLP_TYP_MASK: u16 = 0x7 << SLP_TYP_SHIFT;
const SLP_EN: u16 = 1 << 13;

pub struct AcpiPm {
    /// PM1a_STS, PM1a_EN, PM1a_CNT.
    regs: [u16; 3],
    on_power_off: Box<dyn Fn() + Send>,
}

impl AcpiPm {
    pub fn new(on_power_off: Box<dyn Fn() + Send>) -> Self {
        AcpiPm {
            regs: [0, 0, SCI_EN],
            on_power_off,
        }
    }

    fn write_control(&mut self, value: u16) {
        if value & SLP_EN != 0 {
            let slp_typ = ((value & SLP_TYP_MASK) >> SLP_TYP_SHIFT) as u8;
            if slp_typ == S5_SLP_TYP {
                (self.on_power_off)();
            } else {
                tracing::debug!(
                    slp_typ,
                    "ignored request for a sleep state the DSDT does not offer"
                );
            }
        }
        // SLP_EN and GBL_RLS are write-only; SCI_EN stays set (no legacy mode to go back to).
        self.regs[CONTROL] = (value & !(SLP_EN | GBL_RLS)) | SCI_EN;
    }
}

impl BusDevice for AcpiPm {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = match usize::try_from(offset).ok().and_then(|o| o.checked_add(i)) {
                Some(at) if at < PM1_BLOCK_LEN as usize => self.regs[at / 2].to_le_bytes()[at % 2],
                _ => 0,
            };
        }
    }

    /// Any width, any offset inside the block: each register touched is updated from the
    /// bytes written to it, the other byte of a 16-bit register keeping its value.
    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(start) = usize::try_from(offset).ok().filter(|o| {
            o.checked_add(data.len())
                .is_some_and(|end| end <= PM1_BLOCK_LEN as usize)
        }) else {
            tracing::trace!(
                offset,
                len = data.len(),
                "ignored write outside the PM1 block"
            );
            return;
        };
        for reg in 0..self.regs.len() {
            let (mut value, mut mask) = (0u16, 0u16);
            for (i, b) in data.iter().enumerate() {
                let at = start + i;
                if at / 2 == reg {
                    let shift = 8 * (at % 2);
                    value |= u16::from(*b) << shift;
                    mask |= 0xff << shift;
                }
            }
            if mask == 0 {
                continue;
            }
            match reg {
                STATUS => self.regs[STATUS] &= !(value & mask),
                ENABLE => {
                    self.regs[ENABLE] = (self.regs[ENABLE] & !mask) | (value & mask & ENABLE_MASK)
                }
                CONTROL => self.write_control((self.regs[CONTROL] & !mask) | (value & mask)),
                _ => unreachable!("three registers"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;

    fn device() -> (AcpiPm, Arc<AtomicU32>) {
        let count = Arc::new(AtomicU32::new(0));
        let c = count.clone();
        (
            AcpiPm::new(Box::new(move || {
                c.fetch_add(1, Ordering::SeqCst);
            })),
            count,
        )
    }

    fn read16(d: &mut AcpiPm, offset: u64) -> u16 {
        let mut b = [0u8; 2];
        d.read(offset, &mut b);
        u16::from_le_bytes(b)
    }

    const S5: u16 = (S5_SLP_TYP as u16) << SLP_TYP_SHIFT;

    #[test]
    fn linux_s5_sequence_powers_off_once() {
        let (mut d, count) = device();
        // ACPICA: read PM1a_CNT, write SLP_TYP alone, then SLP_TYP | SLP_EN.
        let cnt = read16(&mut d, 4);
        assert_eq!(cnt & SCI_EN, SCI_EN, "already in ACPI mode");
        d.write(4, &(cnt | S5).to_le_bytes());
        assert_eq!(
            count.load(Ordering::SeqCst),
            0,
            "SLP_TYP alone must not power off"
        );
        d.write(4, &(cnt | S5 | SLP_EN).to_le_bytes());
        assert_eq!(count.load(Ordering::SeqCst), 1);
        assert_eq!(read16(&mut d, 4) & SLP_EN, 0, "SLP_EN is write-only");
    }

    #[test]
    fn other_sleep_types_and_byte_writes() {
        let (mut d, count) = device();
        // S3 (or any type but S5) with SLP_EN: ignored.
        d.write(4, &((3 << SLP_TYP_SHIFT) | SLP_EN).to_le_bytes());
        assert_eq!(count.load(Ordering::SeqCst), 0);
        // The high byte alone carries SLP_TYP and SLP_EN: a byte write works too.
        d.write(5, &[((S5 | SLP_EN) >> 8) as u8]);
        assert_eq!(count.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn status_is_write_one_to_clear_and_enable_keeps_defined_bits() {
        let (mut d, count) = device();
        d.write(2, &0xffffu16.to_le_bytes());
        assert_eq!(read16(&mut d, 2), ENABLE_MASK);
        d.write(0, &0xffffu16.to_le_bytes());
        assert_eq!(read16(&mut d, 0), 0);
        // A 32-bit write over status + enable updates both.
        d.write(0, &0x0020_0000u32.to_le_bytes());
        assert_eq!(read16(&mut d, 2), 1 << 5);
        // Out of the block: ignored, reads 0, nothing panics.
        d.write(5, &[0xff, 0xff]);
        d.write(u64::MAX, &[1]);
        let mut b = [0xaau8; 4];
        d.read(4, &mut b);
        assert_eq!(b, [SCI_EN as u8, 0, 0, 0]);
        assert_eq!(count.load(Ordering::SeqCst), 0);
    }
}
