#![no_main]
//! See devices::fuzzing::mmio_transport for the input layout and the invariants checked.

libfuzzer_sys::fuzz_target!(|data: &[u8]| devices::fuzzing::mmio_transport(data));
