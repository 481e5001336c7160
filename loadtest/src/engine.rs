//! The load generator: open-loop (`rate`, latency from the intended send time, so coordinated
//! omission cannot hide a stall) or closed-loop (`concurrency`) `Verify` traffic spread over
//! every node, with tokens of known verdicts minted before and during the run, key rotations,
//! node kills, retries on another node, and the server-cost measurements of the report.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::{IsTerminal as _, Write as _};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use anyhow::{Context as _, anyhow};
use ed25519_dalek::SigningKey;
use hdrhistogram::Histogram;
use keyfleet_core::{TokenClaims, escape_untrusted, sign_token};
use keyfleet_proto::v1::authority_client::AuthorityClient;
use keyfleet_proto::v1::verifier_client::VerifierClient;
use keyfleet_proto::v1::{
    IssueTokenRequest, IssueTokenResponse, KeyState, ListKeysRequest, Reason, RotateKeysRequest,
    VerifyBatchRequest, VerifyRequest, VerifyResponse,
};
use rand::Rng as _;
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

use crate::cluster::{ClusterOptions, LocalCluster};
use crate::cpu;
use crate::report::{Efficiency, Event, Latency, Memory, Report, Second};

/// The verifier runtime's thread name, how their CPU time is found in `/proc`.
const SERVER_THREADS: &str = "kf-verifier";
/// A request is tried on at most this many nodes (counting the first).
const MAX_ATTEMPTS: usize = 4;
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(2);
/// Open-loop requests in flight at most; beyond it sends wait (and their latency shows it).
const MAX_IN_FLIGHT: usize = 4096;
/// A legitimate token counts in `tokens_on_multiple_nodes_ratio` once verified this often: with
/// non-sticky routing over N nodes, the chance it met only one node is N·(1/N)^10.
pub const SPREAD_MIN_CHECKS: u64 = 10;
/// Tokens per `VerifyBatch` in the batch measurement.
const BATCH: usize = 64;

/// Which cluster to load.
#[derive(Debug, Clone)]
pub enum Target {
    /// Start an authority and this many verifiers in this process (regions `a`, `b`).
    Local { verifiers: usize },
    /// Existing servers: the authority mints (with the admin token), the verifiers answer.
    Remote {
        authority: String,
        verifiers: Vec<String>,
        admin_token: String,
    },
}

/// Open loop or closed loop.
#[derive(Debug, Clone, Copy)]
pub enum Load {
    /// Constant arrival rate, requests per second.
    Rate(u64),
    /// This many requests always in flight.
    Concurrency(usize),
}

/// How each request picks its node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pick {
    Random,
    RoundRobin,
}

/// Which tokens that must be refused are mixed in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Invalid {
    /// All of the kinds below.
    Any,
    /// Signed by a key the authority never had, under a real kid (BAD_SIGNATURE).
    Forged,
    /// Minted with a 1 s lifetime and sent once past it and the leeway (EXPIRED).
    Expired,
    /// Minted for another audience (WRONG_AUDIENCE).
    WrongAudience,
    /// A made-up kid (UNKNOWN_KID): each one asks the node for a (rate-limited) refresh.
    UnknownKid,
}

impl Invalid {
    fn allows(self, reason: Reason) -> bool {
        match self {
            Invalid::Any => true,
            Invalid::Forged => reason == Reason::BadSignature,
            Invalid::Expired => reason == Reason::Expired,
            Invalid::WrongAudience => reason == Reason::WrongAudience,
            Invalid::UnknownKid => reason == Reason::UnknownKid,
        }
    }
}

/// Everything a run needs.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub target: Target,
    pub duration: Duration,
    pub load: Load,
    /// Legitimate tokens in the pool (a few are replaced by fresh ones every 250 ms).
    pub tokens: usize,
    pub pick: Pick,
    pub connections_per_node: usize,
    pub rotate_every: Option<Duration>,
    /// Local only: kill a random verifier this often, and start it again shortly after.
    pub kill_every: Option<Duration>,
    /// Share of requests carrying a token that must be refused.
    pub invalid_ratio: f64,
    /// Which kinds of refused tokens.
    pub invalid_kind: Invalid,
    /// Audience minted into tokens and asked for in `Verify`.
    pub audience: String,
    /// The verifiers' clock leeway: an expired token is used only once surely refused.
    pub leeway: Duration,
    /// Local only: the verifiers' verified-token cache bound (node default when `None`).
    pub cache_entries: Option<usize>,
    /// Measure the server cost (empty call, uncached, batch, in-process) after the load.
    pub measure_cost: bool,
    /// Print a live progress line on stderr (when it is a terminal).
    pub progress: bool,
    /// TLS for `https://` targets (CA to trust, client certificate for mutual TLS).
    pub tls: keyfleet_runtime::tls::ClientTls,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            target: Target::Local { verifiers: 3 },
            duration: Duration::from_secs(30),
            load: Load::Concurrency(32),
            tokens: 1000,
            pick: Pick::Random,
            connections_per_node: 2,
            rotate_every: None,
            kill_every: None,
            invalid_ratio: 0.05,
            invalid_kind: Invalid::Any,
            audience: "loadtest".into(),
            leeway: Duration::from_secs(60),
            cache_entries: None,
            measure_cost: true,
            progress: true,
            tls: keyfleet_runtime::tls::ClientTls::default(),
        }
    }
}

/// What a token must get.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    Valid,
    Refused(Reason),
}

#[derive(Debug)]
struct PoolToken {
    id: u32,
    token: String,
    expect: Expect,
}

#[derive(Default)]
struct Pool {
    valid: Vec<Arc<PoolToken>>,
    invalid: Vec<Arc<PoolToken>>,
}

