//! Teardown of named networks and cleanup after crashed microvm processes.

use std::collections::HashSet;
use std::io::Read;
use std::os::unix::net::UnixStream;

use super::{bridge_name, overlay, pool};
use crate::bridge::watch::LinkWatch;
use crate::bridge::{Link, Rtnl};
use crate::nft::{self, guard};
use crate::spec::{BRIDGE_PREFIX, TAP_PREFIX, VXLAN_PREFIX};
use crate::state::{StateRoot, UserEntry};
use crate::tap::pid_from_tap_name;
use crate::NetError;

/// Drops users whose process is gone (deleting their TAPs if still present) and returns
/// the live ones. Caller holds the state lock.
pub(crate) fn prune_users(root: &StateRoot, rtnl: &Rtnl, name: &str) -> Result<Vec<UserEntry>, NetError> {
    let users = root.read_users(name)?;
    let (live, dead): (Vec<_>, Vec<_>) = users.into_iter().partition(UserEntry::alive);
    if dead.is_empty() {
        return Ok(live);
    }
    for u in &dead {
        tracing::info!(network = name, pid = u.pid, tap = %u.tap, "dropping user whose process is gone");
        delete_tap(rtnl, &u.tap);
    }
    root.write_users(name, &live)?;
    Ok(live)
}

/// Deletes a TAP (only a tun/tap device of that name). Logs failures.
fn delete_tap(rtnl: &Rtnl, tap: &str) {
    if let Err(e) = delete_created_tap(rtnl, tap) {
        tracing::warn!(tap, error = %e, "cannot delete TAP device");
    }
}

/// Deletes TAP `tap` if it exists and is a tun/tap device (gone already is fine), then its
/// anti-spoofing guard: in this order, so a live TAP is never unguarded. The guard goes
/// even if the TAP could not be deleted; the first error is returned.
pub(crate) fn delete_created_tap(rtnl: &Rtnl, tap: &str) -> Result<(), NetError> {
    let deleted = match rtnl.link(tap) {
        Ok(Some(l)) if l.is_tun() => rtnl.delete_link(l.index, tap).map_err(NetError::from),
        Ok(_) => Ok(()),
        Err(e) => Err(e.into()),
    };
    let unguarded = guard::remove(tap).map_err(NetError::from);
    deleted.and(unguarded)
}

/// Removes guards whose TAP is gone (a crashed process's TAPs vanish with their fds).
fn cleanup_stale_guards(rtnl: &Rtnl) -> Result<(), NetError> {
    for tap in guard::guarded_taps()? {
        if rtnl.link(&tap)?.is_none() {
            tracing::info!(tap = %tap, "removing anti-spoofing rules of a TAP that is gone");
            if let Err(e) = guard::remove(&tap) {
                tracing::warn!(tap = %tap, error = %e, "cannot remove stale anti-spoofing rules");
            }
        }
    }
    Ok(())
}

/// Removes this process's user entries of network `name` that `mine` selects, forgets
/// dead users, and tears the network down if no live user remains. Caller holds the state
/// lock. A network without state (torn down already) is left alone.
pub(crate) fn leave_network(
    root: &StateRoot,
    rtnl: &Rtnl,
    name: &str,
    mine: impl Fn(&UserEntry) -> bool,
) -> Result<(), NetError> {
    if root.read_record(name)?.is_none() {
        return Ok(());
    }
    let mut users = root.read_users(name)?;
    users.retain(|u| !mine(u));
    root.write_users(name, &users)?;
    let live = prune_users(root, rtnl, name)?;
    if live.is_empty() {
        teardown_network(root, rtnl, name)?;
    }
    Ok(())
}

