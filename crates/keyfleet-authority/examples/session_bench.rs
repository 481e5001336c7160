//! Benchmark of persistent login at scale (issue 15): fills the embedded session store with
//! 1,000,000 sessions, then serves a real authority on loopback and drives `Refresh` over gRPC
//! from many concurrent callers, each refresh durable (WAL, `synchronous = FULL`) before it is
//! answered. Reports refreshes/s, latency percentiles, the store's size on disk and the
//! process's memory — once with group commit (the default) and once with one commit per
//! refresh.
//!
//! `cargo run --release -p keyfleet-authority --example session_bench [-- SESSIONS SECONDS
//! CALLERS RATE]` (defaults 1000000 20 64 2000): each store mode runs at RATE refreshes/s
//! offered (latency from when each was due), then flat out. The data directory is a temporary one on the same
//! disk as `/tmp`.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hdrhistogram::Histogram;
use keyfleet_authority::session_store::Session;
use keyfleet_authority::sqlite::SqliteStore;
use keyfleet_authority::{Authority, Config};
use keyfleet_proto::v1 as pb;
use keyfleet_proto::v1::authority_client::AuthorityClient;
use keyfleet_runtime::CancellationToken;
use sha2::{Digest as _, Sha256};
use tokio::sync::Mutex;

/// The refresh token the fill gives session `i` (32 bytes derived from `i`, in the real format).
fn first_token(i: usize) -> String {
    let bytes = Sha256::digest(format!("bench-{i}").as_bytes());
    format!("kfr_{}", URL_SAFE_NO_PAD.encode(bytes))
}

