//! What the workers and background tasks of one run share: the verifier pool the load goes
//! through (`keyfleet_client::VerifierPool`: balancing, ejection, hedging), the token pool, the
//! counters of the second in progress, the run's events and its stop flag.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Duration;

use anyhow::Context as _;
use keyfleet_client::{PoolConfig, VerifierPool};
use keyfleet_runtime::client::Settings;
use rand::Rng as _;
use tokio::time::Instant;
use tonic::transport::Channel;

use super::counters::Counters;
use super::tokens::{Expect, Pool, PoolToken};
use super::{Invalid, LoadOptions};
use crate::report::{Event, EventKind};

/// One run's shared state, behind an `Arc` in every worker and background task.
pub(super) struct Shared {
    /// The load's requests go through it: a node per request by power of two choices, a
    /// stalled request hedged on another node, failing nodes ejected and probed back.
    pub(super) verifiers: VerifierPool,
    /// `connections_per_node` connections to every node (node-major), for the cost
    /// measurements, which address nodes directly.
    pub(super) channels: Vec<Channel>,
    pub(super) pool: RwLock<Pool>,
    /// The second in progress; the ticker swaps in a fresh one every second.
    pub(super) counters: Mutex<Counters>,
    next_id: AtomicU64,
    pub(super) invalid_ratio: f64,
    invalid_kind: Invalid,
    pub(super) audience: String,
    /// The kid the authority signed with last (for the timeline).
    pub(super) current_kid: Mutex<String>,
    /// Rotations and kills, in order.
    events: Mutex<Vec<Event>>,
    stop: AtomicBool,
}

impl Shared {
    /// Connects (lazily) to every node in `urls`, the load through a pool configured by
    /// `pool` (its TLS is the run's).
    pub(super) async fn connect(
        options: &LoadOptions,
        urls: &[String],
        pool: PoolConfig,
    ) -> anyhow::Result<Arc<Shared>> {
        anyhow::ensure!(!urls.is_empty(), "no verifiers to load");
        let mut channels = Vec::new();
        for url in urls {
            for _ in 0..options.connections_per_node.max(1) {
                let channel =
                    keyfleet_runtime::client::endpoint(url, &options.tls, &Settings::LOAD)
                        .context("--verifiers")?
                        .connect_lazy();
                channels.push(channel);
            }
        }
        let verifiers = VerifierPool::builder()
            .urls(urls.iter().cloned())
            .config(PoolConfig {
                tls: options.tls.clone(),
                ..pool
            })
            .build()
            .await
            .context("--verifiers")?;
        Ok(Arc::new(Shared {
            verifiers,
            channels,
            pool: RwLock::new(Pool::default()),
            counters: Mutex::new(Counters::new()),
            next_id: AtomicU64::new(0),
            invalid_ratio: options.invalid_ratio.clamp(0.0, 1.0),
            invalid_kind: options.invalid_kind,
            audience: options.audience.clone(),
            current_kid: Mutex::new(String::new()),
            events: Mutex::new(Vec::new()),
            stop: AtomicBool::new(false),
        }))
    }

    /// A fresh id for a pool token.
    pub(super) fn next_id(&self) -> u32 {
        self.next_id.fetch_add(1, Ordering::Relaxed) as u32
    }

    /// A token to send; `None` while the pool has none of the kind asked for (e.g. expired
    /// tokens in the first seconds). The verifier pool picks the node.
    pub(super) fn choose(&self) -> Option<Arc<PoolToken>> {
        let mut rng = rand::rng();
        let pool = read(&self.pool);
        let bad = !pool.invalid.is_empty() && rng.random_bool(self.invalid_ratio);
        let token = if bad && self.invalid_kind != Invalid::Any {
            let kind: Vec<_> = pool
                .invalid
                .iter()
                .filter(|t| matches!(t.expect, Expect::Refused(r) if self.invalid_kind.allows(r)))
                .collect();
            if kind.is_empty() {
                return None;
            }
            kind[rng.random_range(0..kind.len())].clone()
        } else {
            let from = if bad { &pool.invalid } else { &pool.valid };
            if from.is_empty() {
                return None;
            }
            from[rng.random_range(0..from.len())].clone()
        };
        Some(token)
    }

    pub(super) fn set_current_kid(&self, kid: &str) {
        kid.clone_into(&mut lock(&self.current_kid));
    }

    pub(super) fn current_kid(&self) -> String {
        lock(&self.current_kid).clone()
    }

    /// Records a rotation or a kill, now, in the run that started at `started`.
    pub(super) fn event(&self, started: Instant, kind: EventKind, detail: String) {
        let t = started.elapsed().as_secs_f64();
        lock(&self.events).push(Event { t, kind, detail });
    }

    pub(super) fn take_events(&self) -> Vec<Event> {
        std::mem::take(&mut *lock(&self.events))
    }

    /// Tells every background task the load is over.
    pub(super) fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }

    pub(super) fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    /// Sleeps until `at`; false when the run stopped first.
    pub(super) async fn sleep_until(&self, at: Instant) -> bool {
        while Instant::now() < at {
            if self.stopped() {
                return false;
            }
            // Short steps, so a stop is noticed within 100 ms.
            let step = (at - Instant::now()).min(Duration::from_millis(100));
            tokio::time::sleep(step).await;
        }
        !self.stopped()
    }
}

// A panic while one of these locks is held leaves plain counts and token lists behind, still
// usable; the run goes on with them rather than cascading the panic into every worker.

pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

pub(super) fn read<T>(l: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(PoisonError::into_inner)
}

pub(super) fn write<T>(l: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(PoisonError::into_inner)
}
