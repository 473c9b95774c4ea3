//! Anti-spoofing of guest frames: `table bridge microvm`, one guard chain per TAP we create.
//!
//! ```text
//! prerouting (bridge filter hook prerouting):  iifname vmap @guard_tap
//! guard-TAP: ether saddr != MAC drop
//!            (nat/host-only) ether type not ip/arp/ip6 drop; ARP sender != (MAC, lease or
//!            0.0.0.0) drop; IPv4 source != lease drop, except 0.0.0.0 -> udp 68->67 (DHCP
//!            before a lease)
//! ```
//! The bridge family sees every frame a guest sends into the bridge (to other guests and to
//! the host alike), keyed by the port it came in on, which the `ip` table cannot tell apart
//! (it sees only the bridge). Filtering here rather than in the virtio-net TX path keeps the
//! policy in one place with the other firewall rules, visible with `nft list ruleset`, and
//! also covers a TAP fd that leaked to another process. The cost was measured (see the
//! README's networking section): it is small next to the per-packet cost of the TAP path.
//!
//! A guard is added after the TAP exists and before the guest runs, and removed after the
//! TAP is deleted (`network::delete_created_tap`), so there is no moment when a TAP of ours
//! forwards unguarded frames. Stale guards (of TAPs gone with a crashed process) are removed
//! by stale cleanup; a new TAP reusing a stale guard's name replaces it. The table itself
//! stays once made (empty, it passes everything): `bridge=BR` attachments do not take the
//! state lock, so deleting it when it looks unused could race with another process adding
//! its guard; only `teardown_all` removes it. Two processes creating it at once add the
//! dispatch rule twice, which is harmless.

use std::net::Ipv4Addr;

use super::{run, succeeds, NftError, TABLE};
use crate::spec::MacAddr;

/// Chain-name prefix of the per-TAP guard chains.
const PREFIX: &str = "guard-";

/// What a TAP's guest may send as.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Guard {
    pub tap: String,
    pub mac: MacAddr,
    /// The guest's lease on a named network; `None` for `bridge=BR` (addresses there are
    /// not ours to know: only the MAC is enforced).
    pub ip: Option<Ipv4Addr>,
}

/// The bridge table, its map and its base chain (only when the table is absent).
pub(crate) fn base_script() -> String {
    format!(
        "add table bridge {TABLE}\n\
         add map bridge {TABLE} guard_tap {{ type ifname : verdict; }}\n\
         add chain bridge {TABLE} prerouting {{ type filter hook prerouting priority filter; policy accept; }}\n\
         add rule bridge {TABLE} prerouting iifname vmap @guard_tap\n"
    )
}

/// Commands adding one TAP's guard chain and map element.
pub(crate) fn add_script(g: &Guard) -> String {
    let (t, c, mac) = (TABLE, format!("{PREFIX}{}", g.tap), g.mac);
    let mut s = format!("add chain bridge {t} {c}\nflush chain bridge {t} {c}\n");
    s += &format!("add rule bridge {t} {c} ether saddr != {mac} drop comment \"spoofed mac\"\n");
    if let Some(ip) = g.ip {
        s += &format!("add rule bridge {t} {c} ether type != {{ ip, arp, ip6 }} drop comment \"only ip and arp\"\n");
        s += &format!("add rule bridge {t} {c} arp saddr ether != {mac} drop comment \"spoofed arp mac\"\n");
        s += &format!("add rule bridge {t} {c} arp saddr ip != {{ 0.0.0.0, {ip} }} drop comment \"spoofed arp ip\"\n");
        s += &format!(
            "add rule bridge {t} {c} ip saddr 0.0.0.0 udp sport 68 udp dport 67 accept comment \"dhcp before a lease\"\n"
        );
        s += &format!("add rule bridge {t} {c} ip saddr != {ip} drop comment \"spoofed ip\"\n");
    }
    s += &format!("add element bridge {t} guard_tap {{ \"{}\" : jump {c} }}\n", g.tap);
    s
}

/// Commands removing one TAP's guard.
pub(crate) fn remove_script(tap: &str) -> String {
    let (t, c) = (TABLE, format!("{PREFIX}{tap}"));
    format!(
        "delete element bridge {t} guard_tap {{ \"{tap}\" }}\n\
         flush chain bridge {t} {c}\n\
         delete chain bridge {t} {c}\n"
    )
}

fn table_exists() -> Result<bool, NftError> {
    succeeds(&["list", "table", "bridge", TABLE])
}

fn guard_exists(tap: &str) -> Result<bool, NftError> {
    succeeds(&["list", "chain", "bridge", TABLE, &format!("{PREFIX}{tap}")])
}

