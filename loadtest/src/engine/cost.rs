//! The server-cost measurements of `--local` runs (how server cost is measured:
//! docs/perf.md): after the load, the same load shape replayed as the empty gRPC call, as `Verify`
//! and `VerifyBatch` with every node's cache off, as `Verify` of tokens no node has seen (caches
//! on), and one thread calling a node's verify path and a strict Ed25519 check in-process; each
//! timed by the CPU clock of the threads that did the work.

use std::future::Future;
use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use ed25519_dalek::{Signature, Signer as _, SigningKey};
use keyfleet_authority::client::AdminClient;
use keyfleet_proto::v1::verifier_client::VerifierClient;
use keyfleet_proto::v1::{VerifyBatchRequest, VerifyRequest};
use keyfleet_verifier::Verifier;
use rand::Rng as _;
use tokio::time::Instant;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

use super::schedule::schedule;
use super::state::{Shared, read};
use super::{Load, LoadOptions, SERVER_THREADS, tokens};
use crate::cluster::Node;
use crate::cpu;
use crate::report::Efficiency;

/// Tokens per `VerifyBatch` in the batch measurement.
const BATCH: usize = 64;
/// Each in-process figure loops for at least this long, so the thread's CPU clock (updated by
/// the scheduler every few ms) is read precisely enough.
const INPROCESS_MIN: Duration = Duration::from_millis(300);
/// Fresh tokens minted for the unique-token phase: about what the uncached phase answered
/// (the same work per answer) plus a margin, within these bounds.
const UNIQUE_MIN: usize = 1_000;
const UNIQUE_MAX: usize = 60_000;

/// The cost section before anything is measured (all a remote run can have).
pub(super) fn unmeasured() -> Efficiency {
    Efficiency {
        batch_size: BATCH,
        method: "remote verifiers: server CPU is not measurable from the client; run with --local for the efficiency figures".into(),
        ..Efficiency::default()
    }
}

/// Cache (hits, misses) summed over the local verifiers since they started; `None` when a
/// node has no in-process handle.
pub(super) fn cache_counts(nodes: &[Node]) -> Option<(u64, u64)> {
    nodes.iter().try_fold((0, 0), |(hits, misses), node| {
        let v = node.verifier.as_ref()?;
        Some((hits + v.cache_hits(), misses + v.cache_misses()))
    })
}

