//! Integration tests: real verifier nodes on 127.0.0.1:0 fed by in-process fakes of the
//! authority (gRPC) and of a JWKS server (HTTP) that can push, lag, fail and go down.

use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ed25519_dalek::SigningKey;
use keyfleet_core::jwk::thumbprint;
use keyfleet_core::{Jwk, TokenClaims, sign_token};
use keyfleet_proto::v1::authority_server::{Authority, AuthorityServer};
use keyfleet_proto::v1::verifier_client::VerifierClient;
use keyfleet_proto::v1::{
    self as pb, JwksSnapshot, Reason, VerifyRequest, VerifyResponse, WatchJwksRequest,
};
use keyfleet_runtime::{CancellationToken, Clock};
use keyfleet_testkit::files::{chmod, write_private};
use keyfleet_testkit::serve::{self, Pair, Task};
use keyfleet_testkit::{eventually, grpc, http};
use keyfleet_verifier::{Config, SAVED_KEY_SET_FILE, Source, run};
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::service::Routes;
use tonic::transport::Channel;
use tonic::{Request, Response, Status, Streaming};

const ISSUER: &str = "https://auth.test";
const NOW: i64 = 1_700_000_000;

// ---------------------------------------------------------------------------------------------
// Keys and tokens

/// A test signing key from a fixed seed, with its thumbprint kid.
#[derive(Clone)]
struct Key {
    signing: SigningKey,
    kid: String,
}

fn key(seed: u8) -> Key {
    let signing = SigningKey::from_bytes(&[seed; 32]);
    let kid = thumbprint(&signing.verifying_key().to_bytes());
    Key { signing, kid }
}

impl Key {
    fn jwk(&self) -> Jwk {
        Jwk::ed25519(&self.kid, &self.signing.verifying_key().to_bytes())
    }
    fn pb(&self) -> pb::Jwk {
        let j = self.jwk();
        pb::Jwk {
            kid: j.kid,
            kty: j.kty,
            crv: j.crv,
            x: j.x,
            alg: j.alg,
            r#use: j.use_,
        }
    }
}

fn claims(now: i64) -> TokenClaims {
    let mut extra = serde_json::Map::new();
    extra.insert("role".into(), "admin".into());
    TokenClaims {
        iss: ISSUER.into(),
        sub: "alice".into(),
        aud: vec!["api".into()],
        iat: now,
        nbf: now,
        exp: now + 300,
        jti: "jti-1".into(),
        extra,
    }
}

/// A token signed by `key` under `kid` with `edit` applied to the default claims.
fn token_as(key: &Key, kid: &str, now: i64, edit: impl FnOnce(&mut TokenClaims)) -> String {
    let mut c = claims(now);
    edit(&mut c);
    sign_token(&key.signing, kid, &c)
}

fn token(key: &Key, now: i64) -> String {
    token_as(key, &key.kid, now, |_| {})
}

fn snapshot(version: u64, keys: &[&Key]) -> JwksSnapshot {
    JwksSnapshot {
        version,
        issuer: ISSUER.into(),
        keys: keys.iter().map(|k| k.pb()).collect(),
        active_kid: keys.first().map(|k| k.kid.clone()).unwrap_or_default(),
        ..JwksSnapshot::default()
    }
}

// ---------------------------------------------------------------------------------------------
// Fake authority