/// Removes network `name`: VXLAN port, bridge, pooled TAPs, nft rules, state directory, and
/// the nft table if no network remains. ip_forward is left as is. Every step is tried; the
/// first failure is returned (nft rule removal is best effort and logs its own problems).
/// Caller holds the state lock.
///
/// Deleting a link waits for the kernel's RCU barrier (20-50 ms here), and so does the
/// process's exit after an nf_tables transaction that deleted something (its socket's
/// release waits for the kernel to free what was deleted, after a grace period). So the
/// waits overlap: pooled TAPs go on threads of their own, and the firewall rules go on
/// another as soon as the bridge is unregistered (`LinkWatch`), while its deletion still
/// waits, never before: no frame from the network meets a firewall without its rules.
pub(crate) fn teardown_network(root: &StateRoot, rtnl: &Rtnl, name: &str) -> Result<(), NetError> {
    let bridge = bridge_name(name);
    let mut first: Option<NetError> = None;
    let mut keep = |r: Result<(), NetError>| {
        if let Err(e) = r {
            tracing::warn!(network = name, error = %e, "network teardown step failed");
            first.get_or_insert(e);
        }
    };
    let bridge_link = match rtnl.link(&bridge) {
        Ok(l) => l.filter(Link::is_bridge),
        Err(e) => {
            keep(Err(e.into()));
            None
        }
    };
    std::thread::scope(|s| {
        let pooled = std::thread::Builder::new().name("net-pool".into()).spawn_scoped(s, || pool::delete_all(root, name));
        // Closed once the bridge's deletion has returned (or failed): the rules thread then
        // goes on, whatever the notifications said.
        let (done, returned) = UnixStream::pair().map_or((None, None), |(a, b)| (Some(a), Some(b)));
        let rules = returned.and_then(|returned| {
            let watch = bridge_link.as_ref().and_then(|_| LinkWatch::open().ok());
            let index = bridge_link.as_ref().map(|l| l.index);
            let bridge = &bridge;
            std::thread::Builder::new()
                .name("net-rules".into())
                .spawn_scoped(s, move || {
                    if let (Some(w), Some(i)) = (watch, index) {
                        w.wait_deleted(i, &returned);
                    } else {
                        wait_closed(&returned);
                    }
                    let res = remove_rules(root, name, bridge);
                    tracing::debug!(network = name, "firewall rules removed");
                    res
                })
                .ok()
        });
        // Every network, not only those whose record names an overlay: a crash between
        // creating the port and writing the record must not leave the port behind.
        keep(overlay::remove_port(rtnl, name));
        if let Some(l) = &bridge_link {
            keep(rtnl.delete_link(l.index, &bridge).map_err(NetError::from));
            tracing::debug!(network = name, %bridge, "bridge deleted");
        }
        drop(done);
        keep(match rules {
            Some(job) => job.join().unwrap_or(Err(NetError::ReleasePanicked)),
            // No thread: here, after the bridge.
            None => remove_rules(root, name, &bridge),
        });
        keep(match pooled {
            Ok(job) => job.join().unwrap_or(Err(NetError::ReleasePanicked)),
            // No thread: delete them here.
            Err(_) => pool::delete_all(root, name),
        });
    });
    keep(root.remove_network(name).map_err(NetError::from));
    match first {
        None => {
            tracing::info!(network = name, "network torn down");
            Ok(())
        }
        Some(e) => Err(e),
    }
}

/// The nft side of [`teardown_network`]: the network's rules, or the whole table if no
/// other network remains (one transaction either way). Caller holds the state lock, so the
/// set of networks cannot change meanwhile.
fn remove_rules(root: &StateRoot, name: &str, bridge: &str) -> Result<(), NetError> {
    let others = root.networks().map(|all| all.iter().any(|n| n != name));
    match others {
        Ok(false) => nft::delete_table().map_err(NetError::from),
        Ok(true) => {
            nft::remove_network(name, bridge);
            Ok(())
        }
        Err(e) => {
            nft::remove_network(name, bridge);
            Err(e.into())
        }
    }
}

/// Blocks until the other end of `sock` is closed (or anything arrives on it).
fn wait_closed(sock: &UnixStream) {
    let _ = (&*sock).read(&mut [0u8; 1]);
}

