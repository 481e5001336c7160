//! Per-request demands (issue 15): required scopes and a recent login, through `Verify`,
//! `VerifyBatch` and the verified-token cache (a cached "valid" never stands for another
//! request's demands), and ended sessions (`sid`) refused with SESSION_REVOKED, cached or not.

use super::*;

/// A token of key `k` with `scope` and `auth_time` (each left out when `None`) and `sid`.
fn session_token(
    k: &Key,
    jti: &str,
    scope: Option<&str>,
    auth_time: Option<i64>,
    sid: Option<&str>,
) -> String {
    token_as(k, &k.kid, NOW, |c| {
        c.jti = jti.into();
        if let Some(scope) = scope {
            c.extra.insert("scope".into(), scope.into());
        }
        if let Some(t) = auth_time {
            c.extra.insert("auth_time".into(), t.into());
        }
        if let Some(sid) = sid {
            c.extra.insert("sid".into(), sid.into());
        }
    })
}

fn request(token: &str, scopes: &[&str], max_auth_age: i64) -> VerifyRequest {
    VerifyRequest {
        token: token.into(),
        audience: String::new(),
        required_scopes: scopes.iter().map(|s| (*s).to_owned()).collect(),
        max_auth_age_seconds: max_auth_age,
    }
}

impl Node {
    async fn verify_with(&self, request: VerifyRequest) -> VerifyResponse {
        self.client
            .clone()
            .verify(request)
            .await
            .expect("Verify answers")
            .into_inner()
    }

    async fn verify_batch_of(&self, requests: Vec<VerifyRequest>) -> Vec<VerifyResponse> {
        self.client
            .clone()
            .verify_batch(pb::VerifyBatchRequest { requests })
            .await
            .expect("VerifyBatch answers")
            .into_inner()
            .responses
    }

    async fn cache_hits(&self) -> f64 {
        self.metric("keyfleet_cache_hits_total ")
            .await
            .unwrap_or(0.0)
    }
}

/// The demands of this table, on a token with scope "read write", logged in 100 s ago, and
/// the reason each must get.
fn table(token: &str, bare: &str) -> Vec<(&'static str, VerifyRequest, Reason)> {
    vec![
        ("no demands", request(token, &[], 0), Reason::Ok),
        ("granted scope", request(token, &["read"], 0), Reason::Ok),
        (
            "both scopes",
            request(token, &["write", "read"], 0),
            Reason::Ok,
        ),
        (
            "a scope not granted",
            request(token, &["read", "admin"], 0),
            Reason::InsufficientScope,
        ),
        (
            "a prefix of a granted scope",
            request(token, &["rea"], 0),
            Reason::InsufficientScope,
        ),
        ("recent enough login", request(token, &[], 100), Reason::Ok),
        (
            "login too old",
            request(token, &[], 99),
            Reason::LoginTooOld,
        ),
        (
            "scope fine, login too old",
            request(token, &["read"], 30),
            Reason::LoginTooOld,
        ),
        (
            "no scope claim",
            request(bare, &["read"], 0),
            Reason::InsufficientScope,
        ),
        (
            "no auth_time claim",
            request(bare, &[], 3600),
            Reason::LoginTooOld,
        ),
        ("bare token, no demands", request(bare, &[], 0), Reason::Ok),
    ]
}

