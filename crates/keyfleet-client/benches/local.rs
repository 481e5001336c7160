//! What a verdict costs in-process: `keyfleet_core::validate` alone (the floor), then
//! `LocalVerifier` (the verifier node's decision path in this process: key set in use, stale
//! check, verified-token cache, combiner, answer) with its cache off (every call checks the
//! signature, as `validate` does) and on (a token seen before), and through `TokenVerifier`
//! (the claims parsed for the caller). One token, one task.
//!
//! `cargo bench -p keyfleet-client --bench local`

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use ed25519_dalek::SigningKey;
use keyfleet_client::{Demands, LocalVerifier, TokenVerifier};
use keyfleet_core::jwk::thumbprint;
use keyfleet_core::{Jwk, KeySet, Policy, TokenClaims, sign_token, validate};
use keyfleet_verifier::{Config, Source};
use tokio::time::Instant;

const ISSUER: &str = "https://auth.bench";

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let key = SigningKey::from_bytes(&[3; 32]);
    let kid = thumbprint(&key.verifying_key().to_bytes());
    let jwk = Jwk::ed25519(&kid, &key.verifying_key().to_bytes());
    let now = keyfleet_runtime::Clock::system().now();
    let mut extra = serde_json::Map::new();
    extra.insert("scope".into(), "read write".into());
    let token = sign_token(
        &key,
        &kid,
        &TokenClaims {
            iss: ISSUER.into(),
            sub: "alice".into(),
            aud: vec!["api".into()],
            iat: now,
            nbf: now,
            exp: now + 3600,
            jti: "bench".into(),
            extra,
        },
    );
    let jwks = serde_json::json!({ "keys": [jwk] }).to_string();
    let (local, _server) = rt.block_on(async {
        let router = axum::Router::new().route(
            "/jwks.json",
            axum::routing::get(move || {
                let body = jwks.clone();
                async move { body }
            }),
        );
        let (addr, server) = keyfleet_testkit::serve::http(router).await;
        let config = Config {
            issuer: Some(ISSUER.into()),
            ..Config::for_test(Source::JwksUrl {
                url: format!("http://{addr}/jwks.json"),
            })
        };
        let local = LocalVerifier::start(config).await.unwrap();
        local.wait_ready(Duration::from_secs(10)).await.unwrap();
        (local, server)
    });
    let (keys, _) = KeySet::build(0, Some(ISSUER.into()), [&jwk], [], []);
    let policy = Policy {
        max_lifetime: Some(24 * 3600),
        ..Policy::new(ISSUER)
    };
    let none = Demands::none();

    let mut group = c.benchmark_group("verdict");
    group.bench_function("core_validate", |b| {
        b.iter(|| black_box(validate(black_box(&token), &keys, now, &policy, None)))
    });
    let timed = |local: &LocalVerifier, iters: u64, claims: bool| {
        rt.block_on(async {
            let start = Instant::now();
            for _ in 0..iters {
                if claims {
                    black_box(
                        TokenVerifier::verify(local, black_box(&token), &none)
                            .await
                            .unwrap(),
                    );
                } else {
                    black_box(local.verify_raw(black_box(&token), &none).await.unwrap());
                }
            }
            start.elapsed()
        })
    };
    local.node().set_cache_capacity(0);
    group.bench_function("local_uncached", |b| {
        b.iter_custom(|n| timed(&local, n, false))
    });
    group.bench_function("local_uncached_claims", |b| {
        b.iter_custom(|n| timed(&local, n, true))
    });
    local.node().set_cache_capacity(16_384);
    group.bench_function("local_cached", |b| {
        b.iter_custom(|n| timed(&local, n, false))
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
