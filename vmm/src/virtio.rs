//! The one way any virtio device joins the VM: a virtio-mmio window on the MMIO bus, an
//! ioeventfd per queue (QueueNotify with datamatch = queue index), an irqfd for its GSI,
//! and a `virtio_mmio.device=` entry on the kernel command line.

use std::sync::{Arc, Mutex};

use devices::virtio::mmio::{MmioError, MmioTransport};
use devices::virtio::{EventEndpoint, VirtioDevice};
use kvm_ioctls::{IoEventAddress, VmFd};
use thiserror::Error;

use crate::bus::{Bus, BusError};
use crate::config::VmConfig;
use crate::disk::{self, DiskError};
use crate::layout::{MAX_VIRTIO_DEVICES, VIRTIO_GSIS, VIRTIO_MMIO_SIZE, VIRTIO_MMIO_START};
use crate::memory::GuestMemoryMmap;

/// Offset of QueueNotify in the virtio-mmio register window.
const QUEUE_NOTIFY_OFFSET: u64 = 0x50;

#[derive(Debug, Error)]
pub enum VirtioError {
    #[error("no virtio-mmio slot left (at most {MAX_VIRTIO_DEVICES} devices)")]
    NoSlot,
    #[error("cannot create the virtio-mmio transport")]
    Transport(#[source] MmioError),
    #[error("cannot register {what} with KVM")]
    Kvm {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error(transparent)]
    Disk(#[from] DiskError),
    #[error(transparent)]
    Nic(#[from] crate::nics::NicError),
    #[error(transparent)]
    Share(#[from] crate::share::ShareError),
    #[error("cannot create the block device for '{path}'")]
    Block {
        path: std::path::PathBuf,
        #[source]
        source: devices::virtio::block::BlockError,
    },
}

/// Hands out MMIO windows and GSIs, and remembers the command-line entries.
pub struct VirtioSlots<'a> {
    vm: &'a VmFd,
    mem: &'a GuestMemoryMmap,
    endpoint: EventEndpoint,
    attached: Vec<(u64, u32)>,
    /// Every transport, in slot order (a snapshot saves them, a restore refills them).
    transports: Vec<Arc<Mutex<MmioTransport>>>,
}

impl<'a> VirtioSlots<'a> {
    pub fn new(vm: &'a VmFd, mem: &'a GuestMemoryMmap, endpoint: EventEndpoint) -> Self {
        VirtioSlots { vm, mem, endpoint, attached: Vec::new(), transports: Vec::new() }
    }

    pub fn endpoint(&self) -> EventEndpoint {
        self.endpoint.clone()
    }

    /// Attaches any virtio device; devices appear to the guest in attach order.
    pub fn attach(&mut self, bus: &mut Bus, device: Box<dyn VirtioDevice>) -> Result<(), VirtioError> {
        let index = self.attached.len();
        let Some(&gsi) = VIRTIO_GSIS.get(index) else {
            return Err(VirtioError::NoSlot);
        };
        let base = VIRTIO_MMIO_START + index as u64 * VIRTIO_MMIO_SIZE;
        let transport = MmioTransport::new(self.mem.clone(), device).map_err(VirtioError::Transport)?;
        for (queue, evt) in transport.queue_evts().iter().enumerate() {
            self.vm
                .register_ioevent(evt, &IoEventAddress::Mmio(base + QUEUE_NOTIFY_OFFSET), queue as u32)
                .map_err(|source| VirtioError::Kvm { what: "queue ioeventfd", source })?;
        }
        self.vm
            .register_irqfd(transport.irq_evt(), gsi)
            .map_err(|source| VirtioError::Kvm { what: "irqfd", source })?;
        let transport = Arc::new(Mutex::new(transport));
        bus.insert(base, VIRTIO_MMIO_SIZE, transport.clone())?;
        self.attached.push((base, gsi));
        self.transports.push(transport);
        Ok(())
    }

    /// The transports, in slot order.
    pub fn transports(&self) -> Vec<Arc<Mutex<MmioTransport>>> {
        self.transports.clone()
    }

    /// `virtio_mmio.device=4K@0xd0001000:5` for each attached device.
    pub fn cmdline_entries(&self) -> Vec<String> {
        self.attached
            .iter()
            .map(|(base, gsi)| format!("virtio_mmio.device=4K@{base:#x}:{gsi}"))
            .collect()
    }
}

/// Attaches the configured disks (vda, vdb, ... in order), the shares (one virtio-fs device
/// per `(tag, virtiofsd connection)`, in `share::plan` order), NICs (eth0, eth1, ...) and a
/// virtio-rng. Returns the NICs' host attachments: keep them for the VM's life, then hand them
/// to `nics::release_all`, which tears down the TAPs (and networks whose last user this VM was).
pub fn attach_all(
    slots: &mut VirtioSlots,
    bus: &mut Bus,
    config: &VmConfig,
    shares: Vec<(String, std::os::unix::net::UnixStream)>,
    disks: &mut Vec<std::sync::Arc<devices::virtio::block::Disk>>,
) -> Result<Vec<net::Attachment>, VirtioError> {
    let nets = &config.nets;
    for d in &config.disks {
        let opened = disk::open(d)?;
        let (device, disk) = crate::devices::block_device(d, opened, slots.endpoint())
            .map_err(|source| VirtioError::Block { path: d.path.clone(), source })?;
        disks.push(disk);
        slots.attach(bus, device)?;
    }
    for (tag, conn) in shares {
        let device = crate::devices::fs_device(&tag, conn)
            .map_err(|source| crate::share::ShareError::Device { tag: tag.clone(), source })?;
        slots.attach(bus, device)?;
    }
    let mut attachments = Vec::new();
    if !nets.is_empty() {
        // A network left behind by a microvm that was SIGKILLed is repaired or removed here.
        net::cleanup_stale().map_err(crate::nics::NicError::from)?;
    }
    let vm_id = vm_id(config);
    for (i, spec) in nets.iter().enumerate() {
        let want_ip = config.nic_addresses.get(i).copied().flatten();
        let (att, device) = crate::nics::create(spec, &vm_id, i as u32, want_ip, slots.endpoint())?;
        attachments.push(att);
        slots.attach(bus, device)?;
    }
    // Every guest gets an entropy source (after the disks and NICs: their order is unchanged).
    slots.attach(bus, Box::new(devices::virtio::rng::Rng::new(slots.endpoint())))?;
    Ok(attachments)
}

/// What identifies this VM for its default MACs: the first disk's canonical path (so the
/// same VM gets the same MACs, hence the same DHCP leases, across runs), else the pid.
fn vm_id(config: &VmConfig) -> String {
    config
        .disks
        .first()
        .and_then(|d| std::fs::canonicalize(&d.path).ok())
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| format!("pid-{}", std::process::id()))
}
