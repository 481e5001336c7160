//! Safe defaults (issue 11): a node must choose an audience policy and then enforces it the
//! same way on the single, cached and batched paths; a token meant to live for years is refused
//! unless the operator turns the lifetime cap off; node ids and regions are a safe alphabet;
//! what a remote source says reaches the logs escaped.

use super::*;
use keyfleet_verifier::DEFAULT_MAX_LIFETIME;

const DAY: i64 = 24 * 60 * 60;

/// A token for `aud` (none when empty), its `sub` naming the path under test so that each
/// path sees tokens the others have not cached.
fn aud_token(key: &Key, sub: &str, aud: &[&str]) -> String {
    token_as(key, &key.kid, NOW, |c| {
        c.sub = sub.into();
        c.jti = format!("jti-{sub}-{}", aud.join("+"));
        c.aud = aud.iter().map(|a| (*a).to_owned()).collect();
    })
}

#[test]
fn a_node_must_choose_an_audience_policy() {
    let err = Config::new(nowhere()).check().unwrap_err().to_string();
    assert_eq!(
        err,
        "a verifier needs an audience policy: pass --audience NAME (repeatable) for the services it guards, or --any-audience to accept tokens for any audience"
    );
    Config {
        audiences: vec!["orders".into(), "billing".into()],
        ..Config::new(nowhere())
    }
    .check()
    .unwrap();
    Config {
        any_audience: true,
        ..Config::new(nowhere())
    }
    .check()
    .unwrap();
    let both = Config {
        audiences: vec!["orders".into()],
        any_audience: true,
        ..Config::new(nowhere())
    };
    let err = both.check().unwrap_err().to_string();
    assert!(err.contains("--audience and --any-audience"), "{err}");
    let empty = Config {
        audiences: vec!["orders".into(), String::new()],
        ..Config::new(nowhere())
    };
    assert!(empty.check().is_err());
}

#[test]
fn node_ids_and_regions_are_a_safe_alphabet() {
    let base = || Config {
        any_audience: true,
        ..Config::new(nowhere())
    };
    let long_ok = "x".repeat(128);
    for ok in [
        "verifier-7100",
        "eu-west-1",
        "node_7.eu:a",
        "default",
        &long_ok,
    ] {
        for config in [
            Config {
                node_id: ok.into(),
                ..base()
            },
            Config {
                region: ok.into(),
                ..base()
            },
        ] {
            config.check().unwrap_or_else(|e| panic!("{ok:?}: {e}"));
        }
    }
    let too_long = "x".repeat(129);
    for bad in ["a\nb", "x y", "", "é", "a\u{1b}[31m", "a/b", &too_long] {
        let err = Config {
            node_id: bad.into(),
            ..base()
        }
        .check()
        .unwrap_err()
        .to_string();
        assert!(
            err.starts_with("--node-id ") && err.contains("A-Z a-z 0-9 . _ : -"),
            "{err}"
        );
        assert!(!err.contains('\n') && !err.contains('\u{1b}'), "{err:?}");
        let err = Config {
            region: bad.into(),
            ..base()
        }
        .check()
        .unwrap_err()
        .to_string();
        assert!(err.starts_with("--region "), "{err}");
    }
}

