//! The authority's Prometheus metrics. Every label is bounded (key states, rotation triggers,
//! credentials, refusal reasons).

use std::time::Duration;

use keyfleet_core::{KeyRing, KeyState};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use keyfleet_feed::watch::Watchers;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: &'static str,
}

/// What made the active key change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Trigger {
    Scheduled,
    Manual,
    Revocation,
}

impl Trigger {
    const ALL: [Trigger; 3] = [Trigger::Scheduled, Trigger::Manual, Trigger::Revocation];

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Trigger::Scheduled => "scheduled",
            Trigger::Manual => "manual",
            Trigger::Revocation => "revocation",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TriggerLabel {
    trigger: &'static str,
}

/// Which credential a call presented.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Credential {
    /// The admin token (admin calls and `ListKeys`).
    Admin,
    /// The fleet's node token (`WatchJwks`, `GetJwks` with deny lists).
    Node,
}

impl Credential {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Credential::Admin => "admin",
            Credential::Node => "node",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AuthLabel {
    credential: &'static str,
    /// `refused` (UNAUTHENTICATED) or `limited` (past the peer's failure budget).
    outcome: &'static str,
}

/// What a watch message carries: `full` (the whole set) or `delta` (what changed).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
}

/// The counters of one kind of watch message, taken out of their families once so that a send
/// costs two atomic adds.
#[derive(Debug)]
struct Sent {
    messages: Counter,
    bytes: Counter,
}

impl Sent {
    fn new(
        messages: &Family<KindLabel, Counter>,
        bytes: &Family<KindLabel, Counter>,
        kind: &'static str,
    ) -> Sent {
        let label = KindLabel { kind };
        Sent {
            messages: messages.get_or_create(&label).clone(),
            bytes: bytes.get_or_create(&label).clone(),
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

#[derive(Debug)]
pub(crate) struct Metrics {
    registry: Registry,
    keys: Family<StateLabel, Gauge>,
    pub tokens_issued: Counter,
    watchers: Gauge,
    watchers_behind_relays: Gauge,
    watchers_lagging: Gauge,
    watchers_min_acked: Gauge,
    jwks_version: Gauge,
    rotations: Family<TriggerLabel, Counter>,
    next_rotation: Gauge,
    pub persist_failures: Counter,
    /// Requests refused by load shedding (`RESOURCE_EXHAUSTED`).
    pub shed: Counter,
    auth_failures: Family<AuthLabel, Counter>,
    watch_refused: Family<ReasonLabel, Counter>,
    sent_full: Sent,
    sent_delta: Sent,
    pub sessions_started: Counter,
    pub refreshes: Counter,
    sessions_ended: Family<ReasonLabel, Counter>,
    /// Refreshes refused, by kind (`unknown`, `spent`, `expired`, `ended`, `limited`, ...).
    refresh_refused: Family<ReasonLabel, Counter>,
}

impl Metrics {
    pub(crate) fn new() -> Metrics {
        let mut registry = Registry::default();
        let keys = Family::<StateLabel, Gauge>::default();
        let tokens_issued = Counter::default();
        let watchers = Gauge::default();
        let watchers_behind_relays = Gauge::default();
        let watchers_lagging = Gauge::default();
        let watchers_min_acked = Gauge::default();
        let jwks_version = Gauge::default();
        let rotations = Family::<TriggerLabel, Counter>::default();
        let next_rotation = Gauge::default();
        let persist_failures = Counter::default();
        registry.register("keyfleet_keys", "Keys in the ring by state", keys.clone());
        registry.register(
            "keyfleet_tokens_issued",
            "Tokens minted",
            tokens_issued.clone(),
        );
        registry.register(
            "keyfleet_watchers",
            "Connected WatchJwks watchers",
            watchers.clone(),
        );
        registry.register(
            "keyfleet_watchers_behind_relays",
            "Connected watchers that watch through a relay (also counted in keyfleet_watchers)",
            watchers_behind_relays.clone(),
        );
        registry.register(
            "keyfleet_watchers_lagging",
            "Live watchers that have not acknowledged the published JWKS version",
            watchers_lagging.clone(),
        );
        registry.register(
            "keyfleet_watchers_min_acked_version",
            "Lowest JWKS version acknowledged by a live watcher (-1 when none is live)",
            watchers_min_acked.clone(),
        );
        registry.register(
            "keyfleet_jwks_version",
            "Version of the published JWKS",
            jwks_version.clone(),
        );
        registry.register(
            "keyfleet_rotations",
            "Active key changes by trigger",
            rotations.clone(),
        );
        registry.register(
            "keyfleet_key_next_rotation_timestamp_seconds",
            "Unix time of the next scheduled rotation",
            next_rotation.clone(),
        );
        registry.register(
            "keyfleet_keyring_persist_failures",
            "Failed writes of the key ring (the change was not applied)",
            persist_failures.clone(),
        );
        let shed = Counter::default();
        registry.register(
            "keyfleet_shed",
            "Requests refused with RESOURCE_EXHAUSTED because the authority was overloaded",
            shed.clone(),
        );
        let auth_failures = Family::<AuthLabel, Counter>::default();
        registry.register(
            "keyfleet_auth_failures",
            "Calls with a wrong or missing credential, by credential and outcome (refused, or limited past the peer's failure budget)",
            auth_failures.clone(),
        );
        let watch_refused = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "keyfleet_watch_refused",
            "Authenticated WatchJwks streams refused, by reason (full, bad_hello, node_id_taken)",
            watch_refused.clone(),
        );
        let watch_messages = Family::<KindLabel, Counter>::default();
        registry.register(
            "keyfleet_watch_messages",
            "WatchJwks messages sent, by kind (full: the whole key set; delta: what changed)",
            watch_messages.clone(),
        );
        let watch_bytes = Family::<KindLabel, Counter>::default();
        registry.register(
            "keyfleet_watch_bytes",
            "Encoded bytes of the WatchJwks messages sent, by kind (full, delta)",
            watch_bytes.clone(),
        );
        let sessions_started = Counter::default();
        registry.register(
            "keyfleet_sessions_started",
            "Sessions started (StartSession)",
            sessions_started.clone(),
        );
        let refreshes = Counter::default();
        registry.register(
            "keyfleet_refreshes",
            "Refresh calls answered with a new pair of tokens",
            refreshes.clone(),
        );
        let sessions_ended = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "keyfleet_sessions_ended",
            "Sessions ended and published to the fleet, by reason (logout, admin, revoked_subject, refresh_token_reuse)",
            sessions_ended.clone(),
        );
        let refresh_refused = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "keyfleet_refresh_refused",
            "Refresh calls refused, by kind (empty, too_large, unknown, spent, expired, ended, limited)",
            refresh_refused.clone(),
        );
        let sent_full = Sent::new(&watch_messages, &watch_bytes, "full");
        let sent_delta = Sent::new(&watch_messages, &watch_bytes, "delta");
        for trigger in Trigger::ALL {
            let _ = rotations.get_or_create(&TriggerLabel {
                trigger: trigger.as_str(),
            });
        }
        Metrics {
            registry,
            keys,
            tokens_issued,
            watchers,
            watchers_behind_relays,
            watchers_lagging,
            watchers_min_acked,
            jwks_version,
            rotations,
            next_rotation,
            persist_failures,
            shed,
            auth_failures,
            watch_refused,
            sent_full,
            sent_delta,
            sessions_started,
            refreshes,
            sessions_ended,
            refresh_refused,
        }
    }

