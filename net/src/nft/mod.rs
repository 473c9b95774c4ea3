//! Firewall rules in our own nftables table, `table ip microvm` (no other table is touched).
//!
//! The rules are fixed and the same for every network; what differs between networks is
//! data — which bridge jumps to which chain, a network's gateway, resolvers, uplink and
//! subnet — kept in maps and sets keyed by bridge name. So a network comes and goes as set
//! elements, in one transaction, without touching the others' (no rule handles to track):
//! ```text
//! input       (filter hook input):     iifname vmap @in_net     -> host_guarded | host_open
//! forward     (filter hook forward):   iifname vmap @from_net   -> from_nat | from_host_only
//!                                      oifname vmap @to_net     -> to_nat | to_host_only
//! postrouting (nat hook postrouting):  iifname vmap @nat_net    -> nat_out
//! net_self { BR . BR }, net_gw { BR . gateway }, net_dns { BR . resolver },
//! net_nat { BR . uplink . subnet } (interval)
//! ```
//!
//! The rules are written by the `nft` tool (`nft -f -` fed a generated script), once per
//! network namespace, when the table is created: a script is one atomic transaction, the
//! rules are readable and identical to what `nft list` shows when debugging, and `nft` is
//! the reference nftables implementation (the Rust netlink crates for nf_tables are thin,
//! unmaintained or GPL). Elements — a network's, and the per-TAP guards of [`guard`] — and
//! every check and removal are a few nf_tables netlink messages ([`netlink`]): an `nft` run
//! costs 10-20 ms of fork, exec and cache fill, a netlink round trip well under one.
//!
//! Guest-to-host policy (`host_guarded`, traffic a guest sends to any address of the host):
//! by default the host accepts only replies to connections it opened (conntrack
//! established/related), DHCP (udp port 67), ping (ICMP echo-request) of the gateway, and DNS
//! (port 53) to the resolvers DHCP offers in case one of them is a host address; everything
//! else is dropped, so host services listening on 0.0.0.0 are closed to guests. `allow-host`
//! networks jump to `host_open`, a plain accept. Forwarded traffic to link-local addresses
//! (169.254.0.0/16, e.g. a cloud metadata service) is dropped in every mode: NAT would
//! otherwise send it out with the host's identity. IPv6 is off on the bridge of a network
//! without `allow-host` (see `network`), so the host is not reachable over IPv6 either.
//!
//! A table made by an older microvm (one chain per network: `in-NAME`, `from-NAME`, ...,
//! behind the same maps) is upgraded in place: the sets and shared chains are added beside
//! it, and an old network's chains go with its elements.
//!
//! Anti-spoofing of the guests' frames lives in a second table, `table bridge microvm`
//! (module [`guard`]).
//! Note: nftables base chains of other tables still run at the same hooks; an `accept` here
//! cannot override a `drop` elsewhere (e.g. a Docker host's FORWARD policy drop).

pub(crate) mod guard;
pub(crate) mod netlink;
pub(crate) mod overlay;

use std::io::{self, Write};
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};

use crate::spec::Subnet;
use netlink::{Batch, Element, Family, Key, Nfnl};

/// Our table's name (family `ip`).
pub const TABLE: &str = "microvm";

/// nftables errors.
#[derive(Debug, thiserror::Error)]
pub enum NftError {
    #[error("cannot run nft (is the nftables package installed?)")]
    Spawn(#[source] io::Error),
    #[error("nft failed to {action}: {stderr}")]
    Failed { action: String, stderr: String },
    #[error("cannot {action} (nf_tables netlink)")]
    Netlink {
        action: String,
        #[source]
        source: io::Error,
    },
}

/// What a network's rules need to know.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct NftNetwork {
    pub name: String,
    pub bridge: String,
    pub subnet: Subnet,
    /// `Some(uplink)` for NAT, `None` for host-only.
    pub uplink: Option<String>,
    /// Guests may connect to the host (`allow-host`).
    pub allow_host: bool,
    /// DNS servers DHCP offers (reachable on port 53 even when one is a host address).
    pub dns: Vec<Ipv4Addr>,
}

/// Link-local IPv4 addresses (cloud metadata services live at 169.254.169.254).
pub(crate) const LINK_LOCAL: &str = "169.254.0.0/16";

