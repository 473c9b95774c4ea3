//! The VXLAN port of an overlay network carries guest-to-guest traffic only: every host's
//! bridge is the network's gateway, with the same address and MAC (a distributed gateway,
//! as OpenStack DVR does), so nothing of a gateway may cross between hosts, nor DHCP (each
//! host answers its own guests). Rules in `table bridge microvm`, beside the anti-spoofing
//! guards ([`super::guard`]); the data are per-port set elements:
//!
//! ```text
//! overlay_rx  (bridge filter hook prerouting):  iifname "mvvx-*" jump overlay_in
//! overlay_fwd (bridge filter hook forward):     oifname "mvvx-*" jump overlay_out
//! overlay_tx  (bridge filter hook output):      oifname "mvvx-*" jump overlay_out
//! overlay_in / overlay_out: drop frames from or to a gateway MAC, ARP from or for a
//!     gateway address, IPv4 from or to a gateway address, and DHCP
//! overlay_gw { VXLAN . gateway }, overlay_gwmac { VXLAN . gateway MAC }
//! ```
//! Prerouting runs before the bridge learns a frame's source, so another host's gateway
//! MAC never lands in this bridge's forwarding table (where it is this host's own).
//! Guests' frames are checked against spoofing where they enter, on their own host's TAP.

use std::net::Ipv4Addr;

use super::netlink::{self, Batch, Element, Family, Key, Nfnl};
use super::{guard, nl_err, run, NftError, TABLE};
use crate::spec::{MacAddr, VXLAN_PREFIX};

const GW_SET: &str = "overlay_gw";
const GW_MAC_SET: &str = "overlay_gwmac";
const SETS: [&str; 2] = [GW_SET, GW_MAC_SET];

/// The sets and chains (idempotent: every chain is flushed before its rules).
pub(crate) fn script() -> String {
    let t = TABLE;
    let mut s = format!(
        "add set bridge {t} {GW_SET} {{ type ifname . ipv4_addr; }}\n\
         add set bridge {t} {GW_MAC_SET} {{ type ifname . ether_addr; }}\n"
    );
    for (chain, dir) in [("overlay_in", "iifname"), ("overlay_out", "oifname")] {
        s += &format!("add chain bridge {t} {chain}\nflush chain bridge {t} {chain}\n");
        for rule in [
            format!("{dir} . ether saddr @{GW_MAC_SET} drop comment \"a gateway stays on its host\""),
            format!("{dir} . ether daddr @{GW_MAC_SET} drop comment \"every host is the gateway\""),
            format!("{dir} . arp saddr ip @{GW_SET} drop comment \"gateway arp stays on its host\""),
            format!("{dir} . arp daddr ip @{GW_SET} drop comment \"gateway arp stays on its host\""),
            format!("{dir} . ip saddr @{GW_SET} drop comment \"gateway traffic stays on its host\""),
            format!("{dir} . ip daddr @{GW_SET} drop comment \"gateway traffic stays on its host\""),
            "udp sport { 67, 68 } udp dport { 67, 68 } drop comment \"dhcp stays on its host\"".to_string(),
        ] {
            s += &format!("add rule bridge {t} {chain} {rule}\n");
        }
    }
    for (chain, hook, dir, to) in [
        ("overlay_rx", "prerouting", "iifname", "overlay_in"),
        ("overlay_fwd", "forward", "oifname", "overlay_out"),
        ("overlay_tx", "output", "oifname", "overlay_out"),
    ] {
        s += &format!(
            "add chain bridge {t} {chain} {{ type filter hook {hook} priority filter; policy accept; }}\n\
             flush chain bridge {t} {chain}\n\
             add rule bridge {t} {chain} {dir} \"{VXLAN_PREFIX}*\" jump {to}\n"
        );
    }
    s
}

/// Creates the bridge table (see [`guard`]) and the overlay chains if missing.
fn ensure_layout() -> Result<(), NftError> {
    guard::ensure_layout()?;
    let present = netlink::with(|nl| nl.set_exists(Family::Bridge, TABLE, GW_MAC_SET))
        .map_err(nl_err("check the overlay rules"))?;
    if present {
        return Ok(());
    }
    run("create the overlay rules", &script())
}

fn queue_removal(nl: &mut Nfnl, batch: &mut Batch, port: &str) -> std::io::Result<()> {
    for set in SETS {
        for e in nl.elements(Family::Bridge, TABLE, set)? {
            if e.key.leading_ifname() == Some(port) {
                batch.delete_element(set, &e);
            }
        }
    }
    Ok(())
}

/// The elements that make `port` (a VXLAN device) keep gateway `gw`/`mac` on this host.
pub(crate) fn elements(port: &str, gw: Ipv4Addr, mac: MacAddr) -> Vec<(&'static str, Element)> {
    let k = || Key::default().ifname(port);
    vec![(GW_SET, Element::new(k().ipv4(gw))), (GW_MAC_SET, Element::new(k().ether(mac.0)))]
}

