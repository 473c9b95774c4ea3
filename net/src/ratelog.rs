//! Rate limiting for log lines that outsiders can trigger (e.g. malformed DHCP packets from
//! anything on a microvm network): at most one line per interval, carrying how many events
//! happened since the previous line, so a flood costs one line per interval.

use std::time::{Duration, Instant};

/// Counts events and says when one may be logged. Keep one per kind of event, owned by
/// the thread that sees them:
/// `if let Some(n) = drops.hit() { tracing::warn!(count = n, "dropped bad packets") }`.
#[derive(Debug)]
pub(crate) struct RateLimitedLog {
    interval: Duration,
    last: Option<Instant>,
    /// Events not reported yet, the current one included.
    pending: u64,
}

impl RateLimitedLog {
    pub const fn new(interval: Duration) -> RateLimitedLog {
        RateLimitedLog { interval, last: None, pending: 0 }
    }

    /// Records one event. Returns `Some(count)` when a line should be logged now, `count`
    /// being the events since the last line (this one included); `None` to stay quiet.
    /// The first event logs at once. Events after the last line of a burst are reported
    /// with the next event that comes at least `interval` later.
    pub fn hit(&mut self) -> Option<u64> {
        self.hit_at(Instant::now())
    }

    fn hit_at(&mut self, now: Instant) -> Option<u64> {
        self.pending = self.pending.saturating_add(1);
        if self.last.is_some_and(|t| now.saturating_duration_since(t) < self.interval) {
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.pending))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_interval_with_counts() {
        let mut log = RateLimitedLog::new(Duration::from_secs(10));
        let t0 = Instant::now();
        assert_eq!(log.hit_at(t0), Some(1));
        for i in 1..1000 {
            assert_eq!(log.hit_at(t0 + Duration::from_millis(i)), None);
        }
        assert_eq!(log.hit_at(t0 + Duration::from_secs(10)), Some(1000));
        assert_eq!(log.hit_at(t0 + Duration::from_secs(11)), None);
        assert_eq!(log.hit_at(t0 + Duration::from_secs(25)), Some(2));
    }
}
