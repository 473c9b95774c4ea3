//! `microvm --kconfig`: the kernel options a guest kernel needs for everything microvm
//! offers, one reason each (as `vng --kconfig` does). Merge it into a kernel's .config
//! (`scripts/kconfig/merge_config.sh .config <(microvm --kconfig)`, then `make olddefconfig`).
//! resources/guest/kernel.config (the test guest's) is checked against this list by a test,
//! so the two never drift.

/// (option line as it appears in a .config, why microvm needs it).
pub const REQUIRED: &[(&str, &str)] = &[
    // Boot and platform.
    ("CONFIG_64BIT=y", "microvm boots 64-bit kernels only (64-bit entry, identity-mapped page tables)"),
    ("CONFIG_PVH=y", "an ELF vmlinux carries the PVH entry note microvm's ELF boot path expects"),
    ("CONFIG_HYPERVISOR_GUEST=y", "needed for the KVM guest support below"),
    ("CONFIG_PARAVIRT=y", "paravirtualized clock and spinlocks: far fewer exits"),
    ("CONFIG_KVM_GUEST=y", "kvm-clock and the KVM paravirt features"),
    ("CONFIG_SMP=y", "--cpus N starts N vCPUs"),
    ("CONFIG_X86_MPPARSE=y", "microvm describes the vCPUs and IOAPIC in an MP table (there is no ACPI)"),
    ("CONFIG_BLK_DEV_INITRD=y", "--initrd, and microvm's own init arrives as an initramfs"),
    ("CONFIG_BINFMT_ELF=y", "to run the init and the guest command"),
    ("CONFIG_BINFMT_SCRIPT=y", "guest commands may be #! scripts"),
    ("CONFIG_POSIX_TIMERS=y", "ordinary programs (sleep, timeouts) need POSIX timers"),
    ("CONFIG_FUTEX=y", "threaded programs need futexes"),
    ("CONFIG_EPOLL=y", "ordinary programs need epoll"),
    ("CONFIG_MULTIUSER=y", "setuid/setgid and file ownership"),
    ("CONFIG_INOTIFY_USER=y", "ordinary programs of a host root (udevd, tail -f, file watchers) need inotify"),
    // Console and exit status.
    ("CONFIG_TTY=y", "the console"),
    ("CONFIG_SERIAL_8250=y", "the console is an 8250 UART at 0x3f8 (ttyS0)"),
    ("CONFIG_SERIAL_8250_CONSOLE=y", "console=ttyS0 on the kernel command line"),
    ("CONFIG_DEVMEM=y", "the guest writes its exit status to microvm's exit device through /dev/mem"),
    // virtio-mmio devices.
    ("CONFIG_VIRTIO=y", "every microvm device is virtio"),
    ("CONFIG_VIRTIO_MENU=y", "makes the virtio drivers selectable"),
    ("CONFIG_VIRTIO_MMIO=y", "microvm's virtio transport is virtio-mmio (no PCI)"),
    ("CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES=y", "microvm lists its devices as virtio_mmio.device= parameters"),
    ("CONFIG_BLOCK=y", "--disk"),
    ("CONFIG_BLK_DEV=y", "--disk"),
    ("CONFIG_VIRTIO_BLK=y", "--disk is a virtio-blk device (/dev/vda, /dev/vdb, ...)"),
    ("CONFIG_NETDEVICES=y", "--net"),
    ("CONFIG_NET_CORE=y", "--net"),
    ("CONFIG_VIRTIO_NET=y", "--net is a virtio-net device (eth0, eth1, ...)"),
    ("CONFIG_FUSE_FS=y", "virtio-fs is FUSE over virtio"),
    ("CONFIG_VIRTIO_FS=y", "--share and the host's / as root are virtio-fs"),
    ("CONFIG_VIRTIO_CONSOLE=y", "the command channel between microvm and its init"),
    ("CONFIG_HW_RANDOM=y", "needed for the virtio-rng driver"),
    ("CONFIG_HW_RANDOM_VIRTIO=y", "entropy from the host (virtio-rng), so boot never waits for it"),
    // Networking for --net.
    ("CONFIG_NET=y", "--net"),
    ("CONFIG_INET=y", "--net networks are IPv4"),
    ("CONFIG_PACKET=y", "DHCP clients use AF_PACKET"),
    ("CONFIG_UNIX=y", "ordinary programs need Unix sockets"),
    // Filesystems.
    ("CONFIG_DEVTMPFS=y", "/dev is a devtmpfs (no udev in the guest)"),
    ("CONFIG_DEVTMPFS_MOUNT=y", "the kernel mounts /dev before init runs"),
    ("CONFIG_PROC_FS=y", "/proc"),
    ("CONFIG_SYSFS=y", "/sys"),
    ("CONFIG_TMPFS=y", "/tmp, /run and the writable places of a read-only host root"),
    ("CONFIG_SHMEM=y", "tmpfs is backed by shmem"),
    ("CONFIG_EXT4_FS=y", "--disk root images are usually ext4"),
];

/// The fragment `microvm --kconfig` prints: a header, then `# reason` and the option line.
pub fn fragment() -> String {
    let mut out = String::from(
        "# Kernel options for a microvm guest (microvm --kconfig).\n\
         # Merge into a kernel's .config: scripts/kconfig/merge_config.sh .config this-file;\n\
         # then make olddefconfig.\n",
    );
    for (option, reason) in REQUIRED {
        out.push_str(&format!("# {reason}\n{option}\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_test_guest_config_has_every_required_option() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../resources/guest/kernel.config");
        let guest = std::fs::read_to_string(path).unwrap();
        let lines: Vec<&str> = guest.lines().map(str::trim).collect();
        let missing: Vec<&str> = REQUIRED.iter().map(|(o, _)| *o).filter(|o| !lines.contains(o)).collect();
        assert!(missing.is_empty(), "resources/guest/kernel.config lacks {missing:?}");
        // Nor does it turn any of them off.
        for (option, _) in REQUIRED {
            let name = option.split('=').next().unwrap();
            assert!(!lines.contains(&format!("# {name} is not set").as_str()), "{name} is turned off");
        }
    }

    #[test]
    fn fragment_is_a_config_with_one_reason_per_option() {
        let f = fragment();
        let options: Vec<&str> = f.lines().filter(|l| !l.starts_with('#')).collect();
        assert_eq!(options.len(), REQUIRED.len());
        for (i, (option, reason)) in REQUIRED.iter().enumerate() {
            assert!(option.starts_with("CONFIG_") && option.ends_with("=y"), "{option}");
            assert!(!reason.is_empty() && !reason.contains('\n'), "{option}");
            assert!(!REQUIRED[..i].iter().any(|(o, _)| o == option), "{option} listed twice");
        }
        assert!(f.contains("# --disk is a virtio-blk device (/dev/vda, /dev/vdb, ...)\nCONFIG_VIRTIO_BLK=y\n"));
    }
}
