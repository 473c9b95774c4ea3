//! `--disk PATH[,size=SIZE][,readonly|ro][,snapshot][,bw=RATE][,iops=COUNT]`: parse, validate,
//! preflight. Opening, creating and growing the file is `crate::disk::open`, after preflight.
//!
//! `snapshot` (QEMU's `-snapshot`): the guest sees a writable disk whose writes go to a
//! private temporary overlay, discarded at exit; the image is only read. With `size=` larger
//! than the image, only the overlay grows (the rest reads as zeros), like a qcow2 overlay
//! made bigger than its backing file; the image itself is never resized or created, so a
//! missing image is an error. `snapshot,readonly` is allowed and is just `readonly`.

use std::path::{Path, PathBuf};

use devices::rate_limiter::{BucketConfig, RateLimiterConfig};
use devices::virtio::block::overlay::MAX_LEN as OVERLAY_MAX_LEN;
use options::{OptionError, OptionParser};
use thiserror::Error;

const PARSER: OptionParser = OptionParser::new("--disk", "PATH")
    .values(&["size", "bw", "iops"])
    .switches(&[("readonly", "readonly"), ("ro", "readonly"), ("snapshot", "snapshot")]);

/// A disk that cannot be used as asked.
#[derive(Debug, Error)]
pub enum DiskCheckError {
    #[error("disk '{0}' does not exist (give size=SIZE to create it)")]
    Missing(PathBuf),
    #[error("disk '{0}' does not exist (a snapshot disk overlays an existing image)")]
    SnapshotMissing(PathBuf),
    #[error("disk '{path}' size {size} is larger than a snapshot overlay can be ({max} bytes)")]
    SnapshotTooLarge { path: PathBuf, size: u64, max: u64 },
    #[error("cannot create the snapshot overlay of disk '{path}' in '{dir}' (set TMPDIR to a writable directory)")]
    OverlayDir {
        path: PathBuf,
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot use disk '{path}'")]
    Access {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("disk '{path}' is {current} bytes; refusing to shrink it to {requested} bytes")]
    Shrink { path: PathBuf, current: u64, requested: u64 },
    #[error("disk '{path}' size {size} is not a non-zero multiple of 512 bytes")]
    Unaligned { path: PathBuf, size: u64 },
    #[error("cannot resize read-only disk '{0}'")]
    ReadOnlyResize(PathBuf),
    #[error("'{0}' is a directory, not a disk image")]
    Directory(PathBuf),
}

/// One `--disk`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskConfig {
    pub path: PathBuf,
    /// Create the file sparse with this length if missing; grow it if shorter.
    pub size: Option<u64>,
    pub read_only: bool,
    /// Writes go to a private temporary overlay; the image is opened read-only.
    pub snapshot: bool,
    /// Set by a restore (not an option): the saved overlay layer (`DIR/disk-N`, see
    /// `devices::layer_files`) under this disk's new overlay.
    pub layer: Option<PathBuf>,
    /// `bw=` (bytes/s) and `iops=` token buckets; the default is unlimited.
    pub rate: RateLimiterConfig,
}

impl std::str::FromStr for DiskConfig {
    type Err = OptionError;

    fn from_str(spec: &str) -> Result<Self, Self::Err> {
        let o = PARSER.parse(spec)?;
        Ok(DiskConfig {
            path: PathBuf::from(o.head()),
            size: o.size("size")?,
            read_only: o.has("readonly"),
            snapshot: o.has("snapshot"),
            layer: None,
            rate: RateLimiterConfig {
                bandwidth: o.rate("bw")?.map(BucketConfig::new),
                ops: o.count("iops")?.map(BucketConfig::new),
            },
        })
    }
}

impl DiskConfig {
    /// A disk without rate limits (for tests).
    #[cfg(test)]
    pub(crate) fn plain(path: &Path, size: Option<u64>, read_only: bool) -> Self {
        DiskConfig { path: path.to_path_buf(), size, read_only, snapshot: false, layer: None, rate: RateLimiterConfig::default() }
    }

    /// True when the guest's writes go to an overlay (`snapshot` without `readonly`).
    pub fn overlay(&self) -> bool {
        self.snapshot && !self.read_only
    }

