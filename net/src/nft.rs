//! Firewall rules in our own nftables table, `table ip microvm` (no other table is touched).
//!
//! We drive the `nft` tool (`nft -f -` fed a generated script) rather than a netlink crate:
//! a script is applied as one atomic kernel transaction (all or nothing, so no half-built
//! ruleset on error), the rules are readable and identical to what `nft list` shows when
//! debugging, and `nft` is the reference, well-kept nftables implementation; the Rust
//! netlink crates for nf_tables are thin or unmaintained.
//!
//! Layout: two base chains dispatch through verdict maps keyed by bridge name, so each
//! network owns its own chains and map elements and can be added or removed without touching
//! the others' rules (no rule handles to track):
//! ```text
//! forward     (filter hook forward):      iifname vmap @from_net ; oifname vmap @to_net
//! postrouting (nat hook postrouting):     iifname vmap @nat_net
//! from-NAME / to-NAME / nat-NAME: per-network chains
//! ```
//! Note: nftables base chains of other tables still run at the same hooks; an `accept` here
//! cannot override a `drop` elsewhere (e.g. a Docker host's FORWARD policy drop).

use std::io::{self, Write};
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
}

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
         add rule ip {TABLE} postrouting iifname vmap @nat_net\n"
    )
}

/// Commands adding one network's chains, rules and map elements.
pub(crate) fn add_script(net: &NftNetwork) -> String {
    let (t, n, br, sub) = (TABLE, &net.name, &net.bridge, net.subnet);
    let mut s = String::new();
    for chain in ["from", "to", "nat"] {
        s += &format!("add chain ip {t} {chain}-{n}\nflush chain ip {t} {chain}-{n}\n");
    }
    // Traffic entering from the bridge. Same-bridge traffic only shows up here with
    // br_netfilter; it stays allowed. Other microvm bridges are always dropped (isolation).
    s += &format!("add rule ip {t} from-{n} oifname \"{br}\" accept comment \"same network\"\n");
    s += &format!("add rule ip {t} from-{n} oifname \"mvbr-*\" drop comment \"isolate networks\"\n");
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
    s
}

/// Commands removing one network. `with_nat` says whether a `nat_net` element exists.
/// Deleting an absent element fails the whole transaction; see [`remove_network`].
pub(crate) fn remove_commands(name: &str, bridge: &str, with_nat: bool) -> Vec<String> {
    let t = TABLE;
    let mut cmds = vec![
        format!("delete element ip {t} from_net {{ \"{bridge}\" }}"),
        format!("delete element ip {t} to_net {{ \"{bridge}\" }}"),
    ];
    if with_nat {
        cmds.push(format!("delete element ip {t} nat_net {{ \"{bridge}\" }}"));
    }
    for chain in ["from", "to", "nat"] {
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
