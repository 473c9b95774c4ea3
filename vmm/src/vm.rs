//! Builds the VM from a `VmConfig` and runs it until it exits.

use std::sync::{Arc, Mutex};

use devices::legacy::{AcpiPm, ConsoleTail, ConsoleWriter, ExitDevice, SerialDevice, I8042};
use event_manager::MutEventSubscriber;
use kvm_ioctls::VmFd;
use thiserror::Error;
use vmm_sys_util::eventfd::EventFd;

use crate::acpi::AcpiError;
use crate::boot::BootError;
use crate::bus::{Bus, BusError};
use crate::config::{ConfigError, Preflight, VmConfig};
use crate::console::{ConsoleError, ConsolePlan};
use crate::exit::{code, ExitReason, ExitSignal};
use crate::guestinit::{self, GuestInitError, Root};
use crate::layout::*;
use crate::memory::MemoryError;
use crate::quirks::Host;
use crate::vcpu::VcpuError;
use crate::machine::{Stop, Vmm};
use crate::virtio::VirtioError;

pub type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

#[derive(Debug, Error)]
pub enum VmError {
    /// Bad input, found by preflight (or, for a few, while booting): exit class inside.
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("KVM setup failed: {what}")]
    Kvm {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Boot(#[from] BootError),
    #[error(transparent)]
    Console(#[from] ConsoleError),
    #[error(transparent)]
    Acpi(#[from] AcpiError),
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error(transparent)]
    Virtio(#[from] VirtioError),
    #[error(transparent)]
    Share(#[from] crate::share::ShareError),
    #[error(transparent)]
    GuestInit(#[from] GuestInitError),
    #[error(transparent)]
    Channel(#[from] crate::channel::ChannelError),
    #[error(transparent)]
    Snapshot(#[from] crate::snapshot::SnapshotError),
    #[error("cannot save or restore a virtio device")]
    DeviceSnapshot(#[source] devices::virtio::snapshot::SnapshotError),
    #[error("event loop failure")]
    EventManager(#[source] event_manager::Error),
    #[error(transparent)]
    Seccomp(#[from] crate::seccomp::SeccompError),
    #[error("cannot set up {what}")]
    Io {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

impl VmError {
    /// The process exit code for this error: the config error's class (2 for bad usage),
    /// else 1 (the VM failed while being built or run).
    pub fn exit_code(&self) -> i32 {
        match self {
            VmError::Config(e) => e.exit_code(),
            VmError::Share(e) if e.is_usage() => code::USAGE,
            VmError::GuestInit(e) if e.is_usage() => code::USAGE,
            VmError::Console(_) => code::USAGE,
            VmError::Virtio(VirtioError::Disk(e)) if e.is_usage() => code::USAGE,
            VmError::Snapshot(e) if e.is_usage() => code::USAGE,
            _ => code::VM_FAILURE,
        }
    }
}

/// The few input errors only found while building the VM become config errors here.
fn late_input_error(e: VmError) -> VmError {
    match e {
        VmError::Boot(b @ (BootError::InitrdTooBig { .. } | BootError::InitramfsTooBig { .. } | BootError::Cmdline { .. })) => {
            ConfigError::Boot(b).into()
        }
        // A subnet collision is checked under the network lock, when attaching.
        VmError::Virtio(VirtioError::Nic(crate::nics::NicError::Host(n))) if n.is_bad_input() => ConfigError::Net(n).into(),
        e => e,
    }
}

pub(crate) fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

pub(crate) fn io_err(what: &'static str) -> impl FnOnce(std::io::Error) -> VmError {
    move |source| VmError::Io { what, source }
}

/// Creates the VM and its devices, boots it, and returns the process exit code.
pub fn run(config: &VmConfig) -> Result<i32, VmError> {
    // Every check of the user's input, before anything is created.
    let checked = config.preflight()?;
    build_and_run(config, &checked).map_err(late_input_error)
}

fn build_and_run(config: &VmConfig, checked: &Preflight) -> Result<i32, VmError> {
    let vmm = Vmm::boot(config, checked)?;
    run_to_end(vmm, config)
}

/// `--restore DIR`: the VM saved in DIR, with `runtime`'s command, console and timeout.
pub fn restore(dir: &std::path::Path, runtime: VmConfig) -> Result<i32, VmError> {
    let snap = crate::snapshot::load(dir)?;
    let config = crate::snapshot::saved::config(&snap, runtime)?;
    for d in &config.disks {
        d.preflight().map_err(ConfigError::from)?;
    }
    for n in &config.nets {
        n.preflight().map_err(ConfigError::from)?;
    }
    let vmm = Vmm::restore(&config, &snap).map_err(late_input_error)?;
    run_to_end(vmm, &config)
}

/// Runs the VM until it ends; with `--snapshot-to`, until the init is ready, then saves it.
fn run_to_end(mut vmm: Vmm, config: &VmConfig) -> Result<i32, VmError> {
    match vmm.run()? {
        Stop::Exit(reason) if config.snapshot_to.is_some() => {
            let status = vmm.finish(&reason);
            eprintln!("microvm: the guest ended before its init was ready for a command: no snapshot written");
            Ok(if status == code::OK { code::VM_FAILURE } else { status })
        }
        Stop::Exit(reason) => Ok(vmm.finish(&reason)),
        Stop::Ready => {
            let dir = config.snapshot_to.as_deref().ok_or(VmError::Io {
                what: "a snapshot",
                source: std::io::Error::other("ready without --snapshot-to"),
            })?;
            let started = std::time::Instant::now();
            let saved = vmm.pause().and_then(|()| vmm.save(dir, config));
            let status = vmm.finish(&ExitReason::Saved);
            let stats = saved?;
            eprintln!(
                "microvm: snapshot saved to {} ({} MiB of guest memory written, {} ms)",
                dir.display(),
                stats.memory.written >> 20,
                started.elapsed().as_millis()
            );
            Ok(status)
        }
    }
}

/// After a panic, a VM fault or a timeout, the console's last lines tell why: repeat them
/// on stderr when the console itself went somewhere a CI log may not show.
/// (Not for the guest command's own failures: those statuses come from the exit device.)
pub(crate) fn post_mortem(reason: &ExitReason, panicked: bool, plan: &ConsolePlan, tail: &ConsoleTail) {
    let bad = match reason {
        ExitReason::Reset(_) => panicked,
        ExitReason::Fault(_) | ExitReason::Timeout(_) => true,
        ExitReason::GuestStatus(_) | ExitReason::PowerOff | ExitReason::Signal(_) | ExitReason::Saved => false,
    };
    if bad && plan.post_mortem_wanted() {
        crate::console::print_post_mortem(tail);
    }
}

/// The process exit status for `reason`, and the line to print on stderr (last).
pub(crate) fn exit_code(reason: &ExitReason, panicked: bool) -> (i32, Option<String>) {
    match reason {
        ExitReason::GuestStatus(s) => (i32::from(*s), None),
        ExitReason::Reset(how) if panicked => (code::GUEST_PANIC, Some(format!("guest kernel panicked ({how})"))),
        ExitReason::Reset(how) => {
            tracing::info!("guest reset ({how})");
            (code::OK, None)
        }
        ExitReason::Saved => (code::OK, None),
        ExitReason::PowerOff => {
            tracing::info!("guest powered off");
            (code::OK, None)
        }
        ExitReason::Timeout(after) => {
            (code::TIMEOUT, Some(format!("stopped after --timeout {}", crate::timeout::format_duration(*after))))
        }
        ExitReason::Fault(msg) => (code::VM_FAILURE, Some(msg.clone())),
        ExitReason::Signal(0) => (code::OK, None),
        ExitReason::Signal(sig) => (128 + sig, Some(format!("stopped by signal {sig}"))),
    }
}

/// microvm's kernel parameters, then the host quirks, the user's, and the parameters of
/// microvm's init (see guestinit.rs).
/// The shares the guest init mounts (`microvm.share=`): all but the host root, which is
/// the root itself (`root=`).
pub(crate) fn guest_mounts(shares: &[crate::share::Share]) -> Vec<guestinit::protocol::Share> {
    use std::os::unix::ffi::OsStrExt;
    shares
        .iter()
        .filter(|s| !s.is_root())
        .map(|s| guestinit::protocol::Share {
            tag: s.tag.clone(),
            path: s.guest.as_os_str().as_bytes().to_vec(),
            read_only: s.read_only,
        })
        .collect()
}

pub(crate) fn kernel_cmdline(
    config: &VmConfig,
    own_init: Option<Root>,
    virtio_devices: &[String],
    mounts: &[guestinit::protocol::Share],
) -> Result<Vec<String>, GuestInitError> {
    let mut cmdline = vec!["console=ttyS0".to_string(), "reboot=k".into(), "panic=-1".into()];
    if !user_sets(config, "root=") {
        if own_init == Some(Root::Host) {
            cmdline.push(guestinit::host_root_params());
        } else if let Some(disk) = config.disks.first() {
            cmdline.push(format!("root=/dev/vda {}", if disk.read_only { "ro" } else { "rw" }));
        }
    }
    cmdline.extend_from_slice(virtio_devices);
    if config.snapshot_to.is_some() {
        // A restored guest's TSC has jumped by the time the snapshot sat on disk (KVM cannot
        // set it back on every host): with the TSC as clocksource the kernel would spend
        // seconds catching up on timekeeping and load averages. With kvm-clock it takes the
        // jump in one step (on PVM its time base still includes the snapshot's age: the
        // guest's clocks jump forward by it, see the README).
        cmdline.push("clocksource=kvm-clock".into());
    }
    let host = Host::detect();
    let mut user = config.cmdline.clone().unwrap_or_default();
    if config.quirks && host == Host::Pvm {
        eprintln!(
            "microvm: PVM nested KVM detected: adding guest kernel parameters '{}' (--no-quirks turns this off)",
            host.cmdline_quirks().join(" ")
        );
        let (quirks, rest) = crate::quirks::merge_user_params(host.cmdline_quirks(), &user);
        cmdline.extend(quirks);
        user = rest;
    }
    cmdline.push(user);
    cmdline.extend(guestinit::params(config, own_init, mounts)?);
    guestinit::check_length(&cmdline, config)?;
    Ok(cmdline)
}

fn user_sets(config: &VmConfig, key: &str) -> bool {
    config.cmdline.as_deref().is_some_and(|c| c.split_whitespace().any(|w| w.starts_with(key)))
}

/// COM1 (irqfd on GSI 4), the i8042 reset line, the ACPI PM1 registers, and the
/// exit-status device.
pub(crate) fn legacy_devices(
    vm: &VmFd,
    pio: &mut Bus,
    mmio: &mut Bus,
    exit: &Arc<ExitSignal>,
    console: ConsoleWriter,
    saved: Option<&devices::legacy::SerialSnapshot>,
) -> Result<Arc<Mutex<SerialDevice>>, VmError> {
    let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(io_err("serial interrupt"))?;
    vm.register_irqfd(&serial_irq, SERIAL_IRQ).map_err(kvm_err("serial irqfd"))?;
    let serial = match saved {
        None => SerialDevice::new(serial_irq, Box::new(console)),
        Some(s) => SerialDevice::restored(serial_irq, Box::new(console), s).ok_or_else(|| {
            VmError::from(crate::snapshot::SnapshotError::Corrupt {
                path: "state".into(),
                reason: "serial port state".into(),
            })
        })?,
    };
    let serial = Arc::new(Mutex::new(serial));
    pio.insert(u64::from(SERIAL_PORT), 8, serial.clone())?;

    let e = exit.clone();
    let i8042 = I8042::new(Box::new(move || e.set(ExitReason::Reset("i8042 reset"))));
    pio.insert(u64::from(I8042_PORT), 5, Arc::new(Mutex::new(i8042)))?;

    let e = exit.clone();
    let pm = AcpiPm::new(Box::new(move || e.set(ExitReason::PowerOff)));
    pio.insert(u64::from(ACPI_PM_PORT), devices::legacy::acpi_pm::PM1_BLOCK_LEN, Arc::new(Mutex::new(pm)))?;

    let e = exit.clone();
    let exit_dev = ExitDevice::new(Box::new(move |s| e.set(ExitReason::GuestStatus(s))));
    mmio.insert(EXIT_DEVICE_ADDR, EXIT_DEVICE_SIZE, Arc::new(Mutex::new(exit_dev)))?;
    Ok(serial)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DiskConfig;

    #[test]
    fn cmdline_parts() {
        let mut c = VmConfig { quirks: false, ..Default::default() };
        c.disks.push("root.img,readonly".parse::<DiskConfig>().unwrap());
        c.command = vec!["true".into()];
        let own = guestinit::own_init(&c);
        let line = kernel_cmdline(&c, own, &["virtio_mmio.device=4K@0xd0001000:5".into()], &[]).unwrap().join(" ");
        assert!(line.starts_with("console=ttyS0 reboot=k panic=-1 root=/dev/vda ro virtio_mmio.device="), "{line}");
        assert!(line.ends_with(&guestinit::protocol::argv_param(&c.command)), "{line}");
        assert!(line.contains("microvm.exitdev=0xd0000000"), "{line}");
        assert!(!line.contains("clearcpuid"), "quirks off: {line}");
        c.cmdline = Some("root=/dev/vdb quiet".into());
        let line = kernel_cmdline(&c, own, &[], &[]).unwrap().join(" ");
        assert!(!line.contains("root=/dev/vda") && line.contains("root=/dev/vdb quiet"), "{line}");
        // The host root: virtio-fs by tag, read-only.
        let c = VmConfig { quirks: false, ..Default::default() };
        let line = kernel_cmdline(&c, guestinit::own_init(&c), &[], &[]).unwrap().join(" ");
        assert!(line.contains("root=microvm-root rootfstype=virtiofs ro") && line.contains("microvm.cwd="), "{line}");
    }
}
