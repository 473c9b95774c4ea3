//! Overlay networks: a named network spanning hosts over the kernel's VXLAN.
//!
//! Two ways to define one, both through ONE path (parse, then validate, as Cloud
//! Hypervisor's configs do; parse errors are told apart from validation errors):
//! * inline in `--net`: `host-only:lab,subnet=10.77.0.0/24,vxlan=4242,peers=192.0.2.11+192.0.2.12[,dev=eth0][,mtu=1450]`
//! * a definition file every host shares, `$MICROVM_NETWORKS_DIR/NAME.toml` (default
//!   `/etc/microvm/networks/NAME.toml`), picked up by a plain `--net host-only:NAME`:
//!
//! ```toml
//! vni = 4242                                # VXLAN network identifier, 1..16777215
//! subnet = "10.77.0.0/24"                   # the same /24 on every host
//! peers = ["192.0.2.11", "192.0.2.12"]      # every host's underlay address (its own is skipped)
//! dev = "eth0"                              # optional: the underlay interface
//! mtu = 1450                                # optional: the guests' MTU (default: underlay MTU - 50)
//! ```
//! Either source yields a [`NetworkDef`] (values as written), which [`NetworkDef::validate`]
//! turns into an [`Overlay`] plus its subnet.

use std::fmt;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use super::{check_ifname, Subnet};

/// Environment variable overriding the directory of network definition files.
pub const NETWORKS_DIR_ENV: &str = "MICROVM_NETWORKS_DIR";
/// Where network definition files live unless `$MICROVM_NETWORKS_DIR` says otherwise.
pub const DEFAULT_NETWORKS_DIR: &str = "/etc/microvm/networks";
/// Largest VXLAN network identifier (24 bits).
pub const MAX_VNI: u32 = (1 << 24) - 1;
/// Most peers an overlay may list (head-end replication copies every broadcast to each).
pub const MAX_PEERS: usize = 64;
/// The guests' MTU bounds: IPv4's minimum datagram every host must accept, and jumbo frames.
pub const MTU_RANGE: std::ops::RangeInclusive<u32> = 576..=9000;

/// A refused overlay definition (a user error).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum OverlayError {
    /// The text is not a definition at all (syntax, types, unknown keys).
    #[error("cannot parse {source_name}: {reason}")]
    Parse { source_name: String, reason: String },
    /// Parsed, but a value is out of range or inconsistent.
    #[error("invalid overlay definition in {source_name}: {reason}")]
    Invalid { source_name: String, reason: String },
    #[error("cannot read network definition {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: IoErrorEq,
    },
    #[error("network {name} is defined in {} and on the command line (vxlan=...); give it in one place", path.display())]
    Twice { name: String, path: PathBuf },
    #[error("network {name}: subnet={requested} differs from {existing} in {}", path.display())]
    SubnetDiffers { name: String, requested: Subnet, existing: Subnet, path: PathBuf },
}

/// An `io::Error` that compares by kind, so [`OverlayError`] stays `PartialEq` for tests.
#[derive(Debug)]
pub struct IoErrorEq(pub std::io::Error);

impl PartialEq for IoErrorEq {
    fn eq(&self, other: &Self) -> bool {
        self.0.kind() == other.0.kind()
    }
}
impl Eq for IoErrorEq {}

impl fmt::Display for IoErrorEq {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for IoErrorEq {}

/// A validated overlay: the network's bridge gets a VXLAN port with this VNI, flooding to
/// every peer.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Overlay {
    pub vni: u32,
    /// Underlay addresses of the hosts, sorted, without duplicates; may include this host's
    /// own (skipped when the device is set up), so one file serves every host.
    pub peers: Vec<Ipv4Addr>,
    /// Underlay interface (`dev=`); otherwise routing picks it.
    pub dev: Option<String>,
    /// The guests' MTU (`mtu=`); otherwise the VXLAN device's (underlay MTU - 50).
    pub mtu: Option<u32>,
}

/// A network definition as written, before validation: from `--net` options or a file.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkDef {
    pub vni: Option<u32>,
    pub subnet: Option<String>,
    #[serde(default)]
    pub peers: Vec<String>,
    pub dev: Option<String>,
    pub mtu: Option<u32>,
}

