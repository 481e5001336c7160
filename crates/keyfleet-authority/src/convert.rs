//! The ring as the proto API shows it: the key-set state verifiers receive (the feed encodes
//! its full, public and delta messages), and the `KeyInfo` rows of `ListKeys`.

use keyfleet_core::{KeyRecord, KeyRing, KeyState};
use keyfleet_feed::FeedState;
use keyfleet_proto::v1 as pb;

use crate::keys::RingState;

/// The key-set state verifiers receive for `state`: its published keys, active kid and deny
/// lists (kids, tokens, sessions).
pub(crate) fn feed_state(state: &RingState, issuer: &str) -> FeedState {
    let ring = &state.ring;
    FeedState {
        issuer: issuer.to_owned(),
        active_kid: ring.active().kid.clone(),
        keys: ring
            .jwks()
            .into_iter()
            .map(|k| {
                let jwk = pb::Jwk {
                    kid: k.kid,
                    kty: k.kty,
                    crv: k.crv,
                    x: k.x,
                    alg: k.alg,
                    r#use: k.use_,
                };
                (jwk.kid.clone(), jwk)
            })
            .collect(),
        revoked_kids: ring.revoked_kids.keys().cloned().collect(),
        revoked_tokens: ring
            .revoked_tokens
            .iter()
            .map(|(jti, until)| (jti.clone(), *until))
            .collect(),
        revoked_sessions: state.revoked_sessions.clone(),
    }
}

/// Every key the ring knows, then every revoked key it still remembers.
pub(crate) fn key_infos(ring: &KeyRing) -> Vec<pb::KeyInfo> {
    let mut keys: Vec<pb::KeyInfo> = ring.keys.iter().map(key_info).collect();
    let retention = ring.policy.retention();
    keys.extend(ring.revoked_kids.iter().map(|(kid, forget_at)| {
        match ring.revoked_records.get(kid) {
            Some(k) => key_info(k),
            // A ring written before revoked records were kept knows only the kid and when:
            // it remembers a revoked kid for exactly `retention` after its revocation.
            None => pb::KeyInfo {
                kid: kid.clone(),
                state: pb::KeyState::Revoked as i32,
                revoked_at: forget_at - retention,
                ..pb::KeyInfo::default()
            },
        }
    }));
    keys
}

fn key_info(k: &KeyRecord) -> pb::KeyInfo {
    pb::KeyInfo {
        kid: k.kid.clone(),
        state: proto_state(k.state) as i32,
        created_at: k.created_at,
        published_at: k.published_at,
        activated_at: k.activated_at.unwrap_or(0),
        deactivated_at: k.deactivated_at.unwrap_or(0),
        retire_at: k.retire_at.unwrap_or(0),
        revoked_at: k.revoked_at.unwrap_or(0),
        published_version: k.published_version,
    }
}

fn proto_state(state: KeyState) -> pb::KeyState {
    match state {
        KeyState::Next => pb::KeyState::Next,
        KeyState::Active => pb::KeyState::Active,
        KeyState::Retiring => pb::KeyState::Retiring,
        KeyState::Retired => pb::KeyState::Retired,
        KeyState::Revoked => pb::KeyState::Revoked,
    }
}