/// Installs the filter of VXLAN port `port` (one transaction), replacing stale elements of
/// the same name. Done before the port joins its bridge.
pub(crate) fn add(port: &str, gw: Ipv4Addr, mac: MacAddr) -> Result<(), NftError> {
    ensure_layout()?;
    let action = format!("add the overlay rules of {port}");
    netlink::with(|nl| {
        let mut batch = Batch::new(Family::Bridge, TABLE);
        queue_removal(nl, &mut batch, port)?;
        for (set, e) in elements(port, gw, mac) {
            batch.add_element(set, &e);
        }
        batch.commit(nl)
    })
    .map_err(nl_err(&action))
}

/// Removes the elements of `port` (none is fine; no table is fine).
pub(crate) fn remove(port: &str) -> Result<(), NftError> {
    let action = format!("remove the overlay rules of {port}");
    netlink::with(|nl| {
        if !nl.set_exists(Family::Bridge, TABLE, GW_MAC_SET)? {
            return Ok(());
        }
        let mut batch = Batch::new(Family::Bridge, TABLE);
        queue_removal(nl, &mut batch, port)?;
        batch.commit(nl)
    })
    .map_err(nl_err(&action))
}

/// VXLAN port names that have elements (for stale cleanup).
pub(crate) fn ports() -> Result<Vec<String>, NftError> {
    let lists = netlink::with(|nl| {
        if !nl.set_exists(Family::Bridge, TABLE, GW_MAC_SET)? {
            return Ok(Vec::new());
        }
        SETS.iter().map(|set| nl.elements(Family::Bridge, TABLE, set)).collect::<Result<Vec<_>, _>>()
    })
    .map_err(nl_err("list the overlay rules"))?;
    let mut out: Vec<String> = Vec::new();
    for e in lists.iter().flatten() {
        if let Some(p) = e.key.leading_ifname().filter(|p| p.starts_with(VXLAN_PREFIX)) {
            if !out.iter().any(|o| o == p) {
                out.push(p.to_string());
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules<'a>(s: &'a str, chain: &str) -> Vec<&'a str> {
        let prefix = format!("add rule bridge microvm {chain} ");
        s.lines().filter_map(|l| l.strip_prefix(prefix.as_str())).collect()
    }

    #[test]
    fn nothing_of_the_gateway_and_no_dhcp_crosses() {
        let s = script();
        for (chain, dir) in [("overlay_in", "iifname"), ("overlay_out", "oifname")] {
            let r = rules(&s, chain);
            assert_eq!(r.len(), 7, "{r:#?}");
            assert!(r.iter().all(|l| l.contains(" drop ")), "{r:#?}");
            assert!(r[..6].iter().all(|l| l.starts_with(&format!("{dir} . "))), "{r:#?}");
            for m in ["ether saddr @overlay_gwmac", "ether daddr @overlay_gwmac", "arp saddr ip @overlay_gw", "arp daddr ip @overlay_gw", "ip saddr @overlay_gw", "ip daddr @overlay_gw"] {
                assert!(r.iter().any(|l| l.contains(m)), "{chain}: {m}");
            }
            assert!(r[6].starts_with("udp sport { 67, 68 } udp dport { 67, 68 } drop"));
        }
        assert_eq!(rules(&s, "overlay_rx"), vec!["iifname \"mvvx-*\" jump overlay_in"]);
        assert_eq!(rules(&s, "overlay_fwd"), vec!["oifname \"mvvx-*\" jump overlay_out"]);
        assert_eq!(rules(&s, "overlay_tx"), vec!["oifname \"mvvx-*\" jump overlay_out"]);
        assert!(s.contains("overlay_tx { type filter hook output priority filter; policy accept; }"));
        assert!(s.lines().all(|l| l.contains(" bridge microvm ")), "only our table:\n{s}");
        // Rebuilt, not doubled, when two processes add the layout at once.
        for c in ["overlay_in", "overlay_out", "overlay_rx", "overlay_fwd", "overlay_tx"] {
            assert!(s.find(&format!("flush chain bridge microvm {c}\n")).unwrap() < s.find(&format!("add rule bridge microvm {c} ")).unwrap());
        }
    }

    #[test]
    fn elements_are_keyed_by_the_port() {
        let mac = MacAddr([2, 0x6d, 1, 2, 3, 4]);
        let e = elements("mvvx-lab", Ipv4Addr::new(10, 77, 0, 1), mac);
        assert_eq!(e.len(), 2);
        assert!(e.iter().all(|(_, el)| el.key.leading_ifname() == Some("mvvx-lab")));
        assert_eq!(e[0].1, Element::new(Key::default().ifname("mvvx-lab").ipv4(Ipv4Addr::new(10, 77, 0, 1))));
        assert_eq!(e[1].1, Element::new(Key::default().ifname("mvvx-lab").ether(mac.0)));
    }
}
