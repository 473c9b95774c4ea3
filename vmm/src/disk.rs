//! Disk image files: create sparse / grow to the requested size, refuse to shrink, and lock
//! them like QEMU does (OFD locks: exclusive for read-write, shared for `readonly`), so two
//! VMs (or two `--disk` of one VM) cannot write one image at the same time.

use std::fs::{File, OpenOptions};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::config::DiskConfig;

#[derive(Debug, Error)]
pub enum DiskError {
    #[error("disk '{0}' does not exist (give size=SIZE to create it)")]
    Missing(PathBuf),
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
    #[error("disk '{path}' is {current} bytes; refusing to shrink it to {requested} bytes")]
    Shrink { path: PathBuf, current: u64, requested: u64 },
    #[error("disk '{path}' size {size} is not a multiple of 512 bytes")]
    Unaligned { path: PathBuf, size: u64 },
    #[error("cannot resize read-only disk '{0}'")]
    ReadOnlyResize(PathBuf),
    #[error("'{0}' is a directory, not a disk image")]
    Directory(PathBuf),
    #[error("disk '{0}' is in use by another process or another --disk (locked)")]
    Locked(PathBuf),
}

/// An opened disk image and its length in bytes.
pub struct OpenDisk {
    pub file: File,
    pub len: u64,
}

/// Opens (creating or growing as asked) the image for `cfg`.
pub fn open(cfg: &DiskConfig) -> Result<OpenDisk, DiskError> {
    let path = cfg.path.as_path();
    let open_err = |source| DiskError::Open { path: path.to_path_buf(), source };
    if path.is_dir() {
        return Err(DiskError::Directory(path.to_path_buf()));
    }
    if let Some(size) = cfg.size {
        if size % 512 != 0 || size == 0 {
            return Err(DiskError::Unaligned { path: path.to_path_buf(), size });
        }
    }
    let exists = path.exists();
    if !exists && cfg.size.is_none() {
        return Err(DiskError::Missing(path.to_path_buf()));
    }
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
    let len = match cfg.size {
        Some(requested) if requested < current => {
            return Err(DiskError::Shrink { path: path.to_path_buf(), current, requested })
        }
        Some(requested) if requested > current => {
            if cfg.read_only {
                return Err(DiskError::ReadOnlyResize(path.to_path_buf()));
            }
            // set_len on a regular file extends it sparsely.
            resize(&file, path, requested)?;
            requested
        }
        _ => current,
    };
    Ok(OpenDisk { file, len })
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

fn resize(file: &File, path: &Path, size: u64) -> Result<(), DiskError> {
    file.set_len(size).map_err(|source| DiskError::Resize {
        path: path.to_path_buf(),
        size,
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use devices::rate_limiter::RateLimiterConfig;
    use std::os::unix::fs::MetadataExt;

    fn cfg(path: &Path, size: Option<u64>, read_only: bool) -> DiskConfig {
        DiskConfig { path: path.to_path_buf(), size, read_only, rate: RateLimiterConfig::default() }
    }

    #[test]
    fn create_grow_refuse_shrink() {
        let dir = std::env::temp_dir().join(format!("mvdisk-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("d.img");
        assert!(matches!(open(&cfg(&p, None, false)), Err(DiskError::Missing(_))));
        let d = open(&cfg(&p, Some(1 << 30), false)).unwrap();
        assert_eq!(d.len, 1 << 30);
        let meta = std::fs::metadata(&p).unwrap();
        assert_eq!(meta.len(), 1 << 30);
        assert!(meta.blocks() * 512 < 1 << 20, "created sparse");
        drop(d);
        assert_eq!(open(&cfg(&p, Some(2 << 30), false)).unwrap().len, 2 << 30);
        assert!(matches!(open(&cfg(&p, Some(1 << 30), false)), Err(DiskError::Shrink { .. })));
        assert_eq!(open(&cfg(&p, None, true)).unwrap().len, 2 << 30);
        assert!(matches!(open(&cfg(&p, Some(3 << 30), true)), Err(DiskError::ReadOnlyResize(_))));
        assert!(matches!(open(&cfg(&p, Some(1000), false)), Err(DiskError::Unaligned { .. })));
        assert!(matches!(open(&cfg(&dir, None, false)), Err(DiskError::Directory(_))));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn images_are_locked_while_open() {
        let dir = std::env::temp_dir().join(format!("mvlock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("l.img");
        let rw = open(&cfg(&p, Some(1 << 20), false)).unwrap();
        // A second open, read-write or read-only, is refused (OFD locks conflict even within
        // one process).
        let e = open(&cfg(&p, None, false)).err().expect("second read-write open");
        assert!(matches!(&e, DiskError::Locked(q) if q == &p), "{e}");
        assert!(e.to_string().contains("in use"), "{e}");
        assert!(matches!(open(&cfg(&p, None, true)), Err(DiskError::Locked(_))));
        // Nor may a locked image be resized.
        assert!(matches!(open(&cfg(&p, Some(2 << 20), false)), Err(DiskError::Locked(_))));
        assert_eq!(std::fs::metadata(&p).unwrap().len(), 1 << 20);
        drop(rw);
        // Read-only users share the image, and keep writers out.
        let ro1 = open(&cfg(&p, None, true)).unwrap();
        let ro2 = open(&cfg(&p, None, true)).unwrap();
        assert!(matches!(open(&cfg(&p, None, false)), Err(DiskError::Locked(_))));
        drop((ro1, ro2));
        open(&cfg(&p, None, false)).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
