use std::time::Duration;

use keyfleet_proto::v1::{Jwk, JwksSnapshot};

use super::*;

fn jwk(kid: &str) -> Jwk {
    Jwk {
        kid: kid.into(),
        kty: "OKP".into(),
        crv: "Ed25519".into(),
        x: "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo".into(),
        alg: "EdDSA".into(),
        r#use: "sig".into(),
    }
}

/// A ring like the authority's: three keys, a long issuer.
fn ring() -> FeedState {
    let mut s = FeedState {
        issuer: "https://authority.keyfleet.example".into(),
        active_kid: "kf-2026-12-02T05-00-00Z-4f3a".into(),
        ..FeedState::default()
    };
    for kid in [
        "kf-2026-12-02T04-00-00Z-19c2",
        "kf-2026-12-02T05-00-00Z-4f3a",
        "kf-2026-12-02T06-00-00Z-8be1",
    ] {
        s.keys.insert(kid.into(), jwk(kid));
    }
    s
}

fn revoke(state: &mut FeedState, i: usize) {
    // A jti as the authority mints them: 22 characters of base64url.
    state.revoked_tokens.insert(
        format!("Zx{i:04}q7Lw9VbN3kRtY2mP"),
        1_900_000_000 + i as i64,
    );
}

fn decode(m: &Message) -> JwksSnapshot {
    m.bytes.decode().unwrap()
}

async fn next(sub: &mut Subscription) -> Option<Message> {
    tokio::time::timeout(Duration::from_millis(50), sub.next())
        .await
        .ok()
        .flatten()
}

#[tokio::test]
async fn a_new_node_gets_the_full_set_then_deltas() {
    let mut state = ring();
    let feed = Feed::new(state.clone(), 1, 0, Limits::default());
    let mut sub = feed.subscribe(true, None);
    let first = next(&mut sub).await.unwrap();
    assert!(first.full);
    let mut held = FeedState::from_snapshot(&decode(&first));
    assert_eq!(held, state);
    assert!(next(&mut sub).await.is_none(), "up to date: waits");

    revoke(&mut state, 1);
    feed.publish(state.clone(), 2, 10);
    let m = next(&mut sub).await.unwrap();
    assert!(!m.full);
    let d = decode(&m);
    let delta = d.delta.as_ref().unwrap();
    assert_eq!((d.version, delta.base_version), (2, 1));
    held.apply(delta, &d.issuer, &d.active_kid);
    assert_eq!(held, state);
    assert_eq!(d.digest, state.digest().to_vec());
}

#[tokio::test]
async fn a_revocation_costs_the_same_few_bytes_whatever_the_deny_list() {
    let mut state = ring();
    let feed = Feed::new(state.clone(), 1, 0, Limits::default());
    let mut sizes = Vec::new();
    for i in 0..200 {
        revoke(&mut state, i);
        feed.publish(state.clone(), 2 + i as u64, 1_800_000_000);
        let newest = feed.current();
        sizes.push(newest.log.back().unwrap().bytes.len());
    }
    let (first, last) = (sizes[0], sizes[199]);
    // Only the version numbers' varints grow (1 to 2 bytes each).
    assert!(
        last - first <= 4,
        "independent of the deny list's size: {sizes:?}"
    );
    assert!(last <= 128, "{last} bytes per revocation");
    assert!(feed.current().full.len() > 200 * 30);
}

#[tokio::test]
async fn a_slow_reader_walks_the_log_one_delta_at_a_time() {
    let mut state = ring();
    let feed = Feed::new(state.clone(), 1, 0, Limits::default());
    let mut sub = feed.subscribe(true, None);
    let mut held = FeedState::from_snapshot(&decode(&next(&mut sub).await.unwrap()));
    for i in 0..5 {
        revoke(&mut state, i);
        feed.publish(state.clone(), 2 + i as u64, 0);
    }
    for version in 2..=6 {
        let m = next(&mut sub).await.unwrap();
        assert!(!m.full);
        assert_eq!(m.version, version);
        let d = decode(&m);
        held.apply(d.delta.as_ref().unwrap(), &d.issuer, &d.active_kid);
        assert_eq!(held.digest().to_vec(), d.digest);
    }
    assert_eq!(held, state);
    assert!(next(&mut sub).await.is_none());
}

