//! The hedge budget: a token bucket filled by requests, so hedges stay a bounded share of the
//! traffic (a slow fleet is not sent twice its load) while a burst of stalls early on can
//! still be hedged. Fixed-point tokens in one atomic; no lock.

use std::sync::atomic::{AtomicU64, Ordering};

/// One hedge costs this many milli-tokens.
const HEDGE: u64 = 1000;

pub(crate) struct Budget {
    /// Milli-tokens held.
    held: AtomicU64,
    /// Milli-tokens each request adds (ratio × 1000).
    per_request: u64,
    /// Most milli-tokens held.
    cap: u64,
}

impl Budget {
    /// Hedges may be `ratio` of requests, with up to `burst` hedges saved up (the bucket
    /// starts full).
    pub(crate) fn new(ratio: f64, burst: u32) -> Budget {
        let cap = u64::from(burst.max(1)) * HEDGE;
        Budget {
            held: AtomicU64::new(cap),
            per_request: (ratio.clamp(0.0, 1.0) * HEDGE as f64).round() as u64,
            cap,
        }
    }

    /// A request was sent: the bucket fills by the ratio.
    pub(crate) fn deposit(&self) {
        let _ = self
            .held
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |h| {
                (h < self.cap).then(|| (h + self.per_request).min(self.cap))
            });
    }

    /// Takes one hedge's worth; false when the budget is spent.
    pub(crate) fn withdraw(&self) -> bool {
        self.held
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |h| {
                h.checked_sub(HEDGE)
            })
            .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hedges_stay_within_the_ratio_after_the_burst() {
        let b = Budget::new(0.1, 5);
        let mut hedges = 0;
        for _ in 0..1000 {
            b.deposit();
            if b.withdraw() {
                hedges += 1;
            }
        }
        // The 5 saved up, then one per 10 requests.
        assert!((100..=106).contains(&hedges), "{hedges}");
    }
}
