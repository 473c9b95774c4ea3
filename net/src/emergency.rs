//! Last-resort teardown for a process about to die of a panic.
//!
//! Normally every attachment is torn down by `Attachment::release` (or its Drop). A panic
//! in any thread of microvm ends the process from the panic hook instead, with no Drop
//! run; so this crate keeps a process-wide record of what it must undo — TAPs it created
//! and named networks it is in (or joining) — and the hook calls [`emergency_teardown`].
//!
//! Entries are added before the thing they stand for is created and removed only after it
//! was torn down, so a panic at any point finds everything that may exist. Teardown steps
//! are idempotent (a TAP or user entry already gone is fine), so racing a normal release is
//! harmless. The teardown runs at most once per process, off the panicking thread, and
//! gives up after a deadline: a dying process must not hang.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Mutex, MutexGuard, TryLockError};
use std::time::{Duration, Instant};

use crate::bridge::Rtnl;
use crate::network::{delete_created_tap, leave_network};
use crate::state::{self, StateRoot};

/// How long a dying process spends tearing down at most.
const DEADLINE: Duration = Duration::from_secs(10);
/// How long to wait for another process's state lock, within `DEADLINE`.
const LOCK_WAIT: Duration = Duration::from_secs(5);

#[derive(Clone, Debug, PartialEq, Eq)]
enum Item {
    /// A TAP this process created (and has not deleted yet).
    Tap(String),
    /// A named network this process is in or joining: (state directory, name).
    Network(PathBuf, String),
}

static REGISTRY: Mutex<Vec<Item>> = Mutex::new(Vec::new());
static STARTED: AtomicBool = AtomicBool::new(false);

fn registry() -> MutexGuard<'static, Vec<Item>> {
    // Poisoning cannot leave the Vec inconsistent (push/remove only): use it anyway.
    REGISTRY.lock().unwrap_or_else(|e| e.into_inner())
}

/// One registry entry; removed when dropped.
#[derive(Debug)]
pub(crate) struct Tracked(Item);

impl Drop for Tracked {
    fn drop(&mut self) {
        let mut reg = registry();
        if let Some(i) = reg.iter().position(|it| *it == self.0) {
            reg.swap_remove(i);
        }
    }
}

fn track(item: Item) -> Tracked {
    registry().push(item.clone());
    Tracked(item)
}

/// Records a TAP about to be created by this process.
pub(crate) fn track_tap(name: &str) -> Tracked {
    track(Item::Tap(name.to_string()))
}

/// Records that this process is about to join (or create) network `name`.
pub(crate) fn track_network(root: &StateRoot, name: &str) -> Tracked {
    track(Item::Network(root.dir().to_path_buf(), name.to_string()))
}

/// For a panic hook, before the process exits: deletes every TAP this process created and
/// leaves every named network it is in, tearing a network down if this process was its
/// last user (bridge, nftables rules, state). Runs once per process (later calls return at
/// once, also when re-entered from a panic during teardown), never blocks for more than
/// about ten seconds, and never panics. Problems are logged.
///
/// After it ran, the process must exit: its attachments are gone.
pub fn emergency_teardown() {
    if STARTED.swap(true, Ordering::SeqCst) {
        return;
    }
    let Some(items) = snapshot() else {
        tracing::error!("cannot read this process's network registry; leaving the network to stale cleanup");
        return;
    };
    if items.is_empty() {
        return;
    }
    tracing::warn!(items = items.len(), "tearing down this process's networking before exiting");
    // On its own thread: the panicking thread may be in a state (a runtime context, held
    // locks) that teardown should not depend on, and a hang must not keep the process alive.
    let (done_tx, done_rx) = mpsc::channel();
    let copy = items.clone();
    let spawned = std::thread::Builder::new().name("net-teardown".into()).spawn(move || {
        teardown(copy);
        let _ = done_tx.send(());
    });
    match spawned {
        Ok(_) => {
            if done_rx.recv_timeout(DEADLINE).is_err() {
                tracing::error!("network teardown did not finish in {DEADLINE:?}; giving up");
            }
        }
        Err(_) => teardown(items),
    }
}

/// The registry's items; `None` if its lock stays taken (never expected: it is held only
/// for a push or a remove).
fn snapshot() -> Option<Vec<Item>> {
    let start = Instant::now();
    loop {
        match REGISTRY.try_lock() {
            Ok(reg) => return Some(reg.clone()),
            Err(TryLockError::Poisoned(e)) => return Some(e.into_inner().clone()),
            Err(TryLockError::WouldBlock) if start.elapsed() < Duration::from_secs(1) => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(TryLockError::WouldBlock) => return None,
        }
    }
}

fn teardown(items: Vec<Item>) {
    let rtnl = match Rtnl::new() {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "cannot open netlink for network teardown");
            return;
        }
    };
    // TAPs first: they are this process's alone, and leaving a network may delete the bridge.
    for item in &items {
        if let Item::Tap(name) = item {
            if let Err(e) = delete_created_tap(&rtnl, name) {
                tracing::warn!(tap = %name, error = %e, "cannot delete TAP device");
            }
        }
    }
    let (pid, start) = state::self_identity();
    let mut done: Vec<(&PathBuf, &String)> = Vec::new();
    for item in &items {
        let Item::Network(dir, name) = item else {
            continue;
        };
        if done.contains(&(dir, name)) {
            continue;
        }
        done.push((dir, name));
        let root = StateRoot::at(dir.clone());
        let res = root.lock_within(LOCK_WAIT).map_err(crate::NetError::from).and_then(|lock| match lock {
            Some(_lock) => leave_network(&root, &rtnl, name, |u| u.pid == pid && u.start == start),
            None => {
                tracing::error!(network = %name, "state lock busy; the next microvm start will clean this network up");
                Ok(())
            }
        });
        if let Err(e) = res {
            tracing::warn!(network = %name, error = %e, "cannot leave network");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tracked_entries_come_and_go() {
        let count = |item: &Item| registry().iter().filter(|i| *i == item).count();
        let item = Item::Tap("mvtap-test-0".into());
        let a = track_tap("mvtap-test-0");
        let b = track_tap("mvtap-test-0");
        assert_eq!(count(&item), 2);
        drop(a);
        assert_eq!(count(&item), 1);
        drop(b);
        assert_eq!(count(&item), 0);
        assert!(snapshot().is_some());
    }
}
