//! [`Vmm`]: the running VM and everything it owns (VM fd, memory, buses, devices, vCPU
//! threads, network attachments, virtiofsd daemons, the command channel), built either by
//! booting a kernel ([`Vmm::boot`]) or from a snapshot ([`Vmm::restore`]), then run until
//! it ends or reaches the snapshot point ([`Vmm::run`]), paused and saved
//! ([`Vmm::save`]), and released in order ([`Vmm::finish`]).
//!
//! Both ways share every step but the guest's starting state: a boot loads the kernel and
//! sets the vCPUs at its entry point; a restore maps the saved memory copy-on-write, loads
//! the vCPU and VM state, and puts each device back in its saved state. Devices are attached
//! in the same order either way, so each lands in the slot (MMIO window, GSI) the guest knows.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use devices::legacy::{ConsoleTail, SerialDevice, SerialSnapshot};
use devices::virtio::block::Disk;
use devices::virtio::mmio::MmioTransport;
use devices::virtio::snapshot::TransportSnapshot;
use event_manager::{EventManager, SubscriberOps};
use kvm_bindings::{kvm_pit_config, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VmFd};
use serde::{Deserialize, Serialize};

use crate::bus::Bus;
use crate::config::{Preflight, VmConfig};
use crate::console::ConsolePlan;
use crate::control::{self, Control};
use crate::exit::{ExitReason, ExitSignal};
use crate::guestinit;
use crate::layout::KVM_TSS_ADDR;
use crate::memory::{self, GuestMemoryMmap};
use crate::seccomp::{ThreadKind, Unconfined};
use crate::snapshot::{self, KvmCaps, PauseHandle, Snapshot, SnapshotState};
use crate::teardown::Teardown;
use crate::timeout::Deadline;
use crate::vcpu::Vcpu;
use crate::virtio::VirtioSlots;
use crate::vm::{io_err, kvm_err, Subscriber, VmError};

/// How long vCPUs get to stop for a snapshot.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Device state in a snapshot: COM1 and every virtio transport, in slot order.
#[derive(Debug, Serialize, Deserialize)]
pub struct DevicesState {
    pub serial: SerialSnapshot,
    pub virtio: Vec<TransportSnapshot>,
}

/// How [`Vmm::run`] ended.
pub enum Stop {
    /// The VM is over (the guest's status, a fault, a signal, ...).
    Exit(ExitReason),
    /// `--snapshot-to`: the init is ready for a command; the VM is still running.
    Ready,
}

/// One vCPU thread.
struct VcpuThread {
    /// Kept (never joined: a vCPU may sit in KVM_RUN until the process exits) so the
    /// pthread_t stays valid for signal kicks.
    _thread: JoinHandle<()>,
    pause: Arc<PauseHandle>,
}

/// The running VM (see the module documentation).
pub struct Vmm {
    kvm: Kvm,
    vm: VmFd,
    mem: GuestMemoryMmap,
    event_manager: EventManager<Subscriber>,
    exit: Arc<ExitSignal>,
    serial: Arc<Mutex<SerialDevice>>,
    transports: Vec<Arc<Mutex<MmioTransport>>>,
    /// The disks in `--disk` order: a `,snapshot` disk's overlay is saved with the VM.
    disks: Vec<Arc<Disk>>,
    vcpus: Vec<VcpuThread>,
    /// Owns the NICs' host side and the virtiofsd daemons (teardown.rs).
    teardown: Teardown,
    /// Each NIC's address on its named network, in `--net` order: a snapshot keeps them, so
    /// that a restore asks each network for its guest's address again.
    nic_addresses: Vec<Option<std::net::Ipv4Addr>>,
    /// Where the `--snapshot-to` save runs under seccomp (seccomp/unconfined.rs).
    unconfined: Unconfined,
    channel: Option<crate::channel::Channel>,
    /// Raised by the command channel when the init says READY (`--snapshot-to`).
    ready: Option<Arc<AtomicBool>>,
    console_plan: ConsolePlan,
    console_tail: Arc<ConsoleTail>,
    panicked: Arc<AtomicBool>,
    raw_terminal: Option<crate::terminal::RawTerminal>,
}

/// A VM fd, its release process (release.rs) forked before the memory is mapped, so that
/// the fork copies little.
fn create_vm(kvm: &Kvm) -> Result<VmFd, VmError> {
    let vm = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
    crate::release::delegate(&vm);
    Ok(vm)
}

