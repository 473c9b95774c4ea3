//! A device on the guest's MMIO or port I/O bus.

/// Something the VMM can route guest MMIO/PIO accesses to.
///
/// `offset` is relative to the start of the device's range. Implementations must treat
/// every (offset, len) pair as guest-controlled: out-of-range or odd-sized accesses read
/// as zero / are ignored, never panic.
pub trait BusDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]);
}
