//! Legacy devices: 8250 serial, i8042, the exit-status device.
