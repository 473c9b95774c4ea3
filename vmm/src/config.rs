//! VM configuration: plain structs filled by the CLI (or any other front end), checked by
//! `validate()` before anything touches KVM or the host.

use std::path::PathBuf;

use devices::rate_limiter::{BucketConfig, RateLimiterConfig};
use thiserror::Error;

/// Largest vCPU count: the MP table for 32 vCPUs just fits the 1 KiB below 640 KiB.
pub const MAX_VCPUS: u32 = 32;
/// Smallest useful guest: the kernel, its page tables and an initramfs must fit.
pub const MIN_MEMORY_MIB: u64 = 32;
/// Upper bound on guest memory, to reject typos (e.g. bytes given instead of MiB).
pub const MAX_MEMORY_MIB: u64 = 1 << 20; // 1 TiB
/// The kernel's x86 COMMAND_LINE_SIZE.
pub const CMDLINE_MAX: usize = 2048;

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("--cpus must be between 1 and {MAX_VCPUS}, got {0}")]
    Cpus(u32),
    #[error("--memory must be between {MIN_MEMORY_MIB} and {MAX_MEMORY_MIB} MiB, got {0}")]
    Memory(u64),
    #[error("bad --disk '{spec}': {reason}")]
    DiskSpec { spec: String, reason: String },
    #[error("bad size '{0}': expected a number with an optional K, M, G or T suffix (e.g. 4G)")]
    Size(String),
    #[error("bad rate '{0}': expected a number with an optional K, M or G suffix")]
    Rate(String),
    #[error("too many devices: at most {max} virtio devices fit, got {got}")]
    TooManyDevices { max: usize, got: usize },
    #[error("bad --share '{spec}': {reason}")]
    ShareSpec { spec: String, reason: String },
    #[error("--share tag '{0}' is used twice (each share needs its own tag=)")]
    DuplicateTag(String),
    #[error("--share tag '{0}' is reserved for the shares microvm adds itself")]
    ReservedTag(String),
}

/// One `--disk PATH[,size=SIZE][,readonly][,bw=BYTES/s][,iops=N]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskConfig {
    pub path: PathBuf,
    /// Create the file sparse with this length if missing; grow it if shorter.
    pub size: Option<u64>,
    pub read_only: bool,
    /// `bw=` (bytes/s) and `iops=` token buckets; the default is unlimited.
    pub rate: RateLimiterConfig,
}

impl std::str::FromStr for DiskConfig {
    type Err = ConfigError;

    fn from_str(spec: &str) -> Result<Self, Self::Err> {
        let bad = |reason: &str| ConfigError::DiskSpec {
            spec: spec.to_string(),
            reason: reason.to_string(),
        };
        let mut parts = spec.split(',');
        let path = parts.next().unwrap_or_default();
        if path.is_empty() {
            return Err(bad("missing path"));
        }
        let mut disk = DiskConfig {
            path: PathBuf::from(path),
            size: None,
            read_only: false,
            rate: RateLimiterConfig::default(),
        };
        for opt in parts {
            match opt.split_once('=') {
                Some(("size", v)) => disk.size = Some(parse_size(v)?),
                Some(("bw", v)) => disk.rate.bandwidth = Some(BucketConfig::new(parse_rate(v)?)),
                Some(("iops", v)) => disk.rate.ops = Some(BucketConfig::new(parse_rate(v)?)),
                None if opt == "readonly" || opt == "ro" => disk.read_only = true,
                _ => {
                    return Err(bad(&format!(
                        "unknown option '{opt}' (expected size=, readonly, bw=, iops=)"
                    )))
                }
            }
        }
        Ok(disk)
    }
}

/// One `--share HOSTDIR[,at=GUESTPATH][,tag=TAG][,ro]`: a host directory the guest mounts over
/// virtio-fs (served by virtiofsd).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShareConfig {
    /// The host directory (checked and made canonical by `share::plan`).
    pub host: PathBuf,
    /// Where the guest mounts it; default: the host directory's canonical path.
    pub guest: Option<PathBuf>,
    /// The virtio-fs tag; default: `share0`, `share1`, ... (the first free one).
    pub tag: Option<String>,
    pub read_only: bool,
}

/// Longest virtio-fs tag (the device's config space field).
pub const SHARE_TAG_MAX: usize = devices::virtio::fs::TAG_MAX_LEN;

