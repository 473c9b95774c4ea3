//! Named networks (`nat:NAME`, `host-only:NAME`): the bridge, its gateway address, NAT
//! rules, DHCP, and the shared, refcounted state that lets several microvm processes use one
//! network. Everything runs under the namespace-wide state lock.

mod cleanup;
pub(crate) mod overlay;
mod pick;
mod pool;
mod probe;

use std::io;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

pub use cleanup::{cleanup_stale, teardown_all};
pub(crate) use cleanup::{delete_created_tap, leave_network};

use crate::bridge::{Link, Rtnl};
use crate::dhcp::{self, DhcpNetwork, DhcpRegistration};
use crate::emergency::{self, Tracked};
use crate::nft::{self, guard, NftNetwork};
use crate::spec::{MacAddr, NetMode, NetSpec, Overlay, OverlayError, Subnet, BRIDGE_PREFIX};
use crate::state::{self, NetKind, NetworkRecord, StateRoot, UserEntry};
use crate::tap::{self, Tap, TapError};
use crate::{BridgeError, NetError};
use pick::Taken;

/// Errors setting up a named network.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("subnet {subnet} for network {name} collides with {with}")]
    SubnetInUse { name: String, subnet: Subnet, with: String },
    #[error("no free subnet in 10.200.0.0/16 for network {name}; pass subnet=A.B.C.0/24")]
    NoFreeSubnet { name: String },
    #[error("network {name}: the host has no IPv4 default route to masquerade through; pass uplink=IFACE")]
    NoDefaultRoute { name: String },
    #[error("network {name} already exists as {existing}, not {requested}")]
    ModeMismatch { name: String, existing: &'static str, requested: &'static str },
    #[error("network {name} already exists with subnet {existing}, not {requested}")]
    SubnetMismatch { name: String, existing: Subnet, requested: Subnet },
    #[error("network {name} already exists with uplink {existing}, not {requested}")]
    UplinkMismatch { name: String, existing: String, requested: String },
    #[error("network {name} already exists {existing} allow-host; its VMs must all ask the same (it is a property of the network)")]
    AllowHostMismatch { name: String, existing: &'static str },
    #[error("network {name} has no free address for MAC {mac}: all of .2-.254 are leased")]
    PoolFull { name: String, mac: MacAddr },
    #[error("MAC {mac} is already in use on network {name} (by microvm pid {pid}; two restores of one snapshot at once? give each NIC its own mac=, or run them on different networks)")]
    MacInUse { name: String, mac: MacAddr, pid: u32 },
    #[error("cannot update the DHCP leases of network {name}")]
    Leases {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("network {name} is in use but its bridge {bridge} is gone; stop its VMs or delete {bridge}'s state")]
    BridgeMissing { name: String, bridge: String },
    #[error("cannot enable IPv4 forwarding (net.ipv4.ip_forward)")]
    IpForward(#[source] io::Error),
    #[error("cannot turn IPv6 off on {bridge}")]
    Ipv6Off {
        bridge: String,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Overlay(#[from] OverlayError),
    #[error("network {name} already exists with {existing}, not {requested}; every VM of a network on a host must use one definition")]
    OverlayMismatch { name: String, existing: String, requested: String },
    #[error("network {name} is in use but its VXLAN device {port} is gone; stop its VMs")]
    PortMissing { name: String, port: String },
    #[error("cannot probe the overlay of network {name} for addresses in use")]
    Probe {
        name: String,
        #[source]
        source: io::Error,
    },
}

impl NetworkError {
    pub fn is_bad_input(&self) -> bool {
        !matches!(
            self,
            NetworkError::BridgeMissing { .. }
                | NetworkError::PortMissing { .. }
                | NetworkError::Probe { .. }
                | NetworkError::IpForward(_)
                | NetworkError::Ipv6Off { .. }
                | NetworkError::Leases { .. }
        )
    }
}

/// Name of the bridge of network `name`.
pub(crate) fn bridge_name(name: &str) -> String {
    format!("{BRIDGE_PREFIX}{name}")
}

fn need_net_admin(mode: &'static str) -> Result<(), NetError> {
    if crate::caps::has_net_admin() {
        Ok(())
    } else {
        Err(NetError::NotPermitted { mode })
    }
}

/// Read-only checks behind [`NetSpec::validate`].
pub(crate) fn preflight(spec: &NetSpec) -> Result<(), NetError> {
    match &spec.mode {
        NetMode::None => Ok(()),
        _ => preflight_with(spec, &Rtnl::new()?),
    }
}

/// [`preflight`] over an open netlink connection.
pub(crate) fn preflight_with(spec: &NetSpec, rtnl: &Rtnl) -> Result<(), NetError> {
    match &spec.mode {
        NetMode::None => Ok(()),
        NetMode::Tap { name } => check_existing_tap(rtnl, name),
        NetMode::Bridge { bridge, vlan } => {
            need_net_admin("bridge=BR")?;
            rtnl.existing_bridge(bridge)?;
            if vlan.is_some() {
                rtnl.vlan_ready_bridge(bridge)?;
            }
            Ok(())
        }
        NetMode::Nat { name, subnet, uplink, tap, overlay, .. } => {
            need_net_admin("nat")?;
            if let Some(u) = uplink {
                if rtnl.link(u)?.is_none() {
                    return Err(BridgeError::NoSuchInterface { name: u.clone() }.into());
                }
            }
            check_overlay(rtnl, name, overlay.as_ref(), *subnet)?;
            check_free_name(rtnl, tap.as_deref())
        }
        NetMode::HostOnly { name, subnet, tap, overlay, .. } => {
            need_net_admin("host-only")?;
            check_overlay(rtnl, name, overlay.as_ref(), *subnet)?;
            check_free_name(rtnl, tap.as_deref())
        }
    }
}

/// The overlay a named network uses (inline or from its definition file; see
/// [`crate::spec::overlay::resolve`]) and its subnet.
pub(crate) fn resolve_overlay(name: &str, inline: Option<&Overlay>, subnet: Option<Subnet>) -> Result<Option<(Overlay, Subnet)>, NetError> {
    Ok(crate::spec::overlay::resolve(name, inline, subnet).map_err(NetworkError::Overlay)?)
}

/// The definition resolves, and its underlay interface exists.
fn check_overlay(rtnl: &Rtnl, name: &str, inline: Option<&Overlay>, subnet: Option<Subnet>) -> Result<(), NetError> {
    if let Some((o, _)) = resolve_overlay(name, inline, subnet)? {
        if let Some(d) = &o.dev {
            if rtnl.link(d)?.is_none() {
                return Err(BridgeError::NoSuchInterface { name: d.clone() }.into());
            }
        }
    }
    Ok(())
}

fn check_free_name(rtnl: &Rtnl, tap: Option<&str>) -> Result<(), NetError> {
    match tap {
        Some(t) if rtnl.link(t)?.is_some() => Err(TapError::NameTaken { name: t.to_string() }.into()),
        _ => Ok(()),
    }
}

/// The existing TAP `name`, or NotFound / NotTap.
pub(crate) fn check_existing_tap(rtnl: &Rtnl, name: &str) -> Result<(), NetError> {
    match rtnl.link(name)? {
        Some(l) if l.is_tun() => Ok(()),
        Some(_) => Err(TapError::NotTap { name: name.to_string() }.into()),
        None => Err(TapError::NotFound { name: name.to_string() }.into()),
    }
}

/// Deletes a TAP we created if it still exists after its fd closed (e.g. the fd was
/// duplicated, or leaked into another process): by [`TapCleanup::release`], or on drop as
/// a fallback (e.g. rollback of a failed attach). Keeps the TAP in the emergency registry
/// until then. Uses the attachment's netlink connection.
#[derive(Debug)]
pub(crate) struct TapCleanup {
    rtnl: Arc<Rtnl>,
    name: String,
    /// A name of ours (`mvtap-...`), not one the user gave: such a TAP may be pooled.
    generated: bool,
    tracked: Option<Tracked>,
}

impl TapCleanup {
    pub fn release(mut self) -> Result<(), NetError> {
        let rtnl = self.rtnl.clone();
        self.delete(&rtnl)
    }

    /// Like [`TapCleanup::release`], on a netlink connection of its own, for a thread that
    /// runs beside another user of the attachment's: a link deletion blocks its connection
    /// (the kernel answers only after its RCU barrier, 20-50 ms), and the two would queue
    /// behind each other on a shared one.
    pub fn release_alone(mut self) -> Result<(), NetError> {
        match Rtnl::new() {
            Ok(own) => self.delete(&own),
            Err(_) => self.release(),
        }
    }

    /// The TAP was pooled: it is no longer this process's to delete.
    fn keep(&mut self) {
        self.tracked = None;
    }

    fn delete(&mut self, rtnl: &Rtnl) -> Result<(), NetError> {
        let Some(tracked) = self.tracked.take() else {
            return Ok(());
        };
        let res = delete_created_tap(rtnl, &self.name);
        tracing::debug!(tap = %self.name, "TAP and its guard deleted");
        drop(tracked);
        res
    }
}

impl Drop for TapCleanup {
    fn drop(&mut self) {
        let rtnl = self.rtnl.clone();
        if let Err(e) = self.delete(&rtnl) {
            tracing::warn!(tap = %self.name, error = %e, "cannot delete TAP device");
        }
    }
}

static TAP_COUNTER: AtomicU32 = AtomicU32::new(0);

/// Creates a TAP: `explicit` name or a fresh `mvtap-<pid>-<n>`; refuses names in use.
/// Its anti-spoofing guard (see [`guard`]) is installed before it is returned, so the TAP
/// never forwards unguarded frames: only `mac` may send, and with `ip`, only as `ip`.
pub(crate) fn create_tap(
    rtnl: &Arc<Rtnl>,
    explicit: Option<&str>,
    mac: MacAddr,
    ip: Option<std::net::Ipv4Addr>,
) -> Result<(Tap, TapCleanup), NetError> {
    let name = match explicit {
        Some(n) => {
            check_free_name(rtnl, Some(n))?;
            n.to_string()
        }
        None => {
            let pid = std::process::id();
            let mut found = None;
            for _ in 0..1000 {
                let n = TAP_COUNTER.fetch_add(1, Ordering::Relaxed);
                let candidate = tap::tap_name_for(pid, n);
                if candidate.len() <= 15 && rtnl.link(&candidate)?.is_none() {
                    found = Some(candidate);
                    break;
                }
            }
            found.ok_or(TapError::NoFreeName)?
        }
    };
    let tracked = emergency::track_tap(&name);
    let tap = Tap::create(&name)?;
    // From here the cleanup (also on error) deletes the TAP and then its guard.
    let cleanup = TapCleanup { rtnl: rtnl.clone(), name, generated: explicit.is_none(), tracked: Some(tracked) };
    guard::add(&guard::Guard { tap: cleanup.name.clone(), mac, ip })?;
    Ok((tap, cleanup))
}

/// This process's membership in a named network: its user entry. Ended by
/// [`Membership::release`] (or on drop, as a fallback), which removes the entry and tears
/// the network down if no live user remains.
#[derive(Debug)]
pub(crate) struct Membership {
    rtnl: Arc<Rtnl>,
    root: StateRoot,
    name: String,
    entry: UserEntry,
    /// Some until left; keeps the network in the emergency registry.
    tracked: Option<Tracked>,
}

impl Membership {
    pub fn release(mut self) -> Result<(), NetError> {
        self.leave()
    }

    /// Leaves the network, putting `tap` in its pool (see [`pool`]) rather than deleting it,
    /// if the network stays (another live user), the TAP's name is ours and the pool has
    /// room. True if so: the membership has ended and `cleanup` is disarmed, and closing
    /// `tap` is then cheap. False (logged if by an error) leaves both as they were, for
    /// [`Membership::release`] and [`TapCleanup`] to end as usual.
    pub fn leave_pooling(&mut self, tap: &Tap, cleanup: &mut TapCleanup) -> bool {
        if self.tracked.is_none() || cleanup.tracked.is_none() || !cleanup.generated || cleanup.name != tap.name() {
            return false;
        }
        let res = (|| -> Result<bool, NetError> {
            let _lock = self.root.lock()?;
            if self.root.read_record(&self.name)?.is_none() {
                return Ok(false);
            }
            let mut users = self.root.read_users(&self.name)?;
            if !users.iter().any(|u| !u.same_nic(&self.entry) && u.alive()) {
                return Ok(false);
            }
            // Out of the users first: should pooling fail, the usual leave finds it done.
            users.retain(|u| !u.same_nic(&self.entry));
            self.root.write_users(&self.name, &users)?;
            pool::put(&self.root, &self.rtnl, &self.name, tap)
        })();
        match res {
            Ok(true) => {
                cleanup.keep();
                self.tracked = None;
                true
            }
            Ok(false) => false,
            Err(e) => {
                tracing::warn!(network = %self.name, tap = tap.name(), error = %e, "cannot pool the TAP; deleting it");
                false
            }
        }
    }

    fn leave(&mut self) -> Result<(), NetError> {
        let Some(tracked) = self.tracked.take() else {
            return Ok(());
        };
        let res = (|| {
            let _lock = self.root.lock()?;
            leave_network(&self.root, &self.rtnl, &self.name, |u| u.same_nic(&self.entry))
        })();
        drop(tracked);
        res
    }
}

impl Drop for Membership {
    fn drop(&mut self) {
        if let Err(e) = self.leave() {
            tracing::warn!(network = %self.name, error = %e, "cannot release network");
        }
    }
}

/// Undoes a network created by this call unless committed.
struct NewNetworkGuard<'a> {
    root: &'a StateRoot,
    rtnl: &'a Rtnl,
    name: String,
    armed: bool,
}

impl Drop for NewNetworkGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            tracing::info!(network = %self.name, "rolling back network setup");
            if let Err(e) = cleanup::teardown_network(self.root, self.rtnl, &self.name) {
                tracing::warn!(network = %self.name, error = %e, "rollback incomplete");
            }
        }
    }
}

