//! The microvm VMM library: KVM VM, guest memory, vCPUs, direct Linux boot, the device
//! buses, and the event loop. The `microvm` binary (main.rs) is a thin CLI over `vm::run`.

pub mod acpi;
pub mod boot;
pub mod bus;
pub mod channel;
pub mod cli;
pub mod config;
pub mod console;
pub mod control;
pub mod cpuid;
pub mod debug;
pub mod devices;
pub mod disk;
pub mod exit;
pub mod fdwait;
pub mod guestinit;
pub mod kconfig;
pub mod layout;
pub mod machine;
pub mod memory;
pub mod nics;
pub mod quirks;
pub mod release;
pub mod seccomp;
pub mod share;
pub mod snapshot;
pub mod symbols;
pub mod teardown;
pub mod terminal;
pub mod timeout;
pub mod vcpu;
pub mod virtio;
pub mod virtiofsd;
pub mod vm;

/// Entry points for the cargo-fuzz targets in `vmm/fuzz` (feature `fuzzing`); not API.
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
