//! A named network's pool of idle TAPs: a VM leaving a network that stays leaves its TAP
//! behind for the next VM to join, instead of deleting it.
//!
//! Why: deleting (or closing the last fd of) a TAP unregisters it, and the kernel then waits
//! for an RCU barrier, 15-25 ms here, before the process can exit. That was most of what a
//! network adds to a short VM's life (README "Joining and leaving a network"). Attaching
//! to an existing TAP and closing a persistent one each take well under a millisecond.
//!
//! A pooled TAP is:
//! * persistent (TUNSETPERSIST), so it outlives the fd of the process that left;
//! * down, so the bridge forwards nothing to it, flushed its learned addresses, and a write
//!   to it fails;
//! * sealed: its anti-spoofing guard allows no MAC (`guard::seal`), so even a leaked fd
//!   could send nothing;
//! * a port of its network's bridge, listed in the network's `pool` state file.
//!
//! A TAP is persistent only while pooled. Taking one replaces its guard with the new guest's,
//! makes it non-persistent again, then brings it up: from then on it is deleted with its
//! last fd, like a new one, so a crashed VM still leaves nothing behind. The pool goes with
//! the network (`cleanup::teardown_network`), and stale cleanup treats pooled TAPs of live
//! networks as owned. Explicitly named TAPs (`tap=` on a named network) are never pooled.

use std::sync::Arc;

use super::{delete_created_tap, TapCleanup};
use crate::bridge::Rtnl;
use crate::emergency;
use crate::nft::guard;
use crate::spec::MacAddr;
use crate::state::StateRoot;
use crate::tap::Tap;
use crate::NetError;

/// TAPs a network keeps at most. A few cover VMs that come and go one after another; when
/// many leave at once, the rest are deleted as before (each pooled TAP costs its deletion
/// when the network goes, in parallel with the others).
pub(crate) const POOL_MAX: usize = 4;

/// Takes a TAP from network `network`'s pool for a joining NIC and readies it as
/// [`super::create_tap`] readies a new one: guarded for `mac` and `ip`, non-persistent, up.
/// `None` when the pool is empty; a pooled TAP that cannot be taken (gone, or a step fails)
/// is deleted and the next one tried. Caller holds the state lock.
pub(crate) fn take(
    root: &StateRoot,
    rtnl: &Arc<Rtnl>,
    network: &str,
    mac: MacAddr,
    ip: std::net::Ipv4Addr,
) -> Result<Option<(Tap, TapCleanup)>, NetError> {
    let mut pool = root.read_pool(network)?;
    while let Some(name) = pool.pop() {
        root.write_pool(network, &pool)?;
        // From here it is this process's: a panic deletes it.
        let tracked = emergency::track_tap(&name);
        let cleanup = TapCleanup { rtnl: rtnl.clone(), name: name.clone(), generated: true, tracked: Some(tracked) };
        match ready(rtnl, &name, mac, ip) {
            Ok(tap) => {
                tracing::debug!(network, tap = %name, "took a pooled TAP");
                return Ok(Some((tap, cleanup)));
            }
            Err(e) => {
                tracing::warn!(network, tap = %name, error = %e, "cannot reuse a pooled TAP; deleting it");
                // Deletes the TAP (persistent or not), then its guard.
                if let Err(e) = cleanup.release() {
                    tracing::warn!(tap = %name, error = %e, "cannot delete TAP device");
                }
            }
        }
    }
    Ok(None)
}

/// Attach, guard, make non-persistent, bring up: in this order, so the TAP is up only with
/// the new guest's guard, and is deleted with its fd from the moment it can carry frames.
fn ready(rtnl: &Rtnl, name: &str, mac: MacAddr, ip: std::net::Ipv4Addr) -> Result<Tap, NetError> {
    let link = rtnl.link(name)?;
    if !link.as_ref().is_some_and(|l| l.is_tun()) {
        return Err(crate::tap::TapError::NotTap { name: name.to_string() }.into());
    }
    let tap = Tap::attach_pooled(name)?;
    guard::add(&guard::Guard { tap: name.to_string(), mac, ip: Some(ip) })?;
    tap.set_persist(false)?;
    rtnl.set_up(tap.index(), name)?;
    Ok(tap)
}

/// Puts a leaving NIC's TAP into network `network`'s pool if it has room: persistent, down,
/// sealed, listed. `Ok(false)` (pool full) and errors leave the TAP as it was, non-persistent,
/// for the caller to delete. Caller holds the state lock and has checked that the network
/// stays (another live user).
pub(crate) fn put(root: &StateRoot, rtnl: &Rtnl, network: &str, tap: &Tap) -> Result<bool, NetError> {
    let mut pool = root.read_pool(network)?;
    if pool.len() >= POOL_MAX {
        return Ok(false);
    }
    tap.set_persist(true)?;
    let res = (|| -> Result<(), NetError> {
        rtnl.set_down(tap.index(), tap.name())?;
        guard::seal(tap.name())?;
        pool.push(tap.name().to_string());
        root.write_pool(network, &pool)?;
        Ok(())
    })();
    if let Err(e) = res {
        if let Err(undo) = tap.set_persist(false) {
            tracing::warn!(tap = tap.name(), error = %undo, "cannot make TAP non-persistent again");
        }
        return Err(e);
    }
    tracing::debug!(network, tap = tap.name(), "pooled TAP");
    Ok(true)
}

/// Deletes every pooled TAP of `network` (then its guard), each on a thread and netlink
/// connection of its own so that their RCU barriers overlap. Returns the first error; the
/// pool file goes with the network's state directory.
pub(crate) fn delete_all(root: &StateRoot, network: &str) -> Result<(), NetError> {
    let pool = root.read_pool(network)?;
    let results: Vec<Result<(), NetError>> = std::thread::scope(|s| {
        let jobs: Vec<_> = pool
            .iter()
            .map(|name| s.spawn(move || Rtnl::new().map_err(NetError::from).and_then(|rtnl| delete_created_tap(&rtnl, name))))
            .collect();
        jobs.into_iter().map(|j| j.join().unwrap_or(Err(NetError::ReleasePanicked))).collect()
    });
    results.into_iter().collect()
}