struct FakeState {
    snapshot: Mutex<JwksSnapshot>,
    pushes: broadcast::Sender<JwksSnapshot>,
    get_jwks: AtomicUsize,
    acks: Mutex<Vec<u64>>,
    /// Every message of every watch stream, in order.
    requests: Mutex<Vec<WatchJwksRequest>>,
    /// The `authorization` of every GetJwks and WatchJwks call, in order.
    credentials: Mutex<Vec<(&'static str, Option<String>)>>,
    down: CancellationToken,
}

fn credential<T>(request: &Request<T>) -> Option<String> {
    request
        .metadata()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

#[derive(Clone)]
struct FakeService(Arc<FakeState>);

#[tonic::async_trait]
impl Authority for FakeService {
    async fn get_jwks(
        &self,
        request: Request<pb::GetJwksRequest>,
    ) -> Result<Response<JwksSnapshot>, Status> {
        let seen = ("GetJwks", credential(&request));
        self.0.credentials.lock().unwrap().push(seen);
        self.0.get_jwks.fetch_add(1, Ordering::SeqCst);
        Ok(Response::new(self.0.snapshot.lock().unwrap().clone()))
    }

    type WatchJwksStream = ReceiverStream<Result<JwksSnapshot, Status>>;

    async fn watch_jwks(
        &self,
        request: Request<Streaming<WatchJwksRequest>>,
    ) -> Result<Response<Self::WatchJwksStream>, Status> {
        let seen = ("WatchJwks", credential(&request));
        self.0.credentials.lock().unwrap().push(seen);
        let mut incoming = request.into_inner();
        let state = self.0.clone();
        let (tx, rx) = mpsc::channel(16);
        let mut pushes = state.pushes.subscribe();
        let first = state.snapshot.lock().unwrap().clone();
        tx.send(Ok(first)).await.unwrap();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = state.down.cancelled() => break,
                    msg = incoming.message() => match msg {
                        Ok(Some(m)) => {
                            state.acks.lock().unwrap().push(m.acked_version);
                            state.requests.lock().unwrap().push(m);
                        }
                        _ => break,
                    },
                    snap = pushes.recv() => match snap {
                        Ok(s) => if tx.send(Ok(s)).await.is_err() { break },
                        Err(broadcast::error::RecvError::Lagged(_)) => {}
                        Err(broadcast::error::RecvError::Closed) => break,
                    },
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn issue_token(
        &self,
        _: Request<pb::IssueTokenRequest>,
    ) -> Result<Response<pb::IssueTokenResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn rotate_keys(
        &self,
        _: Request<pb::RotateKeysRequest>,
    ) -> Result<Response<pb::RotateKeysResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn revoke_key(
        &self,
        _: Request<pb::RevokeKeyRequest>,
    ) -> Result<Response<pb::RevokeKeyResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn revoke_token(
        &self,
        _: Request<pb::RevokeTokenRequest>,
    ) -> Result<Response<pb::RevokeTokenResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn list_keys(
        &self,
        _: Request<pb::ListKeysRequest>,
    ) -> Result<Response<pb::ListKeysResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }

    async fn start_session(
        &self,
        _: Request<pb::StartSessionRequest>,
    ) -> Result<Response<pb::SessionTokens>, Status> {
        Err(Status::unimplemented("fake"))
    }

    async fn refresh(
        &self,
        _: Request<pb::RefreshRequest>,
    ) -> Result<Response<pb::SessionTokens>, Status> {
        Err(Status::unimplemented("fake"))
    }

    async fn end_session(
        &self,
        _: Request<pb::EndSessionRequest>,
    ) -> Result<Response<pb::EndSessionResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }

    async fn revoke_subject(
        &self,
        _: Request<pb::RevokeSubjectRequest>,
    ) -> Result<Response<pb::RevokeSubjectResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }

    async fn list_sessions(
        &self,
        _: Request<pb::ListSessionsRequest>,
    ) -> Result<Response<pb::ListSessionsResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
}

struct FakeAuthority {
    url: String,
    state: Arc<FakeState>,
    task: Task,
}

impl FakeAuthority {
    async fn start(initial: JwksSnapshot) -> FakeAuthority {
        let state = Arc::new(FakeState {
            snapshot: Mutex::new(initial),
            pushes: broadcast::channel(16).0,
            get_jwks: AtomicUsize::new(0),
            acks: Mutex::new(Vec::new()),
            requests: Mutex::new(Vec::new()),
            credentials: Mutex::new(Vec::new()),
            down: CancellationToken::new(),
        });
        let routes = Routes::new(AuthorityServer::new(FakeService(state.clone())));
        let (addr, task) = serve::grpc(routes).await;
        FakeAuthority {
            url: format!("http://{addr}"),
            state,
            task,
        }
    }

    fn source(&self) -> Source {
        Source::Authority {
            url: self.url.clone(),
        }
    }

    /// Edits the snapshot under a new version; pushes it to watchers when `push`.
    fn publish(&self, push: bool, edit: impl FnOnce(&mut JwksSnapshot)) -> u64 {
        let snap = {
            let mut s = self.state.snapshot.lock().unwrap();
            edit(&mut s);
            s.version += 1;
            s.clone()
        };
        if push {
            let _ = self.state.pushes.send(snap.clone());
        }
        snap.version
    }

    fn get_jwks_calls(&self) -> usize {
        self.state.get_jwks.load(Ordering::SeqCst)
    }