/// Counters of the second in progress; the ticker takes them every second.
struct Bucket {
    hist: Histogram<u64>,
    requests: u64,
    invalid: u64,
    errors: u64,
    retries: u64,
    false_rejects: u64,
    false_accepts: u64,
    wrong_reasons: u64,
    per_node: HashMap<String, u64>,
    per_region: HashMap<String, u64>,
    /// (token id, node id) of each legitimate token verified.
    spread: Vec<(u32, String)>,
}

impl Bucket {
    fn new() -> Bucket {
        Bucket {
            hist: new_hist(),
            requests: 0,
            invalid: 0,
            errors: 0,
            retries: 0,
            false_rejects: 0,
            false_accepts: 0,
            wrong_reasons: 0,
            per_node: HashMap::new(),
            per_region: HashMap::new(),
            spread: Vec::new(),
        }
    }
}

fn new_hist() -> Histogram<u64> {
    // 1 µs .. 60 s at 3 significant figures.
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds")
}

/// State shared by the workers and the background tasks.
struct Shared {
    nodes: Vec<Vec<VerifierClient<Channel>>>,
    /// Every connection (node-major), so the cost measurements use the run's connections.
    channels: Vec<Channel>,
    pool: RwLock<Pool>,
    bucket: Mutex<Bucket>,
    next_node: AtomicUsize,
    next_conn: AtomicUsize,
    next_id: AtomicU64,
    pick: Pick,
    invalid_ratio: f64,
    invalid_kind: Invalid,
    audience: String,
    current_kid: Mutex<String>,
    stop: AtomicBool,
}

/// The authority, as the load generator uses it.
#[derive(Clone)]
struct Minter {
    client: AuthorityClient<Channel>,
    admin_token: String,
}

impl Minter {
    fn admin<T>(&self, msg: T) -> Request<T> {
        let mut req = Request::new(msg);
        if let Ok(v) = format!("Bearer {}", self.admin_token).parse() {
            req.metadata_mut().insert("authorization", v);
        }
        req
    }

    async fn issue(
        &self,
        subject: &str,
        audience: &str,
        ttl: i64,
    ) -> anyhow::Result<IssueTokenResponse> {
        let req = IssueTokenRequest {
            subject: subject.into(),
            audience: vec![audience.into()],
            ttl_seconds: ttl,
            claims: Default::default(),
        };
        Ok(self
            .client
            .clone()
            .issue_token(self.admin(req))
            .await
            .context("minting a token at the authority (IssueToken)")?
            .into_inner())
    }

