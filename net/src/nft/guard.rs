//! Anti-spoofing of guest frames: `table bridge microvm`. The rules are fixed; what each
//! TAP may send as is data, kept in sets, so a TAP's guard comes and goes as set elements in
//! one nf_tables transaction over netlink ([`super::netlink`]) instead of an `nft` run.
//!
//! ```text
//! prerouting (bridge filter hook prerouting):  iifname vmap @guard_tap
//!     guard_tap { TAP : jump check_lease }     TAPs on named networks (MAC and lease)
//!     guard_tap { TAP : jump check_mac }       bridge=BR TAPs (MAC only)
//! check_mac:   iifname @guard_sealed drop; iifname . ether saddr != @guard_mac drop
//! check_lease: the same, then: ether type not ip/arp/ip6 drop;
//!              iifname . arp saddr ether != @guard_mac drop;
//!              ARP sender IP not 0.0.0.0 and iifname . arp saddr ip != @guard_ip drop;
//!              ip saddr 0.0.0.0 udp 68 -> 67 accept (DHCP before a lease);
//!              iifname . ip saddr != @guard_ip drop
//! guard_mac { TAP . MAC }, guard_ip { TAP . lease }, guard_sealed { TAP }  (pooled TAPs)
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
//! forwards unguarded frames. A TAP's elements are added, and removed, in one transaction;
//! adding also removes any element left under the same TAP name (a crashed process's), so a
//! reused name never inherits another guest's MAC or address. Stale guards (of TAPs gone
//! with a crashed process) are removed by stale cleanup. The table itself stays once made
//! (its sets empty, it passes everything): `bridge=BR` attachments do not take the state
//! lock, so deleting it when it looks unused could race with another process adding its
//! guard; only `teardown_all` removes it. Two processes creating it at once add the
//! dispatch rule twice, which is harmless.
//!
//! A table made by an older microvm (one `guard-TAP` chain per TAP, same `guard_tap` map)
//! is upgraded in place: the sets and check chains are added beside it, and an old guard's
//! chain is removed with its element.

use std::net::Ipv4Addr;

use super::netlink::{self, Batch, Element, Family, Key, Nfnl};
use super::{nl_err, run, NftError, TABLE};
use crate::spec::MacAddr;

/// The verdict map from TAP name to its check chain.
const MAP: &str = "guard_tap";
const MAC_SET: &str = "guard_mac";
const IP_SET: &str = "guard_ip";
/// TAPs waiting in a network's pool (see `network::pool`): nothing from them passes.
const SEALED_SET: &str = "guard_sealed";
const CHECK_MAC: &str = "check_mac";
const CHECK_LEASE: &str = "check_lease";
/// Chain-name prefix of the per-TAP guard chains of older versions.
const OLD_PREFIX: &str = "guard-";

/// What a TAP's guest may send as.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Guard {
    pub tap: String,
    pub mac: MacAddr,
    /// The guest's lease on a named network; `None` for `bridge=BR` (addresses there are
    /// not ours to know: only the MAC is enforced).
    pub ip: Option<Ipv4Addr>,
}

/// The table, its map and its base chain (only when the table is absent: `add rule` is not
/// idempotent).
pub(crate) fn base_script() -> String {
    format!(
        "add table bridge {TABLE}\n\
         add map bridge {TABLE} {MAP} {{ type ifname : verdict; }}\n\
         add chain bridge {TABLE} prerouting {{ type filter hook prerouting priority filter; policy accept; }}\n\
         add rule bridge {TABLE} prerouting iifname vmap @{MAP}\n"
    )
}

