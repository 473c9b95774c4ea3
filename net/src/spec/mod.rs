//! The `--net` value: parsing and input validation.
//!
//! ```text
//! nat[:NAME][,subnet=A.B.C.0/24][,uplink=IFACE][,tap=TAP][,mac=..][,rate=..][,pps=..]
//! host-only[:NAME][,subnet=A.B.C.0/24][,tap=TAP][,mac=..][,rate=..][,pps=..]
//! bridge=BR[,mac=..][,rate=..][,pps=..]      attach a new TAP to an existing bridge
//! tap=NAME[,mac=..][,rate=..][,pps=..]       use an existing TAP as is
//! none
//! ```
//! `NAME` defaults to `default` (at most 10 of `[A-Za-z0-9_-]`, so `mvbr-NAME` fits 15).
//! `subnet=` must be a /24; without it the first free `10.200.X.0/24` is used.
//! `rate=` is a bandwidth: bits/s with `bit`/`kbit`/`Mbit`/`Gbit` (SI), or bytes/s with
//! `B`/`KB`/`MB`/`GB` (SI) or `KiB`/`MiB`/`GiB`; `rate=5MB` means 5,000,000 bytes/s.
//! Both become [`RateSpec::bytes_per_sec`]. `pps=N` is packets/s ([`RateSpec::ops_per_sec`]).
//! The default MAC is `52:54:xx:xx:xx:xx` hashed from (vm_id, nic_index).

mod mac;
pub(crate) mod rate;
mod subnet;

use std::fmt;
use std::str::FromStr;

pub use mac::MacAddr;
pub use rate::RateSpec;
pub use subnet::Subnet;

/// Longest network NAME: the bridge is `mvbr-NAME` and interface names have at most 15 bytes.
pub const MAX_NETWORK_NAME: usize = 15 - BRIDGE_PREFIX.len();
/// Prefix of the bridges of named networks.
pub const BRIDGE_PREFIX: &str = "mvbr-";
/// Prefix of the TAP devices we create.
pub const TAP_PREFIX: &str = "mvtap-";
/// Network name used by `nat` / `host-only` without `:NAME`.
pub const DEFAULT_NETWORK: &str = "default";

const SYNTAX: &str = "nat[:NAME], host-only[:NAME], bridge=BR, tap=NAME or none";

