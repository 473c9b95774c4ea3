//! Disk image files: create sparse / grow to the requested size, refuse to shrink.

use std::fs::{File, OpenOptions};
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
        assert_eq!(open(&cfg(&p, Some(2 << 30), false)).unwrap().len, 2 << 30);
        assert!(matches!(open(&cfg(&p, Some(1 << 30), false)), Err(DiskError::Shrink { .. })));
        assert_eq!(open(&cfg(&p, None, true)).unwrap().len, 2 << 30);
        assert!(matches!(open(&cfg(&p, Some(3 << 30), true)), Err(DiskError::ReadOnlyResize(_))));
        assert!(matches!(open(&cfg(&p, Some(1000), false)), Err(DiskError::Unaligned { .. })));
        assert!(matches!(open(&cfg(&dir, None, false)), Err(DiskError::Directory(_))));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
