//! The authority's handle ([`Authority`]) and the state its servers share ([`AuthorityState`]);
//! its methods live in the files named for their job (see the crate docs).

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use arc_swap::ArcSwap;
use keyfleet_core::RingPolicy;
use keyfleet_proto::v1 as pb;
use keyfleet_runtime::Clock;
use tokio::sync::{Notify, watch};

use crate::admin::AdminToken;
use crate::keys::{RingState, SecretKey};
use crate::metrics::Metrics;
use crate::ring_file::RingFile;
use crate::watchers::{Slots, Watchers};

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
    pub snapshots: watch::Sender<Arc<pb::JwksSnapshot>>,
    pub watchers: Mutex<Watchers>,
    /// Asks the lifecycle loop for a tick now (after an ack or a disconnect).
    pub kick: Notify,
    pub metrics: Metrics,
    /// How the listeners are served (TLS, limits) and the admin rules (`--insecure-admin`,
    /// the admin rate).
    pub transport: keyfleet_runtime::serve::Transport,
    pub insecure_admin: bool,
    pub admin_rate: u32,
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

    /// The snapshot verifiers receive now.
    pub(crate) fn current(&self) -> Arc<pb::JwksSnapshot> {
        self.snapshots.borrow().clone()
    }

    /// `Cache-Control: max-age` of the HTTP JWKS: half of publish-ahead (1s to 5min), so a
    /// cached copy learns a next key well before it may sign.
    pub(crate) fn jwks_max_age(&self) -> i64 {
        (self.policy.publish_ahead / 2).clamp(1, 300)
    }
}
