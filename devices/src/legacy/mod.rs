//! Legacy devices: 8250 serial (COM1) and its console sink, the i8042 reset line, the ACPI
//! PM1 registers (power-off), and microvm's exit-status device.

pub mod acpi_pm;
mod console;
mod exit;
mod i8042;
mod serial;

pub use acpi_pm::AcpiPm;
pub use console::{ConsoleOutput, ConsoleTail, ConsoleWriter, PANIC_MARKER, TAIL_BYTES};
pub use exit::ExitDevice;
pub use i8042::I8042;
pub use serial::{EventFdTrigger, SerialDevice, SerialSnapshot};

/// A trigger that runs a callback: lets a device report to the VMM without an eventfd.
pub struct CallbackTrigger(pub Box<dyn Fn() + Send>);

impl vm_superio::Trigger for CallbackTrigger {
    type E = std::convert::Infallible;

    fn trigger(&self) -> Result<(), Self::E> {
        (self.0)();
        Ok(())
    }
}
