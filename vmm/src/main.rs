//! `microvm`: parse the command line, run the VM, exit with its status.

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use vmm::cli::Cli;
use vmm::exit::code;

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("MICROVM_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();

    // A bug must not leave the terminal raw, the VM half-alive or its network behind:
    // restore the terminal, report, tear the TAPs, networks and virtiofsd daemons down (on
    // the unfiltered teardown thread, see teardown.rs; no Drop runs on exit), and exit 1
    // (whichever thread panicked). Panics the net crate contains (a decoder fed a hostile
    // packet; caught and logged there) are not fatal.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if net::panic_is_contained() {
            return;
        }
        vmm::terminal::restore_now();
        if vmm::seccomp::is_confined() {
            // The default hook would symbolise a backtrace (RUST_BACKTRACE), opening files
            // the thread's seccomp filter forbids: report without one.
            let thread = std::thread::current();
            let what = info.payload_as_str().unwrap_or("(non-string payload)");
            let at = info.location().map(|l| l.to_string()).unwrap_or_default();
            eprintln!(
                "thread '{}' panicked at {at}:\n{what}\n(no backtrace under seccomp; --no-seccomp gives one)",
                thread.name().unwrap_or("<unnamed>")
            );
        } else {
            default_hook(info);
        }
        vmm::teardown::exit_with_teardown(code::VM_FAILURE);
    }));

    let cli = Cli::parse();
    if cli.kconfig {
        print!("{}", vmm::kconfig::fragment());
        return ExitCode::SUCCESS;
    }
    let restore = cli.restore.clone();
    let result = cli.into_config().map_err(vmm::vm::VmError::from).and_then(|config| match &restore {
        Some(dir) => vmm::vm::restore(dir, config),
        None => vmm::vm::run(&config),
    });
    let status = match result {
        Ok(status) => status,
        Err(e) => {
            vmm::terminal::restore_now();
            eprintln!("microvm: error: {}", devices::error_chain(&e));
            e.exit_code()
        }
    };
    // The vCPU threads may still be inside KVM_RUN: leave without joining them.
    std::process::exit(status)
}
