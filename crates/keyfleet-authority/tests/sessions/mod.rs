//! Issue 15 on the authority's side: sessions with rotating refresh tokens. The rotation chain
//! and its grace window, reuse ending a session and the fleet refusing its access tokens
//! (`SESSION_REVOKED` from a key set built from `GetJwks`), idle and absolute expiry on a
//! manual clock, logout both ways, revoke-all-for-subject, `ListSessions`, and refresh tokens
//! that cannot be used (empty, huge, made up, forged) refused without touching any session.

use std::net::{IpAddr, Ipv4Addr};

use keyfleet_authority::SessionPolicy;
use keyfleet_core::Reason;
use tonic::transport::Endpoint;

use super::*;

/// Session lifetimes for the manual clock: idle 100 s, max 250 s, grace 10 s.
fn short_sessions() -> SessionPolicy {
    SessionPolicy {
        idle: 100,
        max: 250,
        reuse_grace: 10,
    }
}

/// An authority on `clock` with [`policy`] (token TTL 60 s, leeway 5 s) and [`short_sessions`].
async fn on_clock(clock: &Clock) -> TestAuthority {
    TestAuthority::start_with(|config| Config {
        clock: clock.clone(),
        policy: policy(),
        sessions: short_sessions(),
        ..config
    })
    .await
}

