//! Concurrent single `Verify` calls checked as one Ed25519 batch (issue 14): many requests at
//! once on a node that batches get, one by one, the answers a node that does not batch gives
//! (the hostile corpus; random mixes of valid and invalid tokens, with small-order `R`s,
//! unreduced `S`s and keys carrying a small-order component), in process and over a real
//! gRPC socket, with batches larger than one proven by counting; and a lone request is never
//! held back waiting for others, also proven by counting. Both nodes run without the
//! verified-token cache, so every request reaches the signature check.
//! (The Wycheproof vectors are not tokens: `node/signatures.rs`'s unit tests run them through
//! the same batched check.)

use std::collections::HashMap;

use keyfleet_verifier::{BatchCounts, MAX_VERIFY_BATCH_WINDOW, Verifier};
use sha2::{Digest, Sha512};

use super::*;

const CORPUS: &str = include_str!("../../../keyfleet-core/tests/data/hostile_corpus.json");

/// A verifier built in this process (so its batch counts can be read) and serving, so that it
/// fetches its keys and answers over gRPC too.
struct InProcess {
    verifier: Verifier,
    served: Pair,
}

impl InProcess {
    async fn start(config: Config) -> InProcess {
        keyfleet_runtime::telemetry::test_init();
        let verifier = Verifier::open(config).await.unwrap();
        let serving = verifier.clone();
        let served =
            Pair::start(move |grpc, http, shutdown| serving.serve(grpc, http, shutdown)).await;
        eventually("node ready", || {
            let ready = verifier.is_ready();
            async move { ready }
        })
        .await;
        InProcess { verifier, served }
    }

    /// Answers every request at once, each from its own task.
    async fn concurrently(&self, requests: &[(String, String)]) -> Vec<VerifyResponse> {
        let tasks: Vec<_> = requests
            .iter()
            .cloned()
            .map(|(token, audience)| {
                let verifier = self.verifier.clone();
                tokio::spawn(async move {
                    verifier
                        .verify_token(&token, &audience, Default::default())
                        .await
                        .unwrap()
                })
            })
            .collect();
        let mut answers = Vec::with_capacity(tasks.len());
        for task in tasks {
            answers.push(task.await.unwrap());
        }
        answers
    }
}

/// A node that batches (the defaults) and one that does not, both over `jwks`, without the
/// verified-token cache.
async fn pair_of_nodes(jwks: &FakeJwks, edit: impl Fn(&mut Config)) -> (InProcess, InProcess) {
    let config = |max| {
        let mut config = Config {
            issuer: Some(ISSUER.into()),
            clock: Clock::manual(NOW),
            cache_entries: 0,
            verify_batch_max: max,
            ..Config::for_test(Source::JwksUrl {
                url: jwks.url.clone(),
            })
        };
        edit(&mut config);
        config
    };
    let batching = InProcess::start(config(keyfleet_verifier::DEFAULT_VERIFY_BATCH_MAX)).await;
    let plain = InProcess::start(config(1)).await;
    (batching, plain)
}

/// What the plain node answers for every distinct request, one at a time.
async fn plain_answers(
    plain: &InProcess,
    requests: &[(String, String)],
) -> HashMap<(String, String), VerifyResponse> {
    let mut answers = HashMap::new();
    for request in requests {
        if !answers.contains_key(request) {
            let answer = plain
                .verifier
                .verify_token(&request.0, &request.1, Default::default())
                .await
                .unwrap();
            answers.insert(request.clone(), answer);
        }
    }
    assert_eq!(
        plain.verifier.verify_batches(),
        BatchCounts::default(),
        "the plain node never batches"
    );
    answers
}

