//! A single token bucket with time-based refill.
//!
//! All methods that depend on the current time have an `*_at(.., now)` variant taking the
//! time explicitly, so the refill arithmetic is testable without sleeping.

use std::time::{Duration, Instant};

const NANOS_PER_SEC: u128 = 1_000_000_000;
/// Longest delay the bucket ever computes (~136 years): keeps `Instant` arithmetic and timer
/// values far from overflow whatever the token counts.
const MAX_DELAY_NS: u128 = (1u128 << 32) * NANOS_PER_SEC;

/// Configuration of one [`TokenBucket`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BucketConfig {
    /// Sustained refill rate, in tokens per second. Must be non-zero.
    pub rate: u64,
    /// Bucket capacity (the largest burst after an idle period). `None` means one second worth
    /// of tokens (`rate`).
    pub size: Option<u64>,
    /// Extra tokens available once, at start, on top of `size`. They are spent first and never
    /// refilled.
    pub one_time_burst: Option<u64>,
}

impl BucketConfig {
    /// A bucket refilled at `rate` tokens per second with a capacity of one second worth.
    pub fn new(rate: u64) -> Self {
        BucketConfig {
            rate,
            size: None,
            one_time_burst: None,
        }
    }
}

/// Outcome of a consume attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BucketReduction {
    /// The tokens were taken.
    Success,
    /// Not enough tokens; nothing was taken. Tokens will be available after the given delay
    /// (assuming nobody else consumes).
    Failure(Duration),
}

/// Token bucket: `size` tokens at most, refilled continuously at `rate` tokens/s.
///
/// A request larger than `size` can never be satisfied from the bucket alone; it is allowed
/// once the bucket is full and the excess is paid back as "debt": refill does not resume until
/// the time that the excess tokens would have taken to accumulate has passed. The long-term
/// rate therefore stays `rate` whatever the request sizes.
#[derive(Clone, Debug)]
pub struct TokenBucket {
    rate: u64,
    size: u64,
    budget: u64,
    one_time_burst: u64,
    /// Refill is accounted up to this instant. May lie in the future while a debt is repaid.
    last_update: Instant,
}

impl TokenBucket {
    /// Creates a full bucket. Returns `None` if `rate` or `size` is zero.
    pub fn new(config: BucketConfig) -> Option<Self> {
        Self::new_at(config, Instant::now())
    }

    /// Like [`TokenBucket::new`] with an explicit current time.
    pub fn new_at(config: BucketConfig, now: Instant) -> Option<Self> {
        let size = config.size.unwrap_or(config.rate);
        if config.rate == 0 || size == 0 {
            return None;
        }
        Some(TokenBucket {
            rate: config.rate,
            size,
            budget: size,
            one_time_burst: config.one_time_burst.unwrap_or(0),
            last_update: now,
        })
    }

    /// Refill rate in tokens per second.
    pub fn rate(&self) -> u64 {
        self.rate
    }

    /// Bucket capacity.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Tokens currently in the bucket (excluding the one-time burst), as of the last refill.
    pub fn budget(&self) -> u64 {
        self.budget
    }

    /// Remaining one-time burst tokens.
    pub fn one_time_burst(&self) -> u64 {
        self.one_time_burst
    }

    /// Sets the level (a restored snapshot's), capped at the bucket's size; refill counts
    /// from `now`.
    pub fn set_level(&mut self, budget: u64, one_time_burst: u64, now: Instant) {
        self.budget = budget.min(self.size);
        self.one_time_burst = one_time_burst;
        self.last_update = now;
    }

    fn refill(&mut self, now: Instant) {
        let Some(elapsed) = now.checked_duration_since(self.last_update) else {
            // Still repaying a debt (last_update in the future).
            return;
        };
        let elapsed_ns = elapsed.as_nanos();
        let new_tokens = elapsed_ns.saturating_mul(u128::from(self.rate)) / NANOS_PER_SEC;
        let room = u128::from(self.size - self.budget);
        if new_tokens >= room {
            self.budget = self.size;
            self.last_update = now;
            return;
        }
        // new_tokens < room <= u64::MAX.
        let new_tokens = new_tokens as u64;
        self.budget += new_tokens;
        // Advance only by the time those tokens took, so fractions are not lost.
        let used_ns = u128::from(new_tokens) * NANOS_PER_SEC / u128::from(self.rate);
        self.last_update += nanos_to_duration(used_ns);
    }

