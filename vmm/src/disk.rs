//! Disk image files: open, lock like QEMU does (OFD locks: exclusive for read-write, shared
//! for `readonly`, so two VMs — or two `--disk` of one VM — cannot write one image at once),
//! create sparse / grow to the requested size. The config's preflight (`config::disk`)
//! already refused what must not happen (shrinking, resizing a read-only disk, a missing
//! disk without size=).
//!
//! A `snapshot` disk is opened read-only under the shared lock, like `readonly`: any number
//! of `snapshot` and `readonly` users (VMs, or `--disk`s of one VM) share an image, and a
//! read-write user is refused while any of them holds it (and they while it does), since the
//! image must not change under their overlays. It is never created or resized: `size=`
//! larger than the image grows only the overlay. The overlay's private upper file goes to
//! [`overlay_dir`].

use std::fs::{File, OpenOptions};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::config::DiskConfig;

#[derive(Debug, Error)]
pub enum DiskError {
    #[error("cannot open disk '{path}'")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot create or resize disk '{path}' to {size} bytes")]
    Resize {
        path: PathBuf,
        size: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("disk '{0}' is in use by another process or another --disk (locked)")]
    Locked(PathBuf),
}

impl DiskError {
    /// A locked image is the user's doing (exit 2), like the preflight's checks.
    pub fn is_usage(&self) -> bool {
        matches!(self, DiskError::Locked(_))
    }
}

/// An opened disk image and its length in bytes.
pub struct OpenDisk {
    pub file: File,
    pub len: u64,
}

/// Opens (creating or growing as asked) the image for `cfg`; never shrinks it. For a
/// `snapshot` disk, `len` is the overlay's (the larger of the image and `size=`).
pub fn open(cfg: &DiskConfig) -> Result<OpenDisk, DiskError> {
    let path = cfg.path.as_path();
    let open_err = |source| DiskError::Open { path: path.to_path_buf(), source };
    let shared = cfg.read_only || cfg.snapshot;
    let file = OpenOptions::new()
        .read(true)
        .write(!shared)
        .create(!shared && cfg.size.is_some())
        .truncate(false)
        .open(path)
        .map_err(open_err)?;
    // Before anything changes the image (resize).
    lock(&file, path, shared)?;
    let current = file.metadata().map_err(open_err)?.len();
    if cfg.snapshot {
        return Ok(OpenDisk { file, len: cfg.size.unwrap_or(current).max(current) });
    }
    match cfg.size {
        Some(requested) if requested > current && !cfg.read_only => {
            // set_len on a regular file extends it sparsely.
            file.set_len(requested)
                .map_err(|source| DiskError::Resize { path: path.to_path_buf(), size: requested, source })?;
            Ok(OpenDisk { file, len: requested })
        }
        _ => Ok(OpenDisk { file, len: current }),
    }
}

/// Where the private upper files of `snapshot` disks are created: `$TMPDIR`, else `/var/tmp`
/// (QEMU's choice for `-snapshot`: /tmp is often a small tmpfs, and guest writes can be
/// large). Not beside the image: its directory may be read-only or shared by many VMs.
pub fn overlay_dir() -> PathBuf {
    match std::env::var_os("TMPDIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => PathBuf::from("/var/tmp"),
    }
}