    fn acked(&self, version: u64) -> bool {
        self.state.acks.lock().unwrap().contains(&version)
    }

    /// How many messages on watch streams acknowledged `version` (acks and heartbeats).
    fn acks_of(&self, version: u64) -> usize {
        let acks = self.state.acks.lock().unwrap();
        acks.iter().filter(|v| **v == version).count()
    }

    /// Ends every stream and stops listening.
    async fn stop(self) {
        self.state.down.cancel();
        self.task.stop().await;
    }
}

// ---------------------------------------------------------------------------------------------
// Fake JWKS HTTP server

/// Stops serving when dropped.
struct FakeJwks {
    url: String,
    body: Arc<Mutex<(u16, String)>>,
    hits: Arc<AtomicUsize>,
    _task: Task,
}

impl FakeJwks {
    async fn start(status: u16, body: String) -> FakeJwks {
        let body = Arc::new(Mutex::new((status, body)));
        let hits = Arc::new(AtomicUsize::new(0));
        let (b, h) = (body.clone(), hits.clone());
        let router = axum::Router::new().route(
            "/jwks.json",
            axum::routing::get(move || {
                let (b, h) = (b.clone(), h.clone());
                async move {
                    h.fetch_add(1, Ordering::SeqCst);
                    let (status, body) = b.lock().unwrap().clone();
                    (axum::http::StatusCode::from_u16(status).unwrap(), body)
                }
            }),
        );
        let (addr, task) = serve::http(router).await;
        FakeJwks {
            url: format!("http://{addr}/jwks.json"),
            body,
            hits,
            _task: task,
        }
    }