// The verdict maps (keyed by bridge) and the sets (keyed by bridge, then a value).
const IN_NET: &str = "in_net";
const FROM_NET: &str = "from_net";
const TO_NET: &str = "to_net";
const NAT_NET: &str = "nat_net";
const NET_SELF: &str = "net_self";
const NET_GW: &str = "net_gw";
const NET_DNS: &str = "net_dns";
const NET_NAT: &str = "net_nat";
/// Every map and set a network has elements in, data before the maps that use it.
const NETWORK_SETS: [&str; 8] = [NET_SELF, NET_GW, NET_DNS, NET_NAT, IN_NET, FROM_NET, TO_NET, NAT_NET];

/// Chain-name prefixes of the per-network chains of older versions (`in-NAME`, ...).
const OLD_CHAINS: [&str; 4] = ["in-", "from-", "to-", "nat-"];

/// Commands creating the table, maps and base chains (only when the table is absent:
/// `add rule` is not idempotent).
pub(crate) fn base_script() -> String {
    format!(
        "add table ip {TABLE}\n\
         add map ip {TABLE} {FROM_NET} {{ type ifname : verdict; }}\n\
         add map ip {TABLE} {TO_NET} {{ type ifname : verdict; }}\n\
         add map ip {TABLE} {NAT_NET} {{ type ifname : verdict; }}\n\
         add chain ip {TABLE} forward {{ type filter hook forward priority filter; policy accept; }}\n\
         add chain ip {TABLE} postrouting {{ type nat hook postrouting priority srcnat; policy accept; }}\n\
         add rule ip {TABLE} forward iifname vmap @{FROM_NET}\n\
         add rule ip {TABLE} forward oifname vmap @{TO_NET}\n\
         add rule ip {TABLE} postrouting iifname vmap @{NAT_NET}\n{}",
        input_base_script()
    )
}

/// The input hook's map and chain: also added on their own to a table made by an older
/// microvm that had none.
pub(crate) fn input_base_script() -> String {
    format!(
        "add map ip {TABLE} {IN_NET} {{ type ifname : verdict; }}\n\
         add chain ip {TABLE} input {{ type filter hook input priority filter; policy accept; }}\n\
         add rule ip {TABLE} input iifname vmap @{IN_NET}\n"
    )
}

/// The sets and the shared chains every network jumps to (idempotent: each chain is
/// flushed before its rules, so two processes creating them at once leave one copy).
pub(crate) fn shared_script() -> String {
    let t = TABLE;
    let mut s = format!(
        "add set ip {t} {NET_SELF} {{ type ifname . ifname; }}\n\
         add set ip {t} {NET_GW} {{ type ifname . ipv4_addr; }}\n\
         add set ip {t} {NET_DNS} {{ type ifname . ipv4_addr; }}\n\
         add set ip {t} {NET_NAT} {{ type ifname . ifname . ipv4_addr; flags interval; }}\n"
    );
    let rules: [(&str, Vec<String>); 7] = [
        // What the host accepts from the network's guests (see the module docs).
        ("host_guarded", vec![
            "ct state established,related accept comment \"replies to the host\"".into(),
            "udp dport 67 accept comment \"dhcp\"".into(),
            format!("icmp type echo-request iifname . ip daddr @{NET_GW} accept comment \"ping the gateway\""),
            format!("meta l4proto {{ tcp, udp }} th dport 53 iifname . ip daddr @{NET_DNS} accept comment \"dns on the host\""),
            "drop comment \"no host access without allow-host\"".into(),
        ]),
        ("host_open", vec!["accept comment \"allow-host\"".into()]),
        // Traffic entering from a bridge. Same-bridge traffic only shows up here with
        // br_netfilter; it stays allowed. Other microvm bridges are always dropped.
        ("from_nat", [from_common(), vec![
            format!("iifname . oifname . ip saddr @{NET_NAT} accept comment \"nat: out via uplink\""),
            "drop comment \"nat: only via uplink\"".into(),
        ]].concat()),
        ("from_host_only", [from_common(), vec!["drop comment \"host-only: no forwarding\"".into()]].concat()),
        // Traffic leaving into a bridge.
        ("to_nat", vec![
            format!("iifname . oifname @{NET_SELF} accept comment \"same network\""),
            "ct state established,related accept comment \"nat: replies\"".into(),
            "drop comment \"nat: no inbound connections\"".into(),
        ]),
        ("to_host_only", vec![
            format!("iifname . oifname @{NET_SELF} accept comment \"same network\""),
            "drop comment \"host-only: no forwarding\"".into(),
        ]),
        ("nat_out", vec![format!("iifname . oifname . ip saddr @{NET_NAT} masquerade")]),
    ];
    for (chain, lines) in rules {
        s += &format!("add chain ip {t} {chain}\nflush chain ip {t} {chain}\n");
        for l in lines {
            s += &format!("add rule ip {t} {chain} {l}\n");
        }
    }
    s
}

