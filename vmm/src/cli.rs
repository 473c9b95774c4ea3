//! Command-line interface. Fills the same `VmConfig` any other front end would.

use std::path::PathBuf;

use clap::Parser;

use crate::config::{self, ConfigError, VmConfig};

const AFTER_HELP: &str = "\
Examples:
  microvm --kernel vmlinux --disk rootfs.ext4
      boot with rootfs.ext4 as /dev/vda (root=/dev/vda rw is added) and get a shell
  microvm --kernel vmlinux --disk rootfs.ext4 --net nat
      same, with a NIC on a NAT network (bridge mvbr-default, DHCP, masquerade)
  microvm --kernel vmlinux --disk rootfs.ext4 -- sh -c 'uname -a; exit 7'
      run one command in the guest; microvm exits with its status (7)
  microvm --kernel vmlinux --disk rootfs.ext4 --share ~/src,tag=src --share /data,at=/mnt/data,ro
      two host directories over virtio-fs, each served by a virtiofsd microvm starts and
      stops (by hand in a guest: mount -t virtiofs src /some/dir)
  microvm --kernel bzImage --initrd initramfs.cpio --cpus 2 --memory 1G --cmdline 'quiet'
  microvm --kernel ~/src/linux --disk rootfs.ext4
      boot the kernel just built in that tree; register dumps name its functions
  microvm --kconfig > microvm.config
      what a guest kernel needs; in the kernel tree: scripts/kconfig/merge_config.sh -m
      .config microvm.config && make olddefconfig

Option values: SIZE is binary (4G = 4 GiB; K, M, G, T). RATE is per second: bytes (10M =
10,000,000; 5MB, 5MiB) or bits (50Mbit, 800kbit). COUNT is per second (1000, 10K).

Exit status: the guest command's status (exit device, see README); 0 when the guest
powers off or reboots; 101 when the guest kernel panicked; 1 when the VM failed (e.g. a
vCPU hit an instruction KVM could not run); 124 when --timeout expired; 2 for bad usage,
nothing started; 128+N on signal N; 159 when a microvm thread made a system call its
seccomp filter forbids (reported). After a panic, a failure or a timeout, the console's
last lines are repeated on stderr unless they are already there.
Console: the guest's ttyS0 is microvm's stdin/stdout. In a terminal, Ctrl-A x quits.
A guest that seems hung: `kill -USR1 <microvm pid>` prints every vCPU's registers (RIP
named from the kernel's System.map when one is in the --kernel tree or beside the image).
Logs: MICROVM_LOG=info (or debug, trace) on stderr.";

#[derive(Debug, Parser)]
#[command(name = "microvm", version, about = "A small KVM virtual machine monitor with networking built in.", after_help = AFTER_HELP)]
pub struct Cli {
    /// Guest kernel: an uncompressed ELF vmlinux, a bzImage, or a kernel build tree (its
    /// vmlinux, else arch/x86/boot/bzImage). A System.map in the tree or beside the image
    /// names functions in register dumps. Example: --kernel target/guest/vmlinux  or  --kernel ~/src/linux
    #[arg(long, value_name = "PATH|DIR", required_unless_present_any = ["kconfig", "restore"])]
    pub kernel: Option<PathBuf>,

    /// Initial ramdisk loaded for the kernel (an uncompressed cpio boots fastest).
    /// Example: --initrd initramfs.cpio
    #[arg(long, value_name = "PATH")]
    pub initrd: Option<PathBuf>,

    /// Extra kernel command line, appended after microvm's own (console=ttyS0 reboot=k
    /// panic=-1, root=/dev/vda when a disk is given, the virtio devices, host quirks).
    /// Example: --cmdline 'quiet loglevel=4'
    #[arg(long, value_name = "STR")]
    pub cmdline: Option<String>,

    /// Number of vCPUs, each a host thread named vcpu-N. Example: --cpus 2
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub cpus: u32,

    /// Guest RAM: MiB, or a SIZE with a unit. Example: --memory 256  or  --memory 2G
    #[arg(long, value_name = "MIB|SIZE", default_value = "128")]
    pub memory: String,

    /// A virtio-blk disk backed by a host file; repeat for vdb, vdc, ... Options:
    /// size=SIZE creates the file sparse (or grows it; never shrinks), readonly (or ro),
    /// snapshot (the guest writes to a private overlay thrown away at exit, so the image never
    /// changes and many VMs can share it; with size= only the overlay grows), bw=RATE and
    /// iops=COUNT limits. Example: --disk data.img,size=4G --disk seed.img,ro,bw=50M
    /// --disk rootfs.ext4,snapshot
    #[arg(long, value_name = "PATH[,size=SIZE][,readonly][,snapshot][,bw=RATE][,iops=COUNT]")]
    pub disk: Vec<String>,

    /// A host directory for the guest over virtio-fs; repeat for more. Mounted at the same
    /// path unless at=GUESTPATH; tag=T names it for `mount -t virtiofs T DIR` (default share0,
    /// share1, ...; at most 36 of A-Z a-z 0-9 . _ -); ro makes it read-only. Each share runs a
    /// virtiofsd (`cargo install virtiofsd`, or $MICROVM_VIRTIOFSD). With neither --disk nor
    /// --initrd the host's / (read-only) and the current directory are shared too.
    /// Example: --share ~/linux,tag=src --share /srv/data,at=/data,ro
    #[arg(long, value_name = "HOSTDIR[,at=GUESTPATH][,tag=T][,ro]")]
    pub share: Vec<String>,

