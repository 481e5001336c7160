//! Every second of the run: takes the counters of the second from the workers, merges them
//! into the totals, appends the second to the timeline and prints the progress line.

use std::collections::BTreeSet;
use std::io::Write as _;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::counters::Counters;
use super::state::{Shared, lock};
use crate::cpu;
use crate::report::Second;

/// What the ticker gathered once the run stopped.
pub(super) struct Ticked {
    pub(super) totals: Counters,
    pub(super) timeline: Vec<Second>,
    /// Every kid the authority was signing with at a tick.
    pub(super) kids: BTreeSet<String>,
}

/// Ticks every second from `started` until the run stops.
pub(super) async fn tick_loop(shared: Arc<Shared>, started: Instant, progress: bool) -> Ticked {
    let mut totals = Counters::new();
    let mut kids = BTreeSet::new();
    let mut timeline = Vec::new();
    let mut last = started;
    let mut t = 0;
    loop {
        t += 1;
        let at = started + Duration::from_secs(t);
        let stopping = !shared.sleep_until(at).await;
        // After the stop, wait for the requests still in flight to be recorded.
        if stopping {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let now = Instant::now();
        let this_second = std::mem::replace(&mut *lock(&shared.counters), Counters::new());
        let kid = shared.current_kid();
        kids.insert(kid.clone());
        let span = (now - last).max(Duration::from_millis(1));
        last = now;
        let line = this_second.second(t, span, kid, cpu::rss_bytes().unwrap_or(0));
        totals.merge(this_second);
        if progress {
            let mut err = std::io::stderr().lock();
            // A failed write to the terminal must not stop the run.
            let _ = write!(
                err,
                "\r\x1b[2K{:>4}s {:>8.0} req/s  p99 {:>6} µs  errors {}  retries {}  false {}/{}  kid {}",
                line.t,
                line.rps,
                line.p99_us,
                totals.errors,
                totals.retries,
                totals.false_rejects,
                totals.false_accepts,
                &line.kid[..line.kid.len().min(10)]
            );
            let _ = err.flush();
        }
        // The stub after the stop (in-flight answers only) would draw a false drop.
        if !stopping || span >= Duration::from_millis(500) {
            timeline.push(line);
        }
        if stopping {
            if progress {
                eprintln!();
            }
            return Ticked {
                totals,
                timeline,
                kids,
            };
        }
    }
}
