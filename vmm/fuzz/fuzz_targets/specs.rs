#![no_main]
//! See vmm::fuzzing::specs for the input layout and the invariants checked.

libfuzzer_sys::fuzz_target!(|data: &[u8]| vmm::fuzzing::specs(data));
