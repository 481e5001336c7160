//! [`VerifierPool`]: `Verify` over many verifier nodes, one gRPC channel each. A request goes
//! to the less busy of two random healthy nodes (power of two choices on in-flight calls); if
//! no answer has come after the pool's recent p95 latency (clamped to a floor and a ceiling),
//! the same request goes to another node and the first answer wins (the other call is
//! cancelled); a node that fails several times in a row is ejected and probed back with
//! backoff; every call has an overall deadline.
//!
//! Why not `tower::balance::p2c` and `tower::hedge`: the balancer picks among *ready*
//! services, and a tonic channel to a stopped (SIGSTOP) or partitioned node stays ready, so it
//! would keep choosing it; it has no ejection after consecutive failures and no way to say
//! "any node but this one", which both a hedge and a retry after `UNAVAILABLE` need.
//! `tower::hedge` sends its second request through the same inner service (so through the
//! same balancer, possibly to the same node), has no floor or ceiling on its delay and no
//! share-of-traffic budget, and knows nothing of `Reason::UNAVAILABLE` answers, which must be
//! retried rather than returned. The race below is the one loop that does all of it.

mod budget;
mod discovery;
mod latency;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use futures_util::StreamExt as _;
use futures_util::stream::FuturesUnordered;
use keyfleet_proto::v1::verifier_client::VerifierClient;
use keyfleet_proto::v1::{Reason as PbReason, VerifyRequest, VerifyResponse};
use keyfleet_runtime::client::{Keepalive, Settings};
use keyfleet_runtime::tls::ClientTls;
use rand::Rng as _;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::Code;
use tonic::transport::Channel;

pub use discovery::{Endpoints, Resolve, SystemResolver};

use crate::verdict::{BoxFuture, Demands, TokenVerifier, VerifiedClaims, VerifyError};
use budget::Budget;
use latency::Latency;

/// A node that lost a hedge race is blamed only when it has answered nothing for this long
/// (20 ms): a stopped node soon is, a busy one on a loaded host rarely.
const SILENT_FOR_MICROS: u64 = 20_000;

/// The token a probe sends: refused at once (MALFORMED) by a node that can decide.
const PROBE_TOKEN: &str = "keyfleet-client-probe";

/// How a [`VerifierPool`] behaves. [`PoolConfig::default`] holds the defaults each field
/// names.
#[derive(Debug, Clone)]
pub struct PoolConfig {
    /// The longest one [`VerifierPool::verify_request`] may take, hedges and retries included
    /// (default 3 s). Then [`PoolError::Deadline`].
    pub deadline: Duration,
    /// One attempt on one node not answered within this counts as that node's failure, and
    /// the request goes to another node (default 500 ms).
    pub attempt_timeout: Duration,
    /// Send a hedge (default true).
    pub hedging: bool,
    /// The hedge delay is the recent p95 answer latency, at least this (default 2 ms)…
    pub hedge_floor: Duration,
    /// …and at most this (default 50 ms; also the delay until the pool has seen enough
    /// answers for a p95).
    pub hedge_ceiling: Duration,
    /// Hedges may be at most this share of requests (default 0.1)…
    pub hedge_ratio: f64,
    /// …plus this many saved up (default 10).
    pub hedge_burst: u32,
    /// The p95 covers the last one to two windows of this length (default 5 s).
    pub latency_window: Duration,
    /// Consecutive failures (transport errors, `UNAVAILABLE`, `Reason::UNAVAILABLE` answers,
    /// attempt timeouts, hedge races lost by a node that answered nothing meanwhile) that
    /// eject a node (default 3).
    pub eject_after: u32,
    /// First delay before an ejected node is probed (default 250 ms), doubling…
    pub probe_backoff: Duration,
    /// …up to this (default 5 s).
    pub probe_backoff_max: Duration,
    /// A probe not answered within this failed (default 1 s).
    pub probe_timeout: Duration,
    /// TLS for `https://` nodes.
    pub tls: ClientTls,
    /// Connection settings of each node's channel (no per-call timeout: the pool has its own).
    pub connection: Settings,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            deadline: Duration::from_secs(3),
            attempt_timeout: Duration::from_millis(500),
            hedging: true,
            hedge_floor: Duration::from_millis(2),
            hedge_ceiling: Duration::from_millis(50),
            hedge_ratio: 0.1,
            hedge_burst: 10,
            latency_window: Duration::from_secs(5),
            eject_after: 3,
            probe_backoff: Duration::from_millis(250),
            probe_backoff_max: Duration::from_secs(5),
            probe_timeout: Duration::from_secs(1),
            tls: ClientTls::default(),
            connection: Settings {
                connect_timeout: Duration::from_secs(1),
                request_timeout: None,
                // A node gone without a reset is found within ~2 s even when idle.
                keepalive: Some(Keepalive {
                    interval: Duration::from_secs(1),
                    timeout: Duration::from_secs(1),
                    while_idle: true,
                }),
            },
        }
    }
}

