//! The ring as the proto API shows it: the `JwksSnapshot` verifiers receive (and its public
//! part anyone may read), and the `KeyInfo` rows of `ListKeys`.

use keyfleet_core::{KeyRecord, KeyRing, KeyState, UnixSeconds};
use keyfleet_proto::v1 as pb;

/// The snapshot verifiers receive for `ring`.
pub(crate) fn snapshot(ring: &KeyRing, issuer: &str, now: UnixSeconds) -> pb::JwksSnapshot {
    pb::JwksSnapshot {
        version: ring.version,
        issuer: issuer.to_owned(),
        keys: ring
            .jwks()
            .into_iter()
            .map(|k| pb::Jwk {
                kid: k.kid,
                kty: k.kty,
                crv: k.crv,
                x: k.x,
                alg: k.alg,
                r#use: k.use_,
            })
            .collect(),
        revoked_kids: ring.revoked_kids.keys().cloned().collect(),
        revoked_tokens: ring
            .revoked_tokens
            .iter()
            .map(|(jti, until)| pb::RevokedToken {
                jti: jti.clone(),
                until: *until,
            })
            .collect(),
        active_kid: ring.active().kid.clone(),
        generated_at: now,
    }
}

/// `snapshot` without its deny lists, as anyone may read it (like the HTTP JWKS). A revoked
/// kid is already absent from `keys`.
pub(crate) fn public(snapshot: &pb::JwksSnapshot) -> pb::JwksSnapshot {
    pb::JwksSnapshot {
        version: snapshot.version,
        issuer: snapshot.issuer.clone(),
        keys: snapshot.keys.clone(),
        revoked_kids: Vec::new(),
        revoked_tokens: Vec::new(),
        active_kid: snapshot.active_kid.clone(),
        generated_at: snapshot.generated_at,
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
