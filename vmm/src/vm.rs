//! Builds the VM from a `VmConfig` and runs it until it exits.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use devices::legacy::{AcpiPm, ConsoleTail, ConsoleWriter, ExitDevice, SerialDevice, I8042};
use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use kvm_bindings::{kvm_pit_config, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VmFd};
use thiserror::Error;
use vmm_sys_util::eventfd::EventFd;

use crate::acpi::AcpiError;
use crate::boot::{self, BootError};
use crate::bus::{Bus, BusError};
use crate::config::{ConfigError, Preflight, VmConfig};
use crate::console::{ConsoleError, ConsolePlan};
use crate::control::{self, Control};
use crate::exit::{code, ExitReason, ExitSignal};
use crate::guestinit::{self, GuestInitError, Root};
use crate::layout::*;
use crate::memory::{self, MemoryError};
use crate::quirks::Host;
use crate::seccomp::ThreadKind;
use crate::timeout::Deadline;
use crate::vcpu::{Vcpu, VcpuError};
use crate::virtio::{VirtioError, VirtioSlots};

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

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

fn io_err(what: &'static str) -> impl FnOnce(std::io::Error) -> VmError {
    move |source| VmError::Io { what, source }
}

/// Creates the VM and its devices, boots it, and returns the process exit code.
pub fn run(config: &VmConfig) -> Result<i32, VmError> {
    // Every check of the user's input, before anything is created.
    let checked = config.preflight()?;
    build_and_run(config, &checked).map_err(late_input_error)
}

fn build_and_run(config: &VmConfig, checked: &Preflight) -> Result<i32, VmError> {
    let shares = crate::share::plan(config)?;
    let virtiofsd = if shares.is_empty() { None } else { Some(crate::share::find_virtiofsd()?) };
    let kvm = Kvm::new().map_err(kvm_err("open /dev/kvm"))?;
    let vm = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
    vm.set_tss_address(KVM_TSS_ADDR as usize).map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
    vm.create_irq_chip().map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
    let pit = kvm_pit_config { flags: KVM_PIT_SPEAKER_DUMMY, ..Default::default() };
    vm.create_pit2(pit).map_err(kvm_err("KVM_CREATE_PIT2"))?;
    // virtiofsd maps guest RAM itself: it must be shareable then.
    let mem = memory::create(&vm, config.memory_mib, !shares.is_empty())?;

    let (kernel, entry) = boot::load_kernel(&mem, &checked.kernel.image)?;
    let own_init = guestinit::own_init(config);
    let initrd = match (&config.initrd, own_init) {
        (Some(path), _) => Some(boot::load_initrd(&mem, path)?),
        (None, Some(_)) => Some(boot::load_initrd_bytes(&mem, &guestinit::initramfs()?)?),
        (None, None) => None,
    };

    // With the command channel, stdout is the command's alone: the console goes elsewhere.
    let command_channel = crate::channel::wanted(config);
    let console_plan = ConsolePlan::new(config, command_channel);
    let panicked = Arc::new(AtomicBool::new(false));
    let (console, console_tail) = crate::console::open(&console_plan, panicked.clone())?;
    let exit = Arc::new(ExitSignal::new().map_err(io_err("exit eventfd"))?);
    let mut deadline = config
        .timeout
        .map(|after| Deadline::start(after, exit.clone()))
        .transpose()
        .map_err(io_err("--timeout timer"))?;

    let signals = control::block_signals().map_err(io_err("signal handling"))?;
    let mut event_manager: EventManager<Subscriber> = EventManager::new().map_err(VmError::EventManager)?;

    let mut pio = Bus::default();
    let mut mmio = Bus::default();
    let serial = legacy_devices(&vm, &mut pio, &mut mmio, &exit, console)?;

    // Before any thread that runs under a seccomp filter (vCPUs, DHCP, channel pumps, and
    // this one's event loop): the unfiltered teardown thread, and the filters.
    let teardown = crate::teardown::Teardown::spawn().map_err(io_err("teardown thread"))?;
    if config.seccomp {
        crate::seccomp::enable()?;
    }
    // One virtiofsd per share, stopped by the teardown thread (or on drop, on error paths).
    let (daemons, conns) = match &virtiofsd {
        Some(bin) => crate::share::Shares::start(&shares, bin)?,
        None => (crate::share::Shares::none(), Vec::new()),
    };
    let fs_devices = shares.iter().map(|s| s.tag.clone()).zip(conns).collect();
    let mut virtio = VirtioSlots::new(&vm, &mem, event_manager.remote_endpoint());
    // Released when the VM ends (TAPs, and networks whose last user this VM is); on an
    // early error return, their Drop does it.
    let nics = crate::virtio::attach_all(&mut virtio, &mut mmio, config, fs_devices)?;
    // The command's stdin/stdout/stderr (see channel.rs).
    let channel = if command_channel { Some(crate::channel::attach(&mut virtio, &mut mmio)?) } else { None };

    let mounts = guest_mounts(&shares);
    let cmdline = boot::build_cmdline(&kernel_cmdline(config, own_init, &virtio.cmdline_entries(), &mounts)?)?;
    tracing::info!(cmdline = %cmdline.as_cstring().map(|c| c.to_string_lossy().into_owned()).unwrap_or_default(), "kernel command line");
    let boot = boot::configure(&mem, &kernel, entry, &cmdline, initrd, config.cpus as u8)?;
    crate::acpi::setup(&mem, config.cpus as u8)?;

    // With the command channel, stdin belongs to the command: no raw mode, no serial input.
    let raw_terminal = if command_channel { None } else { crate::terminal::RawTerminal::enable() };
    let mut control = Control::new(serial, exit.clone(), signals);
    control.set_stdin_to_serial(!command_channel);

    let symbols = Arc::new(crate::symbols::Symbols::new(checked.kernel.system_map.clone()));
    let pio = Arc::new(pio);
    let mmio = Arc::new(mmio);
    let mut threads = Vec::new();
    // Kept (never joined) so the pthread_t handles stay valid for signal kicks.
    let mut handles = Vec::new();
    for index in 0..config.cpus as u8 {
        let vcpu = Vcpu::new(&kvm, &vm, index, config.cpus as u8, boot.entry)?;
        let handle = vcpu.spawn(mem.clone(), pio.clone(), mmio.clone(), exit.clone(), symbols.clone())?;
        threads.push(std::os::unix::thread::JoinHandleExt::as_pthread_t(&handle));
        handles.push(handle);
    }
    if let Some(mut d) = deadline.take() {
        d.set_vcpu_threads(threads.clone());
        event_manager.add_subscriber(Arc::new(Mutex::new(d)));
    }
    control.set_vcpu_threads(threads);
    event_manager.add_subscriber(Arc::new(Mutex::new(control)));
    event_manager.add_subscriber(Arc::new(Mutex::new(daemons.watcher(exit.clone())?)));

    // Setup is over: the teardown thread releases the host resources however the VM ends,
    // and this thread keeps only what its event loop needs.
    teardown.adopt(nics, daemons);
    crate::seccomp::confine(ThreadKind::EventLoop)?;
    let reason = loop {
        if let Some(reason) = exit.get() {
            break reason;
        }
        event_manager.run().map_err(VmError::EventManager)?;
    };
    drop(raw_terminal);
    let panicked = panicked.load(Ordering::SeqCst);
    let (status, message) = exit_code(&reason, panicked);
    post_mortem(&reason, panicked, &console_plan, &console_tail);
    if let Some(channel) = channel {
        channel.finish(&reason);
    }
    // Ordered teardown, on the teardown thread: the NICs' host side (TAPs, networks), then
    // the virtiofsd daemons.
    teardown.finish();
    if let Some(m) = message {
        eprintln!("microvm: {m}");
    }
    drop(handles);
    Ok(status)
}