/// The sets and the check chains (idempotent: each chain is flushed before its rules).
pub(crate) fn checks_script() -> String {
    let t = TABLE;
    let mut s = format!(
        "add set bridge {t} {MAC_SET} {{ type ifname . ether_addr; }}\n\
         add set bridge {t} {IP_SET} {{ type ifname . ipv4_addr; }}\n\
         add set bridge {t} {SEALED_SET} {{ type ifname; }}\n"
    );
    let mac_rule = |c: &str| format!("add rule bridge {t} {c} iifname . ether saddr != @{MAC_SET} drop comment \"spoofed mac\"\n");
    for c in [CHECK_MAC, CHECK_LEASE] {
        s += &format!("add chain bridge {t} {c}\nflush chain bridge {t} {c}\n");
        s += &format!("add rule bridge {t} {c} iifname @{SEALED_SET} drop comment \"pooled tap\"\n");
        s += &mac_rule(c);
    }
    let c = CHECK_LEASE;
    s += &format!("add rule bridge {t} {c} ether type != {{ ip, arp, ip6 }} drop comment \"only ip and arp\"\n");
    s += &format!("add rule bridge {t} {c} iifname . arp saddr ether != @{MAC_SET} drop comment \"spoofed arp mac\"\n");
    s += &format!(
        "add rule bridge {t} {c} arp saddr ip != 0.0.0.0 iifname . arp saddr ip != @{IP_SET} drop comment \"spoofed arp ip\"\n"
    );
    s += &format!("add rule bridge {t} {c} ip saddr 0.0.0.0 udp sport 68 udp dport 67 accept comment \"dhcp before a lease\"\n");
    s += &format!("add rule bridge {t} {c} iifname . ip saddr != @{IP_SET} drop comment \"spoofed ip\"\n");
    s
}

/// Creates the table, or adds what an older version's table lacks, with `nft -f` (once per
/// network namespace).
pub(crate) fn ensure_layout() -> Result<(), NftError> {
    let action = "check the microvm bridge table";
    let script = netlink::with(|nl| {
        // The newest part of the layout: a table that has it has all of it.
        if nl.set_exists(Family::Bridge, TABLE, SEALED_SET)? {
            return Ok(None);
        }
        let base = if nl.table_exists(Family::Bridge, TABLE)? { String::new() } else { base_script() };
        Ok(Some(base + &checks_script()))
    })
    .map_err(nl_err(action))?;
    match script {
        Some(s) => run("create the anti-spoofing table", &s),
        None => Ok(()),
    }
}

/// Queues the deletion of every element (and old-style chain) of `tap`'s guard.
fn queue_removal(nl: &mut Nfnl, batch: &mut Batch, tap: &str) -> std::io::Result<()> {
    queue_removal_from(nl, batch, tap, &[MAP, MAC_SET, IP_SET, SEALED_SET])
}

