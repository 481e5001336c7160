//! keyfleet-core's integration tests: token validation verdicts, the key ring's lifecycle on an
//! explicit timeline, and the Wycheproof Ed25519 vectors through the signature path.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ed25519_dalek::SigningKey;
use keyfleet_core::jwk::thumbprint;
use keyfleet_core::ring::TickOutcome;
use keyfleet_core::token::verify_signature;
use keyfleet_core::{
    Jwk, KeyRing, KeySet, KeyState, NewKey, Policy, Reason, RingError, RingPolicy, TokenClaims,
    sign_token, validate,
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
    let policy = Policy {
        audience: None,
        ..Policy::new("https://issuer.test")
    };
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

#[test]
fn node_audience_is_enforced() {
    let (a, ka) = key(1);
    let token = sign_token(&a, &ka, &claims());
    let policy = Policy {
        audience: Some("billing".into()),
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
