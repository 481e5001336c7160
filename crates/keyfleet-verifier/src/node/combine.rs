//! Combining concurrent single `Verify` calls into one Ed25519 batch (flat combining, like a
//! database's group commit): after a cache miss, `decide.rs` asks [`Combiner::validate`]
//! for the verdict instead of calling `validate` itself.
//!
//! A request that finds a free leader's seat leads; one that finds every seat taken queues its
//! token and waits. A leader takes up to `--verify-batch-max` - 1 queued requests with its own,
//! checks each group that shares a key set and a `now` with [`validate_all`] (same screening
//! and per-token fallback as `VerifyBatch`, so every verdict is the one `validate` gives; a
//! group of one goes through plain `validate`), answers every request, and hands its seat to
//! the first request still queued, which does the same with whatever arrived meanwhile. So an
//! idle node checks a lone request at once, and under load a batch is what arrived during the
//! previous one, bounded by size.
//!
//! There are [`leader_seats`] seats: one on a machine with up to three cores, half the cores
//! above that. A single seat would run every signature check of the node on one thread at a
//! time, a cap a larger machine would hit; one seat per core would batch nothing until every
//! core is busy checking, and leave no thread for the network. Batches only form when every
//! seat is taken, so at low load each request is checked at once, alone.
//!
//! Before it takes the queue, a leader may wait a little (`--verify-batch-window`): while
//! requests that have started `decide` are still on their way here and the batch is not
//! full, it yields to them, at most for the window. With no other request on its way it never
//! waits; each batch that did wait is counted (`keyfleet_verify_batch_waits_total`), so tests
//! prove by counting that a lone request never does.
//!
//! A batch whose equation fails (a forged or corrupted signature in it) is checked again one
//! signature at a time, so the forger's one token would cost the batch's honest requests a
//! second check each. After such a fallback the combiner therefore checks every batch one
//! signature at a time for [`DISTRUST_AFTER_FALLBACK`] (1 s): a steady stream of forgeries
//! costs at most one wasted batch equation per second, and otherwise exactly what checking
//! without batching costs. Batching resumes by itself once the forgeries stop.
//!
//! The lead is handed on however a leader's future ends, also when it is dropped (a caller
//! that goes away) and when a request is dropped just after being handed the lead: both hold
//! a guard whose `Drop` passes the lead to the next request. A request whose caller went away
//! while queued costs its check, nothing else.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use keyfleet_core::token::Refusal;
use keyfleet_core::{Reason, UnixSeconds, Verified, validate};
use tokio::sync::oneshot;

use super::batch::validate_all;
use crate::keyset::Held;
use crate::metrics::BatchMetrics;

type Verdict = Result<Verified, Refusal>;

/// How long after a failed batch equation every batch is checked one signature at a time.
pub(crate) const DISTRUST_AFTER_FALLBACK: Duration = Duration::from_secs(1);

/// The queue of requests waiting for a leader, and the leader's baton.
pub(crate) struct Combiner {
    /// `--verify-batch-max` (1: every request is checked alone, no queue at all).
    max: AtomicUsize,
    /// How many requests may lead at once (see [`leader_seats`]).
    seats: usize,
    /// `--verify-batch-window`, in nanoseconds.
    window: AtomicU64,
    queue: Mutex<Queue>,
    /// `queue.jobs.len()`, readable without the lock.
    queued: AtomicUsize,
    /// Requests between the start of `decide` and the combiner (see [`Approach`]).
    approaching: AtomicUsize,
    /// Batches checked and the requests in them (the histogram's count and sum, readable).
    batches: AtomicU64,
    requests: AtomicU64,
    /// Nanoseconds after `born` until which batches are checked one signature at a time (a
    /// batch equation failed shortly before).
    distrust_until: AtomicU64,
    /// [`DISTRUST_AFTER_FALLBACK`], in nanoseconds (tests lengthen it).
    distrust_for: AtomicU64,
    /// Batches of more than one checked one signature at a time because of that.
    distrusted: AtomicU64,
    born: Instant,
    metrics: BatchMetrics,
}