fn from_common() -> Vec<String> {
    vec![
        format!("iifname . oifname @{NET_SELF} accept comment \"same network\""),
        "oifname \"mvbr-*\" drop comment \"isolate networks\"".into(),
        format!("ip daddr {LINK_LOCAL} drop comment \"no link-local (cloud metadata)\""),
    ]
}

/// One network's elements, as (set or map, element), in the order they are added.
pub(crate) fn network_elements(net: &NftNetwork) -> Vec<(&'static str, Element)> {
    let br = || Key::default().ifname(&net.bridge);
    let mut out = vec![
        (NET_SELF, Element::new(br().ifname(&net.bridge))),
        (NET_GW, Element::new(br().ipv4(net.subnet.gateway()))),
    ];
    for dns in &net.dns {
        out.push((NET_DNS, Element::new(br().ipv4(*dns))));
    }
    if let Some(up) = &net.uplink {
        let first = net.subnet.as_net().network();
        let last = net.subnet.as_net().broadcast();
        out.push((NET_NAT, Element::new(br().ifname(up).ipv4(first)).up_to(br().ifname(up).ipv4(last))));
    }
    out.push((IN_NET, Element::new(br()).jump(if net.allow_host { "host_open" } else { "host_guarded" })));
    let (from, to) = if net.uplink.is_some() { ("from_nat", "to_nat") } else { ("from_host_only", "to_host_only") };
    out.push((FROM_NET, Element::new(br()).jump(from)));
    out.push((TO_NET, Element::new(br()).jump(to)));
    if net.uplink.is_some() {
        out.push((NAT_NET, Element::new(br()).jump("nat_out")));
    }
    out
}

fn nl_err(action: &str) -> impl FnOnce(io::Error) -> NftError + '_ {
    move |source| NftError::Netlink { action: action.to_string(), source }
}

/// Runs `nft -f -` with `script` on stdin.
fn run(action: &str, script: &str) -> Result<(), NftError> {
    tracing::debug!(action, script, "nft -f -");
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(NftError::Spawn)?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(script.as_bytes()).map_err(NftError::Spawn)?;
    }
    let out = child.wait_with_output().map_err(NftError::Spawn)?;
    if out.status.success() {
        Ok(())
    } else {
        Err(NftError::Failed { action: action.to_string(), stderr: one_line(&out.stderr) })
    }
}

/// nft's multi-line error (message, offending line, caret line) squeezed into one line.
fn one_line(stderr: &[u8]) -> String {
    let text = String::from_utf8_lossy(stderr);
    let first = text.lines().find(|l| !l.trim().is_empty()).unwrap_or("no error output");
    first.trim().to_string()
}

/// Creates the table, or adds what an older version's table lacks, with `nft -f` (once per
/// network namespace).
fn ensure_layout() -> Result<(), NftError> {
    let action = "check the microvm table";
    let script = netlink::with(|nl| {
        if nl.set_exists(Family::Ip, TABLE, NET_NAT)? {
            return Ok(None);
        }
        let base = if !nl.table_exists(Family::Ip, TABLE)? {
            base_script()
        } else if !nl.chain_exists(Family::Ip, TABLE, "input")? {
            input_base_script()
        } else {
            String::new()
        };
        Ok(Some(base + &shared_script()))
    })
    .map_err(nl_err(action))?;
    match script {
        Some(s) => run("create the microvm table", &s),
        None => Ok(()),
    }
}

/// Queues the deletion of every element of the network on `bridge` (and of an older
/// version's chains for it).
fn queue_removal(nl: &mut Nfnl, batch: &mut Batch, bridge: &str) -> io::Result<()> {
    let mut old_chains = Vec::new();
    for set in NETWORK_SETS {
        for e in nl.elements(Family::Ip, TABLE, set)? {
            if e.key.leading_ifname() == Some(bridge) {
                batch.delete_element(set, &e);
                if let Some(chain) = e.jump.filter(|c| OLD_CHAINS.iter().any(|p| c.starts_with(p))) {
                    old_chains.push(chain);
                }
            }
        }
    }
    for chain in old_chains {
        batch.flush_chain(&chain).delete_chain(&chain);
    }
    Ok(())
}