/// Why [`VerifierPool::verify_request`] has no answer.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error(
        "the pool has no verifier nodes (an empty list, or the DNS name resolved to no address yet)"
    )]
    NoNodes,
    #[error(
        "no verifier answered within the call's deadline of {deadline:?} ({attempts} attempts); are the nodes up and reachable?"
    )]
    Deadline { deadline: Duration, attempts: usize },
    #[error("every verifier tried ({tried}) failed; the last one: {last}")]
    Exhausted { tried: usize, last: String },
    /// A node refused the request itself (e.g. `INVALID_ARGUMENT`): another would too.
    #[error("the verifier refused the request")]
    Refused(#[source] tonic::Status),
}

/// Why [`PoolBuilder::build`] failed.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Endpoint(#[from] keyfleet_runtime::client::EndpointError),
    #[error("cannot resolve {host}:{port} (the pool's DNS name); check the name and the resolver")]
    Resolve {
        host: String,
        port: u16,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot set up TLS for {host} (the pool's DNS name)")]
    Tls {
        host: String,
        #[source]
        source: tonic::transport::Error,
    },
}

/// What the pool has done since it was built, for tests and reports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Calls of [`VerifierPool::verify_request`].
    pub requests: u64,
    /// Calls that got an answer (a verdict).
    pub answers: u64,
    /// Hedges sent.
    pub hedges: u64,
    /// Answers a hedge gave first.
    pub hedge_wins: u64,
    /// Attempts sent to another node after one failed.
    pub retries: u64,
    /// Attempts that failed (see [`PoolConfig::eject_after`]).
    pub failures: u64,
    /// Nodes ejected.
    pub ejections: u64,
    /// Ejected nodes taken back after a good probe.
    pub readmissions: u64,
    /// Probes sent to ejected nodes.
    pub probes: u64,
}

/// One node's share, for tests and reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeStats {
    /// Its URL.
    pub url: String,
    /// Answers it gave that won.
    pub answers: u64,
    pub inflight: usize,
    pub ejected: bool,
}

#[derive(Default)]
struct Counters {
    requests: AtomicU64,
    answers: AtomicU64,
    hedges: AtomicU64,
    hedge_wins: AtomicU64,
    retries: AtomicU64,
    failures: AtomicU64,
    ejections: AtomicU64,
    readmissions: AtomicU64,
    probes: AtomicU64,
}

fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// One verifier node of the pool.
struct Node {
    url: String,
    client: VerifierClient<Channel>,
    inflight: AtomicUsize,
    /// Consecutive failures.
    failures: AtomicU32,
    ejected: AtomicBool,
    /// Gone from the DNS answer: draining, never picked again.
    removed: AtomicBool,
    answers: AtomicU64,
    /// When it last answered, in µs since the pool's `epoch` (0: never).
    last_answer: AtomicU64,
}

impl Node {
    fn new(url: String, channel: Channel) -> Arc<Node> {
        Arc::new(Node {
            url,
            client: VerifierClient::new(channel),
            inflight: AtomicUsize::new(0),
            failures: AtomicU32::new(0),
            ejected: AtomicBool::new(false),
            removed: AtomicBool::new(false),
            answers: AtomicU64::new(0),
            last_answer: AtomicU64::new(0),
        })
    }
}