/// After a panic, a VM fault or a timeout, the console's last lines tell why: repeat them
/// on stderr when the console itself went somewhere a CI log may not show.
/// (Not for the guest command's own failures: those statuses come from the exit device.)
fn post_mortem(reason: &ExitReason, panicked: bool, plan: &ConsolePlan, tail: &ConsoleTail) {
    let bad = match reason {
        ExitReason::Reset(_) => panicked,
        ExitReason::Fault(_) | ExitReason::Timeout(_) => true,
        ExitReason::GuestStatus(_) | ExitReason::PowerOff | ExitReason::Signal(_) => false,
    };
    if bad && plan.post_mortem_wanted() {
        crate::console::print_post_mortem(tail);
    }
}

/// The process exit status for `reason`, and the line to print on stderr (last).
fn exit_code(reason: &ExitReason, panicked: bool) -> (i32, Option<String>) {
    match reason {
        ExitReason::GuestStatus(s) => (i32::from(*s), None),
        ExitReason::Reset(how) if panicked => (code::GUEST_PANIC, Some(format!("guest kernel panicked ({how})"))),
        ExitReason::Reset(how) => {
            tracing::info!("guest reset ({how})");
            (code::OK, None)
        }
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
fn guest_mounts(shares: &[crate::share::Share]) -> Vec<guestinit::protocol::Share> {
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

fn kernel_cmdline(
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
fn legacy_devices(
    vm: &VmFd,
    pio: &mut Bus,
    mmio: &mut Bus,
    exit: &Arc<ExitSignal>,
    console: ConsoleWriter,
) -> Result<Arc<Mutex<SerialDevice>>, VmError> {
    let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(io_err("serial interrupt"))?;
    vm.register_irqfd(&serial_irq, SERIAL_IRQ).map_err(kvm_err("serial irqfd"))?;
    let serial = Arc::new(Mutex::new(SerialDevice::new(serial_irq, Box::new(console))));
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
