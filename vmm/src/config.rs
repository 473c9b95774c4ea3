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
    /// Raw `--net` specs, parsed and validated by the `net` crate.
    pub nets: Vec<String>,
    /// Apply the host-specific guest command-line quirks when detected.
    pub quirks: bool,
    /// Command to run in the guest (handed to the guest init via `microvm.cmd=`).
    pub command: Vec<String>,
    /// Confine each thread with its seccomp filter (see `seccomp`); off only for debugging.
    pub seccomp: bool,
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
            nets: Vec::new(),
            quirks: true,
            command: Vec::new(),
            seccomp: true,
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
        let devices = self.disks.len() + self.nets.len();
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