/// Counts a call in flight on a node until dropped (answered, failed or cancelled).
struct InFlight(Arc<Node>);

impl InFlight {
    fn enter(node: &Arc<Node>) -> InFlight {
        node.inflight.fetch_add(1, Ordering::Relaxed);
        InFlight(node.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.inflight.fetch_sub(1, Ordering::Relaxed);
    }
}

struct Inner {
    nodes: ArcSwap<Vec<Arc<Node>>>,
    config: PoolConfig,
    latency: Latency,
    budget: Budget,
    counters: Counters,
    /// Cancelled when the last handle goes: stops re-resolution and probes.
    stop: CancellationToken,
    /// The origin of `Node::last_answer`.
    epoch: Instant,
}

impl Inner {
    fn micros(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.epoch).as_micros()).unwrap_or(u64::MAX)
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// `Verify` over many verifier nodes with balancing, ejection and hedging. Cheap to clone;
/// every clone is the same pool. Background tasks (DNS re-resolution, probes) stop when the
/// last clone is dropped.
///
/// ```no_run
/// # async fn example() -> Result<(), Box<dyn std::error::Error>> {
/// use keyfleet_client::{Demands, VerifierPool};
///
/// let pool = VerifierPool::builder()
///     .urls(["http://10.0.0.1:7000", "http://10.0.0.2:7000", "http://10.0.0.3:7000"])
///     .build()
///     .await?;
/// // The raw answer (which node, the reason of a refusal, …):
/// let answer = pool.verify_request(Demands::none().request("eyJ…")).await?;
/// println!("valid: {} (node {})", answer.valid, answer.node_id);
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct VerifierPool {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for VerifierPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerifierPool")
            .field("nodes", &self.inner.nodes.load().len())
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

/// Builds a [`VerifierPool`]: its nodes ([`PoolBuilder::urls`] or [`PoolBuilder::dns`]) and
/// its [`PoolConfig`].
#[derive(Debug)]
pub struct PoolBuilder {
    endpoints: Endpoints,
    config: PoolConfig,
}

impl PoolBuilder {
    /// These nodes (gRPC URLs: `http://host:port`, or `https://` for TLS).
    pub fn urls<I: IntoIterator<Item = S>, S: Into<String>>(mut self, urls: I) -> PoolBuilder {
        self.endpoints = Endpoints::Static(urls.into_iter().map(Into::into).collect());
        self
    }

    /// Every address `host` resolves to (system resolver), at `port`, re-resolved every
    /// `every`: new addresses join, addresses gone are drained.
    pub fn dns(mut self, host: impl Into<String>, port: u16, every: Duration) -> PoolBuilder {
        self.endpoints = Endpoints::Dns {
            host: host.into(),
            port,
            tls: false,
            every,
            resolver: Arc::new(SystemResolver),
        };
        self
    }

    /// Where the nodes come from (for a resolver of your own: [`Endpoints::Dns`]).
    pub fn endpoints(mut self, endpoints: Endpoints) -> PoolBuilder {
        self.endpoints = endpoints;
        self
    }

    /// Every setting at once.
    pub fn config(mut self, config: PoolConfig) -> PoolBuilder {
        self.config = config;
        self
    }

    /// Hedging on (the default) or off.
    pub fn hedging(mut self, on: bool) -> PoolBuilder {
        self.config.hedging = on;
        self
    }

    /// See [`PoolConfig::deadline`].
    pub fn deadline(mut self, deadline: Duration) -> PoolBuilder {
        self.config.deadline = deadline;
        self
    }

    /// TLS for `https://` nodes (the CA to trust, a client certificate).
    pub fn tls(mut self, tls: ClientTls) -> PoolBuilder {
        self.config.tls = tls;
        self
    }

    /// The pool. Channels connect on first use; a DNS name is resolved once now (an error
    /// here is returned) and then every `every` in a background task. Must run inside a Tokio
    /// runtime.
    pub async fn build(self) -> Result<VerifierPool, BuildError> {
        let config = self.config;
        let inner = Arc::new(Inner {
            nodes: ArcSwap::from_pointee(Vec::new()),
            latency: Latency::new(config.latency_window),
            budget: Budget::new(config.hedge_ratio, config.hedge_burst),
            counters: Counters::default(),
            stop: CancellationToken::new(),
            epoch: Instant::now(),
            config,
        });
        match self.endpoints {
            Endpoints::Static(urls) => {
                let mut nodes = Vec::with_capacity(urls.len());
                for url in urls {
                    let channel = keyfleet_runtime::client::endpoint(
                        &url,
                        &inner.config.tls,
                        &inner.config.connection,
                    )?
                    .connect_lazy();
                    nodes.push(Node::new(url, channel));
                }
                inner.nodes.store(Arc::new(nodes));
            }
            Endpoints::Dns {
                host,
                port,
                tls,
                every,
                resolver,
            } => {
                let addrs =
                    resolver
                        .resolve(&host, port)
                        .await
                        .map_err(|source| BuildError::Resolve {
                            host: host.clone(),
                            port,
                            source,
                        })?;
                let dns = Dns {
                    host,
                    tls,
                    resolver,
                    port,
                };
                dns.update(&inner, &addrs)?;
                tokio::spawn(dns.follow(Arc::downgrade(&inner), every, inner.stop.clone()));
            }
        }
        Ok(VerifierPool { inner })
    }
}

/// A DNS name the pool follows.
struct Dns {
    host: String,
    port: u16,
    tls: bool,
    resolver: Arc<dyn Resolve>,
}

impl Dns {
    /// Re-resolves every `every` until the pool is gone.
    async fn follow(self, pool: std::sync::Weak<Inner>, every: Duration, stop: CancellationToken) {
        let mut ticks = tokio::time::interval_at(Instant::now() + every, every);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = ticks.tick() => {}
            }
            let resolved = self.resolver.resolve(&self.host, self.port).await;
            let Some(inner) = pool.upgrade() else { return };
            match resolved {
                Ok(addrs) => {
                    if let Err(e) = self.update(&inner, &addrs) {
                        tracing::warn!(host = %self.host, error = %keyfleet_runtime::error_chain(&e), "cannot add the resolved verifier nodes");
                    }
                }
                Err(e) => {
                    tracing::warn!(host = %self.host, error = %e, "re-resolving the verifier pool's name failed; keeping its nodes")
                }
            }
        }
    }