    /// Rotates and waits until the promoted key signs; returns its kid.
    async fn rotate(&self, timeout: Duration) -> anyhow::Result<String> {
        let mut client = self.client.clone();
        let r = client
            .rotate_keys(self.admin(RotateKeysRequest {}))
            .await
            .context("RotateKeys")?
            .into_inner();
        let deadline = Instant::now() + timeout;
        loop {
            let list = client
                .list_keys(self.admin(ListKeysRequest {}))
                .await?
                .into_inner();
            if list
                .keys
                .iter()
                .any(|k| k.state() == KeyState::Active && k.kid == r.promoting_kid)
            {
                return Ok(r.promoting_kid);
            }
            if Instant::now() >= deadline {
                return Err(anyhow!(
                    "key {} did not become active in time",
                    r.promoting_kid
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn endpoint(url: &str, tls: &keyfleet_runtime::tls::ClientTls) -> anyhow::Result<Endpoint> {
    Ok(keyfleet_runtime::tls::endpoint(url, tls)
        .with_context(|| format!("bad URL {url:?}"))?
        .connect_timeout(Duration::from_secs(1))
        .timeout(ATTEMPT_TIMEOUT)
        // A killed node sends no reset: keepalive pings find the dead connection within ~2 s
        // so the channel reconnects instead of sending every request into the void.
        .http2_keep_alive_interval(Duration::from_secs(1))
        .keep_alive_timeout(Duration::from_secs(1))
        .keep_alive_while_idle(true)
        .tcp_nodelay(true))
}

/// Runs a load test and returns its report. A failed check is in the report (see
/// [`Report::passed`]); an error means the run itself could not happen.
pub async fn run(options: LoadOptions) -> anyhow::Result<Report> {
    match options.target.clone() {
        Target::Local { verifiers } => run_local(options, verifiers).await,
        Target::Remote {
            authority,
            verifiers,
            admin_token,
        } => {
            let channel = endpoint(&authority, &options.tls)?.connect_lazy();
            let minter = Minter {
                client: AuthorityClient::new(channel),
                admin_token,
            };
            let target = format!("{} verifiers at {}", verifiers.len(), verifiers.join(","));
            drive(&options, target, &verifiers, minter, None).await
        }
    }
}

async fn run_local(options: LoadOptions, verifiers: usize) -> anyhow::Result<Report> {
    // The verifiers get their own runtime (named threads) so their CPU is measurable apart
    // from the load generator's.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name(SERVER_THREADS)
        .enable_all()
        .build()
        .context("starting the verifiers' runtime")?;
    let mut cluster_options = ClusterOptions {
        verifiers,
        runtime: Some(runtime.handle().clone()),
        cache_entries: options.cache_entries,
        // The nodes guard the audience the load mints for; its wrong-audience tokens must fail.
        audiences: vec![options.audience.clone()],
        ..ClusterOptions::default()
    };
    // A short leeway, so tokens minted with a 1 s lifetime are surely EXPIRED within seconds.
    cluster_options.policy.leeway = 1;
    let cluster = LocalCluster::start(cluster_options)
        .await
        .context("starting the local cluster")?;
    let urls = cluster.verifier_urls();
    let minter = Minter {
        client: cluster.authority_client().await?,
        admin_token: cluster.admin_token.clone(),
    };
    let mut options = options;
    options.leeway = Duration::from_secs(1);
    let target = format!("local cluster: 1 authority, {verifiers} verifiers (regions a, b)");
    let cluster = Arc::new(tokio::sync::Mutex::new(cluster));
    let result = drive(&options, target, &urls, minter, Some(cluster.clone())).await;
    if let Ok(cluster) = Arc::try_unwrap(cluster) {
        cluster.into_inner().shutdown().await.ok();
    }
    runtime.shutdown_background();
    result
}

/// The run itself, for any target.
async fn drive(
    options: &LoadOptions,
    target: String,
    urls: &[String],
    minter: Minter,
    cluster: Option<Arc<tokio::sync::Mutex<LocalCluster>>>,
) -> anyhow::Result<Report> {
    anyhow::ensure!(!urls.is_empty(), "no verifiers to load");
    let (mut nodes, mut channels) = (Vec::new(), Vec::new());
    for url in urls {
        let mut conns = Vec::new();
        for _ in 0..options.connections_per_node.max(1) {
            let channel = endpoint(url, &options.tls)?.connect_lazy();
            channels.push(channel.clone());
            conns.push(VerifierClient::new(channel));
        }
        nodes.push(conns);
    }
    let shared = Arc::new(Shared {
        nodes,
        channels,
        pool: RwLock::new(Pool::default()),
        bucket: Mutex::new(Bucket::new()),
        next_node: AtomicUsize::new(0),
        next_conn: AtomicUsize::new(0),
        next_id: AtomicU64::new(0),
        pick: options.pick,
        invalid_ratio: options.invalid_ratio.clamp(0.0, 1.0),
        invalid_kind: options.invalid_kind,
        audience: options.audience.clone(),
        current_kid: Mutex::new(String::new()),
        stop: AtomicBool::new(false),
    });

    // Tokens before the run: legitimate ones, and one of each kind that must be refused.
    let mut expiring = Vec::new();
    {
        let mut valid = Vec::with_capacity(options.tokens);
        let mut batch = tokio::task::JoinSet::new();
        for i in 0..options.tokens.max(1) {
            let (m, aud) = (minter.clone(), options.audience.clone());
            batch.spawn(async move { m.issue(&format!("load-{i}"), &aud, 0).await });
            if batch.len() >= 8 {
                valid.push(batch.join_next().await.expect("a task")??);
            }
        }
        while let Some(r) = batch.join_next().await {
            valid.push(r??);
        }
        *shared.current_kid.lock().unwrap() = valid[0].kid.clone();
        let mut pool = shared.pool.write().unwrap();
        for t in valid {
            let id = shared.next_id();
            pool.valid.push(Arc::new(PoolToken {
                id,
                token: t.token,
                expect: Expect::Valid,
            }));
        }
    }
    if options.invalid_ratio > 0.0 {
        let kid = shared.current_kid.lock().unwrap().clone();
        let mut invalid = crafted(&shared, &kid, 8);
        for i in 0..8 {
            let t = minter
                .issue(&format!("other-{i}"), "not-the-audience", 0)
                .await?;
            invalid.push(Arc::new(PoolToken {
                id: shared.next_id(),
                token: t.token,
                expect: Expect::Refused(Reason::WrongAudience),
            }));
            expiring.push(
                minter
                    .issue(&format!("short-{i}"), &options.audience, 1)
                    .await?,
            );
        }
        shared.pool.write().unwrap().invalid = invalid;
    }

    let started = Instant::now();
    let end = started + options.duration;
    let events = Arc::new(Mutex::new(Vec::<Event>::new()));
    let rss_start = cpu::rss_bytes().unwrap_or(0);
    let cpu_start = cpu::threads_cpu_ns(SERVER_THREADS);
    let cache_before = match &cluster {
        Some(c) => cache_counters(&c.lock().await.verifiers).await,
        None => None,
    };

    let mut background = tokio::task::JoinSet::new();
    background.spawn(mint_loop(
        shared.clone(),
        minter.clone(),
        expiring,
        options.leeway,
        options.invalid_ratio > 0.0,
    ));
    if let Some(every) = options.rotate_every {
        background.spawn(rotate_loop(
            shared.clone(),
            minter.clone(),
            every,
            started,
            events.clone(),
        ));
    }
    if let (Some(every), Some(cluster)) = (options.kill_every, cluster.clone()) {
        background.spawn(kill_loop(
            shared.clone(),
            cluster,
            every,
            started,
            events.clone(),
        ));
    }
    let ticker = tokio::spawn(tick_loop(
        shared.clone(),
        started,
        options.progress && std::io::stderr().is_terminal(),
    ));

    let answered = generate(&shared, options.load, end).await;
    let elapsed = started.elapsed();
    shared.stop.store(true, Ordering::Relaxed);
    let cpu_end = cpu::threads_cpu_ns(SERVER_THREADS);
    while background.join_next().await.is_some() {}
    let (totals, timeline) = ticker.await.context("the ticker panicked")?;

    // Server cost: only where the verifiers run in this process.
    let mut cost = Efficiency {
        batch_size: BATCH,
        method: "remote verifiers: server CPU is not measurable from the client; run with --local for the efficiency figures".into(),
        ..Efficiency::default()
    };
    let mut memory = Memory {
        rss_bytes_start: rss_start,
        ..Memory::default()
    };
    if let Some(cluster) = &cluster {
        let cluster = cluster.lock().await;
        let verifiers: Vec<_> = cluster
            .verifiers
            .iter()
            .filter_map(|n| n.verifier.clone().map(|v| (n.name.clone(), v)))
            .collect();
        if let (Some(a), Some(b)) = (cpu_start, cpu_end)
            && answered > 0
        {
            cost.server_cpu_us_per_verify = Some((b - a) as f64 / 1000.0 / answered as f64);
        }
        if let (Some(before), Some(after)) =
            (cache_before, cache_counters(&cluster.verifiers).await)
        {
            let (hits, misses) = (after.0 - before.0, after.1 - before.1);
            if hits + misses > 0 {
                cost.cache_hit_ratio = Some(hits as f64 / (hits + misses) as f64);
            }
        }
        drop(cluster);
        for (name, v) in &verifiers {
            let (len, cap) = v.cache_usage();
            memory.cache_entries.insert(name.clone(), len as u64);
            memory.cache_capacity = Some(cap as u64);
        }
        if options.measure_cost {
            measure_cost(&shared, options, &verifiers, &mut cost).await;
        }
    }
    memory.rss_bytes_end = cpu::rss_bytes().unwrap_or(0);
    memory.rss_bytes_max = timeline
        .iter()
        .map(|s| s.rss_bytes)
        .chain([rss_start, memory.rss_bytes_end])
        .max()
        .unwrap_or(0);
    let efficiency = match (
        cost.inprocess_verify_us,
        cost.empty_call_us,
        cost.server_cpu_us_per_verify,
    ) {
        (Some(i), Some(e), Some(s)) if s > 0.0 => Some((i + e) / s),
        _ => None,
    };

    let events = events.lock().unwrap().clone();
    Ok(totals.into_report(
        target, options, elapsed, efficiency, cost, memory, events, timeline,
    ))
}

impl Shared {
    fn next_id(&self) -> u32 {
        self.next_id.fetch_add(1, Ordering::Relaxed) as u32
    }

    /// A token to send and the node to send it to.
    fn choose(&self) -> Option<(Arc<PoolToken>, usize)> {
        let mut rng = rand::rng();
        let pool = self.pool.read().unwrap();
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
        let node = match self.pick {
            Pick::Random => rng.random_range(0..self.nodes.len()),
            Pick::RoundRobin => self.next_node.fetch_add(1, Ordering::Relaxed) % self.nodes.len(),
        };
        Some((token, node))
    }

    fn client(&self, node: usize) -> VerifierClient<Channel> {
        let conns = &self.nodes[node];
        conns[self.next_conn.fetch_add(1, Ordering::Relaxed) % conns.len()].clone()
    }

    /// Sends one request (retrying on other nodes) and records it, latency from `since`.
    async fn one(&self, token: &PoolToken, first: usize, since: Instant) -> bool {
        let mut retries = 0;
        let mut answer = None;
        for attempt in 0..MAX_ATTEMPTS {
            let node = (first + attempt) % self.nodes.len();
            if attempt > 0 {
                retries += 1;
            }
            let req = VerifyRequest {
                token: token.token.clone(),
                audience: self.audience.clone(),
            };
            match self.client(node).verify(req).await {
                Ok(r) => {
                    let r = r.into_inner();
                    // A node that cannot vouch for its key set answers UNAVAILABLE: ask another.
                    if r.reason() == Reason::Unavailable {
                        continue;
                    }
                    answer = Some(r);
                    break;
                }
                Err(status) if retryable(status.code()) => {
                    tracing::debug!(node, code = ?status.code(), message = status.message(), "retrying on another node");
                    continue;
                }
                Err(status) => {
                    tracing::warn!(node, code = ?status.code(), message = status.message(), "Verify failed");
                    break;
                }
            }
        }
        let micros = since.elapsed().as_micros() as u64;
        let mut b = self.bucket.lock().unwrap();
        b.hist.saturating_record(micros.max(1));
        b.requests += 1;
        b.retries += retries;
        if token.expect != Expect::Valid {
            b.invalid += 1;
        }
        let Some(r) = answer else {
            b.errors += 1;
            return false;
        };
        judge(&mut b, token, &r);
        true
    }
}

fn retryable(code: Code) -> bool {
    matches!(
        code,
        Code::Unavailable
            | Code::Unknown
            | Code::Cancelled
            | Code::DeadlineExceeded
            | Code::Aborted
            | Code::Internal
    )
}

fn judge(b: &mut Bucket, token: &PoolToken, r: &VerifyResponse) {
    *b.per_node.entry(r.node_id.clone()).or_default() += 1;
    *b.per_region.entry(r.region.clone()).or_default() += 1;
    match token.expect {
        Expect::Valid if r.valid => b.spread.push((token.id, r.node_id.clone())),
        Expect::Valid => {
            b.false_rejects += 1;
            // The node id and detail come from the server: escaped, they cannot forge a line.
            tracing::warn!(node = %escape_untrusted(&r.node_id), reason = ?r.reason(), detail = %escape_untrusted(&r.detail), "false reject");
        }
        Expect::Refused(_) if r.valid => {
            b.false_accepts += 1;
            tracing::warn!(node = %escape_untrusted(&r.node_id), "false accept");
        }
        Expect::Refused(want) if r.reason() != want => b.wrong_reasons += 1,
        Expect::Refused(_) => {}
    }
}

/// Generates the load until `end`; returns the number of answered requests.
async fn generate(shared: &Arc<Shared>, load: Load, end: Instant) -> u64 {
    let answered = Arc::new(AtomicU64::new(0));
    match load {
        Load::Concurrency(n) => {
            let mut workers = tokio::task::JoinSet::new();
            for _ in 0..n.max(1) {
                let (shared, answered) = (shared.clone(), answered.clone());
                workers.spawn(async move {
                    while Instant::now() < end {
                        let Some((token, node)) = shared.choose() else {
                            tokio::time::sleep(Duration::from_millis(10)).await;
                            continue;
                        };
                        if shared.one(&token, node, Instant::now()).await {
                            answered.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                });
            }
            while workers.join_next().await.is_some() {}
        }
        Load::Rate(rate) => {
            let interval = Duration::from_secs_f64(1.0 / rate.max(1) as f64);
            let start = Instant::now();
            let in_flight = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
            let mut tasks = tokio::task::JoinSet::new();
            for i in 0u32.. {
                let intended = start + interval * i;
                if intended >= end {
                    break;
                }
                if intended > Instant::now() {
                    tokio::time::sleep_until(intended).await;
                }
                let Ok(permit) = in_flight.clone().acquire_owned().await else {
                    break;
                };
                let Some((token, node)) = shared.choose() else {
                    continue;
                };
                let (shared, answered) = (shared.clone(), answered.clone());
                tasks.spawn(async move {
                    if shared.one(&token, node, intended).await {
                        answered.fetch_add(1, Ordering::Relaxed);
                    }
                    drop(permit);
                });
                while tasks.try_join_next().is_some() {}
            }
            while tasks.join_next().await.is_some() {}
        }
    }
    answered.load(Ordering::Relaxed)
}

/// Tokens that must be refused, made here: a signature by a key the authority never had under
/// its real kid (BAD_SIGNATURE), and a made-up kid (UNKNOWN_KID).
fn crafted(shared: &Shared, kid: &str, n: usize) -> Vec<Arc<PoolToken>> {
    let mut rng = rand::rng();
    let key = SigningKey::from_bytes(&rng.random());
    let mut out = Vec::new();
    for i in 0..n {
        let claims = TokenClaims {
            iss: "keyfleet-loadtest-forger".into(),
            sub: format!("forged-{i}"),
            aud: vec![shared.audience.clone()],
            iat: 0,
            nbf: 0,
            exp: 253_402_300_000,
            jti: format!("forged-{i}"),
            extra: Default::default(),
        };
        let (kid, expect) = if i % 2 == 0 {
            (kid.to_owned(), Reason::BadSignature)
        } else {
            (format!("loadtest-unknown-{i}"), Reason::UnknownKid)
        };
        out.push(Arc::new(PoolToken {
            id: shared.next_id(),
            token: sign_token(&key, &kid, &claims),
            expect: Expect::Refused(expect),
        }));
    }
    out
}

/// Mints fresh tokens during the run (outside the timed path) and swaps them into the pool;
/// moves short-lived tokens into the refused pool once surely expired.
async fn mint_loop(
    shared: Arc<Shared>,
    minter: Minter,
    mut expiring: Vec<IssueTokenResponse>,
    leeway: Duration,
    with_invalid: bool,
) {
    let mut n = 0u64;
    while !shared.stop.load(Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_millis(250)).await;
        n += 1;
        let Ok(t) = minter
            .issue(&format!("fresh-{n}"), &shared.audience, 0)
            .await
        else {
            continue;
        };
        *shared.current_kid.lock().unwrap() = t.kid.clone();
        let id = shared.next_id();
        let fresh = Arc::new(PoolToken {
            id,
            token: t.token,
            expect: Expect::Valid,
        });
        let now = keyfleet_runtime::Clock::system().now();
        let due: Vec<_> = expiring
            .extract_if(.., |t| now > t.expires_at + leeway.as_secs() as i64 + 1)
            .collect();
        let forged = if with_invalid && n.is_multiple_of(8) {
            // Keep the forged tokens on a kid the fleet still publishes.
            crafted(&shared, &t.kid, 8)
        } else {
            Vec::new()
        };
        let mut pool = shared.pool.write().unwrap();
        let slot = rand::rng().random_range(0..pool.valid.len().max(1));
        if slot < pool.valid.len() {
            pool.valid[slot] = fresh;
        } else {
            pool.valid.push(fresh);
        }
        for t in due {
            let id = shared.next_id();
            pool.invalid.push(Arc::new(PoolToken {
                id,
                token: t.token,
                expect: Expect::Refused(Reason::Expired),
            }));
        }
        if !forged.is_empty() {
            pool.invalid.retain(|t| {
                !matches!(
                    t.expect,
                    Expect::Refused(Reason::BadSignature | Reason::UnknownKid)
                )
            });
            pool.invalid.extend(forged);
        }
    }
}

async fn rotate_loop(
    shared: Arc<Shared>,
    minter: Minter,
    every: Duration,
    started: Instant,
    events: Arc<Mutex<Vec<Event>>>,
) {
    let mut next = started + every;
    loop {
        if !sleep_until_or_stop(&shared, next).await {
            return;
        }
        next += every;
        match minter.rotate(Duration::from_secs(30)).await {
            Ok(kid) => {
                *shared.current_kid.lock().unwrap() = kid.clone();
                events.lock().unwrap().push(Event {
                    t: started.elapsed().as_secs_f64(),
                    kind: "rotation".into(),
                    detail: kid,
                });
            }
            Err(e) => tracing::warn!(error = %e, "rotation failed"),
        }
    }
}

async fn kill_loop(
    shared: Arc<Shared>,
    cluster: Arc<tokio::sync::Mutex<LocalCluster>>,
    every: Duration,
    started: Instant,
    events: Arc<Mutex<Vec<Event>>>,
) {
    // Down long enough for clients to notice, short enough for the shares to stay even.
    let down = (every / 10).min(Duration::from_millis(500));
    let mut next = started + every;
    loop {
        if !sleep_until_or_stop(&shared, next).await {
            return;
        }
        next += every;
        let (i, name) = {
            let mut c = cluster.lock().await;
            let i = rand::rng().random_range(0..c.verifiers.len());
            c.kill_verifier(i);
            (i, c.verifiers[i].name.clone())
        };
        events.lock().unwrap().push(Event {
            t: started.elapsed().as_secs_f64(),
            kind: "kill".into(),
            detail: name.clone(),
        });
        tokio::time::sleep(down).await;
        if let Err(e) = cluster.lock().await.revive_verifier(i).await {
            tracing::warn!(node = %name, error = %e, "restarting a killed verifier failed");
        }
    }
}

/// Sleeps until `at`; false when the run stopped first.
async fn sleep_until_or_stop(shared: &Shared, at: Instant) -> bool {
    while Instant::now() < at {
        if shared.stop.load(Ordering::Relaxed) {
            return false;
        }
        let step = (at - Instant::now()).min(Duration::from_millis(100));
        tokio::time::sleep(step).await;
    }
    !shared.stop.load(Ordering::Relaxed)
}

/// The run's totals, merged from the per-second buckets.
struct Totals {
    hist: Histogram<u64>,
    requests: u64,
    invalid: u64,
    errors: u64,
    retries: u64,
    false_rejects: u64,
    false_accepts: u64,
    wrong_reasons: u64,
    per_node: BTreeMap<String, u64>,
    per_region: BTreeMap<String, u64>,
    spread: HashMap<u32, BTreeMap<String, u64>>,
    kids: BTreeSet<String>,
}

impl Totals {
    fn add(&mut self, b: Bucket) {
        let _ = self.hist.add(&b.hist);
        self.requests += b.requests;
        self.invalid += b.invalid;
        self.errors += b.errors;
        self.retries += b.retries;
        self.false_rejects += b.false_rejects;
        self.false_accepts += b.false_accepts;
        self.wrong_reasons += b.wrong_reasons;
        for (k, v) in b.per_node {
            *self.per_node.entry(k).or_default() += v;
        }
        for (k, v) in b.per_region {
            *self.per_region.entry(k).or_default() += v;
        }
        for (id, node) in b.spread {
            *self.spread.entry(id).or_default().entry(node).or_default() += 1;
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn into_report(
        self,
        target: String,
        options: &LoadOptions,
        elapsed: Duration,
        efficiency: Option<f64>,
        cost: Efficiency,
        memory: Memory,
        events: Vec<Event>,
        timeline: Vec<Second>,
    ) -> Report {
        let q = |p: f64| self.hist.value_at_quantile(p);
        let checked: Vec<_> = self
            .spread
            .values()
            .filter(|nodes| nodes.values().sum::<u64>() >= SPREAD_MIN_CHECKS)
            .collect();
        let on_many = checked.iter().filter(|nodes| nodes.len() >= 2).count();
        let answers: u64 = self.per_node.values().sum();
        let even = answers as f64 / self.per_node.len().max(1) as f64;
        let deviation = self
            .per_node
            .values()
            .map(|n| (*n as f64 - even).abs() / even.max(1.0))
            .fold(0.0, f64::max);
        let spread_nodes: Vec<String> = self.per_node.keys().cloned().collect();
        let mut ids: Vec<_> = self.spread.keys().copied().collect();
        ids.sort_unstable();
        let token_spread = ids
            .iter()
            .take(40)
            .map(|id| {
                let row = &self.spread[id];
                spread_nodes
                    .iter()
                    .map(|n| row.get(n).copied().unwrap_or(0))
                    .collect()
            })
            .collect();
        Report {
            target,
            mode: match options.load {
                Load::Rate(r) => format!("open loop, {r} req/s"),
                Load::Concurrency(c) => format!("closed loop, {c} in flight"),
            },
            duration_s: elapsed.as_secs_f64(),
            requests: self.requests,
            false_rejects: self.false_rejects,
            false_accepts: self.false_accepts,
            wrong_reasons: self.wrong_reasons,
            errors: self.errors,
            retries: self.retries,
            throughput_rps: self.requests as f64 / elapsed.as_secs_f64().max(1e-9),
            latency_us: Latency {
                p50: q(0.5),
                p90: q(0.9),
                p99: q(0.99),
                p999: q(0.999),
                max: self.hist.max(),
            },
            per_node: self.per_node,
            per_region: self.per_region,
            per_node_max_deviation: deviation,
            tokens_on_multiple_nodes_ratio: if checked.is_empty() {
                0.0
            } else {
                on_many as f64 / checked.len() as f64
            },
            tokens_checked: checked.len() as u64,
            invalid_requests: self.invalid,
            rotations: events.iter().filter(|e| e.kind == "rotation").count() as u64,
            kills: events.iter().filter(|e| e.kind == "kill").count() as u64,
            kids_seen: self.kids.into_iter().collect(),
            efficiency,
            cost,
            memory,
            events,
            timeline,
            token_spread,
            spread_nodes,
        }
    }
}

/// Every second: takes the bucket, appends to the timeline, prints the progress line.
async fn tick_loop(shared: Arc<Shared>, started: Instant, progress: bool) -> (Totals, Vec<Second>) {
    let mut totals = Totals {
        hist: new_hist(),
        requests: 0,
        invalid: 0,
        errors: 0,
        retries: 0,
        false_rejects: 0,
        false_accepts: 0,
        wrong_reasons: 0,
        per_node: BTreeMap::new(),
        per_region: BTreeMap::new(),
        spread: HashMap::new(),
        kids: BTreeSet::new(),
    };
    let mut timeline = Vec::new();
    let mut last = started;
    let mut t = 0;
    loop {
        t += 1;
        let at = started + Duration::from_secs(t);
        let stopping = !sleep_until_or_stop(&shared, at).await;
        // After the stop, wait for the requests still in flight to be recorded.
        if stopping {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let now = Instant::now();
        let b = std::mem::replace(&mut *shared.bucket.lock().unwrap(), Bucket::new());
        let kid = shared.current_kid.lock().unwrap().clone();
        totals.kids.insert(kid.clone());
        let span = (now - last).as_secs_f64().max(1e-3);
        last = now;
        let second = Second {
            t,
            requests: b.requests,
            rps: b.requests as f64 / span,
            p99_us: if b.hist.is_empty() {
                0
            } else {
                b.hist.value_at_quantile(0.99)
            },
            errors: b.errors,
            retries: b.retries,
            false_rejects: b.false_rejects,
            false_accepts: b.false_accepts,
            kid,
            rss_bytes: cpu::rss_bytes().unwrap_or(0),
        };
        totals.add(b);
        if progress {
            let mut err = std::io::stderr().lock();
            let _ = write!(
                err,
                "\r\x1b[2K{:>4}s {:>8.0} req/s  p99 {:>6} µs  errors {}  retries {}  false {}/{}  kid {}",
                second.t,
                second.rps,
                second.p99_us,
                totals.errors,
                totals.retries,
                totals.false_rejects,
                totals.false_accepts,
                &second.kid[..second.kid.len().min(10)]
            );
            let _ = err.flush();
        }
        // The stub after the stop (in-flight answers only) would draw a false drop.
        if !stopping || span >= 0.5 {
            timeline.push(second);
        }
        if stopping {
            if progress {
                eprintln!();
            }
            return (totals, timeline);
        }
    }
}

/// (hits, misses) summed over the local verifiers' caches, from their `/metrics`.
async fn cache_counters(nodes: &[crate::cluster::Node]) -> Option<(u64, u64)> {
    let (mut hits, mut misses) = (0, 0);
    for node in nodes {
        let text = http_get(node.http).await.ok()?;
        hits += metric(&text, "keyfleet_cache_hits_total")?;
        misses += metric(&text, "keyfleet_cache_misses_total")?;
    }
    Some((hits, misses))
}

fn metric(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .map(|v| v as u64)
}

/// A bare HTTP/1.1 GET of `/metrics` on loopback.
async fn http_get(addr: std::net::SocketAddr) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await?;
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut out)).await??;
    Ok(out)
}

/// After the load: the empty-call cost, the uncached and batched server cost, and the
/// in-process costs, each under the run's load shape.
async fn measure_cost(
    shared: &Arc<Shared>,
    options: &LoadOptions,
    verifiers: &[(String, keyfleet_verifier::Verifier)],
    cost: &mut Efficiency,
) {
    let phase = (options.duration / 6).clamp(Duration::from_millis(800), Duration::from_secs(3));
    let load = options.load;
    let valid: Vec<String> = shared
        .pool
        .read()
        .unwrap()
        .valid
        .iter()
        .map(|t| t.token.clone())
        .collect();
    // The empty call: gRPC health Check on every node.
    let health: Vec<HealthClient<Channel>> = shared
        .channels
        .iter()
        .map(|c| HealthClient::new(c.clone()))
        .collect();
    cost.empty_call_us = server_cost(load, phase, move |i| {
        let mut h = health[i % health.len()].clone();
        async move {
            h.check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .map(|_| 1)
            .unwrap_or(0)
        }
    })
    .await;

    // Cache off on every node: every Verify fully checked, one by one and in batches.
    let saved: Vec<usize> = verifiers.iter().map(|(_, v)| v.cache_usage().1).collect();
    for (_, v) in verifiers {
        v.set_cache_capacity(0);
    }
    let clients: Vec<VerifierClient<Channel>> = shared
        .channels
        .iter()
        .map(|c| VerifierClient::new(c.clone()))
        .collect();
    let (c1, v1, aud) = (clients.clone(), valid.clone(), shared.audience.clone());
    cost.server_cpu_us_per_verify_uncached = server_cost(load, phase, move |i| {
        let mut c = c1[i % c1.len()].clone();
        let req = VerifyRequest {
            token: v1[i % v1.len()].clone(),
            audience: aud.clone(),
        };
        async move { c.verify(req).await.map(|_| 1).unwrap_or(0) }
    })
    .await;
    let (c2, v2, aud) = (clients, valid.clone(), shared.audience.clone());
    let batch_load = match load {
        Load::Rate(r) => Load::Rate((r / BATCH as u64).max(1)),
        Load::Concurrency(c) => Load::Concurrency(c.clamp(1, 8)),
    };
    cost.server_cpu_us_per_batched_token = server_cost(batch_load, phase, move |i| {
        let mut c = c2[i % c2.len()].clone();
        let requests = (0..BATCH)
            .map(|k| VerifyRequest {
                token: v2[(i * BATCH + k) % v2.len()].clone(),
                audience: aud.clone(),
            })
            .collect();
        async move {
            c.verify_batch(VerifyBatchRequest { requests })
                .await
                .map(|r| r.into_inner().responses.len() as u64)
                .unwrap_or(0)
        }
    })
    .await;

    // In-process, on one core: the run's mix (cache back on, warm), uncached, hits, batches.
    let mix: Vec<String> = {
        let pool = shared.pool.read().unwrap();
        let mut rng = rand::rng();
        (0..4000)
            .map(|_| {
                let bad = !pool.invalid.is_empty() && rng.random_bool(shared.invalid_ratio);
                let from = if bad { &pool.invalid } else { &pool.valid };
                from[rng.random_range(0..from.len())].token.clone()
            })
            .collect()
    };
    if let Some((_, node)) = verifiers.first() {
        let (node, aud) = (node.clone(), shared.audience.clone());
        let saved0 = saved[0];
        // A blocking-pool thread of its own: "one core", timed by that thread's CPU time.
        let measured =
            tokio::task::spawn_blocking(move || inprocess(&node, &aud, &mix, &valid, saved0))
                .await
                .ok()
                .flatten();
        if let Some((uncached, batch, hit, mixed)) = measured {
            cost.inprocess_verify_uncached_us = Some(uncached);
            cost.inprocess_batch_us = Some(batch);
            cost.inprocess_cache_hit_us = Some(hit);
            cost.inprocess_verify_us = Some(mixed);
        }
    }
    for ((_, v), cap) in verifiers.iter().zip(saved) {
        v.set_cache_capacity(cap);
    }
    if let (Some(b), Some(s)) = (
        cost.server_cpu_us_per_batched_token,
        cost.server_cpu_us_per_verify_uncached,
    ) {
        cost.batch_ratio = Some(b / s);
    }
    if let (Some(i), Some(e), Some(s)) = (
        cost.inprocess_verify_uncached_us,
        cost.empty_call_us,
        cost.server_cpu_us_per_verify_uncached,
    ) {
        cost.efficiency_uncached = Some((i + e) / s);
    }
    cost.method =
        "the local verifiers run on their own Tokio runtime (threads named kf-verifier); \
server CPU = the CPU time those threads used (Linux /proc/self/task/*/schedstat) ÷ answers, so the \
load generator's own CPU is not counted. Empty call = the same for gRPC health Check under the \
same load shape; uncached and batch = the same with every node's cache off; in-process = one \
thread calling the verifier's verify path directly (CPU time of that thread ÷ tokens)."
            .into();
}

/// Server CPU (µs) per unit of work while `call(i)` runs under `load` for `phase`.
async fn server_cost<F, Fut>(load: Load, phase: Duration, call: F) -> Option<f64>
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = u64> + Send + 'static,
{
    let call = Arc::new(call);
    let units = Arc::new(AtomicU64::new(0));
    let next = Arc::new(AtomicUsize::new(0));
    let before = cpu::threads_cpu_ns(SERVER_THREADS)?;
    let end = Instant::now() + phase;
    let mut tasks = tokio::task::JoinSet::new();
    match load {
        Load::Concurrency(n) => {
            for _ in 0..n.max(1) {
                let (call, units, next) = (call.clone(), units.clone(), next.clone());
                tasks.spawn(async move {
                    while Instant::now() < end {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        units.fetch_add(call(i).await, Ordering::Relaxed);
                    }
                });
            }
        }
        Load::Rate(rate) => {
            let interval = Duration::from_secs_f64(1.0 / rate.max(1) as f64);
            let start = Instant::now();
            let in_flight = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
            for i in 0u32.. {
                let at = start + interval * i;
                if at >= end {
                    break;
                }
                if at > Instant::now() {
                    tokio::time::sleep_until(at).await;
                }
                let Ok(permit) = in_flight.clone().acquire_owned().await else {
                    break;
                };
                let (call, units) = (call.clone(), units.clone());
                tasks.spawn(async move {
                    units.fetch_add(call(i as usize).await, Ordering::Relaxed);
                    drop(permit);
                });
                while tasks.try_join_next().is_some() {}
            }
        }
    }
    while tasks.join_next().await.is_some() {}
    let after = cpu::threads_cpu_ns(SERVER_THREADS)?;
    let units = units.load(Ordering::Relaxed);
    (units > 0).then(|| (after - before) as f64 / 1000.0 / units as f64)
}

/// On this (fresh) thread: µs per token for (uncached, batched, cache hit, the run's mix).
/// Each figure loops over its tokens for at least [`INPROCESS_MIN`] so the thread's CPU clock
/// (updated by the scheduler every few ms) is read precisely enough.
fn inprocess(
    node: &keyfleet_verifier::Verifier,
    audience: &str,
    mix: &[String],
    valid: &[String],
    capacity: usize,
) -> Option<(f64, f64, f64, f64)> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .ok()?;
    let requests: Vec<VerifyRequest> = valid
        .iter()
        .map(|t| VerifyRequest {
            token: t.clone(),
            audience: audience.to_owned(),
        })
        .collect();
    rt.block_on(async {
        // Uncached: every token fully checked.
        node.set_cache_capacity(0);
        let uncached = per_token(valid.len(), || async {
            for t in valid {
                let _ = node.verify_token(t, audience).await;
            }
        })
        .await?;
        let batch = per_token(requests.len(), || async {
            for chunk in requests.chunks(BATCH) {
                let _ = node.verify_batch(chunk).await;
            }
        })
        .await?;
        // Cache on and warm: hits only.
        node.set_cache_capacity(capacity.max(valid.len()));
        let hit = per_token(valid.len(), || async {
            for t in valid {
                let _ = node.verify_token(t, audience).await;
            }
        })
        .await?;
        node.set_cache_capacity(capacity);
        let mixed = per_token(mix.len(), || async {
            for t in mix {
                let _ = node.verify_token(t, audience).await;
            }
        })
        .await?;
        Some((uncached, batch, hit, mixed))
    })
}

const INPROCESS_MIN: Duration = Duration::from_millis(300);

/// CPU µs of this thread per token, repeating `round` (of `n` tokens) for at least
/// [`INPROCESS_MIN`].
async fn per_token<F, Fut>(n: usize, round: F) -> Option<f64>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let start_cpu = cpu::this_thread_cpu_ns()?;
    let start = Instant::now();
    let mut rounds = 0;
    while rounds == 0 || start.elapsed() < INPROCESS_MIN {
        round().await;
        rounds += 1;
    }
    let used = cpu::this_thread_cpu_ns()? - start_cpu;
    Some(used as f64 / 1000.0 / (rounds * n.max(1)) as f64)
}