fn assert_answer(
    what: &str,
    got: &VerifyResponse,
    want: Reason,
    request: &VerifyRequest,
    kid: &str,
) {
    assert_eq!(got.reason(), want, "{what}: {got:?}");
    assert_eq!(got.valid, want == Reason::Ok, "{what}");
    assert_eq!(got.kid, kid, "{what}: the kid of the key that signed it");
    match want {
        Reason::Ok => assert_eq!(got.subject, "alice", "{what}"),
        Reason::LoginTooOld => {
            let hint = format!("max_age={}", request.max_auth_age_seconds);
            assert!(got.detail.contains(&hint), "{what}: {:?}", got.detail);
            assert!(
                got.claims_json.is_empty() && got.subject.is_empty(),
                "{what}"
            );
        }
        _ => assert!(
            got.claims_json.is_empty() && got.subject.is_empty(),
            "{what}"
        ),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scopes_and_step_up_through_verify_batch_and_the_cache() {
    let a = key(1);
    let authority = FakeAuthority::start(snapshot(1, &[&a])).await;
    let node = ready_node(Config {
        clock: Clock::manual(NOW),
        ..Config::for_test(authority.source())
    })
    .await;
    // One pair of tokens per path, so that each path starts cold.
    for path in ["single", "batch"] {
        let token = session_token(
            &a,
            &format!("{path}-1"),
            Some("read write"),
            Some(NOW - 100),
            None,
        );
        let bare = session_token(&a, &format!("{path}-2"), None, None, None);
        let cases = table(&token, &bare);
        // Cold: the first request for each token makes demands it fails, so the refusal must
        // not be what the cache keeps, nor the demands' absence what the next request sees.
        let cold: Vec<VerifyRequest> =
            vec![request(&token, &["admin"], 0), request(&bare, &[], 60)];
        let answers = match path {
            "single" => {
                let mut out = Vec::new();
                for r in &cold {
                    out.push(node.verify_with(r.clone()).await);
                }
                out
            }
            _ => node.verify_batch_of(cold.clone()).await,
        };
        assert_answer(
            "cold, scope",
            &answers[0],
            Reason::InsufficientScope,
            &cold[0],
            &a.kid,
        );
        assert!(
            answers[0].detail.contains("\"admin\""),
            "{:?}",
            answers[0].detail
        );
        assert_answer(
            "cold, step-up",
            &answers[1],
            Reason::LoginTooOld,
            &cold[1],
            &a.kid,
        );
        // Both tokens are now cached as valid: every case below is a cache hit.
        let hits = node.cache_hits().await;
        let answers = match path {
            "single" => {
                let mut out = Vec::new();
                for (_, r, _) in &cases {
                    out.push(node.verify_with(r.clone()).await);
                }
                out
            }
            _ => {
                node.verify_batch_of(cases.iter().map(|c| c.1.clone()).collect())
                    .await
            }
        };
        for ((what, r, want), got) in cases.iter().zip(&answers) {
            assert_answer(&format!("{path}, cached: {what}"), got, *want, r, &a.kid);
        }
        assert_eq!(
            node.cache_hits().await - hits,
            cases.len() as f64,
            "{path}: every case was answered from the cache"
        );
    }
    // Without a cache, the plain path gives the same answers.
    let plain = ready_node(Config {
        clock: Clock::manual(NOW),
        cache_entries: 0,
        ..Config::for_test(authority.source())
    })
    .await;
    let token = session_token(&a, "plain-1", Some("read write"), Some(NOW - 100), None);
    let bare = session_token(&a, "plain-2", None, None, None);
    for (what, r, want) in table(&token, &bare) {
        let got = plain.verify_with(r.clone()).await;
        assert_answer(&format!("uncached: {what}"), &got, want, &r, &a.kid);
    }
    let metrics = plain.get("/metrics").await.1;
    for reason in ["SESSION_REVOKED", "INSUFFICIENT_SCOPE", "LOGIN_TOO_OLD"] {
        assert!(
            metrics.contains(&format!("reason=\"{reason}\"")),
            "keyfleet_verify_total has a series for {reason}"
        );
    }
    let counted = |reason: &str| {
        metrics
            .lines()
            .find(|l| {
                l.starts_with("keyfleet_verify_total")
                    && l.contains(&format!("reason=\"{reason}\""))
            })
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
    };
    assert_eq!(counted("INSUFFICIENT_SCOPE"), Some(3.0));
    assert_eq!(counted("LOGIN_TOO_OLD"), Some(3.0));
    plain.stop().await;
    node.stop().await;
    authority.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_session_is_refused_even_after_a_cached_valid() {
    let a = key(1);
    let mut snap = snapshot(1, &[&a]);
    snap.revoked_sessions.push(pb::RevokedSession {
        sid: "ended".into(),
        until: NOW + 3600,
    });
    let authority = FakeAuthority::start(snap).await;
    let node = ready_node(Config {
        clock: Clock::manual(NOW),
        ..Config::for_test(authority.source())
    })
    .await;
    let ended = session_token(&a, "e", Some("read"), Some(NOW), Some("ended"));
    let live = session_token(&a, "l", Some("read"), Some(NOW), Some("live"));
    let other = session_token(&a, "o", Some("read"), Some(NOW), Some("other"));
    let got = node.verify_with(request(&ended, &[], 0)).await;
    assert_eq!(got.reason(), Reason::SessionRevoked, "{got:?}");
    assert_eq!(got.kid, a.kid);
    let batch = node
        .verify_batch_of(vec![
            request(&ended, &["read"], 0),
            request(&live, &["read"], 0),
        ])
        .await;
    assert_eq!(
        (batch[0].reason(), batch[1].reason()),
        (Reason::SessionRevoked, Reason::Ok)
    );
    // Cached as valid, then its session ends: the cache never answers for it again.
    assert!(node.verify_with(request(&live, &[], 0)).await.valid);
    assert!(node.verify_with(request(&other, &[], 0)).await.valid);
    let hits = node.cache_hits().await;
    assert!(node.verify_with(request(&live, &["read"], 0)).await.valid);
    assert_eq!(
        node.cache_hits().await - hits,
        1.0,
        "answered from the cache"
    );
    let version = authority.publish(true, |s| {
        s.revoked_sessions.push(pb::RevokedSession {
            sid: "live".into(),
            until: NOW + 3600,
        })
    });
    eventually("the revocation arrives", || async {
        node.metric("keyfleet_jwks_version ").await == Some(version as f64)
    })
    .await;
    let got = node.verify_with(request(&live, &[], 0)).await;
    assert_eq!(got.reason(), Reason::SessionRevoked, "{got:?}");
    let batch = node
        .verify_batch_of(vec![request(&live, &[], 0), request(&other, &[], 0)])
        .await;
    assert_eq!(
        (batch[0].reason(), batch[1].reason()),
        (Reason::SessionRevoked, Reason::Ok),
        "only the ended session is refused"
    );
    node.stop().await;
    authority.stop().await;
}