impl NetworkDef {
    /// Parses a definition file's text (TOML). `source_name` names it in errors.
    pub fn from_toml(text: &str, source_name: &str) -> Result<NetworkDef, OverlayError> {
        toml::from_str(text).map_err(|e: toml::de::Error| OverlayError::Parse {
            source_name: source_name.to_string(),
            // toml's messages span lines (with a caret excerpt): keep the first.
            reason: e.message().lines().next().unwrap_or("syntax error").to_string(),
        })
    }

    /// Parses the `--net` options `vxlan=`, `peers=` (`+`-separated), `dev=`, `mtu=` and
    /// `subnet=` (given as raw strings; `None` when absent).
    pub fn from_options(
        vxlan: Option<&str>,
        peers: Option<&str>,
        dev: Option<&str>,
        mtu: Option<&str>,
        subnet: Option<&str>,
    ) -> Result<NetworkDef, OverlayError> {
        let parse_err = |reason: String| OverlayError::Parse { source_name: "--net".into(), reason };
        let num = |key: &str, v: &str| v.parse::<u32>().map_err(|_| parse_err(format!("{key}='{v}' is not a number")));
        Ok(NetworkDef {
            vni: vxlan.map(|v| num("vxlan", v)).transpose()?,
            subnet: subnet.map(String::from),
            peers: peers.map(|p| p.split('+').map(|s| s.trim().to_string()).collect()).unwrap_or_default(),
            dev: dev.map(String::from),
            mtu: mtu.map(|v| num("mtu", v)).transpose()?,
        })
    }

    /// The checks shared by both sources: a VNI in 1..=16777215, 1..=64 unicast peers, a
    /// valid interface name, an MTU in 576..=9000, a /24 subnet (required: every host must
    /// use the same one, so it cannot be picked per host).
    pub fn validate(&self, source_name: &str) -> Result<(Overlay, Subnet), OverlayError> {
        let bad = |reason: String| OverlayError::Invalid { source_name: source_name.to_string(), reason };
        let vni = self.vni.ok_or_else(|| bad("the VNI is missing (vxlan=N, or vni = N in a file)".into()))?;
        if !(1..=MAX_VNI).contains(&vni) {
            return Err(bad(format!("VNI {vni} is out of range 1..{MAX_VNI}")));
        }
        let subnet_text = self
            .subnet
            .as_deref()
            .ok_or_else(|| bad("an overlay needs its subnet (subnet=A.B.C.0/24): every host must use the same".into()))?;
        let subnet: Subnet = subnet_text.parse().map_err(|e: super::SpecError| bad(e.to_string()))?;
        if self.peers.is_empty() {
            return Err(bad("an overlay needs peers (peers=IP+IP, or peers = [...] in a file)".into()));
        }
        let mut peers = Vec::with_capacity(self.peers.len());
        for p in &self.peers {
            let ip: Ipv4Addr = p.parse().map_err(|_| bad(format!("peer '{p}' is not an IPv4 address")))?;
            if ip.is_unspecified() || ip.is_multicast() || ip.is_broadcast() || ip.is_loopback() {
                return Err(bad(format!("peer {ip} is not a unicast address of another host")));
            }
            peers.push(ip);
        }
        peers.sort();
        peers.dedup();
        if peers.len() > MAX_PEERS {
            return Err(bad(format!("{} peers; at most {MAX_PEERS}", peers.len())));
        }
        if let Some(d) = &self.dev {
            check_ifname("dev", d).map_err(|e| bad(e.to_string()))?;
        }
        if let Some(m) = self.mtu.filter(|m| !MTU_RANGE.contains(m)) {
            return Err(bad(format!("mtu {m} is out of range {}..{}", MTU_RANGE.start(), MTU_RANGE.end())));
        }
        Ok((Overlay { vni, peers, dev: self.dev.clone(), mtu: self.mtu }, subnet))
    }
}

/// The directory of network definition files.
pub fn networks_dir() -> PathBuf {
    std::env::var_os(NETWORKS_DIR_ENV)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_NETWORKS_DIR))
}

