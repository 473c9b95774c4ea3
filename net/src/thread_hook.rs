//! A hook run at the start of every thread the net crate spawns that handles input from the
//! network (the DHCP responders), before it reads anything. microvm installs the thread's
//! seccomp filter here; net itself knows nothing about seccomp (the filters live in vmm,
//! with the others).

use std::sync::OnceLock;

/// The hook's error, reported by `attach` (the thread then serves nothing).
pub type HookError = Box<dyn std::error::Error + Send + Sync>;

/// What runs at thread start; it gets the thread's kind (`"dhcp"`).
pub type ThreadStartHook = Box<dyn Fn(&str) -> Result<(), HookError> + Send + Sync>;

static HOOK: OnceLock<ThreadStartHook> = OnceLock::new();

/// Sets the hook for the rest of the process (before the first `attach`). Returns false
/// if one was set already (the first one stays).
pub fn set_thread_start_hook(hook: ThreadStartHook) -> bool {
    HOOK.set(hook).is_ok()
}

/// Runs the hook, if any, on the calling thread.
pub(crate) fn run(kind: &str) -> Result<(), HookError> {
    match HOOK.get() {
        Some(hook) => hook(kind),
        None => Ok(()),
    }
}