    pub(crate) fn sessions_ended(&self, reason: crate::session_store::EndReason, n: u64) {
        self.sessions_ended
            .get_or_create(&ReasonLabel {
                reason: reason.as_str(),
            })
            .inc_by(n);
    }

    pub(crate) fn refresh_refused(&self, reason: &'static str) {
        self.refresh_refused
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }

    /// A watch message of `bytes` bytes went out (`full`: a whole snapshot, else a delta).
    pub(crate) fn sent(&self, full: bool, bytes: usize) {
        let sent = if full {
            &self.sent_full
        } else {
            &self.sent_delta
        };
        sent.messages.inc();
        sent.bytes.inc_by(bytes as u64);
    }

    pub(crate) fn auth_failed(&self, credential: Credential, limited: bool) {
        self.auth_failures
            .get_or_create(&AuthLabel {
                credential: credential.as_str(),
                outcome: if limited { "limited" } else { "refused" },
            })
            .inc();
    }

    pub(crate) fn watch_refused(&self, reason: &'static str) {
        self.watch_refused
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }

    /// Refreshes the gauges that describe the ring.
    pub(crate) fn observe_ring(&self, ring: &KeyRing) {
        for state in [KeyState::Next, KeyState::Active, KeyState::Retiring] {
            let n = ring.keys.iter().filter(|k| k.state == state).count();
            self.keys
                .get_or_create(&StateLabel {
                    state: state.as_str(),
                })
                .set(n as i64);
        }
        self.keys
            .get_or_create(&StateLabel {
                state: KeyState::Revoked.as_str(),
            })
            .set(ring.revoked_kids.len() as i64);
        self.jwks_version.set(ring.version as i64);
        self.next_rotation.set(ring.next_rotation_at());
    }

    /// Refreshes the watcher gauges: how many are connected (directly and behind relays), and
    /// how far the live ones are from holding the published version (a rotation waits for
    /// them). One pass over the fleet view.
    pub(crate) fn observe_watchers(&self, watchers: &Watchers, timeout: Duration) {
        let published = self.jwks_version.get().max(0) as u64;
        let summary = watchers.summary(published, timeout);
        self.watchers.set(summary.connected as i64);
        self.watchers_behind_relays
            .set(summary.behind_relays as i64);
        self.watchers_lagging.set(summary.lagging as i64);
        self.watchers_min_acked
            .set(summary.min_acked.map_or(-1, |v| v as i64));
    }

    pub(crate) fn rotated(&self, trigger: Trigger) {
        self.rotations
            .get_or_create(&TriggerLabel {
                trigger: trigger.as_str(),
            })
            .inc();
    }

    /// The OpenMetrics text exposition.
    pub(crate) fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}