/// Everything `attach` gets from joining a named network.
#[derive(Debug)]
pub(crate) struct Joined {
    pub dhcp: DhcpRegistration,
    pub tap: Tap,
    pub tap_cleanup: TapCleanup,
    pub membership: Membership,
    pub subnet: Subnet,
    pub bridge: String,
    /// The guest's address (its lease).
    pub ip: std::net::Ipv4Addr,
}

/// What the spec asks of a named network.
pub(crate) struct JoinRequest<'a> {
    pub kind: NetKind,
    pub name: &'a str,
    pub subnet: Option<Subnet>,
    pub uplink: Option<&'a str>,
    pub tap: Option<&'a str>,
    pub mac: MacAddr,
    pub vm_id: &'a str,
    pub allow_host: bool,
    /// Resolved: inline or from the network's definition file (whose subnet is in `subnet`).
    pub overlay: Option<&'a Overlay>,
    /// The address to give the guest if no live VM holds it: a restored guest's, which it
    /// still has configured (see `dhcp::lease_for`).
    pub want_ip: Option<std::net::Ipv4Addr>,
}

/// Joins (creating if needed) a named network and plugs a new TAP into it, over the
/// attachment's netlink connection `rtnl`.
pub(crate) fn join(req: &JoinRequest<'_>, rtnl: &Arc<Rtnl>) -> Result<Joined, NetError> {
    need_net_admin(req.kind.as_str())?;
    let root = StateRoot::open()?;
    // Before anything exists: a panic from here on finds this network in the registry.
    let tracked = emergency::track_network(&root, req.name);
    let _lock = root.lock()?;
    let bridge = bridge_name(req.name);

    let live = cleanup::prune_users(&root, rtnl, req.name)?;
    if live.is_empty() && root.read_record(req.name).ok().flatten().is_some() {
        tracing::info!(network = req.name, "removing leftovers of a network without live users");
        if let Err(e) = cleanup::teardown_network(&root, rtnl, req.name) {
            tracing::warn!(network = req.name, error = %e, "leftovers not fully removed");
        }
    }
    // Two NICs with one MAC on one bridge would steal each other's frames (e.g. two
    // restores of one snapshot at once): the second is refused.
    if let Some(u) = live.iter().find(|u| u.mac == Some(req.mac)) {
        return Err(NetworkError::MacInUse { name: req.name.to_string(), mac: req.mac, pid: u.pid }.into());
    }
    let mut guard = NewNetworkGuard { root: &root, rtnl, name: req.name.to_string(), armed: false };
    let (record, br) = match root.read_record(req.name)? {
        Some(rec) => {
            check_same(req, &rec)?;
            let br = match rtnl.link(&bridge)? {
                Some(l) if l.is_bridge() => l,
                _ => return Err(NetworkError::BridgeMissing { name: req.name.to_string(), bridge }.into()),
            };
            if rec.overlay.is_some() && !rtnl.link(&overlay::vxlan_name(req.name))?.is_some_and(|l| l.is_vxlan()) {
                let port = overlay::vxlan_name(req.name);
                return Err(NetworkError::PortMissing { name: req.name.to_string(), port }.into());
            }
            nft::ensure_network(&nft_network(req.name, &rec))?;
            (rec, br)
        }
        None => {
            guard.armed = true;
            create_network(&root, rtnl, req, &bridge)?
        }
    };

    let dhcp_net = DhcpNetwork {
        name: req.name.to_string(),
        bridge: bridge.clone(),
        subnet: record.subnet,
        lease_path: root.net_dir(req.name).join("leases"),
        offer_dns: record.kind == NetKind::Nat,
        overlay_mtu: record.overlay.as_ref().map(|_| u16::try_from(record.guest_mtu.unwrap_or(1450)).unwrap_or(u16::MAX)),
    };
    // On an overlay, other hosts' guests hold addresses this host's lease file does not know:
    // a new address is probed for on the overlay first (see `probe`).
    let prober = match &record.overlay {
        Some(_) => {
            let port = overlay::vxlan_name(req.name);
            let link = rtnl.link(&port)?.ok_or_else(|| NetworkError::PortMissing { name: req.name.to_string(), port })?;
            let probe_err = |source| NetworkError::Probe { name: req.name.to_string(), source };
            Some(probe::Prober::open(link.index, link.mac.unwrap_or_default()).map_err(probe_err)?)
        }
        None => None,
    };
    let in_use = |ip| {
        prober.as_ref().is_some_and(|p| {
            let taken = p.in_use(ip).unwrap_or_else(|e| {
                tracing::warn!(network = req.name, %ip, error = %e, "ARP probe failed; taking the address");
                false
            });
            if taken {
                tracing::info!(network = req.name, %ip, "address in use on another host; trying the next");
            }
            taken
        })
    };
    // The guest's address, allocated now so the anti-spoofing guard can name it; the DHCP
    // server hands out the same one (a MAC keeps its lease, see dhcp::lease).
    let live_macs: Vec<MacAddr> = live.iter().filter_map(|u| u.mac).collect();
    let ip = dhcp::lease_for(&dhcp_net, req.mac, req.want_ip, &live_macs, in_use)
        .map_err(|source| NetworkError::Leases { name: req.name.to_string(), source })?
        .ok_or_else(|| NetworkError::PoolFull { name: req.name.to_string(), mac: req.mac })?;
    drop(prober);
    // A pooled TAP if there is one (it is on the bridge already), else a new one.
    let pooled = match req.tap {
        None => pool::take(&root, rtnl, req.name, req.mac, ip)?,
        Some(_) => None,
    };
    let (tap, tap_cleanup) = match pooled {
        Some(t) => t,
        None => create_tap(rtnl, req.tap, req.mac, Some(ip))?,
    };
    rtnl.set_master(tap.index(), tap.name(), br.index)?;
    let dhcp = dhcp::register(&dhcp_net, req.mac)?;
    let (pid, start) = state::self_identity();
    let entry = UserEntry { pid, start, tap: tap.name().to_string(), vm_id: req.vm_id.to_string(), mac: Some(req.mac) };
    let mut users = root.read_users(req.name)?;
    users.push(entry.clone());
    root.write_users(req.name, &users)?;
    guard.armed = false;
    drop(guard);
    tracing::info!(network = req.name, tap = tap.name(), mac = %req.mac, %ip, subnet = %record.subnet, "joined network");
    Ok(Joined {
        dhcp,
        tap,
        tap_cleanup,
        membership: Membership { rtnl: rtnl.clone(), root: root.clone(), name: req.name.to_string(), entry, tracked: Some(tracked) },
        subnet: record.subnet,
        bridge,
        ip,
    })
}

