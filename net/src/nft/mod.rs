//! Firewall rules in our own nftables table, `table ip microvm` (no other table is touched).
//!
//! We drive the `nft` tool (`nft -f -` fed a generated script) rather than a netlink crate:
//! a script is applied as one atomic kernel transaction (all or nothing, so no half-built
//! ruleset on error), the rules are readable and identical to what `nft list` shows when
//! debugging, and `nft` is the reference, well-kept nftables implementation; the Rust
//! netlink crates for nf_tables are thin or unmaintained.
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

use std::io::{self, Write};
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};

use crate::spec::Subnet;

/// Our table's name (family `ip`).
pub const TABLE: &str = "microvm";

/// nftables errors.
#[derive(Debug, thiserror::Error)]
pub enum NftError {
    #[error("cannot run nft (is the nftables package installed?)")]
    Spawn(#[source] io::Error),
    #[error("nft failed to {action}: {stderr}")]
    Failed { action: String, stderr: String },
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

/// Commands removing one network. `with_nat` says whether a `nat_net` element exists.
/// Deleting an absent element fails the whole transaction; see [`remove_network`].
pub(crate) fn remove_commands(name: &str, bridge: &str, with_nat: bool) -> Vec<String> {
    let t = TABLE;
    let mut cmds = vec![
        format!("delete element ip {t} in_net {{ \"{bridge}\" }}"),
        format!("delete element ip {t} from_net {{ \"{bridge}\" }}"),
        format!("delete element ip {t} to_net {{ \"{bridge}\" }}"),
    ];
    if with_nat {
        cmds.push(format!("delete element ip {t} nat_net {{ \"{bridge}\" }}"));
    }
    for chain in CHAINS {
        cmds.push(format!("flush chain ip {t} {chain}-{name}"));
        cmds.push(format!("delete chain ip {t} {chain}-{name}"));
    }
    cmds
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

/// Whether `table ip microvm` exists.
pub(crate) fn table_exists() -> Result<bool, NftError> {
    succeeds(&["list", "table", "ip", TABLE])
}

/// Runs `nft ARGS` quietly and reports whether it succeeded.
fn succeeds(args: &[&str]) -> Result<bool, NftError> {
    let status = Command::new("nft")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map_err(NftError::Spawn)?;
    Ok(status.success())
}

/// Runs `nft ARGS` and returns its standard output.
fn output(args: &[&str]) -> Result<String, NftError> {
    let out = Command::new("nft").args(args).stdin(Stdio::null()).output().map_err(NftError::Spawn)?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(NftError::Failed { action: format!("run nft {}", args.join(" ")), stderr: one_line(&out.stderr) })
    }
}

/// Whether chain `chain` exists in our table.
fn chain_exists(chain: &str) -> Result<bool, NftError> {
    succeeds(&["list", "chain", "ip", TABLE, chain])
}

/// Installs one network's rules (and the table on first use) in one transaction.
pub(crate) fn add_network(net: &NftNetwork) -> Result<(), NftError> {
    // Leftovers of a crashed process would make `add element` fail: clear them first.
    let exists = table_exists()?;
    if exists && chain_exists(&format!("from-{}", net.name))? {
        remove_network(&net.name, &net.bridge);
    }
    let mut script = String::new();
    if !exists {
        script += &base_script();
    } else if !chain_exists("input")? {
        script += &input_base_script();
    }
    script += &add_script(net);
    run(&format!("add firewall rules for network {}", net.name), &script)
}

/// Re-installs a network's rules if they are missing (e.g. someone flushed the ruleset
/// while the network was in use).
pub(crate) fn ensure_network(net: &NftNetwork) -> Result<(), NftError> {
    if table_exists()? && chain_exists(&format!("from-{}", net.name))? {
        return Ok(());
    }
    tracing::warn!(network = %net.name, "firewall rules missing; re-installing");
    add_network(net)
}

/// Removes one network's rules. Best effort: tries one atomic transaction, then each command
/// alone (so leftovers of a partial setup still go away). Never fails; problems are logged.
pub(crate) fn remove_network(name: &str, bridge: &str) {
    // The add transaction is atomic: no from-NAME chain means nothing of this network.
    match table_exists().and_then(|t| Ok(t && chain_exists(&format!("from-{name}"))?)) {
        Ok(true) => {}
        Ok(false) => return,
        Err(e) => {
            tracing::warn!(error = %e, "cannot check the nftables table");
            return;
        }
    }
    let action = format!("remove firewall rules of network {name}");
    // NAT networks have a nat_net element, host-only ones do not.
    for with_nat in [true, false] {
        if run(&action, &remove_commands(name, bridge, with_nat).join("\n")).is_ok() {
            return;
        }
    }
    for cmd in remove_commands(name, bridge, true) {
        // Absent pieces fail here, which is expected.
        let _ = run(&action, &cmd);
    }
}

/// Deletes `table ip microvm` if it exists.
pub(crate) fn delete_table() -> Result<(), NftError> {
    if table_exists()? {
        run("delete the microvm table", &format!("delete table ip {TABLE}\n"))?;
    }
    Ok(())
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
        let cmds = remove_commands("t1", "mvbr-t1", true);
        assert!(cmds.iter().all(|c| c.contains("t1")));
        assert!(cmds.iter().all(|c| c.contains(" ip microvm ")));
        // Elements go before the chains they jump to.
        let first_chain = cmds.iter().position(|c| c.contains("chain")).unwrap();
        assert!(cmds[..first_chain].iter().all(|c| c.contains("element")));
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