/// Why a tag is unusable, if it is: 1 to 36 bytes of `A-Z a-z 0-9 . _ -` (it travels on the
/// kernel command line to the guest init, so no spaces or separators).
pub fn share_tag_problem(tag: &str) -> Option<String> {
    if tag.is_empty() || tag.len() > SHARE_TAG_MAX {
        return Some(format!("tag '{tag}' must be 1 to {SHARE_TAG_MAX} bytes"));
    }
    if !tag.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)) {
        return Some(format!("tag '{tag}' may only hold letters, digits, '.', '_' and '-'"));
    }
    None
}

impl std::str::FromStr for ShareConfig {
    type Err = ConfigError;

    fn from_str(spec: &str) -> Result<Self, Self::Err> {
        let bad = |reason: &str| ConfigError::ShareSpec {
            spec: spec.to_string(),
            reason: reason.to_string(),
        };
        let mut parts = spec.split(',');
        let host = parts.next().unwrap_or_default();
        if host.is_empty() {
            return Err(bad("missing host directory"));
        }
        let mut share = ShareConfig { host: PathBuf::from(host), guest: None, tag: None, read_only: false };
        for opt in parts {
            match opt.split_once('=') {
                Some(("at", v)) => {
                    let p = PathBuf::from(v);
                    if !p.is_absolute() {
                        return Err(bad(&format!("at={v} must be an absolute guest path")));
                    }
                    if p.parent().is_none() {
                        return Err(bad("at=/ would hide the guest's root; pick a directory"));
                    }
                    share.guest = Some(p);
                }
                Some(("tag", v)) => {
                    if let Some(problem) = share_tag_problem(v) {
                        return Err(bad(&problem));
                    }
                    share.tag = Some(v.to_string());
                }
                None if opt == "ro" || opt == "readonly" => share.read_only = true,
                _ => return Err(bad(&format!("unknown option '{opt}' (expected at=, tag=, ro)"))),
            }
        }
        Ok(share)
    }
}

/// Everything needed to build and run one VM.
#[derive(Clone, Debug)]
pub struct VmConfig {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    /// Extra kernel command line from the user, appended after microvm's own.
    pub cmdline: Option<String>,
    pub cpus: u32,
    pub memory_mib: u64,
    pub disks: Vec<DiskConfig>,
    /// `--share` directories, in order (the host root and working directory shares that
    /// microvm adds itself are not here: see `share::plan`).
    pub shares: Vec<ShareConfig>,
    /// Raw `--net` specs, parsed and validated by the `net` crate.
    pub nets: Vec<String>,
    /// Apply the host-specific guest command-line quirks when detected.
    pub quirks: bool,
    /// Command to run in the guest (handed to the guest init via `microvm.cmd=`).
    pub command: Vec<String>,
}

impl Default for VmConfig {
    fn default() -> Self {
        VmConfig {
            kernel: PathBuf::new(),
            initrd: None,
            cmdline: None,
            cpus: 1,
            memory_mib: 128,
            disks: Vec::new(),
            shares: Vec::new(),
            nets: Vec::new(),
            quirks: true,
            command: Vec::new(),
        }
    }
}

impl VmConfig {
    /// Checks everything that can be checked without touching the host.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.cpus == 0 || self.cpus > MAX_VCPUS {
            return Err(ConfigError::Cpus(self.cpus));
        }
        if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&self.memory_mib) {
            return Err(ConfigError::Memory(self.memory_mib));
        }
        let mut tags = std::collections::HashSet::new();
        for tag in self.shares.iter().filter_map(|s| s.tag.as_deref()) {
            if crate::share::RESERVED_TAGS.contains(&tag) {
                return Err(ConfigError::ReservedTag(tag.to_string()));
            }
            if !tags.insert(tag) {
                return Err(ConfigError::DuplicateTag(tag.to_string()));
            }
        }
        let devices = self.disks.len() + self.nets.len() + crate::share::count(self);
        if devices > crate::layout::MAX_VIRTIO_DEVICES {
            return Err(ConfigError::TooManyDevices {
                max: crate::layout::MAX_VIRTIO_DEVICES,
                got: devices,
            });
        }
        Ok(())
    }
}

/// Parses `4G`, `512M`, `100K`, `1T` or plain bytes (binary multiples).
pub fn parse_size(s: &str) -> Result<u64, ConfigError> {
    parse_scaled(s, 1024).ok_or_else(|| ConfigError::Size(s.to_string()))
}