/// An existing network must match what the spec asks for explicitly.
fn check_same(req: &JoinRequest<'_>, rec: &NetworkRecord) -> Result<(), NetworkError> {
    let name = req.name.to_string();
    if rec.kind != req.kind {
        return Err(NetworkError::ModeMismatch { name, existing: rec.kind.as_str(), requested: req.kind.as_str() });
    }
    if let Some(s) = req.subnet.filter(|s| *s != rec.subnet) {
        return Err(NetworkError::SubnetMismatch { name, existing: rec.subnet, requested: s });
    }
    if let (Some(want), Some(have)) = (req.uplink, rec.uplink.as_deref()) {
        if want != have {
            return Err(NetworkError::UplinkMismatch { name, existing: have.to_string(), requested: want.to_string() });
        }
    }
    // Unlike subnet=, leaving allow-host out is a choice too (no host access): a VM must not
    // silently join a network that opens the host, nor open it for VMs that did not ask.
    if req.allow_host != rec.allow_host {
        let existing = if rec.allow_host { "with" } else { "without" };
        return Err(NetworkError::AllowHostMismatch { name, existing });
    }
    // Like subnet=: a VM that names no overlay joins whatever the network is.
    if let Some(want) = req.overlay {
        if rec.overlay.as_ref() != Some(want) {
            let existing = rec.overlay.as_ref().map_or_else(|| "no overlay".to_string(), Overlay::to_string);
            return Err(NetworkError::OverlayMismatch { name, existing, requested: want.to_string() });
        }
    }
    Ok(())
}

