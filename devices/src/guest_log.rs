//! Rate-limited logging of guest-triggered warnings.
//!
//! A hostile or buggy guest can make a device complain as fast as it can write a register or
//! publish a descriptor chain. Every such warning goes through the device's [`GuestLog`]: at
//! most [`LINES_PER_WINDOW`] lines per [`WINDOW`], then one summary line ("N more ... were
//! suppressed") with the next allowed line, or when the log is dropped. Written here (a dozen
//! lines of state) rather than pulled in: tracing has no per-callsite-group rate limiting.
//!
//! Use it through [`guest_warn!`](crate::guest_warn): `guest_warn!(log, field = x, "message")`.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use tracing::warn;

/// Lines a device may log per [`WINDOW`] for guest-triggered conditions.
pub const LINES_PER_WINDOW: u32 = 5;
/// Length of a rate-limiting window.
pub const WINDOW: Duration = Duration::from_secs(1);

/// The guest-triggered warnings of one device.
#[derive(Debug)]
pub struct GuestLog {
    /// Log prefix, e.g. "virtio-blk".
    name: String,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    window_start: Option<Instant>,
    /// Lines allowed in the current window.
    lines: u32,
    /// Lines suppressed since the last summary.
    suppressed: u64,
    /// Lines allowed (summaries included) since creation.
    emitted: u64,
    /// Lines suppressed since creation.
    suppressed_total: u64,
}

impl GuestLog {
    /// A log for the device called `name` (used in the summary line).
    pub fn new(name: impl Into<String>) -> Self {
        GuestLog {
            name: name.into(),
            state: Mutex::new(State::default()),
        }
    }

    /// Whether one more line may be logged now. Logs the summary of the lines suppressed in
    /// the previous window first, if any.
    pub fn allow(&self) -> bool {
        let mut s = crate::virtio::lock(&self.state);
        let now = Instant::now();
        if s.window_start
            .is_none_or(|t| now.duration_since(t) >= WINDOW)
        {
            if s.suppressed > 0 {
                warn!(
                    "{}: {} more guest-triggered warnings were suppressed",
                    self.name, s.suppressed
                );
                s.emitted += 1;
                s.suppressed = 0;
            }
            s.window_start = Some(now);
            s.lines = 0;
        }
        if s.lines < LINES_PER_WINDOW {
            s.lines += 1;
            s.emitted += 1;
            true
        } else {
            s.suppressed += 1;
            s.suppressed_total += 1;
            false
        }
    }

    /// (lines allowed including summaries, lines suppressed) since creation.
    pub fn counts(&self) -> (u64, u64) {
        let s = crate::virtio::lock(&self.state);
        (s.emitted, s.suppressed_total)
    }
}

impl Drop for GuestLog {
    fn drop(&mut self) {
        let s = crate::virtio::lock(&self.state);
        if s.suppressed > 0 {
            warn!(
                "{}: {} more guest-triggered warnings were suppressed",
                self.name, s.suppressed
            );
        }
    }
}

/// `tracing::warn!` through a [`GuestLog`]: `guest_warn!(log, fields..., "message")`.
#[macro_export]
macro_rules! guest_warn {
    ($log:expr, $($arg:tt)+) => {
        if $log.allow() {
            ::tracing::warn!($($arg)+);
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_per_window_then_summary() {
        let log = GuestLog::new("test");
        let allowed = (0..10_000).filter(|_| log.allow()).count();
        // The loop runs in far less than a window; allow for one window boundary anyway.
        assert!(allowed >= LINES_PER_WINDOW as usize);
        assert!(allowed <= 2 * LINES_PER_WINDOW as usize, "{allowed} lines");
        let (emitted, suppressed) = log.counts();
        assert_eq!(emitted + suppressed, 10_000 + emitted - allowed as u64);
        assert!(suppressed >= 10_000 - 2 * u64::from(LINES_PER_WINDOW));
        // After the window: one summary plus the line.
        std::thread::sleep(WINDOW);
        assert!(log.allow());
        let (emitted2, _) = log.counts();
        assert_eq!(emitted2, emitted + 2);
    }
}