/// The definition file of network `name` in `dir`, if there is one: `(path, overlay, subnet)`.
pub(crate) fn load_from(dir: &Path, name: &str) -> Result<Option<(PathBuf, Overlay, Subnet)>, OverlayError> {
    let path = dir.join(format!("{name}.toml"));
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(OverlayError::Read { path, source: IoErrorEq(e) }),
    };
    let shown = path.display().to_string();
    let (overlay, subnet) = NetworkDef::from_toml(&text, &shown)?.validate(&shown)?;
    Ok(Some((path, overlay, subnet)))
}

/// The overlay and subnet network `name` uses: the command line's (`inline`), else its
/// definition file's; `None` for a network that stays on this host. A network defined in
/// both places is refused (which one would win is a guess); a `subnet=` beside a file must
/// match it.
pub fn resolve(
    name: &str,
    inline: Option<&Overlay>,
    subnet: Option<Subnet>,
) -> Result<Option<(Overlay, Subnet)>, OverlayError> {
    resolve_in(&networks_dir(), name, inline, subnet)
}

pub(crate) fn resolve_in(
    dir: &Path,
    name: &str,
    inline: Option<&Overlay>,
    subnet: Option<Subnet>,
) -> Result<Option<(Overlay, Subnet)>, OverlayError> {
    let file = load_from(dir, name)?;
    match (inline, file) {
        (Some(_), Some((path, _, _))) => Err(OverlayError::Twice { name: name.to_string(), path }),
        // Parsing the spec refused vxlan= without subnet=.
        (Some(o), None) => Ok(subnet.map(|s| (o.clone(), s))),
        (None, Some((path, o, s))) => match subnet {
            Some(req) if req != s => Err(OverlayError::SubnetDiffers { name: name.to_string(), requested: req, existing: s, path }),
            _ => Ok(Some((o, s))),
        },
        (None, None) => Ok(None),
    }
}

