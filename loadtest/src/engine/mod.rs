//! The load generator's entry point ([`run`]) and what a run can be asked ([`LoadOptions`]):
//! open-loop (`rate`, latency from the intended send time, so coordinated omission cannot
//! hide a stall) or closed-loop (`concurrency`) `Verify` traffic spread over every node, with
//! tokens of known verdicts, key rotations, node kills, retries on another node, and the
//! server-cost measurements of the report.
//!
//! The jobs, one file each: `drive` (one run, from connecting to the report), `tokens` (the
//! pool of tokens with known verdicts, forgeries, fresh minting), `state` (what the workers
//! and background tasks share), `request` (one `Verify` with retries, and judging its
//! answer), `schedule` (the open/closed-loop scheduler of both the run and the cost phases),
//! `counters` (per-second and total counts), `ticker` (the timeline and progress line),
//! `chaos` (rotations and node kills) and `cost` (the server-cost measurements).
//!
//! The authority is called through `keyfleet_authority::client::AdminClient`. The load's
//! `Verify` calls go through `keyfleet_client::VerifierPool` (power of two choices on in-flight
//! calls, hedging after the recent p95, failing nodes ejected and probed back, retries on
//! another node); [`run_with_pool`] sets its configuration (e.g. hedging off, to compare). The
//! cost phases address each node directly, over `keyfleet_runtime::client::Settings::LOAD`
//! connections.

mod chaos;
mod cost;
mod counters;
mod drive;
mod request;
mod schedule;
mod state;
mod ticker;
mod tokens;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use keyfleet_authority::client::AdminClient;
pub use keyfleet_client::{PoolConfig, PoolStats};
use keyfleet_proto::v1::Reason;
use keyfleet_runtime::client::Settings;

use crate::cluster::{ClusterOptions, LocalCluster};
use crate::report::Report;
use drive::drive;

/// The verifier runtime's thread name, how their CPU time is found in `/proc`.
const SERVER_THREADS: &str = "kf-verifier";
/// A legitimate token counts in `tokens_on_multiple_nodes_ratio` once verified this often: with
/// non-sticky routing over N nodes, the chance it met only one node is N·(1/N)^10.
pub const SPREAD_MIN_CHECKS: u64 = 10;
/// The defaults of a run (`keyfleet loadtest`'s flags, [`LoadOptions::default`]).
pub const DEFAULT_DURATION: Duration = Duration::from_secs(30);
/// Closed loop with this many requests in flight unless a rate or concurrency is given.
pub const DEFAULT_CONCURRENCY: usize = 32;
pub const DEFAULT_TOKENS: usize = 1000;
pub const DEFAULT_CONNECTIONS_PER_NODE: usize = 2;
pub const DEFAULT_INVALID_RATIO: f64 = 0.05;
/// The audience minted into tokens, asked for in `Verify`, and guarded by the local cluster.
pub const DEFAULT_AUDIENCE: &str = "loadtest";

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

/// How each request picks its node. Kept for the command line's `--pick`; the load now goes
/// through `keyfleet_client::VerifierPool`, which picks by power of two choices whatever this
/// says.
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
            duration: DEFAULT_DURATION,
            load: Load::Concurrency(DEFAULT_CONCURRENCY),
            tokens: DEFAULT_TOKENS,
            pick: Pick::Random,
            connections_per_node: DEFAULT_CONNECTIONS_PER_NODE,
            rotate_every: None,
            kill_every: None,
            invalid_ratio: DEFAULT_INVALID_RATIO,
            invalid_kind: Invalid::Any,
            audience: DEFAULT_AUDIENCE.into(),
            leeway: keyfleet_verifier::DEFAULT_LEEWAY,
            cache_entries: None,
            measure_cost: true,
            progress: true,
            tls: keyfleet_runtime::tls::ClientTls::default(),
        }
    }
}

/// Runs a load test and returns its report. A failed check is in the report (see
/// [`Report::passed`]); an error means the run itself could not happen. The load goes through
/// a `keyfleet_client::VerifierPool` with its defaults (hedging on).
pub async fn run(options: LoadOptions) -> anyhow::Result<Report> {
    Ok(run_with_pool(options, pool_config()).await?.0)
}

/// The pool of a run: the client's defaults, but a node that answers again is probed back
/// within half a second (not up to 5 s), so a killed and revived node soon takes its share of
/// the load again (the report judges the shares).
pub fn pool_config() -> PoolConfig {
    PoolConfig {
        probe_backoff: Duration::from_millis(50),
        probe_backoff_max: Duration::from_millis(500),
        ..PoolConfig::default()
    }
}

/// [`run`] through a pool configured by `pool` (`PoolConfig { hedging: false, ..pool_config() }`
/// for `--no-hedge`); also returns what the pool did (hedges, hedge wins, retries, ejections).
pub async fn run_with_pool(
    options: LoadOptions,
    pool: PoolConfig,
) -> anyhow::Result<(Report, PoolStats)> {
    match options.target.clone() {
        Target::Local { verifiers } => run_local(options, verifiers, pool).await,
        Target::Remote {
            authority,
            verifiers,
            admin_token,
        } => {
            let authority =
                AdminClient::lazy(&authority, &options.tls, &Settings::LOAD, &admin_token)
                    .context("--authority")?;
            let target = format!("{} verifiers at {}", verifiers.len(), verifiers.join(","));
            drive(&options, target, &verifiers, authority, None, pool).await
        }
    }
}

async fn run_local(
    options: LoadOptions,
    verifiers: usize,
    pool: PoolConfig,
) -> anyhow::Result<(Report, PoolStats)> {
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
    let authority = cluster.admin_client();
    let mut options = options;
    options.leeway = Duration::from_secs(1);
    let target = format!("local cluster: 1 authority, {verifiers} verifiers (regions a, b)");
    let cluster = Arc::new(tokio::sync::Mutex::new(cluster));
    let result = drive(
        &options,
        target,
        &urls,
        authority,
        Some(cluster.clone()),
        pool,
    )
    .await;
    if let Ok(cluster) = Arc::try_unwrap(cluster) {
        cluster.into_inner().shutdown().await.ok();
    }
    runtime.shutdown_background();
    result
}
