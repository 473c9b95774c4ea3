//! The filesystems: the initramfs's own /proc, /sys, /dev; the root at /newroot with what a
//! running system needs on it; the shares; then the switch into it (MS_MOVE + chroot, as
//! busybox switch_root does: the initramfs is the rootfs, which pivot_root cannot leave).

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::protocol::{Params, VIRTIOFS};
use crate::sys::{self, Fail, Result};

const NEWROOT: &str = "/newroot";

/// The kernel API filesystems, mounted in the initramfs first and moved into the root.
const API_FS: [(&str, &str); 3] = [("proc", "/proc"), ("sysfs", "/sys"), ("devtmpfs", "/dev")];

/// tmpfs mounted on every root (a running system writes there; /run also carries the
/// resolv.conf of a read-only root).
const TMPFS_ALWAYS: [(&str, u32); 2] = [("/run", 0o755), ("/tmp", 0o1777)];
/// tmpfs mounted on a read-only root where ordinary commands write, when the directory
/// exists there (a read-only root cannot get new mountpoints).
const TMPFS_READ_ONLY_ROOT: [(&str, u32); 4] = [("/var/tmp", 0o1777), ("/var/log", 0o755), ("/var/cache", 0o755), ("/root", 0o700)];

/// /proc, /sys, /dev (devtmpfs) in the initramfs.
pub fn early() -> Result<()> {
    for (fstype, dir) in API_FS {
        let dir = Path::new(dir);
        sys::mkdir_p(dir).map_err(|e| Fail::io(format_args!("cannot create {}", dir.display()), e))?;
        sys::mount(fstype, dir, fstype, nodev_flags(fstype), "")
            .map_err(|e| Fail::io(format_args!("cannot mount {fstype} on {}", dir.display()), e))?;
    }
    Ok(())
}

fn nodev_flags(fstype: &str) -> libc::c_ulong {
    match fstype {
        "devtmpfs" => libc::MS_NOSUID,
        _ => libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
    }
}

/// What was mounted: whether the root is writable.
pub struct Root {
    pub writable: bool,
}

/// Mounts the root at /newroot, then /proc, /sys, /dev, the tmpfs and the shares inside it.
pub fn mount_root(p: &Params) -> Result<Root> {
    let newroot = Path::new(NEWROOT);
    sys::mkdir_p(newroot).map_err(|e| Fail::io("cannot create /newroot", e))?;
    let flags = if p.read_write { 0 } else { libc::MS_RDONLY };
    let data = p.rootflags.as_deref().unwrap_or("");
    let Some(root) = p.root.as_deref() else {
        return Err(Fail::new("no root= on the kernel command line"));
    };
    match p.rootfstype.as_deref() {
        Some(VIRTIOFS) => sys::mount(root, newroot, VIRTIOFS, flags, data).map_err(|e| {
            Fail::io(format_args!("cannot mount the virtio-fs root (tag '{root}'; does the kernel have CONFIG_VIRTIO_FS?)"), e)
        })?,
        Some(types) => mount_block(root, types.split(',').map(str::to_string).collect(), flags, data)?,
        None => mount_block(root, block_filesystems(), flags, data)?,
    }
    let root = Root { writable: p.read_write };
    for (_, dir) in API_FS {
        let target = inside(dir.as_bytes());
        mountpoint(&target, &root, dir)?;
        sys::move_mount(Path::new(dir), &target).map_err(|e| Fail::io(format_args!("cannot move {dir} into the root"), e))?;
    }
    let dev = |name: &str| inside(format!("/dev/{name}").as_bytes());
    // Inside devtmpfs, so always possible; best effort (a kernel may lack devpts).
    for (fstype, dir, data) in [("devpts", "pts", "mode=620,ptmxmode=666"), ("tmpfs", "shm", "mode=1777")] {
        if let Err(e) = sys::mkdir_p(&dev(dir)).and_then(|_| sys::mount(fstype, &dev(dir), fstype, libc::MS_NOSUID | libc::MS_NOEXEC, data)) {
            sys::say(format_args!("cannot mount /dev/{dir}: {e}"));
        }
    }
    for (dir, mode) in TMPFS_ALWAYS {
        let target = inside(dir.as_bytes());
        mountpoint(&target, &root, dir)?;
        tmpfs(&target, dir, mode)?;
    }
    if !root.writable {
        for (dir, mode) in TMPFS_READ_ONLY_ROOT {
            let target = inside(dir.as_bytes());
            if target.is_dir() {
                tmpfs(&target, dir, mode)?;
            }
        }
    }
    // Parents before children: a share at /a/b goes onto the share at /a.
    let mut shares: Vec<_> = p.shares.iter().collect();
    shares.sort_by_key(|s| s.path.split(|b| *b == b'/').filter(|c| !c.is_empty()).count());
    for s in shares {
        let target = inside(&s.path);
        let shown = String::from_utf8_lossy(&s.path);
        if !target.is_dir() {
            sys::mkdir_p(&target).map_err(|e| match e.raw_os_error() {
                Some(libc::EROFS) => Fail::new(format!(
                    "cannot mount share '{}' at {shown}: it does not exist and the root is read-only (mount it at an existing directory, or under /tmp)",
                    s.tag
                )),
                _ => Fail::io(format_args!("cannot create {shown} for share '{}'", s.tag), e),
            })?;
        }
        let flags = if s.read_only { libc::MS_RDONLY } else { 0 };
        sys::mount(&s.tag, &target, VIRTIOFS, flags, "")
            .map_err(|e| Fail::io(format_args!("cannot mount share '{}' at {shown}", s.tag), e))?;
    }
    Ok(root)
}