fn fill(dir: &Path, sessions: usize, now: i64) {
    let store = SqliteStore::open(dir, 1).expect("open the session store");
    let started = Instant::now();
    let chunk = 20_000;
    for base in (0..sessions).step_by(chunk) {
        let batch = (base..(base + chunk).min(sessions))
            .map(|i| {
                let session = Session {
                    id: format!("bench-session-{i:010}"),
                    subject: format!("user-{i}"),
                    audience: vec!["api".into()],
                    scopes: vec!["read".into(), "write".into()],
                    claims: serde_json::Map::new(),
                    auth_time: now,
                    started_at: now,
                    last_refresh_at: 0,
                    refresh_count: 0,
                    idle_expires_at: now + 14 * 86_400,
                    absolute_expires_at: now + 90 * 86_400,
                    access_expires_at: now + 900,
                    ended_at: 0,
                    end_reason: None,
                };
                let hash: [u8; 32] = Sha256::digest(first_token(i).as_bytes()).into();
                (session, hash)
            })
            .collect();
        store.import(batch).expect("import");
    }
    println!(
        "filled {sessions} sessions in {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

fn store_bytes(dir: &Path) -> u64 {
    ["sessions.db", "sessions.db-wal", "sessions.db-shm"]
        .iter()
        .filter_map(|f| std::fs::metadata(dir.join(f)).ok())
        .map(|m| m.len())
        .sum()
}

/// Resident and peak resident memory of this process, in MiB.
fn memory() -> (f64, f64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<f64>().ok())
            .map_or(0.0, |kb| kb / 1024.0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Each caller's newest refresh token per session it refreshed (the others still hold the
/// fill's), kept across runs.
type Chains = Vec<HashMap<usize, String>>;

/// Drives `Refresh` for `seconds` from `concurrency` callers, each on its own slice of the
/// sessions (so no two callers share a chain), picking sessions at random within it. With a
/// `rate`, the callers together send that many refreshes per second on a fixed schedule, and
/// each latency is measured from when its refresh was due (so a stall counts for every
/// refresh it delayed); without one, each caller sends its next refresh as soon as the last
/// one is answered.
async fn drive(
    url: &str,
    chains: &mut Chains,
    sessions: usize,
    seconds: u64,
    rate: Option<f64>,
) -> (Histogram<u64>, u64, f64) {
    let concurrency = chains.len();
    let channels: Vec<_> = futures_channels(url, 4).await;
    let histogram = Arc::new(Mutex::new(Histogram::<u64>::new(3).unwrap()));
    let failures = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let started = Instant::now();
    let deadline = started + Duration::from_secs(seconds);
    let mut tasks = Vec::new();
    for (worker, mut current) in std::mem::take(chains).into_iter().enumerate() {
        let mut client = channels[worker % channels.len()].clone();
        let histogram = histogram.clone();
        let failures = failures.clone();
        tasks.push(tokio::spawn(async move {
            let slice = sessions / concurrency;
            let mut local = Histogram::<u64>::new(3).unwrap();
            let mut state = 0x9E37_79B9_7F4A_7C15u64 ^ (worker as u64 + 1);
            let interval = rate.map(|r| Duration::from_secs_f64(concurrency as f64 / r));
            // Spread the callers' schedules over one interval.
            let mut due = started
                + interval.map_or(Duration::ZERO, |i| i * worker as u32 / concurrency as u32);
            while Instant::now() < deadline {
                if interval.is_some() {
                    tokio::time::sleep_until(due.into()).await;
                }
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let i = worker * slice + (state as usize % slice);
                let token = current.get(&i).cloned().unwrap_or_else(|| first_token(i));
                let sent = if interval.is_some() {
                    due
                } else {
                    Instant::now()
                };
                if let Some(interval) = interval {
                    due += interval;
                }
                match client
                    .refresh(pb::RefreshRequest {
                        refresh_token: token,
                        scopes: Vec::new(),
                    })
                    .await
                {
                    Ok(answer) => {
                        local.record(sent.elapsed().as_micros() as u64).unwrap();
                        current.insert(i, answer.into_inner().refresh_token);
                    }
                    Err(status) => {
                        if failures.fetch_add(1, std::sync::atomic::Ordering::Relaxed) == 0 {
                            eprintln!("refresh failed: {status:?}");
                        }
                    }
                }
            }
            histogram.lock().await.add(local).unwrap();
            current
        }));
    }
    for t in tasks {
        chains.push(t.await.unwrap());
    }
    let elapsed = started.elapsed().as_secs_f64();
    let histogram = Arc::try_unwrap(histogram).unwrap().into_inner();
    (
        histogram,
        failures.load(std::sync::atomic::Ordering::Relaxed),
        elapsed,
    )
}

async fn futures_channels(url: &str, n: usize) -> Vec<AuthorityClient<tonic::transport::Channel>> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(AuthorityClient::connect(url.to_owned()).await.unwrap());
    }
    out
}

async fn run(
    dir: &Path,
    batch: usize,
    chains: &mut Chains,
    sessions: usize,
    seconds: u64,
    rate: Option<f64>,
) {
    let mut config = Config::new(dir);
    config.session_batch = batch;
    let authority = Authority::open(config).expect("open the authority");
    let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", grpc.local_addr().unwrap());
    let stop = CancellationToken::new();
    let served = tokio::spawn(authority.serve(grpc, http, stop.clone()));
    let (h, failures, elapsed) = drive(&url, chains, sessions, seconds, rate).await;
    let (rss, peak) = memory();
    println!(
        "{}, {}: {} refreshes in {elapsed:.1} s = {:.0}/s, {failures} failed; latency p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, max {:.2} ms; store {:.0} MiB on disk; memory {rss:.0} MiB resident ({peak:.0} MiB peak)",
        if batch == 1 {
            "one commit per refresh"
        } else {
            "group commit"
        },
        match rate {
            Some(r) => format!("{} callers at {r:.0}/s offered", chains.len()),
            None => format!("{} callers flat out", chains.len()),
        },
        h.len(),
        h.len() as f64 / elapsed,
        h.value_at_quantile(0.50) as f64 / 1000.0,
        h.value_at_quantile(0.90) as f64 / 1000.0,
        h.value_at_quantile(0.99) as f64 / 1000.0,
        h.value_at_quantile(0.999) as f64 / 1000.0,
        h.max() as f64 / 1000.0,
        store_bytes(dir) as f64 / (1024.0 * 1024.0),
    );
    stop.cancel();
    let _ = served.await;
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg =
        |i: usize, default: usize| args.get(i).and_then(|a| a.parse().ok()).unwrap_or(default);
    let sessions = arg(1, 1_000_000);
    let seconds = arg(2, 20) as u64;
    let concurrency = arg(3, 64);
    let rate = arg(4, 2000) as f64;
    let mut chains: Chains = vec![HashMap::new(); concurrency];
    let dir = tempfile::tempdir().unwrap();
    let now = keyfleet_runtime::clock::system_now();
    fill(dir.path(), sessions, now);
    println!(
        "store after the fill: {:.0} MiB on disk",
        store_bytes(dir.path()) as f64 / (1024.0 * 1024.0)
    );
    let group = keyfleet_authority::sqlite::DEFAULT_MAX_BATCH;
    run(
        dir.path(),
        group,
        &mut chains,
        sessions,
        seconds,
        Some(rate),
    )
    .await;
    run(dir.path(), group, &mut chains, sessions, seconds, None).await;
    run(dir.path(), 1, &mut chains, sessions, seconds, Some(rate)).await;
    run(dir.path(), 1, &mut chains, sessions, seconds, None).await;
}
