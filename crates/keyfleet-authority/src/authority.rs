//! The authority's handle ([`Authority`]) and the state its servers share ([`AuthorityState`]);
//! its methods live in the files named for their job (see the crate docs).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use arc_swap::ArcSwap;
use keyfleet_core::RingPolicy;
use keyfleet_core::UnixSeconds;
use keyfleet_feed::watch::{Slots, WatchOwner, Watchers};
use keyfleet_feed::{Feed, Message, Published};
use keyfleet_runtime::Clock;
use tokio::sync::Notify;

use crate::admin::AdminToken;
use crate::keys::{RingState, SecretKey};
use crate::metrics::Metrics;
use crate::ring_file::RingFile;

/// The signing authority: open it with [`Authority::open`], then [`Authority::serve`] it.
pub struct Authority {
    pub(crate) shared: Arc<AuthorityState>,
}

impl std::fmt::Debug for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authority")
            .field("issuer", &self.shared.issuer)
            .finish_non_exhaustive()
    }
}

impl Authority {
    /// The admin bearer token (for the demo and tests).
    pub fn admin_token(&self) -> String {
        self.shared.admin.expose().to_owned()
    }

    /// The fleet credential verifiers send (for the demo and tests).
    pub fn node_token(&self) -> String {
        self.shared.node.expose().to_owned()
    }
}

/// The key currently signing.
pub(crate) struct Signer {
    pub kid: String,
    pub key: SecretKey,
}

/// Everything the servers, the watch streams and the lifecycle loop share.
pub(crate) struct AuthorityState {
    pub issuer: String,
    pub policy: RingPolicy,
    pub clock: Clock,
    pub watcher_timeout: Duration,
    pub tick_interval: Duration,
    pub admin: AdminToken,
    /// The fleet credential (`WatchJwks`, `GetJwks` with deny lists).
    pub node: AdminToken,
    /// The caps on open watch streams.
    pub slots: Slots,
    pub file: Arc<RingFile>,
    /// The data directory's lock ([`RingFile::create_and_lock_dir`]), held as long as the
    /// authority lives.
    pub _dir_lock: std::fs::File,
    /// The ring of record and its private keys; held across the write that persists a change,
    /// so memory never runs ahead of disk. Changed only by `commit`.
    pub ring: tokio::sync::Mutex<RingState>,
    pub signer: ArcSwap<Signer>,
    /// What verifiers receive: every version encoded once (full, public, delta from the
    /// previous one) and a bounded change log for resuming nodes.
    pub feed: Feed,
    pub watchers: Mutex<Watchers>,
    /// Asks the lifecycle loop for a tick now (after an ack or a disconnect).
    pub kick: Notify,
    /// The ring's `rotation_pending`, as last committed: only then can an ack or a disconnect
    /// release a promotion, so only then do they kick the lifecycle loop (10,000 watchers
    /// acking a revocation must not run 10,000 ticks).
    pub rotation_pending: AtomicBool,
    pub metrics: Metrics,
    /// How the listeners are served (TLS, limits) and the admin rules (`--insecure-admin`,
    /// the admin rate).
    pub transport: keyfleet_runtime::serve::Transport,
    pub insecure_admin: bool,
    pub admin_rate: u32,
    /// Where sessions live (`sessions.db` by default).
    pub sessions: Arc<dyn crate::session_store::SessionStore>,
    pub session_policy: crate::config::SessionPolicy,
    /// Where the next step of the session purge sweep starts.
    pub purge_cursor: Mutex<String>,
}

impl AuthorityState {
    pub(crate) fn lock_watchers(&self) -> MutexGuard<'_, Watchers> {
        self.watchers.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Brings the watcher gauges up to date (before they are read or exported).
    pub(crate) fn observe_watchers(&self) {
        self.metrics
            .observe_watchers(&self.lock_watchers(), self.watcher_timeout);
    }

    /// The lowest JWKS version every live watcher holds.
    pub(crate) fn min_acked(&self) -> Option<u64> {
        self.lock_watchers().min_acked(self.watcher_timeout)
    }

    /// The version verifiers receive now.
    pub(crate) fn current(&self) -> Arc<Published> {
        self.feed.current()
    }

    /// `Cache-Control: max-age` of the HTTP JWKS: half of publish-ahead (1s to 5min), so a
    /// cached copy learns a next key well before it may sign.
    pub(crate) fn jwks_max_age(&self) -> i64 {
        (self.policy.publish_ahead / 2).clamp(1, 300)
    }
}

/// The watch streams' view of the authority: its fleet view, its clock, the lifecycle loop to
/// wake (an ack may release a promotion) and the metrics of what is sent.
impl WatchOwner for AuthorityState {
    fn watchers(&self) -> MutexGuard<'_, Watchers> {
        self.lock_watchers()
    }

    fn now(&self) -> UnixSeconds {
        self.clock.now()
    }

    fn changed(&self) {
        if self.rotation_pending.load(Ordering::Relaxed) {
            self.kick.notify_one();
        }
    }

    fn sent(&self, message: &Message) {
        self.metrics.sent(message.full, message.bytes.len());
    }
}