/// Bad `--net` input. Every variant is a user error (exit-code class "bad input").
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpecError {
    #[error("empty --net value (expected {SYNTAX})")]
    Empty,
    #[error("unknown --net mode '{mode}' (expected {SYNTAX})")]
    UnknownMode { mode: String },
    #[error("unknown option '{option}' for --net {mode} (allowed: {allowed})")]
    UnknownOption { option: String, mode: &'static str, allowed: &'static str },
    #[error("option '{option}' given twice in --net")]
    DuplicateOption { option: String },
    #[error("option '{option}' in --net needs a value ({option}=...)")]
    MissingValue { option: String },
    #[error("invalid network name '{name}': {reason}")]
    InvalidNetworkName { name: String, reason: &'static str },
    #[error("invalid {what} name '{name}': {reason}")]
    InvalidIfName { what: &'static str, name: String, reason: &'static str },
    #[error("invalid mac '{value}': {reason}")]
    InvalidMac { value: String, reason: &'static str },
    #[error("invalid subnet '{value}': {reason}")]
    InvalidSubnet { value: String, reason: &'static str },
    #[error("invalid rate '{value}': {reason}")]
    InvalidRate { value: String, reason: &'static str },
    #[error("invalid pps '{value}': {reason}")]
    InvalidPps { value: String, reason: &'static str },
    #[error("--net none has no network device to attach")]
    NothingToAttach,
}

/// How the NIC is connected on the host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NetMode {
    /// No NIC.
    None,
    /// Named NAT network: bridge `mvbr-NAME`, DHCP, masquerade out of the uplink.
    Nat {
        name: String,
        subnet: Option<Subnet>,
        uplink: Option<String>,
        tap: Option<String>,
    },
    /// Named host-only network: like `Nat` without masquerade or forwarding outside.
    HostOnly {
        name: String,
        subnet: Option<Subnet>,
        tap: Option<String>,
    },
    /// A new TAP attached to an existing bridge; nothing else is changed.
    Bridge { bridge: String },
    /// An existing TAP used as is.
    Tap { name: String },
}

/// A parsed `--net` value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetSpec {
    pub mode: NetMode,
    /// Guest MAC; `None` means derived from (vm_id, nic_index), see [`MacAddr::derived`].
    pub mac: Option<MacAddr>,
    /// Rate limits for the virtio-net device to apply.
    pub rate: RateSpec,
}

impl NetSpec {
    /// True for `--net none`.
    pub fn is_none(&self) -> bool {
        self.mode == NetMode::None
    }

    /// The named network (`nat`/`host-only`), if any.
    pub fn network_name(&self) -> Option<&str> {
        match &self.mode {
            NetMode::Nat { name, .. } | NetMode::HostOnly { name, .. } => Some(name),
            _ => None,
        }
    }

    /// The MAC the guest gets for this spec.
    pub fn mac_for(&self, vm_id: &str, nic_index: u32) -> MacAddr {
        self.mac.unwrap_or_else(|| MacAddr::derived(vm_id, nic_index))
    }

    /// Checks the spec against the host without changing anything: privileges
    /// (CAP_NET_ADMIN for modes that create devices), that `bridge=` names a bridge, that
    /// `tap=` and `uplink=` interfaces exist. Parsing already checked the syntax.
    /// Subnet collisions are checked by [`crate::attach`] under the network lock.
    pub fn validate(&self) -> Result<(), crate::NetError> {
        crate::network::preflight(self)
    }
}

/// Options accepted by each mode, for error messages and checks.
fn allowed_options(mode: &str) -> &'static str {
    match mode {
        "nat" => "subnet, uplink, tap, mac, rate, pps",
        "host-only" => "subnet, tap, mac, rate, pps",
        "none" => "none",
        _ => "mac, rate, pps",
    }
}

fn mode_label(mode: &str) -> &'static str {
    match mode {
        "nat" => "nat",
        "host-only" => "host-only",
        "bridge" => "bridge=BR",
        "tap" => "tap=NAME",
        _ => "none",
    }
}

/// Checks a named network's NAME: 1..=10 of `[A-Za-z0-9_-]`, starting with a letter or digit.
pub(crate) fn check_network_name(name: &str) -> Result<(), SpecError> {
    let bad = |reason| SpecError::InvalidNetworkName { name: name.to_string(), reason };
    if name.is_empty() {
        return Err(bad("it is empty"));
    }
    if name.len() > MAX_NETWORK_NAME {
        return Err(bad("at most 10 characters (the bridge mvbr-NAME must fit in 15)"));
    }
    if !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') {
        return Err(bad("only letters, digits, '_' and '-' are allowed"));
    }
    if !name.as_bytes()[0].is_ascii_alphanumeric() {
        return Err(bad("it must start with a letter or digit"));
    }
    Ok(())
}

/// Checks an interface name: 1..=15 of `[A-Za-z0-9_.-]`, not `.`/`..`. Stricter than the
/// kernel so names are safe inside generated nftables rules.
pub(crate) fn check_ifname(what: &'static str, name: &str) -> Result<(), SpecError> {
    let bad = |reason| SpecError::InvalidIfName { what, name: name.to_string(), reason };
    if name.is_empty() {
        return Err(bad("it is empty"));
    }
    if name.len() > 15 {
        return Err(bad("interface names have at most 15 characters"));
    }
    if !name.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b)) {
        return Err(bad("only letters, digits, '_', '.' and '-' are allowed"));
    }
    if name == "." || name == ".." {
        return Err(bad("not a valid interface name"));
    }
    Ok(())
}