    /// Adds the new addresses of `addrs`, drains the nodes no longer in it.
    fn update(&self, inner: &Inner, addrs: &[std::net::SocketAddr]) -> Result<(), BuildError> {
        let current = inner.nodes.load_full();
        let urls: Vec<String> = addrs
            .iter()
            .map(|a| discovery::url_of(*a, self.tls))
            .collect();
        let mut next = Vec::with_capacity(urls.len());
        for node in current.iter() {
            if urls.contains(&node.url) {
                next.push(node.clone());
            } else {
                node.removed.store(true, Ordering::Release);
                tracing::info!(node = %node.url, host = %self.host, "verifier node gone from DNS; draining it");
            }
        }
        for url in urls {
            if next.iter().any(|n| n.url == url) {
                continue;
            }
            let mut endpoint = keyfleet_runtime::client::endpoint(
                &url,
                &inner.config.tls,
                &inner.config.connection,
            )?;
            if self.tls {
                // The certificate names the host, not the address.
                endpoint = endpoint
                    .tls_config(
                        inner
                            .config
                            .tls
                            .tonic_config()
                            .domain_name(self.host.clone()),
                    )
                    .map_err(|source| BuildError::Tls {
                        host: self.host.clone(),
                        source,
                    })?;
            }
            tracing::info!(node = %url, host = %self.host, "verifier node joined the pool");
            next.push(Node::new(url, endpoint.connect_lazy()));
        }
        if next.len() != current.len()
            || next
                .iter()
                .zip(current.iter())
                .any(|(a, b)| !Arc::ptr_eq(a, b))
        {
            inner.nodes.store(Arc::new(next));
        }
        Ok(())
    }
}

