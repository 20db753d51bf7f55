//! Token-bucket rate limiting for the device back ends (issue 16): one
//! bucket of bytes and one of operations per device, each refilled
//! continuously at its rate and holding at most [`REFILL_PERIOD`] of it,
//! plus an optional one-time burst of bytes spent before the bucket (the
//! idea of Firecracker's rate limiter; this code is our own).
//!
//! A request that finds a bucket short is not failed or dropped: the
//! caller learns how long until it would fit and waits (block parks its
//! ring; net stops popping). A request larger than a whole bucket is let
//! through once the bucket is full, leaving it in debt, so any size gets
//! through and the long-run rate still holds.
//!
//! [`TokenBucket`] and [`Buckets`] are pure: they take the time as an
//! argument, so the unit tests drive a fake clock. [`Limiter`] adds the
//! real clock, a lock (the control thread changes limits between two
//! requests of the data path) and the throttle counter.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use mm_protocols::device_control::RateLimit;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

/// How much of its rate a bucket holds. Short, so a limit is a limit
/// within a fraction of a second (a bucket of a whole second would let a
/// 4 MiB read at 1 MiB/s finish in 3 s); long enough that requests are
/// not split into a timer wake-up each.
pub const REFILL_PERIOD: Duration = Duration::from_millis(100);

const NANOS_PER_SEC: i128 = 1_000_000_000;

/// One bucket. Amounts are kept in token-nanoseconds (tokens × 10⁹) in an
/// i128, so refilling at any rate (≤ 10¹¹/s) for any time (hours idle)
/// neither overflows nor loses fractions of a token.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    /// Tokens per second; 0 = unlimited.
    rate: u64,
    /// The most the bucket holds, in token-ns.
    capacity: i128,
    /// What it holds now, in token-ns; negative while in debt after an
    /// oversized request.
    budget: i128,
    /// One-time burst left, in tokens (not refilled).
    burst: u64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket of `rate` tokens/s (0 = unlimited) with a one-time
    /// `burst` on top.
    pub fn new(rate: u64, burst: u64, now: Instant) -> TokenBucket {
        let per_period = (i128::from(rate) * REFILL_PERIOD.as_nanos() as i128 / NANOS_PER_SEC).max(1);
        let capacity = per_period * NANOS_PER_SEC;
        TokenBucket { rate, capacity, budget: capacity, burst, last: now }
    }

    pub fn rate(&self) -> u64 {
        self.rate
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_nanos();
        self.last = self.last.max(now);
        // rate ≤ 2⁶⁴ and elapsed < 2⁶⁴ ns (584 years): the product fits.
        let added = i128::try_from(elapsed).unwrap_or(i128::MAX / 2).saturating_mul(i128::from(self.rate));
        self.budget = self.budget.saturating_add(added).min(self.capacity);
    }

    /// None if `n` tokens can be taken now, else how long until they can.
    pub fn wait_for(&mut self, n: u64, now: Instant) -> Option<Duration> {
        if self.rate == 0 {
            return None;
        }
        self.refill(now);
        let need = i128::from(n.saturating_sub(self.burst)) * NANOS_PER_SEC;
        // An oversized request needs a full bucket, not the impossible.
        let need = need.min(self.capacity);
        if self.budget >= need {
            return None;
        }
        let missing = need - self.budget; // token-ns
        let nanos = (missing + i128::from(self.rate) - 1) / i128::from(self.rate);
        Some(Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX)))
    }

    /// Takes `n` tokens (after [`TokenBucket::wait_for`] said yes): the
    /// burst first, then the bucket, possibly into debt.
    pub fn take(&mut self, n: u64) {
        if self.rate == 0 {
            return;
        }
        let from_burst = n.min(self.burst);
        self.burst -= from_burst;
        self.budget -= i128::from(n - from_burst) * NANOS_PER_SEC;
    }
}

/// The bytes and operations buckets of one device, taken together: a
/// request takes from both or from neither.
#[derive(Debug, Clone)]
pub struct Buckets {
    limit: RateLimit,
    bytes: TokenBucket,
    ops: TokenBucket,
}

impl Buckets {
    pub fn new(limit: RateLimit, now: Instant) -> Buckets {
        Buckets {
            limit,
            bytes: TokenBucket::new(limit.bytes_per_sec, limit.burst_bytes, now),
            ops: TokenBucket::new(limit.ops_per_sec, 0, now),
        }
    }

    /// Takes `bytes` and one operation, or says how long until both fit.
    pub fn try_take(&mut self, bytes: u64, ops: u64, now: Instant) -> Result<(), Duration> {
        let wait = match (self.bytes.wait_for(bytes, now), self.ops.wait_for(ops, now)) {
            (None, None) => None,
            (a, b) => a.max(b),
        };
        if let Some(wait) = wait {
            return Err(wait);
        }
        self.bytes.take(bytes);
        self.ops.take(ops);
        Ok(())
    }

