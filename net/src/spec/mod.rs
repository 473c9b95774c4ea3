//! The `--net` value: parsing and input validation.
//!
//! ```text
//! nat[:NAME][,subnet=A.B.C.0/24][,uplink=IFACE][,allow-host][,tap=TAP][,mac=..][,rate=..][,pps=..][,OVERLAY]
//! host-only[:NAME][,subnet=A.B.C.0/24][,allow-host][,tap=TAP][,mac=..][,rate=..][,pps=..][,OVERLAY]
//!     OVERLAY = vxlan=VNI,peers=IP+IP[,dev=IFACE][,mtu=N]   (needs subnet=; see `overlay`)
//! bridge=BR[,vlan=N][,mac=..][,rate=..][,pps=..]   attach a new TAP to an existing bridge
//!     (vlan=N, 1..4094: as an untagged access port of VLAN N; BR needs vlan_filtering)
//! tap=NAME[,mac=..][,rate=..][,pps=..]       use an existing TAP as is
//! none
//! ```
//! `NAME` defaults to `default` (at most 10 of `[A-Za-z0-9_-]`, so `mvbr-NAME` fits 15).
//! `subnet=` must be a /24; without it the first free `10.200.X.0/24` is used.
//! `allow-host` lets the network's guests connect to the host itself (by default they get
//! only DHCP, DNS to a resolver on the host and ping of the gateway; see the `nft` module).
//! It is a property of the network, fixed by the VM that creates it: joining an existing
//! network with a different `allow-host` setting is a usage error, like a different subnet.
//! `rate=` is a bandwidth and `pps=N` a packet rate, in the RATE and COUNT grammars of the
//! `options` crate (`rate=50Mbit` bits/s, `rate=5MB` or `rate=5M` bytes/s); both end up in
//! [`RateSpec`] in bytes/s and packets/s, applied in each direction.
//! The default MAC is `52:54:xx:xx:xx:xx` hashed from (vm_id, nic_index).

mod mac;
pub(crate) mod overlay;
mod rate;
mod subnet;

use std::fmt;
use std::str::FromStr;

use options::{OptionError, OptionParser, Reason};

pub use mac::MacAddr;
pub(crate) use mac::fnv1a64;
pub use overlay::{NetworkDef, Overlay, OverlayError, DEFAULT_NETWORKS_DIR, NETWORKS_DIR_ENV};
pub use rate::RateSpec;
pub use subnet::Subnet;

/// Longest network NAME: the bridge is `mvbr-NAME` and interface names have at most 15 bytes.
pub const MAX_NETWORK_NAME: usize = 15 - BRIDGE_PREFIX.len();
/// Prefix of the bridges of named networks.
pub const BRIDGE_PREFIX: &str = "mvbr-";
/// Prefix of the VXLAN devices of overlay networks (`mvvx-NAME`).
pub const VXLAN_PREFIX: &str = "mvvx-";
/// Prefix of the TAP devices we create.
pub const TAP_PREFIX: &str = "mvtap-";
/// Network name used by `nat` / `host-only` without `:NAME`.
pub const DEFAULT_NETWORK: &str = "default";

const SYNTAX: &str = "nat[:NAME], host-only[:NAME], bridge=BR, tap=NAME or none";

/// The `--net` grammar: one parser per mode (each accepts different options).
const NAT: OptionParser = OptionParser::new("--net", "mode")
    .values(&["subnet", "uplink", "tap", "mac", "rate", "pps", "vxlan", "peers", "dev", "mtu"])
    .switches(&[("allow-host", "allow-host")]);
const HOST_ONLY: OptionParser = OptionParser::new("--net", "mode")
    .values(&["subnet", "tap", "mac", "rate", "pps", "vxlan", "peers", "dev", "mtu"])
    .switches(&[("allow-host", "allow-host")]);
const BRIDGE: OptionParser = OptionParser::new("--net", "mode").values(&["vlan", "mac", "rate", "pps"]);
const ATTACH: OptionParser = OptionParser::new("--net", "mode").values(&["mac", "rate", "pps"]);
/// VLAN ids a port can be an access port of (0 and 4095 are reserved by 802.1Q).
pub const VLAN_RANGE: std::ops::RangeInclusive<u16> = 1..=4094;
const NONE: OptionParser = OptionParser::new("--net", "mode");