    /// Tries to take `tokens` tokens at time `now`.
    pub fn reduce_at(&mut self, mut tokens: u64, now: Instant) -> BucketReduction {
        // The one-time burst is spent first.
        if self.one_time_burst > 0 {
            if self.one_time_burst >= tokens {
                self.one_time_burst -= tokens;
                return BucketReduction::Success;
            }
            tokens -= self.one_time_burst;
            self.one_time_burst = 0;
        }
        self.refill(now);
        if tokens <= self.budget {
            self.budget -= tokens;
            return BucketReduction::Success;
        }
        if tokens > self.size && self.budget == self.size {
            // Oversized request on a full bucket: allow it, then owe the excess.
            let debt_ns = u128::from(tokens - self.size) * NANOS_PER_SEC / u128::from(self.rate);
            self.budget = 0;
            self.last_update = now.checked_add(nanos_to_duration(debt_ns)).unwrap_or(now);
            return BucketReduction::Success;
        }
        BucketReduction::Failure(self.time_until(tokens.min(self.size), now))
    }

    /// Tries to take `tokens` tokens now.
    pub fn reduce(&mut self, tokens: u64) -> BucketReduction {
        self.reduce_at(tokens, Instant::now())
    }

    /// Gives back `tokens` tokens (e.g. a multi-bucket request was refused by another bucket).
    pub fn replenish(&mut self, tokens: u64) {
        self.budget = self.budget.saturating_add(tokens).min(self.size);
    }

    /// Time, from `now`, until `tokens` (<= size) tokens are in the bucket.
    fn time_until(&self, tokens: u64, now: Instant) -> Duration {
        let pending = self.last_update.saturating_duration_since(now);
        let missing = tokens.saturating_sub(self.budget);
        // Round up so the timer never fires before the tokens are there.
        let ns = (u128::from(missing) * NANOS_PER_SEC).div_ceil(u128::from(self.rate));
        pending.saturating_add(nanos_to_duration(ns))
    }
}

