//! The verifier node: the `Verify` RPC on the hot path, the HTTP endpoints, and the background
//! tasks that keep the key set fresh (push stream, periodic pull, JWKS URL polling).

use std::hash::{BuildHasher, RandomState};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use keyfleet_core::token::Refusal;
use keyfleet_core::{Reason, Verified, escape_untrusted, validate};
use keyfleet_proto::v1::verifier_server::{self, VerifierServer};
use keyfleet_proto::v1::{self as pb, VerifyRequest, VerifyResponse, WatchJwksRequest};
use keyfleet_runtime::CancellationToken;
use keyfleet_runtime::rpc_trace::ServerLabels;
use keyfleet_runtime::serve::{
    Transport, serve_grpc_with, serve_http_with, with_health_and_reflection,
};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tonic::service::Routes;
use tonic::{Request, Response, Status};

use crate::cache::VerifyCache;
use crate::config::{Config, Source};
use crate::gate::{self, Gate, Ticket};
use crate::metrics::{Metrics, Origin};
use crate::store::{Applied, Held, Store};
use crate::upstream::{Fetched, Upstream};

mod batch;
pub use batch::MAX_BATCH;

/// The gRPC service name, as health reports it.
const SERVICE: &str = "keyfleet.v1.Verifier";
/// How long a `Verify` with an unknown kid waits for the refresh it triggered or joined.
const UNKNOWN_KID_WAIT: Duration = Duration::from_secs(1);
const BACKOFF_START: Duration = Duration::from_millis(100);
const BACKOFF_CAP: Duration = Duration::from_secs(10);
/// How often an idle watch stream repeats its ack. The authority holds a node id for a stream
/// heard from within three heartbeats, and refuses another stream under that id meanwhile.
const HEARTBEAT: Duration = Duration::from_secs(5);

/// A verifier node. Cheap to clone; every clone is the same node.
#[derive(Clone)]
pub struct Verifier {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("node_id", &self.inner.config.node_id)
            .field("source", &self.inner.config.source)
            .field("version", &self.inner.store.version())
            .finish_non_exhaustive()
    }
}

struct Inner {
    config: Config,
    store: Arc<Store>,
    upstream: Upstream,
    gate: Gate,
    metrics: Arc<Metrics>,
    cache: VerifyCache,
}

impl Verifier {
    /// Checks `config`, builds the source client (without connecting) and loads the cache.
    /// Must run inside a Tokio runtime.
    pub async fn open(config: Config) -> anyhow::Result<Verifier> {
        config.check()?;
        let upstream = Upstream::new(
            &config.source,
            &config.source_tls,
            config.node_token_file.as_deref(),
        )?;
        let metrics = Arc::new(Metrics::new());
        metrics.describe_node(&config.node_id, &config.region);
        let store = Arc::new(Store::new(config.clone(), metrics.clone()));
        let loader = store.clone();
        // A cache dir or file other users could have written refuses the start.
        tokio::task::spawn_blocking(move || loader.load_cache()).await??;
        let gate = Gate::new(config.unknown_kid_cooldown);
        let cache = VerifyCache::new(config.cache_entries, metrics.cache.clone());
        Ok(Verifier {
            inner: Arc::new(Inner {
                config,
                store,
                upstream,
                gate,
                metrics,
                cache,
            }),
        })
    }

    /// True once the node holds a key set that is not older than `max_stale`.
    pub fn is_ready(&self) -> bool {
        self.inner.store.current().is_some() && !self.inner.store.is_stale()
    }

    /// The version of the held key set (0 before any, and for a JWKS URL).
    pub fn version(&self) -> u64 {
        self.inner.store.version()
    }

    /// Bounds the verified-token cache to `entries` answers (0 turns it off).
    pub fn set_cache_capacity(&self, entries: usize) {
        self.inner.cache.set_capacity(entries);
    }

    /// Answers held by the verified-token cache, and its bound.
    pub fn cache_usage(&self) -> (usize, usize) {
        (self.inner.cache.len(), self.inner.cache.capacity())
    }

    /// Answers served from the verified-token cache since this node started
    /// (`keyfleet_cache_hits_total`), for in-process measurements.
    pub fn cache_hits(&self) -> u64 {
        self.inner.metrics.cache.hits.get()
    }

    /// Verify calls the cache could not answer since this node started
    /// (`keyfleet_cache_misses_total`).
    pub fn cache_misses(&self) -> u64 {
        self.inner.metrics.cache.misses.get()
    }

