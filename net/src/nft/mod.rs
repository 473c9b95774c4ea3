//! Firewall rules in our own nftables table, `table ip microvm` (no other table is touched).
//!
//! Rules are written by the `nft` tool (`nft -f -` fed a generated script) rather than a
//! netlink crate: a script is applied as one atomic kernel transaction (all or nothing, so
//! no half-built ruleset on error), the rules are readable and identical to what `nft list`
//! shows when debugging, and `nft` is the reference, well-kept nftables implementation; the
//! Rust netlink crates for nf_tables are thin, unmaintained or GPL. `nft` runs only when a
//! network (or a table) is created. Everything else — existence checks, removals, the
//! per-TAP guards of [`guard`] — is a handful of nf_tables netlink messages ([`netlink`]):
//! an `nft` run costs 10-17 ms of fork, exec and cache fill, a netlink round trip well under
//! one, and joining or leaving a network runs no `nft` at all.
//!
//! Layout: base chains dispatch through verdict maps keyed by bridge name, so each
//! network owns its own chains and map elements and can be added or removed without touching
//! the others' rules (no rule handles to track):
//! ```text
//! input       (filter hook input):        iifname vmap @in_net
//! forward     (filter hook forward):      iifname vmap @from_net ; oifname vmap @to_net
//! postrouting (nat hook postrouting):     iifname vmap @nat_net
//! in-NAME / from-NAME / to-NAME / nat-NAME: per-network chains
//! ```
//!
//! Guest-to-host policy (`in-NAME`, traffic a guest sends to any address of the host): by
//! default the host accepts only replies to connections it opened (conntrack
//! established/related), DHCP (udp port 67), ping (ICMP echo-request) of the gateway, and DNS
//! (port 53) to the resolvers DHCP offers in case one of them is a host address; everything
//! else is dropped, so host services listening on 0.0.0.0 are closed to guests. `allow-host`
//! replaces that chain with a plain accept. Forwarded traffic to link-local addresses
//! (169.254.0.0/16, e.g. a cloud metadata service) is dropped in every mode: NAT would
//! otherwise send it out with the host's identity. IPv6 is off on the bridge of a network
//! without `allow-host` (see `network`), so the host is not reachable over IPv6 either.
//!
//! Anti-spoofing of the guests' frames lives in a second table, `table bridge microvm`
//! (module [`guard`]).
//! Note: nftables base chains of other tables still run at the same hooks; an `accept` here
//! cannot override a `drop` elsewhere (e.g. a Docker host's FORWARD policy drop).

pub(crate) mod guard;
pub(crate) mod netlink;

use std::io::{self, Write};
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};

use crate::spec::Subnet;
use netlink::{Batch, Family, Key, Nfnl};

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

/// Commands creating the table, maps and base chains (only when the table is absent:
/// `add rule` is not idempotent).
pub(crate) fn base_script() -> String {
    format!(
        "add table ip {TABLE}\n\
         add map ip {TABLE} from_net {{ type ifname : verdict; }}\n\
         add map ip {TABLE} to_net {{ type ifname : verdict; }}\n\
         add map ip {TABLE} nat_net {{ type ifname : verdict; }}\n\
         add chain ip {TABLE} forward {{ type filter hook forward priority filter; policy accept; }}\n\
         add chain ip {TABLE} postrouting {{ type nat hook postrouting priority srcnat; policy accept; }}\n\
         add rule ip {TABLE} forward iifname vmap @from_net\n\
         add rule ip {TABLE} forward oifname vmap @to_net\n\
         add rule ip {TABLE} postrouting iifname vmap @nat_net\n{}",
        input_base_script()
    )
}

/// The input hook's map and chain: also added on their own to a table made by an older
/// microvm that had none.
pub(crate) fn input_base_script() -> String {
    format!(
        "add map ip {TABLE} in_net {{ type ifname : verdict; }}\n\
         add chain ip {TABLE} input {{ type filter hook input priority filter; policy accept; }}\n\
         add rule ip {TABLE} input iifname vmap @in_net\n"
    )
}