    /// New limits: buckets at the new rates, holding no more than they
    /// held (a change is not a free refill), with the new one-time burst.
    pub fn set(&mut self, limit: RateLimit, now: Instant) {
        let mut next = Buckets::new(limit, now);
        for (new, old) in [(&mut next.bytes, &mut self.bytes), (&mut next.ops, &mut self.ops)] {
            if old.rate != 0 && new.rate != 0 {
                old.refill(now);
                let old_fraction = old.budget * 1000 / old.capacity;
                new.budget = new.budget.min(new.capacity * old_fraction / 1000);
            }
        }
        *self = next;
    }

    pub fn limit(&self) -> RateLimit {
        self.limit
    }
}

/// `mm-device block|net`'s rate-limit flags (the broker passes the
/// microVM's `--disk-*` / `--net-*` limits here). 0 = unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::Args)]
pub struct RateLimitFlags {
    /// Bytes per second (block: request data; net: frames).
    #[arg(long = "rate-bps", default_value_t = 0)]
    pub bytes_per_sec: u64,
    /// Operations per second (block: requests; net: frames).
    #[arg(long = "rate-ops", default_value_t = 0)]
    pub ops_per_sec: u64,
    /// A one-time burst of bytes on top of the bandwidth bucket.
    #[arg(long = "rate-burst-bytes", default_value_t = 0)]
    pub burst_bytes: u64,
}

impl RateLimitFlags {
    /// The limits, refused if absurd.
    pub fn limit(&self) -> Result<RateLimit, mm_protocols::device_control::RateLimitError> {
        let limit = RateLimit {
            bytes_per_sec: self.bytes_per_sec,
            ops_per_sec: self.ops_per_sec,
            burst_bytes: self.burst_bytes,
        };
        limit.validate()?;
        Ok(limit)
    }
}

/// A device's limiter, shared between its data path and its control
/// channel.
#[derive(Debug)]
pub struct Limiter {
    buckets: Mutex<Buckets>,
    throttled: AtomicU64,
    /// Written on every change, so a data path parked until a refill
    /// computed at the old rate wakes now (lifting a limit must not wait
    /// out a long wait it no longer owes). None if no eventfd could be
    /// made: changes then apply at the next wake-up.
    changed: Option<EventFd>,
}

impl Default for Limiter {
    fn default() -> Self {
        Limiter::new(RateLimit::default())
    }
}

impl Limiter {
    pub fn new(limit: RateLimit) -> Limiter {
        Limiter {
            buckets: Mutex::new(Buckets::new(limit, Instant::now())),
            throttled: AtomicU64::new(0),
            changed: EventFd::new(EFD_NONBLOCK).ok(),
        }
    }

    /// Whether any limit is set (else a request need not even be costed).
    pub fn limited(&self) -> bool {
        self.buckets.lock().is_ok_and(|b| !b.limit.is_unlimited())
    }

    /// Takes what one request costs, or says how long to wait.
    pub fn try_take(&self, bytes: u64, ops: u64) -> Result<(), Duration> {
        match self.buckets.lock() {
            Ok(mut buckets) if !buckets.limit.is_unlimited() => buckets.try_take(bytes, ops, Instant::now()),
            _ => Ok(()),
        }
    }

    /// Replaces the limits, between two requests of the data path.
    pub fn set(&self, limit: RateLimit) {
        if let Ok(mut buckets) = self.buckets.lock() {
            buckets.set(limit, Instant::now());
        }
        if let Some(changed) = &self.changed {
            let _ = changed.write(1);
        }
    }

    /// Readable after a change (the data path polls it with its rings and
    /// reads it to re-arm).
    pub fn changed(&self) -> Option<&EventFd> {
        self.changed.as_ref()
    }

    pub fn limit(&self) -> RateLimit {
        self.buckets.lock().map(|b| b.limit()).unwrap_or_default()
    }

    /// Counts a request that had to wait (once per request).
    pub fn count_throttled(&self) {
        self.throttled.fetch_add(1, Ordering::Relaxed);
    }

    pub fn throttled_total(&self) -> u64 {
        self.throttled.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn a_bucket_holds_a_tenth_of_a_second_and_refills_at_its_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(1000, 0, t0);
        assert_eq!(b.wait_for(100, t0), None);
        b.take(100);
        // Empty: 50 tokens take 50 ms at 1000/s.
        assert_eq!(b.wait_for(50, t0), Some(ms(50)));
        assert_eq!(b.wait_for(50, t0 + ms(50)), None);
        // Idle for an hour: still only a full bucket.
        assert_eq!(b.wait_for(100, t0 + Duration::from_secs(3600)), None);
        b.take(100);
        assert!(b.wait_for(1, t0 + Duration::from_secs(3600)).is_some());
    }