/// What every microvm guest has: TSS, in-kernel irqchip and PIT.
fn add_chips(vm: &VmFd) -> Result<(), VmError> {
    vm.set_tss_address(KVM_TSS_ADDR as usize).map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
    vm.create_irq_chip().map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
    let pit = kvm_pit_config { flags: KVM_PIT_SPEAKER_DUMMY, ..Default::default() };
    vm.create_pit2(pit).map_err(kvm_err("KVM_CREATE_PIT2"))?;
    Ok(())
}

/// Where the guest starts.
enum Start<'a> {
    Boot(&'a Preflight),
    Restore(&'a Snapshot, &'a DevicesState),
}

impl Vmm {
    /// Boots `config`'s kernel.
    pub fn boot(config: &VmConfig, checked: &Preflight) -> Result<Vmm, VmError> {
        Self::build(config, Start::Boot(checked))
    }

    /// Builds the VM saved in `snap` (whose configuration `config` was read back from it).
    pub fn restore(config: &VmConfig, snap: &Snapshot) -> Result<Vmm, VmError> {
        let devices: DevicesState = serde_json::from_value(snap.state.devices.clone()).map_err(|e| {
            snapshot::SnapshotError::Corrupt { path: snap.dir.join("state"), reason: format!("device state: {e}") }
        })?;
        Self::build(config, Start::Restore(snap, &devices))
    }