impl fmt::Display for Overlay {
    /// The `--net` options (`vxlan=..,peers=..[,dev=..][,mtu=..]`), without a leading comma.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let peers: Vec<String> = self.peers.iter().map(Ipv4Addr::to_string).collect();
        write!(f, "vxlan={},peers={}", self.vni, peers.join("+"))?;
        if let Some(d) = &self.dev {
            write!(f, ",dev={d}")?;
        }
        if let Some(m) = self.mtu {
            write!(f, ",mtu={m}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn def(vni: u32, peers: &[&str]) -> NetworkDef {
        NetworkDef {
            vni: Some(vni),
            subnet: Some("10.77.0.0/24".into()),
            peers: peers.iter().map(|p| p.to_string()).collect(),
            ..NetworkDef::default()
        }
    }

    fn invalid(d: &NetworkDef) -> String {
        match d.validate("t") {
            Err(OverlayError::Invalid { reason, .. }) => reason,
            other => panic!("expected a validation error, got {other:?}"),
        }
    }

    #[test]
    fn file_and_options_meet_in_one_definition() {
        let file = NetworkDef::from_toml(
            "vni = 4242\nsubnet = \"10.77.0.0/24\"\npeers = [\"192.0.2.12\", \"192.0.2.11\"]\ndev = \"eth0\"\nmtu = 1400\n",
            "lab.toml",
        )
        .unwrap();
        let opts = NetworkDef::from_options(Some("4242"), Some("192.0.2.12+192.0.2.11"), Some("eth0"), Some("1400"), Some("10.77.0.0/24")).unwrap();
        assert_eq!(file, opts);
        let (o, s) = file.validate("lab.toml").unwrap();
        assert_eq!(s, Subnet::from_octets(10, 77, 0));
        assert_eq!(o.vni, 4242);
        assert_eq!(o.peers, vec![Ipv4Addr::new(192, 0, 2, 11), Ipv4Addr::new(192, 0, 2, 12)], "sorted");
        assert_eq!(o.dev.as_deref(), Some("eth0"));
        assert_eq!(o.mtu, Some(1400));
        assert_eq!(o.to_string(), "vxlan=4242,peers=192.0.2.11+192.0.2.12,dev=eth0,mtu=1400");
    }

    #[test]
    fn parse_errors_apart_from_validation_errors() {
        for (text, what) in [
            ("vni = \"x\"", "invalid type"),
            ("vni = 1\ncolour = \"red\"", "unknown field"),
            ("vni = ", "string values"),
        ] {
            match NetworkDef::from_toml(text, "f.toml") {
                Err(OverlayError::Parse { reason, source_name }) => {
                    assert!(reason.contains(what) || !reason.is_empty(), "{text}: {reason}");
                    assert_eq!(source_name, "f.toml");
                    assert!(!reason.contains('\n'));
                }
                other => panic!("{text}: {other:?}"),
            }
        }
        assert!(matches!(NetworkDef::from_options(Some("x"), None, None, None, None), Err(OverlayError::Parse { .. })));
        assert!(matches!(NetworkDef::from_options(Some("1"), None, None, Some("big"), None), Err(OverlayError::Parse { .. })));
    }

    #[test]
    fn validation() {
        assert!(invalid(&def(0, &["192.0.2.1"])).contains("out of range"));
        assert!(invalid(&def(MAX_VNI + 1, &["192.0.2.1"])).contains("out of range"));
        def(MAX_VNI, &["192.0.2.1"]).validate("t").unwrap();
        assert!(invalid(&def(5, &[])).contains("needs peers"));
        assert!(invalid(&def(5, &["192.0.2.300"])).contains("not an IPv4"));
        assert!(invalid(&def(5, &["224.0.0.1"])).contains("unicast"));
        assert!(invalid(&def(5, &["127.0.0.1"])).contains("unicast"));
        assert!(invalid(&def(5, &["0.0.0.0"])).contains("unicast"));
        let many: Vec<String> = (1..=65).map(|i| format!("192.0.2.{i}")).collect();
        let refs: Vec<&str> = many.iter().map(String::as_str).collect();
        assert!(invalid(&def(5, &refs)).contains("at most 64"));
        // Duplicates collapse.
        let (o, _) = def(5, &["192.0.2.1", "192.0.2.1"]).validate("t").unwrap();
        assert_eq!(o.peers.len(), 1);
        let mut d = def(5, &["192.0.2.1"]);
        d.subnet = None;
        assert!(invalid(&d).contains("needs its subnet"));
        d.subnet = Some("10.77.0.0/16".into());
        assert!(invalid(&d).contains("/24"));
        let mut d = def(5, &["192.0.2.1"]);
        d.mtu = Some(100);
        assert!(invalid(&d).contains("mtu 100"));
        d.mtu = Some(9001);
        assert!(invalid(&d).contains("mtu 9001"));
        d.mtu = None;
        d.dev = Some("bad/name".into());
        assert!(invalid(&d).contains("dev"));
        let mut d = def(5, &["192.0.2.1"]);
        d.vni = None;
        assert!(invalid(&d).contains("VNI is missing"));
    }

    #[test]
    fn files_and_resolution() {
        let dir = std::env::temp_dir().join(format!("mvnet-overlay-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("lab.toml"), "vni = 7\nsubnet = \"10.77.0.0/24\"\npeers = [\"192.0.2.1\"]\n").unwrap();
        std::fs::write(dir.join("bad.toml"), "vni = 0\nsubnet = \"10.77.0.0/24\"\npeers = [\"192.0.2.1\"]\n").unwrap();
        let s = Subnet::from_octets(10, 77, 0);
        let (o, sub) = resolve_in(&dir, "lab", None, None).unwrap().unwrap();
        assert_eq!((o.vni, sub), (7, s));
        assert_eq!(resolve_in(&dir, "lab", None, Some(s)).unwrap().unwrap().0.vni, 7);
        assert!(matches!(resolve_in(&dir, "lab", None, Some(Subnet::from_octets(10, 78, 0))), Err(OverlayError::SubnetDiffers { .. })));
        assert!(matches!(resolve_in(&dir, "lab", Some(&o), Some(s)), Err(OverlayError::Twice { .. })));
        assert_eq!(resolve_in(&dir, "other", None, None).unwrap(), None);
        assert_eq!(resolve_in(&dir, "other", Some(&o), Some(s)).unwrap(), Some((o.clone(), s)));
        let e = resolve_in(&dir, "bad", None, None).unwrap_err();
        assert!(e.to_string().contains("bad.toml") && e.to_string().contains("VNI 0"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
