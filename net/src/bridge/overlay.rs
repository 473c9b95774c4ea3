//! rtnetlink for networks across hosts: VXLAN devices and their flood list (bridge FDB
//! entries), and a bridge port's VLAN (bridge VLAN filtering). The messages are built by
//! pure functions, unit-tested below; the `Rtnl` methods send them.

use std::net::Ipv4Addr;

use futures_util::stream::{StreamExt, TryStreamExt};
use netlink_packet_core::{NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_APPEND, NLM_F_CREATE, NLM_F_REQUEST};
use rtnetlink::packet_route::link::{BridgeVlanInfoFlags, InfoBridge, InfoData, LinkAttribute, LinkInfo, LinkMessage};
use rtnetlink::packet_route::neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState};
use rtnetlink::packet_route::{AddressFamily, RouteNetlinkMessage};
use rtnetlink::{LinkBridgeVlan, LinkVxlan};

use super::{op, BridgeError, Rtnl};

/// The IANA VXLAN port (Linux's own default is the pre-standard 8472).
pub(crate) const VXLAN_PORT: u16 = 4789;

/// What a VXLAN device is made of.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct VxlanParams {
    pub name: String,
    pub vni: u32,
    /// Source address of the tunnel (this host's underlay address), if known.
    pub local: Option<Ipv4Addr>,
    /// Underlay interface index, if pinned.
    pub dev: Option<u32>,
    pub mtu: Option<u32>,
}

/// `ip link add NAME type vxlan id VNI dstport 4789 learning [local A] [dev D] [mtu M]`.
pub(crate) fn vxlan_message(p: &VxlanParams) -> LinkMessage {
    let mut b = LinkVxlan::new(&p.name, p.vni).port(VXLAN_PORT).learning(true);
    if let Some(local) = p.local {
        b = b.local(local);
    }
    if let Some(dev) = p.dev {
        b = b.dev(dev);
    }
    if let Some(mtu) = p.mtu {
        b = b.mtu(mtu);
    }
    b.build()
}

/// `bridge fdb append 00:00:00:00:00:00 dev VXLAN dst PEER`: head-end replication, every
/// broadcast and unknown unicast goes to each peer. APPEND, since the all-zero MAC has one
/// entry holding a list of remotes.
pub(crate) fn flood_entry_message(index: u32, peer: Ipv4Addr) -> NetlinkMessage<RouteNetlinkMessage> {
    let mut msg = NeighbourMessage::default();
    msg.header.family = AddressFamily::Bridge;
    msg.header.ifindex = index;
    msg.header.state = NeighbourState::Permanent;
    msg.header.flags = NeighbourFlags::Own;
    msg.attributes.push(NeighbourAttribute::LinkLayerAddress(vec![0; 6]));
    msg.attributes.push(NeighbourAttribute::Destination(NeighbourAddress::Inet(peer)));
    let mut req = NetlinkMessage::from(RouteNetlinkMessage::NewNeighbour(msg));
    req.header.flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_APPEND;
    req
}

/// `bridge vlan add dev PORT vid VID pvid untagged`: the port's untagged frames belong to
/// VID, and VID leaves it untagged.
pub(crate) fn access_vlan_message(index: u32, vid: u16) -> LinkMessage {
    LinkBridgeVlan::new(index).vlan(vid, BridgeVlanInfoFlags::Pvid | BridgeVlanInfoFlags::Untagged).build()
}

/// `bridge vlan del dev PORT vid VID`.
pub(crate) fn del_vlan_message(index: u32, vid: u16) -> LinkMessage {
    LinkBridgeVlan::new(index).vlan(vid, BridgeVlanInfoFlags::empty()).build()
}

/// A bridge's VLAN settings: (vlan_filtering, default_pvid), from its link message; no
/// default PVID when the kernel has no VLAN filtering (CONFIG_BRIDGE_VLAN_FILTERING off:
/// it reports vlan_filtering 0 but none of the VLAN attributes).
pub(crate) fn bridge_vlan_settings(msg: &LinkMessage) -> (bool, Option<u16>) {
    let (mut filtering, mut pvid) = (false, None);
    for attr in &msg.attributes {
        let LinkAttribute::LinkInfo(infos) = attr else { continue };
        for info in infos {
            let LinkInfo::Data(InfoData::Bridge(items)) = info else { continue };
            for item in items {
                match item {
                    InfoBridge::VlanFiltering(f) => filtering = *f,
                    InfoBridge::VlanDefaultPvid(p) => pvid = Some(*p),
                    _ => {}
                }
            }
        }
    }
    (filtering, pvid)
}

