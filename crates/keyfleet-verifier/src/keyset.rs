//! The key set the node holds: screened when it arrives, swapped atomically so `Verify` never
//! waits on a refresh, with its age (for `--max-stale`) and readiness; saved to and loaded from
//! `--cache-dir` through [`crate::saved`].

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwapOption;
use keyfleet_core::{KeySet, Policy, UnixSeconds};
use keyfleet_runtime::secure_fs::SecureFsError;

use crate::config::{Config, Source};
use crate::metrics::{Metrics, Origin};
use crate::node::Unbatchable;
use crate::saved::{self, SavedKeySet};
use crate::upstream::Fetched;

/// One immutable key set with the policy tokens are checked under.
#[derive(Debug)]
pub(crate) struct Held {
    pub(crate) keys: KeySet,
    /// `None` while no issuer is known (no `--issuer`, and the source named none).
    pub(crate) policy: Option<Policy>,
    /// Its keys whose signatures are never checked in a batch (`node/signatures.rs`).
    pub(crate) unbatchable: Unbatchable,
}

impl Held {
    pub(crate) fn new(keys: KeySet, policy: Option<Policy>) -> Held {
        let unbatchable = Unbatchable::of(&keys);
        Held {
            keys,
            policy,
            unbatchable,
        }
    }
}

/// What happened to a fetched key set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Applied {
    /// A new set is in use.
    Replaced,
    /// The same version again: only its freshness was renewed.
    Renewed,
    /// Older than the held set while the push stream is live: left alone.
    Ignored,
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum ApplyError {
    #[error("the jwks holds no usable key")]
    NoUsableKeys,
}

/// The node's key set: the one in use ([`Held`]), when it was fetched, and whether the push
/// stream is live.
pub(crate) struct NodeKeys {
    current: ArcSwapOption<Held>,
    /// Unix seconds of the last successful fetch or push of the held set.
    fetched_at: AtomicI64,
    /// Serialises appliers (push, pull, unknown-kid refresh); never held across I/O.
    apply_lock: Mutex<()>,
    /// Serialises saves (on blocking threads).
    save_lock: Mutex<()>,
    /// True while the push stream delivers snapshots: a pull then never rolls the version back.
    pub(crate) watching: AtomicBool,
    /// Messages the push stream delivered and the node applied (full, delta or "unchanged"):
    /// a pull is skipped while this moves.
    pub(crate) pushes: AtomicU64,
    ready: tokio::sync::watch::Sender<bool>,
    config: Config,
    metrics: Arc<Metrics>,
}

impl NodeKeys {
    pub(crate) fn new(config: Config, metrics: Arc<Metrics>) -> NodeKeys {
        NodeKeys {
            current: ArcSwapOption::empty(),
            fetched_at: AtomicI64::new(0),
            apply_lock: Mutex::new(()),
            save_lock: Mutex::new(()),
            watching: AtomicBool::new(false),
            pushes: AtomicU64::new(0),
            ready: tokio::sync::watch::Sender::new(false),
            config,
            metrics,
        }
    }

    pub(crate) fn current(&self) -> Option<Arc<Held>> {
        self.current.load_full()
    }

    pub(crate) fn version(&self) -> u64 {
        self.current.load().as_ref().map_or(0, |h| h.keys.version)
    }

    /// Seconds since the held set was fetched, or `None` before any.
    pub(crate) fn age(&self) -> Option<i64> {
        self.current.load().as_ref()?;
        Some(self.config.clock.now() - self.fetched_at.load(Ordering::Acquire))
    }

    /// True when the held set is older than `max_stale` (fail closed).
    pub(crate) fn is_stale(&self) -> bool {
        self.age()
            .is_some_and(|age| age > self.config.max_stale.as_secs() as i64)
    }

    /// Resolves to true once any key set is held.
    pub(crate) fn ready(&self) -> tokio::sync::watch::Receiver<bool> {
        self.ready.subscribe()
    }

    /// Renews the freshness of the held set when it is at `version` (an empty delta: the
    /// source says nothing changed); true when it was.
    pub(crate) fn renew(&self, version: u64) -> bool {
        let _guard = self.apply_lock.lock().unwrap_or_else(|e| e.into_inner());
        if self.current.load().as_ref().map(|h| h.keys.version) != Some(version) {
            return false;
        }
        self.fetched_at
            .fetch_max(self.config.clock.now(), Ordering::AcqRel);
        true
    }

    /// Screens and installs `fetched` from `origin`.
    pub(crate) fn apply(&self, fetched: Fetched, origin: Origin) -> Result<Applied, ApplyError> {
        let now = self.config.clock.now();
        self.install(fetched, origin, now)
    }

