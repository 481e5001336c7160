//! The state one JWKS version names, its digest, and deltas between two states.

use std::collections::{BTreeMap, BTreeSet};

use keyfleet_proto::v1::{Jwk, JwksDelta, JwksSnapshot, RevokedSession, RevokedToken};
use sha2::{Digest as _, Sha256};

/// SHA-256 of a [`FeedState`]'s canonical encoding.
pub type Digest = [u8; 32];

/// Everything a version of the key set names: the issuer, the signing kid, the published keys
/// (by kid), the emergency-revoked kids, the denied tokens (by jti, with their `until`) and the
/// ended sessions (by sid, with their `until`). Ordered maps, so the canonical encoding and the
/// digest do not depend on arrival order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FeedState {
    pub issuer: String,
    pub active_kid: String,
    pub keys: BTreeMap<String, Jwk>,
    pub revoked_kids: BTreeSet<String>,
    pub revoked_tokens: BTreeMap<String, i64>,
    /// Ended sessions: access tokens whose `sid` is listed are refused until `until`.
    pub revoked_sessions: BTreeMap<String, i64>,
}

impl FeedState {
    /// The state a full snapshot names (its `delta`, `version`, `generated_at` and `digest`
    /// are not part of it). A repeated kid, jti or sid keeps its last entry.
    pub fn from_snapshot(snapshot: &JwksSnapshot) -> FeedState {
        FeedState {
            issuer: snapshot.issuer.clone(),
            active_kid: snapshot.active_kid.clone(),
            keys: snapshot
                .keys
                .iter()
                .map(|k| (k.kid.clone(), k.clone()))
                .collect(),
            revoked_kids: snapshot.revoked_kids.iter().cloned().collect(),
            revoked_tokens: snapshot
                .revoked_tokens
                .iter()
                .map(|t| (t.jti.clone(), t.until))
                .collect(),
            revoked_sessions: snapshot
                .revoked_sessions
                .iter()
                .map(|s| (s.sid.clone(), s.until))
                .collect(),
        }
    }

    /// The full snapshot of this state at `version`, with its digest.
    pub fn snapshot(&self, version: u64, generated_at: i64) -> JwksSnapshot {
        self.snapshot_and_digest(version, generated_at).0
    }

    /// [`FeedState::snapshot`] and the digest it carries, the state encoded once for both.
    pub(crate) fn snapshot_and_digest(
        &self,
        version: u64,
        generated_at: i64,
    ) -> (JwksSnapshot, Digest) {
        let mut snapshot = self.canonical();
        let digest = digest_of(&snapshot);
        snapshot.version = version;
        snapshot.generated_at = generated_at;
        snapshot.digest = digest.to_vec();
        (snapshot, digest)
    }

    /// The state as a `JwksSnapshot` with only fields 2–6 and 10 set, in canonical order (keys
    /// by kid, revoked kids sorted, revoked tokens by jti, revoked sessions by sid): the bytes
    /// the digest covers. With no revoked session, field 10 writes no byte, so such a state has
    /// the digest it had before sessions existed.
    fn canonical(&self) -> JwksSnapshot {
        JwksSnapshot {
            issuer: self.issuer.clone(),
            keys: self.keys.values().cloned().collect(),
            revoked_kids: self.revoked_kids.iter().cloned().collect(),
            revoked_tokens: self
                .revoked_tokens
                .iter()
                .map(|(jti, until)| RevokedToken {
                    jti: jti.clone(),
                    until: *until,
                })
                .collect(),
            active_kid: self.active_kid.clone(),
            revoked_sessions: self.revoked_sessions_list(),
            ..JwksSnapshot::default()
        }
    }

    /// The revoked sessions as the proto lists them, by sid.
    fn revoked_sessions_list(&self) -> Vec<RevokedSession> {
        self.revoked_sessions
            .iter()
            .map(|(sid, until)| RevokedSession {
                sid: sid.clone(),
                until: *until,
            })
            .collect()
    }