/// A bad name, MAC or subnet: a user error (exit-code class "bad input"). Within a
/// `--net` spec these become an [`OptionError`] naming the spec.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpecError {
    #[error("invalid network name '{name}': {reason}")]
    InvalidNetworkName { name: String, reason: &'static str },
    #[error("invalid {what} name '{name}': {reason}")]
    InvalidIfName { what: &'static str, name: String, reason: &'static str },
    #[error("invalid mac '{value}': {reason}")]
    InvalidMac { value: String, reason: &'static str },
    #[error("invalid subnet '{value}': {reason}")]
    InvalidSubnet { value: String, reason: &'static str },
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
        /// Guests may connect to the host itself (`allow-host`).
        allow_host: bool,
        /// Spans hosts over VXLAN (`vxlan=...`; a definition file is looked up at attach).
        overlay: Option<Overlay>,
    },
    /// Named host-only network: like `Nat` without masquerade or forwarding outside.
    HostOnly {
        name: String,
        subnet: Option<Subnet>,
        tap: Option<String>,
        /// Guests may connect to the host itself (`allow-host`).
        allow_host: bool,
        /// Spans hosts over VXLAN (`vxlan=...`; a definition file is looked up at attach).
        overlay: Option<Overlay>,
    },
    /// A new TAP attached to an existing bridge; with `vlan`, as an untagged access port of
    /// that VLAN (the bridge must filter VLANs). Nothing else is changed.
    Bridge { bridge: String, vlan: Option<u16> },
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
    pub fn preflight(&self) -> Result<(), crate::NetError> {
        crate::network::preflight(self)
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
    type Err = OptionError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        // Mode and its argument: `nat[:NAME]`, `host-only[:NAME]`, `bridge=BR`, `tap=NAME`, `none`.
        let head = options::head(s);
        let (mode, arg) = match head.split_once([':', '=']) {
            Some((m, a)) => (m, Some(a)),
            None => (head, None),
        };
        let parser = match (mode, arg, head.contains('=')) {
            ("nat", _, false) => NAT,
            ("host-only", _, false) => HOST_ONLY,
            ("bridge", Some(_), true) => BRIDGE,
            ("tap", Some(_), true) => ATTACH,
            ("none", None, _) => NONE,
            _ if head.is_empty() => return Err(NONE.error(s, Reason::MissingHead("mode (expected nat[:NAME], host-only[:NAME], bridge=BR, tap=NAME or none)"))),
            _ => return Err(NONE.error(s, Reason::Invalid(format!("unknown mode '{head}' (expected {SYNTAX})")))),
        };
        let opts = parser.parse(s)?;
        let invalid = |e: SpecError| opts.error(Reason::Invalid(e.to_string()));
        let ifname = |what, key: &str| -> Result<Option<String>, OptionError> {
            opts.get(key).map(|v| check_ifname(what, v).map(|()| v.to_string()).map_err(invalid)).transpose()
        };
        let net_name = || -> Result<String, OptionError> {
            let name = arg.unwrap_or(DEFAULT_NETWORK);
            check_network_name(name).map_err(invalid)?;
            Ok(name.to_string())
        };
        let subnet = opts.parsed::<Subnet>("subnet")?;
        let tap = ifname("tap", "tap")?;
        let allow_host = opts.has("allow-host");
        let overlay = || -> Result<Option<Overlay>, OptionError> {
            let [vxlan, peers, dev, mtu] = ["vxlan", "peers", "dev", "mtu"].map(|k| opts.get(k));
            if vxlan.is_none() {
                return match (peers, dev, mtu) {
                    (None, None, None) => Ok(None),
                    _ => Err(opts.error(Reason::Invalid("peers=, dev= and mtu= belong to an overlay: add vxlan=VNI".into()))),
                };
            }
            let spec_err = |e: OverlayError| {
                opts.error(Reason::Invalid(match e {
                    OverlayError::Parse { reason, .. } | OverlayError::Invalid { reason, .. } => reason,
                    other => other.to_string(),
                }))
            };
            let def = NetworkDef::from_options(vxlan, peers, dev, mtu, opts.get("subnet")).map_err(spec_err)?;
            Ok(Some(def.validate("--net").map_err(spec_err)?.0))
        };
        let mode = match mode {
            "nat" => NetMode::Nat { name: net_name()?, subnet, uplink: ifname("uplink", "uplink")?, tap, allow_host, overlay: overlay()? },
            "host-only" => NetMode::HostOnly { name: net_name()?, subnet, tap, allow_host, overlay: overlay()? },
            "bridge" => {
                let bridge = arg.unwrap_or("");
                check_ifname("bridge", bridge).map_err(invalid)?;
                let vlan = opts
                    .get("vlan")
                    .map(|v| match v.parse::<u16>() {
                        Ok(n) if VLAN_RANGE.contains(&n) => Ok(n),
                        _ => Err(opts.error(Reason::Invalid(format!("vlan '{v}' is not a VLAN id (1..4094)")))),
                    })
                    .transpose()?;
                NetMode::Bridge { bridge: bridge.to_string(), vlan }
            }
            "tap" => {
                let name = arg.unwrap_or("");
                check_ifname("tap", name).map_err(invalid)?;
                NetMode::Tap { name: name.to_string() }
            }
            _ => NetMode::None,
        };
        Ok(NetSpec {
            mode,
            mac: opts.parsed("mac")?,
            rate: RateSpec { bytes_per_sec: opts.rate("rate")?, ops_per_sec: opts.count("pps")? },
        })
    }
}

impl fmt::Display for NetSpec {
    /// Prints the spec in `--net` syntax (parses back to an equal spec; rates in bytes).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.mode {
            NetMode::None => return f.write_str("none"),
            NetMode::Nat { name, subnet, uplink, tap, allow_host, overlay } => {
                write!(f, "nat:{name}")?;
                if let Some(s) = subnet {
                    write!(f, ",subnet={s}")?;
                }
                if let Some(u) = uplink {
                    write!(f, ",uplink={u}")?;
                }
                if *allow_host {
                    f.write_str(",allow-host")?;
                }
                if let Some(t) = tap {
                    write!(f, ",tap={t}")?;
                }
                if let Some(o) = overlay {
                    write!(f, ",{o}")?;
                }
            }
            NetMode::HostOnly { name, subnet, tap, allow_host, overlay } => {
                write!(f, "host-only:{name}")?;
                if let Some(s) = subnet {
                    write!(f, ",subnet={s}")?;
                }
                if *allow_host {
                    f.write_str(",allow-host")?;
                }
                if let Some(t) = tap {
                    write!(f, ",tap={t}")?;
                }
                if let Some(o) = overlay {
                    write!(f, ",{o}")?;
                }
            }
            NetMode::Bridge { bridge, vlan } => {
                write!(f, "bridge={bridge}")?;
                if let Some(v) = vlan {
                    write!(f, ",vlan={v}")?;
                }
            }
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