    /// Pure checks.
    pub fn validate(&self) -> Result<(), DiskCheckError> {
        match self.size {
            Some(size) if size == 0 || size % 512 != 0 => {
                Err(DiskCheckError::Unaligned { path: self.path.clone(), size })
            }
            Some(size) if self.overlay() && size > OVERLAY_MAX_LEN => {
                Err(DiskCheckError::SnapshotTooLarge { path: self.path.clone(), size, max: OVERLAY_MAX_LEN })
            }
            _ => Ok(()),
        }
    }

    /// Read-only host checks: the file exists (or `size=` creates it), is not a directory,
    /// would not shrink, can be opened as asked.
    pub fn preflight(&self) -> Result<(), DiskCheckError> {
        let path = self.path.as_path();
        let meta = match std::fs::metadata(path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return match self.size {
                    _ if self.snapshot => Err(DiskCheckError::SnapshotMissing(path.to_path_buf())),
                    Some(_) if !self.read_only => writable_dir(path),
                    _ => Err(DiskCheckError::Missing(path.to_path_buf())),
                };
            }
            Err(source) => return Err(DiskCheckError::Access { path: path.to_path_buf(), source }),
        };
        if meta.is_dir() {
            return Err(DiskCheckError::Directory(path.to_path_buf()));
        }
        let current = meta.len();
        match self.size {
            Some(requested) if requested < current => {
                return Err(DiskCheckError::Shrink { path: path.to_path_buf(), current, requested })
            }
            Some(requested) if requested > current && self.read_only => {
                return Err(DiskCheckError::ReadOnlyResize(path.to_path_buf()))
            }
            _ => {}
        }
        if self.overlay() {
            let size = self.size.unwrap_or(current).max(current);
            if size > OVERLAY_MAX_LEN {
                return Err(DiskCheckError::SnapshotTooLarge { path: path.to_path_buf(), size, max: OVERLAY_MAX_LEN });
            }
            let dir = crate::disk::overlay_dir();
            access(&dir, libc::W_OK | libc::X_OK).map_err(|e| match e {
                DiskCheckError::Access { source, .. } => {
                    DiskCheckError::OverlayDir { path: path.to_path_buf(), dir: dir.clone(), source }
                }
                other => other,
            })?;
        }
        let mode = if self.read_only || self.snapshot { libc::R_OK } else { libc::R_OK | libc::W_OK };
        access(path, mode)
    }
}

/// A missing disk will be created: its directory must let us.
fn writable_dir(path: &Path) -> Result<(), DiskCheckError> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    access(dir, libc::W_OK | libc::X_OK).map_err(|e| match e {
        DiskCheckError::Access { source, .. } => DiskCheckError::Access { path: path.to_path_buf(), source },
        other => other,
    })
}