    /// Serves gRPC on `grpc` and HTTP on `http` and keeps the key set fresh, until `shutdown`.
    pub async fn serve(
        self,
        grpc: TcpListener,
        http: TcpListener,
        shutdown: CancellationToken,
    ) -> anyhow::Result<()> {
        let background = shutdown.child_token();
        let mut tasks = self.spawn_refreshers(&background);
        // Room for a token of max_token_bytes (refused as TOO_LARGE, not as a transport error)
        // while a megabyte-sized request is refused before it is buffered.
        let max_request = self.inner.config.max_token_bytes.saturating_add(64 * 1024);
        let server = VerifierServer::new(self.clone()).max_decoding_message_size(max_request);
        let routes = Routes::new(server);
        let (routes, health) = with_health_and_reflection(routes, SERVICE).await?;
        let routes = keyfleet_runtime::rpc_trace::traced(routes, self.labels());
        let node = Arc::downgrade(&self.inner);
        keyfleet_runtime::metrics_bridge::export(&self.labels().attributes(), move || {
            node.upgrade()
                .map(|inner| Verifier { inner }.render_metrics())
        });
        // gRPC health follows readiness: NOT_SERVING until the first key set.
        let mut ready = self.inner.store.ready();
        if !*ready.borrow() {
            health
                .set_service_status(SERVICE, tonic_health::ServingStatus::NotServing)
                .await;
            let cancelled = background.clone();
            tasks.push(tokio::spawn(async move {
                tokio::select! {
                    _ = cancelled.cancelled() => {}
                    true = async { ready.wait_for(|r| *r).await.is_ok() } => {
                        health.set_service_status(SERVICE, tonic_health::ServingStatus::Serving).await;
                    }
                }
            }));
        }
        tracing::info!(
            node_id = %self.inner.config.node_id,
            region = %self.inner.config.region,
            grpc = ?grpc.local_addr().ok(),
            http = ?http.local_addr().ok(),
            "verifier serving"
        );
        let router = self.router();
        let transport = Transport {
            tls: self.inner.config.tls.clone(),
            limits: self.inner.config.limits.clone(),
            shed: self.inner.metrics.shed.clone(),
        };
        let served = tokio::try_join!(
            serve_grpc_with(grpc, routes, &transport, shutdown.clone()),
            serve_http_with(http, router, &transport, shutdown.clone()),
        );
        background.cancel();
        for task in tasks {
            let _ = task.await;
        }
        served.map(|_| ())
    }

    /// What every RPC span and exported metric of this node carries.
    fn labels(&self) -> ServerLabels {
        ServerLabels {
            role: "verifier",
            node_id: self.inner.config.node_id.clone(),
            region: self.inner.config.region.clone(),
        }
    }

    /// The Prometheus exposition, with the gauges computed at scrape time refreshed.
    fn render_metrics(&self) -> String {
        let metrics = &self.inner.metrics;
        metrics.jwks_age.set(self.inner.store.age().unwrap_or(-1));
        metrics.jwks_version.set(self.inner.store.version() as i64);
        metrics.encode()
    }

    /// `GET /metrics`, `GET /healthz`, `GET /readyz`.
    pub fn router(&self) -> axum::Router {
        axum::Router::new()
            .route("/metrics", get(metrics_handler))
            .route("/healthz", get(|| async { "ok" }))
            .route("/readyz", get(readyz_handler))
            .with_state(self.clone())
    }

    /// Answers one `Verify`: an invalid token is an `Ok` answer with `valid = false`; an
    /// error means the node cannot answer at all (no key set or no issuer yet).
    pub async fn verify_token(
        &self,
        token: &str,
        audience: &str,
    ) -> Result<VerifyResponse, Status> {
        let metrics = &self.inner.metrics;
        let _inflight = Inflight::enter(metrics);
        let start = Instant::now();
        let answer = self.decide(token, audience).await;
        metrics
            .verify_duration
            .observe(start.elapsed().as_secs_f64());
        if let Ok(response) = &answer {
            metrics.verified(from_proto(response.reason()));
            record_verdict(response);
        }
        answer
    }

