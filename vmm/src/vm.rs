//! Builds the VM from a `VmConfig` and runs it until it exits.

use std::fs::File;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use devices::legacy::{ConsoleWriter, ExitDevice, SerialDevice, I8042};
use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use kvm_bindings::{kvm_pit_config, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VmFd};
use seccompiler::BpfProgram;
use thiserror::Error;
use vmm_sys_util::eventfd::EventFd;

use crate::boot::{self, BootError};
use crate::bus::{Bus, BusError};
use crate::config::{ConfigError, VmConfig};
use crate::control::{self, Control};
use crate::exit::{code, ExitReason, ExitSignal};
use crate::layout::*;
use crate::memory::{self, MemoryError};
use crate::quirks::Host;
use crate::seccomp::ThreadKind;
use crate::vcpu::{Vcpu, VcpuError};
use crate::virtio::{VirtioError, VirtioSlots};

pub type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

#[derive(Debug, Error)]
pub enum VmError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot open /dev/kvm (is KVM available and are you allowed to use it?)")]
    KvmOpen(#[source] kvm_ioctls::Error),
    #[error("{requested} vCPUs requested but this host's KVM allows at most {max}")]
    TooManyVcpus { requested: u32, max: usize },
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
    Vcpu(#[from] VcpuError),
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error(transparent)]
    Virtio(#[from] VirtioError),
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
    /// Errors caused by the user's input or environment (exit code 2), as opposed to
    /// failures while the VM runs (exit code 1).
    pub fn is_usage(&self) -> bool {
        match self {
            VmError::Config(_) | VmError::KvmOpen(_) | VmError::TooManyVcpus { .. } => true,
            VmError::Boot(e) => matches!(
                e,
                BootError::Open { .. } | BootError::NotAKernel { .. } | BootError::InitrdTooBig { .. } | BootError::Cmdline { .. }
            ),
            VmError::Virtio(e) => e.is_usage(),
            _ => false,
        }
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
    config.validate()?;
    let kvm = Kvm::new().map_err(VmError::KvmOpen)?;
    let max = kvm.get_max_vcpus();
    if config.cpus as usize > max {
        return Err(VmError::TooManyVcpus { requested: config.cpus, max });
    }
    // Check the files the user named before creating anything.
    for (kind, path) in std::iter::once(("kernel", &config.kernel)).chain(config.initrd.iter().map(|p| ("initrd", p))) {
        File::open(path).map_err(|source| BootError::Open { kind, path: path.clone(), source })?;
    }

    let vm = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
    vm.set_tss_address(KVM_TSS_ADDR as usize).map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
    vm.create_irq_chip().map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
    let pit = kvm_pit_config { flags: KVM_PIT_SPEAKER_DUMMY, ..Default::default() };
    vm.create_pit2(pit).map_err(kvm_err("KVM_CREATE_PIT2"))?;
    let mem = memory::create(&vm, config.memory_mib)?;

    let (kernel, entry) = boot::load_kernel(&mem, &config.kernel)?;
    let initrd = config.initrd.as_deref().map(|p| boot::load_initrd(&mem, p)).transpose()?;

    let signals = control::block_signals().map_err(io_err("signal handling"))?;
    let mut event_manager: EventManager<Subscriber> = EventManager::new().map_err(VmError::EventManager)?;
    let exit = Arc::new(ExitSignal::new().map_err(io_err("exit eventfd"))?);
    let panicked = Arc::new(AtomicBool::new(false));

    let mut pio = Bus::default();
    let mut mmio = Bus::default();
    let serial = legacy_devices(&vm, &mut pio, &mut mmio, &exit, &panicked)?;

    // Filters are compiled up front; each thread installs its own (see seccomp/mod.rs).
    let filters = config.seccomp.then(Filters::new).transpose()?;
    let mut virtio = VirtioSlots::new(&vm, &mem, event_manager.remote_endpoint());
    let nics = crate::virtio::attach_all(&mut virtio, &mut mmio, config)?;
    // Owns the NICs and tears them down at exit (or when run() returns early), unfiltered.
    let teardown = crate::teardown::Teardown::spawn(nics).map_err(io_err("teardown thread"))?;

    let cmdline = boot::build_cmdline(&kernel_cmdline(config, &virtio.cmdline_entries()))?;
    tracing::info!(cmdline = %cmdline.as_cstring().map(|c| c.to_string_lossy().into_owned()).unwrap_or_default(), "kernel command line");
    let boot = boot::configure(&mem, &kernel, entry, &cmdline, initrd, config.cpus as u8)?;

    let raw_terminal = crate::terminal::RawTerminal::enable();
    let mut control = Control::new(serial, exit.clone(), signals);

    let pio = Arc::new(pio);
    let mmio = Arc::new(mmio);
    let mut threads = Vec::new();
    for index in 0..config.cpus as u8 {
        let vcpu = Vcpu::new(&kvm, &vm, index, config.cpus as u8, boot.entry)?;
        let filter = filters.as_ref().map(|f| f.vcpu.clone());
        let handle = vcpu.spawn(mem.clone(), pio.clone(), mmio.clone(), exit.clone(), filter)?;
        threads.push(std::os::unix::thread::JoinHandleExt::as_pthread_t(&handle));
    }
    control.set_vcpu_threads(threads);
    event_manager.add_subscriber(Arc::new(Mutex::new(control)));

    // Setup is over: from here on the main thread only runs the event loop.
    if let Some(f) = &filters {
        crate::seccomp::apply(ThreadKind::EventLoop, &f.event_loop)?;
    }
    crate::seccomp::test_fault(ThreadKind::EventLoop);
    let reason = loop {
        if let Some(reason) = exit.get() {
            break reason;
        }
        event_manager.run().map_err(VmError::EventManager)?;
    };
    drop(raw_terminal);
    teardown.finish();
    Ok(exit_code(&reason, panicked.load(Ordering::SeqCst)))
}

/// The compiled filters of the threads `run` starts, and the SIGSYS reporter. The DHCP
/// threads get theirs through net's thread-start hook.
struct Filters {
    vcpu: Arc<BpfProgram>,
    event_loop: BpfProgram,
}

impl Filters {
    fn new() -> Result<Filters, VmError> {
        let started = std::time::Instant::now();
        crate::seccomp::install_handler()?;
        let dhcp = crate::seccomp::compile(ThreadKind::Dhcp)?;
        net::set_thread_start_hook(Box::new(move |_kind| {
            crate::seccomp::apply(ThreadKind::Dhcp, &dhcp)?;
            Ok(())
        }));
        let filters = Filters {
            vcpu: Arc::new(crate::seccomp::compile(ThreadKind::Vcpu)?),
            event_loop: crate::seccomp::compile(ThreadKind::EventLoop)?,
        };
        tracing::debug!(elapsed = ?started.elapsed(), "seccomp filters compiled");
        Ok(filters)
    }
}

fn exit_code(reason: &ExitReason, panicked: bool) -> i32 {
    match reason {
        ExitReason::GuestStatus(s) => i32::from(*s),
        ExitReason::Reset(how) if panicked => {
            eprintln!("microvm: guest kernel panicked ({how})");
            code::GUEST_PANIC
        }
        ExitReason::Reset(how) => {
            tracing::info!("guest reset ({how})");
            code::OK
        }
        ExitReason::Fault(msg) => {
            eprintln!("microvm: {msg}");
            code::VM_FAILURE
        }
        ExitReason::Signal(0) => code::OK,
        ExitReason::Signal(sig) => {
            eprintln!("microvm: stopped by signal {sig}");
            128 + sig
        }
    }
}

/// microvm's kernel parameters, then the host quirks, the user's, and the guest command.
fn kernel_cmdline(config: &VmConfig, virtio_devices: &[String]) -> Vec<String> {
    let mut cmdline = vec!["console=ttyS0".to_string(), "reboot=k".into(), "panic=-1".into()];
    if !config.disks.is_empty() && !user_sets(config, "root=") {
        cmdline.push(format!("root=/dev/vda {}", if config.disks[0].read_only { "ro" } else { "rw" }));
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
    if !config.command.is_empty() {
        cmdline.push(format!("microvm.cmd={}", crate::guestcmd::encode(&config.command)));
    }
    cmdline
}

fn user_sets(config: &VmConfig, key: &str) -> bool {
    config.cmdline.as_deref().is_some_and(|c| c.split_whitespace().any(|w| w.starts_with(key)))
}

/// COM1 (irqfd on GSI 4), the i8042 reset line, and the exit-status device.
fn legacy_devices(
    vm: &VmFd,
    pio: &mut Bus,
    mmio: &mut Bus,
    exit: &Arc<ExitSignal>,
    panicked: &Arc<AtomicBool>,
) -> Result<Arc<Mutex<SerialDevice>>, VmError> {
    let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(io_err("serial interrupt"))?;
    vm.register_irqfd(&serial_irq, SERIAL_IRQ).map_err(kvm_err("serial irqfd"))?;
    let console = ConsoleWriter::new(std::io::stdout(), panicked.clone());
    let serial = Arc::new(Mutex::new(SerialDevice::new(serial_irq, Box::new(console))));
    pio.insert(u64::from(SERIAL_PORT), 8, serial.clone())?;

    let e = exit.clone();
    let i8042 = I8042::new(Box::new(move || e.set(ExitReason::Reset("i8042 reset"))));
    pio.insert(u64::from(I8042_PORT), 5, Arc::new(Mutex::new(i8042)))?;

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
        let line = kernel_cmdline(&c, &["virtio_mmio.device=4K@0xd0001000:5".into()]).join(" ");
        assert!(line.starts_with("console=ttyS0 reboot=k panic=-1 root=/dev/vda ro virtio_mmio.device="), "{line}");
        assert!(line.ends_with(&format!("microvm.cmd={}", crate::guestcmd::encode(&c.command))), "{line}");
        assert!(!line.contains("clearcpuid"), "quirks off: {line}");
        c.cmdline = Some("root=/dev/vdb quiet".into());
        let line = kernel_cmdline(&c, &[]).join(" ");
        assert!(!line.contains("root=/dev/vda") && line.contains("root=/dev/vdb quiet"), "{line}");
    }
}