/// access(2): may this process open `path` with `mode`?
fn access(path: &Path, mode: libc::c_int) -> Result<(), DiskCheckError> {
    use std::os::unix::ffi::OsStrExt;
    let err = |source| DiskCheckError::Access { path: path.to_path_buf(), source };
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| err(std::io::Error::from(std::io::ErrorKind::InvalidInput)))?;
    // SAFETY: `c` is a valid NUL-terminated string for the duration of the call.
    if unsafe { libc::access(c.as_ptr(), mode) } != 0 {
        return Err(err(std::io::Error::last_os_error()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use options::Reason;


    #[test]
    fn specs() {
        let d: DiskConfig = "a.img,size=1G,readonly,bw=1M,iops=100".parse().unwrap();
        assert_eq!(d.path, PathBuf::from("a.img"));
        assert_eq!(d.size, Some(1 << 30));
        assert!(d.read_only);
        assert_eq!(d.rate, RateLimiterConfig::simple(1_000_000, 100));
        // The net rate forms work for disks too.
        let d: DiskConfig = "a.img,ro,bw=80Mbit,iops=2K".parse().unwrap();
        assert_eq!(d.rate, RateLimiterConfig::simple(10_000_000, 2000));
        assert_eq!("a.img".parse::<DiskConfig>().unwrap(), DiskConfig::plain(Path::new("a.img"), None, false));
        for (spec, needle) in [
            ("", "missing PATH"),
            ("a.img,size=big", "bad size 'big'"),
            ("a.img,colour=red", "unknown option 'colour'"),
            ("a.img,bw=0", "bad rate '0'"),
            ("a.img,iops=1.5", "bad count '1.5'"),
        ] {
            let e = spec.parse::<DiskConfig>().unwrap_err().to_string();
            assert!(e.starts_with(&format!("bad --disk '{spec}': ")) && e.contains(needle) && !e.contains('\n'), "{e}");
        }
        assert_eq!("a,ro,ro".parse::<DiskConfig>().unwrap_err().reason, Reason::Duplicate("ro".into()));
        let d: DiskConfig = "a.img,snapshot".parse().unwrap();
        assert!(d.snapshot && !d.read_only && d.overlay());
        let d: DiskConfig = "a.img,snapshot,ro,size=2G".parse().unwrap();
        assert!(d.snapshot && d.read_only && !d.overlay(), "snapshot,readonly is readonly");
        assert!(!"a.img".parse::<DiskConfig>().unwrap().snapshot);
        assert_eq!("a,snapshot,snapshot".parse::<DiskConfig>().unwrap_err().reason, Reason::Duplicate("snapshot".into()));
        assert_eq!("a,snapshot=on".parse::<DiskConfig>().unwrap_err().reason, Reason::UnexpectedValue("snapshot".into()));
    }

    #[test]
    fn snapshot_checks() {
        let dir = std::env::temp_dir().join(format!("mvdisksnap-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("d.img");
        let snap = |size, ro| DiskConfig { snapshot: true, ..DiskConfig::plain(&p, size, ro) };
        // A missing image is never created for a snapshot, size= or not.
        for (size, ro) in [(None, false), (Some(1 << 20), false), (None, true)] {
            let e = snap(size, ro).preflight().unwrap_err();
            assert!(matches!(e, DiskCheckError::SnapshotMissing(_)), "{e}");
            assert!(e.to_string().contains("snapshot disk overlays an existing image"), "{e}");
        }
        std::fs::write(&p, vec![0u8; 4096]).unwrap();
        snap(None, false).preflight().unwrap();
        // size= larger than the image grows only the overlay; smaller is still a shrink.
        snap(Some(1 << 30), false).validate().unwrap();
        snap(Some(1 << 30), false).preflight().unwrap();
        assert!(matches!(snap(Some(512), false).preflight(), Err(DiskCheckError::Shrink { .. })));
        assert!(matches!(snap(Some(8192), true).preflight(), Err(DiskCheckError::ReadOnlyResize(_))));
        let huge = OVERLAY_MAX_LEN + 512;
        assert!(matches!(snap(Some(huge), false).validate(), Err(DiskCheckError::SnapshotTooLarge { .. })));
        // A read-only image is enough: only the overlay is written.
        let mut perms = std::fs::metadata(&p).unwrap().permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o444);
        std::fs::set_permissions(&p, perms).unwrap();
        snap(None, false).preflight().unwrap();
        assert_eq!(std::fs::metadata(&p).unwrap().len(), 4096, "preflight changes nothing");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn validate_and_preflight() {
        let dir = std::env::temp_dir().join(format!("mvdiskcfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("d.img");
        assert!(matches!(DiskConfig::plain(&p, Some(1000), false).validate(), Err(DiskCheckError::Unaligned { .. })));
        assert!(matches!(DiskConfig::plain(&p, Some(0), false).validate(), Err(DiskCheckError::Unaligned { .. })));
        assert!(matches!(DiskConfig::plain(&p, None, false).preflight(), Err(DiskCheckError::Missing(_))));
        assert!(matches!(DiskConfig::plain(&p, Some(1 << 20), true).preflight(), Err(DiskCheckError::Missing(_))));
        DiskConfig::plain(&p, Some(1 << 20), false).preflight().unwrap();
        assert!(!p.exists(), "preflight creates nothing");
        std::fs::write(&p, vec![0u8; 4096]).unwrap();
        DiskConfig::plain(&p, None, true).preflight().unwrap();
        DiskConfig::plain(&p, Some(8192), false).preflight().unwrap();
        assert!(matches!(DiskConfig::plain(&p, Some(512), false).preflight(), Err(DiskCheckError::Shrink { .. })));
        assert!(matches!(DiskConfig::plain(&p, Some(8192), true).preflight(), Err(DiskCheckError::ReadOnlyResize(_))));
        assert!(matches!(DiskConfig::plain(&dir, None, false).preflight(), Err(DiskCheckError::Directory(_))));
        assert_eq!(std::fs::metadata(&p).unwrap().len(), 4096, "preflight changes nothing");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