/// `--audience a --audience b`: a token must name a or b; a caller's audience is required on
/// top. The same answers on the plain path, from the cache, and in a batch (cold and warm).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_must_name_one_of_the_node_audiences_in_every_path() {
    let a = key(1);
    let authority = FakeAuthority::start(snapshot(1, &[&a])).await;
    let guard = ready_node(Config {
        audiences: vec!["a".into(), "b".into()],
        any_audience: false,
        clock: Clock::manual(NOW),
        ..Config::for_test(authority.source())
    })
    .await;
    let open = ready_node(Config {
        any_audience: true,
        clock: Clock::manual(NOW),
        ..Config::for_test(authority.source())
    })
    .await;

    // (what, token audiences, caller's audience, the guard's verdict, the open node's verdict)
    let cases: [(&str, &[&str], &str, Reason, Reason); 7] = [
        ("for b", &["b"], "", Reason::Ok, Reason::Ok),
        ("for a and x", &["a", "x"], "", Reason::Ok, Reason::Ok),
        ("for c", &["c"], "", Reason::WrongAudience, Reason::Ok),
        ("no aud", &[], "", Reason::WrongAudience, Reason::Ok),
        (
            "for b, caller asks x",
            &["b"],
            "x",
            Reason::WrongAudience,
            Reason::WrongAudience,
        ),
        (
            "for b and x, caller asks x",
            &["b", "x"],
            "x",
            Reason::Ok,
            Reason::Ok,
        ),
        (
            "for x, caller asks x",
            &["x"],
            "x",
            Reason::WrongAudience,
            Reason::Ok,
        ),
    ];
    let valid_for_guard = cases.iter().filter(|c| c.3 == Reason::Ok).count() as f64;

    // Single path: the first answer is computed, the second (for a valid token) cached.
    for round in ["plain", "cached"] {
        for (what, aud, asked, want, _) in &cases {
            let token = aud_token(&a, "single", aud);
            check(&guard, &format!("{round}: {what}"), &token, asked, *want).await;
        }
    }
    let hits = guard.metric("keyfleet_cache_hits_total").await;
    assert_eq!(
        hits,
        Some(valid_for_guard),
        "the second round came from the cache"
    );

    // Batch path: cold (one batch signature check), then warm (cache hits inside the batch).
    let requests: Vec<VerifyRequest> = cases
        .iter()
        .map(|(_, aud, asked, _, _)| VerifyRequest {
            token: aud_token(&a, "batch", aud),
            audience: (*asked).into(),
            ..Default::default()
        })
        .collect();
    for round in ["cold batch", "warm batch"] {
        let answers = guard
            .client
            .clone()
            .verify_batch(pb::VerifyBatchRequest {
                requests: requests.clone(),
            })
            .await
            .unwrap()
            .into_inner()
            .responses;
        assert_eq!(answers.len(), cases.len());
        for ((what, _, _, want, _), r) in cases.iter().zip(&answers) {
            assert_eq!(r.reason(), *want, "{round}: {what}: {r:?}");
            assert_eq!(r.valid, *want == Reason::Ok, "{round}: {what}");
        }
    }
    let hits = guard.metric("keyfleet_cache_hits_total").await;
    assert_eq!(
        hits,
        Some(2.0 * valid_for_guard),
        "the warm batch came from the cache"
    );

    // --any-audience: only a caller's own audience is checked.
    for (what, aud, asked, _, want) in &cases {
        let token = aud_token(&a, "open", aud);
        check(
            &open,
            &format!("any audience: {what}"),
            &token,
            asked,
            *want,
        )
        .await;
    }
    guard.stop().await;
    open.stop().await;
    authority.stop().await;
}

/// `max_lifetime` is a day unless turned off: a token meant to live a century is refused
/// (MALFORMED, as every lifetime refusal), a day's token passes, and `None` accepts both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_century_long_token_is_refused_by_default() {
    assert_eq!(DEFAULT_MAX_LIFETIME, Duration::from_secs(DAY as u64));
    assert_eq!(
        Config::new(nowhere()).max_lifetime,
        Some(DEFAULT_MAX_LIFETIME)
    );
    let a = key(1);
    let authority = FakeAuthority::start(snapshot(1, &[&a])).await;
    let defaults = ready_node(Config {
        clock: Clock::manual(NOW),
        ..Config::for_test(authority.source())
    })
    .await;
    let uncapped = ready_node(Config {
        max_lifetime: None,
        clock: Clock::manual(NOW),
        ..Config::for_test(authority.source())
    })
    .await;
    let century = token_as(&a, &a.kid, NOW, |c| c.exp = NOW + 100 * 365 * DAY);
    let a_day = token_as(&a, &a.kid, NOW, |c| c.exp = NOW + DAY);
    let refused = check(&defaults, "century", &century, "", Reason::Malformed).await;
    assert!(refused.detail.contains("--max-lifetime"), "{refused:?}");
    check(&defaults, "a day", &a_day, "", Reason::Ok).await;
    check(&uncapped, "century, uncapped", &century, "", Reason::Ok).await;
    defaults.stop().await;
    uncapped.stop().await;
    authority.stop().await;
}

/// Collects what the fmt subscriber writes.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

/// A JWKS that publishes a kid with a newline cannot forge a log line: the node's warning
/// about the key it left out shows the kid escaped.
#[test]
fn a_kid_from_a_jwks_is_logged_escaped() {
    let logs = Captured::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::WARN)
        .finish();
    // One thread runs the node and the fake JWKS, so the thread-local subscriber sees it all.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _scoped = tracing::subscriber::set_default(subscriber);
    runtime.block_on(async {
        let a = key(1);
        let mut hostile = serde_json::to_value(a.jwk()).unwrap();
        hostile["kid"] = "evil\nERROR keyfleet: KEY RING CORRUPTED".into();
        hostile["use"] = "enc".into();
        let jwks = FakeJwks::start(
            200,
            jwks_json(&[serde_json::to_value(a.jwk()).unwrap(), hostile]),
        )
        .await;
        let node = ready_node(Config {
            issuer: Some(ISSUER.into()),
            ..Config::for_test(Source::JwksUrl {
                url: jwks.url.clone(),
            })
        })
        .await;
        eventually("the screening warning", || async {
            logs.text().contains("left out by screening")
        })
        .await;
        node.stop().await;
    });
    let text = logs.text();
    assert!(
        text.contains("evil\\u{a}ERROR keyfleet: KEY RING CORRUPTED"),
        "{text}"
    );
    assert!(
        !text.lines().any(|l| l.starts_with("ERROR")),
        "a forged line: {text}"
    );
}
