//! Disk image files: open, create sparse / grow to the requested size. The config's
//! preflight (`config::disk`) already refused what must not happen (shrinking, resizing a
//! read-only disk, a missing disk without size=).

use std::fs::{File, OpenOptions};
use std::path::PathBuf;

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
        assert_eq!(open(&DiskConfig::plain(&p, Some(2 << 30), false)).unwrap().len, 2 << 30);
        assert_eq!(open(&DiskConfig::plain(&p, Some(1 << 30), false)).unwrap().len, 2 << 30, "never shrinks");
        assert_eq!(open(&DiskConfig::plain(&p, None, true)).unwrap().len, 2 << 30);
        assert!(matches!(open(&DiskConfig::plain(&dir.join("none"), None, false)), Err(DiskError::Open { .. })));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
