//! Token-bucket rate limiter (bytes/s and ops/s).
//!
//! A [`RateLimiter`] holds up to two [`TokenBucket`]s (bandwidth in bytes, operations) and a
//! `timerfd`. A device data plane calls [`RateLimiter::consume`] before doing work; when that
//! returns `false` the limiter is *blocked*: the timer is armed for the moment enough tokens
//! will be back, and every further `consume` fails until the event loop sees the timer fd
//! readable and calls [`RateLimiter::event_handler`]. The data plane then retries.
//!
//! The limiter's fd ([`AsRawFd`]) must be registered with the event loop (`EventSet::IN`).

mod bucket;

pub use bucket::{BucketConfig, BucketReduction, TokenBucket};

use std::io;
use std::os::unix::io::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use tracing::warn;
use vmm_sys_util::timerfd::TimerFd;

/// Shortest timer the limiter arms, so a nearly-refilled bucket does not cause a wake-up storm.
const MIN_TIMER: Duration = Duration::from_millis(1);

/// Errors of the rate limiter.
#[derive(Debug, thiserror::Error)]
pub enum RateLimiterError {
    /// Creating or configuring the timerfd failed.
    #[error("rate limiter timerfd setup failed")]
    TimerFdCreate(#[source] io::Error),
    /// Arming the timerfd failed.
    #[error("arming the rate limiter timerfd failed")]
    TimerFdArm(#[source] io::Error),
    /// Reading the timerfd failed.
    #[error("reading the rate limiter timerfd failed")]
    TimerFdRead(#[source] io::Error),
    /// A bucket was configured with a zero rate or size.
    #[error("invalid {0:?} bucket: rate and size must be non-zero")]
    InvalidBucket(TokenType),
}

/// Which bucket a consumption applies to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenType {
    /// Bandwidth, in bytes.
    Bytes,
    /// Operations (requests).
    Ops,
}

/// Configuration of a [`RateLimiter`]. A `None` bucket means "unlimited".
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RateLimiterConfig {
    /// Bandwidth limit (tokens are bytes).
    pub bandwidth: Option<BucketConfig>,
    /// Operations limit (tokens are requests).
    pub ops: Option<BucketConfig>,
}

impl RateLimiterConfig {
    /// Limit to `bytes_per_sec` bytes/s and `ops_per_sec` ops/s (0 = unlimited), with one
    /// second worth of burst and no one-time burst.
    pub fn simple(bytes_per_sec: u64, ops_per_sec: u64) -> Self {
        let bucket = |rate| (rate > 0).then(|| BucketConfig::new(rate));
        RateLimiterConfig {
            bandwidth: bucket(bytes_per_sec),
            ops: bucket(ops_per_sec),
        }
    }
}

/// The bucket levels of a limiter, for a VM snapshot: (budget, one-time burst left) of the
/// bandwidth and ops buckets. The configuration (rates, sizes) is the VM's, saved apart.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LimiterState {
    pub bandwidth: Option<(u64, u64)>,
    pub ops: Option<(u64, u64)>,
}

/// Two token buckets plus the timer that wakes the event loop when tokens are back.
#[derive(Debug)]
pub struct RateLimiter {
    bandwidth: Option<TokenBucket>,
    ops: Option<TokenBucket>,
    timer: TimerFd,
    blocked: bool,
}

impl RateLimiter {
    /// Builds a limiter with full buckets.
    pub fn new(config: RateLimiterConfig) -> Result<Self, RateLimiterError> {
        Self::new_at(config, Instant::now())
    }

    /// Like [`RateLimiter::new`] with an explicit start time (for tests).
    pub fn new_at(config: RateLimiterConfig, now: Instant) -> Result<Self, RateLimiterError> {
        let make = |cfg: Option<BucketConfig>, kind| match cfg {
            None => Ok(None),
            Some(c) => TokenBucket::new_at(c, now)
                .map(Some)
                .ok_or(RateLimiterError::InvalidBucket(kind)),
        };
        let bandwidth = make(config.bandwidth, TokenType::Bytes)?;
        let ops = make(config.ops, TokenType::Ops)?;
        let timer = TimerFd::new().map_err(|e| RateLimiterError::TimerFdCreate(e.into()))?;
        set_nonblocking(timer.as_raw_fd()).map_err(RateLimiterError::TimerFdCreate)?;
        Ok(RateLimiter {
            bandwidth,
            ops,
            timer,
            blocked: false,
        })
    }

    /// The buckets' levels now (see [`LimiterState`]).
    pub fn state(&self) -> LimiterState {
        let level = |b: &Option<TokenBucket>| b.as_ref().map(|b| (b.budget(), b.one_time_burst()));
        LimiterState { bandwidth: level(&self.bandwidth), ops: level(&self.ops) }
    }

