//! `VerifyBatch`: many tokens in one call, their signatures checked together with Ed25519
//! batch verification, each answer equal to the one `Verify` gives.
//!
//! Every token goes through [`validate_with`] twice at most: once to reach its signature (the
//! check is deferred, so no claim is parsed before the signature is known good), then, once
//! the batch says the signatures hold, again with the answer. When a batch fails, each
//! signature is checked on its own with strict verification, so one forged token costs the
//! others nothing but time. Keys are screened with `is_weak` when a key set is built; what
//! `verify_strict` also refuses and batch verification would not (a small-order or
//! non-canonical `R`) is screened here, before the batch.

use ed25519_dalek::{Signature, VerifyingKey};
use keyfleet_core::token::Refusal;
use keyfleet_core::{KeySet, Policy, Reason, UnixSeconds, Verified, validate_with};
use keyfleet_proto::v1::{VerifyRequest, VerifyResponse};
use tonic::Status;

use super::Verifier;
use super::decide::{Inflight, from_proto, policy_of, usable};

/// The most tokens one `VerifyBatch` may carry.
pub const MAX_BATCH: usize = 1024;

/// One signature waiting for the batch.
struct Pending<'t> {
    index: usize,
    key: VerifyingKey,
    message: &'t [u8],
    signature: Signature,
}

/// Validates every `(token, audience)` as [`keyfleet_core::validate`] would, with one batch
/// signature verification for all of them.
pub(crate) fn validate_all(
    items: &[(&str, Option<&str>)],
    keys: &KeySet,
    now: UnixSeconds,
    policy: &Policy,
) -> Vec<Result<Verified, Refusal>> {
    let mut verdicts = Vec::with_capacity(items.len());
    let mut pending: Vec<Pending<'_>> = Vec::new();
    for (index, &(token, audience)) in items.iter().enumerate() {
        let mut reached = None;
        // The deferred check answers "bad signature" for now; the batch decides below.
        let verdict = validate_with(token, keys, now, policy, audience, |key, message, sig| {
            reached = <[u8; 64]>::try_from(sig)
                .ok()
                .map(|sig| (*key, message, Signature::from_bytes(&sig)));
            false
        });
        if let Some((key, message, signature)) = reached
            && plausible(&signature)
        {
            pending.push(Pending {
                index,
                key,
                message,
                signature,
            });
        }
        verdicts.push(verdict);
    }
    if pending.is_empty() {
        return verdicts;
    }
    let all_good = {
        let messages: Vec<&[u8]> = pending.iter().map(|p| p.message).collect();
        let signatures: Vec<Signature> = pending.iter().map(|p| p.signature).collect();
        let keys: Vec<VerifyingKey> = pending.iter().map(|p| p.key).collect();
        ed25519_dalek::verify_batch(&messages, &signatures, &keys).is_ok()
    };
    for p in pending {
        let good = all_good || p.key.verify_strict(p.message, &p.signature).is_ok();
        if good {
            let (token, audience) = items[p.index];
            verdicts[p.index] = validate_with(token, keys, now, policy, audience, |_, _, _| true);
        }
    }
    verdicts
}

/// False for a signature `verify_strict` refuses whatever the key and message: `S` not
/// canonical, `R` not a canonical encoding, or `R` of small order. Batch verification checks
/// only the first, so the other two are screened here (libsodium's blocklist, sign bit ignored).
fn plausible(signature: &Signature) -> bool {
    let r = signature.r_bytes();
    let mut y = *r;
    y[31] &= 0x7f;
    // y >= p = 2^255 - 19 is a non-canonical encoding.
    let non_canonical = y[31] == 0x7f && y[1..31].iter().all(|b| *b == 0xff) && y[0] >= 0xed;
    let small_order = SMALL_ORDER_Y.contains(&y);
    // A canonical `S` is below the group order; a set top bit is never canonical.
    let s_plausible = signature.s_bytes()[31] & 0xe0 == 0;
    !non_canonical && !small_order && s_plausible
}