impl FromStr for NetSpec {
    type Err = SpecError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut parts = s.split(',');
        let head = parts.next().unwrap_or("").trim();
        if head.is_empty() {
            return Err(SpecError::Empty);
        }
        // Mode and its argument: `nat[:NAME]`, `host-only[:NAME]`, `bridge=BR`, `tap=NAME`, `none`.
        let (mode, arg) = match head.split_once([':', '=']) {
            Some((m, a)) => (m, Some(a)),
            None => (head, None),
        };
        let mode = match (mode, arg, head.contains('=')) {
            ("nat" | "host-only", _, false) | ("bridge" | "tap", Some(_), true) | ("none", None, _) => {
                mode
            }
            _ => return Err(SpecError::UnknownMode { mode: head.to_string() }),
        };
        let mut spec = NetSpec { mode: NetMode::None, mac: None, rate: RateSpec::default() };
        let (mut subnet, mut uplink, mut tap) = (None, None, None);
        let mut seen: Vec<&str> = Vec::new();
        for opt in parts {
            let opt = opt.trim();
            if opt.is_empty() {
                continue;
            }
            let (key, value) = opt.split_once('=').unwrap_or((opt, ""));
            let allowed = allowed_options(mode);
            if !allowed.split(", ").any(|a| a == key) {
                return Err(SpecError::UnknownOption {
                    option: key.to_string(),
                    mode: mode_label(mode),
                    allowed,
                });
            }
            if seen.contains(&key) {
                return Err(SpecError::DuplicateOption { option: key.to_string() });
            }
            seen.push(key);
            if value.is_empty() {
                return Err(SpecError::MissingValue { option: key.to_string() });
            }
            match key {
                "mac" => spec.mac = Some(value.parse()?),
                "rate" => spec.rate.bytes_per_sec = Some(rate::parse_rate(value)?),
                "pps" => spec.rate.ops_per_sec = Some(rate::parse_pps(value)?),
                "subnet" => subnet = Some(value.parse()?),
                "uplink" => {
                    check_ifname("uplink", value)?;
                    uplink = Some(value.to_string());
                }
                "tap" => {
                    check_ifname("tap", value)?;
                    tap = Some(value.to_string());
                }
                _ => {
                    return Err(SpecError::UnknownOption {
                        option: key.to_string(),
                        mode: mode_label(mode),
                        allowed,
                    })
                }
            }
        }
        let net_name = || -> Result<String, SpecError> {
            let name = arg.unwrap_or(DEFAULT_NETWORK);
            check_network_name(name)?;
            Ok(name.to_string())
        };
        spec.mode = match mode {
            "nat" => NetMode::Nat { name: net_name()?, subnet, uplink, tap },
            "host-only" => NetMode::HostOnly { name: net_name()?, subnet, tap },
            "bridge" => {
                let bridge = arg.unwrap_or("");
                check_ifname("bridge", bridge)?;
                NetMode::Bridge { bridge: bridge.to_string() }
            }
            "tap" => {
                let name = arg.unwrap_or("");
                check_ifname("tap", name)?;
                NetMode::Tap { name: name.to_string() }
            }
            _ => NetMode::None,
        };
        Ok(spec)
    }
}

impl fmt::Display for NetSpec {
    /// Prints the spec in `--net` syntax (parses back to an equal spec; rates in bytes).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.mode {
            NetMode::None => return f.write_str("none"),
            NetMode::Nat { name, subnet, uplink, tap } => {
                write!(f, "nat:{name}")?;
                if let Some(s) = subnet {
                    write!(f, ",subnet={s}")?;
                }
                if let Some(u) = uplink {
                    write!(f, ",uplink={u}")?;
                }
                if let Some(t) = tap {
                    write!(f, ",tap={t}")?;
                }
            }
            NetMode::HostOnly { name, subnet, tap } => {
                write!(f, "host-only:{name}")?;
                if let Some(s) = subnet {
                    write!(f, ",subnet={s}")?;
                }
                if let Some(t) = tap {
                    write!(f, ",tap={t}")?;
                }
            }
            NetMode::Bridge { bridge } => write!(f, "bridge={bridge}")?,
            NetMode::Tap { name } => write!(f, "tap={name}")?,
        }
        if let Some(m) = self.mac {
            write!(f, ",mac={m}")?;
        }
        if let Some(r) = self.rate.bytes_per_sec {
            write!(f, ",rate={r}B")?;
        }
        if let Some(p) = self.rate.ops_per_sec {
            write!(f, ",pps={p}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