    async fn decide(&self, token: &str, audience: &str) -> Result<VerifyResponse, Status> {
        let store = &self.inner.store;
        let held = usable(store)?;
        let policy = policy_of(&held)?;
        if store.is_stale() {
            let refusal = Refusal {
                reason: Reason::Unavailable,
                kid: None,
                detail: "the key set is older than --max-stale (the source is unreachable)"
                    .to_owned(),
            };
            return Ok(self.response(Err(refusal)));
        }
        let audience = (!audience.is_empty()).then_some(audience);
        let now = self.inner.config.clock.now();
        let cache_key = self.inner.cache.key(token, audience);
        if let Some(hit) = self.inner.cache.get(cache_key.as_ref(), &held, policy, now) {
            return Ok(hit);
        }
        let verdict = validate(token, &held.keys, now, policy, audience);
        let kid = match &verdict {
            Err(Refusal {
                reason: Reason::UnknownKid,
                kid: Some(kid),
                ..
            }) => kid.clone(),
            _ => {
                let response = self.response(verdict);
                self.inner.cache.insert(cache_key, &held, policy, &response);
                return Ok(response);
            }
        };
        self.inner.metrics.unknown_kid.inc();
        if held.keys.is_ambiguous(&kid) || !self.refresh_for_unknown_kid(&kid).await {
            return Ok(self.response(verdict));
        }
        // The refresh may have brought the kid (or a new issuer); check once more.
        let Some(held) = store.current() else {
            return Ok(self.response(verdict));
        };
        let Some(policy) = held.policy.as_ref() else {
            return Ok(self.response(verdict));
        };
        let verdict = validate(
            token,
            &held.keys,
            self.inner.config.clock.now(),
            policy,
            audience,
        );
        if matches!(
            &verdict,
            Err(Refusal {
                reason: Reason::UnknownKid,
                ..
            })
        ) {
            self.inner.gate.missing(&kid);
        }
        Ok(self.response(verdict))
    }

    /// Triggers or joins a coalesced, rate-limited refresh. True when one finished in time.
    async fn refresh_for_unknown_kid(&self, kid: &str) -> bool {
        let rx = match self.inner.gate.ticket(kid) {
            Ticket::Skip => return false,
            Ticket::Wait(rx) => rx,
            Ticket::Lead(lead, rx) => {
                // Its own task: a caller that gives up (or disconnects) never aborts the refresh.
                let node = self.clone();
                tokio::spawn(async move {
                    node.fetch_and_apply(Origin::UnknownKid).await;
                    lead.finish();
                });
                rx
            }
        };
        gate::wait(rx, UNKNOWN_KID_WAIT).await
    }

    fn response(&self, verdict: Result<Verified, Refusal>) -> VerifyResponse {
        let config = &self.inner.config;
        let mut response = match verdict {
            Ok(v) => VerifyResponse {
                valid: true,
                kid: v.kid,
                subject: v.subject,
                issuer: v.issuer,
                expires_at: v.expires_at,
                jti: v.jti,
                claims_json: serde_json::Value::Object(v.claims).to_string(),
                ..VerifyResponse::default()
            },
            Err(r) => VerifyResponse {
                valid: false,
                kid: r.kid.unwrap_or_default(),
                detail: r.detail,
                reason: to_proto(r.reason) as i32,
                ..VerifyResponse::default()
            },
        };
        if response.valid {
            response.set_reason(pb::Reason::Ok);
        }
        response.node_id = config.node_id.clone();
        response.region = config.region.clone();
        response
    }

    /// One pull from the source, applied. Logs and counts the outcome.
    async fn fetch_and_apply(&self, origin: Origin) -> bool {
        let metrics = &self.inner.metrics;
        let fetched = match self.inner.upstream.fetch().await {
            Ok(f) => f,
            Err(e) => {
                metrics.fetched(origin, false);
                // The error may carry a remote server's own message: escaped, it cannot forge a line.
                tracing::warn!(source = origin.as_str(), error = %escape_untrusted(&e.to_string()), cause = ?std::error::Error::source(&e), "key set fetch failed; keeping the last good set");
                return false;
            }
        };
        self.apply(fetched, origin).await
    }

    async fn apply(&self, fetched: Fetched, origin: Origin) -> bool {
        match self.inner.store.apply(fetched, origin) {
            Ok(applied) => {
                self.inner.metrics.fetched(origin, true);
                if applied != Applied::Ignored && self.inner.config.cache_dir.is_some() {
                    let store = self.inner.store.clone();
                    let _ = tokio::task::spawn_blocking(move || store.write_cache()).await;
                }
                true
            }
            Err(e) => {
                self.inner.metrics.fetched(origin, false);
                tracing::warn!(source = origin.as_str(), error = %e, "key set refused; keeping the last good set");
                false
            }
        }
    }

    fn spawn_refreshers(&self, shutdown: &CancellationToken) -> Vec<JoinHandle<()>> {
        match self.inner.config.source {
            Source::Authority { .. } => vec![
                tokio::spawn(self.clone().watch_loop(shutdown.clone())),
                tokio::spawn(self.clone().pull_loop(shutdown.clone())),
            ],
            Source::JwksUrl { .. } => vec![tokio::spawn(self.clone().http_loop(shutdown.clone()))],
        }
    }