    #[test]
    fn the_burst_is_spent_once() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(1000, 500, t0);
        // 100 in the bucket + 500 of burst.
        assert_eq!(b.wait_for(600, t0), None);
        b.take(600);
        assert!(b.wait_for(1, t0).is_some());
        // Refilled, but the burst is gone: a full bucket is all there is.
        let later = t0 + Duration::from_secs(10);
        assert_eq!(b.wait_for(100, later), None);
        b.take(100);
        assert!(b.wait_for(1, later).is_some());
    }

    #[test]
    fn zero_is_unlimited() {
        let t0 = Instant::now();
        let mut buckets = Buckets::new(RateLimit::default(), t0);
        for _ in 0..1000 {
            assert_eq!(buckets.try_take(u64::MAX, u64::MAX, t0), Ok(()));
        }
        // Only the bytes limited: operations never wait.
        let mut buckets = Buckets::new(RateLimit { bytes_per_sec: 1 << 20, ..Default::default() }, t0);
        assert_eq!(buckets.try_take(0, 1_000_000, t0), Ok(()));
    }

    #[test]
    fn an_oversized_request_goes_through_a_full_bucket_and_leaves_debt() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(1000, 0, t0);
        assert_eq!(b.wait_for(300, t0), None);
        b.take(300);
        // 200 in debt: the next token comes after 201 ms.
        assert_eq!(b.wait_for(1, t0), Some(ms(201)));
        // And the next oversized one waits for a full bucket again.
        assert_eq!(b.wait_for(300, t0), Some(ms(300)));
    }

    #[test]
    fn both_buckets_or_neither() {
        let t0 = Instant::now();
        let limit = RateLimit { bytes_per_sec: 10_000, ops_per_sec: 10, burst_bytes: 0 };
        let mut buckets = Buckets::new(limit, t0);
        assert_eq!(buckets.try_take(1000, 1, t0), Ok(())); // 1 op, the whole 100 ms of bytes
        // Bytes short, ops not: nothing taken from the ops bucket.
        assert_eq!(buckets.try_take(1000, 1, t0), Err(ms(100)));
        assert_eq!(buckets.try_take(1000, 1, t0 + ms(100)), Ok(()));
        // 50 ops/s over 2 s of fake time: 100 ops (+ the bucket's 5).
        let mut buckets = Buckets::new(RateLimit { ops_per_sec: 50, ..Default::default() }, t0);
        let (mut now, mut done) = (t0, 0);
        while now < t0 + Duration::from_secs(2) {
            match buckets.try_take(4096, 1, now) {
                Ok(()) => done += 1,
                Err(wait) => now += wait,
            }
        }
        assert!((100..=106).contains(&done), "{done}");
    }

    #[test]
    fn the_largest_limits_and_long_idles_do_not_overflow() {
        let t0 = Instant::now();
        let limit = RateLimit {
            bytes_per_sec: mm_protocols::device_control::MAX_BYTES_PER_SEC,
            ops_per_sec: mm_protocols::device_control::MAX_OPS_PER_SEC,
            burst_bytes: u64::MAX,
        };
        let mut buckets = Buckets::new(limit, t0);
        assert_eq!(buckets.try_take(u64::MAX, 1, t0), Ok(()));
        let much_later = t0 + Duration::from_secs(100 * 365 * 86400);
        assert_eq!(buckets.try_take(10 << 30, 1, much_later), Ok(()));
        let mut b = TokenBucket::new(u64::MAX, 0, t0);
        assert_eq!(b.wait_for(u64::MAX, much_later), None);
        b.take(u64::MAX);
        assert!(b.wait_for(u64::MAX, much_later).is_some());
        assert_eq!(b.wait_for(1, much_later + Duration::from_secs(1)), None);
    }

    #[test]
    fn a_change_applies_at_once_without_a_free_refill() {
        let t0 = Instant::now();
        let mut buckets = Buckets::new(RateLimit { ops_per_sec: 10, ..Default::default() }, t0);
        assert_eq!(buckets.try_take(0, 1, t0), Ok(())); // the bucket held 1 op
        assert!(buckets.try_take(0, 1, t0).is_err());
        // Raised to 1000/s: still empty, but refills 100 times faster.
        buckets.set(RateLimit { ops_per_sec: 1000, ..Default::default() }, t0);
        assert_eq!(buckets.limit().ops_per_sec, 1000);
        assert_eq!(buckets.try_take(0, 1, t0), Err(ms(1)));
        assert_eq!(buckets.try_take(0, 1, t0 + ms(1)), Ok(()));
        // Lifted altogether.
        buckets.set(RateLimit::default(), t0);
        assert_eq!(buckets.try_take(0, 1_000, t0), Ok(()));
    }
}