    /// SHA-256 of the protobuf encoding of the canonical snapshot: a `JwksSnapshot` with
    /// `issuer`, `keys` (sorted by kid), `revoked_kids` (sorted), `revoked_tokens` (sorted by
    /// jti), `active_kid` and `revoked_sessions` (sorted by sid) set and every other field at its
    /// default, fields written in field number order as every protobuf encoder does for these
    /// messages.
    pub fn digest(&self) -> Digest {
        digest_of(&self.canonical())
    }

    /// What changed from `self` to `newer`, as a delta applying to `base_version` (the
    /// version of `self`). Empty lists when nothing changed.
    pub fn diff(&self, newer: &FeedState, base_version: u64) -> JwksDelta {
        JwksDelta {
            base_version,
            revoked_sessions_added: newer
                .revoked_sessions
                .iter()
                .filter(|(sid, until)| self.revoked_sessions.get(*sid) != Some(until))
                .map(|(sid, until)| RevokedSession {
                    sid: sid.clone(),
                    until: *until,
                })
                .collect(),
            revoked_sessions_dropped: self
                .revoked_sessions
                .keys()
                .filter(|sid| !newer.revoked_sessions.contains_key(*sid))
                .cloned()
                .collect(),
            upserted_keys: newer
                .keys
                .iter()
                .filter(|(kid, jwk)| self.keys.get(*kid) != Some(jwk))
                .map(|(_, jwk)| jwk.clone())
                .collect(),
            removed_kids: self
                .keys
                .keys()
                .filter(|kid| !newer.keys.contains_key(*kid))
                .cloned()
                .collect(),
            revoked_kids_added: newer
                .revoked_kids
                .difference(&self.revoked_kids)
                .cloned()
                .collect(),
            revoked_kids_dropped: self
                .revoked_kids
                .difference(&newer.revoked_kids)
                .cloned()
                .collect(),
            revoked_tokens_added: newer
                .revoked_tokens
                .iter()
                .filter(|(jti, until)| self.revoked_tokens.get(*jti) != Some(until))
                .map(|(jti, until)| RevokedToken {
                    jti: jti.clone(),
                    until: *until,
                })
                .collect(),
            revoked_tokens_dropped: self
                .revoked_tokens
                .keys()
                .filter(|jti| !newer.revoked_tokens.contains_key(*jti))
                .cloned()
                .collect(),
        }
    }

    /// Applies `delta` and the `issuer` and `active_kid` its message carries (empty: unchanged
    /// from the base). The caller has checked that `delta.base_version` is the version this
    /// state is at, and checks the resulting digest.
    pub fn apply(&mut self, delta: &JwksDelta, issuer: &str, active_kid: &str) {
        for kid in &delta.removed_kids {
            self.keys.remove(kid);
        }
        for jwk in &delta.upserted_keys {
            self.keys.insert(jwk.kid.clone(), jwk.clone());
        }
        for kid in &delta.revoked_kids_dropped {
            self.revoked_kids.remove(kid);
        }
        self.revoked_kids
            .extend(delta.revoked_kids_added.iter().cloned());
        for jti in &delta.revoked_tokens_dropped {
            self.revoked_tokens.remove(jti);
        }
        for t in &delta.revoked_tokens_added {
            self.revoked_tokens.insert(t.jti.clone(), t.until);
        }
        for sid in &delta.revoked_sessions_dropped {
            self.revoked_sessions.remove(sid);
        }
        for s in &delta.revoked_sessions_added {
            self.revoked_sessions.insert(s.sid.clone(), s.until);
        }
        if !issuer.is_empty() {
            issuer.clone_into(&mut self.issuer);
        }
        if !active_kid.is_empty() {
            active_kid.clone_into(&mut self.active_kid);
        }
    }
}

fn digest_of(canonical: &JwksSnapshot) -> Digest {
    Sha256::digest(prost::Message::encode_to_vec(canonical)).into()
}