fn login(subject: &str, scopes: &[&str]) -> pb::StartSessionRequest {
    pb::StartSessionRequest {
        subject: subject.into(),
        audience: vec!["api".into()],
        scopes: scopes.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

async fn start(
    auth: &TestAuthority,
    client: &mut AuthorityClient<Channel>,
    req: pb::StartSessionRequest,
) -> pb::SessionTokens {
    client
        .start_session(auth.admin(req))
        .await
        .unwrap()
        .into_inner()
}

async fn refresh(
    client: &mut AuthorityClient<Channel>,
    token: &str,
) -> Result<pb::SessionTokens, tonic::Status> {
    refresh_scopes(client, token, &[]).await
}

async fn refresh_scopes(
    client: &mut AuthorityClient<Channel>,
    token: &str,
    scopes: &[&str],
) -> Result<pb::SessionTokens, tonic::Status> {
    client
        .refresh(pb::RefreshRequest {
            refresh_token: token.into(),
            scopes: scopes.iter().map(|s| s.to_string()).collect(),
        })
        .await
        .map(|r| r.into_inner())
}

/// Asserts a refresh was refused with UNAUTHENTICATED and a message containing `says`.
fn refused(result: Result<pb::SessionTokens, tonic::Status>, says: &str) {
    let status = result.expect_err("the refresh token must be refused");
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    assert!(status.message().contains(says), "{says:?} in {status:?}");
}

async fn sessions_of(
    auth: &TestAuthority,
    client: &mut AuthorityClient<Channel>,
    subject: &str,
) -> Vec<pb::SessionInfo> {
    client
        .list_sessions(auth.admin(pb::ListSessionsRequest {
            subject: subject.into(),
        }))
        .await
        .unwrap()
        .into_inner()
        .sessions
}

/// The full key set, deny lists included, as a verifier receives it.
async fn fleet_jwks(
    auth: &TestAuthority,
    client: &mut AuthorityClient<Channel>,
) -> pb::JwksSnapshot {
    client
        .get_jwks(auth.node(pb::GetJwksRequest {}))
        .await
        .unwrap()
        .into_inner()
}

/// Validates `token` as a verifier holding `snapshot` would (with its revoked sessions).
fn verdict(token: &str, snapshot: &pb::JwksSnapshot, now: i64) -> Result<(), Reason> {
    let jwks: Vec<Jwk> = snapshot
        .keys
        .iter()
        .map(|k| Jwk {
            kty: k.kty.clone(),
            crv: k.crv.clone(),
            x: k.x.clone(),
            kid: k.kid.clone(),
            use_: k.r#use.clone(),
            alg: k.alg.clone(),
            ..Jwk::default()
        })
        .collect();
    let (set, _) = KeySet::build(
        snapshot.version,
        None,
        &jwks,
        snapshot.revoked_kids.clone(),
        snapshot
            .revoked_tokens
            .iter()
            .map(|t| (t.jti.clone(), t.until)),
    );
    let set = set.with_revoked_sessions(
        snapshot
            .revoked_sessions
            .iter()
            .map(|s| (s.sid.clone(), s.until)),
    );
    keyfleet_core::validate(
        token,
        &set,
        now,
        &keyfleet_core::Policy::new(&snapshot.issuer),
        None,
    )
    .map(|_| ())
    .map_err(|refusal| refusal.reason)
}

fn revoked_sids(snapshot: &pb::JwksSnapshot) -> BTreeSet<String> {
    snapshot
        .revoked_sessions
        .iter()
        .map(|s| s.sid.clone())
        .collect()
}

#[tokio::test]
async fn a_session_starts_with_an_access_token_carrying_sid_auth_time_and_scope() {
    let clock = Clock::manual(START);
    let auth = on_clock(&clock).await;
    let mut client = auth.client().await;
    let mut req = login("alice", &["read", "write", "read"]);
    req.auth_time = START - 30;
    req.acr = "urn:mfa".into();
    req.amr = vec!["pwd".into(), "otp".into()];
    req.claims = claims("tenant", "acme");
    let tokens = start(&auth, &mut client, req).await;
    let claims = payload(&tokens.access_token);
    assert_eq!(claims["sid"], tokens.session_id.as_str());
    assert_eq!(claims["auth_time"], START - 30);
    assert_eq!(
        claims["scope"], "read write",
        "in order, duplicates dropped"
    );
    assert_eq!(claims["acr"], "urn:mfa");
    assert_eq!(claims["amr"], serde_json::json!(["pwd", "otp"]));
    assert_eq!(claims["tenant"], "acme");
    assert_eq!(claims["sub"], "alice");
    assert_eq!(tokens.access_expires_at, START + 60);
    assert_eq!(tokens.session_expires_at, START + 100, "idle before max");
    // 32 random bytes behind a prefix, and the fleet accepts the access token.
    assert!(tokens.refresh_token.starts_with("kfr_"));
    assert_eq!(tokens.refresh_token.len(), 4 + 43);
    let snapshot = fleet_jwks(&auth, &mut client).await;
    assert_eq!(verdict(&tokens.access_token, &snapshot, START), Ok(()));
    // No scopes: no scope claim.
    let bare = start(&auth, &mut client, login("bob", &[])).await;
    assert!(payload(&bare.access_token).get("scope").is_none());
    // The refresh token is stored only as a hash.
    let db = std::fs::read(auth.dir().join("sessions.db")).unwrap_or_default();
    let wal = std::fs::read(auth.dir().join("sessions.db-wal")).unwrap_or_default();
    for bytes in [&db, &wal] {
        let text = String::from_utf8_lossy(bytes);
        assert!(!text.contains(&tokens.refresh_token[4..]));
    }
    assert_eq!(mode(&auth.dir().join("sessions.db")), 0o600);
    auth.stop().await;
}

#[tokio::test]
async fn start_session_refuses_a_bad_request_and_needs_the_admin_credential() {
    let clock = Clock::manual(START);
    let auth = on_clock(&clock).await;
    let mut client = auth.client().await;
    let status = client.start_session(login("alice", &[])).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    let mut cases: Vec<(&str, pb::StartSessionRequest, &str)> = Vec::new();
    for name in ["sid", "auth_time", "scope", "exp", "acr"] {
        let mut req = login("alice", &[]);
        req.claims = claims(name, "x");
        cases.push(("claim", req, "set by the authority"));
    }
    cases.push(("no subject", login("", &[]), "subject is required"));
    cases.push((
        "spaced scope",
        login("a", &["read write"]),
        "not a scope token",
    ));
    cases.push(("empty scope", login("a", &[""]), "not a scope token"));
    let mut future = login("a", &[]);
    future.auth_time = START + 3600;
    cases.push(("future login", future, "not a past Unix time"));
    for (what, req, says) in cases {
        let status = client.start_session(auth.admin(req)).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{what}: {status:?}");
        assert!(status.message().contains(says), "{what}: {status:?}");
    }
    auth.stop().await;
}

#[tokio::test]
async fn each_refresh_spends_its_token_for_a_new_pair_of_the_same_session() {
    let clock = Clock::manual(START);
    let auth = on_clock(&clock).await;
    let mut client = auth.client().await;
    let first = start(&auth, &mut client, login("alice", &["read"])).await;
    let mut chain = vec![first.clone()];
    for step in 1..=3 {
        clock.advance(20);
        let previous = chain.last().unwrap().refresh_token.clone();
        let next = refresh(&mut client, &previous).await.unwrap();
        assert_eq!(next.session_id, first.session_id);
        assert_ne!(next.refresh_token, previous);
        let claims = payload(&next.access_token);
        assert_eq!(claims["sid"], first.session_id.as_str());
        assert_eq!(claims["auth_time"], START, "a refresh is no new login");
        assert_eq!(claims["scope"], "read");
        assert_eq!(next.access_expires_at, START + 20 * step + 60);
        assert_eq!(
            next.session_expires_at,
            START + 20 * step + 100,
            "idle extended"
        );
        chain.push(next);
    }
    let info = &sessions_of(&auth, &mut client, "alice").await[0];
    assert_eq!(info.refresh_count, 3);
    assert_eq!(info.last_refresh_at, START + 60);
    assert_eq!(info.end_reason, "");
    // The token two steps back is theft, whatever the grace window.
    refused(
        refresh(&mut client, &chain[1].refresh_token).await,
        "already spent",
    );
    refused(
        refresh(&mut client, &chain[3].refresh_token).await,
        "has ended (refresh_token_reuse)",
    );
    auth.stop().await;
}

#[tokio::test]
async fn a_retry_within_the_grace_window_gets_a_new_pair_and_supersedes_the_lost_one() {
    let clock = Clock::manual(START);
    let auth = on_clock(&clock).await;
    let mut client = auth.client().await;
    let first = start(&auth, &mut client, login("alice", &[])).await;
    // The answer to this refresh is "lost": the client retries with the same token.
    let lost = refresh(&mut client, &first.refresh_token).await.unwrap();
    clock.advance(9);
    let retried = refresh(&mut client, &first.refresh_token).await.unwrap();
    assert_eq!(retried.session_id, first.session_id);
    assert_ne!(retried.refresh_token, lost.refresh_token);
    // The retried pair works and the chain goes on from it.
    let next = refresh(&mut client, &retried.refresh_token).await.unwrap();
    // The lost answer's refresh token was superseded: presenting it is reuse.
    refused(
        refresh(&mut client, &lost.refresh_token).await,
        "already spent",
    );
    refused(refresh(&mut client, &next.refresh_token).await, "has ended");
    let info = &sessions_of(&auth, &mut client, "alice").await[0];
    assert_eq!(info.end_reason, "refresh_token_reuse");
    auth.stop().await;
}

#[tokio::test]
async fn without_a_grace_window_the_previous_token_is_reuse_at_once() {
    let clock = Clock::manual(START);
    let auth = TestAuthority::start_with(|config| Config {
        clock: clock.clone(),
        policy: policy(),
        sessions: SessionPolicy {
            reuse_grace: 0,
            ..short_sessions()
        },
        ..config
    })
    .await;
    let mut client = auth.client().await;
    let first = start(&auth, &mut client, login("alice", &[])).await;
    let second = refresh(&mut client, &first.refresh_token).await.unwrap();
    refused(
        refresh(&mut client, &first.refresh_token).await,
        "already spent",
    );
    refused(
        refresh(&mut client, &second.refresh_token).await,
        "has ended",
    );
    auth.stop().await;
}

#[tokio::test]
async fn reuse_after_the_grace_ends_the_session_and_the_fleet_refuses_its_access_tokens() {
    let clock = Clock::manual(START);
    let auth = on_clock(&clock).await;
    let mut client = auth.client().await;
    let victim = start(&auth, &mut client, login("alice", &["read"])).await;
    let bystander = start(&auth, &mut client, login("alice", &["read"])).await;
    let before = fleet_jwks(&auth, &mut client).await;
    // The thief copied the first refresh token; the user refreshed since.
    let stolen = victim.refresh_token.clone();
    let current = refresh(&mut client, &victim.refresh_token).await.unwrap();
    clock.advance(10);
    refused(refresh(&mut client, &stolen).await, "already spent");

    // Published at once, in a new version, until the newest access token's expiry + leeway.
    let after = fleet_jwks(&auth, &mut client).await;
    assert!(after.version > before.version);
    let entry = after
        .revoked_sessions
        .iter()
        .find(|s| s.sid == victim.session_id)
        .expect("the ended session is in the fleet's deny list");
    assert_eq!(entry.until, current.access_expires_at + 5);
    assert_eq!(revoked_sids(&after).len(), 1);
    let now = clock.now();
    for token in [&victim.access_token, &current.access_token] {
        assert_eq!(verdict(token, &before, now), Ok(()), "before the reuse");
        assert_eq!(verdict(token, &after, now), Err(Reason::SessionRevoked));
    }
    assert_eq!(verdict(&bystander.access_token, &after, now), Ok(()));
    // Every refresh token of the session is dead, and so is the session.
    refused(
        refresh(&mut client, &current.refresh_token).await,
        "has ended",
    );
    refresh(&mut client, &bystander.refresh_token)
        .await
        .unwrap();
    let infos = sessions_of(&auth, &mut client, "alice").await;
    let info = infos
        .iter()
        .find(|s| s.session_id == victim.session_id)
        .unwrap();
    assert_eq!(
        (info.end_reason.as_str(), info.ended_at),
        ("refresh_token_reuse", now)
    );

    // Once its last access token has expired, the entry leaves the deny list.
    clock.advance(60 + 5 + 1);
    auth.until_jwks_with_node("the ended session leaves the deny list", |s| {
        s.revoked_sessions.is_empty()
    })
    .await;
    auth.stop().await;
}

impl TestAuthority {
    /// Waits until the key set with deny lists is as `holds` wants.
    async fn until_jwks_with_node(&self, what: &str, holds: impl Fn(&pb::JwksSnapshot) -> bool) {
        let client = self.client().await;
        let holds = &holds;
        eventually(what, || {
            let mut client = client.clone();
            async move { holds(&fleet_jwks(self, &mut client).await) }
        })
        .await;
    }
}

#[tokio::test]
async fn sessions_expire_when_idle_and_at_their_maximum_age() {
    let clock = Clock::manual(START);
    let auth = on_clock(&clock).await;
    let mut client = auth.client().await;
    let idle = start(&auth, &mut client, login("alice", &[])).await;
    let kept = start(&auth, &mut client, login("alice", &[])).await;
    // Refreshed every 90 s (under the 100 s idle limit), the second lives until 250 s.
    let mut token = kept.refresh_token.clone();
    for _ in 0..2 {
        clock.advance(90);
        let next = refresh(&mut client, &token).await.unwrap();
        token = next.refresh_token;
    }
    refused(
        refresh(&mut client, &idle.refresh_token).await,
        "expired (not refreshed within --session-idle)",
    );
    clock.advance(40); // START + 220
    let last = refresh(&mut client, &token).await.unwrap();
    assert_eq!(last.session_expires_at, START + 250, "the absolute expiry");
    assert_eq!(
        last.access_expires_at,
        START + 250,
        "no access token outlives its session"
    );
    clock.advance(30); // START + 250
    refused(
        refresh(&mut client, &last.refresh_token).await,
        "expired (--session-max reached)",
    );
    let infos = sessions_of(&auth, &mut client, "alice").await;
    let mut reasons: Vec<(&str, i64)> = infos
        .iter()
        .map(|s| (s.end_reason.as_str(), s.ended_at))
        .collect();
    reasons.sort_by_key(|(_, at)| *at);
    assert_eq!(
        reasons,
        [
            ("idle_expired", START + 100),
            ("max_age_expired", START + 250)
        ]
    );
    assert!(
        fleet_jwks(&auth, &mut client)
            .await
            .revoked_sessions
            .is_empty(),
        "expiry needs no deny-list entry"
    );
    auth.stop().await;
}

#[tokio::test]
async fn logout_by_refresh_token_or_by_session_id_with_the_admin_credential() {
    let clock = Clock::manual(START);
    let auth = on_clock(&clock).await;
    let mut client = auth.client().await;
    let a = start(&auth, &mut client, login("alice", &[])).await;
    let b = start(&auth, &mut client, login("alice", &[])).await;
    // By refresh token: no admin credential needed.
    let out = client
        .end_session(pb::EndSessionRequest {
            refresh_token: a.refresh_token.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(out.ended);
    assert_eq!(out.session_id, a.session_id);
    let snapshot = fleet_jwks(&auth, &mut client).await;
    assert!(snapshot.version >= out.version);
    assert!(revoked_sids(&snapshot).contains(&a.session_id));
    assert_eq!(
        verdict(&a.access_token, &snapshot, START),
        Err(Reason::SessionRevoked)
    );
    refused(
        refresh(&mut client, &a.refresh_token).await,
        "has ended (logout)",
    );
    let again = client
        .end_session(pb::EndSessionRequest {
            refresh_token: a.refresh_token.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!again.ended, "already ended");
    // By session id: only with the admin credential.
    let by_id = pb::EndSessionRequest {
        session_id: b.session_id.clone(),
        ..Default::default()
    };
    let status = client.end_session(by_id.clone()).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    refresh(&mut client, &b.refresh_token)
        .await
        .expect("untouched");
    assert!(
        client
            .end_session(auth.admin(by_id))
            .await
            .unwrap()
            .into_inner()
            .ended
    );
    let unknown = pb::EndSessionRequest {
        session_id: "no-such-session".into(),
        ..Default::default()
    };
    let status = client.end_session(auth.admin(unknown)).await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    let both = pb::EndSessionRequest {
        session_id: b.session_id.clone(),
        refresh_token: b.refresh_token.clone(),
    };
    let status = client.end_session(auth.admin(both)).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    let infos = sessions_of(&auth, &mut client, "alice").await;
    let reasons: BTreeSet<&str> = infos.iter().map(|s| s.end_reason.as_str()).collect();
    assert_eq!(reasons, BTreeSet::from(["logout", "admin"]));
    auth.stop().await;
}

#[tokio::test]
async fn revoke_subject_ends_every_session_of_that_subject_only() {
    let clock = Clock::manual(START);
    let auth = on_clock(&clock).await;
    let mut client = auth.client().await;
    let mut alice = Vec::new();
    for _ in 0..3 {
        alice.push(start(&auth, &mut client, login("alice", &[])).await);
    }
    let bob = start(&auth, &mut client, login("bob", &[])).await;
    let req = pb::RevokeSubjectRequest {
        subject: "alice".into(),
    };
    let status = client.revoke_subject(req.clone()).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    let out = client
        .revoke_subject(auth.admin(req.clone()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(out.sessions_ended, 3);
    let snapshot = fleet_jwks(&auth, &mut client).await;
    assert!(snapshot.version >= out.version);
    let want: BTreeSet<String> = alice.iter().map(|t| t.session_id.clone()).collect();
    assert_eq!(revoked_sids(&snapshot), want);
    for tokens in &alice {
        assert_eq!(
            verdict(&tokens.access_token, &snapshot, START),
            Err(Reason::SessionRevoked)
        );
        refused(
            refresh(&mut client, &tokens.refresh_token).await,
            "has ended (revoked_subject)",
        );
    }
    assert_eq!(verdict(&bob.access_token, &snapshot, START), Ok(()));
    refresh(&mut client, &bob.refresh_token).await.unwrap();
    let again = client
        .revoke_subject(auth.admin(req))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.sessions_ended, 0);
    let infos = sessions_of(&auth, &mut client, "alice").await;
    assert_eq!(infos.len(), 3);
    assert!(
        infos
            .iter()
            .all(|s| s.end_reason == "revoked_subject" && s.ended_at == START)
    );
    let info = &sessions_of(&auth, &mut client, "bob").await[0];
    assert_eq!(
        (
            info.started_at,
            info.auth_time,
            info.idle_expires_at,
            info.absolute_expires_at
        ),
        (START, START, START + 100, START + 250)
    );
    auth.stop().await;
}

#[tokio::test]
async fn a_refresh_can_narrow_the_scopes_never_widen_them() {
    let clock = Clock::manual(START);
    let auth = on_clock(&clock).await;
    let mut client = auth.client().await;
    let first = start(&auth, &mut client, login("alice", &["read", "write"])).await;
    let status = refresh_scopes(&mut client, &first.refresh_token, &["read", "admin"])
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(
        status.message().contains("\"admin\" is not granted"),
        "{status:?}"
    );
    // The refused request spent nothing.
    let narrow = refresh_scopes(&mut client, &first.refresh_token, &["write"])
        .await
        .unwrap();
    assert_eq!(payload(&narrow.access_token)["scope"], "write");
    let full = refresh(&mut client, &narrow.refresh_token).await.unwrap();
    assert_eq!(
        payload(&full.access_token)["scope"],
        "read write",
        "the session keeps its scopes"
    );
    auth.stop().await;
}

#[tokio::test]
async fn unusable_refresh_tokens_are_refused_and_change_no_session() {
    let clock = Clock::manual(START);
    let auth = on_clock(&clock).await;
    let mut client = auth.client().await;
    let real = start(&auth, &mut client, login("alice", &[])).await;
    let token = real.refresh_token.clone();
    let flip = |at: usize| {
        let mut bytes = token.clone().into_bytes();
        bytes[at] = if bytes[at] == b'A' { b'B' } else { b'A' };
        String::from_utf8(bytes).unwrap()
    };
    let cases: Vec<(&str, String, &str)> = vec![
        ("empty", String::new(), "is empty"),
        (
            "huge",
            "kfr_".to_owned() + &"A".repeat(4096),
            "longer than 512 bytes",
        ),
        (
            "not random",
            format!("kfr_{}", "A".repeat(43)),
            "unknown or malformed",
        ),
        (
            "flipped last char",
            flip(token.len() - 1),
            "unknown or malformed",
        ),
        ("flipped first random char", flip(4), "unknown or malformed"),
        (
            "another prefix",
            format!("kfx_{}", &token[4..]),
            "unknown or malformed",
        ),
        ("one char more", format!("{token}A"), "unknown or malformed"),
        (
            "one char less",
            token[..token.len() - 1].to_owned(),
            "unknown or malformed",
        ),
        ("padding", format!("{token}="), "unknown or malformed"),
        (
            "a forged one of the right shape",
            format!("kfr_{}", "x".repeat(43)),
            "unknown or malformed",
        ),
        (
            "an access token",
            real.access_token.clone(),
            "unknown or malformed",
        ),
    ];
    for (what, bad, says) in &cases {
        let status = refresh(&mut client, bad).await.unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated, "{what}: {status:?}");
        assert!(status.message().contains(says), "{what}: {status:?}");
        assert!(!status.message().contains("spent"), "{what}: {status:?}");
        // Logout with a made-up token ends nothing either. (A few cases only: every failure
        // counts against this peer's budget of 20.)
        if what.starts_with("flipped") || *what == "not random" {
            let logout = pb::EndSessionRequest {
                refresh_token: bad.clone(),
                ..Default::default()
            };
            let status = client.end_session(logout).await.unwrap_err();
            assert_eq!(status.code(), Code::Unauthenticated, "{what}: {status:?}");
            assert!(
                status.message().contains("unknown or malformed"),
                "{what}: {status:?}"
            );
        }
    }
    // The real session is untouched: live, never refreshed, and its token still works.
    let info = &sessions_of(&auth, &mut client, "alice").await[0];
    assert_eq!((info.refresh_count, info.end_reason.as_str()), (0, ""));
    assert!(
        fleet_jwks(&auth, &mut client)
            .await
            .revoked_sessions
            .is_empty()
    );
    let next = refresh(&mut client, &token).await.unwrap();
    assert_eq!(next.session_id, real.session_id);
    auth.stop().await;
}

/// A second loopback address, so one test can be two peers.
const OTHER_PEER: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));

#[tokio::test]
async fn a_flood_of_bad_refresh_tokens_limits_that_peer_and_no_one_else() {
    let clock = Clock::manual(START);
    let auth = on_clock(&clock).await;
    let mut client = auth.client().await;
    let user = start(&auth, &mut client, login("alice", &[])).await;
    let thief_own = start(&auth, &mut client, login("mallory", &[])).await;
    let channel = Endpoint::from_shared(format!("http://{}", auth.grpc))
        .unwrap()
        .local_address(Some(OTHER_PEER))
        .connect()
        .await
        .unwrap();
    let mut attacker = AuthorityClient::new(channel);
    let mut codes = Vec::new();
    for i in 0..40 {
        let guess = format!("kfr_{:0>43}", i);
        codes.push(refresh(&mut attacker, &guess).await.unwrap_err().code());
    }
    assert_eq!(codes[0], Code::Unauthenticated);
    assert_eq!(*codes.last().unwrap(), Code::ResourceExhausted, "{codes:?}");
    // The limited peer is refused before any look-up, even with a token that would work.
    let status = refresh(&mut attacker, &thief_own.refresh_token)
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert!(
        status
            .message()
            .contains("too many unusable refresh tokens"),
        "{status:?}"
    );
    // Another peer's valid refresh token is answered as always.
    let next = refresh(&mut client, &user.refresh_token).await.unwrap();
    refresh(&mut client, &next.refresh_token).await.unwrap();
    // And the limited peer's own session was not touched: it refreshes from elsewhere.
    refresh(&mut client, &thief_own.refresh_token)
        .await
        .unwrap();
    auth.stop().await;
}

#[tokio::test]
async fn sessions_and_their_revocations_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Clock::manual(START);
    let config = || Config {
        clock: clock.clone(),
        policy: policy(),
        sessions: short_sessions(),
        ..Config::for_test(dir.path())
    };
    let auth = TestAuthority::spawn(config()).await;
    let mut client = auth.client().await;
    let ended = start(&auth, &mut client, login("alice", &[])).await;
    let live = start(&auth, &mut client, login("alice", &[])).await;
    let live = refresh(&mut client, &live.refresh_token).await.unwrap();
    client
        .end_session(pb::EndSessionRequest {
            refresh_token: ended.refresh_token.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    let before = fleet_jwks(&auth, &mut client).await;
    auth.stop().await;

    let auth = TestAuthority::spawn(config()).await;
    let mut client = auth.client().await;
    let after = fleet_jwks(&auth, &mut client).await;
    assert_eq!(after.version, before.version);
    assert_eq!(after.revoked_sessions, before.revoked_sessions);
    assert_eq!(
        after.digest, before.digest,
        "the same state at the same version"
    );
    refused(
        refresh(&mut client, &ended.refresh_token).await,
        "has ended (logout)",
    );
    refresh(&mut client, &live.refresh_token).await.unwrap();
    auth.stop().await;
}

#[tokio::test]
async fn a_damaged_session_store_is_refused_with_advice() {
    let dir = tempfile::tempdir().unwrap();
    let auth = TestAuthority::spawn(Config::for_test(dir.path())).await;
    auth.stop().await;
    let path = dir.path().join("sessions.db");
    for leftover in ["sessions.db-wal", "sessions.db-shm"] {
        let _ = std::fs::remove_file(dir.path().join(leftover));
    }
    write_private(
        &path,
        b"this is not a database, but it is long enough to have a header..",
    );
    let err = Authority::open(Config::for_test(dir.path())).unwrap_err();
    let text = keyfleet_runtime::error_chain(&err);
    assert!(text.contains("is corrupt"), "{text}");
    assert!(text.contains("move it away"), "{text}");
}
