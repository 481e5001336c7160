//! Criterion benches of the verify path (`cargo bench -p keyfleet-loadtest`): strict Ed25519
//! alone, `keyfleet_core::validate`, and a real verifier node in-process — uncached, answered
//! from the verified-token cache, through `VerifyBatch`'s batch verification, and single
//! `verify_token` calls for unique tokens from 1 and from 64 concurrent tasks (`concurrent`:
//! CPU time, so that adaptive batching of single calls shows as a ratio, 64 vs 1).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use ed25519_dalek::{Signer as _, SigningKey};
use keyfleet_core::{Jwk, KeySet, Policy, TokenClaims, sign_token, validate};
use keyfleet_loadtest::cluster::{ClusterOptions, LocalCluster};
use keyfleet_loadtest::cpu;
use keyfleet_proto::v1::VerifyRequest;

const BATCH: usize = 64;
/// Distinct tokens the concurrent bench cycles through: more than the tasks in flight, so
/// concurrent calls never carry the same token.
const UNIQUE: usize = 256;

fn claims(i: usize) -> TokenClaims {
    TokenClaims {
        iss: "https://issuer.bench".into(),
        sub: format!("user-{i}"),
        aud: vec!["orders".into()],
        iat: 1_700_000_000,
        nbf: 1_700_000_000,
        exp: 4_000_000_000,
        jti: format!("jti-{i}"),
        extra: Default::default(),
    }
}

fn pure(c: &mut Criterion) {
    let key = SigningKey::from_bytes(&[42; 32]);
    let public = key.verifying_key();
    let (keys, _) = KeySet::build(1, None, &[Jwk::ed25519("k1", &public.to_bytes())], [], []);
    let policy = Policy::new("https://issuer.bench");
    let token = sign_token(&key, "k1", &claims(0));
    let message =
        b"a message of a typical signing-input length, about two hundred bytes long .....";
    let signature = key.sign(message);

    let mut g = c.benchmark_group("pure");
    g.bench_function("ed25519_verify_strict", |b| {
        b.iter(|| public.verify_strict(message, &signature).is_ok())
    });
    g.bench_function("core_validate", |b| {
        b.iter(|| validate(&token, &keys, 1_800_000_000, &policy, Some("orders")).is_ok())
    });
    let messages: Vec<Vec<u8>> = (0..BATCH)
        .map(|i| format!("message {i}").into_bytes())
        .collect();
    let refs: Vec<&[u8]> = messages.iter().map(Vec::as_slice).collect();
    let sigs: Vec<_> = messages.iter().map(|m| key.sign(m)).collect();
    let publics = vec![public; BATCH];
    g.throughput(Throughput::Elements(BATCH as u64));
    g.bench_function("ed25519_verify_batch_64", |b| {
        b.iter(|| ed25519_dalek::verify_batch(&refs, &sigs, &publics).is_ok())
    });
    g.finish();
}

/// A real authority and one verifier on loopback on `servers`, and `n` tokens it minted.
fn start_node(servers: &tokio::runtime::Runtime, n: usize) -> (LocalCluster, Vec<String>) {
    servers.block_on(async {
        let cluster = LocalCluster::start(ClusterOptions {
            verifiers: 1,
            audiences: vec!["orders".into()],
            ..ClusterOptions::default()
        })
        .await
        .unwrap();
        let mut tokens = Vec::new();
        for i in 0..n {
            tokens.push(
                cluster
                    .issue(&format!("u{i}"), "orders")
                    .await
                    .unwrap()
                    .token,
            );
        }
        (cluster, tokens)
    })
}

fn node(c: &mut Criterion) {
    // A real authority and one verifier on loopback; the verifier is then called in-process.
    let servers = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let (cluster, tokens) = start_node(&servers, BATCH);
    let verifier = cluster.verifiers[0].verifier.clone().unwrap();
    let here = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let requests: Vec<VerifyRequest> = tokens
        .iter()
        .map(|t| VerifyRequest {
            token: t.clone(),
            audience: "orders".into(),
            ..Default::default()
        })
        .collect();

    let mut g = c.benchmark_group("node");
    let mut i = 0;
    verifier.set_cache_capacity(0);
    g.bench_function("verify_uncached", |b| {
        b.iter(|| {
            i = (i + 1) % tokens.len();
            here.block_on(verifier.verify_token(&tokens[i], "orders", Default::default()))
                .unwrap()
                .valid
        })
    });
    verifier.set_cache_capacity(1024);
    g.bench_function("verify_cache_hit", |b| {
        b.iter(|| {
            i = (i + 1) % tokens.len();
            here.block_on(verifier.verify_token(&tokens[i], "orders", Default::default()))
                .unwrap()
                .valid
        })
    });
    verifier.set_cache_capacity(0);
    g.throughput(Throughput::Elements(BATCH as u64));
    g.bench_function("verify_batch_64_uncached", |b| {
        b.iter(|| {
            here.block_on(verifier.verify_batch(&requests))
                .unwrap()
                .len()
        })
    });
    g.finish();
    servers.block_on(cluster.shutdown()).unwrap();
}

/// Single `Verifier::verify_token` calls (the path a `Verify` RPC takes) for unique tokens, from
/// N concurrent Tokio tasks (N = 1, 64) on a two-worker runtime like a `--local` node's. Each
/// task takes the next token and verifies it until the iteration's count is done, so N calls
/// are always in flight. The cache is off: every call checks its token in full, as for a token
/// never seen. Timed by the CPU time of every thread of this process (`/proc`), not the wall
/// clock: with N = 64 two workers would halve wall time without any saving. So
/// `concurrent/verify_token_unique/64` ÷ `…/1` is what batching concurrent calls saves per
/// token (1.0: nothing).
fn concurrent(c: &mut Criterion) {
    let servers = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let (cluster, tokens) = start_node(&servers, UNIQUE);
    let tokens: Arc<[String]> = tokens.into();
    let verifier = cluster.verifiers[0].verifier.clone().unwrap();
    verifier.set_cache_capacity(0);
    let callers = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();

    let mut g = c.benchmark_group("concurrent");
    g.throughput(Throughput::Elements(1));
    for tasks in [1usize, 64] {
        g.bench_with_input(
            BenchmarkId::new("verify_token_unique", tasks),
            &tasks,
            |b, &tasks| {
                b.iter_custom(|iters| {
                    let before = cpu::threads_cpu_ns("").unwrap();
                    callers.block_on(async {
                        let next = Arc::new(AtomicU64::new(0));
                        let mut set = tokio::task::JoinSet::new();
                        for _ in 0..tasks {
                            let (next, tokens, verifier) =
                                (next.clone(), tokens.clone(), verifier.clone());
                            set.spawn(async move {
                                loop {
                                    let i = next.fetch_add(1, Ordering::Relaxed);
                                    if i >= iters {
                                        break;
                                    }
                                    let token = &tokens[i as usize % tokens.len()];
                                    let answer = verifier
                                        .verify_token(token, "orders", Default::default())
                                        .await;
                                    assert!(answer.unwrap().valid);
                                }
                            });
                        }
                        while set.join_next().await.is_some() {}
                    });
                    Duration::from_nanos(cpu::threads_cpu_ns("").unwrap() - before)
                })
            },
        );
    }
    g.finish();
    servers.block_on(cluster.shutdown()).unwrap();
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    targets = pure, node, concurrent
}
criterion_main!(benches);