impl Rtnl {
    /// The bridge's default PVID, or why its ports cannot be put in VLANs.
    pub fn vlan_ready_bridge(&self, name: &str) -> Result<u16, BridgeError> {
        match self.bridge_vlans(name)? {
            (_, None) => Err(BridgeError::NoKernelVlanFiltering { name: name.to_string() }),
            (false, _) => Err(BridgeError::NoVlanFiltering { name: name.to_string() }),
            (true, Some(pvid)) => Ok(pvid),
        }
    }

    /// The bridge's (vlan_filtering, default_pvid); see [`bridge_vlan_settings`].
    pub fn bridge_vlans(&self, name: &str) -> Result<(bool, Option<u16>), BridgeError> {
        let msgs: Vec<LinkMessage> = self
            .run(self.handle.link().get().match_name(name.to_string()).execute().try_collect())
            .map_err(op("look up bridge", name))?;
        let msg = msgs.first().ok_or_else(|| BridgeError::NoSuchBridge { name: name.to_string() })?;
        Ok(bridge_vlan_settings(msg))
    }

    /// Makes port `index` (named `name`) an untagged access port of `vid` only: adds `vid`
    /// as PVID/untagged, then removes the bridge's default PVID the port got on joining.
    pub fn set_access_vlan(&self, index: u32, name: &str, vid: u16, default_pvid: u16) -> Result<(), BridgeError> {
        self.run(self.handle.link().set(access_vlan_message(index, vid)).execute())
            .map_err(op("set the VLAN of", name))?;
        if default_pvid != 0 && default_pvid != vid {
            match self.run(self.handle.link().del_with_message(del_vlan_message(index, default_pvid)).execute()) {
                Ok(()) => {}
                // Not a member (e.g. the bridge gives new ports no VLAN): nothing to remove.
                Err(rtnetlink::Error::NetlinkError(m)) if m.raw_code().abs() == libc::ENOENT => {}
                Err(e) => return Err(op("remove the default VLAN of", name)(e)),
            }
        }
        Ok(())
    }

    /// Creates a VXLAN device (down) and returns its index.
    pub fn create_vxlan(&self, p: &VxlanParams) -> Result<u32, BridgeError> {
        self.run(self.handle.link().add(vxlan_message(p)).execute()).map_err(|e| match e {
            rtnetlink::Error::NetlinkError(m) if m.raw_code().abs() == libc::EEXIST => {
                BridgeError::NameInUse { name: p.name.clone() }
            }
            e => op("create VXLAN device", &p.name)(e),
        })?;
        self.link(&p.name)?.map(|l| l.index).ok_or_else(|| BridgeError::NoSuchInterface { name: p.name.clone() })
    }

