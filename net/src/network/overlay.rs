//! The host side of an overlay network: its VXLAN port `mvvx-NAME` on bridge `mvbr-NAME`
//! (VNI, UDP port 4789, learning, this host's underlay address), a flood entry per peer
//! (head-end replication: broadcasts and unknown unicast are copied to every other host),
//! the distributed gateway's MAC, and the filter that keeps the gateway and DHCP off the
//! overlay ([`crate::nft::overlay`]). Torn down with the network.

use std::net::Ipv4Addr;

use crate::bridge::{Rtnl, VxlanParams};
use crate::nft;
use crate::spec::{fnv1a64, MacAddr, Overlay, Subnet, VXLAN_PREFIX};
use crate::{BridgeError, NetError};

/// Name of the VXLAN device of network `name`.
pub(crate) fn vxlan_name(name: &str) -> String {
    format!("{VXLAN_PREFIX}{name}")
}

/// The gateway MAC of overlay network `name`, the same on every host (so a guest moved
/// between hosts keeps a valid ARP entry for its gateway): `02:6d:xx:xx:xx:xx`, locally
/// administered unicast, apart from guests' `52:54:...`, hashed from the name.
pub(crate) fn gateway_mac(name: &str) -> MacAddr {
    let mut input = b"microvm-gateway\0".to_vec();
    input.extend_from_slice(name.as_bytes());
    let h = fnv1a64(&input).to_le_bytes();
    MacAddr([0x02, 0x6d, h[0] ^ h[4], h[1] ^ h[5], h[2] ^ h[6], h[3] ^ h[7]])
}

/// Where this host stands on the underlay.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Underlay {
    /// Tunnel source: the address on `dev=`, else the peer that is one of ours.
    pub local: Option<Ipv4Addr>,
    /// The peers without this host's own addresses.
    pub remotes: Vec<Ipv4Addr>,
}

/// Splits the overlay's peers into this host and the others (pure; `own` are this host's
/// IPv4 addresses, `on_dev` those of `dev=`).
pub(crate) fn underlay(overlay: &Overlay, own: &[Ipv4Addr], on_dev: &[Ipv4Addr]) -> Underlay {
    let local = on_dev.first().copied().or_else(|| overlay.peers.iter().copied().find(|p| own.contains(p)));
    let remotes = overlay.peers.iter().copied().filter(|p| !own.contains(p)).collect();
    Underlay { local, remotes }
}

/// Creates the VXLAN port of network `name` on bridge index `bridge` (the bridge must exist
/// with its gateway `subnet.gateway()`), and returns the guests' MTU: `mtu=`, else the
/// VXLAN device's own (underlay MTU - 50). On error the caller tears the network down.
pub(crate) fn add_port(rtnl: &Rtnl, name: &str, bridge: u32, overlay: &Overlay, subnet: Subnet) -> Result<u32, NetError> {
    let port = vxlan_name(name);
    if let Some(old) = rtnl.link(&port)? {
        if !old.is_vxlan() {
            return Err(BridgeError::NameInUse { name: port }.into());
        }
        tracing::warn!(port, "deleting stale VXLAN device");
        rtnl.delete_link(old.index, &port)?;
    }
    let addrs = rtnl.ipv4_addresses()?;
    let own: Vec<Ipv4Addr> = addrs.iter().map(|(_, n)| n.addr()).collect();
    let dev = match &overlay.dev {
        Some(d) => Some(rtnl.link(d)?.ok_or_else(|| BridgeError::NoSuchInterface { name: d.clone() })?.index),
        None => None,
    };
    let on_dev: Vec<Ipv4Addr> = addrs.iter().filter(|(i, _)| Some(*i) == dev).map(|(_, n)| n.addr()).collect();
    let under = underlay(overlay, &own, &on_dev);
    if under.remotes.is_empty() {
        tracing::warn!(network = name, "overlay has no peer besides this host; it spans no hosts yet");
    }
    // The filter first, so no frame crosses the port unfiltered.
    nft::overlay::add(&port, subnet.gateway(), gateway_mac(name))?;
    let index = rtnl.create_vxlan(&VxlanParams { name: port.clone(), vni: overlay.vni, local: under.local, dev, mtu: overlay.mtu })?;
    rtnl.set_master(index, &port, bridge)?;
    for peer in &under.remotes {
        rtnl.add_flood_peer(index, &port, *peer)?;
    }
    rtnl.set_up(index, &port)?;
    let mtu = rtnl.link(&port)?.and_then(|l| l.mtu).unwrap_or(1450);
    tracing::info!(network = name, port, vni = overlay.vni, local = ?under.local, peers = ?under.remotes, mtu, "overlay port up");
    Ok(mtu)
}

/// Deletes the VXLAN port of network `name` (gone already is fine) and its filter elements.
pub(crate) fn remove_port(rtnl: &Rtnl, name: &str) -> Result<(), NetError> {
    let port = vxlan_name(name);
    let deleted = match rtnl.link(&port) {
        Ok(Some(l)) if l.is_vxlan() => rtnl.delete_link(l.index, &port).map_err(NetError::from),
        Ok(_) => Ok(()),
        Err(e) => Err(e.into()),
    };
    let unfiltered = nft::overlay::remove(&port).map_err(NetError::from);
    deleted.and(unfiltered)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(n: u8) -> Ipv4Addr {
        Ipv4Addr::new(192, 0, 2, n)
    }

    #[test]
    fn gateway_mac_is_per_name_and_unicast() {
        let a = gateway_mac("lab");
        assert_eq!(a, gateway_mac("lab"));
        assert_ne!(a, gateway_mac("lab2"));
        assert!(!a.is_multicast() && a.0[0] & 0x02 != 0, "locally administered unicast: {a}");
        assert_ne!(&a.0[..2], &[0x52, 0x54], "never a guest's default MAC");
    }

    #[test]
    fn own_address_is_not_a_peer() {
        let o = Overlay { vni: 1, peers: vec![ip(11), ip(12), ip(13)], dev: None, mtu: None };
        let u = underlay(&o, &[Ipv4Addr::new(127, 0, 0, 1), ip(12)], &[]);
        assert_eq!(u, Underlay { local: Some(ip(12)), remotes: vec![ip(11), ip(13)] });
        // dev= pins the source address.
        let u = underlay(&o, &[ip(12), ip(50)], &[ip(50)]);
        assert_eq!(u.local, Some(ip(50)));
        // Not one of ours: routing picks the source.
        let u = underlay(&o, &[ip(99)], &[]);
        assert_eq!(u, Underlay { local: None, remotes: vec![ip(11), ip(12), ip(13)] });
    }
}