    fn install(
        &self,
        fetched: Fetched,
        origin: Origin,
        fetched_at: UnixSeconds,
    ) -> Result<Applied, ApplyError> {
        let http = matches!(self.config.source, Source::JwksUrl { .. });
        let _guard = self.apply_lock.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(held) = self.current.load().as_ref() {
            let held_version = held.keys.version;
            if !http && fetched.version == held_version {
                self.fetched_at.fetch_max(fetched_at, Ordering::AcqRel);
                return Ok(Applied::Renewed);
            }
            if fetched.version < held_version {
                // A delta only moves forward: a pull that got ahead is not undone by it.
                if fetched.from_delta
                    || (origin != Origin::Push && self.watching.load(Ordering::Acquire))
                {
                    tracing::debug!(
                        fetched = fetched.version,
                        held = held_version,
                        "ignoring an older pulled snapshot"
                    );
                    return Ok(Applied::Ignored);
                }
                tracing::warn!(
                    fetched = fetched.version,
                    held = held_version,
                    source = origin.as_str(),
                    "the authority's jwks version went backwards; applying it (the authority is the source of truth)"
                );
            }
        }
        let (keys, rejected) = KeySet::build(
            fetched.version,
            fetched.issuer,
            &fetched.keys,
            fetched.revoked_kids,
            fetched.revoked_tokens,
        );
        let keys = keys.with_revoked_sessions(fetched.revoked_sessions);
        for _ in 0..fetched.unparseable {
            self.metrics
                .rejected(keyfleet_core::RejectedKey::Unparseable);
        }
        for (kid, why) in &rejected {
            self.metrics.rejected(*why);
            tracing::warn!(kid = %keyfleet_core::escape_untrusted(kid), why = why.as_str(), source = origin.as_str(), "published key left out by screening");
        }
        if http && keys.is_empty() {
            return Err(ApplyError::NoUsableKeys);
        }
        let issuer = self.config.issuer.clone().or_else(|| keys.issuer.clone());
        if let (Some(configured), Some(announced)) = (&self.config.issuer, &keys.issuer)
            && configured != announced
        {
            tracing::warn!(%configured, announced = %keyfleet_core::escape_untrusted(announced), "--issuer differs from the issuer the authority announces");
        }
        let policy = issuer.map(|issuer| Policy {
            issuer,
            audiences: self.config.audiences.clone(),
            leeway: self.config.leeway.as_secs() as i64,
            max_token_bytes: self.config.max_token_bytes,
            max_lifetime: self.config.max_lifetime.map(|d| d.as_secs() as i64),
        });
        let version = keys.version;
        let _change = tracing::info_span!(
            "jwks.apply",
            node_id = %self.config.node_id,
            region = %self.config.region,
            version,
            source = origin.as_str(),
        )
        .entered();
        tracing::info!(
            version,
            keys = keys.len(),
            source = origin.as_str(),
            "key set applied"
        );
        self.current.store(Some(Arc::new(Held::new(keys, policy))));
        self.fetched_at.store(fetched_at, Ordering::Release);
        self.metrics.jwks_version.set(version as i64);
        self.ready.send_replace(true);
        Ok(Applied::Replaced)
    }

    /// Saves the held set in `--cache-dir`, if one is configured. Blocking: run it on a
    /// blocking thread. Errors are logged, never fatal.
    pub(crate) fn save(&self) {
        let Some(dir) = &self.config.cache_dir else {
            return;
        };
        let _guard = self.save_lock.lock().unwrap_or_else(|e| e.into_inner());
        // Read the state under the lock so a slow older write never lands last.
        let Some(held) = self.current() else { return };
        let fetched_at = self.fetched_at.load(Ordering::Acquire);
        let saved = SavedKeySet::of(&held, self.config.source.url(), fetched_at);
        if let Err(e) = saved::write(dir, &saved) {
            tracing::warn!(path = %saved::path(dir).display(), error = %e, "could not save the key set");
        }
    }

    /// Installs the key set saved in `--cache-dir` (creating the directory when missing) if
    /// there is one for this source that is younger than `max_stale`; see [`saved::read`] for
    /// what is ignored and what refuses the start. Blocking.
    pub(crate) fn load_saved(&self) -> Result<(), SecureFsError> {
        let Some(dir) = &self.config.cache_dir else {
            return Ok(());
        };
        let Some(saved) = saved::read(dir, self.config.source.url(), &self.metrics)? else {
            return Ok(());
        };
        let age = self.config.clock.now() - saved.fetched_at;
        if age > self.config.max_stale.as_secs() as i64 {
            tracing::info!(
                age_seconds = age,
                "the saved key set is older than --max-stale; ignoring it"
            );
            return Ok(());
        }
        let (version, fetched_at) = (saved.version, saved.fetched_at);
        match self.install(saved.into_fetched(), Origin::Saved, fetched_at) {
            Ok(_) => {
                self.metrics.fetched(Origin::Saved, true);
                tracing::info!(
                    version,
                    age_seconds = age,
                    "serving the saved key set until the source answers"
                );
            }
            Err(e) => {
                self.metrics.fetched(Origin::Saved, false);
                tracing::warn!(error = %e, "the saved key set holds no usable key; ignoring it");
            }
        }
        Ok(())
    }
}
