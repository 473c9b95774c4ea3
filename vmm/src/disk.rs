//! Disk image files: open, lock like QEMU does (OFD locks: exclusive for read-write, shared
//! for `readonly`, so two VMs — or two `--disk` of one VM — cannot write one image at once),
//! create sparse / grow to the requested size. The config's preflight (`config::disk`)
//! already refused what must not happen (shrinking, resizing a read-only disk, a missing
//! disk without size=).

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

/// Opens (creating or growing as asked) the image for `cfg`; never shrinks it.
pub fn open(cfg: &DiskConfig) -> Result<OpenDisk, DiskError> {
    let path = cfg.path.as_path();
    let open_err = |source| DiskError::Open { path: path.to_path_buf(), source };
    let file = OpenOptions::new()
        .read(true)
        .write(!cfg.read_only)
        .create(!cfg.read_only && cfg.size.is_some())
        .truncate(false)
        .open(path)
        .map_err(open_err)?;
    // Before anything changes the image (resize).
    lock(&file, path, cfg.read_only)?;
    let current = file.metadata().map_err(open_err)?.len();
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

/// Takes an OFD lock on the whole image: shared (F_RDLCK) if `read_only`, else exclusive. The
/// lock belongs to the open file description, so it lasts as long as the device holds the file
/// (and its dups), and conflicts with any other open of the image, in this process or another.
/// A filesystem without lock support only gets a warning.
fn lock(file: &File, path: &Path, read_only: bool) -> Result<(), DiskError> {
    // SAFETY: all-zero bytes are a valid `flock` (plain integers); l_start = l_len = 0 covers
    // the whole file, and l_pid must be 0 for OFD locks.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = (if read_only { libc::F_RDLCK } else { libc::F_WRLCK }) as libc::c_short;
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
}