    /// Keeps a `WatchJwks` stream open, reconnecting with jittered exponential backoff.
    async fn watch_loop(self, shutdown: CancellationToken) {
        let mut backoff = Backoff::new();
        loop {
            let outcome = tokio::select! {
                _ = shutdown.cancelled() => return,
                outcome = self.watch_once(&mut backoff) => outcome,
            };
            self.inner.store.watching.store(false, Ordering::Release);
            match outcome {
                Ok(()) => tracing::info!("the authority ended the jwks stream; reconnecting"),
                Err(status) => {
                    tracing::warn!(code = ?status.code(), message = %escape_untrusted(status.message()), "jwks stream failed; reconnecting")
                }
            }
            let delay = backoff.next();
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }

    /// One `WatchJwks` stream: the hello (node id, region, the version held), then an ack for
    /// every snapshot applied, and a heartbeat (the last ack again) every [`HEARTBEAT`] so the
    /// authority knows the stream is live: its node id cannot be taken over while it is, and a
    /// silent stream stops holding rotations back.
    async fn watch_once(&self, backoff: &mut Backoff) -> Result<(), Status> {
        let config = &self.inner.config;
        let Upstream::Authority(client) = &self.inner.upstream else {
            return Ok(());
        };
        let (acks, requests) = tokio::sync::mpsc::channel(16);
        let mut acked = self.inner.store.version();
        let hello = WatchJwksRequest {
            node_id: config.node_id.clone(),
            region: config.region.clone(),
            acked_version: acked,
        };
        let _ = acks.try_send(hello);
        let mut stream = client
            .clone()
            .watch_jwks(tokio_stream::wrappers::ReceiverStream::new(requests))
            .await?
            .into_inner();
        let mut heartbeat = tokio::time::interval_at(Instant::now() + HEARTBEAT, HEARTBEAT);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let snapshot = tokio::select! {
                message = stream.message() => match message? {
                    Some(snapshot) => snapshot,
                    None => return Ok(()),
                },
                _ = heartbeat.tick() => {
                    // A full queue already holds messages that tell the same.
                    let _ = acks.try_send(WatchJwksRequest {
                        acked_version: acked,
                        ..Default::default()
                    });
                    continue;
                }
            };
            backoff.reset();
            self.inner.store.watching.store(true, Ordering::Release);
            let version = snapshot.version;
            if self.apply(snapshot.into(), Origin::Push).await {
                acked = version;
                // A full queue only drops an ack that a later one supersedes.
                let _ = acks.try_send(WatchJwksRequest {
                    acked_version: version,
                    ..Default::default()
                });
            }
        }
    }

    /// The fallback pull every `refresh_interval`.
    async fn pull_loop(self, shutdown: CancellationToken) {
        let period = self.inner.config.refresh_interval;
        let mut ticks = tokio::time::interval_at(Instant::now() + period, period);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = ticks.tick() => {}
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = self.fetch_and_apply(Origin::Pull) => {}
            }
        }
    }

    /// Polls a JWKS URL: at once, then every `refresh_interval`; sooner after a failure.
    async fn http_loop(self, shutdown: CancellationToken) {
        let period = self.inner.config.refresh_interval;
        let mut backoff = Backoff::new();
        loop {
            let ok = tokio::select! {
                _ = shutdown.cancelled() => return,
                ok = self.fetch_and_apply(Origin::Http) => ok,
            };
            let delay = if ok {
                backoff.reset();
                period
            } else {
                backoff.next().min(period)
            };
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }
}

#[tonic::async_trait]
impl verifier_server::Verifier for Verifier {
    async fn verify(
        &self,
        request: Request<VerifyRequest>,
    ) -> Result<Response<VerifyResponse>, Status> {
        let request = request.into_inner();
        self.verify_token(&request.token, &request.audience)
            .await
            .map(Response::new)
    }

    async fn verify_batch(
        &self,
        request: Request<pb::VerifyBatchRequest>,
    ) -> Result<Response<pb::VerifyBatchResponse>, Status> {
        let request = request.into_inner();
        self.verify_batch(&request.requests)
            .await
            .map(|responses| Response::new(pb::VerifyBatchResponse { responses }))
    }
}

async fn metrics_handler(State(node): State<Verifier>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        node.render_metrics(),
    )
}

