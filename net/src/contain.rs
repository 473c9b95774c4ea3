//! Containing panics of third-party decoders fed outsiders' bytes.
//!
//! The real defence is validating input before a library sees it (see `dhcp::wire`). As a
//! second line, such decoding runs under `catch_unwind`, so a case the validation missed
//! costs one dropped packet instead of the VM. That alone is not enough in microvm: its panic
//! hook runs *before* unwinding and would exit the process even for a panic that is about
//! to be caught. So this module also marks the thread while contained code runs, and the
//! hook asks [`panic_is_contained`] first and returns quietly when it says yes (the caller
//! here logs the panic, rate-limited, instead of the hook printing one line per packet).
//!
//! Only for pure code: a decoder that builds a value from a byte slice and touches no shared
//! state, so nothing is left half-updated when it unwinds.

use std::any::Any;
use std::cell::Cell;
use std::panic::{catch_unwind, AssertUnwindSafe};

thread_local! {
    static CONTAINED: Cell<bool> = const { Cell::new(false) };
}

/// For a panic hook: whether the panic being reported happens inside [`contain`] on this
/// thread, i.e. will be caught and handled (the hook should then neither print nor exit).
pub fn panic_is_contained() -> bool {
    CONTAINED.try_with(Cell::get).unwrap_or(false)
}

/// Runs `f`, turning a panic into `Err(message)`.
pub(crate) fn contain<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    let outer = CONTAINED.replace(true);
    let result = catch_unwind(AssertUnwindSafe(f));
    CONTAINED.set(outer);
    result.map_err(|payload| payload_message(payload.as_ref()))
}

fn payload_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "(non-string panic payload)".to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contains_and_marks_the_thread() {
        assert!(!panic_is_contained());
        assert_eq!(contain(panic_is_contained), Ok(true));
        assert!(!panic_is_contained());
        let err = contain(|| -> u8 { panic!("boom {}", 7) }).unwrap_err();
        assert_eq!(err, "boom 7");
        assert!(!panic_is_contained(), "flag restored after a panic");
    }
}