/// The nftables view of a network record.
fn nft_network(name: &str, rec: &NetworkRecord) -> NftNetwork {
    NftNetwork {
        name: name.to_string(),
        bridge: bridge_name(name),
        subnet: rec.subnet,
        uplink: rec.uplink.clone(),
        allow_host: rec.allow_host,
        dns: if rec.kind == NetKind::Nat { dhcp::host_dns() } else { Vec::new() },
    }
}

/// Turns IPv6 off on a bridge, so guests cannot reach the host over IPv6 (our rules are
/// IPv4 only). A kernel without IPv6 has nothing to turn off.
fn disable_ipv6(bridge: &str) -> Result<(), NetworkError> {
    let path = format!("/proc/sys/net/ipv6/conf/{bridge}/disable_ipv6");
    match std::fs::write(&path, "1") {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(NetworkError::Ipv6Off { bridge: bridge.to_string(), source: e }),
        _ => Ok(()),
    }
}

/// Creates bridge, gateway address, forwarding, nft rules and the state record.
/// On error the caller's guard tears down whatever exists.
fn create_network(
    root: &StateRoot,
    rtnl: &Rtnl,
    req: &JoinRequest<'_>,
    bridge: &str,
) -> Result<(NetworkRecord, Link), NetError> {
    // A bridge without a state record is a leftover of a crash: recreate it from scratch.
    if let Some(old) = rtnl.link(bridge)? {
        if old.is_bridge() {
            tracing::warn!(bridge, "deleting stale bridge without state");
            rtnl.delete_link(old.index, bridge)?;
        } else {
            return Err(BridgeError::NameInUse { name: bridge.to_string() }.into());
        }
    }
    let taken = taken_space(root, rtnl, req.name)?;
    let subnet = match req.subnet {
        Some(s) => {
            if let Some(hit) = pick::collision(s, &taken) {
                return Err(NetworkError::SubnetInUse { name: req.name.to_string(), subnet: s, with: hit.what.clone() }.into());
            }
            s
        }
        None => pick::pick(&taken).ok_or_else(|| NetworkError::NoFreeSubnet { name: req.name.to_string() })?,
    };
    let uplink = match req.kind {
        NetKind::HostOnly => None,
        NetKind::Nat => Some(find_uplink(rtnl, req)?),
    };
    let mut record =
        NetworkRecord { kind: req.kind, subnet, uplink, allow_host: req.allow_host, overlay: req.overlay.cloned(), guest_mtu: None };
    // Write the record first so a crash mid-setup leaves something cleanup can find.
    root.write_record(req.name, &record)?;
    // An overlay's bridge is the distributed gateway: the same MAC on every host.
    let index = rtnl.create_bridge(bridge, req.overlay.map(|_| overlay::gateway_mac(req.name).0))?;
    rtnl.add_address(index, bridge, subnet.gateway(), Subnet::PREFIX_LEN)?;
    if !record.allow_host {
        disable_ipv6(bridge)?;
    }
    rtnl.set_up(index, bridge)?;
    if record.kind == NetKind::Nat {
        // Not reverted at teardown: other software may rely on it and we cannot know
        // whether it was on before.
        std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").map_err(NetworkError::IpForward)?;
    }
    nft::add_network(&nft_network(req.name, &record))?;
    if let Some(o) = req.overlay {
        record.guest_mtu = Some(overlay::add_port(rtnl, req.name, index, o, subnet)?);
        root.write_record(req.name, &record)?;
    }
    let link = rtnl
        .link(bridge)?
        .ok_or_else(|| NetworkError::BridgeMissing { name: req.name.to_string(), bridge: bridge.to_string() })?;
    tracing::info!(network = req.name, bridge, %subnet, kind = record.kind.as_str(), "created network");
    Ok((record, link))
}