/// Sends `requests` (shuffled, `rounds` times) to `batching` all at once and compares every
/// answer with the plain node's, except for the requests `exempt` names. Returns the batch
/// counts of those rounds.
async fn compare(
    batching: &InProcess,
    plain: &HashMap<(String, String), VerifyResponse>,
    requests: &[(String, String)],
    exempt: impl Fn(&(String, String)) -> bool,
    rounds: usize,
) -> BatchCounts {
    let before = batching.verifier.verify_batches();
    let mut order = requests.to_vec();
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    for _ in 0..rounds {
        for i in (1..order.len()).rev() {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            order.swap(i, (rng % (i as u64 + 1)) as usize);
        }
        let answers = batching.concurrently(&order).await;
        let mut wrong = Vec::new();
        for (request, answer) in order.iter().zip(answers) {
            if !exempt(request) && answer != plain[request] {
                wrong.push(format!(
                    "{request:?}:\n  batched {answer:?}\n  plain   {:?}",
                    plain[request]
                ));
            }
        }
        assert!(
            wrong.is_empty(),
            "{} answers differ:\n{}",
            wrong.len(),
            wrong.join("\n")
        );
    }
    let after = batching.verifier.verify_batches();
    let counts = BatchCounts {
        batches: after.batches - before.batches,
        requests: after.requests - before.requests,
        waits: after.waits - before.waits,
        fallbacks: after.fallbacks - before.fallbacks,
    };
    assert_eq!(
        counts.requests,
        (requests.len() * rounds) as u64,
        "every request was checked by the combiner"
    );
    assert!(
        counts.requests > counts.batches,
        "batches of more than one request formed: {counts:?}"
    );
    counts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_verdicts_equal_the_plain_path_over_the_hostile_corpus() {
    let corpus: serde_json::Value = serde_json::from_str(CORPUS).unwrap();
    let jwks = FakeJwks::start(200, corpus["jwks"].as_str().unwrap().to_owned()).await;
    let (batching, plain) = pair_of_nodes(&jwks, |config| {
        config.issuer = Some(corpus["issuer"].as_str().unwrap().to_owned());
        config.leeway = Duration::from_secs(corpus["leeway"].as_u64().unwrap());
        config.max_token_bytes = corpus["max_token_bytes"].as_u64().unwrap() as usize;
        config.max_lifetime = Some(Duration::from_secs(
            corpus["max_lifetime"].as_u64().unwrap(),
        ));
        config.clock = Clock::manual(corpus["now"].as_i64().unwrap());
    })
    .await;
    let cases = corpus["cases"].as_array().unwrap();
    let requests: Vec<(String, String)> = cases
        .iter()
        .map(|c| {
            (
                c["token"].as_str().unwrap().to_owned(),
                c["audience"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let answers = plain_answers(&plain, &requests).await;
    // The plain path is the corpus's expectation.
    for (case, request) in cases.iter().zip(&requests) {
        let answer = &answers[request];
        let want = case["expect"].as_str().unwrap();
        assert_eq!(
            answer.reason().as_str_name(),
            want,
            "{} / {}",
            case["class"],
            case["name"]
        );
    }
    let counts = compare(&batching, &answers, &requests, |_| false, 3).await;
    assert!(
        counts.fallbacks > 0,
        "forged signatures sat in batches with good ones: {counts:?}"
    );
    batching.served.stop().await;
    plain.served.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Tokens with small-order components (what only a key's owner can make)

/// `sum(bytes[i] * 256^i) mod l` in curve25519-dalek's `Scalar` (the type of `like`).
fn reduce<S>(bytes: &[u8], like: S) -> S
where
    S: Copy + From<u64> + std::ops::Mul<Output = S> + std::ops::Add<Output = S>,
{
    let _ = like;
    bytes.iter().rev().fold(S::from(0), |acc, &b| {
        acc * S::from(256) + S::from(u64::from(b))
    })
}

/// `multiple` times the point of order 8 (`multiple` 0 is the identity).
fn torsion(multiple: u8) -> ed25519_dalek::VerifyingKey {
    const ORDER_8: [u8; 32] = [
        0x26, 0xe8, 0x95, 0x8f, 0xc2, 0xb2, 0x27, 0xb0, 0x45, 0xc3, 0xf4, 0x89, 0xf2, 0xef, 0x98,
        0xf0, 0xd5, 0xdf, 0xac, 0x05, 0xd3, 0xc6, 0x33, 0x39, 0xb1, 0x38, 0x02, 0x88, 0x6d, 0x53,
        0xfc, 0x05,
    ];
    let eight = ed25519_dalek::VerifyingKey::from_bytes(&ORDER_8)
        .unwrap()
        .to_edwards();
    let mut identity = [0u8; 32];
    identity[0] = 1;
    let mut point = ed25519_dalek::VerifyingKey::from_bytes(&identity)
        .unwrap()
        .to_edwards();
    for _ in 0..multiple {
        point += eight;
    }
    ed25519_dalek::VerifyingKey::from_bytes(&point.compress().to_bytes()).unwrap()
}

/// `key`'s public key plus a small-order point: a key `jwk::screen` lets through.
fn with_torsion(key: &SigningKey, multiple: u8) -> ed25519_dalek::VerifyingKey {
    let point = key.verifying_key().to_edwards() + torsion(multiple).to_edwards();
    ed25519_dalek::VerifyingKey::from_bytes(&point.compress().to_bytes()).unwrap()
}

/// `token` re-signed by `owner` as the holder of `published` (which may carry a small-order
/// component), with `R` = `r·B` + `torsion(r_torsion)`.
fn crafted(
    token: &str,
    owner: &SigningKey,
    published: &ed25519_dalek::VerifyingKey,
    nonce: u8,
    r_torsion: u8,
) -> String {
    let input = &token[..token.rfind('.').unwrap()];
    let a = owner.to_scalar();
    let nonce = SigningKey::from_bytes(&[nonce; 32]);
    let big_r = (nonce.verifying_key().to_edwards() + torsion(r_torsion).to_edwards())
        .compress()
        .to_bytes();
    let hash = Sha512::new()
        .chain_update(big_r)
        .chain_update(published.as_bytes())
        .chain_update(input)
        .finalize();
    let s = nonce.to_scalar() + reduce(&hash, a) * a;
    let mut sig = big_r.to_vec();
    sig.extend_from_slice(&s.to_bytes());
    format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig))
}

/// `token` with its signature bytes changed by `edit`.
fn resigned(token: &str, edit: impl FnOnce(&mut [u8; 64])) -> String {
    let cut = token.rfind('.').unwrap();
    let mut sig: [u8; 64] = URL_SAFE_NO_PAD
        .decode(&token[cut + 1..])
        .unwrap()
        .try_into()
        .unwrap();
    edit(&mut sig);
    format!("{}.{}", &token[..cut], URL_SAFE_NO_PAD.encode(sig))
}

/// Valid and invalid tokens of every kind, sent many at once: each answer is the plain node's.
/// Signatures under keys with a small-order component (some of which the strict check
/// accepts) are never batched; a small-order `R` or an unreduced `S` is screened first; a
/// forged signature sends its batch to one-by-one checks. The tokens whose `R` carries a
/// small-order component under a clean key (ARCHITECTURE's invariant 6: a batch may accept
/// them, only the key's owner can make them) ride along and change no other answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_verdicts_equal_the_plain_path_for_random_mixes() {
    let (k1, k2, stranger) = (key(1), key(2), key(3));
    let owners: Vec<(Key, u8)> = [(11u8, 1u8), (12, 2), (13, 4)]
        .into_iter()
        .map(|(seed, m)| (key(seed), m))
        .collect();
    let mut jwks = vec![
        serde_json::to_value(k1.jwk()).unwrap(),
        serde_json::to_value(k2.jwk()).unwrap(),
    ];
    for (i, (owner, multiple)) in owners.iter().enumerate() {
        let published = with_torsion(&owner.signing, *multiple);
        jwks.push(
            serde_json::to_value(Jwk::ed25519(&format!("mixed-{i}"), &published.to_bytes()))
                .unwrap(),
        );
    }
    let jwks = FakeJwks::start(200, jwks_json(&jwks)).await;
    let (batching, plain) = pair_of_nodes(&jwks, |_| {}).await;

    let named = |key: &Key, kid: &str, sub: String| {
        token_as(key, kid, NOW, |c| {
            c.jti = format!("jti-{sub}");
            c.sub = sub;
        })
    };
    let mut requests: Vec<(String, String)> = Vec::new();
    let mut push = |token: String, audience: &str| requests.push((token, audience.to_owned()));
    for i in 0..40 {
        let good = named(&k1, &k1.kid, format!("k1-{i}"));
        push(good.clone(), if i % 2 == 0 { "api" } else { "" });
        // A bit flipped anywhere in the signature.
        push(resigned(&good, |s| s[(i * 7) % 64] ^= 1 << (i % 8)), "");
        if i % 4 == 0 {
            push(named(&k2, &k2.kid, format!("k2-{i}")), "");
            push(named(&stranger, &k1.kid, format!("stranger-{i}")), "");
            push(good.clone(), "other");
            let expired = token_as(&k1, &k1.kid, NOW - 3_600, |c| c.sub = format!("old-{i}"));
            push(expired, "");
        }
    }
    push(named(&k1, "no-such-kid", "unknown".into()), "");
    // R of small order (every encoding, both signs), or y = p; S + l.
    let good = named(&k1, &k1.kid, "screened".into());
    for multiple in 0..8 {
        for sign in [0, 0x80] {
            let mut r = torsion(multiple).to_bytes();
            r[31] ^= sign;
            push(resigned(&good, |s| s[..32].copy_from_slice(&r)), "");
        }
    }
    push(
        resigned(&good, |s| {
            s[..32].fill(0xff);
            s[0] = 0xed;
            s[31] = 0x7f;
        }),
        "",
    );
    const L: [u8; 32] = [
        0xed, 0xd3, 0xf5, 0x5c, 0x1a, 0x63, 0x12, 0x58, 0xd6, 0x9c, 0xf7, 0xa2, 0xde, 0xf9, 0xde,
        0x14, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10,
    ];
    push(
        resigned(&good, |s| {
            let mut carry = 0u16;
            for (i, l) in L.iter().enumerate() {
                let sum = u16::from(s[32 + i]) + u16::from(*l) + carry;
                s[32 + i] = sum as u8;
                carry = sum >> 8;
            }
        }),
        "",
    );
    // Keys with a small-order component: their owners' tokens with every small-order R.
    let mut mixed = std::collections::HashSet::new();
    for (i, (owner, multiple)) in owners.iter().enumerate() {
        let published = with_torsion(&owner.signing, *multiple);
        for nonce in 0..4u8 {
            let token = named(owner, &format!("mixed-{i}"), format!("mixed-{i}-{nonce}"));
            for r_torsion in 0..8 {
                let token = crafted(&token, &owner.signing, &published, 100 + nonce, r_torsion);
                mixed.insert(token.clone());
                push(token, "");
            }
        }
    }
    // R with a small-order component under a clean key: exempt from the comparison.
    let mut exempt = std::collections::HashSet::new();
    for i in 0..8u8 {
        let token = named(&k1, &k1.kid, format!("torsion-r-{i}"));
        let token = crafted(
            &token,
            &k1.signing,
            &k1.signing.verifying_key(),
            50 + i,
            1 + i % 7,
        );
        exempt.insert(token.clone());
        push(token, "");
    }

    let answers = plain_answers(&plain, &requests).await;
    let valid = answers.values().filter(|a| a.valid).count();
    let mixed_valid = answers
        .iter()
        .filter(|((t, _), a)| a.valid && mixed.contains(t))
        .count();
    assert!(
        valid > 40 && mixed_valid > 0,
        "valid {valid}, under keys with torsion {mixed_valid}"
    );
    for token in &exempt {
        assert_eq!(
            answers[&(token.clone(), String::new())].reason(),
            Reason::BadSignature
        );
    }
    let counts = compare(
        &batching,
        &answers,
        &requests,
        |(t, _)| exempt.contains(t),
        4,
    )
    .await;
    assert!(counts.fallbacks > 0, "{counts:?}");
    batching.served.stop().await;
    plain.served.stop().await;
}

/// Over a real gRPC socket: many requests in flight on one connection form batches, and every
/// answer is the plain node's.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn batches_form_over_a_real_grpc_socket() {
    let k = key(1);
    let jwks = FakeJwks::start(200, jwks_json(&[serde_json::to_value(k.jwk()).unwrap()])).await;
    let (batching, plain) = pair_of_nodes(&jwks, |_| {}).await;
    let requests: Vec<(String, String)> = (0..512)
        .map(|i| {
            let token = token_as(&k, &k.kid, NOW, |c| c.sub = format!("user-{i}"));
            let token = if i % 5 == 0 {
                resigned(&token, |s| s[10] ^= 4)
            } else {
                token
            };
            (token, String::new())
        })
        .collect();
    let answers = plain_answers(&plain, &requests).await;
    let client = VerifierClient::new(grpc::lazy_channel(batching.served.grpc));
    let before = batching.verifier.verify_batches();
    let calls: Vec<_> = requests
        .iter()
        .cloned()
        .map(|(token, audience)| {
            let mut client = client.clone();
            tokio::spawn(async move {
                client
                    .verify(VerifyRequest {
                        token,
                        audience,
                        ..Default::default()
                    })
                    .await
                    .unwrap()
                    .into_inner()
            })
        })
        .collect();
    for (request, call) in requests.iter().zip(calls) {
        assert_eq!(call.await.unwrap(), answers[request]);
    }
    let after = batching.verifier.verify_batches();
    let (batches, checked) = (
        after.batches - before.batches,
        after.requests - before.requests,
    );
    assert_eq!(checked, 512);
    assert!(
        checked > batches,
        "batches of more than one formed: {batches} batches"
    );
    batching.served.stop().await;
    plain.served.stop().await;
}

/// With one request in flight at a time the leader never waits, even with the longest window,
/// and every batch holds one request: counted, not timed, in process and over gRPC.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_window_never_delays_a_lone_request() {
    let k = key(1);
    let jwks = FakeJwks::start(200, jwks_json(&[serde_json::to_value(k.jwk()).unwrap()])).await;
    let node = InProcess::start(Config {
        issuer: Some(ISSUER.into()),
        clock: Clock::manual(NOW),
        cache_entries: 0,
        verify_batch_window: MAX_VERIFY_BATCH_WINDOW,
        ..Config::for_test(Source::JwksUrl {
            url: jwks.url.clone(),
        })
    })
    .await;
    let tokens: Vec<String> = (0..40)
        .map(|i| {
            let token = token_as(&k, &k.kid, NOW, |c| c.sub = format!("user-{i}"));
            if i % 3 == 0 {
                resigned(&token, |s| s[1] ^= 1)
            } else {
                token
            }
        })
        .collect();
    let mut client = VerifierClient::new(grpc::lazy_channel(node.served.grpc));
    for (i, token) in tokens.iter().enumerate() {
        let answer = if i % 2 == 0 {
            node.verifier
                .verify_token(token, "", Default::default())
                .await
                .unwrap()
        } else {
            let request = VerifyRequest {
                token: token.clone(),
                audience: String::new(),
                ..Default::default()
            };
            client.verify(request).await.unwrap().into_inner()
        };
        assert_eq!(answer.valid, i % 3 != 0);
    }
    assert_eq!(
        node.verifier.verify_batches(),
        BatchCounts {
            batches: 40,
            requests: 40,
            waits: 0,
            fallbacks: 0
        }
    );
    // The metrics say the same.
    let text = http::get(node.served.http, "/metrics").await.body;
    for line in [
        "keyfleet_verify_batch_size_count 40",
        "keyfleet_verify_batch_size_sum 40.0",
        "keyfleet_verify_batch_size_bucket{le=\"1.0\"} 40",
        "keyfleet_verify_batch_waits_total 0",
        "keyfleet_verify_batch_fallbacks_total 0",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "{line} missing from\n{text}"
        );
    }
    node.served.stop().await;
}

#[test]
fn batch_settings_are_checked_before_anything_starts() {
    let base = || Config {
        any_audience: true,
        ..Config::new(nowhere())
    };
    assert_eq!(base().verify_batch_max, 64);
    assert_eq!(base().verify_batch_window, Duration::from_micros(50));
    for (max, window) in [
        (1, Duration::ZERO),
        (keyfleet_verifier::MAX_BATCH, MAX_VERIFY_BATCH_WINDOW),
    ] {
        let config = Config {
            verify_batch_max: max,
            verify_batch_window: window,
            ..base()
        };
        config.check().unwrap();
    }
    for (max, window, error) in [
        (0, Duration::ZERO, "--verify-batch-max may not be zero"),
        (
            1025,
            Duration::ZERO,
            "--verify-batch-max 1025 is more than 1024",
        ),
        (
            64,
            MAX_VERIFY_BATCH_WINDOW + Duration::from_nanos(1),
            "--verify-batch-window 10.000001ms is longer than 10ms",
        ),
    ] {
        let config = Config {
            verify_batch_max: max,
            verify_batch_window: window,
            ..base()
        };
        let got = config.check().unwrap_err().to_string();
        assert!(got.starts_with(error), "{got}");
    }
}
