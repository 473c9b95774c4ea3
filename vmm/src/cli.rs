//! Command-line interface. Fills the same `VmConfig` any other front end would.

use std::path::PathBuf;

use clap::Parser;

use crate::config::{DiskConfig, VmConfig};

const AFTER_HELP: &str = "\
Examples:
  microvm --kernel vmlinux --disk rootfs.ext4
      boot with rootfs.ext4 as /dev/vda (root=/dev/vda rw is added) and get a shell
  microvm --kernel vmlinux --disk rootfs.ext4 --net nat
      same, with a NIC on a NAT network (bridge mvbr-default, DHCP, masquerade)
  microvm --kernel vmlinux --disk rootfs.ext4 -- sh -c 'uname -a; exit 7'
      run one command in the guest; microvm exits with its status (7)
  microvm --kernel bzImage --initrd initramfs.cpio --cpus 2 --memory 512 --cmdline 'quiet'

Exit status: the guest command's status (exit device, see README); 0 when the guest
reboots; 101 when the guest kernel panicked; 1 when the VM failed (e.g. a vCPU hit an
instruction KVM could not run); 2 for bad usage, nothing started; 128+N on signal N;
159 when a microvm thread made a system call its seccomp filter forbids (reported).
Console: the guest's ttyS0 is microvm's stdin/stdout. In a terminal, Ctrl-A x quits.
A guest that seems hung: `kill -USR1 <microvm pid>` prints every vCPU's registers.
Logs: MICROVM_LOG=info (or debug, trace) on stderr.";

#[derive(Debug, Parser)]
#[command(name = "microvm", version, about = "A small KVM virtual machine monitor with networking built in.", after_help = AFTER_HELP)]
pub struct Cli {
    /// Guest kernel: an uncompressed ELF vmlinux or a bzImage. Example: --kernel target/guest/vmlinux
    #[arg(long, value_name = "PATH")]
    pub kernel: PathBuf,

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

    /// Guest RAM in MiB. Example: --memory 256
    #[arg(long, value_name = "MIB", default_value_t = 128)]
    pub memory: u64,

    /// A virtio-blk disk backed by a host file; repeat for vdb, vdc, ... Options:
    /// size=SIZE creates the file sparse (or grows it; never shrinks), readonly,
    /// bw=BYTES/s and iops=N rate limits. Example: --disk data.img,size=4G --disk seed.img,readonly
    #[arg(long, value_name = "PATH[,size=SIZE][,readonly][,bw=RATE][,iops=N]")]
    pub disk: Vec<String>,

    /// A virtio-net NIC; repeat for more. Modes: nat[:NAME], host-only[:NAME], bridge=BR,
    /// tap=NAME, none. Options: mac=XX:XX:XX:XX:XX:XX, subnet=A.B.C.0/24, uplink=IFACE,
    /// rate=50Mbit (bits/s) or rate=5MB (bytes/s) per direction, pps=N.
    /// Example: --net nat  or  --net host-only:lab,rate=100Mbit
    #[arg(long, value_name = "SPEC")]
    pub net: Vec<String>,

    /// Do not add the guest kernel parameters this host needs (on nested PVM KVM:
    /// clearcpuid=... lapic=notscdeadline). Example: --no-quirks
    #[arg(long)]
    pub no_quirks: bool,

    /// Run without seccomp filters (for debugging with strace or gdb, or when a host's libc
    /// makes a system call microvm's filters do not list). Example: --no-seccomp
    #[arg(long)]
    pub no_seccomp: bool,

    /// Command to run in the guest instead of a shell (the guest init must support
    /// microvm.cmd=, as resources/guest/init does). Example: -- sh -c 'exit 7'
    #[arg(last = true, value_name = "COMMAND")]
    pub command: Vec<String>,
}

impl Cli {
    pub fn into_config(self) -> Result<VmConfig, crate::config::ConfigError> {
        let disks = self
            .disk
            .iter()
            .map(|d| d.parse::<DiskConfig>())
            .collect::<Result<Vec<_>, _>>()?;
        Ok(VmConfig {
            kernel: self.kernel,
            initrd: self.initrd,
            cmdline: self.cmdline,
            cpus: self.cpus,
            memory_mib: self.memory,
            disks,
            nets: self.net.into_iter().filter(|n| n != "none").collect(),
            quirks: !self.no_quirks,
            command: self.command,
            seccomp: !self.no_seccomp,
        })
    }
}