/// Installs the guard of a TAP (and the table on first use) in one transaction, replacing a
/// stale guard of the same name.
pub(crate) fn add(g: &Guard) -> Result<(), NftError> {
    let exists = table_exists()?;
    if exists && guard_exists(&g.tap)? {
        remove(&g.tap)?;
    }
    let mut script = String::new();
    if !exists {
        script += &base_script();
    }
    script += &add_script(g);
    run(&format!("add the anti-spoofing rules of {}", g.tap), &script)
}

/// Removes a TAP's guard if there is one (one transaction).
pub(crate) fn remove(tap: &str) -> Result<(), NftError> {
    if !table_exists()? || !guard_exists(tap)? {
        return Ok(());
    }
    let action = format!("remove the anti-spoofing rules of {tap}");
    if run(&action, &remove_script(tap)).is_ok() {
        return Ok(());
    }
    // A chain without its element (never made by us; someone edited the table): the chain alone.
    run(&action, &format!("flush chain bridge {TABLE} {PREFIX}{tap}\ndelete chain bridge {TABLE} {PREFIX}{tap}\n"))
}

/// TAP names that have a guard chain.
pub(crate) fn guarded_taps() -> Result<Vec<String>, NftError> {
    if !table_exists()? {
        return Ok(Vec::new());
    }
    let out = super::output(&["list", "table", "bridge", TABLE])?;
    Ok(parse_chain_list(&out))
}

/// TAP names from `nft list table` output (`chain guard-TAP {` lines).
fn parse_chain_list(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("chain ")?.strip_suffix(" {")?.strip_prefix(PREFIX))
        .filter(|tap| crate::spec::check_ifname("tap", tap).is_ok())
        .map(String::from)
        .collect()
}

/// Deletes `table bridge microvm` if it exists.
pub(crate) fn delete_table() -> Result<(), NftError> {
    if table_exists()? {
        run("delete the microvm bridge table", &format!("delete table bridge {TABLE}\n"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guard(ip: Option<Ipv4Addr>) -> Guard {
        Guard { tap: "mvtap-7-0".into(), mac: MacAddr([0x52, 0x54, 0, 0, 0, 7]), ip }
    }

    fn rules(s: &str) -> Vec<&str> {
        s.lines().filter(|l| l.starts_with("add rule")).collect()
    }

    #[test]
    fn named_network_guard() {
        let s = add_script(&guard(Some(Ipv4Addr::new(10, 200, 0, 5))));
        let r = rules(&s);
        let c = "add rule bridge microvm guard-mvtap-7-0";
        assert_eq!(r[0], format!("{c} ether saddr != 52:54:00:00:00:07 drop comment \"spoofed mac\""));
        assert!(r[1].starts_with(&format!("{c} ether type != {{ ip, arp, ip6 }} drop")));
        assert!(r[2].starts_with(&format!("{c} arp saddr ether != 52:54:00:00:00:07 drop")));
        assert!(r[3].starts_with(&format!("{c} arp saddr ip != {{ 0.0.0.0, 10.200.0.5 }} drop")));
        assert!(r[4].starts_with(&format!("{c} ip saddr 0.0.0.0 udp sport 68 udp dport 67 accept")));
        assert!(r[5].starts_with(&format!("{c} ip saddr != 10.200.0.5 drop")));
        assert_eq!(r.len(), 6);
        assert!(s.ends_with("add element bridge microvm guard_tap { \"mvtap-7-0\" : jump guard-mvtap-7-0 }\n"));
        assert!(s.lines().all(|l| l.contains(" bridge microvm ")), "only our table:\n{s}");
    }

    #[test]
    fn bridge_mode_guard_checks_only_the_mac() {
        let s = add_script(&guard(None));
        assert_eq!(rules(&s).len(), 1);
        assert!(!s.contains("ip saddr") && !s.contains("arp"));
    }

    #[test]
    fn removal_element_first_and_only_this_tap() {
        let s = remove_script("mvtap-7-0");
        let lines: Vec<&str> = s.lines().collect();
        assert!(lines[0].starts_with("delete element bridge microvm guard_tap { \"mvtap-7-0\" }"));
        assert!(lines.iter().all(|l| l.contains("mvtap-7-0")));
    }

    #[test]
    fn chain_list_parsing() {
        let out = "table bridge microvm {\n\tchain prerouting {\n\t\ttype filter hook prerouting priority filter; policy accept;\n\t}\n\
                   \tchain guard-mvtap-1-0 {\n\t}\n\tchain guard-bad;name {\n\t}\n\tchain guard-t2 {\n\t}\n}\n";
        assert_eq!(parse_chain_list(out), vec!["mvtap-1-0".to_string(), "t2".to_string()]);
    }

    #[test]
    fn base_is_only_our_table() {
        assert!(base_script().lines().all(|l| l.contains(" bridge microvm")));
    }
}