/// Why one attempt did not give an answer.
enum Failure {
    /// Not the node's fault (shedding): retried elsewhere, not counted toward ejection.
    Busy(String),
    /// Counted toward ejection.
    Node(String),
    /// The request itself was refused: returned as it is.
    Request(tonic::Status),
}

/// A first attempt, a retry after a failure, or a hedge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    First,
    Retry,
    Hedge,
}

impl VerifierPool {
    /// A builder with [`PoolConfig::default`] and no nodes yet.
    pub fn builder() -> PoolBuilder {
        PoolBuilder {
            endpoints: Endpoints::Static(Vec::new()),
            config: PoolConfig::default(),
        }
    }

    /// What the pool has done since it was built.
    pub fn stats(&self) -> PoolStats {
        let c = &self.inner.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        PoolStats {
            requests: get(&c.requests),
            answers: get(&c.answers),
            hedges: get(&c.hedges),
            hedge_wins: get(&c.hedge_wins),
            retries: get(&c.retries),
            failures: get(&c.failures),
            ejections: get(&c.ejections),
            readmissions: get(&c.readmissions),
            probes: get(&c.probes),
        }
    }

    /// Each node now in the pool.
    pub fn nodes(&self) -> Vec<NodeStats> {
        self.inner
            .nodes
            .load()
            .iter()
            .map(|n| NodeStats {
                url: n.url.clone(),
                answers: n.answers.load(Ordering::Relaxed),
                inflight: n.inflight.load(Ordering::Relaxed),
                ejected: n.ejected.load(Ordering::Relaxed),
            })
            .collect()
    }

    /// The delay after which a request is hedged now: the recent p95, clamped.
    pub fn hedge_delay(&self) -> Duration {
        let c = &self.inner.config;
        self.inner.latency.p95().map_or(c.hedge_ceiling, |p95| {
            p95.clamp(c.hedge_floor, c.hedge_ceiling)
        })
    }

    /// One `Verify`, answered by some node: a verdict (valid or not) is an answer; a node that
    /// fails or cannot decide (`Reason::UNAVAILABLE`) is passed over for another.
    pub async fn verify_request(
        &self,
        request: VerifyRequest,
    ) -> Result<VerifyResponse, PoolError> {
        let inner = &self.inner;
        inc(&inner.counters.requests);
        inner.budget.deposit();
        let mut attempts = 0;
        let deadline = inner.config.deadline;
        match tokio::time::timeout(deadline, self.race(request, &mut attempts)).await {
            Ok(answer) => answer,
            Err(_) => Err(PoolError::Deadline { deadline, attempts }),
        }
    }