    fn serve(&self, status: u16, body: impl Into<String>) {
        *self.body.lock().unwrap() = (status, body.into());
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

/// An authority nobody listens at (port 1).
fn nowhere() -> Source {
    Source::Authority {
        url: "http://127.0.0.1:1".into(),
    }
}

fn jwks_json(keys: &[serde_json::Value]) -> String {
    serde_json::json!({ "keys": keys }).to_string()
}

// ---------------------------------------------------------------------------------------------
// Verifier nodes

struct Node {
    served: Pair,
    channel: Channel,
    client: VerifierClient<Channel>,
}

async fn spawn_node(config: Config) -> Node {
    keyfleet_runtime::telemetry::test_init();
    let served = Pair::start(|grpc, http, shutdown| run(grpc, http, config, shutdown)).await;
    let channel = grpc::lazy_channel(served.grpc);
    Node {
        served,
        channel: channel.clone(),
        client: VerifierClient::new(channel),
    }
}

/// [`spawn_node`], then waits until the node is ready (holds a key set).
async fn ready_node(config: Config) -> Node {
    let node = spawn_node(config).await;
    node.wait_ready().await;
    node
}

impl Node {
    async fn verify(&self, token: &str, audience: &str) -> Result<VerifyResponse, Status> {
        let request = VerifyRequest {
            token: token.into(),
            audience: audience.into(),
            ..Default::default()
        };
        self.client
            .clone()
            .verify(request)
            .await
            .map(Response::into_inner)
    }

    async fn get(&self, path: &str) -> (u16, String) {
        let response = http::get(self.served.http, path).await;
        (response.status, response.body)
    }

    async fn metric(&self, line_prefix: &str) -> Option<f64> {
        let (_, text) = self.get("/metrics").await;
        text.lines()
            .find(|l| l.starts_with(line_prefix))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    }

    async fn wait_ready(&self) {
        eventually("node ready", || async {
            self.get("/readyz").await.0 == 200
        })
        .await;
    }

    /// Stops the node and checks that it drains and `run` returns Ok.
    async fn stop(self) {
        self.served.stop().await;
    }
}

/// Verifies `token` and asserts the verdict is `want`.
async fn check(
    node: &Node,
    what: &str,
    token: &str,
    audience: &str,
    want: Reason,
) -> VerifyResponse {
    let response = node
        .verify(token, audience)
        .await
        .unwrap_or_else(|s| panic!("{what}: gRPC error {s:?}"));
    assert_eq!(response.reason(), want, "{what}: {response:?}");
    assert_eq!(response.valid, want == Reason::Ok, "{what}");
    assert_eq!(
        (response.node_id.as_str(), response.region.as_str()),
        ("test-node", "test"),
        "{what}"
    );
    if want != Reason::Ok {
        assert!(
            response.claims_json.is_empty() && response.subject.is_empty(),
            "{what}: no claims on a refusal"
        );
        assert!(
            !response.detail.is_empty(),
            "{what}: a refusal explains itself"
        );
    }
    response
}

fn tampered_header(header: serde_json::Value, rest_of: &str) -> String {
    let mut parts = rest_of.splitn(2, '.');
    let _ = parts.next();
    format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        parts.next().unwrap()
    )
}

// ---------------------------------------------------------------------------------------------
// Tests

/// The authority caps the token deny list at 100,000 entries with `jti`s of up to 256 bytes:
/// a snapshot that full (~27 MB, far past tonic's 4 MiB default) still reaches a node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_deny_list_reaches_the_node() {
    let a = key(1);
    let mut snap = snapshot(1, &[&a]);
    snap.revoked_tokens = (0..100_000)
        .map(|i| pb::RevokedToken {
            jti: format!("{i:0>256}"),
            until: NOW + 3600,
        })
        .collect();
    snap.revoked_tokens[99_999].jti = "jti-1".into();
    assert!(prost::Message::encoded_len(&snap) > 25_000_000);
    let authority = FakeAuthority::start(snap).await;
    let node = ready_node(Config {
        clock: Clock::manual(NOW),
        ..Config::for_test(authority.source())
    })
    .await;
    // `token` carries jti-1, the last entry of the list.
    check(&node, "denied", &token(&a, NOW), "", Reason::TokenRevoked).await;
    node.stop().await;
    authority.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verdicts_for_good_and_bad_tokens() {
    let (a, b, revoked, stranger) = (key(1), key(2), key(3), key(4));
    let mut snap = snapshot(1, &[&a]);
    snap.revoked_kids.push(revoked.kid.clone());
    snap.revoked_tokens.push(pb::RevokedToken {
        jti: "revoked-jti".into(),
        until: NOW + 3600,
    });
    let authority = FakeAuthority::start(snap).await;
    let clock = Clock::manual(NOW);
    let node = ready_node(Config {
        audiences: vec!["api".into()],
        any_audience: false,
        clock: clock.clone(),
        ..Config::for_test(authority.source())
    })
    .await;

    let good = token(&a, NOW);
    let ok = check(&node, "valid", &good, "", Reason::Ok).await;
    assert_eq!(
        (ok.kid.as_str(), ok.subject.as_str(), ok.issuer.as_str()),
        (a.kid.as_str(), "alice", ISSUER)
    );
    assert_eq!((ok.expires_at, ok.jti.as_str()), (NOW + 300, "jti-1"));
    let claims: serde_json::Value = serde_json::from_str(&ok.claims_json).unwrap();
    assert_eq!(claims["role"], "admin");

    let cases: Vec<(&str, String, &str, Reason)> = vec![
        ("garbage", "not a token".into(), "", Reason::Malformed),
        ("four segments", format!("{good}.x"), "", Reason::Malformed),
        ("bad base64", format!("!!{good}"), "", Reason::Malformed),
        (
            "alg HS256",
            tampered_header(serde_json::json!({"alg":"HS256","kid":a.kid}), &good),
            "",
            Reason::UnsupportedAlgorithm,
        ),
        (
            "node audience",
            token_as(&a, &a.kid, NOW, |c| c.aud = vec!["other".into()]),
            "",
            Reason::WrongAudience,
        ),
        (
            "request audience",
            good.clone(),
            "billing",
            Reason::WrongAudience,
        ),
        (
            "both audiences",
            token_as(&a, &a.kid, NOW, |c| {
                c.aud = vec!["api".into(), "billing".into()]
            }),
            "billing",
            Reason::Ok,
        ),
        (
            "wrong issuer",
            token_as(&a, &a.kid, NOW, |c| c.iss = "https://evil.test".into()),
            "",
            Reason::WrongIssuer,
        ),
        (
            "expired",
            token_as(&a, &a.kid, NOW - 1000, |_| {}),
            "",
            Reason::Expired,
        ),
        (
            "expired within leeway",
            token_as(&a, &a.kid, NOW, |c| c.exp = NOW - 30),
            "",
            Reason::Ok,
        ),
        (
            "not yet valid",
            token_as(&a, &a.kid, NOW + 600, |_| {}),
            "",
            Reason::NotYetValid,
        ),
        (
            "known kid, other key",
            token_as(&b, &a.kid, NOW, |_| {}),
            "",
            Reason::BadSignature,
        ),
        ("unknown kid", token(&stranger, NOW), "", Reason::UnknownKid),
        ("revoked kid", token(&revoked, NOW), "", Reason::KeyRevoked),
        (
            "revoked jti",
            token_as(&a, &a.kid, NOW, |c| c.jti = "revoked-jti".into()),
            "",
            Reason::TokenRevoked,
        ),
        (
            "too large",
            token_as(&a, &a.kid, NOW, |c| {
                c.extra.insert("pad".into(), "x".repeat(9000).into());
            }),
            "",
            Reason::TooLarge,
        ),
    ];
    for (what, token, audience, want) in &cases {
        check(&node, what, token, audience, *want).await;
        // The node keeps serving after every refusal.
        check(&node, "valid after a refusal", &good, "", Reason::Ok).await;
    }
    let refused = check(
        &node,
        "revoked kid names its kid",
        &token(&revoked, NOW),
        "",
        Reason::KeyRevoked,
    )
    .await;
    assert_eq!(refused.kid, revoked.kid);

    // The manual clock drives expiry: 300 s of lifetime plus 60 s of leeway.
    clock.advance(361);
    check(&node, "expired by the clock", &good, "", Reason::Expired).await;

    node.stop().await;
    authority.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushed_key_verifies_without_a_pull_and_is_acked() {
    let (a, b) = (key(1), key(2));
    let authority = FakeAuthority::start(snapshot(1, &[&a])).await;
    let node = ready_node(Config {
        refresh_interval: Duration::from_secs(3600),
        ..Config::for_test(authority.source())
    })
    .await;
    eventually("ack of version 1", || async { authority.acked(1) }).await;

    let version = authority.publish(true, |s| s.keys.push(b.pb()));
    eventually("ack of the pushed version", || async {
        authority.acked(version)
    })
    .await;
    let now = keyfleet_runtime::clock::system_now();
    let ok = check(&node, "pushed key", &token(&b, now), "", Reason::Ok).await;
    assert_eq!(ok.kid, b.kid);
    assert_eq!(
        node.metric("keyfleet_jwks_version ").await,
        Some(version as f64)
    );
    assert_eq!(
        authority.get_jwks_calls(),
        0,
        "a pushed key needs no GetJwks"
    );

    // A key revoked by a push is refused at once.
    let version = authority.publish(true, |s| {
        s.keys.retain(|k| k.kid != b.kid);
        s.revoked_kids.push(b.kid.clone());
    });
    eventually("ack of the revocation", || async {
        authority.acked(version)
    })
    .await;
    check(
        &node,
        "revoked by push",
        &token(&b, now),
        "",
        Reason::KeyRevoked,
    )
    .await;

    node.stop().await;
    authority.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_published_only_via_get_jwks_verifies_after_unknown_kid_refresh() {
    let (a, b) = (key(1), key(2));
    let authority = FakeAuthority::start(snapshot(1, &[&a])).await;
    let node = ready_node(Config {
        refresh_interval: Duration::from_secs(3600),
        ..Config::for_test(authority.source())
    })
    .await;
    authority.publish(false, |s| s.keys.push(b.pb()));
    let now = keyfleet_runtime::clock::system_now();
    let ok = check(
        &node,
        "kid learnt by the refresh",
        &token(&b, now),
        "",
        Reason::Ok,
    )
    .await;
    assert_eq!(ok.kid, b.kid);
    assert_eq!(authority.get_jwks_calls(), 1);
    assert_eq!(
        node.metric("keyfleet_jwks_fetch_total{source=\"unknown_kid\",outcome=\"ok\"}")
            .await,
        Some(1.0)
    );
    assert_eq!(node.metric("keyfleet_unknown_kid_total").await, Some(1.0));
    node.stop().await;
    authority.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_kid_flood_is_coalesced_and_rate_limited() {
    let a = key(1);
    let authority = FakeAuthority::start(snapshot(1, &[&a])).await;
    let cooldown = Duration::from_millis(500);
    let node = Arc::new(
        spawn_node(Config {
            refresh_interval: Duration::from_secs(3600),
            unknown_kid_cooldown: cooldown,
            ..Config::for_test(authority.source())
        })
        .await,
    );
    node.wait_ready().await;
    let now = keyfleet_runtime::clock::system_now();
    let started = tokio::time::Instant::now();
    let random = RandomState::new();

    let mut workers = Vec::new();
    for w in 0..16u64 {
        let (node, a) = (node.clone(), a.clone());
        let kids: Vec<String> = (0..125u64)
            .map(|i| format!("{:016x}", random.hash_one((w, i))))
            .collect();
        workers.push(tokio::spawn(async move {
            for kid in kids {
                let response = node
                    .verify(&token_as(&a, &kid, now, |_| {}), "")
                    .await
                    .unwrap();
                assert_eq!(response.reason(), Reason::UnknownKid);
            }
        }));
    }
    let legit = {
        let (node, good) = (node.clone(), token(&a, now));
        tokio::spawn(async move {
            let mut answered = 0;
            for _ in 0..50 {
                let response = node.verify(&good, "").await.unwrap();
                assert_eq!(
                    response.reason(),
                    Reason::Ok,
                    "a legitimate token verifies during the flood"
                );
                answered += 1;
            }
            answered
        })
    };
    for w in workers {
        w.await.unwrap();
    }
    assert_eq!(legit.await.unwrap(), 50);
    let elapsed = started.elapsed();
    let fetches = authority.get_jwks_calls();
    let allowed = (elapsed.as_millis() / cooldown.as_millis()) as usize + 1;
    assert!(fetches >= 1, "the flood triggered a refresh");
    assert!(
        fetches <= allowed,
        "{fetches} fetches in {elapsed:?} with a {cooldown:?} cool-down"
    );
    assert!(
        elapsed < Duration::from_secs(15),
        "the flood was answered quickly: {elapsed:?}"
    );
    assert_eq!(
        node.metric("keyfleet_unknown_kid_total").await,
        Some(2000.0)
    );

    Arc::into_inner(node).unwrap().stop().await;
    authority.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keeps_serving_while_the_authority_is_down_then_fails_closed() {
    let a = key(1);
    let authority = FakeAuthority::start(snapshot(1, &[&a])).await;
    let clock = Clock::manual(NOW);
    let node = ready_node(Config {
        refresh_interval: Duration::from_millis(100),
        max_stale: Duration::from_secs(3600),
        clock: clock.clone(),
        ..Config::for_test(authority.source())
    })
    .await;
    authority.stop().await;
    eventually("a failed pull", || async {
        node.metric("keyfleet_jwks_fetch_total{source=\"pull\",outcome=\"error\"}")
            .await
            .unwrap_or(0.0)
            >= 1.0
    })
    .await;
    check(&node, "stale-if-error", &token(&a, NOW), "", Reason::Ok).await;

    clock.advance(3601);
    check(
        &node,
        "older than max-stale",
        &token(&a, NOW + 3601),
        "",
        Reason::Unavailable,
    )
    .await;
    assert_eq!(node.get("/readyz").await.0, 503);
    assert!(node.metric("keyfleet_jwks_age_seconds").await.unwrap() >= 3601.0);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_dir_lets_a_restarted_node_serve_during_an_outage() {
    let a = key(1);
    let dir = tempfile::tempdir().unwrap();
    let authority = FakeAuthority::start(snapshot(7, &[&a])).await;
    let source = authority.source();
    let config = Config {
        cache_dir: Some(dir.path().to_owned()),
        ..Config::for_test(source.clone())
    };
    let node = ready_node(config.clone()).await;
    let cache = dir.path().join(SAVED_KEY_SET_FILE);
    eventually("cache written", || async { cache.exists() }).await;
    node.stop().await;
    authority.stop().await;

    let node = spawn_node(config.clone()).await;
    let now = keyfleet_runtime::clock::system_now();
    let ok = check(
        &node,
        "served from the cache",
        &token(&a, now),
        "",
        Reason::Ok,
    )
    .await;
    assert_eq!(ok.issuer, ISSUER, "the issuer is cached too");
    assert_eq!(node.get("/readyz").await.0, 200);
    assert_eq!(node.metric("keyfleet_jwks_version ").await, Some(7.0));
    assert_eq!(
        node.metric("keyfleet_jwks_fetch_total{source=\"cache\",outcome=\"ok\"}")
            .await,
        Some(1.0)
    );
    node.stop().await;
}

/// A corrupt cache is ignored, never fatal: the node starts without keys (and says so).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_cache_is_ignored_never_fatal() {
    let a = key(1);
    let dir = tempfile::tempdir().unwrap();
    write_private(&dir.path().join(SAVED_KEY_SET_FILE), b"{ not json");
    // The authority is down: only the cache could have given keys.
    let node = spawn_node(Config {
        cache_dir: Some(dir.path().to_owned()),
        ..Config::for_test(nowhere())
    })
    .await;
    let now = keyfleet_runtime::clock::system_now();
    let status = node.verify(&token(&a, now), "").await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable);
    assert_eq!(node.get("/readyz").await.0, 503);
    assert_eq!(
        node.metric("keyfleet_jwks_fetch_total{source=\"cache\",outcome=\"error\"}")
            .await,
        Some(1.0)
    );
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwks_url_source_keeps_the_last_good_set_and_counts_rejected_keys() {
    let (a, b) = (key(1), key(2));
    let weak = {
        let mut identity = [0u8; 32];
        identity[0] = 1;
        serde_json::json!({"kty":"OKP","crv":"Ed25519","kid":"weak","x": URL_SAFE_NO_PAD.encode(identity)})
    };
    let rsa = serde_json::json!({"kty":"RSA","kid":"rsa","n":"AQAB","e":"AQAB"});
    let body = jwks_json(&[
        serde_json::to_value(a.jwk()).unwrap(),
        weak,
        rsa,
        serde_json::json!(42),
    ]);
    let jwks = FakeJwks::start(200, body).await;
    let node = ready_node(Config {
        issuer: Some(ISSUER.into()),
        refresh_interval: Duration::from_millis(100),
        ..Config::for_test(Source::JwksUrl {
            url: jwks.url.clone(),
        })
    })
    .await;
    let now = keyfleet_runtime::clock::system_now();
    check(
        &node,
        "key from the jwks url",
        &token(&a, now),
        "",
        Reason::Ok,
    )
    .await;
    assert!(
        node.metric("keyfleet_keys_rejected_total{why=\"weak_key\"}")
            .await
            .unwrap()
            >= 1.0
    );
    assert!(
        node.metric("keyfleet_keys_rejected_total{why=\"not_okp_ed25519\"}")
            .await
            .unwrap()
            >= 1.0
    );

    for (status, garbage) in [
        (200, "<html>oops</html>"),
        (200, r#"{"keys":[]}"#),
        (500, "down"),
    ] {
        jwks.serve(status, garbage);
        let seen = jwks.hits();
        eventually("two more fetches", || async { jwks.hits() >= seen + 2 }).await;
        check(&node, "last good set kept", &token(&a, now), "", Reason::Ok).await;
    }
    assert!(
        node.metric("keyfleet_jwks_fetch_total{source=\"http\",outcome=\"error\"}")
            .await
            .unwrap()
            >= 3.0
    );

    jwks.serve(200, jwks_json(&[serde_json::to_value(b.jwk()).unwrap()]));
    eventually("key b picked up", || async {
        node.verify(&token(&b, now), "")
            .await
            .is_ok_and(|r| r.valid)
    })
    .await;
    node.stop().await;
}

/// A JWKS URL does not name its issuer: the node refuses to start without one.
#[tokio::test]
async fn a_jwks_url_source_needs_an_issuer() {
    let source = Source::JwksUrl {
        url: "http://127.0.0.1:1/jwks.json".into(),
    };
    let (grpc, _) = serve::loopback().await;
    let (http, _) = serve::loopback().await;
    let err = run(
        grpc,
        http,
        Config::for_test(source),
        CancellationToken::new(),
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("--issuer"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_health_and_metrics() {
    let a = key(1);
    let jwks = FakeJwks::start(503, "not yet".into()).await;
    let node = spawn_node(Config {
        issuer: Some(ISSUER.into()),
        ..Config::for_test(Source::JwksUrl {
            url: jwks.url.clone(),
        })
    })
    .await;
    eventually("a first failed fetch", || async { jwks.hits() >= 1 }).await;
    assert_eq!(node.get("/healthz").await, (200, "ok".to_owned()));
    assert_eq!(node.get("/readyz").await.0, 503);
    let now = keyfleet_runtime::clock::system_now();
    let status = node.verify(&token(&a, now), "").await.unwrap_err();
    assert_eq!(
        status.code(),
        tonic::Code::Unavailable,
        "no key set yet is a gRPC error"
    );

    let health = |service: &'static str| {
        let mut client = tonic_health::pb::health_client::HealthClient::new(node.channel.clone());
        async move {
            client
                .check(tonic_health::pb::HealthCheckRequest {
                    service: service.into(),
                })
                .await
                .map(|r| r.into_inner().status)
        }
    };
    assert_eq!(
        health("keyfleet.v1.Verifier").await.unwrap(),
        tonic_health::pb::health_check_response::ServingStatus::NotServing as i32
    );

    jwks.serve(200, jwks_json(&[serde_json::to_value(a.jwk()).unwrap()]));
    node.wait_ready().await;
    eventually("health SERVING", || async {
        health("keyfleet.v1.Verifier").await.ok()
            == Some(tonic_health::pb::health_check_response::ServingStatus::Serving as i32)
    })
    .await;
    check(&node, "valid", &token(&a, now), "", Reason::Ok).await;

    let response = http::get(node.served.http, "/metrics").await;
    let content_type = response.header("content-type");
    assert!(
        content_type.starts_with("application/openmetrics-text"),
        "{content_type}"
    );
    let text = response.body;
    assert!(
        text.contains("keyfleet_verify_total{reason=\"OK\"} 1"),
        "{text}"
    );
    for name in [
        "keyfleet_verify_duration_seconds_bucket",
        "keyfleet_jwks_version",
        "keyfleet_jwks_age_seconds",
        "keyfleet_jwks_fetch_total{source=\"http\",outcome=\"ok\"}",
        "keyfleet_inflight_requests",
        "keyfleet_unknown_kid_total",
    ] {
        assert!(text.contains(name), "{name} missing from\n{text}");
    }
    node.stop().await;
}

mod batching;
mod defaults;
mod deltas;
mod demands;
mod hostile;
mod observability;
mod proxies;
mod relay;
mod secure_cache;

/// A fleet credential as `--node-token-file` holds it.
fn fleet_token() -> String {
    "0123456789abcdef".repeat(4)
}

/// The node sends the fleet credential from `--node-token-file` on every call to the authority
/// (the watch stream and the pulls), and repeats its ack as a heartbeat on an idle stream, so
/// the authority keeps its node id for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sends_the_fleet_credential_and_heartbeats() {
    let k1 = key(1);
    let fake = FakeAuthority::start(snapshot(1, &[&k1])).await;
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("node.token");
    let token = fleet_token();
    write_private(&token_file, format!("{token}\n"));
    let node = ready_node(Config {
        node_token_file: Some(token_file.clone()),
        ..Config::for_test(fake.source())
    })
    .await;
    eventually("a pull and a heartbeat after the ack", || async {
        fake.get_jwks_calls() > 0 && fake.acks_of(1) >= 2
    })
    .await;
    let seen = fake.state.credentials.lock().unwrap().clone();
    let want = Some(format!("Bearer {token}"));
    assert!(seen.iter().any(|(rpc, _)| *rpc == "WatchJwks"), "{seen:?}");
    assert!(seen.iter().any(|(rpc, _)| *rpc == "GetJwks"), "{seen:?}");
    assert!(seen.iter().all(|(_, c)| *c == want), "{seen:?}");
    node.stop().await;
    fake.stop().await;
}

/// A token file that cannot be a fleet credential (short, control characters, missing, open
/// to other users) is refused at start, without printing the token.
#[test]
fn a_node_token_file_that_cannot_be_a_credential_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let token = fleet_token();
    for (what, text) in [
        ("short", "abc\n"),
        ("control characters", &format!("{token}\u{7}x")),
    ] {
        let path = dir.path().join(format!("bad-{}.token", what.len()));
        write_private(&path, text);
        let config = Config {
            node_token_file: Some(path),
            ..Config::for_test(nowhere())
        };
        let err = config.check().expect_err(what).to_string();
        assert!(err.contains("--node-token-file"), "{what}: {err}");
        assert!(!err.contains(&token), "the token is never printed: {err}");
    }
    let missing = Config {
        node_token_file: Some(dir.path().join("missing")),
        ..Config::for_test(nowhere())
    };
    assert!(missing.check().is_err());
    // A token file other users can read is refused like the authority's own token files.
    let token_file = dir.path().join("node.token");
    write_private(&token_file, format!("{token}\n"));
    chmod(&token_file, 0o644);
    let open = Config {
        node_token_file: Some(token_file),
        ..Config::for_test(nowhere())
    };
    let err = open.check().expect_err("a 0644 token file").to_string();
    assert!(err.contains("chmod 600"), "{err}");
}