#[tokio::test]
async fn resume_gets_only_the_changes_since_the_version_held() {
    let mut state = ring();
    let feed = Feed::new(state.clone(), 1, 0, Limits::default());
    let held_digest = state.digest();
    revoke(&mut state, 1);
    feed.publish(state.clone(), 2, 0);

    let mut sub = feed.subscribe(true, Some((1, &held_digest)));
    let m = next(&mut sub).await.unwrap();
    assert!(!m.full, "one delta, not the whole set");
    assert_eq!(decode(&m).delta.unwrap().base_version, 1);
    assert!(next(&mut sub).await.is_none());

    // At the newest version: an empty delta says so.
    let mut sub = feed.subscribe(true, Some((2, &state.digest())));
    let m = next(&mut sub).await.unwrap();
    let d = decode(&m);
    assert!(!m.full);
    assert_eq!(d.delta.unwrap().base_version, 2);
    assert_eq!(d.version, 2);

    // A digest that is not that version's: the whole set.
    let mut sub = feed.subscribe(true, Some((1, &[0u8; 32])));
    assert!(next(&mut sub).await.unwrap().full);
    // A version the log does not reach: the whole set.
    let mut sub = feed.subscribe(true, Some((0, &held_digest)));
    assert!(next(&mut sub).await.unwrap().full);
}

#[tokio::test]
async fn a_node_without_deltas_gets_full_snapshots_only() {
    let mut state = ring();
    let feed = Feed::new(state.clone(), 1, 0, Limits::default());
    let mut sub = feed.subscribe(false, Some((1, &state.digest())));
    assert!(next(&mut sub).await.unwrap().full);
    revoke(&mut state, 1);
    feed.publish(state.clone(), 2, 0);
    revoke(&mut state, 2);
    feed.publish(state.clone(), 3, 0);
    let m = next(&mut sub).await.unwrap();
    assert!(m.full);
    assert_eq!(m.version, 3, "only the newest, no backlog");
    assert_eq!(FeedState::from_snapshot(&decode(&m)), state);
}

#[tokio::test]
async fn past_the_log_a_node_gets_the_whole_set() {
    let mut state = ring();
    let limits = Limits {
        max_changes: 3,
        max_bytes: 1 << 20,
    };
    let feed = Feed::new(state.clone(), 1, 0, limits);
    let mut sub = feed.subscribe(true, None);
    next(&mut sub).await.unwrap();
    for i in 0..5 {
        revoke(&mut state, i);
        feed.publish(state.clone(), 2 + i as u64, 0);
    }
    assert_eq!(feed.current().log_len(), 3);
    assert_eq!(feed.current().oldest_resumable(), 3);
    let m = next(&mut sub).await.unwrap();
    assert!(m.full);
    assert_eq!(m.version, 6);
}

#[tokio::test]
async fn a_version_that_goes_back_restarts_everyone_with_the_whole_set() {
    let mut state = ring();
    let feed = Feed::new(state.clone(), 5, 0, Limits::default());
    let mut sub = feed.subscribe(true, None);
    next(&mut sub).await.unwrap();
    revoke(&mut state, 1);
    feed.publish(state.clone(), 5, 0);
    let m = next(&mut sub).await.unwrap();
    assert!(m.full);
    assert_eq!(FeedState::from_snapshot(&decode(&m)), state);
    // The same version and state again changes nothing.
    feed.publish(state.clone(), 5, 0);
    assert!(next(&mut sub).await.is_none());
}

#[tokio::test]
async fn an_idle_node_that_holds_the_newest_version_may_be_told_so() {
    let mut state = ring();
    let feed = Feed::new(state.clone(), 1, 0, Limits::default());
    let mut sub = feed.subscribe(true, None);
    assert!(sub.renewal().is_none(), "nothing sent yet");
    next(&mut sub).await.unwrap();
    let renewal = sub.renewal().unwrap();
    let d = decode(&renewal);
    assert_eq!((d.version, d.delta.unwrap().base_version), (1, 1));
    assert_eq!(d.digest, state.digest().to_vec());
    revoke(&mut state, 1);
    feed.publish(state.clone(), 2, 0);
    assert!(sub.renewal().is_none(), "behind: the delta comes first");
    next(&mut sub).await.unwrap();
    assert_eq!(sub.renewal().unwrap().version, 2);
    // Never to a node without deltas.
    let mut old = feed.subscribe(false, None);
    next(&mut old).await.unwrap();
    assert!(old.renewal().is_none());
}

