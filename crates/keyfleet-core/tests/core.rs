//! keyfleet-core's integration tests: token validation verdicts, the key ring's lifecycle on an
//! explicit timeline, and the Wycheproof Ed25519 vectors through the signature path.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ed25519_dalek::SigningKey;
use keyfleet_core::jwk::thumbprint;
use keyfleet_core::ring::TickOutcome;
use keyfleet_core::token::verify_signature;
use keyfleet_core::{
    Demands, Jwk, KeyRing, KeySet, KeyState, NewKey, Policy, Reason, RingError, RingPolicy,
    TokenClaims, check_demands, sign_token, validate,
};
use serde_json::{Map, Value, json};

const NOW: i64 = 1_800_000_000;

fn key(seed: u8) -> (SigningKey, String) {
    let sk = SigningKey::from_bytes(&[seed; 32]);
    let kid = thumbprint(&sk.verifying_key().to_bytes());
    (sk, kid)
}

fn claims() -> TokenClaims {
    TokenClaims {
        iss: "https://issuer.test".into(),
        sub: "alice".into(),
        aud: vec!["orders".into()],
        iat: NOW,
        nbf: NOW,
        exp: NOW + 300,
        jti: "jti-1".into(),
        extra: Map::new(),
    }
}

fn keyset(revoked_kid: Option<&str>) -> KeySet {
    let (a, ka) = key(1);
    let (_, kb) = key(2);
    let jwks = [
        Jwk::ed25519(&ka, &a.verifying_key().to_bytes()),
        Jwk::ed25519(&kb, &key(2).0.verifying_key().to_bytes()),
    ];
    let (set, rejected) = KeySet::build(
        7,
        None,
        &jwks,
        revoked_kid.map(str::to_owned),
        [("revoked-jti".to_owned(), NOW + 600)],
    );
    assert!(rejected.is_empty());
    set
}

fn b64(v: &Value) -> String {
    URL_SAFE_NO_PAD.encode(v.to_string())
}

/// Signs arbitrary header/claims JSON text with key `seed`.
fn raw(header: &str, claims: &str, seed: u8) -> String {
    let sk = key(seed).0;
    let input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header),
        URL_SAFE_NO_PAD.encode(claims)
    );
    use ed25519_dalek::Signer;
    let sig = sk.sign(input.as_bytes());
    format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig.to_bytes()))
}

fn check(token: &str, audience: Option<&str>, want: Reason) {
    let policy = Policy::new("https://issuer.test");
    let got = match validate(token, &keyset(Some("revoked-kid")), NOW, &policy, audience) {
        Ok(_) => Reason::Ok,
        Err(r) => r.reason,
    };
    assert_eq!(got, want, "token {token}");
}