/// Installs one network's elements (and the table on first use) in one transaction,
/// replacing whatever a crashed process left for the same bridge.
pub(crate) fn add_network(net: &NftNetwork) -> Result<(), NftError> {
    ensure_layout()?;
    let action = format!("add firewall rules for network {}", net.name);
    netlink::with(|nl| {
        let mut batch = Batch::new(Family::Ip, TABLE);
        queue_removal(nl, &mut batch, &net.bridge)?;
        for (set, e) in network_elements(net) {
            batch.add_element(set, &e);
        }
        batch.commit(nl)
    })
    .map_err(nl_err(&action))
}

/// Re-installs a network's elements if they are missing (e.g. someone flushed the ruleset
/// while the network was in use).
pub(crate) fn ensure_network(net: &NftNetwork) -> Result<(), NftError> {
    let action = format!("check the firewall rules of network {}", net.name);
    let present = netlink::with(|nl| {
        if !nl.set_exists(Family::Ip, TABLE, NET_NAT)? {
            return Ok(false);
        }
        let want = network_elements(net);
        let mut have = 0;
        for set in [IN_NET, FROM_NET, TO_NET] {
            let found = nl.elements(Family::Ip, TABLE, set)?;
            let wanted = want.iter().filter(|(s, _)| *s == set).map(|(_, e)| e);
            have += wanted.filter(|e| found.contains(e)).count();
        }
        Ok(have == 3)
    })
    .map_err(nl_err(&action))?;
    if present {
        return Ok(());
    }
    tracing::warn!(network = %net.name, "firewall rules missing; re-installing");
    add_network(net)
}

/// Removes one network's elements (one transaction). Best effort: never fails; problems are
/// logged.
pub(crate) fn remove_network(name: &str, bridge: &str) {
    let res = netlink::with(|nl| {
        let mut batch = Batch::new(Family::Ip, TABLE);
        queue_removal(nl, &mut batch, bridge)?;
        batch.commit(nl)
    });
    if let Err(e) = res {
        tracing::warn!(error = %e, network = name, "cannot remove the network's firewall rules");
    }
}

/// Deletes `table ip microvm` if it exists.
pub(crate) fn delete_table() -> Result<(), NftError> {
    delete_table_of(Family::Ip).map_err(nl_err("delete the microvm table"))
}

