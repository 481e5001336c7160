//! The load scheduler, the one both the run and the cost phases use, so every phase replays the
//! same load shape: open loop (a call every 1/rate, its latency counted from the intended send
//! time, so a stall cannot hide by slowing the sender) or closed loop (N calls always in
//! flight).

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio::time::Instant;

use super::Load;

/// Open-loop calls in flight at most; beyond it sends wait (and their latency shows it).
const MAX_IN_FLIGHT: usize = 4096;
/// A closed-loop worker with nothing to send waits this long before asking again.
const IDLE: Duration = Duration::from_millis(10);

/// One call to make.
#[derive(Debug, Clone, Copy)]
pub(super) struct Slot {
    /// The call's number, counting from 0 over the whole phase.
    pub(super) index: usize,
    /// When the call was due: the intended send time (open loop), or now (closed loop).
    pub(super) due: Instant,
}

/// Makes calls under `load` until `end`; returns the sum of what they returned (units of work
/// done: answers, tokens). `call` returns `None` when it has nothing to send now: the open
/// loop skips that slot, a closed-loop worker waits a little.
pub(super) async fn schedule<F, Fut>(load: Load, end: Instant, call: F) -> u64
where
    F: Fn(Slot) -> Option<Fut> + Send + Sync + 'static,
    Fut: Future<Output = u64> + Send + 'static,
{
    let call = Arc::new(call);
    let units = Arc::new(AtomicU64::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    match load {
        Load::Concurrency(n) => {
            let next = Arc::new(AtomicUsize::new(0));
            for _ in 0..n.max(1) {
                let (call, units, next) = (call.clone(), units.clone(), next.clone());
                tasks.spawn(async move {
                    while Instant::now() < end {
                        let index = next.fetch_add(1, Ordering::Relaxed);
                        let due = Instant::now();
                        match call(Slot { index, due }) {
                            Some(work) => {
                                units.fetch_add(work.await, Ordering::Relaxed);
                            }
                            None => tokio::time::sleep(IDLE).await,
                        }
                    }
                });
            }
        }
        Load::Rate(rate) => {
            let interval = Duration::from_secs_f64(1.0 / rate.max(1) as f64);
            let start = Instant::now();
            let in_flight = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
            for i in 0u32.. {
                let due = start + interval * i;
                if due >= end {
                    break;
                }
                if due > Instant::now() {
                    tokio::time::sleep_until(due).await;
                }
                let Ok(permit) = in_flight.clone().acquire_owned().await else {
                    break;
                };
                let Some(work) = call(Slot {
                    index: i as usize,
                    due,
                }) else {
                    continue;
                };
                let units = units.clone();
                tasks.spawn(async move {
                    units.fetch_add(work.await, Ordering::Relaxed);
                    drop(permit);
                });
                // Reap finished calls as we go, so the set does not grow with the run.
                while tasks.try_join_next().is_some() {}
            }
        }
    }
    while tasks.join_next().await.is_some() {}
    units.load(Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use tokio::time::Instant;

    use super::{Load, schedule};

    /// The open loop makes one call per slot due before the end, however late it runs, and
    /// skips the slots with nothing to send.
    #[tokio::test]
    async fn open_loop_skips_empty_slots() {
        let end = Instant::now() + Duration::from_millis(300);
        let units = schedule(Load::Rate(100), end, |slot| {
            slot.index.is_multiple_of(2).then_some(async { 1 })
        })
        .await;
        assert!((14..=15).contains(&units), "{units} calls");
    }

    /// The closed loop keeps N calls in flight until the end, and sums what they did.
    #[tokio::test]
    async fn closed_loop_keeps_n_in_flight() {
        let (now, peak) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let end = Instant::now() + Duration::from_millis(200);
        let (n, p) = (now.clone(), peak.clone());
        let units = schedule(Load::Concurrency(3), end, move |_| {
            let (n, p) = (n.clone(), p.clone());
            Some(async move {
                p.fetch_max(n.fetch_add(1, Ordering::SeqCst) + 1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(5)).await;
                n.fetch_sub(1, Ordering::SeqCst);
                2
            })
        })
        .await;
        assert!(units >= 6 && units.is_multiple_of(2), "{units} units");
        assert_eq!(peak.load(Ordering::SeqCst), 3);
        assert_eq!(now.load(Ordering::SeqCst), 0);
    }
}
