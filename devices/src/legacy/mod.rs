//! Legacy devices: 8250 serial (COM1), the i8042 reset line, and microvm's exit-status device.

mod console;
mod exit;
mod i8042;
mod serial;

pub use console::{ConsoleWriter, PANIC_MARKER};
pub use exit::ExitDevice;
pub use i8042::I8042;
pub use serial::{EventFdTrigger, SerialDevice};

/// A trigger that runs a callback: lets a device report to the VMM without an eventfd.
pub struct CallbackTrigger(pub Box<dyn Fn() + Send>);

impl vm_superio::Trigger for CallbackTrigger {
    type E = std::convert::Infallible;

    fn trigger(&self) -> Result<(), Self::E> {
        (self.0)();
        Ok(())
    }
}
