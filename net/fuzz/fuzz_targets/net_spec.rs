//! `--net` specs: any text a user (or a script building the command line) passes.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        net::fuzzing::net_spec(text);
    }
});