    /// Adds `peer` to the VXLAN device's flood list.
    pub fn add_flood_peer(&self, index: u32, name: &str, peer: Ipv4Addr) -> Result<(), BridgeError> {
        let mut handle = self.handle.clone();
        let fut = async move {
            let mut replies = handle.request(flood_entry_message(index, peer))?;
            while let Some(reply) = replies.next().await {
                if let NetlinkPayload::Error(err) = reply.payload {
                    return Err(rtnetlink::Error::NetlinkError(err));
                }
            }
            Ok(())
        };
        self.run(fut).map_err(op("add a flood entry to", name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rtnetlink::packet_route::link::{AfSpecBridge, BridgeVlanInfo, InfoKind, InfoVxlan};

    fn vxlan_infos(msg: &LinkMessage) -> Vec<InfoVxlan> {
        msg.attributes
            .iter()
            .find_map(|a| match a {
                LinkAttribute::LinkInfo(infos) => infos.iter().find_map(|i| match i {
                    LinkInfo::Data(InfoData::Vxlan(v)) => Some(v.clone()),
                    _ => None,
                }),
                _ => None,
            })
            .unwrap_or_default()
    }

    #[test]
    fn vxlan_device() {
        let p = VxlanParams { name: "mvvx-lab".into(), vni: 4242, local: Some(Ipv4Addr::new(192, 0, 2, 11)), dev: Some(7), mtu: Some(1400) };
        let msg = vxlan_message(&p);
        assert!(msg.attributes.contains(&LinkAttribute::IfName("mvvx-lab".into())));
        assert!(msg.attributes.contains(&LinkAttribute::Mtu(1400)));
        let kind = msg.attributes.iter().any(|a| matches!(a, LinkAttribute::LinkInfo(i) if i.contains(&LinkInfo::Kind(InfoKind::Vxlan))));
        assert!(kind);
        let infos = vxlan_infos(&msg);
        for want in [
            InfoVxlan::Id(4242),
            InfoVxlan::Port(4789),
            InfoVxlan::Learning(true),
            InfoVxlan::Local(Ipv4Addr::new(192, 0, 2, 11)),
            InfoVxlan::Link(7),
        ] {
            assert!(infos.contains(&want), "{want:?} missing in {infos:?}");
        }
        // No group: flooding is by the FDB's peer list, not multicast.
        assert!(!infos.iter().any(|i| matches!(i, InfoVxlan::Group(_))));
        let bare = vxlan_infos(&vxlan_message(&VxlanParams { local: None, dev: None, mtu: None, ..p }));
        assert!(!bare.iter().any(|i| matches!(i, InfoVxlan::Local(_) | InfoVxlan::Link(_))));
    }

    #[test]
    fn flood_entry() {
        let req = flood_entry_message(9, Ipv4Addr::new(192, 0, 2, 12));
        assert_eq!(req.header.flags, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_APPEND);
        let NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewNeighbour(msg)) = &req.payload else { panic!() };
        assert_eq!(msg.header.family, AddressFamily::Bridge);
        assert_eq!(msg.header.ifindex, 9);
        assert_eq!(msg.header.flags, NeighbourFlags::Own, "NTF_SELF: the VXLAN device's own FDB");
        assert_eq!(msg.header.state, NeighbourState::Permanent);
        assert!(msg.attributes.contains(&NeighbourAttribute::LinkLayerAddress(vec![0; 6])));
        assert!(msg.attributes.contains(&NeighbourAttribute::Destination(NeighbourAddress::Inet(Ipv4Addr::new(192, 0, 2, 12)))));
    }

    #[test]
    fn access_vlan() {
        let msg = access_vlan_message(5, 10);
        assert_eq!(msg.header.index, 5);
        assert_eq!(msg.header.interface_family, AddressFamily::Bridge);
        let want = AfSpecBridge::VlanInfo(BridgeVlanInfo { vid: 10, flags: BridgeVlanInfoFlags::Pvid | BridgeVlanInfoFlags::Untagged });
        assert_eq!(msg.attributes, vec![LinkAttribute::AfSpecBridge(vec![want])]);
        let del = del_vlan_message(5, 1);
        let want = AfSpecBridge::VlanInfo(BridgeVlanInfo { vid: 1, flags: BridgeVlanInfoFlags::empty() });
        assert_eq!(del.attributes, vec![LinkAttribute::AfSpecBridge(vec![want])]);
    }

    #[test]
    fn vlan_settings() {
        let mut msg = LinkMessage::default();
        assert_eq!(bridge_vlan_settings(&msg), (false, None));
        msg.attributes.push(LinkAttribute::LinkInfo(vec![
            LinkInfo::Kind(InfoKind::Bridge),
            LinkInfo::Data(InfoData::Bridge(vec![InfoBridge::VlanFiltering(false)])),
        ]));
        assert_eq!(bridge_vlan_settings(&msg), (false, None), "a kernel without VLAN filtering");
        msg.attributes.clear();
        msg.attributes.push(LinkAttribute::LinkInfo(vec![
            LinkInfo::Kind(InfoKind::Bridge),
            LinkInfo::Data(InfoData::Bridge(vec![InfoBridge::VlanFiltering(true), InfoBridge::VlanDefaultPvid(3)])),
        ]));
        assert_eq!(bridge_vlan_settings(&msg), (true, Some(3)));
    }
}