/// After the load: the empty-call cost, the uncached, batched and unique-token server cost,
/// and the in-process costs, each under the run's load shape. `authority` mints the unique
/// tokens.
pub(super) async fn measure_cost(
    shared: &Arc<Shared>,
    options: &LoadOptions,
    verifiers: &[(String, Verifier)],
    authority: &AdminClient,
    cost: &mut Efficiency,
) {
    let phase = (options.duration / 6).clamp(Duration::from_millis(800), Duration::from_secs(3));
    let load = options.load;
    let valid: Vec<String> = read(&shared.pool)
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
        Some(async move {
            h.check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .map(|_| 1)
            .unwrap_or(0)
        })
    })
    .await
    .per_unit;

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
    let uncached = server_cost(load, phase, move |i| {
        let mut c = c1[i % c1.len()].clone();
        let req = VerifyRequest {
            token: v1[i % v1.len()].clone(),
            audience: aud.clone(),
            ..Default::default()
        };
        Some(async move { c.verify(req).await.map(|_| 1).unwrap_or(0) })
    })
    .await;
    cost.server_cpu_us_per_verify_uncached = uncached.per_unit;
    let (c2, v2, aud) = (clients.clone(), valid.clone(), shared.audience.clone());
    // A batch carries BATCH tokens: fewer calls for the same tokens per second, or fewer in
    // flight, so the nodes see about the same work as in the one-by-one phase.
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
                ..Default::default()
            })
            .collect();
        Some(async move {
            c.verify_batch(VerifyBatchRequest { requests })
                .await
                .map(|r| r.into_inner().responses.len() as u64)
                .unwrap_or(0)
        })
    })
    .await
    .per_unit;

    // Caches back as the run had them; every token new to every node: minted now, each sent
    // once. A phase that runs out of tokens idles to its end (its answers are still counted
    // right); the uncached phase did the same work per answer, so its count sizes the mint.
    for ((_, v), cap) in verifiers.iter().zip(&saved) {
        v.set_cache_capacity(*cap);
    }
    let wanted = (uncached.units as usize)
        .saturating_mul(5)
        .div_ceil(4)
        .clamp(UNIQUE_MIN, UNIQUE_MAX);
    let fresh: Arc<[String]> = tokens::mint_unique(authority, &shared.audience, wanted)
        .await
        .into();
    if !fresh.is_empty() {
        let (c3, aud) = (clients, shared.audience.clone());
        let unique = server_cost(load, phase, move |i| {
            let token = fresh.get(i)?.clone();
            let mut c = c3[i % c3.len()].clone();
            let req = VerifyRequest {
                token,
                audience: aud.clone(),
                ..Default::default()
            };
            Some(async move { c.verify(req).await.map(|_| 1).unwrap_or(0) })
        })
        .await;
        cost.server_cpu_us_per_verify_unique = unique.per_unit;
        cost.unique_tokens = unique.units;
    }

    // In-process, on one core: the run's mix (cache back on, warm), uncached, hits, batches.
    let mix: Vec<String> = {
        let pool = read(&shared.pool);
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
        if let Some(m) = measured {
            cost.inprocess_verify_uncached_us = Some(m.uncached);
            cost.inprocess_batch_us = Some(m.batch);
            cost.inprocess_cache_hit_us = Some(m.hit);
            cost.inprocess_verify_us = Some(m.mixed);
            cost.inprocess_strict_verify_us = Some(m.strict);
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
same load shape; uncached and batch = the same with every node's cache off; unique = the same \
with the caches on and every token minted after the load and sent once; in-process = one thread \
calling the verifier's verify path, or ed25519-dalek's verify_strict over the tokens' signing \
inputs, directly (CPU time of that thread ÷ tokens)."
            .into();
}

/// What one cost phase measured.
struct Phase {
    /// Server CPU (µs) per unit of work; `None` without `/proc` or without any work done.
    per_unit: Option<f64>,
    /// Units of work done (answers, tokens).
    units: u64,
}

/// Server CPU per unit of work while `call(i)` runs under `load` for `phase` (`None`: nothing
/// to send for slot `i`).
async fn server_cost<F, Fut>(load: Load, phase: Duration, call: F) -> Phase
where
    F: Fn(usize) -> Option<Fut> + Send + Sync + 'static,
    Fut: Future<Output = u64> + Send + 'static,
{
    let before = cpu::threads_cpu_ns(SERVER_THREADS);
    let end = Instant::now() + phase;
    let units = schedule(load, end, move |slot| call(slot.index)).await;
    let after = cpu::threads_cpu_ns(SERVER_THREADS);
    let per_unit = match (before, after) {
        (Some(b), Some(a)) if units > 0 => Some(a.saturating_sub(b) as f64 / 1000.0 / units as f64),
        _ => None,
    };
    Phase { per_unit, units }
}

/// In-process µs per token, each on one thread.
struct InProcess {
    uncached: f64,
    batch: f64,
    hit: f64,
    mixed: f64,
    /// ed25519-dalek's `verify_strict` alone.
    strict: f64,
}

/// On this (fresh) thread: µs per token uncached, batched, from the cache, over the run's mix,
/// and of a strict signature check alone. Each figure loops over its tokens for at least
/// [`INPROCESS_MIN`].
fn inprocess(
    node: &Verifier,
    audience: &str,
    mix: &[String],
    valid: &[String],
    capacity: usize,
) -> Option<InProcess> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .ok()?;
    let requests: Vec<VerifyRequest> = valid
        .iter()
        .map(|t| VerifyRequest {
            token: t.clone(),
            audience: audience.to_owned(),
            ..Default::default()
        })
        .collect();
    rt.block_on(async {
        // Uncached: every token fully checked.
        node.set_cache_capacity(0);
        let uncached = per_token(valid.len(), || async {
            for t in valid {
                let _ = node.verify_token(t, audience, Default::default()).await;
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
                let _ = node.verify_token(t, audience, Default::default()).await;
            }
        })
        .await?;
        node.set_cache_capacity(capacity);
        let mixed = per_token(mix.len(), || async {
            for t in mix {
                let _ = node.verify_token(t, audience, Default::default()).await;
            }
        })
        .await?;
        // The reference: a strict check of a signature over each token's signing input, by a
        // key decompressed beforehand (as a node holds its keys).
        let key = SigningKey::from_bytes(&rand::rng().random());
        let public = key.verifying_key();
        let signed: Vec<(&[u8], Signature)> = valid
            .iter()
            .filter_map(|t| t.rsplit_once('.'))
            .map(|(input, _)| (input.as_bytes(), key.sign(input.as_bytes())))
            .collect();
        let strict = per_token(signed.len(), || async {
            for (message, signature) in &signed {
                black_box(public.verify_strict(black_box(message), black_box(signature))).ok();
            }
        })
        .await?;
        Some(InProcess {
            uncached,
            batch,
            hit,
            mixed,
            strict,
        })
    })
}

/// CPU µs of this thread per token, repeating `round` (of `n` tokens) for at least
/// [`INPROCESS_MIN`].
async fn per_token<F, Fut>(n: usize, round: F) -> Option<f64>
where
    F: Fn() -> Fut,
    Fut: Future<Output = ()>,
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