/// Queues the deletion of `tap`'s elements in `sets` (and of an old-style chain its map
/// element jumps to).
fn queue_removal_from(nl: &mut Nfnl, batch: &mut Batch, tap: &str, sets: &[&str]) -> std::io::Result<()> {
    let mut old_chains = Vec::new();
    for &set in sets {
        for e in nl.elements(Family::Bridge, TABLE, set)? {
            if e.key.leading_ifname() == Some(tap) {
                batch.delete_element(set, &e);
                if let Some(chain) = e.jump.filter(|c| c.starts_with(OLD_PREFIX)) {
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

/// Installs the guard of a TAP (and the table on first use) in one transaction, replacing
/// whatever a stale guard of the same name left.
pub(crate) fn add(g: &Guard) -> Result<(), NftError> {
    ensure_layout()?;
    let action = format!("add the anti-spoofing rules of {}", g.tap);
    netlink::with(|nl| {
        let mut batch = Batch::new(Family::Bridge, TABLE);
        queue_removal(nl, &mut batch, &g.tap)?;
        let tap = Key::default().ifname(&g.tap);
        batch.add_element(MAC_SET, &Element::new(tap.clone().ether(g.mac.0)));
        let check = match g.ip {
            Some(ip) => {
                batch.add_element(IP_SET, &Element::new(tap.clone().ipv4(ip)));
                CHECK_LEASE
            }
            None => CHECK_MAC,
        };
        // Last, though all of it commits at once anyway: the TAP is checked against its
        // allowed MAC and address.
        batch.add_element(MAP, &Element::new(tap).jump(check));
        batch.commit(nl)
    })
    .map_err(nl_err(&action))
}

/// Removes a TAP's guard if there is one (one transaction).
pub(crate) fn remove(tap: &str) -> Result<(), NftError> {
    let action = format!("remove the anti-spoofing rules of {tap}");
    netlink::with(|nl| {
        let mut batch = Batch::new(Family::Bridge, TABLE);
        queue_removal(nl, &mut batch, tap)?;
        batch.commit(nl)
    })
    .map_err(nl_err(&action))
}

/// Seals the guard of a TAP put in its network's pool: the TAP goes into `guard_sealed`,
/// whose rule comes first in both check chains, so nothing from it passes whatever MAC and
/// address elements it still has (they go when the TAP is reused, by [`add`], or deleted).
/// A pooled TAP is down and nobody holds its fd, so nothing is sent anyway: this holds
/// even if it were brought up, or an fd of it had leaked.
///
/// Only an element is added, on purpose: a transaction that deletes elements leaves the
/// kernel work to free them after an RCU grace period, and closing this process's
/// nf_tables socket (at its exit, moments after leaving) would wait for that work, 15-20 ms
/// here. One transaction.
pub(crate) fn seal(tap: &str) -> Result<(), NftError> {
    let action = format!("seal the anti-spoofing rules of {tap}");
    netlink::with(|nl| {
        let mut batch = Batch::new(Family::Bridge, TABLE);
        batch.add_element(SEALED_SET, &Element::new(Key::default().ifname(tap)));
        batch.commit(nl)
    })
    .map_err(nl_err(&action))
}

/// TAP names that have a guard.
pub(crate) fn guarded_taps() -> Result<Vec<String>, NftError> {
    let lists = netlink::with(|nl| {
        [MAP, MAC_SET, IP_SET, SEALED_SET].iter().map(|set| nl.elements(Family::Bridge, TABLE, set)).collect::<Result<Vec<_>, _>>()
    })
    .map_err(nl_err("list the anti-spoofing rules"))?;
    let mut taps: Vec<String> = Vec::new();
    for e in lists.iter().flatten() {
        if let Some(tap) = e.key.leading_ifname().filter(|t| crate::spec::check_ifname("tap", t).is_ok()) {
            if !taps.iter().any(|t| t == tap) {
                taps.push(tap.to_string());
            }
        }
    }
    Ok(taps)
}

/// Deletes `table bridge microvm` if it exists.
pub(crate) fn delete_table() -> Result<(), NftError> {
    super::delete_table_of(Family::Bridge).map_err(nl_err("delete the microvm bridge table"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn named_network_checks() {
        let s = checks_script();
        let r: Vec<&str> = s.lines().filter(|l| l.starts_with("add rule bridge microvm check_lease")).collect();
        let c = "add rule bridge microvm check_lease";
        assert_eq!(r[0], format!("{c} iifname @guard_sealed drop comment \"pooled tap\""));
        assert_eq!(r[1], format!("{c} iifname . ether saddr != @guard_mac drop comment \"spoofed mac\""));
        assert!(r[2].starts_with(&format!("{c} ether type != {{ ip, arp, ip6 }} drop")));
        assert!(r[3].starts_with(&format!("{c} iifname . arp saddr ether != @guard_mac drop")));
        assert!(r[4].starts_with(&format!("{c} arp saddr ip != 0.0.0.0 iifname . arp saddr ip != @guard_ip drop")));
        assert!(r[5].starts_with(&format!("{c} ip saddr 0.0.0.0 udp sport 68 udp dport 67 accept")));
        assert!(r[6].starts_with(&format!("{c} iifname . ip saddr != @guard_ip drop")));
        assert_eq!(r.len(), 7);
        assert!(s.lines().all(|l| l.contains(" bridge microvm ")), "only our table:\n{s}");
    }

    #[test]
    fn bridge_mode_checks_only_the_mac() {
        let s = checks_script();
        let r: Vec<&str> = s.lines().filter(|l| l.starts_with("add rule bridge microvm check_mac")).collect();
        assert_eq!(
            r,
            vec![
                "add rule bridge microvm check_mac iifname @guard_sealed drop comment \"pooled tap\"",
                "add rule bridge microvm check_mac iifname . ether saddr != @guard_mac drop comment \"spoofed mac\""
            ]
        );
    }

    #[test]
    fn check_chains_are_rebuilt_not_doubled() {
        // Each check chain is flushed before its rules, so running the script twice (two
        // processes upgrading an old table at once) leaves one copy of each rule.
        let s = checks_script();
        for c in [CHECK_MAC, CHECK_LEASE] {
            let flush = s.find(&format!("flush chain bridge microvm {c}\n")).unwrap();
            let first_rule = s.find(&format!("add rule bridge microvm {c} ")).unwrap();
            assert!(flush < first_rule);
        }
        // The check chains can never be taken for an old per-TAP guard chain.
        assert!(!CHECK_MAC.starts_with(OLD_PREFIX) && !CHECK_LEASE.starts_with(OLD_PREFIX));
    }

    #[test]
    fn base_is_only_our_table() {
        assert!(base_script().lines().all(|l| l.contains(" bridge microvm")));
    }
}
