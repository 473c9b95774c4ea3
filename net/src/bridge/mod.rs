//! Links, addresses and routes over rtnetlink (the `rtnetlink` crate, driven by a private
//! current-thread tokio runtime so callers stay synchronous). No `ip` commands.
//! VXLAN devices, bridge FDB entries and port VLANs are in [`overlay`].

mod overlay;
pub(crate) mod watch;

pub(crate) use overlay::VxlanParams;

use std::io;
use std::net::{IpAddr, Ipv4Addr};

use futures_util::stream::TryStreamExt;
use ipnet::Ipv4Net;
use rtnetlink::packet_route::address::AddressAttribute;
use netlink_packet_core::Nla;
use rtnetlink::packet_route::link::{InfoData, InfoKind, LinkAttribute, LinkFlags, LinkInfo, LinkMessage};
use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute, RouteMessage, RouteType};
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::{LinkBridge, LinkUnspec, RouteMessageBuilder};

/// `IFLA_TUN_PERSIST` in a tun device's IFLA_INFO_DATA (linux/if_link.h).
const IFLA_TUN_PERSIST: u16 = 6;

/// Kernel routing table numbers (linux/rtnetlink.h).
const RT_TABLE_MAIN: u32 = 254;
const RT_TABLE_LOCAL: u32 = 255;

/// Errors from link/address/route operations.
#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    #[error("cannot open a netlink socket")]
    Connect(#[source] io::Error),
    #[error("cannot start the netlink runtime")]
    Runtime(#[source] io::Error),
    #[error("cannot {action} {name}")]
    Op {
        action: &'static str,
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("bridge {name} does not exist")]
    NoSuchBridge { name: String },
    #[error("interface {name} exists but is not a bridge")]
    NotABridge { name: String },
    #[error("interface {name} does not exist")]
    NoSuchInterface { name: String },
    #[error("interface name {name} is already in use")]
    NameInUse { name: String },
    #[error("bridge {name} does not filter VLANs, so vlan= cannot isolate; enable it with: ip link set {name} type bridge vlan_filtering 1")]
    NoVlanFiltering { name: String },
    #[error("bridge {name} cannot filter VLANs: this kernel lacks CONFIG_BRIDGE_VLAN_FILTERING, so vlan= is unavailable")]
    NoKernelVlanFiltering { name: String },
}

impl BridgeError {
    /// True when the user can fix it by changing `--net` or privileges.
    pub fn is_bad_input(&self) -> bool {
        match self {
            BridgeError::NoSuchBridge { .. }
            | BridgeError::NotABridge { .. }
            | BridgeError::NoSuchInterface { .. }
            | BridgeError::NameInUse { .. }
            | BridgeError::NoVlanFiltering { .. }
            | BridgeError::NoKernelVlanFiltering { .. } => true,
            BridgeError::Op { source, .. } => source.kind() == io::ErrorKind::PermissionDenied,
            _ => false,
        }
    }
}

/// Converts an rtnetlink error into an `io::Error` carrying the kernel errno when there is
/// one (so messages read "File exists (os error 17)"), else wrapping it whole.
fn to_io(e: rtnetlink::Error) -> io::Error {
    match e {
        rtnetlink::Error::NetlinkError(msg) => msg.to_io(),
        other => io::Error::other(other),
    }
}

fn op<'a>(action: &'static str, name: &'a str) -> impl FnOnce(rtnetlink::Error) -> BridgeError + 'a {
    move |e| BridgeError::Op { action, name: name.to_string(), source: to_io(e) }
}

/// What we need to know about a link.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Link {
    pub index: u32,
    pub name: String,
    /// `linkinfo` kind, e.g. "bridge", "tun", "veth".
    pub kind: Option<String>,
    pub master: Option<u32>,
    pub up: bool,
    pub mtu: Option<u32>,
    pub mac: Option<[u8; 6]>,
    /// For a tun/tap device: whether it is persistent (IFLA_TUN_PERSIST).
    pub tun_persist: Option<bool>,
}