/// The `y` coordinates (sign bit cleared) of the eight small-order points.
const SMALL_ORDER_Y: [[u8; 32]; 5] = [
    // y = 0: the two points of order 4.
    [0; 32],
    // y = 1: the identity.
    [
        1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        0, 0,
    ],
    // y = p - 1: the point of order 2.
    [
        0xec, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
        0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
        0xff, 0x7f,
    ],
    // The four points of order 8.
    [
        0x26, 0xe8, 0x95, 0x8f, 0xc2, 0xb2, 0x27, 0xb0, 0x45, 0xc3, 0xf4, 0x89, 0xf2, 0xef, 0x98,
        0xf0, 0xd5, 0xdf, 0xac, 0x05, 0xd3, 0xc6, 0x33, 0x39, 0xb1, 0x38, 0x02, 0x88, 0x6d, 0x53,
        0xfc, 0x05,
    ],
    [
        0xc7, 0x17, 0x6a, 0x70, 0x3d, 0x4d, 0xd8, 0x4f, 0xba, 0x3c, 0x0b, 0x76, 0x0d, 0x10, 0x67,
        0x0f, 0x2a, 0x20, 0x53, 0xfa, 0x2c, 0x39, 0xcc, 0xc6, 0x4e, 0xc7, 0xfd, 0x77, 0x92, 0xac,
        0x03, 0x7a,
    ],
];