    /// Sets the buckets to saved levels (capped at their sizes; a bucket the limiter does not
    /// have is ignored). Refill counts from now: the time the VM was saved does not count.
    pub fn restore_state(&mut self, state: &LimiterState) {
        let now = Instant::now();
        for (bucket, saved) in [(&mut self.bandwidth, state.bandwidth), (&mut self.ops, state.ops)] {
            if let (Some(b), Some((budget, burst))) = (bucket.as_mut(), saved) {
                b.set_level(budget, burst, now);
            }
        }
    }

    /// A limiter with no bucket: `consume` always succeeds.
    pub fn unlimited() -> Result<Self, RateLimiterError> {
        Self::new(RateLimiterConfig::default())
    }

    fn bucket_mut(&mut self, kind: TokenType) -> Option<&mut TokenBucket> {
        match kind {
            TokenType::Bytes => self.bandwidth.as_mut(),
            TokenType::Ops => self.ops.as_mut(),
        }
    }

    /// Read-only view of a bucket.
    pub fn bucket(&self, kind: TokenType) -> Option<&TokenBucket> {
        match kind {
            TokenType::Bytes => self.bandwidth.as_ref(),
            TokenType::Ops => self.ops.as_ref(),
        }
    }

    /// True while the limiter waits for its timer: every `consume` fails meanwhile.
    pub fn is_blocked(&self) -> bool {
        self.blocked
    }

    /// Takes `tokens` from the `kind` bucket. On failure nothing is taken, the limiter becomes
    /// blocked and the timer is armed for when the tokens will be available.
    pub fn consume(&mut self, tokens: u64, kind: TokenType) -> bool {
        self.consume_at(tokens, kind, Instant::now())
    }

    /// Like [`RateLimiter::consume`] with an explicit current time.
    pub fn consume_at(&mut self, tokens: u64, kind: TokenType, now: Instant) -> bool {
        if self.blocked {
            return false;
        }
        let Some(bucket) = self.bucket_mut(kind) else {
            return true;
        };
        match bucket.reduce_at(tokens, now) {
            BucketReduction::Success => true,
            BucketReduction::Failure(wait) => {
                self.block(wait);
                false
            }
        }
    }

    /// Takes one op and `bytes` bytes, all or nothing. This is what a block/net request costs.
    pub fn consume_request(&mut self, bytes: u64) -> bool {
        self.consume_request_at(bytes, Instant::now())
    }

    /// Like [`RateLimiter::consume_request`] with an explicit current time.
    pub fn consume_request_at(&mut self, bytes: u64, now: Instant) -> bool {
        if !self.consume_at(1, TokenType::Ops, now) {
            return false;
        }
        if !self.consume_at(bytes, TokenType::Bytes, now) {
            self.manual_replenish(1, TokenType::Ops);
            return false;
        }
        true
    }

    /// Gives tokens back to a bucket (capped at its size).
    pub fn manual_replenish(&mut self, tokens: u64, kind: TokenType) {
        if let Some(bucket) = self.bucket_mut(kind) {
            bucket.replenish(tokens);
        }
    }

    fn block(&mut self, wait: Duration) {
        self.blocked = true;
        if let Err(e) = self.timer.reset(wait.max(MIN_TIMER), None) {
            // Without a timer nobody would ever unblock us: stay unblocked and let the next
            // guest notification retry.
            warn!(error = %e, "rate limiter: cannot arm timer, not throttling");
            self.blocked = false;
        }
    }

    /// To be called when the limiter fd is readable: acknowledges the timer and unblocks.
    /// A spurious call (timer not expired) is harmless.
    pub fn event_handler(&mut self) -> Result<(), RateLimiterError> {
        match self.timer.wait() {
            Ok(_) => {
                self.blocked = false;
                Ok(())
            }
            Err(e) if e.errno() == libc::EAGAIN => Ok(()),
            Err(e) => Err(RateLimiterError::TimerFdRead(e.into())),
        }
    }
}

impl AsRawFd for RateLimiter {
    fn as_raw_fd(&self) -> RawFd {
        self.timer.as_raw_fd()
    }
}

fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl on an fd we own, with integer arguments only; return value checked.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    let ret = unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wait_readable(fd: RawFd, timeout_ms: i32) -> bool {
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: pfd is a valid pollfd array of length 1 that outlives the call.
        let ret = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
        ret == 1
    }

    #[test]
    fn unlimited_always_consumes() {
        let mut rl = RateLimiter::unlimited().unwrap();
        assert!(rl.consume(u64::MAX, TokenType::Bytes));
        assert!(rl.consume_request(u64::MAX));
        assert!(!rl.is_blocked());
        assert!(rl.bucket(TokenType::Ops).is_none());
    }

