//! The node's Prometheus metrics. Every label is drawn from a fixed set (never a kid or subject).

use std::sync::atomic::AtomicI64;

use keyfleet_core::{Reason, RejectedKey};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

type Labels1 = [(&'static str, &'static str); 1];
type Labels2 = [(&'static str, &'static str); 2];

/// Where a key set came from, for `keyfleet_jwks_fetch_total{source}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Origin {
    Push,
    Pull,
    UnknownKid,
    Http,
    /// The key set saved in `--cache-dir`, at start.
    Saved,
}

impl Origin {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Origin::Push => "push",
            Origin::Pull => "pull",
            Origin::UnknownKid => "unknown_kid",
            Origin::Http => "http",
            // The label predates the name "saved key set"; dashboards select on it.
            Origin::Saved => "cache",
        }
    }
}

/// Why the push stream's state was dropped for a full re-sync.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Resync {
    /// A delta for a version other than the one held.
    Gap,
    /// The state a delta gave has another digest than the source's.
    Digest,
}

impl Resync {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Resync::Gap => "gap",
            Resync::Digest => "digest",
        }
    }
}

pub(crate) struct Metrics {
    registry: Registry,
    /// `keyfleet_verify_total{reason}`'s series, in [`Reason::ALL`] order: resolved once, so
    /// an answer costs one atomic add (no label hashing or family lock on the hot path).
    verify: [Counter; Reason::ALL.len()],
    pub(crate) verify_duration: Histogram,
    pub(crate) jwks_version: Gauge,
    pub(crate) jwks_age: Gauge,
    fetch: Family<Labels2, Counter>,
    pub(crate) unknown_kid: Counter,
    /// `keyfleet_jwks_resyncs_total{reason}`: push-stream state dropped for a full re-sync.
    resyncs: Family<Labels1, Counter>,
    /// `keyfleet_jwks_updates_total{kind}`: push-stream messages applied, full or delta.
    updates: Family<Labels1, Counter>,
    rejected: Family<Labels1, Counter>,
    pub(crate) inflight: Gauge<i64, AtomicI64>,
    /// Requests refused by load shedding (`RESOURCE_EXHAUSTED`).
    pub(crate) shed: Counter,
    /// `keyfleet_relay_streams`: watch streams a relay serves (0 without `--serve-watch`).
    pub(crate) relay_streams: Gauge,
    node_info: Family<[(&'static str, String); 2], Gauge>,
    pub(crate) cache: crate::cache::CacheMetrics,
    pub(crate) batch: BatchMetrics,
}

/// The combining of concurrent single `Verify` calls (`node/combine.rs`):
/// `keyfleet_verify_batch_size`, `keyfleet_verify_batch_waits_total`,
/// `keyfleet_verify_batch_fallbacks_total`. No labels.
#[derive(Clone)]
pub(crate) struct BatchMetrics {
    /// `Verify` calls checked together, once per batch (1: a request checked alone).
    pub(crate) size: Histogram,
    /// Batches whose leader waited (yielded) for requests on their way to it.
    pub(crate) waits: Counter,
    /// Batches whose batch equation failed, so each signature was checked on its own.
    pub(crate) fallbacks: Counter,
}

impl BatchMetrics {
    pub(crate) fn register(registry: &mut Registry) -> BatchMetrics {
        let m = BatchMetrics {
            size: Histogram::new(exponential_buckets(1.0, 2.0, 11)),
            waits: Counter::default(),
            fallbacks: Counter::default(),
        };
        registry.register(
            "keyfleet_verify_batch_size",
            "Verify calls whose signatures were checked together, per batch (1: alone)",
            m.size.clone(),
        );
        registry.register(
            "keyfleet_verify_batch_waits",
            "Batches of Verify calls whose leader waited for requests about to join",
            m.waits.clone(),
        );
        registry.register(
            "keyfleet_verify_batch_fallbacks",
            "Batches of Verify calls whose batch check failed, so each signature was checked alone",
            m.fallbacks.clone(),
        );
        m
    }
}

impl Metrics {
    pub(crate) fn new() -> Metrics {
        let mut registry = Registry::default();
        let family = Family::<Labels1, Counter>::default();
        // One series per reason from the start, so rates exist before the first refusal.
        let verify = Reason::ALL.map(|r| family.get_or_create(&[("reason", r.as_str())]).clone());
        registry.register("keyfleet_verify", "Verify answers by reason", family);
        let verify_duration = Histogram::new(exponential_buckets(0.000_025, 2.0, 16));
        registry.register(
            "keyfleet_verify_duration_seconds",
            "Time to answer one Verify, including any unknown-kid refresh",
            verify_duration.clone(),
        );
        let jwks_version = Gauge::default();
        registry.register(
            "keyfleet_jwks_version",
            "Version of the key set held (0 for a JWKS URL)",
            jwks_version.clone(),
        );
        let jwks_age = Gauge::default();
        registry.register(
            "keyfleet_jwks_age_seconds",
            "Seconds since the key set was last fetched or pushed (-1 before any)",
            jwks_age.clone(),
        );
        let fetch = Family::<Labels2, Counter>::default();
        registry.register(
            "keyfleet_jwks_fetch",
            "Key set fetches by source and outcome",
            fetch.clone(),
        );
        let unknown_kid = Counter::default();
        registry.register(
            "keyfleet_unknown_kid",
            "Tokens whose kid was not in the key set",
            unknown_kid.clone(),
        );
        let resyncs = Family::<Labels1, Counter>::default();
        registry.register(
            "keyfleet_jwks_resyncs",
            "Push-stream states dropped for a full re-sync: a delta for another version (gap) or a state whose digest differs from the source's (digest)",
            resyncs.clone(),
        );
        let updates = Family::<Labels1, Counter>::default();
        registry.register(
            "keyfleet_jwks_updates",
            "Push-stream messages applied, by kind (full snapshot or delta; an empty delta renews freshness)",
            updates.clone(),
        );
        for reason in [Resync::Gap, Resync::Digest] {
            let _ = resyncs.get_or_create(&[("reason", reason.as_str())]);
        }
        for kind in ["full", "delta"] {
            let _ = updates.get_or_create(&[("kind", kind)]);
        }
        let rejected = Family::<Labels1, Counter>::default();
        registry.register(
            "keyfleet_keys_rejected",
            "Published keys left out by screening, by why",
            rejected.clone(),
        );
        let inflight = Gauge::<i64, AtomicI64>::default();
        registry.register(
            "keyfleet_inflight_requests",
            "Verify calls in progress",
            inflight.clone(),
        );
        let shed = Counter::default();
        registry.register(
            "keyfleet_shed",
            "Requests refused with RESOURCE_EXHAUSTED because the node was overloaded",
            shed.clone(),
        );
        let relay_streams = Gauge::default();
        registry.register(
            "keyfleet_relay_streams",
            "Watch streams of downstream verifiers this relay serves (--serve-watch)",
            relay_streams.clone(),
        );
        let cache = crate::cache::CacheMetrics::register(&mut registry);
        let batch = BatchMetrics::register(&mut registry);
        let node_info = Family::<[(&'static str, String); 2], Gauge>::default();
        registry.register(
            "keyfleet_node_info",
            "Always 1: this node's id and region, to join onto its other series",
            node_info.clone(),
        );
        jwks_age.set(-1);
        Metrics {
            registry,
            verify,
            verify_duration,
            jwks_version,
            jwks_age,
            fetch,
            unknown_kid,
            resyncs,
            updates,
            rejected,
            inflight,
            shed,
            relay_streams,
            node_info,
            cache,
            batch,
        }
    }

    /// Names the node in `keyfleet_node_info` (one series: the node's own configuration).
    pub(crate) fn describe_node(&self, node_id: &str, region: &str) {
        self.node_info
            .get_or_create(&[
                ("node_id", node_id.to_owned()),
                ("region", region.to_owned()),
            ])
            .set(1);
    }

    pub(crate) fn verified(&self, reason: Reason) {
        let series = Reason::ALL.iter().position(|r| *r == reason);
        if let Some(counter) = series.and_then(|i| self.verify.get(i)) {
            counter.inc();
        }
    }

    pub(crate) fn fetched(&self, origin: Origin, ok: bool) {
        let outcome = if ok { "ok" } else { "error" };
        self.fetch
            .get_or_create(&[("source", origin.as_str()), ("outcome", outcome)])
            .inc();
    }

    pub(crate) fn resynced(&self, why: Resync) {
        self.resyncs
            .get_or_create(&[("reason", why.as_str())])
            .inc();
    }

    /// A push-stream message applied: a full snapshot or a delta.
    pub(crate) fn updated(&self, full: bool) {
        let kind = if full { "full" } else { "delta" };
        self.updates.get_or_create(&[("kind", kind)]).inc();
    }

    pub(crate) fn rejected(&self, why: RejectedKey) {
        self.rejected.get_or_create(&[("why", why.as_str())]).inc();
    }

    /// The OpenMetrics text exposition.
    pub(crate) fn encode(&self) -> String {
        let mut out = String::with_capacity(4096);
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}
