//! `VerifyBatch`: many tokens in one call, their signatures checked together with Ed25519
//! batch verification, each answer equal to the one `Verify` gives; and [`validate_all`], the
//! same for any list of tokens (the combined single `Verify` calls of `combine.rs` use it too).
//!
//! Every token goes through [`validate_with`] twice at most: once to reach its signature (the
//! check is deferred, so no claim is parsed before the signature is known good), then, once
//! the signatures are known good, again with the answer. How the signatures are checked
//! together, and screened so that each answer is the one `verify_strict` gives, is
//! `signatures.rs`.

use ed25519_dalek::Signature;
use keyfleet_core::token::Refusal;
use keyfleet_core::{Policy, Reason, UnixSeconds, Verified, validate_with};
use keyfleet_proto::v1::{VerifyRequest, VerifyResponse};
use tonic::Status;

use super::Verifier;
use super::decide::{Inflight, demands_of, from_proto, policy_of, usable};
use super::signatures::{Signed, check_all};
use crate::keyset::Held;

/// The most tokens one `VerifyBatch` may carry.
pub const MAX_BATCH: usize = 1024;

/// What [`validate_all`] found.
pub(crate) struct Validated {
    /// One verdict per token, in order.
    pub(crate) verdicts: Vec<Result<Verified, Refusal>>,
    /// True when the batch equation failed and each signature was checked on its own.
    pub(crate) fell_back: bool,
}

/// Validates every `(token, audience)` as [`keyfleet_core::validate`] would against
/// `held.keys`, with one batch signature verification for all of them (see `signatures.rs`).
pub(crate) fn validate_all(
    items: &[(&str, Option<&str>)],
    held: &Held,
    now: UnixSeconds,
    policy: &Policy,
) -> Validated {
    let keys = &held.keys;
    let mut verdicts = Vec::with_capacity(items.len());
    let mut reached = Vec::new();
    let mut signed = Vec::new();
    for (index, &(token, audience)) in items.iter().enumerate() {
        let mut found = None;
        // The deferred check answers "bad signature" for now; the batch decides below.
        let verdict = validate_with(token, keys, now, policy, audience, |key, message, sig| {
            found = <[u8; 64]>::try_from(sig).ok().map(|sig| Signed {
                key: *key,
                message,
                signature: Signature::from_bytes(&sig),
            });
            false
        });
        if let Some(s) = found {
            reached.push(index);
            signed.push(s);
        }
        verdicts.push(verdict);
    }
    if signed.is_empty() {
        return Validated {
            verdicts,
            fell_back: false,
        };
    }
    let checked = check_all(&signed, &held.unbatchable);
    for (index, good) in reached.into_iter().zip(checked.good) {
        if good {
            let (token, audience) = items[index];
            verdicts[index] = validate_with(token, keys, now, policy, audience, |_, _, _| true);
        }
    }
    Validated {
        verdicts,
        fell_back: checked.fell_back,
    }
}

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
                out.push(
                    self.verify_token(&r.token, &r.audience, demands_of(r))
                        .await?,
                );
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
            match cache.get(key.as_ref(), &held, policy, now, &demands_of(r)) {
                Some(hit) => {
                    answers[i] = Some(hit.unwrap_or_else(|refusal| self.response(Err(refusal))))
                }
                None => {
                    misses.push((i, key));
                    items.push((r.token.as_str(), audience));
                }
            }
        }
        let verdicts = validate_all(&items, &held, now, policy).verdicts;
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
                self.decide(&r.token, &r.audience, &demands_of(r)).await?
            } else {
                self.answer(verdict, key, &held, &demands_of(&requests[i]), now)
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
    use keyfleet_core::{Jwk, KeySet, TokenClaims, sign_token, validate};

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
        let held = Held::new(keys, None);
        let keys = &held.keys;
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
                let batch = validate_all(&items, &held, now, policy).verdicts;
                for ((token, audience), got) in set.iter().zip(batch) {
                    assert_eq!(
                        got,
                        validate(token, keys, now, policy, *audience),
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
            validate_all(&items, &held, now, policy)
                .verdicts
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
