//! The exit-status device: one 32-bit register. A guest write of S asks microvm to stop
//! the VM and exit with status S & 0xff (busybox: `devmem 0xd0000000 32 S`).

use crate::bus::BusDevice;
use crate::guest_log::GuestLog;
use crate::guest_warn;

pub struct ExitDevice {
    on_exit: Box<dyn Fn(u8) + Send>,
    log: GuestLog,
}

impl ExitDevice {
    pub fn new(on_exit: Box<dyn Fn(u8) + Send>) -> Self {
        ExitDevice {
            on_exit,
            log: GuestLog::new("exit device"),
        }
    }
}

impl BusDevice for ExitDevice {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset != 0 || data.is_empty() || data.len() > 8 {
            guest_warn!(
                self.log,
                offset,
                len = data.len(),
                "ignored bad write to the exit device"
            );
            return;
        }
        // Little endian: the low byte holds the status whatever the access width.
        (self.on_exit)(data[0]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[test]
    fn status_is_low_byte() {
        let got = Arc::new(Mutex::new(Vec::new()));
        let g = got.clone();
        let mut d = ExitDevice::new(Box::new(move |s| g.lock().unwrap().push(s)));
        d.write(0, &7u32.to_le_bytes());
        d.write(0, &0x1_03u32.to_le_bytes());
        d.write(4, &1u32.to_le_bytes()); // wrong register: ignored
        assert_eq!(*got.lock().unwrap(), vec![7, 3]);
    }
}