fn nanos_to_duration(ns: u128) -> Duration {
    let ns = ns.min(MAX_DELAY_NS);
    let secs = u64::try_from(ns / NANOS_PER_SEC).unwrap_or(u64::MAX);
    // The remainder is < 1e9 and fits in u32.
    Duration::new(secs, (ns % NANOS_PER_SEC) as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bucket(rate: u64, size: u64, burst: u64, now: Instant) -> TokenBucket {
        TokenBucket::new_at(
            BucketConfig {
                rate,
                size: Some(size),
                one_time_burst: Some(burst),
            },
            now,
        )
        .unwrap()
    }

    #[test]
    fn zero_rate_or_size_rejected() {
        assert!(TokenBucket::new(BucketConfig::new(0)).is_none());
        let cfg = BucketConfig {
            rate: 10,
            size: Some(0),
            one_time_burst: None,
        };
        assert!(TokenBucket::new(cfg).is_none());
        assert_eq!(TokenBucket::new(BucketConfig::new(7)).unwrap().size(), 7);
    }

    #[test]
    fn refill_over_time() {
        let t0 = Instant::now();
        let mut b = bucket(1000, 1000, 0, t0);
        assert_eq!(b.reduce_at(1000, t0), BucketReduction::Success);
        // Empty: 100 tokens need 100ms.
        assert_eq!(
            b.reduce_at(100, t0),
            BucketReduction::Failure(Duration::from_millis(100))
        );
        assert_eq!(
            b.reduce_at(100, t0 + Duration::from_millis(50)),
            BucketReduction::Failure(Duration::from_millis(50))
        );
        assert_eq!(
            b.reduce_at(100, t0 + Duration::from_millis(100)),
            BucketReduction::Success
        );
        // Never more than size.
        assert_eq!(
            b.reduce_at(1001, t0 + Duration::from_secs(100)),
            BucketReduction::Success
        );
    }

    #[test]
    fn fractions_not_lost() {
        let t0 = Instant::now();
        let mut b = bucket(3, 3, 0, t0);
        assert_eq!(b.reduce_at(3, t0), BucketReduction::Success);
        // 3 tokens/s: 1 token every 333.33ms. Polling every 100ms must still yield 3/s.
        let mut got = 0;
        for i in 1..=10 {
            if b.reduce_at(1, t0 + Duration::from_millis(100 * i)) == BucketReduction::Success {
                got += 1;
            }
        }
        assert_eq!(got, 3);
    }

    #[test]
    fn one_time_burst_spent_first() {
        let t0 = Instant::now();
        let mut b = bucket(100, 100, 50, t0);
        assert_eq!(b.reduce_at(40, t0), BucketReduction::Success);
        assert_eq!(b.one_time_burst(), 10);
        assert_eq!(b.budget(), 100);
        assert_eq!(b.reduce_at(60, t0), BucketReduction::Success);
        assert_eq!(b.one_time_burst(), 0);
        assert_eq!(b.budget(), 50);
        assert!(matches!(b.reduce_at(60, t0), BucketReduction::Failure(_)));
    }

    #[test]
    fn oversized_request_creates_debt() {
        let t0 = Instant::now();
        let mut b = bucket(1000, 1000, 0, t0);
        // 3000 tokens on a full 1000-token bucket: allowed, 2000 owed (2 s).
        assert_eq!(b.reduce_at(3000, t0), BucketReduction::Success);
        assert_eq!(
            b.reduce_at(1, t0 + Duration::from_secs(1)),
            BucketReduction::Failure(Duration::from_millis(1001))
        );
        assert_eq!(
            b.reduce_at(500, t0 + Duration::from_millis(2500)),
            BucketReduction::Success
        );
        // Oversized request on a non-full bucket fails until it is full.
        let mut b = bucket(1000, 1000, 0, t0);
        assert_eq!(b.reduce_at(1, t0), BucketReduction::Success);
        assert_eq!(
            b.reduce_at(5000, t0),
            BucketReduction::Failure(Duration::from_millis(1))
        );
    }

    #[test]
    fn huge_values_do_not_overflow() {
        let t0 = Instant::now();
        let mut b = bucket(1, u64::MAX, 0, t0);
        assert_eq!(b.reduce_at(u64::MAX, t0), BucketReduction::Success);
        assert!(matches!(
            b.reduce_at(u64::MAX, t0),
            BucketReduction::Failure(_)
        ));
        let mut b = bucket(1, 1, 0, t0);
        assert_eq!(b.reduce_at(u64::MAX, t0), BucketReduction::Success);
        match b.reduce_at(1, t0) {
            BucketReduction::Failure(d) => assert!(d.as_secs() >= 1 << 32),
            BucketReduction::Success => panic!("debt ignored"),
        }
        let mut b = bucket(u64::MAX, u64::MAX, u64::MAX, t0);
        assert_eq!(b.reduce_at(u64::MAX, t0), BucketReduction::Success);
        assert_eq!(b.reduce_at(u64::MAX, t0), BucketReduction::Success);
        assert_eq!(
            b.reduce_at(1, t0 + Duration::from_secs(1000)),
            BucketReduction::Success
        );
    }

    #[test]
    fn replenish_capped() {
        let t0 = Instant::now();
        let mut b = bucket(10, 10, 0, t0);
        assert_eq!(b.reduce_at(4, t0), BucketReduction::Success);
        b.replenish(100);
        assert_eq!(b.budget(), 10);
    }

    #[test]
    fn time_going_backwards_is_harmless() {
        let t0 = Instant::now() + Duration::from_secs(10);
        let mut b = bucket(10, 10, 0, t0);
        assert_eq!(b.reduce_at(10, t0), BucketReduction::Success);
        assert!(matches!(
            b.reduce_at(1, t0 - Duration::from_secs(5)),
            BucketReduction::Failure(_)
        ));
    }
}
