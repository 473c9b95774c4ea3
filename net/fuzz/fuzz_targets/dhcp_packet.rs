//! A DHCP server's input: any bytes a guest or a neighbour broadcasts to port 67.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| net::fuzzing::dhcp_packet(data));