/// Commands adding one network's chains, rules and map elements.
pub(crate) fn add_script(net: &NftNetwork) -> String {
    let (t, n, br, sub) = (TABLE, &net.name, &net.bridge, net.subnet);
    let mut s = String::new();
    for chain in CHAINS {
        s += &format!("add chain ip {t} {chain}-{n}\nflush chain ip {t} {chain}-{n}\n");
    }
    s += &input_rules(net);
    // Traffic entering from the bridge. Same-bridge traffic only shows up here with
    // br_netfilter; it stays allowed. Other microvm bridges are always dropped (isolation).
    s += &format!("add rule ip {t} from-{n} oifname \"{br}\" accept comment \"same network\"\n");
    s += &format!("add rule ip {t} from-{n} oifname \"mvbr-*\" drop comment \"isolate networks\"\n");
    s += &format!("add rule ip {t} from-{n} ip daddr {LINK_LOCAL} drop comment \"no link-local (cloud metadata)\"\n");
    match &net.uplink {
        Some(up) => {
            s += &format!("add rule ip {t} from-{n} ip saddr {sub} oifname \"{up}\" accept comment \"nat: out via uplink\"\n");
            s += &format!("add rule ip {t} from-{n} drop comment \"nat: only via uplink\"\n");
            s += &format!("add rule ip {t} to-{n} iifname \"{br}\" accept\n");
            s += &format!("add rule ip {t} to-{n} ct state established,related accept comment \"nat: replies\"\n");
            s += &format!("add rule ip {t} to-{n} drop comment \"nat: no inbound connections\"\n");
            s += &format!("add rule ip {t} nat-{n} ip saddr {sub} oifname \"{up}\" masquerade\n");
            s += &format!("add element ip {t} nat_net {{ \"{br}\" : jump nat-{n} }}\n");
        }
        None => {
            s += &format!("add rule ip {t} from-{n} drop comment \"host-only: no forwarding\"\n");
            s += &format!("add rule ip {t} to-{n} iifname \"{br}\" accept\n");
            s += &format!("add rule ip {t} to-{n} drop comment \"host-only: no forwarding\"\n");
        }
    }
    s += &format!("add element ip {t} from_net {{ \"{br}\" : jump from-{n} }}\n");
    s += &format!("add element ip {t} to_net {{ \"{br}\" : jump to-{n} }}\n");
    s += &format!("add element ip {t} in_net {{ \"{br}\" : jump in-{n} }}\n");
    s
}

/// Per-network chains, in removal order.
const CHAINS: [&str; 4] = ["in", "from", "to", "nat"];

/// `in-NAME`: what the host accepts from the network's guests (see the module docs).
fn input_rules(net: &NftNetwork) -> String {
    let (t, n) = (TABLE, &net.name);
    if net.allow_host {
        return format!("add rule ip {t} in-{n} accept comment \"allow-host\"\n");
    }
    let gw = net.subnet.gateway();
    let mut s = format!("add rule ip {t} in-{n} ct state established,related accept comment \"replies to the host\"\n");
    s += &format!("add rule ip {t} in-{n} udp dport 67 accept comment \"dhcp\"\n");
    s += &format!("add rule ip {t} in-{n} ip daddr {gw} icmp type echo-request accept comment \"ping the gateway\"\n");
    if !net.dns.is_empty() {
        let dns = net.dns.iter().map(Ipv4Addr::to_string).collect::<Vec<_>>().join(", ");
        s += &format!("add rule ip {t} in-{n} ip daddr {{ {dns} }} meta l4proto {{ tcp, udp }} th dport 53 accept comment \"dns on the host\"\n");
    }
    s += &format!("add rule ip {t} in-{n} drop comment \"no host access without allow-host\"\n");
    s
}

/// One step of removing a network's rules (see [`removal_steps`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Step {
    /// Delete the bridge's element from this verdict map.
    DeleteElement(&'static str),
    FlushChain(String),
    DeleteChain(String),
}

