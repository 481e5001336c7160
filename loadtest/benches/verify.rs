//! Criterion benches of the verify path (`cargo bench -p keyfleet-loadtest`): strict Ed25519
//! alone, `keyfleet_core::validate`, and a real verifier node in-process — uncached, answered
//! from the verified-token cache, and through `VerifyBatch`'s batch verification.

use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use ed25519_dalek::{Signer as _, SigningKey};
use keyfleet_core::{Jwk, KeySet, Policy, TokenClaims, sign_token, validate};
use keyfleet_loadtest::cluster::{ClusterOptions, LocalCluster};
use keyfleet_proto::v1::VerifyRequest;

const BATCH: usize = 64;

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

fn node(c: &mut Criterion) {
    // A real authority and one verifier on loopback; the verifier is then called in-process.
    let servers = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let (cluster, tokens) = servers.block_on(async {
        let cluster = LocalCluster::start(ClusterOptions {
            verifiers: 1,
            audiences: vec!["orders".into()],
            ..ClusterOptions::default()
        })
        .await
        .unwrap();
        let mut tokens = Vec::new();
        for i in 0..BATCH {
            tokens.push(
                cluster
                    .issue(&format!("u{i}"), "orders")
                    .await
                    .unwrap()
                    .token,
            );
        }
        (cluster, tokens)
    });
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
        })
        .collect();

    let mut g = c.benchmark_group("node");
    let mut i = 0;
    verifier.set_cache_capacity(0);
    g.bench_function("verify_uncached", |b| {
        b.iter(|| {
            i = (i + 1) % tokens.len();
            here.block_on(verifier.verify_token(&tokens[i], "orders"))
                .unwrap()
                .valid
        })
    });
    verifier.set_cache_capacity(1024);
    g.bench_function("verify_cache_hit", |b| {
        b.iter(|| {
            i = (i + 1) % tokens.len();
            here.block_on(verifier.verify_token(&tokens[i], "orders"))
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

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    targets = pure, node
}
criterion_main!(benches);
