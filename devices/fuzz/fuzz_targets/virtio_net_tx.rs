#![no_main]
//! See devices::fuzzing::virtio_net_tx for the input layout and the invariants checked.

libfuzzer_sys::fuzz_target!(|data: &[u8]| devices::fuzzing::virtio_net_tx(data));