/// Steps removing one network, elements before the chains they jump to. `with_nat` says
/// whether a `nat_net` element exists. Deleting an absent element fails the whole
/// transaction; see [`remove_network`].
pub(crate) fn removal_steps(name: &str, with_nat: bool) -> Vec<Step> {
    let mut steps = vec![Step::DeleteElement("in_net"), Step::DeleteElement("from_net"), Step::DeleteElement("to_net")];
    if with_nat {
        steps.push(Step::DeleteElement("nat_net"));
    }
    for chain in CHAINS {
        steps.push(Step::FlushChain(format!("{chain}-{name}")));
        steps.push(Step::DeleteChain(format!("{chain}-{name}")));
    }
    steps
}

fn queue(batch: &mut Batch, bridge: &str, step: &Step) {
    match step {
        Step::DeleteElement(map) => batch.delete_element(map, &Key::default().ifname(bridge)),
        Step::FlushChain(c) => batch.flush_chain(c),
        Step::DeleteChain(c) => batch.delete_chain(c),
    };
}

fn nl_err(action: &str) -> impl FnOnce(io::Error) -> NftError + '_ {
    move |source| NftError::Netlink { action: action.to_string(), source }
}

/// Runs `nft [args] -f -` with `script` on stdin.
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

/// Installs one network's rules (and the table on first use) in one transaction.
pub(crate) fn add_network(net: &NftNetwork) -> Result<(), NftError> {
    let action = format!("add firewall rules for network {}", net.name);
    let from = format!("from-{}", net.name);
    // Leftovers of a crashed process would make `add element` fail: clear them first.
    let base = netlink::with(|nl| {
        if !nl.table_exists(Family::Ip, TABLE)? {
            return Ok(base_script());
        }
        if nl.chain_exists(Family::Ip, TABLE, &from)? {
            remove_network_with(nl, &net.name, &net.bridge);
        }
        Ok(if nl.chain_exists(Family::Ip, TABLE, "input")? { String::new() } else { input_base_script() })
    })
    .map_err(nl_err(&action))?;
    run(&action, &(base + &add_script(net)))
}

/// Re-installs a network's rules if they are missing (e.g. someone flushed the ruleset
/// while the network was in use).
pub(crate) fn ensure_network(net: &NftNetwork) -> Result<(), NftError> {
    let action = format!("check the firewall rules of network {}", net.name);
    // A missing table answers "no such chain" too.
    let from = format!("from-{}", net.name);
    if netlink::with(|nl| nl.chain_exists(Family::Ip, TABLE, &from)).map_err(nl_err(&action))? {
        return Ok(());
    }
    tracing::warn!(network = %net.name, "firewall rules missing; re-installing");
    add_network(net)
}

/// Removes one network's rules. Best effort: tries one atomic transaction, then each step
/// alone (so leftovers of a partial setup still go away). Never fails; problems are logged.
pub(crate) fn remove_network(name: &str, bridge: &str) {
    let res = netlink::with(|nl| {
        remove_network_with(nl, name, bridge);
        Ok(())
    });
    if let Err(e) = res {
        tracing::warn!(error = %e, network = name, "cannot open nf_tables netlink to remove firewall rules");
    }
}