/// Startup cleanup for this network namespace: for every named network, forget users
/// whose process died (deleting their TAPs) and tear the network down if none is left;
/// delete `mvtap-*` devices no live process owns, `mvbr-*` bridges and `mvvx-*` VXLAN
/// devices without state, and overlay filter elements of ports that are gone.
///
/// Without CAP_NET_ADMIN there is nothing this process could remove, so it returns Ok
/// without doing anything (an unprivileged `--net tap=...` or `none` run still starts).
pub fn cleanup_stale() -> Result<(), NetError> {
    if !crate::caps::has_net_admin() {
        tracing::debug!("skipping stale network cleanup: no CAP_NET_ADMIN");
        return Ok(());
    }
    let root = StateRoot::open()?;
    let _lock = root.lock()?;
    let rtnl = Rtnl::new()?;
    let mut owned_taps = HashSet::new();
    for name in root.networks()? {
        let live = prune_users(&root, &rtnl, &name)?;
        if live.is_empty() {
            tracing::info!(network = %name, "tearing down network without live users");
            if let Err(e) = teardown_network(&root, &rtnl, &name) {
                tracing::warn!(network = %name, error = %e, "stale network teardown incomplete");
            }
        }
        owned_taps.extend(live.into_iter().map(|u| u.tap));
        // A live network's pooled TAPs are its own (gone with it otherwise).
        owned_taps.extend(root.read_pool(&name).unwrap_or_default());
    }
    let names = root.networks()?;
    let networks: HashSet<String> = names.iter().map(|n| bridge_name(n)).collect();
    let ports: HashSet<String> = names.iter().map(|n| overlay::vxlan_name(n)).collect();
    for link in rtnl.links()? {
        if link.name.starts_with(TAP_PREFIX) && link.is_tun() && !owned_taps.contains(&link.name) {
            // Our generated names carry the creator's pid; keep TAPs of running processes
            // (e.g. bridge= attachments, which have no users record). A persistent one is
            // ours only in a network's pool (owned above): any other was left by a process
            // killed while pooling or taking it, whoever's pid its name carries.
            let owner_alive = pid_from_tap_name(&link.name)
                .is_some_and(|pid| std::path::Path::new(&format!("/proc/{pid}")).exists());
            if !owner_alive || link.tun_persist == Some(true) {
                tracing::info!(tap = %link.name, "deleting orphan TAP device");
                delete_tap(&rtnl, &link.name);
            }
        } else if link.name.starts_with(BRIDGE_PREFIX) && link.is_bridge() && !networks.contains(&link.name) {
            tracing::info!(bridge = %link.name, "deleting orphan bridge");
            if let Err(e) = rtnl.delete_link(link.index, &link.name) {
                tracing::warn!(bridge = %link.name, error = %e, "cannot delete bridge");
            }
        } else if link.name.starts_with(VXLAN_PREFIX) && link.is_vxlan() && !ports.contains(&link.name) {
            tracing::info!(port = %link.name, "deleting orphan VXLAN device");
            if let Err(e) = rtnl.delete_link(link.index, &link.name) {
                tracing::warn!(port = %link.name, error = %e, "cannot delete VXLAN device");
            }
        }
    }
    for port in nft::overlay::ports()? {
        if !ports.contains(&port) || rtnl.link(&port)?.is_none() {
            tracing::info!(port = %port, "removing overlay rules of a VXLAN device that is gone");
            if let Err(e) = nft::overlay::remove(&port) {
                tracing::warn!(port = %port, error = %e, "cannot remove stale overlay rules");
            }
        }
    }
    if root.networks()?.is_empty() {
        nft::delete_table()?;
    }
    cleanup_stale_guards(&rtnl)
}

/// Tears down every named network of this network namespace, whoever uses it, plus all
/// `mvtap-*`/`mvbr-*`/`mvvx-*` devices and the nft tables (with every TAP's anti-spoofing guard). Meant for tests and manual recovery:
/// running VMs lose their networking.
pub fn teardown_all() -> Result<(), NetError> {
    let root = StateRoot::open()?;
    let _lock = root.lock()?;
    let rtnl = Rtnl::new()?;
    for name in root.networks()? {
        for u in root.read_users(&name)? {
            delete_tap(&rtnl, &u.tap);
        }
        if let Err(e) = teardown_network(&root, &rtnl, &name) {
            tracing::warn!(network = %name, error = %e, "network teardown incomplete");
        }
    }
    for link in rtnl.links()? {
        if link.name.starts_with(TAP_PREFIX) && link.is_tun() {
            delete_tap(&rtnl, &link.name);
        } else if (link.name.starts_with(BRIDGE_PREFIX) && link.is_bridge())
            || (link.name.starts_with(VXLAN_PREFIX) && link.is_vxlan())
        {
            if let Err(e) = rtnl.delete_link(link.index, &link.name) {
                tracing::warn!(link = %link.name, error = %e, "cannot delete link");
            }
        }
    }
    nft::delete_table()?;
    guard::delete_table()?;
    Ok(())
}
