//! The unknown-`kid` refresh gate: one refresh in flight (callers share it), at most one per
//! cool-down (`--unknown-kid-cooldown`, [`crate::DEFAULT_UNKNOWN_KID_COOLDOWN`]), a wait of at
//! most [`UNKNOWN_KID_WAIT`] for it, and a bounded memory of kids a refresh did not find, so a
//! flood of made-up kids cannot flood the source.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

/// How long a `Verify` with an unknown kid waits for the refresh it triggered or joined before
/// it answers `UNKNOWN_KID` (the refresh goes on and serves the next caller). Bounds the extra
/// latency a new key can cost the first tokens it signed; the cool-down bounds the load.
pub(crate) const UNKNOWN_KID_WAIT: Duration = Duration::from_secs(1);
/// How many missing kids are remembered.
const MAX_MISSING: usize = 4096;

/// What a caller with an unknown kid should do.
pub(crate) enum Ticket {
    /// Nothing: the kid is known to be missing, or the cool-down has not passed.
    Skip,
    /// Run the refresh, then call [`Lead::finish`]; others wait on the same receiver.
    Lead(Lead, watch::Receiver<bool>),
    /// A refresh is in flight: wait for it.
    Wait(watch::Receiver<bool>),
}

/// The right (and duty) to run the one refresh in flight.
pub(crate) struct Lead {
    done: watch::Sender<bool>,
}

impl Lead {
    /// Wakes every waiter; the next refresh may start after the cool-down.
    pub(crate) fn finish(self) {
        self.done.send_replace(true);
    }
}

pub(crate) struct Gate {
    cooldown: Duration,
    /// How long a kid a refresh did not find is not worth another refresh.
    missing_ttl: Duration,
    state: Mutex<State>,
    /// Keyed by a keyed hash of the kid, so memory stays bounded whatever the kids' length.
    hasher: RandomState,
}

struct State {
    last_start: Option<Instant>,
    inflight: Option<watch::Receiver<bool>>,
    missing: HashMap<u64, Instant>,
}

impl Gate {
    pub(crate) fn new(cooldown: Duration) -> Gate {
        Gate {
            cooldown,
            missing_ttl: (cooldown * 4).clamp(Duration::from_secs(1), Duration::from_secs(60)),
            state: Mutex::new(State {
                last_start: None,
                inflight: None,
                missing: HashMap::new(),
            }),
            hasher: RandomState::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Decides whether an unknown `kid` triggers (or joins) a refresh.
    pub(crate) fn ticket(&self, kid: &str) -> Ticket {
        let now = Instant::now();
        let hash = self.hasher.hash_one(kid);
        let mut state = self.lock();
        if let Some(seen) = state.missing.get(&hash) {
            if now.duration_since(*seen) < self.missing_ttl {
                return Ticket::Skip;
            }
            state.missing.remove(&hash);
        }
        if let Some(rx) = &state.inflight {
            if !*rx.borrow() {
                return Ticket::Wait(rx.clone());
            }
            state.inflight = None;
        }
        if state
            .last_start
            .is_some_and(|t| now.duration_since(t) < self.cooldown)
        {
            return Ticket::Skip;
        }
        state.last_start = Some(now);
        let (done, rx) = watch::channel(false);
        state.inflight = Some(rx.clone());
        Ticket::Lead(Lead { done }, rx)
    }

    /// Remembers that a refresh did not find `kid`.
    pub(crate) fn missing(&self, kid: &str) {
        let now = Instant::now();
        let hash = self.hasher.hash_one(kid);
        let ttl = self.missing_ttl;
        let mut state = self.lock();
        if state.missing.len() >= MAX_MISSING {
            state
                .missing
                .retain(|_, seen| now.duration_since(*seen) < ttl);
            if state.missing.len() >= MAX_MISSING {
                state.missing.clear();
            }
        }
        state.missing.insert(hash, now);
    }
}

/// Waits for a refresh to finish, at most [`UNKNOWN_KID_WAIT`]. True when it finished in time.
pub(crate) async fn wait(mut rx: watch::Receiver<bool>) -> bool {
    // A dropped sender (the refresh task ended without finishing) counts as finished.
    tokio::time::timeout(UNKNOWN_KID_WAIT, rx.wait_for(|done| *done))
        .await
        .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn coalesces_and_cools_down() {
        let gate = Gate::new(Duration::from_secs(5));
        let Ticket::Lead(lead, _) = gate.ticket("a") else {
            panic!("first unknown kid leads")
        };
        assert!(
            matches!(gate.ticket("b"), Ticket::Wait(_)),
            "joins the refresh in flight"
        );
        lead.finish();
        assert!(matches!(gate.ticket("c"), Ticket::Skip), "cool-down");
        gate.missing("a");
        tokio::time::advance(Duration::from_secs(6)).await;
        assert!(
            matches!(gate.ticket("a"), Ticket::Skip),
            "a is remembered missing"
        );
        assert!(
            matches!(gate.ticket("d"), Ticket::Lead(..)),
            "cool-down passed"
        );
        tokio::time::advance(Duration::from_secs(21)).await;
        assert!(
            matches!(gate.ticket("a"), Ticket::Wait(_)),
            "forgotten after its ttl; joins d's refresh"
        );
    }

    #[test]
    fn missing_kids_are_bounded() {
        let gate = Gate::new(Duration::from_secs(5));
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        rt.block_on(async {
            for i in 0..(MAX_MISSING * 3) {
                gate.missing(&format!("kid-{i}"));
            }
        });
        assert!(gate.lock().missing.len() <= MAX_MISSING);
    }
}