    #[test]
    fn invalid_bucket_rejected() {
        let cfg = RateLimiterConfig {
            bandwidth: Some(BucketConfig::new(0)),
            ops: None,
        };
        assert!(matches!(
            RateLimiter::new(cfg),
            Err(RateLimiterError::InvalidBucket(TokenType::Bytes))
        ));
        assert_eq!(
            RateLimiterConfig::simple(0, 0),
            RateLimiterConfig::default()
        );
    }

    #[test]
    fn blocked_until_timer_fires() {
        // 20 KB/s, 10 KB capacity: after draining, 10 KB come back in 500 ms (long enough for
        // the "not yet" checks below to hold on a loaded machine).
        let cfg = RateLimiterConfig {
            bandwidth: Some(BucketConfig {
                rate: 20_000,
                size: Some(10_000),
                one_time_burst: None,
            }),
            ops: None,
        };
        let mut rl = RateLimiter::new(cfg).unwrap();
        let start = Instant::now();
        assert!(rl.consume(10_000, TokenType::Bytes));
        assert!(!rl.consume(10_000, TokenType::Bytes));
        assert!(rl.is_blocked());
        // Blocked: even a tiny request fails, and the timer has not fired yet.
        assert!(!rl.consume(1, TokenType::Bytes));
        assert!(!wait_readable(rl.as_raw_fd(), 0));
        // Spurious handler call while not expired keeps it blocked.
        rl.event_handler().unwrap();
        assert!(rl.is_blocked());

        assert!(wait_readable(rl.as_raw_fd(), 2000));
        rl.event_handler().unwrap();
        assert!(!rl.is_blocked());
        assert!(rl.consume(10_000, TokenType::Bytes));
        let elapsed = start.elapsed();
        assert!(elapsed >= Duration::from_millis(490), "{elapsed:?}");
    }

    #[test]
    fn sustained_rate_real_time() {
        // 200 KB/s with 20 KB capacity: moving 60 KB must take >= ~200 ms.
        let cfg = RateLimiterConfig {
            bandwidth: Some(BucketConfig {
                rate: 200_000,
                size: Some(20_000),
                one_time_burst: None,
            }),
            ops: None,
        };
        let mut rl = RateLimiter::new(cfg).unwrap();
        let start = Instant::now();
        let mut moved = 0u64;
        while moved < 60_000 {
            if rl.consume(4_000, TokenType::Bytes) {
                moved += 4_000;
            } else {
                assert!(wait_readable(rl.as_raw_fd(), 2000));
                rl.event_handler().unwrap();
            }
        }
        let elapsed = start.elapsed();
        assert!(elapsed >= Duration::from_millis(190), "{elapsed:?}");
        assert!(elapsed < Duration::from_secs(5), "{elapsed:?}");
    }

    #[test]
    fn request_is_all_or_nothing() {
        let t0 = Instant::now();
        let cfg = RateLimiterConfig {
            bandwidth: Some(BucketConfig {
                rate: 1000,
                size: Some(1000),
                one_time_burst: None,
            }),
            ops: Some(BucketConfig::new(10)),
        };
        let mut rl = RateLimiter::new_at(cfg, t0).unwrap();
        assert!(rl.consume_request_at(600, t0));
        // Bytes refuse the second request: its op is given back.
        assert!(!rl.consume_request_at(600, t0));
        assert_eq!(rl.bucket(TokenType::Ops).unwrap().budget(), 9);
        assert!(rl.is_blocked());
    }

    #[test]
    fn huge_request_arms_a_valid_timer() {
        let mut rl = RateLimiter::new(RateLimiterConfig::simple(1, 0)).unwrap();
        assert!(rl.consume(u64::MAX, TokenType::Bytes));
        assert!(!rl.consume(u64::MAX, TokenType::Bytes));
        assert!(rl.is_blocked(), "timer armed despite the huge delay");
    }

    #[test]
    fn ops_limit() {
        let t0 = Instant::now();
        let mut rl = RateLimiter::new_at(RateLimiterConfig::simple(0, 5), t0).unwrap();
        for _ in 0..5 {
            assert!(rl.consume_request_at(1 << 20, t0));
        }
        assert!(!rl.consume_request_at(1, t0));
    }

    #[test]
    fn one_time_burst() {
        let t0 = Instant::now();
        let cfg = RateLimiterConfig {
            bandwidth: None,
            ops: Some(BucketConfig {
                rate: 2,
                size: Some(2),
                one_time_burst: Some(3),
            }),
        };
        let mut rl = RateLimiter::new_at(cfg, t0).unwrap();
        for _ in 0..5 {
            assert!(rl.consume_at(1, TokenType::Ops, t0));
        }
        assert!(!rl.consume_at(1, TokenType::Ops, t0));
    }
}