#[derive(Default)]
struct Queue {
    jobs: VecDeque<Job>,
    /// Requests leading now (each holds a seat), at most `Combiner::seats`.
    leaders: usize,
}

/// A request waiting for a leader to check its token.
struct Job {
    token: String,
    audience: Option<String>,
    held: Arc<Held>,
    now: UnixSeconds,
    reply: oneshot::Sender<Msg>,
}

enum Msg {
    /// The verdict on the request's token.
    Verdict(Verdict),
    /// The request leads now: it checks its own token and whatever is queued.
    Lead,
}

/// What the combining of single `Verify` calls has done since the node started, for tests
/// and in-process measurements (the same counts as the `keyfleet_verify_batch_*` metrics).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BatchCounts {
    /// Batches checked (a request checked alone is a batch of one).
    pub batches: u64,
    /// `Verify` calls in them.
    pub requests: u64,
    /// Batches whose leader waited for requests about to join.
    pub waits: u64,
    /// Batches whose batch equation failed, so each signature was checked on its own.
    pub fallbacks: u64,
}

/// A request on its way from the start of `decide` to the combiner; it leaves the count when
/// it reaches [`Combiner::validate`] or is dropped (answered from the cache, or gone).
pub(crate) struct Approach<'a>(&'a Combiner);

impl Drop for Approach<'_> {
    fn drop(&mut self) {
        self.0.approaching.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Held by the leader: hands the lead on when dropped, however the leader's future ends.
struct Lead<'a>(&'a Combiner);

impl Drop for Lead<'_> {
    fn drop(&mut self) {
        self.0.hand_off();
    }
}

/// Held by a queued request: if it is dropped after being handed the lead but before taking
/// it, it hands the lead on.
struct Waiting<'a> {
    combiner: &'a Combiner,
    rx: oneshot::Receiver<Msg>,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        // After `close` no leader can send any more; what was sent before is still readable.
        self.rx.close();
        if let Ok(Msg::Lead) = self.rx.try_recv() {
            self.combiner.hand_off();
        }
    }
}

impl Combiner {
    pub(crate) fn new(
        max: usize,
        window: Duration,
        seats: usize,
        metrics: BatchMetrics,
    ) -> Combiner {
        let combiner = Combiner {
            max: AtomicUsize::new(1),
            seats: seats.max(1),
            window: AtomicU64::new(0),
            queue: Mutex::new(Queue::default()),
            queued: AtomicUsize::new(0),
            approaching: AtomicUsize::new(0),
            batches: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            distrust_until: AtomicU64::new(0),
            distrust_for: AtomicU64::new(DISTRUST_AFTER_FALLBACK.as_nanos() as u64),
            distrusted: AtomicU64::new(0),
            born: Instant::now(),
            metrics,
        };
        combiner.set(max, window);
        combiner
    }

    /// Changes `--verify-batch-max` (at least 1) and `--verify-batch-window` at run time.
    pub(crate) fn set(&self, max: usize, window: Duration) {
        self.max.store(max.max(1), Ordering::Relaxed);
        let nanos = u64::try_from(window.as_nanos()).unwrap_or(u64::MAX);
        self.window.store(nanos, Ordering::Relaxed);
    }

    pub(crate) fn counts(&self) -> BatchCounts {
        BatchCounts {
            batches: self.batches.load(Ordering::Relaxed),
            requests: self.requests.load(Ordering::Relaxed),
            waits: self.metrics.waits.get(),
            fallbacks: self.metrics.fallbacks.get(),
        }
    }

