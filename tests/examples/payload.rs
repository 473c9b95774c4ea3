//! Writes a tiny payload ELF for benchmarks (tools/bench-join), so scripts use the same
//! payloads as the tests instead of assembling their own.
//!
//! usage: payload exit STATUS OUT.elf   (writes STATUS to the exit device)
//!        payload halt OUT.elf          (halts for ever: a VM that holds its NICs until killed)

use microvm_tests::payload::{write_elf, Asm};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (asm, out) = match args.as_slice() {
        [kind, status, out] if kind == "exit" => match status.parse::<u32>() {
            Ok(s) => (Asm::default().exit(s).halt(), out),
            Err(_) => usage(),
        },
        [kind, out] if kind == "halt" => (Asm::default().halt(), out),
        _ => usage(),
    };
    write_elf(std::path::Path::new(out), &asm.code);
}

fn usage() -> ! {
    eprintln!("usage: payload exit STATUS OUT.elf | payload halt OUT.elf");
    std::process::exit(2)
}