/// A session ended as the authority names them (22 characters of base64url).
fn end_session(state: &mut FeedState, i: usize, until: i64) {
    state
        .revoked_sessions
        .insert(format!("Sx{i:04}b8Hq2ZcW5nLtR0pK"), until);
}

#[test]
fn a_state_without_ended_sessions_keeps_the_digest_it_had_before_sessions() {
    let mut state = ring();
    revoke(&mut state, 7);
    state.revoked_kids.insert("kf-old".into());
    // The canonical bytes as they were before sessions existed: fields 2–6 only.
    let before_sessions = JwksSnapshot {
        issuer: state.issuer.clone(),
        keys: state.keys.values().cloned().collect(),
        revoked_kids: state.revoked_kids.iter().cloned().collect(),
        revoked_tokens: state
            .revoked_tokens
            .iter()
            .map(|(jti, until)| keyfleet_proto::v1::RevokedToken {
                jti: jti.clone(),
                until: *until,
            })
            .collect(),
        active_kid: state.active_kid.clone(),
        ..JwksSnapshot::default()
    };
    use sha2::Digest as _;
    let old: [u8; 32] =
        sha2::Sha256::digest(prost::Message::encode_to_vec(&before_sessions)).into();
    assert_eq!(state.digest(), old);
    // And a pinned value, so a change to the encoding cannot pass unnoticed.
    assert_eq!(
        hex(&ring().digest()),
        "a2cb8600600fdfeb245c058d0497e0d9b2d3e8007354c16e19d16aa3befbb34d"
    );
    end_session(&mut state, 1, 1_900_000_000);
    assert_ne!(state.digest(), old, "an ended session is part of the state");
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test]
async fn an_ended_session_travels_as_a_small_delta_and_is_dropped_the_same_way() {
    let mut state = ring();
    for i in 0..100 {
        end_session(&mut state, i, 1_900_000_000);
    }
    let feed = Feed::new(state.clone(), 1, 0, Limits::default());
    let mut sub = feed.subscribe(true, None);
    let first = next(&mut sub).await.unwrap();
    assert!(first.full);
    let full = decode(&first);
    assert_eq!(full.revoked_sessions.len(), 100);
    let mut held = FeedState::from_snapshot(&full);
    assert_eq!(held, state);

    // One more ended session: a delta naming it alone.
    end_session(&mut state, 500, 1_900_000_060);
    feed.publish(state.clone(), 2, 10);
    let m = next(&mut sub).await.unwrap();
    assert!(!m.full);
    assert!(m.bytes.len() < 128, "{} bytes", m.bytes.len());
    let d = decode(&m);
    let delta = d.delta.as_ref().unwrap();
    assert_eq!(delta.revoked_sessions_added.len(), 1);
    assert_eq!(delta.revoked_sessions_added[0].until, 1_900_000_060);
    held.apply(delta, &d.issuer, &d.active_kid);
    assert_eq!(held, state);
    assert_eq!(d.digest, state.digest().to_vec());

    // Past their `until`, entries leave: the delta names them, nothing more.
    state
        .revoked_sessions
        .retain(|_, until| *until > 1_900_000_000);
    feed.publish(state.clone(), 3, 20);
    let d = decode(&next(&mut sub).await.unwrap());
    let delta = d.delta.as_ref().unwrap();
    assert_eq!(delta.revoked_sessions_dropped.len(), 100);
    assert!(delta.revoked_sessions_added.is_empty());
    held.apply(delta, &d.issuer, &d.active_kid);
    assert_eq!(held, state);
    assert_eq!(d.digest, state.digest().to_vec());

    // The public snapshot (no fleet credential) never lists sessions.
    let public: JwksSnapshot = feed.current().public.decode().unwrap();
    assert!(public.revoked_sessions.is_empty());
    assert_eq!(feed.current().snapshot().revoked_sessions.len(), 1);
}