    /// A virtio-net NIC; repeat for more. Modes: nat[:NAME], host-only[:NAME], bridge=BR,
    /// tap=NAME, none. Options: mac=XX:XX:XX:XX:XX:XX, subnet=A.B.C.0/24, uplink=IFACE,
    /// rate=RATE (50Mbit, 5MB) and pps=COUNT per direction. bridge=BR,vlan=N (1-4094): the
    /// NIC is an untagged port of VLAN N (BR needs vlan_filtering). A named network spans
    /// hosts over VXLAN with vxlan=VNI,peers=IP+IP[,dev=IFACE][,mtu=N] (needs subnet=), or by
    /// a file $MICROVM_NETWORKS_DIR/NAME.toml (default /etc/microvm/networks) every host shares.
    /// Example: --net nat  or  --net host-only:lab,rate=100Mbit  or
    /// --net host-only:lab,subnet=10.77.0.0/24,vxlan=4242,peers=192.0.2.11+192.0.2.12
    #[arg(long, value_name = "SPEC")]
    pub net: Vec<String>,

    /// Print the kernel config fragment a guest kernel needs for everything microvm offers,
    /// one reason per option, and exit. Example: microvm --kconfig > microvm.config
    #[arg(long)]
    pub kconfig: bool,

    /// Do not add the guest kernel parameters this host needs (on nested PVM KVM:
    /// clearcpuid=... lapic=notscdeadline). Example: --no-quirks
    #[arg(long)]
    pub no_quirks: bool,

    /// Run without seccomp filters (for debugging with strace or gdb, or when a host's libc
    /// makes a system call microvm's filters do not list). Example: --no-seccomp
    #[arg(long)]
    pub no_seccomp: bool,

    /// Also write the guest console (ttyS0: kernel log, and the command's output until it
    /// gets its own channel) to FILE; with a command, it is then not on stdout.
    /// Example: --console-log boot.log
    #[arg(long, value_name = "FILE")]
    pub console_log: Option<PathBuf>,

    /// With a command: show the guest console on stderr instead of stdout.
    #[arg(short, long)]
    pub verbose: bool,

    /// Stop the VM after DURATION (90s, 10m, 1h; a plain number is seconds): print every
    /// vCPU's registers and the console's last lines, tear down, exit 124.
    /// Example: --timeout 10m
    #[arg(long, value_name = "DURATION")]
    pub timeout: Option<String>,

    /// Boot, and as soon as the guest's init is ready for a command, save the whole VM to
    /// DIR (memory, vCPUs, devices, configuration; written atomically) and exit 0. Needs a
    /// --disk root; restore it with --restore. Example: --snapshot-to /tmp/booted
    #[arg(long, value_name = "DIR")]
    pub snapshot_to: Option<PathBuf>,

    /// Start from a snapshot taken with --snapshot-to instead of booting: guest memory is
    /// mapped copy-on-write from DIR, the command goes to the waiting init, microvm exits
    /// with its status. The VM's shape (CPUs, memory, disks, NICs) is the snapshot's; its
    /// writable disks get a private overlay (as ,snapshot): the images never change.
    /// Example: microvm --restore /tmp/booted -- make -C /src test
    #[arg(long, value_name = "DIR", conflicts_with_all = ["kernel", "initrd", "cmdline", "disk", "net", "share", "snapshot_to", "no_quirks", "cpus", "memory", "kconfig"])]
    pub restore: Option<PathBuf>,

    /// Command to run in the guest instead of a shell, under microvm's own init (on any
    /// --disk root, or the host's files without one). Example: -- sh -c 'exit 7'
    #[arg(last = true, value_name = "COMMAND")]
    pub command: Vec<String>,
}

impl Cli {
    /// Parses every spec; the result still needs [`VmConfig::preflight`].
    pub fn into_config(self) -> Result<VmConfig, ConfigError> {
        let nets = self
            .net
            .iter()
            .map(|n| n.parse::<net::NetSpec>())
            .filter(|n| !matches!(n, Ok(s) if s.is_none()))
            .collect::<Result<_, _>>()?;
        Ok(VmConfig {
            kernel: self.kernel.unwrap_or_default(),
            initrd: self.initrd,
            cmdline: self.cmdline,
            cpus: self.cpus,
            memory_mib: config::parse_memory(&self.memory)?,
            disks: self.disk.iter().map(|d| d.parse()).collect::<Result<_, _>>()?,
            nets,
            shares: self.share.iter().map(|s| s.parse()).collect::<Result<_, _>>()?,
            quirks: !self.no_quirks,
            command: self.command,
            seccomp: !self.no_seccomp,
            console_log: self.console_log,
            verbose: self.verbose,
            timeout: self
                .timeout
                .map(|t| crate::timeout::parse_duration(&t).ok_or(crate::config::ConfigError::Timeout(t)))
                .transpose()?,
            snapshot_to: self.snapshot_to,
            from_snapshot: false,
            nic_addresses: Vec::new(),
            specs: config::Specs { disks: self.disk, nets: self.net },
        })
    }
}