fn remove_network_with(nl: &mut Nfnl, name: &str, bridge: &str) {
    // The add transaction is atomic: no from-NAME chain means nothing of this network.
    match nl.chain_exists(Family::Ip, TABLE, &format!("from-{name}")) {
        Ok(true) => {}
        Ok(false) => return,
        Err(e) => {
            tracing::warn!(error = %e, "cannot check the nftables table");
            return;
        }
    }
    // NAT networks have a nat_net element, host-only ones do not.
    for with_nat in [true, false] {
        let mut batch = Batch::new(Family::Ip, TABLE);
        for step in removal_steps(name, with_nat) {
            queue(&mut batch, bridge, &step);
        }
        if batch.commit(nl).is_ok() {
            return;
        }
    }
    for step in removal_steps(name, true) {
        // Absent pieces fail here, which is expected.
        let mut batch = Batch::new(Family::Ip, TABLE);
        queue(&mut batch, bridge, &step);
        if let Err(e) = batch.commit(nl) {
            tracing::debug!(network = name, ?step, error = %e, "removal step failed");
        }
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

    #[test]
    fn nat_rules() {
        let s = add_script(&net(Some("eth0")));
        assert!(s.contains("add rule ip microvm nat-t1 ip saddr 10.200.0.0/24 oifname \"eth0\" masquerade"));
        assert!(s.contains("from-t1 oifname \"mvbr-*\" drop"));
        assert!(s.contains("to-t1 ct state established,related accept"));
        assert!(s.contains("add element ip microvm nat_net { \"mvbr-t1\" : jump nat-t1 }"));
        assert!(s.contains("add element ip microvm from_net { \"mvbr-t1\" : jump from-t1 }"));
        // Same-network accept must come before the isolation drop.
        assert!(s.find("same network").unwrap() < s.find("isolate networks").unwrap());
        assert!(s.lines().all(|l| l.contains(" ip microvm ")), "only our table:\n{s}");
    }

    #[test]
    fn host_only_rules() {
        let s = add_script(&net(None));
        assert!(!s.contains("masquerade"));
        assert!(!s.contains("nat_net"));
        assert!(s.contains("from-t1 drop"));
        assert!(s.contains("to-t1 drop"));
    }

    #[test]
    fn guests_get_only_dhcp_dns_and_ping_of_the_host() {
        for uplink in [Some("eth0"), None] {
            let s = add_script(&net(uplink));
            let input: Vec<&str> = s.lines().filter(|l| l.contains(" in-t1 ") && l.contains("add rule")).collect();
            assert_eq!(input.len(), 5, "{input:#?}");
            assert!(input[0].ends_with("in-t1 ct state established,related accept comment \"replies to the host\""));
            assert!(input[1].contains("in-t1 udp dport 67 accept"));
            assert!(input[2].contains("in-t1 ip daddr 10.200.0.1 icmp type echo-request accept"));
            assert!(input[3].contains("in-t1 ip daddr { 10.0.0.53 } meta l4proto { tcp, udp } th dport 53 accept"));
            assert!(input[4].contains("in-t1 drop"));
            assert!(s.contains("add element ip microvm in_net { \"mvbr-t1\" : jump in-t1 }"));
            assert!(s.contains("from-t1 ip daddr 169.254.0.0/16 drop"));
        }
        let mut n = net(Some("eth0"));
        n.dns.clear();
        assert!(!add_script(&n).contains("dport 53"));
    }

    #[test]
    fn allow_host_accepts_everything_but_link_local_forwarding() {
        let mut n = net(Some("eth0"));
        n.allow_host = true;
        let s = add_script(&n);
        let input: Vec<&str> = s.lines().filter(|l| l.contains(" in-t1 ") && l.contains("add rule")).collect();
        assert_eq!(input, vec!["add rule ip microvm in-t1 accept comment \"allow-host\""]);
        // Link-local is dropped before the uplink accept.
        assert!(s.find("169.254.0.0/16 drop").unwrap() < s.find("nat: out via uplink").unwrap());
    }

    #[test]
    fn input_hook_in_base_and_upgrade() {
        assert!(base_script().contains("add chain ip microvm input { type filter hook input priority filter; policy accept; }"));
        assert!(base_script().ends_with(&input_base_script()));
    }

    #[test]
    fn removal_touches_only_this_network() {
        let steps = removal_steps("t1", true);
        let chains: Vec<&String> = steps
            .iter()
            .filter_map(|s| match s {
                Step::FlushChain(c) | Step::DeleteChain(c) => Some(c),
                Step::DeleteElement(_) => None,
            })
            .collect();
        assert_eq!(chains.len(), 8);
        assert!(chains.iter().all(|c| c.ends_with("-t1")));
        // Elements go before the chains they jump to; each chain is emptied before it goes.
        let first_chain = steps.iter().position(|s| !matches!(s, Step::DeleteElement(_))).unwrap();
        assert_eq!(first_chain, 4);
        assert!(steps[first_chain..].iter().all(|s| !matches!(s, Step::DeleteElement(_))));
        assert!(!removal_steps("t1", false).contains(&Step::DeleteElement("nat_net")));
        for (i, s) in steps.iter().enumerate() {
            if let Step::DeleteChain(c) = s {
                assert_eq!(steps[i - 1], Step::FlushChain(c.clone()));
            }
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
