//! VM configuration: plain structs filled by the CLI (or any other front end), taken along
//! one path before anything is created:
//!
//! 1. **parse**: each `--disk`/`--net`/`--share` spec through the one option grammar of the
//!    `options` crate (`KEY=VALUE` items, sizes, rates), `--memory` through its SIZE grammar;
//! 2. [`VmConfig::validate`]: pure checks of the whole config (bounds, device count, tags),
//!    no host access;
//! 3. [`VmConfig::preflight`]: read-only host checks (the kernel and initrd open and look
//!    bootable, disks exist or can be created without shrinking, share directories exist,
//!    bridges and interfaces exist, privileges, KVM opens).
//!
//! Every failure is a [`ConfigError`], one line, whose [`ConfigError::exit_code`] says
//! what the CLI exits with: 2 for bad usage, 1 for a host failure while checking.

pub mod disk;
pub mod kernel;
pub mod share;

use std::path::PathBuf;

use options::OptionError;
use thiserror::Error;

pub use disk::DiskConfig;
pub use kernel::KernelImage;
pub use share::ShareConfig;

use crate::exit::code;

/// Largest vCPU count: the MP table for 32 vCPUs just fits the 1 KiB below 640 KiB.
pub const MAX_VCPUS: u32 = 32;
/// Smallest useful guest: the kernel, its page tables and an initramfs must fit.
pub const MIN_MEMORY_MIB: u64 = 32;
/// Upper bound on guest memory, to reject typos (e.g. bytes given instead of MiB).
pub const MAX_MEMORY_MIB: u64 = 1 << 20; // 1 TiB
/// The kernel's x86 COMMAND_LINE_SIZE.
pub const CMDLINE_MAX: usize = 2048;