#[test]
fn verdicts() {
    let (a, ka) = key(1);
    let (_, kb) = key(2);
    let good = sign_token(&a, &ka, &claims());
    let hdr = |kid: &str| json!({"alg":"EdDSA","kid":kid,"typ":"JWT"}).to_string();
    let body = |patch: Value| {
        let mut c = json!({"iss":"https://issuer.test","sub":"alice","aud":"orders","iat":NOW,"nbf":NOW,"exp":NOW+300,"jti":"j"});
        for (k, v) in patch.as_object().unwrap() {
            if v.is_null() {
                c.as_object_mut().unwrap().remove(k);
            } else {
                c[k] = v.clone();
            }
        }
        c.to_string()
    };
    let mut parts: Vec<String> = good.split('.').map(str::to_owned).collect();
    let mut sig = URL_SAFE_NO_PAD.decode(&parts[2]).unwrap();
    sig[5] ^= 1;
    parts[2] = URL_SAFE_NO_PAD.encode(&sig);
    let flipped = parts.join(".");

    let cases: Vec<(String, Option<&str>, Reason)> = vec![
        (good.clone(), None, Reason::Ok),
        (good.clone(), Some("orders"), Reason::Ok),
        (good.clone(), Some("billing"), Reason::WrongAudience),
        ("x".repeat(9000), None, Reason::TooLarge),
        ("a.b".into(), None, Reason::Malformed),
        (format!("{good}.x"), None, Reason::Malformed),
        (good.replacen('.', "=.", 1), None, Reason::Malformed),
        (format!(" {good}"), None, Reason::Malformed),
        (flipped, None, Reason::BadSignature),
        (
            raw(&hdr(&ka), &body(json!({})), 2),
            None,
            Reason::BadSignature,
        ),
        (raw(&hdr(&kb), &body(json!({})), 2), None, Reason::Ok),
        (
            raw(&hdr("nope"), &body(json!({})), 1),
            None,
            Reason::UnknownKid,
        ),
        (
            raw(&hdr("revoked-kid"), &body(json!({})), 1),
            None,
            Reason::KeyRevoked,
        ),
        (
            raw(
                &json!({"alg":"none","kid":ka}).to_string(),
                &body(json!({})),
                1,
            ),
            None,
            Reason::UnsupportedAlgorithm,
        ),
        (
            raw(
                &json!({"alg":"HS256","kid":ka}).to_string(),
                &body(json!({})),
                1,
            ),
            None,
            Reason::UnsupportedAlgorithm,
        ),
        (
            raw(
                &json!({"alg":"Ed25519","kid":ka}).to_string(),
                &body(json!({})),
                1,
            ),
            None,
            Reason::Ok,
        ),
        (
            raw(&json!({"alg":"EdDSA"}).to_string(), &body(json!({})), 1),
            None,
            Reason::Malformed,
        ),
        (
            raw(
                &json!({"alg":"EdDSA","kid":ka,"crit":["exp"]}).to_string(),
                &body(json!({})),
                1,
            ),
            None,
            Reason::Malformed,
        ),
        (
            raw(
                &json!({"alg":"EdDSA","kid":ka,"typ":"JOSE+JSON"}).to_string(),
                &body(json!({})),
                1,
            ),
            None,
            Reason::Malformed,
        ),
        (
            raw(
                &format!(r#"{{"alg":"EdDSA","alg":"none","kid":"{ka}"}}"#),
                &body(json!({})),
                1,
            ),
            None,
            Reason::Malformed,
        ),
        (
            raw(
                &hdr(&ka),
                &format!(
                    r#"{{"exp":{},"exp":1,"iss":"https://issuer.test"}}"#,
                    NOW + 300
                ),
                1,
            ),
            None,
            Reason::Malformed,
        ),
        (
            raw(&hdr(&ka), &body(json!({"exp":null})), 1),
            None,
            Reason::Malformed,
        ),
        (
            raw(&hdr(&ka), &body(json!({"exp":"soon"})), 1),
            None,
            Reason::Malformed,
        ),
        (
            raw(&hdr(&ka), &body(json!({"exp":1e300})), 1),
            None,
            Reason::Malformed,
        ),
        (
            raw(&hdr(&ka), &body(json!({"exp":NOW-61})), 1),
            None,
            Reason::Expired,
        ),
        (
            raw(&hdr(&ka), &body(json!({"exp":NOW-30})), 1),
            None,
            Reason::Ok,
        ),
        (
            raw(&hdr(&ka), &body(json!({"nbf":NOW+120})), 1),
            None,
            Reason::NotYetValid,
        ),
        (
            raw(&hdr(&ka), &body(json!({"iat":NOW+120})), 1),
            None,
            Reason::NotYetValid,
        ),
        (
            raw(&hdr(&ka), &body(json!({"iss":"https://evil.test"})), 1),
            None,
            Reason::WrongIssuer,
        ),
        (
            raw(&hdr(&ka), &body(json!({"iss":null})), 1),
            None,
            Reason::WrongIssuer,
        ),
        (
            raw(&hdr(&ka), &body(json!({"aud":["a","orders"]})), 1),
            Some("orders"),
            Reason::Ok,
        ),
        (
            raw(&hdr(&ka), &body(json!({"aud":[1]})), 1),
            None,
            Reason::Malformed,
        ),
        (
            raw(&hdr(&ka), &body(json!({"aud":null})), 1),
            Some("orders"),
            Reason::WrongAudience,
        ),
        (
            raw(&hdr(&ka), &body(json!({"jti":"revoked-jti"})), 1),
            None,
            Reason::TokenRevoked,
        ),
        (raw(&hdr(&ka), "[1,2]", 1), None, Reason::Malformed),
        (
            format!(
                "{}.{}.{}",
                b64(&json!({"alg":"EdDSA","kid":ka})),
                "e30",
                "AAAA"
            ),
            None,
            Reason::BadSignature,
        ),
    ];
    for (token, aud, want) in cases {
        check(&token, aud, want);
    }
}

/// A session's access token: `sid`, `auth_time` and `scope` as the authority writes them.
fn session_token(sid: Value, auth_time: Option<i64>, scope: Option<&str>) -> String {
    let (sk, kid) = key(1);
    let mut c = claims();
    c.extra.insert("sid".into(), sid);
    if let Some(t) = auth_time {
        c.extra.insert("auth_time".into(), t.into());
    }
    if let Some(s) = scope {
        c.extra.insert("scope".into(), s.into());
    }
    sign_token(&sk, &kid, &c)
}

#[test]
fn a_revoked_session_refuses_its_tokens_until_the_entry_expires() {
    let policy = Policy::new("https://issuer.test");
    let set = keyset(None).with_revoked_sessions([("s-1".to_owned(), NOW + 100)]);
    let verdict =
        |token: &str, now| validate(token, &set, now, &policy, None).map_err(|r| r.reason);
    let ended = session_token(json!("s-1"), Some(NOW), None);
    assert_eq!(verdict(&ended, NOW).unwrap_err(), Reason::SessionRevoked);
    // Another session, and a token without `sid`, are untouched.
    assert!(verdict(&session_token(json!("s-2"), Some(NOW), None), NOW).is_ok());
    assert!(verdict(&sign_token(&key(1).0, &key(1).1, &claims()), NOW).is_ok());
    // Past `until` (the session's last token has expired anyway) the entry no longer counts.
    assert!(verdict(&ended, NOW + 101).is_ok());
    // A `sid` that is not a string is malformed, never silently ignored.
    let odd = session_token(json!(["s-1"]), Some(NOW), None);
    assert_eq!(verdict(&odd, NOW).unwrap_err(), Reason::Malformed);
}

#[test]
fn demands_check_scopes_and_the_age_of_the_login() {
    let policy = Policy::new("https://issuer.test");
    let set = keyset(None);
    let token = session_token(json!("s-1"), Some(NOW - 600), Some("read write"));
    let granted = validate(&token, &set, NOW, &policy, None).unwrap().claims;
    let scopes = |list: &[&str]| list.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let demand = |required: &[String], max_auth_age| {
        check_demands(
            &granted,
            &Demands {
                required_scopes: required,
                max_auth_age,
            },
            NOW,
        )
        .map_err(|r| (r.reason, r.detail))
    };
    assert!(Demands::default().is_empty());
    assert!(demand(&[], 0).is_ok());
    assert!(demand(&scopes(&["read"]), 0).is_ok());
    assert!(demand(&scopes(&["write", "read"]), 0).is_ok());
    assert_eq!(
        demand(&scopes(&["admin"]), 0).unwrap_err().0,
        Reason::InsufficientScope
    );
    // A scope is a whole word: neither a prefix nor the empty string matches.
    assert_eq!(
        demand(&scopes(&["rea"]), 0).unwrap_err().0,
        Reason::InsufficientScope
    );
    assert_eq!(
        demand(&scopes(&[""]), 0).unwrap_err().0,
        Reason::InsufficientScope
    );
    assert!(demand(&[], 600).is_ok());
    let (reason, detail) = demand(&[], 599).unwrap_err();
    assert_eq!(reason, Reason::LoginTooOld);
    assert!(detail.contains("max_age=599"), "{detail}");
    // No auth_time: the login's age is unknown, so a step-up demand refuses.
    let plain = validate(
        &sign_token(&key(1).0, &key(1).1, &claims()),
        &set,
        NOW,
        &policy,
        None,
    )
    .unwrap()
    .claims;
    let aged = check_demands(
        &plain,
        &Demands {
            required_scopes: &[],
            max_auth_age: 3600,
        },
        NOW,
    );
    assert_eq!(aged.unwrap_err().reason, Reason::LoginTooOld);
    let scoped = check_demands(
        &plain,
        &Demands {
            required_scopes: &scopes(&["read"]),
            max_auth_age: 0,
        },
        NOW,
    );
    assert_eq!(scoped.unwrap_err().reason, Reason::InsufficientScope);
}

#[test]
fn node_audience_is_enforced() {
    let (a, ka) = key(1);
    let token = sign_token(&a, &ka, &claims());
    let policy = Policy {
        audiences: vec!["billing".into()],
        ..Policy::new("https://issuer.test")
    };
    let got = validate(&token, &keyset(None), NOW, &policy, None).unwrap_err();
    assert_eq!(got.reason, Reason::WrongAudience);
    let ok = validate(
        &token,
        &keyset(None),
        NOW,
        &Policy::new("https://issuer.test"),
        None,
    )
    .unwrap();
    assert_eq!(
        (ok.subject.as_str(), ok.kid.as_str(), ok.expires_at),
        ("alice", ka.as_str(), NOW + 300)
    );
}

/// A node that guards several audiences accepts a token naming any one of them (Envoy
/// jwt_authn's rule), refuses one naming none (or no `aud` at all), and a caller's audience is
/// required on top.
#[test]
fn node_audiences_are_any_of() {
    let (a, ka) = key(1);
    let policy = Policy {
        audiences: vec!["a".into(), "b".into()],
        ..Policy::new("https://issuer.test")
    };
    let with_aud = |aud: &[&str]| {
        let mut c = claims();
        c.aud = aud.iter().map(|s| s.to_string()).collect();
        sign_token(&a, &ka, &c)
    };
    let verdict = |token: &str, asked: Option<&str>| match validate(
        token,
        &keyset(None),
        NOW,
        &policy,
        asked,
    ) {
        Ok(_) => Reason::Ok,
        Err(r) => r.reason,
    };
    assert_eq!(verdict(&with_aud(&["b"]), None), Reason::Ok);
    assert_eq!(verdict(&with_aud(&["a", "x"]), None), Reason::Ok);
    assert_eq!(verdict(&with_aud(&["c"]), None), Reason::WrongAudience);
    assert_eq!(verdict(&with_aud(&[]), None), Reason::WrongAudience);
    assert_eq!(verdict(&with_aud(&["b"]), Some("x")), Reason::WrongAudience);
    assert_eq!(verdict(&with_aud(&["b", "x"]), Some("x")), Reason::Ok);
    // The caller's audience alone does not stand in for the node's.
    assert_eq!(verdict(&with_aud(&["x"]), Some("x")), Reason::WrongAudience);
}

#[test]
fn wycheproof_vectors_through_the_signature_path() {
    let data: Value =
        serde_json::from_str(include_str!("data/wycheproof_ed25519_test.json")).unwrap();
    let mut checked = 0;
    for group in data["testGroups"].as_array().unwrap() {
        let pk = hex::decode(group["publicKey"]["pk"].as_str().unwrap()).unwrap();
        let key = <[u8; 32]>::try_from(pk.as_slice())
            .ok()
            .and_then(|b| ed25519_dalek::VerifyingKey::from_bytes(&b).ok())
            .filter(|k| !k.is_weak());
        for t in group["tests"].as_array().unwrap() {
            let msg = hex::decode(t["msg"].as_str().unwrap()).unwrap();
            let sig = hex::decode(t["sig"].as_str().unwrap()).unwrap();
            let got = key
                .as_ref()
                .is_some_and(|k| verify_signature(k, &msg, &sig));
            let want = t["result"] == "valid";
            assert_eq!(got, want, "tcId {} ({})", t["tcId"], t["comment"]);
            checked += 1;
        }
    }
    assert_eq!(checked, data["numberOfTests"].as_u64().unwrap());
}

// ---- key ring lifecycle ----

fn new_key(seed: u8) -> NewKey {
    let (sk, kid) = key(seed);
    NewKey {
        kid,
        public: sk.verifying_key().to_bytes(),
    }
}

fn policy() -> RingPolicy {
    RingPolicy {
        token_ttl: 300,
        leeway: 60,
        rotation_period: 3600,
        publish_ahead: 600,
    }
}

fn states(ring: &KeyRing) -> Vec<(String, KeyState)> {
    ring.keys.iter().map(|k| (k.kid.clone(), k.state)).collect()
}

#[test]
fn bootstrap_publishes_next_before_it_signs() {
    let ring = KeyRing::bootstrap(policy(), NOW, new_key(1), new_key(2));
    ring.check().unwrap();
    assert_eq!(
        states(&ring),
        vec![(key(1).1, KeyState::Active), (key(2).1, KeyState::Next)]
    );
    let jwks: Vec<String> = ring.jwks().into_iter().map(|j| j.kid).collect();
    assert_eq!(jwks, vec![key(1).1, key(2).1]);
    assert_eq!(ring.next_rotation_at(), NOW + 3600);
}

#[test]
fn promotion_waits_for_acks_or_publish_ahead() {
    let mut ring = KeyRing::bootstrap(policy(), NOW, new_key(1), new_key(2));
    // Rotate once so the next key is freshly published at a new version.
    ring.request_rotation().unwrap();
    assert!(ring.tick(NOW, None).promoted.is_some());
    ring.add_next(new_key(3), NOW).unwrap();
    let published = ring.next().unwrap().published_version;
    assert_eq!(ring.request_rotation().unwrap(), key(3).1);

    // A live watcher still on an older version holds promotion back...
    let out = ring.tick(NOW + 10, Some(published - 1));
    assert_eq!(out.promoted, None);
    assert_eq!(ring.active().kid, key(2).1);
    // ...until it acknowledges the version that carries the key.
    let out = ring.tick(NOW + 11, Some(published));
    assert_eq!(out.promoted, Some(key(3).1));
    assert_eq!(out.destroyed, vec![key(2).1]);

    // Without acks, publish_ahead is the latest moment.
    ring.add_next(new_key(4), NOW + 11).unwrap();
    ring.request_rotation().unwrap();
    assert_eq!(ring.tick(NOW + 11 + 599, Some(0)).promoted, None);
    assert_eq!(ring.tick(NOW + 11 + 600, Some(0)).promoted, Some(key(4).1));
}

#[test]
fn retiring_key_stays_until_its_last_token_expired() {
    let mut ring = KeyRing::bootstrap(policy(), NOW, new_key(1), new_key(2));
    ring.request_rotation().unwrap();
    let out = ring.tick(NOW + 100, None);
    assert_eq!(out.promoted, Some(key(2).1));
    let old = ring.get(&key(1).1).unwrap();
    assert_eq!(old.state, KeyState::Retiring);
    assert_eq!(old.retire_at, Some(NOW + 100 + 300 + 60));
    ring.add_next(new_key(3), NOW + 100).unwrap();
    assert!(ring.jwks().iter().any(|j| j.kid == key(1).1));
    let out = ring.tick(NOW + 100 + 359, None);
    assert!(out.retired.is_empty());
    let version = ring.version;
    let out = ring.tick(NOW + 100 + 360, None);
    assert_eq!(out.retired, vec![key(1).1]);
    assert!(out.changed);
    assert_eq!(ring.version, version + 1);
    assert!(ring.get(&key(1).1).is_none());
    assert!(!ring.jwks().iter().any(|j| j.kid == key(1).1));
}

#[test]
fn scheduled_rotation() {
    let mut ring = KeyRing::bootstrap(policy(), NOW, new_key(1), new_key(2));
    assert_eq!(ring.tick(NOW + 3599, None), TickOutcome::default());
    let out = ring.tick(NOW + 3600, None);
    assert_eq!(out.promoted, Some(key(2).1));
    assert!(ring.needs_next());
    ring.add_next(new_key(3), NOW + 3600).unwrap();
    assert_eq!(ring.next_rotation_at(), NOW + 7200);
}

#[test]
fn revocation_of_the_active_key_promotes_next_at_once() {
    let mut ring = KeyRing::bootstrap(policy(), NOW, new_key(1), new_key(2));
    let v = ring.version;
    let destroyed = ring.revoke_key(&key(1).1, NOW + 5).unwrap();
    assert_eq!(destroyed, vec![key(1).1]);
    assert_eq!(ring.active().kid, key(2).1);
    assert!(ring.version > v);
    assert!(ring.revoked_kids.contains_key(&key(1).1));
    assert!(!ring.jwks().iter().any(|j| j.kid == key(1).1));
    ring.check().unwrap();
    // Its history stays readable: when it was made and how long it signed.
    let record = &ring.revoked_records[&key(1).1];
    assert_eq!(record.state, KeyState::Revoked);
    assert_eq!(
        (
            record.created_at,
            record.activated_at,
            record.deactivated_at
        ),
        (NOW, Some(NOW), Some(NOW + 5))
    );
    assert_eq!((record.revoked_at, record.retire_at), (Some(NOW + 5), None));
    // A record without its revoked kid is an inconsistent ring.
    let mut stray = ring.clone();
    stray.revoked_kids.clear();
    assert!(matches!(stray.check(), Err(RingError::Inconsistent(_))));
    // No next key now: revoking the active one again needs one published first.
    assert_eq!(
        ring.revoke_key(&key(2).1, NOW + 6),
        Err(RingError::NoNextKey)
    );
    assert_eq!(
        ring.revoke_key(&key(1).1, NOW + 6),
        Err(RingError::AlreadyRevoked(key(1).1))
    );
    assert_eq!(
        ring.revoke_key("nope", NOW + 6),
        Err(RingError::UnknownKid("nope".into()))
    );
    // The revoked kid is forgotten once every token it signed has expired.
    ring.add_next(new_key(3), NOW + 6).unwrap();
    ring.tick(NOW + 5 + 360, None);
    assert!(!ring.revoked_kids.contains_key(&key(1).1));
    assert!(ring.revoked_records.is_empty(), "forgotten with the kid");
    ring.check().unwrap();
}

#[test]
fn token_deny_list_is_bounded_by_expiry() {
    let mut ring = KeyRing::bootstrap(policy(), NOW, new_key(1), new_key(2));
    ring.revoke_token("a", NOW + 100, NOW).unwrap();
    ring.revoke_token("b", NOW + 10_000, NOW).unwrap();
    assert_eq!(
        ring.revoked_tokens.get("b"),
        Some(&(NOW + 300)),
        "clamped to the longest token life"
    );
    ring.revoke_token("old", NOW - 1, NOW).unwrap();
    assert!(!ring.revoked_tokens.contains_key("old"));
    ring.tick(NOW + 100 + 60, None);
    assert!(ring.revoked_tokens.contains_key("a"));
    ring.tick(NOW + 100 + 61, None);
    assert!(!ring.revoked_tokens.contains_key("a"));
}

#[test]
fn policy_guard_refuses_unsafe_timings() {
    assert!(policy().check().is_ok());
    let bad = [
        RingPolicy {
            token_ttl: 0,
            ..policy()
        },
        RingPolicy {
            publish_ahead: 3600,
            ..policy()
        },
        RingPolicy {
            rotation_period: 1,
            ..policy()
        },
        RingPolicy {
            token_ttl: 3600 * 17,
            ..policy()
        },
        RingPolicy {
            leeway: -1,
            ..policy()
        },
    ];
    for p in bad {
        assert!(p.check().is_err(), "{p:?}");
    }
}

#[test]
fn ring_round_trips_through_json() {
    let mut ring = KeyRing::bootstrap(policy(), NOW, new_key(1), new_key(2));
    ring.revoke_token("x", NOW + 10, NOW).unwrap();
    let text = serde_json::to_string(&ring).unwrap();
    let back: KeyRing = serde_json::from_str(&text).unwrap();
    assert_eq!(back, ring);
}

// ---- the hostile-token corpus ----

#[allow(dead_code)]
#[path = "../examples/hostile_corpus.rs"]
mod hostile_corpus;

/// The committed corpus is exactly what its generator writes (run the example to refresh it).
#[test]
fn hostile_corpus_has_not_drifted() {
    let committed = include_str!("data/hostile_corpus.json");
    assert!(
        committed == hostile_corpus::render(),
        "tests/data/hostile_corpus.json differs from its generator: run `cargo run -p keyfleet-core --example hostile_corpus`"
    );
}

/// Every corpus case gets its expected verdict from `validate` over the corpus's own JWKS.
#[test]
fn hostile_corpus_verdicts() {
    let corpus: Value = serde_json::from_str(include_str!("data/hostile_corpus.json")).unwrap();
    let doc = keyfleet_core::parse_jwks(corpus["jwks"].as_str().unwrap().as_bytes()).unwrap();
    // "not a jwk", null, an `x` that is a number and the entry with a repeated "x" are not
    // JWK objects at all.
    assert_eq!(doc.unparseable, 4);
    let (keys, rejected) = KeySet::build(0, None, &doc.keys, [], []);
    let mut kids: Vec<&str> = keys.kids().collect();
    kids.sort();
    assert_eq!(kids, ["good-1", "good-2"], "rejected: {rejected:?}");
    let policy = Policy {
        leeway: corpus["leeway"].as_i64().unwrap(),
        max_token_bytes: corpus["max_token_bytes"].as_u64().unwrap() as usize,
        max_lifetime: corpus["max_lifetime"].as_i64(),
        ..Policy::new(corpus["issuer"].as_str().unwrap())
    };
    let now = corpus["now"].as_i64().unwrap();
    let cases = corpus["cases"].as_array().unwrap();
    assert!(cases.len() >= 300 + 512);
    let mut wrong = Vec::new();
    for case in cases {
        let audience = case["audience"].as_str().filter(|a| !a.is_empty());
        let got = match validate(
            case["token"].as_str().unwrap(),
            &keys,
            now,
            &policy,
            audience,
        ) {
            Ok(_) => Reason::Ok,
            Err(r) => r.reason,
        };
        if got.as_str() != case["expect"].as_str().unwrap() {
            wrong.push(format!(
                "{} / {}: got {got}, want {}",
                case["class"], case["name"], case["expect"]
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "{} wrong verdicts:\n{}",
        wrong.len(),
        wrong.join("\n")
    );
}

// ---- fuzzing (stable toolchain: proptest) ----
//
// No input may panic the token decoder or the JWKS parser, and no mutation of a valid token may
// validate. Each property runs `PROPTEST_CASES` cases (default below); raise it for a longer
// fuzzing session: `PROPTEST_CASES=200000 cargo test -p keyfleet-core --test core fuzz_`.

mod fuzz {
    use super::*;
    use proptest::prelude::*;

    const ALPHABET: &str =
        "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.=+/ \u{0}é";

    fn config(cases: u32) -> ProptestConfig {
        ProptestConfig {
            cases: std::env::var("PROPTEST_CASES")
                .ok()
                .and_then(|n| n.parse().ok())
                .unwrap_or(cases),
            failure_persistence: None,
            ..ProptestConfig::default()
        }
    }

    fn policy() -> Policy {
        Policy {
            max_lifetime: Some(86_400),
            ..Policy::new("https://issuer.test")
        }
    }

    fn good() -> String {
        let (a, ka) = key(1);
        sign_token(&a, &ka, &claims())
    }

    fn verdict(token: &str) -> Reason {
        match validate(token, &keyset(None), NOW, &policy(), None) {
            Ok(_) => Reason::Ok,
            Err(r) => r.reason,
        }
    }

    #[derive(Debug, Clone)]
    enum Edit {
        Replace(usize, char),
        Insert(usize, char),
        Delete(usize),
        Truncate(usize),
        Swap(usize, usize),
    }

    fn edit() -> impl Strategy<Value = Edit> {
        let ch = proptest::sample::select(ALPHABET.chars().collect::<Vec<_>>());
        prop_oneof![
            (any::<usize>(), ch.clone()).prop_map(|(i, c)| Edit::Replace(i, c)),
            (any::<usize>(), ch).prop_map(|(i, c)| Edit::Insert(i, c)),
            any::<usize>().prop_map(Edit::Delete),
            any::<usize>().prop_map(Edit::Truncate),
            (any::<usize>(), any::<usize>()).prop_map(|(i, j)| Edit::Swap(i, j)),
        ]
    }

    fn apply(token: &str, edits: &[Edit]) -> String {
        let mut chars: Vec<char> = token.chars().collect();
        for e in edits {
            let n = chars.len().max(1);
            match *e {
                Edit::Replace(i, c) if !chars.is_empty() => chars[i % n] = c,
                Edit::Insert(i, c) => chars.insert(i % (chars.len() + 1), c),
                Edit::Delete(i) if !chars.is_empty() => {
                    chars.remove(i % n);
                }
                Edit::Truncate(i) => chars.truncate(i % (chars.len() + 1)),
                Edit::Swap(i, j) if !chars.is_empty() => chars.swap(i % n, j % n),
                _ => {}
            }
        }
        chars.into_iter().collect()
    }

    /// A JSON value of bounded depth, with the strings and numbers JWT parsers trip on.
    fn json_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            any::<f64>().prop_map(Value::from),
            (NOW - 1000..NOW + 1000).prop_map(Value::from),
            "[ -~]{0,12}".prop_map(Value::from),
            proptest::sample::select(vec![
                "EdDSA",
                "Ed25519",
                "none",
                "HS256",
                "JWT",
                "orders",
                "https://issuer.test",
            ])
            .prop_map(Value::from),
        ];
        leaf.prop_recursive(4, 32, 6, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::from),
                proptest::collection::vec((member_name(), inner), 0..6)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    fn member_name() -> impl Strategy<Value = String> {
        prop_oneof![
            proptest::sample::select(vec![
                "alg", "kid", "typ", "crit", "b64", "zip", "enc", "cty", "jwk", "jku", "x5u",
                "x5c", "iss", "sub", "aud", "exp", "nbf", "iat", "jti", "kty", "crv", "x", "d",
                "use", "key_ops", "keys",
            ])
            .prop_map(str::to_owned),
            "[a-z]{1,4}",
        ]
    }

    proptest! {
        #![proptest_config(config(2000))]

        /// Arbitrary bytes (as the lossy string a gRPC client could send): no panic, never valid.
        #[test]
        fn fuzz_token_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let token = String::from_utf8_lossy(&bytes);
            prop_assert_ne!(verdict(&token), Reason::Ok);
        }

        /// Strings over the characters a token is made of: no panic, never valid.
        #[test]
        fn fuzz_token_alphabet(token in "[A-Za-z0-9_=+/. -]{0,400}") {
            prop_assert_ne!(verdict(&token), Reason::Ok);
        }

        /// Mutations of a valid token: no panic, and only the unchanged token validates.
        #[test]
        fn fuzz_token_mutations(edits in proptest::collection::vec(edit(), 1..4)) {
            let original = good();
            let mutated = apply(&original, &edits);
            let got = verdict(&mutated);
            prop_assert!(got != Reason::Ok || mutated == original, "{mutated} validated");
        }

        /// JSON bytes that arrive as raw segments (garbage, not JSON, invalid UTF-8): no panic.
        #[test]
        fn fuzz_raw_segments(
            header in proptest::collection::vec(any::<u8>(), 0..200),
            body in proptest::collection::vec(any::<u8>(), 0..200),
        ) {
            let token = raw_bytes(&header, &body);
            prop_assert_ne!(verdict(&token), Reason::Ok);
        }
    }

    proptest! {
        #![proptest_config(config(500))]

        /// Correctly signed tokens with arbitrary JSON header and claims: never panics; a valid
        /// verdict only for an EdDSA header with the key's kid and claims that pass every rule.
        #[test]
        fn fuzz_signed_json(mut header in json_value(), body in json_value()) {
            if let Value::Object(h) = &mut header {
                // Often point at the real key so the claims rules get exercised too.
                if h.len() % 2 == 0 {
                    h.insert("alg".into(), "EdDSA".into());
                    h.insert("kid".into(), key(1).1.into());
                }
            }
            let token = raw(&header.to_string(), &body.to_string(), 1);
            if verdict(&token) == Reason::Ok {
                prop_assert!(body.get("exp").is_some_and(Value::is_number));
                prop_assert_eq!(body.get("iss"), Some(&Value::from("https://issuer.test")));
                prop_assert!(header.get("crit").is_none() && header.get("b64").is_none());
            }
        }

        /// Arbitrary bytes as a JWKS document: no panic.
        #[test]
        fn fuzz_jwks_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            if let Ok(doc) = keyfleet_core::parse_jwks(&bytes) {
                let _ = KeySet::build(0, None, &doc.keys, [], []);
            }
        }

        /// JWKS documents of arbitrary JSON keys: no panic; every key that passes screening is
        /// a canonical, non-weak Ed25519 public key.
        #[test]
        fn fuzz_jwks_documents(keys in proptest::collection::vec(jwk_value(), 0..8)) {
            let text = serde_json::json!({ "keys": keys }).to_string();
            let doc = keyfleet_core::parse_jwks(text.as_bytes()).unwrap();
            let (set, _) = KeySet::build(0, None, &doc.keys, [], []);
            for kid in set.kids() {
                let k = set.key(kid).unwrap();
                prop_assert!(!k.is_weak());
                prop_assert_eq!(k.to_edwards().compress().to_bytes(), k.to_bytes());
            }
        }
    }

    /// JWK-shaped objects: the real members with plausible and hostile values.
    fn jwk_value() -> impl Strategy<Value = Value> {
        let x = prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..40).prop_map(|b| URL_SAFE_NO_PAD.encode(b)),
            any::<[u8; 32]>().prop_map(|b| URL_SAFE_NO_PAD.encode(b)),
            (0u8..=255).prop_map(|s| URL_SAFE_NO_PAD
                .encode(SigningKey::from_bytes(&[s; 32]).verifying_key().to_bytes())),
        ];
        let pick = |v: Vec<&'static str>| proptest::sample::select(v).prop_map(Value::from);
        (
            pick(vec!["OKP", "EC", "RSA", "oct", ""]),
            pick(vec!["Ed25519", "X25519", "Ed448", ""]),
            x,
            pick(vec!["k1", "k2", ""]),
            pick(vec!["sig", "enc", ""]),
            any::<bool>(),
            json_value(),
        )
            .prop_map(|(kty, crv, x, kid, use_, private, extra)| {
                let mut m = serde_json::Map::new();
                m.insert("kty".into(), kty);
                m.insert("crv".into(), crv);
                m.insert("x".into(), x.into());
                m.insert("kid".into(), kid);
                m.insert("use".into(), use_);
                if private {
                    m.insert("d".into(), "AAAA".into());
                }
                m.insert("extra".into(), extra);
                Value::Object(m)
            })
    }

    /// Signs raw bytes (not necessarily JSON or UTF-8) as header and claims with key 1.
    fn raw_bytes(header: &[u8], body: &[u8]) -> String {
        use ed25519_dalek::Signer;
        let input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header),
            URL_SAFE_NO_PAD.encode(body)
        );
        let sig = key(1).0.sign(input.as_bytes());
        format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig.to_bytes()))
    }
}