    async fn race(
        &self,
        request: VerifyRequest,
        attempts_made: &mut usize,
    ) -> Result<VerifyResponse, PoolError> {
        let inner = &*self.inner;
        let nodes = inner.nodes.load_full();
        // Indexes into `nodes` already asked.
        let mut tried: Vec<usize> = Vec::with_capacity(2);
        let first = pick(&nodes, &tried).ok_or(PoolError::NoNodes)?;
        let mut running = FuturesUnordered::new();
        // (attempt id, node index, start) of every attempt still running.
        let mut pending: Vec<(usize, usize, Instant, Kind)> = Vec::with_capacity(2);
        macro_rules! launch {
            ($i:expr, $kind:expr) => {{
                let i = $i;
                tried.push(i);
                let id = *attempts_made;
                *attempts_made += 1;
                pending.push((id, i, Instant::now(), $kind));
                running.push(attempt(
                    id,
                    nodes[i].clone(),
                    request.clone(),
                    inner.config.attempt_timeout,
                ));
            }};
        }
        launch!(first, Kind::First);
        let hedge = tokio::time::sleep(self.hedge_delay());
        tokio::pin!(hedge);
        let mut hedge_armed = inner.config.hedging && nodes.len() > 1;
        let mut last = String::new();
        loop {
            tokio::select! {
                Some((id, outcome)) = running.next() => {
                    let at = pending.iter().position(|p| p.0 == id).unwrap_or(0);
                    let (_, i, started, kind) = pending.swap_remove(at);
                    let node = &nodes[i];
                    match outcome {
                        Ok(answer) => {
                            node.failures.store(0, Ordering::Relaxed);
                            node.last_answer.store(inner.micros(Instant::now()), Ordering::Relaxed);
                            inc(&node.answers);
                            inc(&inner.counters.answers);
                            inner.latency.record(started.elapsed());
                            if kind == Kind::Hedge {
                                inc(&inner.counters.hedge_wins);
                            }
                            // An attempt that had a head start and still lost, on a node that
                            // has answered nothing at all since it began: stopped or cut off (it
                            // sends no error to count). A node merely slow on this one request
                            // answered others meanwhile and is not blamed.
                            let now = inner.micros(Instant::now());
                            for (_, j, other_started, _) in &pending {
                                let last = nodes[*j].last_answer.load(Ordering::Relaxed);
                                let silent = last < inner.micros(*other_started)
                                    && now.saturating_sub(last) >= SILENT_FOR_MICROS;
                                if *other_started < started && silent {
                                    self.failed(&nodes[*j], "lost a hedge race, silent since it was sent");
                                }
                            }
                            return Ok(answer);
                        }
                        Err(Failure::Request(status)) => return Err(PoolError::Refused(status)),
                        Err(Failure::Busy(why)) => last = why,
                        Err(Failure::Node(why)) => {
                            self.failed(node, &why);
                            last = why;
                        }
                    }
                    if let Some(next) = pick(&nodes, &tried) {
                        inc(&inner.counters.retries);
                        launch!(next, Kind::Retry);
                    } else if running.is_empty() {
                        return Err(PoolError::Exhausted { tried: tried.len(), last });
                    }
                }
                () = &mut hedge, if hedge_armed => {
                    hedge_armed = false;
                    if let Some(next) = pick(&nodes, &tried)
                        && inner.budget.withdraw()
                    {
                        inc(&inner.counters.hedges);
                        launch!(next, Kind::Hedge);
                    }
                }
                else => return Err(PoolError::Exhausted { tried: tried.len(), last }),
            }
        }
    }

    /// Counts a failure of `node`; ejects it after [`PoolConfig::eject_after`] in a row.
    fn failed(&self, node: &Arc<Node>, why: &str) {
        let inner = &self.inner;
        inc(&inner.counters.failures);
        let n = node.failures.fetch_add(1, Ordering::AcqRel) + 1;
        if n < inner.config.eject_after || node.ejected.swap(true, Ordering::AcqRel) {
            return;
        }
        inc(&inner.counters.ejections);
        tracing::warn!(node = %node.url, failures = n, last = %keyfleet_core::escape_untrusted(why), "verifier node ejected from the pool; probing it back");
        tokio::spawn(probe_loop(
            Arc::downgrade(&self.inner),
            node.clone(),
            self.inner.stop.clone(),
        ));
    }
}

/// Probes an ejected `node` with backoff until it answers (then takes it back), is removed,
/// or the pool is gone.
async fn probe_loop(pool: std::sync::Weak<Inner>, node: Arc<Node>, stop: CancellationToken) {
    let (mut backoff, max, timeout) = match pool.upgrade() {
        Some(p) => (
            p.config.probe_backoff,
            p.config.probe_backoff_max,
            p.config.probe_timeout,
        ),
        None => return,
    };
    loop {
        // Jittered within [d/2, d], so a fleet of clients does not probe in step.
        let delay = backoff / 2 + backoff.mul_f64(rand::rng().random_range(0.0..0.5));
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
        if node.removed.load(Ordering::Acquire) {
            return;
        }
        if let Some(p) = pool.upgrade() {
            inc(&p.counters.probes);
        }
        let probe = Demands::none().request(PROBE_TOKEN);
        let ok = matches!(attempt(0, node.clone(), probe, timeout).await, (_, Ok(_)));
        let Some(p) = pool.upgrade() else { return };
        if ok {
            node.failures.store(0, Ordering::Release);
            node.ejected.store(false, Ordering::Release);
            inc(&p.counters.readmissions);
            tracing::info!(node = %node.url, "verifier node answers again; back in the pool");
            return;
        }
        backoff = (backoff * 2).min(max);
    }
}