/// True when a delta changes nothing.
#[cfg(test)]
pub(crate) fn is_empty(delta: &JwksDelta) -> bool {
    delta.upserted_keys.is_empty()
        && delta.removed_kids.is_empty()
        && delta.revoked_kids_added.is_empty()
        && delta.revoked_kids_dropped.is_empty()
        && delta.revoked_tokens_added.is_empty()
        && delta.revoked_tokens_dropped.is_empty()
        && delta.revoked_sessions_added.is_empty()
        && delta.revoked_sessions_dropped.is_empty()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn jwk(kid: &str, x: &str) -> Jwk {
        Jwk {
            kid: kid.into(),
            kty: "OKP".into(),
            crv: "Ed25519".into(),
            x: x.into(),
            alg: "EdDSA".into(),
            r#use: "sig".into(),
        }
    }

    /// A state drawn from a small alphabet, so that random pairs share and differ in entries.
    fn state() -> impl Strategy<Value = FeedState> {
        (
            prop::sample::select(vec!["https://a.test", "https://b.test"]),
            prop::collection::btree_map("k[0-7]", "x[0-2]", 0..6),
            prop::collection::btree_set("k[0-9]", 0..4),
            prop::collection::btree_map("j[0-9]{1,2}", 0i64..5, 0..30),
            prop::collection::btree_map("s[0-9]{1,2}", 0i64..5, 0..30),
        )
            .prop_map(
                |(issuer, keys, revoked_kids, revoked_tokens, revoked_sessions)| {
                    // Never empty: an authority always has a signing key (and an empty issuer or
                    // active kid in a delta's message means "unchanged").
                    let active_kid = keys
                        .keys()
                        .next()
                        .cloned()
                        .unwrap_or_else(|| "k-none".into());
                    FeedState {
                        issuer: issuer.into(),
                        active_kid,
                        keys: keys
                            .into_iter()
                            .map(|(kid, x)| (kid.clone(), jwk(&kid, &x)))
                            .collect(),
                        revoked_kids,
                        revoked_tokens,
                        revoked_sessions,
                    }
                },
            )
    }

    proptest! {
        /// Applying the deltas of a random sequence of states gives, at every step, exactly the
        /// state a full snapshot gives, with the same digest.
        #[test]
        fn deltas_give_what_full_snapshots_give(states in prop::collection::vec(state(), 1..12)) {
            let mut held = FeedState::from_snapshot(&states[0].snapshot(1, 0));
            for (i, pair) in states.windows(2).enumerate() {
                let delta = pair[0].diff(&pair[1], i as u64 + 1);
                held.apply(&delta, &pair[1].issuer, &pair[1].active_kid);
                let full = FeedState::from_snapshot(&pair[1].snapshot(i as u64 + 2, 0));
                prop_assert_eq!(&held, &full);
                prop_assert_eq!(held.digest(), pair[1].digest());
                let same_lists = pair[0].keys == pair[1].keys
                    && pair[0].revoked_kids == pair[1].revoked_kids
                    && pair[0].revoked_tokens == pair[1].revoked_tokens
                    && pair[0].revoked_sessions == pair[1].revoked_sessions;
                prop_assert_eq!(is_empty(&delta), same_lists);
            }
        }
    }

    #[test]
    fn the_digest_ignores_arrival_order_but_not_content() {
        let a = JwksSnapshot {
            issuer: "i".into(),
            keys: vec![jwk("a", "1"), jwk("b", "2")],
            revoked_tokens: vec![
                RevokedToken {
                    jti: "x".into(),
                    until: 1,
                },
                RevokedToken {
                    jti: "y".into(),
                    until: 2,
                },
            ],
            ..Default::default()
        };
        let mut b = a.clone();
        b.keys.reverse();
        b.revoked_tokens.reverse();
        b.version = 9;
        b.generated_at = 5;
        let (sa, sb) = (FeedState::from_snapshot(&a), FeedState::from_snapshot(&b));
        assert_eq!(sa.digest(), sb.digest());
        b.revoked_tokens[0].until = 3;
        assert_ne!(sa.digest(), FeedState::from_snapshot(&b).digest());
    }

    #[test]
    fn one_revocation_is_a_small_delta_whatever_the_deny_list() {
        let mut before = FeedState::default();
        for i in 0..10_000 {
            before
                .revoked_tokens
                .insert(format!("jti-{i:06}"), 1_900_000_000);
        }
        let mut after = before.clone();
        after
            .revoked_tokens
            .insert("a-new-token-id".into(), 1_900_000_000);
        let delta = before.diff(&after, 41);
        assert_eq!(delta.revoked_tokens_added.len(), 1);
        assert!(prost::Message::encoded_len(&delta) < 64);
    }
}