/// Puts the verdict on the RPC span: the reason, and the kid only when it names a key the
/// node holds or revoked (a kid that matched nothing is attacker-chosen and unbounded).
/// The key set in use, or why the node cannot answer at all (a gRPC error, not a verdict).
fn usable(store: &Store) -> Result<Arc<Held>, Status> {
    store.current().ok_or_else(|| {
        Status::unavailable("no key set yet: waiting for the first jwks from the source")
    })
}

/// The policy of `held`, or UNAVAILABLE while no issuer is known.
fn policy_of(held: &Held) -> Result<&keyfleet_core::Policy, Status> {
    held.policy.as_ref().ok_or_else(|| {
        Status::unavailable("no issuer known yet: the source named none and --issuer is not set")
    })
}

fn record_verdict(response: &VerifyResponse) {
    let span = tracing::Span::current();
    if span.is_disabled() {
        return;
    }
    let reason = response.reason();
    span.record("reason", reason.as_str_name());
    let matched_a_key = !matches!(
        reason,
        pb::Reason::Unspecified
            | pb::Reason::Malformed
            | pb::Reason::UnsupportedAlgorithm
            | pb::Reason::UnknownKid
            | pb::Reason::TooLarge
            | pb::Reason::Unavailable
    );
    if matched_a_key && response.kid.len() <= 128 {
        span.record("kid", response.kid.as_str());
    }
}

async fn readyz_handler(State(node): State<Verifier>) -> (StatusCode, &'static str) {
    if node.inner.store.current().is_none() {
        (StatusCode::SERVICE_UNAVAILABLE, "no key set yet\n")
    } else if node.inner.store.is_stale() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "key set older than --max-stale\n",
        )
    } else {
        (StatusCode::OK, "ready\n")
    }
}

/// Counts a `Verify` in progress, even one whose caller goes away mid-way.
struct Inflight<'a>(&'a Metrics);

impl<'a> Inflight<'a> {
    fn enter(metrics: &'a Metrics) -> Inflight<'a> {
        metrics.inflight.inc();
        Inflight(metrics)
    }
}

impl Drop for Inflight<'_> {
    fn drop(&mut self) {
        self.0.inflight.dec();
    }
}

fn to_proto(reason: Reason) -> pb::Reason {
    match reason {
        Reason::Ok => pb::Reason::Ok,
        Reason::Malformed => pb::Reason::Malformed,
        Reason::UnsupportedAlgorithm => pb::Reason::UnsupportedAlgorithm,
        Reason::UnknownKid => pb::Reason::UnknownKid,
        Reason::BadSignature => pb::Reason::BadSignature,
        Reason::Expired => pb::Reason::Expired,
        Reason::NotYetValid => pb::Reason::NotYetValid,
        Reason::WrongIssuer => pb::Reason::WrongIssuer,
        Reason::WrongAudience => pb::Reason::WrongAudience,
        Reason::KeyRevoked => pb::Reason::KeyRevoked,
        Reason::TokenRevoked => pb::Reason::TokenRevoked,
        Reason::TooLarge => pb::Reason::TooLarge,
        Reason::Unavailable => pb::Reason::Unavailable,
    }
}

fn from_proto(reason: pb::Reason) -> Reason {
    Reason::ALL
        .into_iter()
        .find(|r| to_proto(*r) == reason)
        .unwrap_or(Reason::Unavailable)
}

/// Jittered exponential backoff: 100 ms doubling to 10 s, each delay drawn from [d/2, d].
struct Backoff {
    next: Duration,
    random: RandomState,
    draws: u64,
}

impl Backoff {
    fn new() -> Backoff {
        Backoff {
            next: BACKOFF_START,
            random: RandomState::new(),
            draws: 0,
        }
    }

    fn reset(&mut self) {
        self.next = BACKOFF_START;
    }

    fn next(&mut self) -> Duration {
        let d = self.next;
        self.next = (d * 2).min(BACKOFF_CAP);
        self.draws += 1;
        let half = d / 2;
        let fraction = (self.random.hash_one(self.draws) % 1024) as u32;
        half + half * fraction / 1024
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_jittered_and_caps() {
        let mut b = Backoff::new();
        let first = b.next();
        assert!(first >= BACKOFF_START / 2 && first <= BACKOFF_START);
        let delays: Vec<_> = (0..20).map(|_| b.next()).collect();
        assert!(delays.iter().all(|d| *d <= BACKOFF_CAP));
        assert!(*delays.last().unwrap() >= BACKOFF_CAP / 2);
        b.reset();
        assert!(b.next() <= BACKOFF_START);
    }

    #[test]
    fn every_reason_maps_both_ways() {
        for reason in Reason::ALL {
            assert_eq!(from_proto(to_proto(reason)), reason);
        }
    }
}