/// Parses a per-second rate: `10M` = 10,000,000 (decimal multiples, like network rates).
pub fn parse_rate(s: &str) -> Result<u64, ConfigError> {
    match parse_scaled(s, 1000) {
        Some(v) if v > 0 => Ok(v),
        _ => Err(ConfigError::Rate(s.to_string())),
    }
}

fn parse_scaled(s: &str, base: u64) -> Option<u64> {
    let s = s.trim();
    let (digits, mult) = match s.char_indices().last()? {
        (i, c) if c.is_ascii_alphabetic() => {
            let exp = match c.to_ascii_uppercase() {
                'K' => 1,
                'M' => 2,
                'G' => 3,
                'T' => 4,
                _ => return None,
            };
            (&s[..i], base.checked_pow(exp)?)
        }
        _ => (s, 1),
    };
    digits.parse::<u64>().ok()?.checked_mul(mult)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4G").unwrap(), 4 << 30);
        assert_eq!(parse_size("512m").unwrap(), 512 << 20);
        assert_eq!(parse_size("1000").unwrap(), 1000);
        assert!(parse_size("4X").is_err());
        assert!(parse_size("").is_err());
        assert!(parse_size("G").is_err());
        assert!(parse_size("99999999999T").is_err());
        assert_eq!(parse_rate("10M").unwrap(), 10_000_000);
        assert!(parse_rate("0").is_err());
    }

    #[test]
    fn disk_specs() {
        let d: DiskConfig = "a.img,size=1G,readonly,bw=1M,iops=100".parse().unwrap();
        assert_eq!(d.path, PathBuf::from("a.img"));
        assert_eq!(d.size, Some(1 << 30));
        assert!(d.read_only);
        assert_eq!(d.rate, RateLimiterConfig::simple(1_000_000, 100));
        assert!("".parse::<DiskConfig>().is_err());
        assert!("a.img,size=big".parse::<DiskConfig>().is_err());
        assert!("a.img,colour=red".parse::<DiskConfig>().is_err());
    }

    #[test]
    fn share_specs() {
        let s: ShareConfig = "/src,at=/mnt/src,tag=code,ro".parse().unwrap();
        assert_eq!(s.host, PathBuf::from("/src"));
        assert_eq!(s.guest, Some(PathBuf::from("/mnt/src")));
        assert_eq!(s.tag.as_deref(), Some("code"));
        assert!(s.read_only);
        let s: ShareConfig = "rel/dir".parse().unwrap();
        assert_eq!((s.guest, s.tag, s.read_only), (None, None, false));
        for bad in [
            "",
            ",tag=x",
            "/d,at=rel",
            "/d,at=/",
            "/d,tag=",
            "/d,tag=has space",
            "/d,tag=0123456789012345678901234567890123456",
            "/d,colour=red",
        ] {
            assert!(matches!(bad.parse::<ShareConfig>(), Err(ConfigError::ShareSpec { .. })), "{bad}");
        }
        // 36 bytes is the most the config space holds.
        assert!("/d,tag=012345678901234567890123456789012345".parse::<ShareConfig>().is_ok());
    }

    #[test]
    fn share_tags_unique_and_not_reserved() {
        let mut c = VmConfig { disks: vec!["r.img".parse().unwrap()], ..Default::default() };
        c.shares = vec!["/a,tag=t".parse().unwrap(), "/b".parse().unwrap()];
        c.validate().unwrap();
        c.shares.push("/c,tag=t".parse().unwrap());
        assert!(matches!(c.validate(), Err(ConfigError::DuplicateTag(t)) if t == "t"));
        c.shares = vec![format!("/a,tag={}", crate::share::ROOT_TAG).parse().unwrap()];
        assert!(matches!(c.validate(), Err(ConfigError::ReservedTag(_))));
    }

    #[test]
    fn validate_bounds() {
        let mut c = VmConfig::default();
        c.validate().unwrap();
        c.cpus = 0;
        assert!(matches!(c.validate(), Err(ConfigError::Cpus(0))));
        c.cpus = MAX_VCPUS + 1;
        assert!(c.validate().is_err());
        c.cpus = 1;
        c.memory_mib = 1;
        assert!(matches!(c.validate(), Err(ConfigError::Memory(1))));
    }
}