    fn build(config: &VmConfig, start: Start) -> Result<Vmm, VmError> {
        let shares = crate::share::plan(config)?;
        let virtiofsd = if shares.is_empty() { None } else { Some(crate::share::find_virtiofsd()?) };
        let kvm = Kvm::new().map_err(kvm_err("open /dev/kvm"))?;
        let vm = create_vm(&kvm)?;
        let mem = match start {
            // virtiofsd maps guest RAM itself: it must be shareable then.
            Start::Boot(_) => memory::create(&vm, config.memory_mib, !shares.is_empty())?,
            Start::Restore(snap, _) => {
                let mem = snap.map_memory()?;
                snapshot::memory::register(&vm, &mem)?;
                mem
            }
        };
        add_chips(&vm)?;
        let own_init = guestinit::own_init(config);
        let boot_image = match start {
            Start::Boot(checked) => {
                let (kernel, entry) = crate::boot::load_kernel(&mem, &checked.kernel.image)?;
                let initrd = match (&config.initrd, own_init) {
                    (Some(path), _) => Some(crate::boot::load_initrd(&mem, path)?),
                    (None, Some(_)) => Some(crate::boot::load_initrd_bytes(&mem, &guestinit::initramfs()?)?),
                    (None, None) => None,
                };
                Some((kernel, entry, initrd))
            }
            Start::Restore(..) => None,
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
        let saved_serial = match start {
            Start::Restore(_, d) => Some(&d.serial),
            Start::Boot(_) => None,
        };
        let serial = crate::vm::legacy_devices(&vm, &mut pio, &mut mmio, &exit, console, saved_serial)?;

        // Before any thread that runs under a seccomp filter (vCPUs, DHCP, channel pumps, and
        // this one's event loop): the unfiltered teardown and save threads, and the filters.
        let teardown = Teardown::spawn().map_err(io_err("teardown thread"))?;
        crate::seccomp::enable(config)?;
        let unconfined = Unconfined::spawn("snapshot-save", config.snapshot_to.is_some())
            .map_err(io_err("snapshot thread"))?;
        // One virtiofsd per share, stopped by `finish` (or on drop, on error paths).
        let (daemons, conns) = match &virtiofsd {
            Some(bin) => crate::share::Shares::start(&shares, bin)?,
            None => (crate::share::Shares::none(), Vec::new()),
        };
        let fs_devices = shares.iter().map(|s| s.tag.clone()).zip(conns).collect();
        let mut virtio = VirtioSlots::new(&vm, &mem, event_manager.remote_endpoint());
        // Released by `finish` (TAPs, and networks whose last user this VM is); on an
        // early error return, their Drop does it.
        let mut disks = Vec::new();
        let nics = crate::virtio::attach_all(&mut virtio, &mut mmio, config, fs_devices, &mut disks)?;
        // A restored NIC whose saved address a live VM holds got another (nics.rs says so):
        // the init configures the network again before the command.
        let renew = nics.iter().zip(&config.nic_addresses).any(|(a, want)| want.is_some() && a.ip() != *want);
        let mut ready = None;
        let channel = if command_channel {
            let mode = match (&start, &config.snapshot_to) {
                (Start::Restore(..), _) => crate::channel::Mode::SendCommand {
                    message: command_message(config, renew)?,
                    stdin: !config.command.is_empty(),
                    hold: false,
                },
                // The init waits for it (guestinit::params put `microvm.wait` instead).
                (Start::Boot(_), None) if !guestinit::command_on_cmdline(config) => {
                    crate::channel::Mode::SendCommand { message: command_message(config, false)?, stdin: true, hold: true }
                }
                (Start::Boot(_), Some(_)) => {
                    let flag = Arc::new(AtomicBool::new(false));
                    ready = Some(flag.clone());
                    let wake = exit.eventfd().try_clone().map_err(io_err("snapshot wakeup"))?;
                    crate::channel::Mode::SnapshotTo { ready: flag, wake }
                }
                (Start::Boot(_), None) => crate::channel::Mode::Command,
            };
            Some(crate::channel::attach(&mut virtio, &mut mmio, mode)?)
        } else {
            None
        };
        let transports = virtio.transports();

        // Where the guest starts: at the kernel's entry, or where the snapshot stopped.
        let (vcpus, system_map) = match (start, boot_image) {
            (Start::Boot(checked), Some((kernel, entry, initrd))) => {
                let mounts = crate::vm::guest_mounts(&shares);
                let parts = crate::vm::kernel_cmdline(config, own_init, &virtio.cmdline_entries(), &mounts)?;
                let cmdline = crate::boot::build_cmdline(&parts)?;
                tracing::info!(cmdline = %cmdline.as_cstring().map(|c| c.to_string_lossy().into_owned()).unwrap_or_default(), "kernel command line");
                let boot = crate::boot::configure(&mem, &kernel, entry, &cmdline, initrd, config.cpus as u8)?;
                crate::acpi::setup(&mem, config.cpus as u8)?;
                drop(virtio);
                let vcpus = (0..config.cpus as u8)
                    .map(|i| Vcpu::new(&kvm, &vm, i, config.cpus as u8, boot.entry))
                    .collect::<Result<Vec<_>, _>>()?;
                (vcpus, checked.kernel.system_map.clone())
            }
            (Start::Restore(snap, devices), _) => {
                drop(virtio);
                let caps = KvmCaps::new(&kvm, &vm)?;
                let mut vcpus = Vec::with_capacity(snap.state.vcpus.len());
                for (i, state) in snap.state.vcpus.iter().enumerate() {
                    let fd = vm.create_vcpu(i as u64).map_err(kvm_err("KVM_CREATE_VCPU"))?;
                    snapshot::restore_vcpu(&fd, state, &caps)?;
                    vcpus.push(Vcpu::restored(i as u8, fd));
                }
                snapshot::restore_vm(&vm, &snap.state.vm)?;
                restore_devices(&mut event_manager, &transports, &devices.virtio)?;
                (vcpus, None)
            }
            (Start::Boot(_), None) => unreachable!("a boot always loads a kernel image"),
        };
        Self::assemble(Parts {
            kvm, vm, mem, event_manager, exit, serial, transports, disks, vcpus, nics, daemons, teardown, unconfined,
            channel, ready, console_plan, console_tail, panicked, deadline: deadline.take(), signals, command_channel,
            system_map, pio, mmio,
        })
    }

    /// Starts the vCPU threads and the main thread's event sources.
    fn assemble(p: Parts) -> Result<Vmm, VmError> {
        let Parts { kvm, vm, mem, mut event_manager, exit, serial, transports, disks, vcpus, nics, daemons, teardown, unconfined, channel, ready, console_plan, console_tail, panicked, deadline, signals, command_channel, system_map, pio, mmio } = p;
        // With the command channel, stdin belongs to the command: no raw mode, no serial input.
        let raw_terminal = if command_channel { None } else { crate::terminal::RawTerminal::enable() };
        let mut control = Control::new(serial.clone(), exit.clone(), signals);
        control.set_stdin_to_serial(!command_channel);
        let symbols = Arc::new(crate::symbols::Symbols::new(system_map));
        let (pio, mmio) = (Arc::new(pio), Arc::new(mmio));
        let mut threads = Vec::new();
        let mut running = Vec::new();
        for (i, vcpu) in vcpus.into_iter().enumerate() {
            let pause = PauseHandle::new(i);
            let thread = vcpu.with_pause(pause.clone()).spawn(mem.clone(), pio.clone(), mmio.clone(), exit.clone(), symbols.clone())?;
            threads.push(std::os::unix::thread::JoinHandleExt::as_pthread_t(&thread));
            running.push(VcpuThread { _thread: thread, pause });
        }
        if let Some(mut d) = deadline {
            d.set_vcpu_threads(threads.clone());
            event_manager.add_subscriber(Arc::new(Mutex::new(d)));
        }
        control.set_vcpu_threads(threads);
        event_manager.add_subscriber(Arc::new(Mutex::new(control)));
        event_manager.add_subscriber(Arc::new(Mutex::new(daemons.watcher(exit.clone())?)));
        // Setup is over: the teardown thread releases the host resources however the VM
        // ends, and this thread keeps only what its event loop needs.
        let nic_addresses = nics.iter().map(net::Attachment::ip).collect();
        teardown.adopt(nics, daemons);
        crate::seccomp::confine(ThreadKind::EventLoop)?;
        Ok(Vmm {
            kvm, vm, mem, event_manager, exit, serial, transports, disks, vcpus: running, teardown, nic_addresses,
            unconfined, channel, ready, console_plan, console_tail, panicked, raw_terminal,
        })
    }

    /// Runs the event loop until the VM ends or (with `--snapshot-to`) the init is ready.
    pub fn run(&mut self) -> Result<Stop, VmError> {
        loop {
            if let Some(reason) = self.exit.get() {
                return Ok(Stop::Exit(reason));
            }
            if self.ready.as_ref().is_some_and(|r| r.load(Ordering::SeqCst)) {
                return Ok(Stop::Ready);
            }
            self.event_manager.run().map_err(VmError::EventManager)?;
        }
    }

    /// Stops every vCPU outside KVM_RUN (the device handlers run on this thread, so they
    /// are quiet too).
    pub fn pause(&self) -> Result<(), VmError> {
        let handles: Vec<_> = self.vcpus.iter().map(|v| v.pause.clone()).collect();
        PauseHandle::pause_all(&handles, PAUSE_TIMEOUT)?;
        Ok(())
    }

    /// Saves the paused VM to `dir` (atomically), with `config` as its configuration. Under
    /// seccomp it runs on the unfiltered save thread: reading the VM's state, the disks'
    /// metadata and writing files are beyond the event loop's filter.
    pub fn save(&self, dir: &std::path::Path, config: &VmConfig) -> Result<snapshot::format::SaveStats, VmError> {
        let Vmm { kvm, vm, mem, serial, transports, disks, vcpus, nic_addresses, .. } = self;
        self.unconfined.run(|| {
            let config = snapshot::saved::describe(config, nic_addresses)?;
            let caps = Arc::new(KvmCaps::new(kvm, vm)?);
            let vcpus = vcpus.iter().map(|v| v.pause.save(&caps)).collect::<Result<Vec<_>, _>>()?;
            let vm_state = snapshot::capture_vm(vm)?;
            let virtio = transports
                .iter()
                .map(|t| crate::bus::lock(t).save())
                .collect::<Result<Vec<_>, _>>()
                .map_err(VmError::DeviceSnapshot)?;
            let devices = DevicesState { serial: crate::bus::lock(serial).save(), virtio };
            let devices = serde_json::to_value(&devices).map_err(snapshot::SnapshotError::Encode)?;
            let state = SnapshotState::new(vm_state, vcpus, config, devices);
            // A `,snapshot` disk's writes so far live in its private overlay: they go with the
            // VM (DIR/disk-N.data and .map), or the restored guest would find its disk older
            // than its page cache.
            let save_overlays = |tmp: &std::path::Path| {
                for (index, disk) in disks.iter().enumerate() {
                    if let Some(overlay) = disk.overlay() {
                        let (data, map) = crate::devices::layer_files(&tmp.join(layer_name(index)));
                        overlay.save(&data, &map).map_err(|source| snapshot::SnapshotError::Overlay { index, source })?;
                    }
                }
                Ok(())
            };
            Ok(snapshot::save_with(dir, &state, mem, save_overlays)?)
        })
    }

    /// Ends the run: the exit status and message for `reason`, the console post-mortem, the
    /// command's last output, then the ordered teardown (NICs' host side, virtiofsd).
    pub fn finish(self, reason: &ExitReason) -> i32 {
        let Vmm { vm, vcpus, teardown, channel, console_plan, console_tail, panicked, raw_terminal, .. } = self;
        for v in &vcpus {
            v.pause.exit();
        }
        drop(raw_terminal);
        let panicked = panicked.load(Ordering::SeqCst);
        let (status, message) = crate::vm::exit_code(reason, panicked);
        crate::vm::post_mortem(reason, panicked, &console_plan, &console_tail);
        if let Some(channel) = channel {
            channel.finish(reason);
        }
        // On the teardown thread: the NICs' host side (TAPs, networks), then virtiofsd.
        // Deleting a TAP and destroying the VM both wait in the kernel (~20 ms each here):
        // the VM fd closes here meanwhile.
        teardown.finish_while(move || drop(vm));
        if let Some(m) = message {
            eprintln!("microvm: {m}");
        }
        status
    }
}

/// What `assemble` puts together.
struct Parts {
    kvm: Kvm,
    vm: VmFd,
    mem: GuestMemoryMmap,
    event_manager: EventManager<Subscriber>,
    exit: Arc<ExitSignal>,
    serial: Arc<Mutex<SerialDevice>>,
    transports: Vec<Arc<Mutex<MmioTransport>>>,
    disks: Vec<Arc<Disk>>,
    vcpus: Vec<Vcpu>,
    nics: Vec<net::Attachment>,
    daemons: crate::share::Shares,
    teardown: Teardown,
    unconfined: Unconfined,
    channel: Option<crate::channel::Channel>,
    ready: Option<Arc<AtomicBool>>,
    console_plan: ConsolePlan,
    console_tail: Arc<ConsoleTail>,
    panicked: Arc<AtomicBool>,
    deadline: Option<Deadline>,
    signals: std::os::fd::OwnedFd,
    command_channel: bool,
    system_map: Option<std::path::PathBuf>,
    pio: Bus,
    mmio: Bus,
}

/// Puts every transport back in its saved state. Activating a device registers its handler
/// with the event manager from another thread (as a vCPU's DRIVER_OK does), so the restores
/// run on a helper thread while this one serves the event loop.
fn restore_devices(
    event_manager: &mut EventManager<Subscriber>,
    transports: &[Arc<Mutex<MmioTransport>>],
    saved: &[TransportSnapshot],
) -> Result<(), VmError> {
    if saved.len() != transports.len() {
        return Err(VmError::DeviceSnapshot(devices::virtio::snapshot::SnapshotError::Mismatch {
            what: "virtio device count",
            saved: saved.len(),
            configured: transports.len(),
        }));
    }
    std::thread::scope(|s| {
        let worker = s.spawn(|| {
            for (i, (t, snap)) in transports.iter().zip(saved).enumerate() {
                crate::bus::lock(t).restore(snap).map_err(|e| (i, e))?;
            }
            Ok::<(), (usize, devices::virtio::snapshot::SnapshotError)>(())
        });
        while !worker.is_finished() {
            event_manager.run_with_timeout(10).map_err(VmError::EventManager)?;
        }
        match worker.join() {
            Ok(Ok(())) => Ok(()),
            Ok(Err((slot, e))) => {
                tracing::error!(slot, "restoring a virtio device failed");
                Err(VmError::DeviceSnapshot(e))
            }
            Err(_) => Err(VmError::Io { what: "device restore", source: std::io::Error::other("restore thread panicked") }),
        }
    })
}

/// The name (before `.data`/`.map`) of disk `index`'s saved overlay layer in a snapshot.
pub fn layer_name(index: usize) -> String {
    format!("disk-{index}")
}

/// The command line for the init waiting in a restored VM, or in a booted one whose command
/// was too long for the kernel command line (protocol::command_message).
fn command_message(config: &VmConfig, renew: bool) -> Result<Vec<u8>, VmError> {
    let mut words = Vec::new();
    if renew {
        words.push(guestinit::protocol::RENEW.to_string());
    }
    if let Some(term) = guestinit::term_param() {
        words.push(term);
    }
    if !config.command.is_empty() {
        words.push(guestinit::protocol::argv_param(&config.command));
    }
    Ok(guestinit::protocol::command_message(&words))
}