/// Takes an OFD lock on the whole image: shared (F_RDLCK) if `shared`, else exclusive. The
/// lock belongs to the open file description, so it lasts as long as the device holds the file
/// (and its dups), and conflicts with any other open of the image, in this process or another.
/// A filesystem without lock support only gets a warning.
fn lock(file: &File, path: &Path, shared: bool) -> Result<(), DiskError> {
    // SAFETY: all-zero bytes are a valid `flock` (plain integers); l_start = l_len = 0 covers
    // the whole file, and l_pid must be 0 for OFD locks.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = (if shared { libc::F_RDLCK } else { libc::F_WRLCK }) as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    // SAFETY: F_OFD_SETLK reads the flock struct we pass, which outlives the call; the fd is
    // open (owned by `file`).
    let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &fl) };
    if r == 0 {
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EAGAIN | libc::EACCES) => Err(DiskError::Locked(path.to_path_buf())),
        _ => {
            tracing::warn!(path = %path.display(), error = %e, "cannot lock the disk image, using it unlocked");
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;


    #[test]
    fn create_grow_never_shrink() {
        let dir = std::env::temp_dir().join(format!("mvdisk-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("d.img");
        let d = open(&DiskConfig::plain(&p, Some(1 << 30), false)).unwrap();
        assert_eq!(d.len, 1 << 30);
        let meta = std::fs::metadata(&p).unwrap();
        assert_eq!(meta.len(), 1 << 30);
        assert!(meta.blocks() * 512 < 1 << 20, "created sparse");
        drop(d);
        assert_eq!(open(&DiskConfig::plain(&p, Some(2 << 30), false)).unwrap().len, 2 << 30);
        assert_eq!(open(&DiskConfig::plain(&p, Some(1 << 30), false)).unwrap().len, 2 << 30, "never shrinks");
        assert_eq!(open(&DiskConfig::plain(&p, None, true)).unwrap().len, 2 << 30);
        assert!(matches!(open(&DiskConfig::plain(&dir.join("none"), None, false)), Err(DiskError::Open { .. })));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn images_are_locked_while_open() {
        let dir = std::env::temp_dir().join(format!("mvlock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("l.img");
        let cfg = |size, ro| DiskConfig::plain(&p, size, ro);
        let rw = open(&cfg(Some(1 << 20), false)).unwrap();
        // A second open, read-write or read-only, is refused (OFD locks conflict even within
        // one process).
        let e = open(&cfg(None, false)).err().expect("second read-write open");
        assert!(matches!(&e, DiskError::Locked(q) if q == &p), "{e}");
        assert!(e.to_string().contains("in use"), "{e}");
        assert!(matches!(open(&cfg(None, true)), Err(DiskError::Locked(_))));
        // Nor may a locked image be resized.
        assert!(matches!(open(&cfg(Some(2 << 20), false)), Err(DiskError::Locked(_))));
        assert_eq!(std::fs::metadata(&p).unwrap().len(), 1 << 20);
        drop(rw);
        // Read-only users share the image, and keep writers out.
        let ro1 = open(&cfg(None, true)).unwrap();
        let ro2 = open(&cfg(None, true)).unwrap();
        assert!(matches!(open(&cfg(None, false)), Err(DiskError::Locked(_))));
        drop((ro1, ro2));
        open(&cfg(None, false)).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn snapshot_images_are_shared_and_never_changed() {
        let dir = std::env::temp_dir().join(format!("mvsnaplock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("s.img");
        std::fs::write(&p, vec![7u8; 1 << 20]).unwrap();
        let snap = |size| DiskConfig { snapshot: true, ..DiskConfig::plain(&p, size, false) };
        // Any number of snapshot users at once, beside read-only ones.
        let s1 = open(&snap(None)).unwrap();
        let s2 = open(&snap(Some(4 << 20))).unwrap();
        let ro = open(&DiskConfig::plain(&p, None, true)).unwrap();
        assert_eq!(s1.len, 1 << 20);
        assert_eq!(s2.len, 4 << 20, "size= is the overlay's length");
        assert_eq!(std::fs::metadata(&p).unwrap().len(), 1 << 20, "the image is not grown");
        // The file is open read-only.
        use std::io::Write;
        assert!((&s1.file).write(b"x").is_err());
        // A writer is refused while they hold it...
        let e = open(&DiskConfig::plain(&p, None, false)).err().expect("read-write open");
        assert!(matches!(&e, DiskError::Locked(q) if q == &p) && e.is_usage(), "{e}");
        drop((s1, s2, ro));
        // ...and they are refused while a writer holds it.
        let rw = open(&DiskConfig::plain(&p, None, false)).unwrap();
        assert!(matches!(open(&snap(None)), Err(DiskError::Locked(_))));
        drop(rw);
        // Never created.
        assert!(matches!(open(&DiskConfig { snapshot: true, ..DiskConfig::plain(&dir.join("none"), Some(1 << 20), false) }), Err(DiskError::Open { .. })));
        assert!(!dir.join("none").exists());
        assert_eq!(std::fs::read(&p).unwrap(), vec![7u8; 1 << 20]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