/// Makes /newroot the root: frees the initramfs's copy of the init, moves the mount onto
/// `/` and chroots into it.
pub fn switch_root() -> Result<()> {
    // The running binary stays mapped; its pages in the rootfs are freed on exit.
    let _ = std::fs::remove_file("/init");
    let newroot = Path::new(NEWROOT);
    std::env::set_current_dir(newroot).map_err(|e| Fail::io("cannot enter /newroot", e))?;
    sys::move_mount(Path::new("."), Path::new("/")).map_err(|e| Fail::io("cannot move the root onto /", e))?;
    sys::chroot(Path::new(".")).map_err(|e| Fail::io("cannot chroot into the root", e))?;
    std::env::set_current_dir("/").map_err(|e| Fail::io("cannot enter the new root", e))
}

/// `guest_path` under /newroot.
fn inside(guest_path: &[u8]) -> PathBuf {
    use std::os::unix::ffi::OsStrExt;
    let rel = std::ffi::OsStr::from_bytes(guest_path).to_os_string();
    Path::new(NEWROOT).join(Path::new(&rel).strip_prefix("/").unwrap_or(Path::new(&rel)))
}

/// Makes sure `target` exists: created on a writable root, an error on a read-only one.
fn mountpoint(target: &Path, root: &Root, shown: &str) -> Result<()> {
    if target.is_dir() {
        return Ok(());
    }
    if !root.writable {
        return Err(Fail::new(format!("the read-only root has no {shown} to mount on")));
    }
    sys::mkdir_p(target).map_err(|e| Fail::io(format_args!("cannot create {shown} on the root"), e))
}

fn tmpfs(target: &Path, shown: &str, mode: u32) -> Result<()> {
    sys::mount("tmpfs", target, "tmpfs", libc::MS_NOSUID | libc::MS_NODEV, &format!("mode={mode:o}"))
        .map_err(|e| Fail::io(format_args!("cannot mount a tmpfs on {shown}"), e))?;
    // Best effort: the mode= option already set it.
    let _ = std::fs::set_permissions(target, std::fs::Permissions::from_mode(mode));
    Ok(())
}

/// Tries each filesystem type in turn, as the kernel does for `root=` without
/// `rootfstype=`; EINVAL/ENODEV/ENOTBLK-like answers mean "not this type".
fn mount_block(dev: &str, types: Vec<String>, flags: libc::c_ulong, data: &str) -> Result<()> {
    if !Path::new(dev).exists() {
        return Err(Fail::new(format!("root device {dev} does not exist (is the disk attached and the driver built in?)")));
    }
    let mut last: Option<io::Error> = None;
    for t in &types {
        match sys::mount(dev, Path::new(NEWROOT), t, flags, data) {
            Ok(()) => return Ok(()),
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENODEV)) => last = Some(e),
            Err(e) => return Err(Fail::io(format_args!("cannot mount {dev} ({t})"), e)),
        }
    }
    Err(Fail::new(format!(
        "cannot mount {dev}: not one of the filesystems tried ({}){}",
        types.join(", "),
        last.map(|e| format!(": {e}")).unwrap_or_default()
    )))
}

/// The block-device filesystems this kernel knows (lines of /proc/filesystems without
/// "nodev"), ext4 first: the ext4 driver also registers ext3 and ext2, listed before it,
/// and each refusal costs a console line.
fn block_filesystems() -> Vec<String> {
    let mut types: Vec<String> = std::fs::read_to_string("/proc/filesystems")
        .unwrap_or_default()
        .lines()
        .filter(|l| !l.starts_with("nodev"))
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
        .collect();
    types.sort_by_key(|t| t != "ext4");
    types
}