    /// Counts a request as on its way here, until the guard is given to [`Combiner::validate`]
    /// or dropped.
    pub(crate) fn approach(&self) -> Approach<'_> {
        self.approaching.fetch_add(1, Ordering::AcqRel);
        Approach(self)
    }

    /// The verdict [`validate`] gives `token` against `held` at `now`, checked together with
    /// whatever other requests are waiting.
    pub(crate) async fn validate(
        &self,
        approach: Approach<'_>,
        token: &str,
        audience: Option<&str>,
        held: &Arc<Held>,
        now: UnixSeconds,
    ) -> Verdict {
        drop(approach);
        if self.max.load(Ordering::Relaxed) <= 1 {
            return alone(token, audience, held, now);
        }
        let waiting = {
            let mut queue = self.lock();
            if queue.leaders >= self.seats {
                let (reply, rx) = oneshot::channel();
                queue.jobs.push_back(Job {
                    token: token.to_owned(),
                    audience: audience.map(str::to_owned),
                    held: held.clone(),
                    now,
                    reply,
                });
                self.queued.store(queue.jobs.len(), Ordering::Release);
                Some(Waiting { combiner: self, rx })
            } else {
                queue.leaders += 1;
                None
            }
        };
        if let Some(mut waiting) = waiting {
            match (&mut waiting.rx).await {
                Ok(Msg::Verdict(verdict)) => return verdict,
                Ok(Msg::Lead) => {}
                // The leader failed before answering (it panicked): check alone.
                Err(_) => return alone(token, audience, held, now),
            }
        }
        let _lead = Lead(self);
        self.wait_for_company().await;
        self.lead(token, audience, held, now)
    }

    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Yields while requests are on their way here, the batch is not full and the window has
    /// not passed; counts a wait at the first yield. Never waits when no other request is on
    /// its way, nor with a zero window.
    async fn wait_for_company(&self) {
        let window = Duration::from_nanos(self.window.load(Ordering::Relaxed));
        if window.is_zero() {
            return;
        }
        let mut start = None;
        loop {
            let max = self.max.load(Ordering::Relaxed);
            if self.approaching.load(Ordering::Acquire) == 0
                || self.queued.load(Ordering::Acquire) + 1 >= max
            {
                return;
            }
            match start {
                None => {
                    start = Some(Instant::now());
                    self.metrics.waits.inc();
                }
                Some(since) if since.elapsed() >= window => return,
                Some(_) => {}
            }
            tokio::task::yield_now().await;
        }
    }

    /// Takes the queue, checks it with the leader's own token, answers every request and
    /// returns the leader's verdict. Synchronous: a dropped leader never loses a request.
    fn lead(
        &self,
        token: &str,
        audience: Option<&str>,
        held: &Arc<Held>,
        now: UnixSeconds,
    ) -> Verdict {
        let jobs: Vec<Job> = {
            let mut queue = self.lock();
            let take = queue
                .jobs
                .len()
                .min(self.max.load(Ordering::Relaxed).saturating_sub(1));
            let jobs = queue.jobs.drain(..take).collect();
            self.queued.store(queue.jobs.len(), Ordering::Release);
            jobs
        };
        if jobs.is_empty() {
            return self
                .check(&[(token, audience)], held, now)
                .pop()
                .unwrap_or_else(gone);
        }
        // Groups of requests that share a key set and a `now`; the leader's own is the first.
        let mut groups: Vec<(&Arc<Held>, UnixSeconds)> = vec![(held, now)];
        let group_of: Vec<usize> = jobs
            .iter()
            .map(|job| {
                let same =
                    |(h, n): &(&Arc<Held>, UnixSeconds)| Arc::ptr_eq(h, &job.held) && *n == job.now;
                groups.iter().position(same).unwrap_or_else(|| {
                    groups.push((&job.held, job.now));
                    groups.len() - 1
                })
            })
            .collect();
        let mut answers: Vec<Option<Verdict>> = jobs.iter().map(|_| None).collect();
        let mut own = None;
        for (g, &(held, now)) in groups.iter().enumerate() {
            let members: Vec<usize> = (0..jobs.len()).filter(|&i| group_of[i] == g).collect();
            let mut items = Vec::with_capacity(members.len() + 1);
            if g == 0 {
                items.push((token, audience));
            }
            items.extend(
                members
                    .iter()
                    .map(|&i| (jobs[i].token.as_str(), jobs[i].audience.as_deref())),
            );
            let mut verdicts = self.check(&items, held, now).into_iter();
            if g == 0 {
                own = verdicts.next();
            }
            for (&i, verdict) in members.iter().zip(verdicts) {
                answers[i] = Some(verdict);
            }
        }
        for (job, answer) in jobs.into_iter().zip(answers) {
            // A request whose caller went away has dropped its receiver: nothing to do.
            let _ = job.reply.send(Msg::Verdict(answer.unwrap_or_else(gone)));
        }
        own.unwrap_or_else(gone)
    }

    /// One batch: every token of `items` checked against `held` at `now`.
    fn check(&self, items: &[(&str, Option<&str>)], held: &Held, now: UnixSeconds) -> Vec<Verdict> {
        self.metrics.size.observe(items.len() as f64);
        self.batches.fetch_add(1, Ordering::Relaxed);
        self.requests
            .fetch_add(items.len() as u64, Ordering::Relaxed);
        let Some(policy) = held.policy.as_ref() else {
            return items.iter().map(|_| Err(no_issuer())).collect();
        };
        if let [(token, audience)] = items {
            return vec![validate(token, &held.keys, now, policy, *audience)];
        }
        if self.since_born() < self.distrust_until.load(Ordering::Relaxed) {
            self.distrusted.fetch_add(1, Ordering::Relaxed);
            return items
                .iter()
                .map(|(token, audience)| validate(token, &held.keys, now, policy, *audience))
                .collect();
        }
        let validated = validate_all(items, held, now, policy);
        if validated.fell_back {
            self.metrics.fallbacks.inc();
            let until = self.since_born() + self.distrust_for.load(Ordering::Relaxed);
            self.distrust_until.fetch_max(until, Ordering::Relaxed);
        }
        validated.verdicts
    }

    fn since_born(&self) -> u64 {
        u64::try_from(self.born.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// Batches checked one signature at a time after a failed batch equation.
    #[cfg(test)]
    pub(crate) fn distrusted(&self) -> u64 {
        self.distrusted.load(Ordering::Relaxed)
    }

    /// Sets how long a failed batch equation turns batching off (tests).
    #[cfg(test)]
    pub(crate) fn set_distrust_for(&self, period: Duration) {
        self.distrust_for
            .store(period.as_nanos() as u64, Ordering::Relaxed);
    }

    /// Passes a leader's seat to the first queued request still waiting, or frees it.
    fn hand_off(&self) {
        let mut queue = self.lock();
        while let Some(job) = queue.jobs.pop_front() {
            if job.reply.send(Msg::Lead).is_ok() {
                self.queued.store(queue.jobs.len(), Ordering::Release);
                return;
            }
        }
        self.queued.store(0, Ordering::Release);
        queue.leaders -= 1;
    }
}

/// How many requests may lead a batch at once on this machine: 1 up to three cores, half the
/// cores above.
pub(crate) fn leader_seats() -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    if cores <= 3 { 1 } else { cores / 2 }
}

/// [`validate`] on its own, without the combiner.
fn alone(token: &str, audience: Option<&str>, held: &Held, now: UnixSeconds) -> Verdict {
    match held.policy.as_ref() {
        Some(policy) => validate(token, &held.keys, now, policy, audience),
        None => Err(no_issuer()),
    }
}

/// `decide` never combines a request without a policy; this answers one all the same.
fn no_issuer() -> Refusal {
    Refusal {
        reason: Reason::Unavailable,
        kid: None,
        detail: "no issuer known yet".to_owned(),
    }
}

/// Every request gets a verdict; this is for the impossible case where none was made.
fn gone() -> Verdict {
    Err(Refusal {
        reason: Reason::Unavailable,
        kid: None,
        detail: "the batch this request was in gave no verdict".to_owned(),
    })
}

#[cfg(test)]
mod tests;