impl Link {
    fn from_msg(msg: &LinkMessage) -> Link {
        let mut link = Link {
            index: msg.header.index,
            name: String::new(),
            kind: None,
            master: None,
            up: msg.header.flags.contains(LinkFlags::Up),
            mtu: None,
            mac: None,
            tun_persist: None,
        };
        for attr in &msg.attributes {
            match attr {
                LinkAttribute::IfName(n) => link.name = n.clone(),
                LinkAttribute::Controller(m) => link.master = Some(*m),
                LinkAttribute::Mtu(m) => link.mtu = Some(*m),
                LinkAttribute::Address(a) => link.mac = a.as_slice().try_into().ok(),
                LinkAttribute::LinkInfo(infos) => {
                    for info in infos {
                        match info {
                            LinkInfo::Kind(kind) => link.kind = Some(kind_name(kind)),
                            LinkInfo::Data(InfoData::Tun(nlas)) => {
                                // The crate leaves tun attributes raw: a u8 flag.
                                link.tun_persist = nlas.iter().find(|n| n.kind() == IFLA_TUN_PERSIST).map(|n| {
                                    let mut v = [0u8; 1];
                                    if n.value_len() == 1 {
                                        n.emit_value(&mut v);
                                    }
                                    v[0] != 0
                                });
                            }
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        link
    }

    pub fn is_bridge(&self) -> bool {
        self.kind.as_deref() == Some("bridge")
    }

    pub fn is_tun(&self) -> bool {
        self.kind.as_deref() == Some("tun")
    }

    pub fn is_vxlan(&self) -> bool {
        self.kind.as_deref() == Some("vxlan")
    }
}

fn kind_name(kind: &InfoKind) -> String {
    match kind {
        InfoKind::Bridge => "bridge".into(),
        InfoKind::Tun => "tun".into(),
        InfoKind::Veth => "veth".into(),
        InfoKind::Vxlan => "vxlan".into(),
        other => format!("{other:?}").to_ascii_lowercase(),
    }
}

/// An IPv4 route, reduced to what collision checks need.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Route {
    pub dst: Ipv4Net,
    pub oif: Option<u32>,
    pub table: u32,
    pub priority: u32,
}

/// A netlink route socket plus the runtime that drives it. Cheap enough to make per call site.
/// Also usable when the caller itself runs inside a tokio runtime: requests are then driven
/// from a scoped helper thread (tokio forbids nested `block_on`), and the runtime is shut
/// down in the background on drop (dropping it in an async context would panic).
pub(crate) struct Rtnl {
    rt: Option<tokio::runtime::Runtime>,
    handle: rtnetlink::Handle,
}

impl std::fmt::Debug for Rtnl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Rtnl")
    }
}

impl Drop for Rtnl {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

impl Rtnl {
    /// Opens a socket in the calling thread's network namespace.
    pub fn new() -> Result<Rtnl, BridgeError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .map_err(BridgeError::Runtime)?;
        let (conn, handle, _) = {
            let _guard = rt.enter();
            rtnetlink::new_connection().map_err(BridgeError::Connect)?
        };
        rt.spawn(conn);
        Ok(Rtnl { rt: Some(rt), handle })
    }

    /// Runs a netlink request to completion.
    fn run<T: Send>(
        &self,
        fut: impl std::future::Future<Output = Result<T, rtnetlink::Error>> + Send,
    ) -> Result<T, rtnetlink::Error> {
        let Some(rt) = self.rt.as_ref() else {
            return Err(rtnetlink::Error::RequestFailed);
        };
        if tokio::runtime::Handle::try_current().is_err() {
            return rt.block_on(fut);
        }
        std::thread::scope(|s| match s.spawn(|| rt.block_on(fut)).join() {
            Ok(res) => res,
            Err(panic) => std::panic::resume_unwind(panic),
        })
    }

    /// All links.
    pub fn links(&self) -> Result<Vec<Link>, BridgeError> {
        let msgs: Vec<LinkMessage> = self.run(self.handle.link().get().execute().try_collect())
            .map_err(op("list", "links"))?;
        Ok(msgs.iter().map(Link::from_msg).collect())
    }

    /// The link called `name`, if any.
    pub fn link(&self, name: &str) -> Result<Option<Link>, BridgeError> {
        let res: Result<Vec<LinkMessage>, _> = self.run(self.handle.link().get().match_name(name.to_string()).execute().try_collect());
        match res {
            Ok(msgs) => Ok(msgs.first().map(Link::from_msg)),
            Err(rtnetlink::Error::NetlinkError(m))
                if m.raw_code().abs() == libc::ENODEV || m.raw_code().abs() == libc::ENOENT =>
            {
                Ok(None)
            }
            Err(e) => Err(op("look up interface", name)(e)),
        }
    }

    /// The link with index `index`, if any.
    pub fn link_by_index(&self, index: u32) -> Result<Option<Link>, BridgeError> {
        Ok(self.links()?.into_iter().find(|l| l.index == index))
    }

    /// The existing bridge `name`, or a bad-input error.
    pub fn existing_bridge(&self, name: &str) -> Result<Link, BridgeError> {
        match self.link(name)? {
            Some(l) if l.is_bridge() => Ok(l),
            Some(_) => Err(BridgeError::NotABridge { name: name.to_string() }),
            None => Err(BridgeError::NoSuchBridge { name: name.to_string() }),
        }
    }

    /// Creates bridge `name` (up) and returns its index. With `mac`, the bridge keeps that
    /// address (set explicitly, the kernel no longer takes its ports' lowest MAC).
    pub fn create_bridge(&self, name: &str, mac: Option<[u8; 6]>) -> Result<u32, BridgeError> {
        let mut builder = LinkBridge::new(name);
        if let Some(mac) = mac {
            builder = builder.address(mac.to_vec());
        }
        let msg = builder.build();
        self.run(self.handle.link().add(msg).execute())
            .map_err(|e| match e {
                rtnetlink::Error::NetlinkError(m) if m.raw_code().abs() == libc::EEXIST => {
                    BridgeError::NameInUse { name: name.to_string() }
                }
                e => op("create bridge", name)(e),
            })?;
        self.link(name)?
            .map(|l| l.index)
            .ok_or_else(|| BridgeError::NoSuchBridge { name: name.to_string() })
    }

    /// Adds `addr/prefix` to link `index` (named `name` for messages).
    pub fn add_address(&self, index: u32, name: &str, addr: Ipv4Addr, prefix: u8) -> Result<(), BridgeError> {
        self.run(self.handle.address().add(index, IpAddr::V4(addr), prefix).execute())
            .map_err(op("add an address to", name))
    }

    /// Sets link `index` up.
    pub fn set_up(&self, index: u32, name: &str) -> Result<(), BridgeError> {
        let msg = LinkUnspec::new_with_index(index).up().build();
        self.run(self.handle.link().change(msg).execute())
            .map_err(op("bring up", name))
    }

    /// Sets link `index` down.
    pub fn set_down(&self, index: u32, name: &str) -> Result<(), BridgeError> {
        let msg = LinkUnspec::new_with_index(index).down().build();
        self.run(self.handle.link().change(msg).execute())
            .map_err(op("bring down", name))
    }

    /// Makes link `index` a port of bridge `master`.
    pub fn set_master(&self, index: u32, name: &str, master: u32) -> Result<(), BridgeError> {
        let msg = LinkUnspec::new_with_index(index).controller(master).build();
        self.run(self.handle.link().change(msg).execute())
            .map_err(op("attach to its bridge", name))
    }

    /// Deletes link `index`. A link that is already gone is not an error.
    pub fn delete_link(&self, index: u32, name: &str) -> Result<(), BridgeError> {
        match self.run(self.handle.link().del(index).execute()) {
            Ok(()) => Ok(()),
            Err(rtnetlink::Error::NetlinkError(m)) if m.raw_code().abs() == libc::ENODEV => Ok(()),
            Err(e) => Err(op("delete interface", name)(e)),
        }
    }

    /// Every IPv4 route message of every table.
    fn route_messages(&self) -> Result<Vec<RouteMessage>, BridgeError> {
        self.run(
            self.handle
                .route()
                .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
                .execute()
                .try_collect(),
        )
        .map_err(op("list", "routes"))
    }

    /// IPv4 routes of every table but `local`, without default routes.
    pub fn ipv4_routes(&self) -> Result<Vec<Route>, BridgeError> {
        let msgs = self.route_messages()?;
        Ok(msgs.iter().filter_map(route_from_msg).collect())
    }

    /// Interface of the main table's default route with the lowest metric.
    pub fn default_route_oif(&self) -> Result<Option<u32>, BridgeError> {
        let msgs = self.route_messages()?;
        let mut best: Option<(u32, u32)> = None;
        for msg in &msgs {
            if msg.header.destination_prefix_length != 0
                || msg.header.kind != RouteType::Unicast
                || route_table(msg) != RT_TABLE_MAIN
            {
                continue;
            }
            let (mut oif, mut prio) = (None, 0);
            for attr in &msg.attributes {
                match attr {
                    RouteAttribute::Oif(i) => oif = Some(*i),
                    RouteAttribute::Priority(p) => prio = *p,
                    _ => {}
                }
            }
            if let Some(oif) = oif {
                if best.is_none_or(|(_, p)| prio < p) {
                    best = Some((oif, prio));
                }
            }
        }
        Ok(best.map(|(oif, _)| oif))
    }

    /// Every IPv4 address as (link index, address/prefix).
    pub fn ipv4_addresses(&self) -> Result<Vec<(u32, Ipv4Net)>, BridgeError> {
        let msgs: Vec<_> = self.run(self.handle.address().get().execute().try_collect())
            .map_err(op("list", "addresses"))?;
        let mut out = Vec::new();
        for msg in &msgs {
            if msg.header.family != AddressFamily::Inet {
                continue;
            }
            for attr in &msg.attributes {
                if let AddressAttribute::Local(IpAddr::V4(a)) | AddressAttribute::Address(IpAddr::V4(a)) = attr {
                    if let Ok(net) = Ipv4Net::new(*a, msg.header.prefix_len) {
                        out.push((msg.header.index, net));
                        break;
                    }
                }
            }
        }
        Ok(out)
    }
}

fn route_table(msg: &RouteMessage) -> u32 {
    msg.attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(msg.header.table))
}

fn route_from_msg(msg: &RouteMessage) -> Option<Route> {
    let table = route_table(msg);
    if table == RT_TABLE_LOCAL || msg.header.destination_prefix_length == 0 {
        return None;
    }
    let mut dst = None;
    let (mut oif, mut priority) = (None, 0);
    for attr in &msg.attributes {
        match attr {
            RouteAttribute::Destination(RouteAddress::Inet(a)) => dst = Some(*a),
            RouteAttribute::Oif(i) => oif = Some(*i),
            RouteAttribute::Priority(p) => priority = *p,
            _ => {}
        }
    }
    let dst = Ipv4Net::new(dst?, msg.header.destination_prefix_length).ok()?.trunc();
    Some(Route { dst, oif, table, priority })
}