impl Verifier {
    /// Answers many `Verify` requests in one go, in order. Each answer equals the one
    /// [`Verifier::verify_token`] gives for the same request; an error means the node cannot
    /// answer at all (or the batch is larger than [`MAX_BATCH`]).
    pub async fn verify_batch(
        &self,
        requests: &[VerifyRequest],
    ) -> Result<Vec<VerifyResponse>, Status> {
        if requests.len() > MAX_BATCH {
            return Err(Status::invalid_argument(format!(
                "a batch holds at most {MAX_BATCH} tokens"
            )));
        }
        let metrics = &self.inner.metrics;
        let _inflight = Inflight::enter(metrics);
        let keys = &self.inner.keys;
        let held = usable(keys)?;
        let policy = policy_of(&held)?;
        if keys.is_stale() {
            // The single path answers UNAVAILABLE for each; so does the batch.
            let mut out = Vec::with_capacity(requests.len());
            for r in requests {
                out.push(self.verify_token(&r.token, &r.audience).await?);
            }
            return Ok(out);
        }
        let now = self.inner.config.clock.now();
        let cache = &self.inner.cache;
        let mut answers: Vec<Option<VerifyResponse>> = vec![None; requests.len()];
        let mut misses = Vec::new();
        let mut items = Vec::new();
        for (i, r) in requests.iter().enumerate() {
            let audience = (!r.audience.is_empty()).then_some(r.audience.as_str());
            let key = cache.key(&r.token, audience);
            match cache.get(key.as_ref(), &held, policy, now) {
                Some(hit) => answers[i] = Some(hit),
                None => {
                    misses.push((i, key));
                    items.push((r.token.as_str(), audience));
                }
            }
        }
        let verdicts = validate_all(&items, &held.keys, now, policy);
        for ((i, key), verdict) in misses.into_iter().zip(verdicts) {
            let unknown_kid = matches!(
                &verdict,
                Err(Refusal {
                    reason: Reason::UnknownKid,
                    ..
                })
            );
            answers[i] = Some(if unknown_kid {
                // The single path owns the coalesced, rate-limited refresh for a new kid.
                let r = &requests[i];
                self.decide(&r.token, &r.audience).await?
            } else {
                let response = self.response(verdict);
                cache.insert(key, &held, policy, &response);
                response
            });
        }
        let out: Vec<VerifyResponse> = answers.into_iter().flatten().collect();
        for response in &out {
            metrics.verified(from_proto(response.reason()));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::SigningKey;
    use keyfleet_core::{Jwk, TokenClaims, sign_token, validate};

    #[test]
    fn blocklisted_r_values_are_exactly_the_weak_points() {
        for y in SMALL_ORDER_Y {
            for sign in [0u8, 0x80] {
                let mut r = y;
                r[31] |= sign;
                // Either no point at all, or a small-order one.
                if let Ok(k) = VerifyingKey::from_bytes(&r) {
                    assert!(k.is_weak(), "{r:?}");
                }
            }
        }
        let key = SigningKey::from_bytes(&[9; 32]);
        for i in 0..64u8 {
            let sig = ed25519_dalek::Signer::sign(&key, &[i]);
            assert!(plausible(&sig));
        }
    }

    fn claims(sub: &str, aud: &str, exp: i64) -> TokenClaims {
        TokenClaims {
            iss: "https://issuer.test".into(),
            sub: sub.into(),
            aud: vec![aud.into()],
            iat: 1_000,
            nbf: 1_000,
            exp,
            jti: format!("jti-{sub}"),
            extra: Default::default(),
        }
    }

    /// The batch path and the plain path give the same verdict for every token, valid or not,
    /// whether the batch holds only good signatures or some bad ones.
    #[test]
    fn batch_verdicts_equal_the_plain_path() {
        let good = SigningKey::from_bytes(&[1; 32]);
        let other = SigningKey::from_bytes(&[2; 32]);
        let revoked = SigningKey::from_bytes(&[3; 32]);
        let jwks = [
            Jwk::ed25519("k1", &good.verifying_key().to_bytes()),
            Jwk::ed25519("k2", &other.verifying_key().to_bytes()),
        ];
        let (keys, _) = KeySet::build(
            1,
            None,
            &jwks,
            ["k3".to_owned()],
            [("jti-denied".to_owned(), 5_000)],
        );
        let any_audience = Policy::new("https://issuer.test");
        // A node guarding two audiences, one of which the tokens below name.
        let guarding = Policy {
            audiences: vec!["billing".into(), "orders".into()],
            ..Policy::new("https://issuer.test")
        };
        let only_billing = Policy {
            audiences: vec!["billing".into()],
            ..Policy::new("https://issuer.test")
        };
        let now = 2_000;
        let mut tokens: Vec<(String, Option<&str>)> = Vec::new();
        for i in 0..20 {
            tokens.push((
                sign_token(&good, "k1", &claims(&format!("u{i}"), "orders", 3_000)),
                Some("orders"),
            ));
        }
        let valid = tokens[0].0.clone();
        let mut forged = valid.clone();
        forged.truncate(valid.rfind('.').unwrap() + 1);
        forged.push_str(
            &sign_token(&other, "k1", &claims("u0", "orders", 3_000))
                [valid.rfind('.').unwrap() + 1..],
        );
        let mut invalid: Vec<(String, Option<&str>)> = vec![
            (
                sign_token(&other, "k1", &claims("x", "orders", 3_000)),
                Some("orders"),
            ),
            (forged, Some("orders")),
            (
                sign_token(&good, "k1", &claims("x", "orders", 1_500)),
                Some("orders"),
            ),
            (
                sign_token(&good, "k1", &claims("x", "billing", 3_000)),
                Some("orders"),
            ),
            (
                sign_token(&good, "nope", &claims("x", "orders", 3_000)),
                Some("orders"),
            ),
            (
                sign_token(&revoked, "k3", &claims("x", "orders", 3_000)),
                Some("orders"),
            ),
            (
                sign_token(&good, "k1", &claims("denied", "orders", 3_000)),
                Some("orders"),
            ),
            (
                sign_token(&other, "k2", &claims("y", "orders", 3_000)),
                None,
            ),
            ("not.a.jwt".to_owned(), None),
            ("".to_owned(), None),
            (format!("{valid}x"), Some("orders")),
        ];
        // A signature whose R is the identity: batch verification alone would not refuse it.
        let mut weak_r = valid.clone();
        let cut = weak_r.rfind('.').unwrap() + 1;
        let mut sig = [0u8; 64];
        sig[0] = 1;
        weak_r.truncate(cut);
        base64::Engine::encode_string(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD,
            sig,
            &mut weak_r,
        );
        invalid.push((weak_r, Some("orders")));
        let check = |set: &[(String, Option<&str>)]| {
            let items: Vec<(&str, Option<&str>)> =
                set.iter().map(|(t, a)| (t.as_str(), *a)).collect();
            for policy in [&any_audience, &guarding, &only_billing] {
                let batch = validate_all(&items, &keys, now, policy);
                for ((token, audience), got) in set.iter().zip(batch) {
                    assert_eq!(
                        got,
                        validate(token, &keys, now, policy, *audience),
                        "{token}"
                    );
                }
            }
        };
        check(&tokens);
        let mut mixed = tokens.clone();
        mixed.extend(invalid.iter().cloned());
        check(&mixed);
        check(&invalid);
        // Every good token still verifies inside a failing batch.
        let items: Vec<(&str, Option<&str>)> =
            mixed.iter().map(|(t, a)| (t.as_str(), *a)).collect();
        let ok = |policy| {
            validate_all(&items, &keys, now, policy)
                .iter()
                .filter(|v| v.is_ok())
                .count()
        };
        assert_eq!(ok(&any_audience), tokens.len() + 1);
        assert_eq!(ok(&guarding), tokens.len() + 1);
        // Every token names only "orders": a node guarding only "billing" accepts none.
        assert_eq!(ok(&only_billing), 0);
    }
}