/// One `Verify` on `node`, within `timeout`: an answer, or why not.
async fn attempt(
    id: usize,
    node: Arc<Node>,
    request: VerifyRequest,
    timeout: Duration,
) -> (usize, Result<VerifyResponse, Failure>) {
    let _inflight = InFlight::enter(&node);
    let mut client = node.client.clone();
    let outcome = match tokio::time::timeout(timeout, client.verify(request)).await {
        Err(_) => Err(Failure::Node(format!("no answer within {timeout:?}"))),
        Ok(Ok(answer)) => {
            let answer = answer.into_inner();
            if answer.reason() == PbReason::Unavailable {
                Err(Failure::Node(format!(
                    "the node cannot decide: {}",
                    answer.detail
                )))
            } else {
                Ok(answer)
            }
        }
        Ok(Err(status)) => Err(match status.code() {
            Code::ResourceExhausted => Failure::Busy(status.message().to_owned()),
            Code::Unavailable
            | Code::Unknown
            | Code::Cancelled
            | Code::DeadlineExceeded
            | Code::Aborted
            | Code::Internal
            | Code::Unimplemented => {
                Failure::Node(format!("{:?}: {}", status.code(), status.message()))
            }
            _ => Failure::Request(status),
        }),
    };
    (id, outcome)
}

/// Power of two choices: of two random nodes that are neither tried, ejected nor draining,
/// the one with fewer calls in flight. With every such node ejected, any untried node (a
/// pool never refuses to try while a node is left).
fn pick(nodes: &[Arc<Node>], tried: &[usize]) -> Option<usize> {
    let usable = |i: usize, n: &Node| !tried.contains(&i) && !n.removed.load(Ordering::Relaxed);
    let healthy = |i: usize, n: &Node| usable(i, n) && !n.ejected.load(Ordering::Relaxed);
    p2c(nodes, &healthy).or_else(|| p2c(nodes, &usable))
}

/// Of two random nodes passing `eligible`, the one with fewer calls in flight.
fn p2c(nodes: &[Arc<Node>], eligible: &dyn Fn(usize, &Node) -> bool) -> Option<usize> {
    let nth = |k: usize| {
        nodes
            .iter()
            .enumerate()
            .filter(|(i, n)| eligible(*i, n))
            .nth(k)
            .map(|(i, _)| i)
    };
    match nodes
        .iter()
        .enumerate()
        .filter(|(i, n)| eligible(*i, n))
        .count()
    {
        0 => None,
        1 => nth(0),
        count => {
            let mut rng = rand::rng();
            let a = rng.random_range(0..count);
            let mut b = rng.random_range(0..count - 1);
            if b >= a {
                b += 1;
            }
            let (a, b) = (nth(a)?, nth(b)?);
            let load = |i: usize| nodes[i].inflight.load(Ordering::Relaxed);
            Some(if load(b) < load(a) { b } else { a })
        }
    }
}

impl TokenVerifier for VerifierPool {
    fn verify<'a>(
        &'a self,
        token: &'a str,
        demands: &'a Demands,
    ) -> BoxFuture<'a, Result<VerifiedClaims, VerifyError>> {
        Box::pin(async move {
            match VerifierPool::verify_request(self, demands.request(token)).await {
                Ok(answer) => crate::verdict::from_response(answer),
                // A request no node will read (e.g. a token far past the size limit).
                Err(PoolError::Refused(status)) => Err(VerifyError::Refused {
                    reason: keyfleet_core::Reason::Malformed,
                    detail: format!("the verifier refused the request: {}", status.message()),
                }),
                Err(e) => Err(VerifyError::Unavailable(e.to_string())),
            }
        })
    }
}
