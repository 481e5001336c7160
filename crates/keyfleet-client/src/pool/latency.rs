//! The pool's recent answer latency, for the hedge delay: a log-linear histogram of atomic
//! counts (4 buckets per power of two of microseconds, so a bucket is at most 25 % wide) over
//! two windows that take turns, read as a p95 now and then. Recording costs two relaxed atomic
//! adds; no lock is taken on the request path (rotation uses a compare-and-swap).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::time::Instant;

const SUB_BITS: u32 = 2;
const SUB: usize = 1 << SUB_BITS;
/// Up to 2^27 µs (~134 s); anything longer lands in the last bucket.
const BUCKETS: usize = 28 * SUB;
/// The p95 is computed again after this many answers (and at every window turn).
const RECOMPUTE_EVERY: usize = 64;
/// Fewer answers than this in both windows: no estimate yet.
pub(crate) const MIN_SAMPLES: u64 = 20;

struct Window {
    counts: Vec<AtomicU64>,
}

impl Window {
    fn new() -> Window {
        Window {
            counts: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
        }
    }
}

pub(crate) struct Latency {
    windows: [Window; 2],
    current: AtomicUsize,
    /// Milliseconds since `epoch` when the current window began.
    turned_at: AtomicU64,
    epoch: Instant,
    window: Duration,
    recorded: AtomicUsize,
    /// The last p95 computed, in µs; 0 while there are too few answers.
    p95_micros: AtomicU64,
}

impl Latency {
    /// Each window lasts `window`; the estimate covers the last one to two windows.
    pub(crate) fn new(window: Duration) -> Latency {
        Latency {
            windows: [Window::new(), Window::new()],
            current: AtomicUsize::new(0),
            turned_at: AtomicU64::new(0),
            epoch: Instant::now(),
            window,
            recorded: AtomicUsize::new(0),
            p95_micros: AtomicU64::new(0),
        }
    }

    pub(crate) fn record(&self, took: Duration) {
        let now_ms = self.epoch.elapsed().as_millis() as u64;
        let turned = self.turned_at.load(Ordering::Relaxed);
        let mut recompute = false;
        if now_ms.saturating_sub(turned) >= self.window.as_millis() as u64
            && self
                .turned_at
                .compare_exchange(turned, now_ms, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        {
            // The older window is emptied and becomes the current one.
            let older = 1 - self.current.load(Ordering::Acquire);
            for c in &self.windows[older].counts {
                c.store(0, Ordering::Relaxed);
            }
            self.current.store(older, Ordering::Release);
            recompute = true;
        }
        let micros = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        let current = self.current.load(Ordering::Acquire);
        self.windows[current].counts[index(micros)].fetch_add(1, Ordering::Relaxed);
        let n = self.recorded.fetch_add(1, Ordering::Relaxed);
        // Until the first estimate, every answer may be the one that makes it possible.
        let unknown = self.p95_micros.load(Ordering::Relaxed) == 0;
        if recompute || unknown || n.is_multiple_of(RECOMPUTE_EVERY) {
            self.p95_micros
                .store(self.quantile(0.95).unwrap_or(0), Ordering::Relaxed);
        }
    }

    /// The recent p95 (rounded up to its bucket's top), or `None` with too few answers.
    pub(crate) fn p95(&self) -> Option<Duration> {
        match self.p95_micros.load(Ordering::Relaxed) {
            0 => None,
            us => Some(Duration::from_micros(us)),
        }
    }

    /// The `q` quantile in µs over both windows, rounded up to its bucket's top.
    fn quantile(&self, q: f64) -> Option<u64> {
        let mut counts = [0u64; BUCKETS];
        for w in &self.windows {
            for (sum, c) in counts.iter_mut().zip(&w.counts) {
                *sum += c.load(Ordering::Relaxed);
            }
        }
        let total: u64 = counts.iter().sum();
        if total < MIN_SAMPLES {
            return None;
        }
        let want = ((total as f64) * q).ceil() as u64;
        let mut seen = 0;
        for (i, c) in counts.iter().enumerate() {
            seen += c;
            if seen >= want.max(1) {
                return Some(upper(i));
            }
        }
        Some(upper(BUCKETS - 1))
    }
}

/// The bucket of `micros`: exact below 4 µs, then 4 per power of two.
fn index(micros: u64) -> usize {
    let us = micros.max(1);
    let log = 63 - us.leading_zeros();
    if log < SUB_BITS {
        return us as usize;
    }
    let sub = ((us >> (log - SUB_BITS)) as usize) & (SUB - 1);
    (log as usize * SUB + sub).min(BUCKETS - 1)
}

/// The largest value in bucket `i`.
fn upper(i: usize) -> u64 {
    if i < SUB * SUB_BITS as usize {
        return i as u64;
    }
    let (log, sub) = ((i / SUB) as u32, (i % SUB) as u64);
    ((SUB as u64 + sub + 1) << (log - SUB_BITS)) - 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_value_is_at_most_its_buckets_top_and_buckets_are_narrow() {
        for us in (1..5000u64).chain([1 << 20, 123_456_789]) {
            let i = index(us);
            assert!(us <= upper(i), "{us} in bucket {i} topped {}", upper(i));
            assert!(index(us - 1) <= i, "buckets grow with the value: {us}");
            assert!(
                upper(i) as f64 <= us as f64 * 1.25 + 1.0,
                "{us} → {}",
                upper(i)
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn p95_follows_recent_answers() {
        let l = Latency::new(Duration::from_secs(1));
        assert_eq!(l.p95(), None);
        for i in 0..100u64 {
            l.record(Duration::from_micros(if i < 96 { 500 } else { 40_000 }));
        }
        let p95 = l.p95().unwrap();
        assert!(
            p95 >= Duration::from_micros(500) && p95 < Duration::from_micros(700),
            "{p95:?}"
        );
        // Two window turns later, only the new answers count.
        tokio::time::advance(Duration::from_millis(1100)).await;
        for _ in 0..100 {
            l.record(Duration::from_millis(30));
        }
        tokio::time::advance(Duration::from_millis(1100)).await;
        for _ in 0..100 {
            l.record(Duration::from_millis(30));
        }
        let p95 = l.p95().unwrap();
        assert!(
            p95 >= Duration::from_millis(30) && p95 < Duration::from_millis(38),
            "{p95:?}"
        );
    }
}
