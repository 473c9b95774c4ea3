//! COM1: vm-superio's 8250 with an eventfd interrupt (wired to a KVM irqfd by the VMM).

use std::io::{self, Write};
use std::ops::Deref;

use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;
use crate::guest_log::GuestLog;
use crate::guest_warn;

/// COM1 in a VM snapshot: vm-superio's `SerialState` (which has no serde support), as
/// divisor low/high, IER, IIR, LCR, LSR, MCR, MSR, scratch, then the unread input.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SerialSnapshot {
    pub registers: [u8; 9],
    pub input: Vec<u8>,
}

/// An `EventFd` usable as a vm-superio interrupt line.
pub struct EventFdTrigger(pub EventFd);

impl Trigger for EventFdTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

impl Deref for EventFdTrigger {
    type Target = EventFd;

    fn deref(&self) -> &EventFd {
        &self.0
    }
}

pub struct SerialDevice {
    serial: Serial<EventFdTrigger, NoEvents, Box<dyn Write + Send>>,
    /// Output errors happen once per guest byte: rate-limited.
    log: GuestLog,
}

impl SerialDevice {
    pub fn new(irq: EventFd, out: Box<dyn Write + Send>) -> Self {
        SerialDevice {
            serial: Serial::new(EventFdTrigger(irq), out),
            log: GuestLog::new("serial"),
        }
    }

    /// A COM1 in a saved state (a VM restore); `None` if the state is impossible (a receive
    /// FIFO longer than the UART's).
    pub fn restored(irq: EventFd, out: Box<dyn Write + Send>, saved: &SerialSnapshot) -> Option<Self> {
        let state = vm_superio::serial::SerialState {
            baud_divisor_low: saved.registers[0],
            baud_divisor_high: saved.registers[1],
            interrupt_enable: saved.registers[2],
            interrupt_identification: saved.registers[3],
            line_control: saved.registers[4],
            line_status: saved.registers[5],
            modem_control: saved.registers[6],
            modem_status: saved.registers[7],
            scratch: saved.registers[8],
            in_buffer: saved.input.clone(),
        };
        let serial = Serial::from_state(&state, EventFdTrigger(irq), NoEvents, out).ok()?;
        Some(SerialDevice { serial, log: GuestLog::new("serial") })
    }

    /// The UART's registers and unread input, for a VM snapshot.
    pub fn save(&self) -> SerialSnapshot {
        let s = self.serial.state();
        SerialSnapshot {
            registers: [
                s.baud_divisor_low,
                s.baud_divisor_high,
                s.interrupt_enable,
                s.interrupt_identification,
                s.line_control,
                s.line_status,
                s.modem_control,
                s.modem_status,
                s.scratch,
            ],
            input: s.in_buffer,
        }
    }

    /// Queues host input for the guest; returns how many bytes fit in the FIFO.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        let room = self.serial.fifo_capacity();
        let n = bytes.len().min(room);
        if n == 0 {
            return 0;
        }
        match self.serial.enqueue_raw_bytes(&bytes[..n]) {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!("serial input dropped: {e:?}");
                0
            }
        }
    }

    /// Free space in the receive FIFO.
    pub fn input_room(&self) -> usize {
        self.serial.fifo_capacity()
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if data.len() != 1 || offset > 7 {
            data.fill(0);
            return;
        }
        data[0] = self.serial.read(offset as u8);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if data.len() != 1 || offset > 7 {
            return;
        }
        if let Err(e) = self.serial.write(offset as u8, data[0]) {
            guest_warn!(self.log, "serial write failed: {e:?}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn save_and_restore_keep_registers_and_unread_input() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut s = SerialDevice::new(irq.try_clone().unwrap(), Box::new(io::sink()));
        s.write(3, &[0x03]); // LCR: 8N1
        s.write(7, &[0x5a]); // scratch
        s.write(1, &[1]); // IER: received data
        assert_eq!(s.enqueue_input(b"ab"), 2);
        let saved = s.save();
        let mut r = SerialDevice::restored(irq.try_clone().unwrap(), Box::new(io::sink()), &saved).unwrap();
        let mut b = [0u8];
        for (off, want) in [(3u64, 0x03u8), (7, 0x5a), (1, 1), (0, b'a'), (0, b'b')] {
            r.read(off, &mut b);
            assert_eq!(b[0], want, "register {off}");
        }
        // A FIFO longer than the UART's is refused, not trusted.
        let mut bad = saved;
        bad.input = vec![0; 1 << 16];
        assert!(SerialDevice::restored(irq, Box::new(io::sink()), &bad).is_none());
    }

    #[test]
    fn output_and_input() {
        let sink = Sink::default();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut s = SerialDevice::new(irq.try_clone().unwrap(), Box::new(sink.clone()));
        s.write(0, b"h");
        s.write(0, b"i");
        assert_eq!(&*sink.0.lock().unwrap(), b"hi");
        // Enable the "received data available" interrupt, then feed input.
        s.write(1, &[1]);
        assert_eq!(s.enqueue_input(b"x"), 1);
        assert_eq!(irq.read().unwrap(), 1);
        let mut b = [0u8];
        s.read(0, &mut b);
        assert_eq!(b[0], b'x');
        // Bad access sizes are ignored, not a panic.
        s.write(0, b"toolong");
        let mut two = [9u8; 2];
        s.read(0, &mut two);
        assert_eq!(two, [0, 0]);
    }
}
