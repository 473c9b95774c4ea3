//! i8042 controller: only the CPU reset command matters (guests reboot with `reboot=k`).

use vm_superio::I8042Device;

use super::CallbackTrigger;
use crate::bus::BusDevice;

pub struct I8042(I8042Device<CallbackTrigger>);

impl I8042 {
    /// `on_reset` runs when the guest pulses the reset line.
    pub fn new(on_reset: Box<dyn Fn() + Send>) -> Self {
        I8042(I8042Device::new(CallbackTrigger(on_reset)))
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let (Some(b), Ok(off)) = (data.first_mut(), u8::try_from(offset)) {
            *b = self.0.read(off);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Some(b), Ok(off)) = (data.first(), u8::try_from(offset)) {
            let _ = self.0.write(off, *b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    #[test]
    fn reset_command() {
        let hit = Arc::new(AtomicBool::new(false));
        let h = hit.clone();
        let mut dev = I8042::new(Box::new(move || h.store(true, Ordering::SeqCst)));
        dev.write(0, &[0xfe]); // data port: ignored
        assert!(!hit.load(Ordering::SeqCst));
        dev.write(4, &[0xfe]); // command port: reset
        assert!(hit.load(Ordering::SeqCst));
        let mut status = [0xffu8];
        dev.read(4, &mut status);
        assert_eq!(status[0], 0); // input buffer empty, so kb_wait() proceeds
    }
}