/// Deletes our table of `family` if it exists (one transaction).
fn delete_table_of(family: Family) -> io::Result<()> {
    netlink::with(|nl| {
        if nl.table_exists(family, TABLE)? {
            let mut batch = Batch::new(family, TABLE);
            batch.delete_table();
            batch.commit(nl)?;
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(uplink: Option<&str>) -> NftNetwork {
        NftNetwork {
            name: "t1".into(),
            bridge: "mvbr-t1".into(),
            subnet: Subnet::from_octets(10, 200, 0),
            uplink: uplink.map(String::from),
            allow_host: false,
            dns: vec![Ipv4Addr::new(10, 0, 0, 53)],
        }
    }

    fn rules_of<'a>(s: &'a str, chain: &str) -> Vec<&'a str> {
        let prefix = format!("add rule ip microvm {chain} ");
        s.lines().filter_map(|l| l.strip_prefix(prefix.as_str())).collect()
    }

    fn jump(elements: &[(&str, Element)], set: &str) -> Option<String> {
        elements.iter().find(|(s, _)| *s == set).and_then(|(_, e)| e.jump.clone())
    }

    #[test]
    fn nat_elements() {
        let e = network_elements(&net(Some("eth0")));
        assert_eq!(jump(&e, NAT_NET).as_deref(), Some("nat_out"));
        assert_eq!(jump(&e, FROM_NET).as_deref(), Some("from_nat"));
        assert_eq!(jump(&e, TO_NET).as_deref(), Some("to_nat"));
        assert_eq!(jump(&e, IN_NET).as_deref(), Some("host_guarded"));
        // Masquerade and forwarding out: this bridge, this uplink, this /24 only.
        let (_, nat) = e.iter().find(|(s, _)| *s == NET_NAT).unwrap();
        let key = |last| Key::default().ifname("mvbr-t1").ifname("eth0").ipv4(Ipv4Addr::new(10, 200, 0, last));
        assert_eq!(nat, &Element::new(key(0)).up_to(key(255)));
        // Every element is the bridge's, and the maps come after the data they use.
        assert!(e.iter().all(|(_, el)| el.key.leading_ifname() == Some("mvbr-t1")));
        let first_map = e.iter().position(|(s, _)| s.ends_with("_net")).unwrap();
        assert!(e[first_map..].iter().all(|(s, _)| s.ends_with("_net")));
        assert_eq!(e.len(), 8);
    }

    #[test]
    fn host_only_elements() {
        let e = network_elements(&net(None));
        assert!(jump(&e, NAT_NET).is_none() && !e.iter().any(|(s, _)| *s == NET_NAT));
        assert_eq!(jump(&e, FROM_NET).as_deref(), Some("from_host_only"));
        assert_eq!(jump(&e, TO_NET).as_deref(), Some("to_host_only"));
    }

    #[test]
    fn shared_chains() {
        let s = shared_script();
        assert_eq!(rules_of(&s, "nat_out"), vec!["iifname . oifname . ip saddr @net_nat masquerade"]);
        let from = rules_of(&s, "from_nat");
        assert!(from[0].contains("@net_self accept") && from[1].contains("oifname \"mvbr-*\" drop"));
        assert!(from[2].starts_with("ip daddr 169.254.0.0/16 drop"));
        assert!(from[3].starts_with("iifname . oifname . ip saddr @net_nat accept"));
        assert_eq!(from[4], "drop comment \"nat: only via uplink\"");
        assert!(rules_of(&s, "to_nat")[1].starts_with("ct state established,related accept"));
        assert_eq!(rules_of(&s, "to_host_only").last().unwrap(), &"drop comment \"host-only: no forwarding\"");
        assert!(rules_of(&s, "from_host_only")[2].starts_with("ip daddr 169.254.0.0/16 drop"));
        assert!(s.lines().all(|l| l.contains(" ip microvm ")), "only our table:\n{s}");
    }

    #[test]
    fn guests_get_only_dhcp_dns_and_ping_of_the_host() {
        let s = shared_script();
        let input = rules_of(&s, "host_guarded");
        assert_eq!(input.len(), 5, "{input:#?}");
        assert!(input[0].starts_with("ct state established,related accept"));
        assert!(input[1].starts_with("udp dport 67 accept"));
        assert!(input[2].starts_with("icmp type echo-request iifname . ip daddr @net_gw accept"));
        assert!(input[3].starts_with("meta l4proto { tcp, udp } th dport 53 iifname . ip daddr @net_dns accept"));
        assert!(input[4].starts_with("drop"));
        let e = network_elements(&net(Some("eth0")));
        let gw = Element::new(Key::default().ifname("mvbr-t1").ipv4(Ipv4Addr::new(10, 200, 0, 1)));
        assert!(e.contains(&(NET_GW, gw)));
        let dns = Element::new(Key::default().ifname("mvbr-t1").ipv4(Ipv4Addr::new(10, 0, 0, 53)));
        assert!(e.contains(&(NET_DNS, dns)));
        let mut n = net(Some("eth0"));
        n.dns.clear();
        assert!(!network_elements(&n).iter().any(|(s, _)| *s == NET_DNS));
    }

    #[test]
    fn allow_host_accepts_everything_but_link_local_forwarding() {
        let mut n = net(Some("eth0"));
        n.allow_host = true;
        assert_eq!(jump(&network_elements(&n), IN_NET).as_deref(), Some("host_open"));
        assert_eq!(rules_of(&shared_script(), "host_open"), vec!["accept comment \"allow-host\""]);
        // Link-local is dropped before the uplink accept.
        let from = rules_of(&shared_script(), "from_nat").join("\n");
        assert!(from.find("169.254.0.0/16 drop").unwrap() < from.find("nat: out via uplink").unwrap());
    }

    #[test]
    fn input_hook_in_base_and_upgrade() {
        assert!(base_script().contains("add chain ip microvm input { type filter hook input priority filter; policy accept; }"));
        assert!(base_script().ends_with(&input_base_script()));
    }

    #[test]
    fn shared_chains_are_rebuilt_not_doubled() {
        let s = shared_script();
        for chain in ["host_guarded", "host_open", "from_nat", "from_host_only", "to_nat", "to_host_only", "nat_out"] {
            let flush = s.find(&format!("flush chain ip microvm {chain}\n")).unwrap();
            assert!(flush < s.find(&format!("add rule ip microvm {chain} ")).unwrap(), "{chain}");
            // Never taken for an older version's per-network chain.
            assert!(!OLD_CHAINS.iter().any(|p| chain.starts_with(p)), "{chain}");
        }
    }

    #[test]
    fn base_is_only_our_table() {
        assert!(base_script().lines().all(|l| l.contains(" ip microvm")));
    }

    #[test]
    fn stderr_squeezed() {
        assert_eq!(one_line(b"\n/dev/stdin:1:1-3: Error: bad\nline\n  ^^^\n"), "/dev/stdin:1:1-3: Error: bad");
        assert_eq!(one_line(b""), "no error output");
    }
}
