//! Address-range dispatch for guest MMIO and port I/O exits.

use std::sync::{Arc, Mutex};

use devices::bus::BusDevice;
/// Poison-tolerant locking: a device whose lock holder panicked keeps working (its state is
/// plain registers), so one bad access can't take the whole VM down.
pub use devices::virtio::lock;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum BusError {
    #[error("bus range {base:#x}+{len:#x} overlaps an existing device")]
    Overlap { base: u64, len: u64 },
    #[error("bus range of zero length at {0:#x}")]
    Empty(u64),
}

pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

struct Entry {
    base: u64,
    len: u64,
    dev: SharedDevice,
}

/// A sorted list of non-overlapping ranges. Few devices, so a binary search is plenty.
#[derive(Default)]
pub struct Bus {
    entries: Vec<Entry>,
}

impl Bus {
    pub fn insert(&mut self, base: u64, len: u64, dev: SharedDevice) -> Result<(), BusError> {
        if len == 0 {
            return Err(BusError::Empty(base));
        }
        let end = base.checked_add(len).ok_or(BusError::Overlap { base, len })?;
        if self
            .entries
            .iter()
            .any(|e| base < e.base + e.len && e.base < end)
        {
            return Err(BusError::Overlap { base, len });
        }
        let pos = self.entries.partition_point(|e| e.base < base);
        self.entries.insert(pos, Entry { base, len, dev });
        Ok(())
    }

    fn find(&self, addr: u64) -> Option<(&Entry, u64)> {
        let i = self.entries.partition_point(|e| e.base <= addr).checked_sub(1)?;
        let e = &self.entries[i];
        (addr - e.base < e.len).then_some((e, addr - e.base))
    }

    /// Returns false when no device claims `addr` (the access then reads as all ones).
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr) {
            Some((e, off)) => {
                lock(&e.dev).read(off, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr) {
            Some((e, off)) => {
                lock(&e.dev).write(off, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo(u8);
    impl BusDevice for Echo {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(self.0 + offset as u8);
        }
        fn write(&mut self, _offset: u64, data: &[u8]) {
            self.0 = data[0];
        }
    }

    #[test]
    fn dispatch_and_overlap() {
        let mut bus = Bus::default();
        bus.insert(0x100, 0x10, Arc::new(Mutex::new(Echo(1)))).unwrap();
        bus.insert(0x200, 0x10, Arc::new(Mutex::new(Echo(5)))).unwrap();
        assert!(bus.insert(0x108, 0x10, Arc::new(Mutex::new(Echo(0)))).is_err());
        assert!(bus.insert(0x1f8, 0x10, Arc::new(Mutex::new(Echo(0)))).is_err());
        assert!(bus.insert(0, 0, Arc::new(Mutex::new(Echo(0)))).is_err());
        let mut b = [0u8];
        assert!(bus.read(0x102, &mut b));
        assert_eq!(b[0], 3);
        assert!(bus.read(0x200, &mut b));
        assert_eq!(b[0], 5);
        assert!(!bus.read(0x110, &mut b));
        assert_eq!(b[0], 0xff);
        assert!(bus.write(0x201, &[9]));
        bus.read(0x200, &mut b);
        assert_eq!(b[0], 9);
        assert!(!bus.write(0x50, &[1]));
    }
}