/// The uplink: `uplink=` (must exist) or the default route's interface.
fn find_uplink(rtnl: &Rtnl, req: &JoinRequest<'_>) -> Result<String, NetError> {
    if let Some(u) = req.uplink {
        return match rtnl.link(u)? {
            Some(_) => Ok(u.to_string()),
            None => Err(BridgeError::NoSuchInterface { name: u.to_string() }.into()),
        };
    }
    let oif = rtnl
        .default_route_oif()?
        .ok_or_else(|| NetworkError::NoDefaultRoute { name: req.name.to_string() })?;
    let link = rtnl
        .link_by_index(oif)?
        .ok_or_else(|| NetworkError::NoDefaultRoute { name: req.name.to_string() })?;
    // Kernel names may hold characters we refuse to put in nft rules.
    crate::spec::check_ifname("uplink", &link.name)?;
    Ok(link.name)
}

/// Address space used on the host: routes, addresses, and other microvm networks.
fn taken_space(root: &StateRoot, rtnl: &Rtnl, own: &str) -> Result<Vec<Taken>, NetError> {
    let links = rtnl.links()?;
    let name_of = |idx: Option<u32>| {
        idx.and_then(|i| links.iter().find(|l| l.index == i)).map_or_else(|| "?".to_string(), |l| l.name.clone())
    };
    let mut taken = Vec::new();
    for r in rtnl.ipv4_routes()? {
        taken.push(Taken { net: r.dst, what: format!("route {} dev {}", r.dst, name_of(r.oif)) });
    }
    for (idx, net) in rtnl.ipv4_addresses()? {
        taken.push(Taken { net: net.trunc(), what: format!("address {net} on {}", name_of(Some(idx))) });
    }
    for other in root.networks()? {
        if other == own {
            continue;
        }
        if let Ok(Some(rec)) = root.read_record(&other) {
            taken.push(Taken { net: rec.subnet.as_net(), what: format!("microvm network {other}") });
        }
    }
    Ok(taken)
}