#[derive(Debug, Error)]
pub enum ConfigError {
    /// A malformed `--disk`, `--net` or `--share` (names the spec).
    #[error(transparent)]
    Spec(#[from] OptionError),
    #[error("bad --timeout '{0}': expected a duration like 90s, 10m, 1h or a number of seconds")]
    Timeout(String),
    #[error("--cpus must be between 1 and {MAX_VCPUS}, got {0}")]
    Cpus(u32),
    #[error("--memory must be between {MIN_MEMORY_MIB} and {MAX_MEMORY_MIB} MiB, got {0} MiB")]
    Memory(u64),
    #[error("bad --memory '{0}': expected MiB (e.g. 512) or a whole number of MiB with a unit (e.g. 512M, 2G)")]
    MemorySpec(String),
    #[error("too many devices: {got} for disks, NICs and shares (a host root's take two), at most {max} fit (the virtio-rng takes one of the {} virtio slots, and a command's channel another)", crate::layout::MAX_VIRTIO_DEVICES)]
    TooManyDevices { max: usize, got: usize },
    #[error("--share tag '{0}' is reserved for the shares microvm adds itself")]
    ReservedTag(String),
    #[error("--share {first} and --share {second} both use tag '{tag}' (give one of them tag=...)")]
    DuplicateTag { tag: String, first: String, second: String },
    #[error(transparent)]
    Kernel(#[from] kernel::KernelError),
    #[error(transparent)]
    Disk(#[from] disk::DiskCheckError),
    #[error(transparent)]
    Share(#[from] share::ShareCheckError),
    #[error(transparent)]
    Net(#[from] net::NetError),
    #[error("cannot open /dev/kvm (is KVM available and are you allowed to use it?)")]
    KvmOpen(#[source] kvm_ioctls::Error),
    #[error("{requested} vCPUs requested but this host's KVM allows at most {max}")]
    TooManyVcpus { requested: u32, max: usize },
    #[error("--snapshot-to {0}")]
    SnapshotTo(&'static str),
    /// Input found wrong only while booting (initrd too big, command line too long).
    #[error(transparent)]
    Boot(crate::boot::BootError),
}

impl ConfigError {
    /// The exit class: 2 for everything the user can fix on the command line or host
    /// (missing file, bad spec, no permission), 1 for a host failure while checking.
    pub fn exit_code(&self) -> i32 {
        match self {
            ConfigError::Net(e) if !e.is_bad_input() => code::VM_FAILURE,
            _ => code::USAGE,
        }
    }
}

/// Everything needed to build and run one VM.
#[derive(Clone, Debug)]
pub struct VmConfig {
    /// A kernel image, or a kernel build tree (see [`kernel::locate`]).
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    /// Extra kernel command line from the user, appended after microvm's own.
    pub cmdline: Option<String>,
    pub cpus: u32,
    pub memory_mib: u64,
    pub disks: Vec<DiskConfig>,
    /// NICs (`--net none` is dropped while parsing).
    pub nets: Vec<net::NetSpec>,
    pub shares: Vec<ShareConfig>,
    /// Apply the host-specific guest command-line quirks when detected.
    pub quirks: bool,
    /// Command to run in the guest (by microvm's own init, see guestinit.rs).
    pub command: Vec<String>,
    /// Confine each thread with its seccomp filter (see `seccomp`); off only for debugging.
    pub seccomp: bool,
    /// Also write the guest console to this file (see console.rs for where it goes).
    pub console_log: Option<PathBuf>,
    /// `-v`: with a command, show the guest console on stderr.
    pub verbose: bool,
    /// Stop the VM (exit 124) after this long.
    pub timeout: Option<std::time::Duration>,
    /// `--snapshot-to DIR`: boot, and when the init is ready for a command, save the VM to
    /// DIR and exit 0 (see snapshot/vmm.rs).
    pub snapshot_to: Option<PathBuf>,
    /// Built from a snapshot (`--restore`): microvm's init is already waiting in the guest.
    pub from_snapshot: bool,
    /// A restore's: each NIC's address when the snapshot was taken, in `--net` order (empty
    /// for a boot). Each NIC asks its network for it again (`net::attach_wanting`).
    pub nic_addresses: Vec<Option<std::net::Ipv4Addr>>,
    /// The `--disk` and `--net` specs as given, which a snapshot keeps so that a restore
    /// reads them again with the same parser.
    pub specs: Specs,
}

/// See [`VmConfig::specs`].
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Specs {
    pub disks: Vec<String>,
    pub nets: Vec<String>,
}

impl Default for VmConfig {
    fn default() -> Self {
        VmConfig {
            kernel: PathBuf::new(),
            initrd: None,
            cmdline: None,
            cpus: 1,
            memory_mib: 128,
            disks: Vec::new(),
            nets: Vec::new(),
            shares: Vec::new(),
            quirks: true,
            command: Vec::new(),
            seccomp: true,
            console_log: None,
            verbose: false,
            timeout: None,
            snapshot_to: None,
            from_snapshot: false,
            nic_addresses: Vec::new(),
            specs: Specs::default(),
        }
    }
}

/// What preflight found on the host: the kernel image to load and its symbols.
#[derive(Clone, Debug)]
pub struct Preflight {
    pub kernel: KernelImage,
}

impl VmConfig {
    /// Checks everything that can be checked without touching the host.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.cpus == 0 || self.cpus > MAX_VCPUS {
            return Err(ConfigError::Cpus(self.cpus));
        }
        if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&self.memory_mib) {
            return Err(ConfigError::Memory(self.memory_mib));
        }
        let devices = self.disks.len() + self.nets.len() + crate::share::count(self);
        // One slot is taken by the virtio-rng every guest gets, one by the command channel
        // when there is one.
        let max = crate::layout::MAX_VIRTIO_DEVICES - 1 - usize::from(crate::channel::wanted(self));
        if devices > max {
            return Err(ConfigError::TooManyDevices { max, got: devices });
        }
        for d in &self.disks {
            d.validate()?;
        }
        if self.snapshot_to.is_some() {
            self.validate_snapshot_to()?;
        }
        let tags = self.share_tags();
        for (i, s) in self.shares.iter().enumerate() {
            s.validate()?;
            if crate::share::RESERVED_TAGS.contains(&tags[i].as_str()) {
                return Err(ConfigError::ReservedTag(tags[i].clone()));
            }
            if let Some(first) = tags[..i].iter().position(|t| *t == tags[i]) {
                return Err(ConfigError::DuplicateTag {
                    tag: tags[i].clone(),
                    first: self.shares[first].host.display().to_string(),
                    second: s.host.display().to_string(),
                });
            }
        }
        Ok(())
    }

    /// What a snapshot can hold: a disk root booted by microvm's own init, no state in
    /// another process (virtiofsd), the command given to the restore instead.
    fn validate_snapshot_to(&self) -> Result<(), ConfigError> {
        let refuse = |why| Err(ConfigError::SnapshotTo(why));
        if self.disks.is_empty() {
            return refuse("needs a --disk root: the host root is shared over virtio-fs, whose state a snapshot cannot hold");
        }
        if !self.shares.is_empty() {
            return refuse("cannot be used with --share: virtiofsd holds the guest's open files, which a snapshot cannot hold");
        }
        if self.initrd.is_some() {
            return refuse("cannot be used with --initrd: microvm's own init must say when the guest is ready");
        }
        if !self.command.is_empty() {
            return refuse("takes no command: give it to each --restore (microvm --restore DIR -- CMD)");
        }
        Ok(())
    }

    /// Read-only host checks, after [`validate`](Self::validate): nothing is created or
    /// changed. Returns what it found (the kernel image to load).
    pub fn preflight(&self) -> Result<Preflight, ConfigError> {
        self.validate()?;
        let kernel = kernel::locate(&self.kernel)?;
        if let Some(initrd) = &self.initrd {
            kernel::check_initrd(initrd)?;
        }
        for d in &self.disks {
            d.preflight()?;
        }
        for s in &self.shares {
            s.preflight()?;
        }
        for n in &self.nets {
            n.preflight()?;
        }
        let kvm = kvm_ioctls::Kvm::new().map_err(ConfigError::KvmOpen)?;
        let max = kvm.get_max_vcpus();
        if self.cpus as usize > max {
            return Err(ConfigError::TooManyVcpus { requested: self.cpus, max });
        }
        Ok(Preflight { kernel })
    }

    /// Each share's virtio-fs tag, in order: `tag=` or the default `share0`, `share1`, ...
    pub fn share_tags(&self) -> Vec<String> {
        self.shares.iter().enumerate().map(|(i, s)| s.tag_or_default(i)).collect()
    }
}

/// `--memory`: a plain number is MiB; with a unit it is a SIZE (`512M`, `2G`), which must
/// be a whole number of MiB.
pub fn parse_memory(s: &str) -> Result<u64, ConfigError> {
    let bad = || ConfigError::MemorySpec(s.to_string());
    let t = s.trim();
    if !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()) {
        return t.parse().map_err(|_| bad());
    }
    match options::parse_size(t) {
        Some(bytes) if bytes % (1 << 20) == 0 => Ok(bytes >> 20),
        _ => Err(bad()),
    }
}

#[cfg(test)]
mod tests;
