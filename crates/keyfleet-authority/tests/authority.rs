//! End-to-end tests of the signing authority: real gRPC and HTTP servers on 127.0.0.1:0, a
//! manual clock to step through rotations and retention, and the key ring on disk.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use keyfleet_authority::{Authority, Config, KEYRING_FILE, Kek, OpenError};
use keyfleet_core::{Jwk, KeySet, RingPolicy};
use keyfleet_proto::v1 as pb;
use keyfleet_proto::v1::authority_client::AuthorityClient;
use keyfleet_runtime::Clock;
use keyfleet_testkit::files::{mode, write_private};
use keyfleet_testkit::grpc::{bearer as with_bearer, with_authorization};
use keyfleet_testkit::serve::Pair;
use keyfleet_testkit::{eventually, http};
use serde_json::Value;
use tempfile::TempDir;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::{Code, Request, Streaming};

const START: i64 = 1_700_000_000;

struct TestAuthority {
    grpc: SocketAddr,
    http: SocketAddr,
    admin: String,
    node: String,
    served: Pair,
    /// The data dir, when the authority made its own ([`TestAuthority::start_with`]).
    dir: Option<TempDir>,
}

impl TestAuthority {
    /// An authority on `config` (its data dir is the caller's).
    async fn spawn(config: Config) -> TestAuthority {
        keyfleet_runtime::telemetry::test_init();
        let authority = Authority::open(config).unwrap();
        let admin = authority.admin_token();
        let node = authority.node_token();
        let served =
            Pair::start(|grpc, http, shutdown| authority.serve(grpc, http, shutdown)).await;
        TestAuthority {
            grpc: served.grpc,
            http: served.http,
            admin,
            node,
            served,
            dir: None,
        }
    }

    /// An authority on a fresh data dir of its own, with the test config.
    async fn start() -> TestAuthority {
        TestAuthority::start_with(|config| config).await
    }

    /// An authority on a fresh data dir of its own, with `edit` applied to the test config.
    async fn start_with(edit: impl FnOnce(Config) -> Config) -> TestAuthority {
        let dir = tempfile::tempdir().unwrap();
        let mut auth = TestAuthority::spawn(edit(Config::for_test(dir.path()))).await;
        auth.dir = Some(dir);
        auth
    }

    /// An authority on a fresh data dir of its own, on `clock` with [`policy`].
    async fn manual(clock: &Clock) -> TestAuthority {
        TestAuthority::start_with(|config| Config {
            clock: clock.clone(),
            policy: policy(),
            ..config
        })
        .await
    }

    /// The data dir the authority made for itself.
    fn dir(&self) -> &Path {
        self.dir
            .as_ref()
            .expect("started with a data dir of its own")
            .path()
    }

    async fn client(&self) -> AuthorityClient<Channel> {
        AuthorityClient::connect(self.served.grpc_url())
            .await
            .unwrap()
    }

    /// `GET path` on the HTTP listener, with `Host: localhost`.
    async fn get(&self, path: &str) -> http::Response {
        http::get_as(self.http, "localhost", path).await
    }

    /// `msg` with the admin credential.
    fn admin<T>(&self, msg: T) -> Request<T> {
        with_bearer(msg, &self.admin)
    }

    /// `msg` with the fleet credential.
    fn node<T>(&self, msg: T) -> Request<T> {
        with_bearer(msg, &self.node)
    }

    /// Waits until the fleet view's watchers are as `holds` wants.
    async fn until_watchers(&self, what: &str, holds: impl Fn(&[pb::WatcherInfo]) -> bool) {
        let client = self.client().await;
        let holds = &holds;
        eventually(what, || {
            let mut client = client.clone();
            let admin = self.admin.as_str();
            async move { holds(&list(&mut client, admin).await.watchers) }
        })
        .await;
    }

    /// Waits until the published key set is as `holds` wants.
    async fn until_jwks(&self, what: &str, holds: impl Fn(&pb::JwksSnapshot) -> bool) {
        let client = self.client().await;
        let holds = &holds;
        eventually(what, || {
            let mut client = client.clone();
            async move { holds(&jwks(&mut client).await) }
        })
        .await;
    }

    async fn rotate(&self, client: &mut AuthorityClient<Channel>) -> pb::RotateKeysResponse {
        client
            .rotate_keys(self.admin(pb::RotateKeysRequest {}))
            .await
            .unwrap()
            .into_inner()
    }

    /// Cancels and checks that both servers drain and `serve` returns Ok.
    async fn stop(self) {
        self.served.stop().await;
    }
}

fn manual_config(dir: &Path, clock: &Clock, policy: RingPolicy) -> Config {
    Config {
        clock: clock.clone(),
        policy,
        ..Config::for_test(dir)
    }
}

fn policy() -> RingPolicy {
    RingPolicy {
        token_ttl: 60,
        leeway: 5,
        rotation_period: 1000,
        publish_ahead: 30,
    }
}

async fn jwks(client: &mut AuthorityClient<Channel>) -> pb::JwksSnapshot {
    client
        .get_jwks(pb::GetJwksRequest {})
        .await
        .unwrap()
        .into_inner()
}

fn kids(snapshot: &pb::JwksSnapshot) -> BTreeSet<String> {
    snapshot.keys.iter().map(|k| k.kid.clone()).collect()
}

fn next_kid(snapshot: &pb::JwksSnapshot) -> String {
    let next: Vec<&str> = snapshot
        .keys
        .iter()
        .map(|k| k.kid.as_str())
        .filter(|k| *k != snapshot.active_kid)
        .collect();
    assert_eq!(
        next.len(),
        1,
        "one next key besides the active one: {snapshot:?}"
    );
    next[0].to_owned()
}

/// The token's payload as JSON (no verification).
fn payload(token: &str) -> Value {
    use base64::Engine as _;
    let part = token.split('.').nth(1).unwrap();
    serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(part)
            .unwrap(),
    )
    .unwrap()
}

/// Verifies `token` strictly against `snapshot`, as a verifier would.
fn verify(
    token: &str,
    snapshot: &pb::JwksSnapshot,
    now: i64,
) -> Result<keyfleet_core::Verified, keyfleet_core::token::Refusal> {
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
    let (set, rejected) = KeySet::build(
        snapshot.version,
        None,
        &jwks,
        snapshot.revoked_kids.clone(),
        [],
    );
    assert!(rejected.is_empty(), "{rejected:?}");
    keyfleet_core::validate(
        token,
        &set,
        now,
        &keyfleet_core::Policy::new(&snapshot.issuer),
        None,
    )
}

async fn issue(
    auth: &TestAuthority,
    client: &mut AuthorityClient<Channel>,
) -> pb::IssueTokenResponse {
    let req = pb::IssueTokenRequest {
        subject: "svc-a".into(),
        audience: vec!["api".into()],
        ..Default::default()
    };
    client
        .issue_token(auth.admin(req))
        .await
        .unwrap()
        .into_inner()
}

/// The kids whose private key is stored in `keyring.json`.
fn stored_private_kids(dir: &Path) -> BTreeSet<String> {
    let file: Value =
        serde_json::from_slice(&std::fs::read(dir.join(KEYRING_FILE)).unwrap()).unwrap();
    file["private_keys"]
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect()
}

#[tokio::test]
async fn restart_publishes_the_same_keys_and_signs_with_the_same_key() {
    let dir = tempfile::tempdir().unwrap();
    let auth = TestAuthority::spawn(Config::for_test(dir.path())).await;
    let mut client = auth.client().await;
    let before = jwks(&mut client).await;
    let issued = issue(&auth, &mut client).await;
    assert_eq!(issued.kid, before.active_kid);
    let verified = verify(
        &issued.token,
        &before,
        keyfleet_runtime::clock::system_now(),
    )
    .unwrap();
    assert_eq!(verified.subject, "svc-a");
    assert_eq!(before.keys.len(), 2, "active and next are published");
    let (admin, node) = (auth.admin.clone(), auth.node.clone());
    assert_ne!(admin, node, "the fleet credential is not the admin's");
    auth.stop().await;

    for file in [KEYRING_FILE, "admin.token", "node.token"] {
        assert_eq!(mode(&dir.path().join(file)), 0o600, "{file}");
    }
    // A crash may leave a temporary file behind: it is ignored and removed.
    std::fs::write(dir.path().join("keyring.json.tmp"), b"{ half a ring").unwrap();

    let auth = TestAuthority::spawn(Config::for_test(dir.path())).await;
    assert_eq!(auth.admin, admin, "the admin token file is reused");
    assert_eq!(auth.node, node, "the node token file is reused");
    let mut client = auth.client().await;
    let after = jwks(&mut client).await;
    assert_eq!(after.keys, before.keys);
    assert_eq!(after.active_kid, before.active_kid);
    assert_eq!(after.version, before.version);
    assert_eq!(issue(&auth, &mut client).await.kid, before.active_kid);
    assert!(!dir.path().join("keyring.json.tmp").exists());
    auth.stop().await;
}

#[test]
fn one_data_dir_serves_one_authority() {
    let dir = tempfile::tempdir().unwrap();
    let first = Authority::open(Config::for_test(dir.path())).unwrap();
    let ring = std::fs::read(dir.path().join(KEYRING_FILE)).unwrap();
    let err = Authority::open(Config::for_test(dir.path())).unwrap_err();
    assert!(matches!(err, OpenError::Locked { .. }), "{err}");
    assert!(err.to_string().contains("--data-dir"), "{err}");
    assert_eq!(
        std::fs::read(dir.path().join(KEYRING_FILE)).unwrap(),
        ring,
        "the refused authority wrote nothing"
    );
    // The lock goes with the first authority.
    drop(first);
    let second = Authority::open(Config::for_test(dir.path())).unwrap();
    assert_eq!(std::fs::read(dir.path().join(KEYRING_FILE)).unwrap(), ring);
    drop(second);
}

/// A sealed ring (private keys under a KEK) in a fresh data dir: the dir and the KEK.
fn sealed_ring() -> (TempDir, Kek) {
    let dir = tempfile::tempdir().unwrap();
    let kek = Kek::generate();
    drop(
        Authority::open(Config {
            kek: Some(kek.clone()),
            ..Config::for_test(dir.path())
        })
        .unwrap(),
    );
    (dir, kek)
}

/// An unsealed ring in a fresh data dir: the dir, and the ring's bytes.
fn plain_ring() -> (TempDir, Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    drop(Authority::open(Config::for_test(dir.path())).unwrap());
    let bytes = std::fs::read(dir.path().join(KEYRING_FILE)).unwrap();
    (dir, bytes)
}

/// A sealed ring opens with its KEK (from memory or a file), again and again; without it, with
/// another, or with an unsafe policy it is refused, and the ring file is untouched.
#[test]
fn open_refuses_bad_state_without_touching_the_disk() {
    let (dir, kek) = sealed_ring();
    let sealed_config = || Config {
        kek: Some(kek.clone()),
        ..Config::for_test(dir.path())
    };
    let ring_path = dir.path().join(KEYRING_FILE);
    let bytes = std::fs::read(&ring_path).unwrap();
    let file: Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(file["sealed"], true);

    // The right KEK opens it, again and again, with the same keys.
    let reopened = Authority::open(sealed_config()).unwrap();
    drop(reopened);
    // A KEK file must be as private as the ring it opens (secure_files tests the refusals).
    let kek_file = dir.path().join("kek");
    write_private(&kek_file, format!("{}\n", kek.to_hex()));
    Authority::open(Config {
        kek: Some(Kek::from_file(&kek_file).unwrap()),
        ..Config::for_test(dir.path())
    })
    .unwrap();
    let bytes = std::fs::read(&ring_path).unwrap();

    let check = |config: Config, want: &str| {
        let err = Authority::open(config).expect_err(want);
        let message = err.to_string();
        assert!(
            message.contains(want),
            "{message:?} should contain {want:?}"
        );
        assert_eq!(
            std::fs::read(&ring_path).unwrap(),
            bytes,
            "{want}: the ring file is untouched"
        );
        err
    };
    let err = check(
        Config::for_test(dir.path()),
        "is sealed: pass --kek-file or KEYFLEET_KEK",
    );
    assert!(matches!(err, OpenError::Sealed { .. }));
    let err = check(
        Config {
            kek: Some(Kek::generate()),
            ..Config::for_test(dir.path())
        },
        "key-encryption key",
    );
    assert!(matches!(err, OpenError::WrongKek { .. }));
    let bad_policy = RingPolicy {
        publish_ahead: 5000,
        rotation_period: 1000,
        ..policy()
    };
    check(
        Config {
            policy: bad_policy,
            ..sealed_config()
        },
        "--publish-ahead",
    );
}

#[test]
fn an_unsealed_ring_refuses_a_kek() {
    let (plain, plain_bytes) = plain_ring();
    let err = Authority::open(Config {
        kek: Some(Kek::generate()),
        ..Config::for_test(plain.path())
    })
    .unwrap_err();
    assert!(matches!(err, OpenError::NotSealed { .. }), "{err}");
    assert_eq!(
        std::fs::read(plain.path().join(KEYRING_FILE)).unwrap(),
        plain_bytes
    );
}

/// A truncated ring, or one missing a private key, is refused with advice and left as it is.
#[test]
fn a_damaged_ring_is_refused_with_advice() {
    let (plain, plain_bytes) = plain_ring();
    let plain_ring = plain.path().join(KEYRING_FILE);
    let mut damaged: Value = serde_json::from_slice(&plain_bytes).unwrap();
    let active = damaged["ring"]["keys"][0]["kid"]
        .as_str()
        .unwrap()
        .to_owned();
    damaged["private_keys"]
        .as_object_mut()
        .unwrap()
        .remove(&active);
    let damaged = serde_json::to_vec(&damaged).unwrap();
    for (what, content) in [
        ("truncated", &plain_bytes[..plain_bytes.len() / 2]),
        ("missing key", &damaged[..]),
    ] {
        std::fs::write(&plain_ring, content).unwrap();
        let err = Authority::open(Config::for_test(plain.path())).unwrap_err();
        assert!(
            matches!(err, OpenError::CorruptRing { .. }),
            "{what}: {err}"
        );
        assert!(
            err.to_string().contains("restore it from a backup"),
            "{err}"
        );
        assert_eq!(std::fs::read(&plain_ring).unwrap(), content, "{what}");
    }
}

#[test]
fn a_failed_open_creates_no_admin_token_file() {
    let fresh = tempfile::tempdir().unwrap();
    write_private(&fresh.path().join(KEYRING_FILE), b"not json");
    let err = Authority::open(Config::for_test(fresh.path())).unwrap_err();
    assert!(matches!(err, OpenError::CorruptRing { .. }), "{err}");
    assert!(!fresh.path().join("admin.token").exists());
}

#[tokio::test]
async fn admin_calls_need_the_credential() {
    let auth = TestAuthority::start().await;
    let mut client = auth.client().await;
    let bad: [(&str, Option<&str>); 3] = [
        ("none", None),
        ("wrong", Some("Bearer nope")),
        ("scheme", Some("Basic x")),
    ];
    for (what, header) in bad {
        let issue = pb::IssueTokenRequest {
            subject: "s".into(),
            ..Default::default()
        };
        let codes = [
            client
                .issue_token(with_authorization(issue, header))
                .await
                .map(drop),
            client
                .rotate_keys(with_authorization(pb::RotateKeysRequest {}, header))
                .await
                .map(drop),
            client
                .revoke_key(with_authorization(
                    pb::RevokeKeyRequest { kid: "k".into() },
                    header,
                ))
                .await
                .map(drop),
            client
                .revoke_token(with_authorization(
                    pb::RevokeTokenRequest {
                        jti: "j".into(),
                        until: 0,
                    },
                    header,
                ))
                .await
                .map(drop),
        ];
        for status in codes {
            let status = status.expect_err(what);
            assert_eq!(status.code(), Code::Unauthenticated, "{what}");
            assert!(
                status.message().contains("--admin-token-file"),
                "{}",
                status.message()
            );
        }
    }
    // Public keys need no credential; the fleet view needs the admin's.
    client.get_jwks(pb::GetJwksRequest {}).await.unwrap();
    let status = client.list_keys(pb::ListKeysRequest {}).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    client
        .list_keys(auth.admin(pb::ListKeysRequest {}))
        .await
        .unwrap();
    auth.stop().await;
}

fn claims(k: &str, v: &str) -> HashMap<String, String> {
    HashMap::from([(k.to_owned(), v.to_owned())])
}

#[tokio::test]
async fn issue_token_refuses_a_bad_request() {
    let auth = TestAuthority::start().await;
    let mut client = auth.client().await;
    let base = || pb::IssueTokenRequest {
        subject: "svc".into(),
        ..Default::default()
    };
    let cases = [
        (
            pb::IssueTokenRequest {
                subject: String::new(),
                ..base()
            },
            "subject is required",
        ),
        (
            pb::IssueTokenRequest {
                ttl_seconds: 61,
                ..base()
            },
            "--token-ttl (60s)",
        ),
        (
            pb::IssueTokenRequest {
                ttl_seconds: -1,
                ..base()
            },
            "between 1 and",
        ),
        (
            pb::IssueTokenRequest {
                claims: claims("exp", "1"),
                ..base()
            },
            "claim \"exp\" is registered",
        ),
        (
            pb::IssueTokenRequest {
                audience: vec![String::new()],
                ..base()
            },
            "audience cannot be empty",
        ),
        (
            pb::IssueTokenRequest {
                claims: claims("big", &"x".repeat(9000)),
                ..base()
            },
            "bytes",
        ),
    ];
    for (req, want) in cases {
        let status = client.issue_token(auth.admin(req)).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{want}");
        assert!(
            status.message().contains(want),
            "{:?} should contain {want:?}",
            status.message()
        );
    }
    auth.stop().await;
}

/// A minted token carries the subject, audiences, lifetime and claims asked for (a claim's
/// JSON value as JSON), a fresh jti, and the longest lifetime when none is asked.
#[tokio::test]
async fn an_issued_token_carries_what_was_asked() {
    let auth = TestAuthority::start().await;
    let mut client = auth.client().await;
    let mut claims = claims("role", "admin");
    claims.insert("level".into(), "3".into());
    claims.insert("tags".into(), r#"["a","b"]"#.into());
    let req = pb::IssueTokenRequest {
        subject: "svc".into(),
        audience: vec!["a".into(), "b".into()],
        ttl_seconds: 30,
        claims,
    };
    let issued = client
        .issue_token(auth.admin(req))
        .await
        .unwrap()
        .into_inner();
    let body = payload(&issued.token);
    assert_eq!(body["sub"], "svc");
    assert_eq!(body["iss"], "keyfleet");
    assert_eq!(body["aud"], serde_json::json!(["a", "b"]));
    assert_eq!(body["role"], "admin");
    assert_eq!(body["level"], 3);
    assert_eq!(body["tags"], serde_json::json!(["a", "b"]));
    assert_eq!(body["jti"], issued.jti.as_str());
    assert_eq!(body["exp"].as_i64().unwrap(), issued.expires_at);
    assert_eq!(issued.expires_at - body["iat"].as_i64().unwrap(), 30);
    assert_eq!(body["nbf"], body["iat"]);
    let other = issue(&auth, &mut client).await;
    assert_ne!(other.jti, issued.jti);
    assert_eq!(
        other.expires_at - payload(&other.token)["iat"].as_i64().unwrap(),
        60,
        "ttl 0 is the maximum"
    );
    auth.stop().await;
}

/// A watch stream and the sender of its acknowledgements.
struct Watch {
    acks: mpsc::Sender<pb::WatchJwksRequest>,
    snapshots: Streaming<pb::JwksSnapshot>,
}

impl Watch {
    async fn open(
        auth: &TestAuthority,
        client: &mut AuthorityClient<Channel>,
        node_id: &str,
    ) -> Watch {
        Watch::try_open(auth, client, node_id, "eu-west")
            .await
            .expect("the watch stream opens")
    }

    /// Opens a stream with the fleet credential, saying hello as `node_id` in `region`.
    async fn try_open(
        auth: &TestAuthority,
        client: &mut AuthorityClient<Channel>,
        node_id: &str,
        region: &str,
    ) -> Result<Watch, tonic::Status> {
        Watch::open_as(client, node_id, region, Some(&auth.node)).await
    }

    /// Opens a stream with `token` (none: no credential at all), as a verifier that predates
    /// deltas does.
    async fn open_as(
        client: &mut AuthorityClient<Channel>,
        node_id: &str,
        region: &str,
        token: Option<&str>,
    ) -> Result<Watch, tonic::Status> {
        let hello = pb::WatchJwksRequest {
            node_id: node_id.into(),
            region: region.into(),
            ..Default::default()
        };
        Watch::open_with(client, hello, token).await
    }

    /// Opens a stream with `token` (none: no credential at all) that says `hello` first.
    async fn open_with(
        client: &mut AuthorityClient<Channel>,
        hello: pb::WatchJwksRequest,
        token: Option<&str>,
    ) -> Result<Watch, tonic::Status> {
        let (acks, rx) = mpsc::channel(8);
        acks.send(hello).await.unwrap();
        let request = match token {
            Some(token) => with_bearer(ReceiverStream::new(rx), token),
            None => Request::new(ReceiverStream::new(rx)),
        };
        let snapshots = client.watch_jwks(request).await?.into_inner();
        Ok(Watch { acks, snapshots })
    }

    async fn next(&mut self) -> pb::JwksSnapshot {
        tokio::time::timeout(Duration::from_secs(10), self.snapshots.message())
            .await
            .expect("a snapshot within 10s")
            .unwrap()
            .expect("the stream is open")
    }

    async fn ack(&self, version: u64) {
        self.acks
            .send(pb::WatchJwksRequest {
                acked_version: version,
                ..Default::default()
            })
            .await
            .unwrap();
    }
}

async fn list(client: &mut AuthorityClient<Channel>, admin: &str) -> pb::ListKeysResponse {
    client
        .list_keys(with_bearer(pb::ListKeysRequest {}, admin))
        .await
        .unwrap()
        .into_inner()
}

/// An authority on a manual clock at `START` watched by `node_id`, listed as connected: the
/// authority, a client, the watch stream and the first snapshot it pushed.
async fn watched(
    clock: &Clock,
    node_id: &str,
) -> (
    TestAuthority,
    AuthorityClient<Channel>,
    Watch,
    pb::JwksSnapshot,
) {
    let auth = TestAuthority::manual(clock).await;
    let mut client = auth.client().await;
    let mut watch = Watch::open(&auth, &mut client, node_id).await;
    let first = watch.next().await;
    auth.until_watchers("the watcher is listed", |watchers| {
        watchers.iter().any(|w| w.node_id == node_id && w.connected)
    })
    .await;
    (auth, client, watch, first)
}

#[tokio::test]
async fn promotion_waits_for_live_watchers_to_ack() {
    let clock = Clock::manual(START);
    let (auth, mut client, mut watch, first) = watched(&clock, "verifier-1").await;
    let with_credential = client
        .get_jwks(auth.node(pb::GetJwksRequest {}))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        first, with_credential,
        "a watcher gets what GetJwks answers"
    );
    assert!(first.delta.is_none(), "{first:?}");
    let old_active = first.active_kid.clone();
    let next = next_kid(&first);

    // The watcher has not acknowledged the version carrying the next key: no promotion yet.
    let rotated = auth.rotate(&mut client).await;
    assert_eq!(rotated.promoting_kid, next);
    assert!(!rotated.activated);
    assert_eq!(rotated.active_kid, old_active);
    // Ticks keep running; still nothing moves while the clock stands still.
    let version = first.version;
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert_eq!(jwks(&mut client).await.active_kid, old_active);
    }
    assert_eq!(issue(&auth, &mut client).await.kid, old_active);
    // Operators see the rotation waiting on a watcher.
    let metrics = auth.get("/metrics").await.body;
    for line in [
        "keyfleet_watchers 1",
        "keyfleet_watchers_lagging 1",
        "keyfleet_watchers_min_acked_version 0",
    ] {
        assert!(metrics.contains(line), "{line:?} missing from:\n{metrics}");
    }

    // The acknowledgement releases it, and the new state is pushed with a new next key.
    watch.ack(version).await;
    let pushed = watch.next().await;
    assert_eq!(pushed.active_kid, next);
    assert!(pushed.version > version);
    let keys = kids(&pushed);
    assert!(
        keys.contains(&old_active),
        "the old key stays published while retiring"
    );
    assert_eq!(
        keys.len(),
        3,
        "retiring, active and a new next key: {keys:?}"
    );
    assert_eq!(issue(&auth, &mut client).await.kid, next);
    let listed = list(&mut client, &auth.admin).await;
    let watcher = listed
        .watchers
        .iter()
        .find(|w| w.node_id == "verifier-1")
        .unwrap();
    assert_eq!(
        (watcher.acked_version, watcher.region.as_str()),
        (version, "eu-west")
    );
    // Stopping with a watch stream open still drains.
    auth.stop().await;
}

/// Without an ack, publish-ahead is the latest a next key waits.
#[tokio::test]
async fn without_an_ack_a_next_key_waits_at_most_publish_ahead() {
    let clock = Clock::manual(START);
    let (auth, mut client, mut watch, first) = watched(&clock, "verifier-1").await;
    let next = next_kid(&first);
    let rotated = auth.rotate(&mut client).await;
    assert_eq!(
        (rotated.promoting_kid.as_str(), rotated.activated),
        (next.as_str(), false)
    );
    clock.advance(policy().publish_ahead);
    let pushed = watch.next().await;
    assert_eq!(pushed.active_kid, next);
    auth.stop().await;
}

#[tokio::test]
async fn retiring_key_stays_published_until_its_tokens_expire() {
    let clock = Clock::manual(START);
    let auth = TestAuthority::manual(&clock).await;
    let mut client = auth.client().await;
    let first = jwks(&mut client).await;
    let old = first.active_kid.clone();
    let token = issue(&auth, &mut client).await;
    assert!(stored_private_kids(auth.dir()).contains(&old));

    // No watcher: the next key is safe at once.
    let rotated = auth.rotate(&mut client).await;
    assert!(rotated.activated);
    assert_ne!(rotated.active_kid, old);
    let listed = list(&mut client, &auth.admin).await;
    let retiring = listed.keys.iter().find(|k| k.kid == old).unwrap();
    assert_eq!(retiring.state, pb::KeyState::Retiring as i32);
    assert_eq!(retiring.deactivated_at, START);
    assert_eq!(retiring.retire_at, START + 60 + 5);
    assert!(
        !stored_private_kids(auth.dir()).contains(&old),
        "the private key is destroyed at deactivation"
    );
    assert_eq!(stored_private_kids(auth.dir()).len(), 2);

    // Tokens it signed keep verifying until the retention ends.
    clock.advance(64);
    tokio::time::sleep(Duration::from_millis(150)).await;
    let snapshot = jwks(&mut client).await;
    assert!(kids(&snapshot).contains(&old));
    assert_eq!(
        verify(&token.token, &snapshot, START + 59).unwrap().kid,
        old
    );
    clock.advance(1);
    auth.until_jwks("the retiring key leaves the JWKS", |snapshot| {
        !kids(snapshot).contains(&old)
    })
    .await;
    assert!(
        list(&mut client, &auth.admin)
            .await
            .keys
            .iter()
            .all(|k| k.kid != old)
    );
    auth.stop().await;
}

async fn revoke_key(
    auth: &TestAuthority,
    client: &mut AuthorityClient<Channel>,
    kid: &str,
) -> Result<pb::RevokeKeyResponse, tonic::Status> {
    client
        .revoke_key(auth.admin(pb::RevokeKeyRequest { kid: kid.into() }))
        .await
        .map(tonic::Response::into_inner)
}

/// Revoking the active key pushes a set without it at once, signs with another key, destroys
/// its private key and lists it as revoked with its history.
#[tokio::test]
async fn revocation_takes_effect_at_once() {
    let clock = Clock::manual(START);
    let (auth, mut client, mut watch, first) = watched(&clock, "verifier-r").await;
    let old = first.active_kid.clone();

    let revoked = revoke_key(&auth, &mut client, &old).await.unwrap();
    assert_eq!(revoked.revoked_kid, old);
    assert_ne!(revoked.active_kid, old);
    assert!(revoked.version > first.version);
    let pushed = watch.next().await;
    assert_eq!(pushed.version, revoked.version);
    assert!(!kids(&pushed).contains(&old));
    assert_eq!(pushed.revoked_kids, vec![old.clone()]);
    assert_eq!(pushed.active_kid, revoked.active_kid);
    assert_eq!(
        pushed.keys.len(),
        2,
        "the new active key and a new next key"
    );
    assert_eq!(issue(&auth, &mut client).await.kid, revoked.active_kid);
    assert!(!stored_private_kids(auth.dir()).contains(&old));
    let listed = list(&mut client, &auth.admin).await;
    let entry = listed
        .keys
        .iter()
        .find(|k| k.kid == old)
        .expect("revoked kids are listed");
    assert_eq!(
        (entry.state, entry.revoked_at),
        (pb::KeyState::Revoked as i32, START)
    );
    assert!(
        entry.created_at > 0 && entry.published_at > 0 && entry.activated_at > 0,
        "a revoked key keeps its history: {entry:?}"
    );
    assert_eq!(
        entry.deactivated_at, START,
        "it signed until its revocation"
    );
    assert!(
        listed.watchers.iter().any(|w| w.node_id == "verifier-r"),
        "{:?}",
        listed.watchers
    );
    auth.stop().await;
}

#[tokio::test]
async fn revoking_a_revoked_unknown_or_empty_kid_is_refused() {
    let clock = Clock::manual(START);
    let (auth, mut client, _watch, first) = watched(&clock, "verifier-r").await;
    let old = first.active_kid;
    revoke_key(&auth, &mut client, &old).await.unwrap();
    let errors = [
        (old.clone(), Code::FailedPrecondition),
        ("no-such-kid".to_owned(), Code::NotFound),
        (String::new(), Code::InvalidArgument),
    ];
    for (kid, code) in errors {
        let status = revoke_key(&auth, &mut client, &kid).await.unwrap_err();
        assert_eq!(status.code(), code, "{kid:?}: {status:?}");
    }
    auth.stop().await;
}

#[tokio::test]
async fn revoking_the_next_key_replaces_it() {
    let clock = Clock::manual(START);
    let (auth, mut client, mut watch, first) = watched(&clock, "verifier-r").await;
    let next = next_kid(&first);
    revoke_key(&auth, &mut client, &next).await.unwrap();
    let pushed = watch.next().await;
    assert!(!kids(&pushed).contains(&next));
    assert_eq!(pushed.keys.len(), 2);
    auth.stop().await;
}

/// A single token is denied by its jti (required) until its expiry, pushed at once.
#[tokio::test]
async fn a_revoked_token_is_pushed_with_its_expiry() {
    let clock = Clock::manual(START);
    let (auth, mut client, mut watch, _) = watched(&clock, "verifier-r").await;
    let status = client
        .revoke_token(auth.admin(pb::RevokeTokenRequest {
            jti: String::new(),
            until: START + 30,
        }))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    let token = issue(&auth, &mut client).await;
    let revoked = client
        .revoke_token(auth.admin(pb::RevokeTokenRequest {
            jti: token.jti.clone(),
            until: token.expires_at,
        }))
        .await
        .unwrap()
        .into_inner();
    let pushed = watch.next().await;
    assert_eq!(pushed.version, revoked.version);
    assert_eq!(
        pushed.revoked_tokens,
        vec![pb::RevokedToken {
            jti: token.jti,
            until: token.expires_at
        }]
    );
    auth.stop().await;
}

#[tokio::test]
async fn scheduled_rotation_follows_the_clock() {
    let clock = Clock::manual(START);
    let auth = TestAuthority::start_with(|config| Config {
        clock: clock.clone(),
        policy: RingPolicy {
            rotation_period: 100,
            publish_ahead: 10,
            ..policy()
        },
        ..config
    })
    .await;
    let mut client = auth.client().await;
    let first = jwks(&mut client).await;
    let listed = list(&mut client, &auth.admin).await;
    assert_eq!(listed.next_rotation_at, START + 100);
    assert_eq!(
        (
            listed.rotation_period_seconds,
            listed.publish_ahead_seconds,
            listed.token_ttl_seconds
        ),
        (100, 10, 60)
    );
    let next = next_kid(&first);
    clock.advance(99);
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert_eq!(jwks(&mut client).await.active_kid, first.active_kid);
    clock.advance(1);
    auth.until_jwks(
        "the scheduled rotation activates the next key",
        |snapshot| snapshot.active_kid == next,
    )
    .await;
    assert_eq!(
        list(&mut client, &auth.admin).await.next_rotation_at,
        START + 200
    );
    let metrics = auth.get("/metrics").await.body;
    assert!(
        metrics.contains("keyfleet_rotations_total{trigger=\"scheduled\"} 1"),
        "{metrics}"
    );
    auth.stop().await;
}

#[tokio::test]
async fn http_serves_jwks_discovery_and_metrics() {
    let auth = TestAuthority::start().await;
    let mut client = auth.client().await;
    let snapshot = jwks(&mut client).await;
    issue(&auth, &mut client).await;

    let http::Response {
        status,
        headers,
        body,
    } = auth.get("/.well-known/jwks.json").await;
    assert_eq!(status, 200);
    assert_eq!(headers["content-type"], "application/json");
    assert_eq!(
        headers["cache-control"], "public, max-age=1",
        "half of the 2s publish-ahead"
    );
    let doc: Value = serde_json::from_str(&body).unwrap();
    let keys = doc["keys"].as_array().unwrap();
    assert_eq!(keys.len(), snapshot.keys.len());
    for (key, want) in keys.iter().zip(&snapshot.keys) {
        let expected = serde_json::json!({
            "kty": "OKP", "crv": "Ed25519", "x": want.x, "kid": want.kid, "use": "sig", "alg": "EdDSA"
        });
        assert_eq!(key, &expected);
    }

    let discovery = http::get_as(
        auth.http,
        "auth.example:8443",
        "/.well-known/openid-configuration",
    )
    .await;
    assert_eq!(discovery.status, 200);
    let doc: Value = serde_json::from_str(&discovery.body).unwrap();
    assert_eq!(doc["issuer"], "keyfleet");
    assert_eq!(
        doc["jwks_uri"],
        "http://auth.example:8443/.well-known/jwks.json"
    );
    assert_eq!(
        doc["id_token_signing_alg_values_supported"],
        serde_json::json!(["EdDSA"])
    );

    let metrics = auth.get("/metrics").await;
    assert_eq!(metrics.status, 200);
    let body = metrics.body;
    for line in [
        "keyfleet_keys{state=\"active\"} 1",
        "keyfleet_keys{state=\"next\"} 1",
        "keyfleet_tokens_issued_total 1",
        "keyfleet_watchers 0",
        &format!("keyfleet_jwks_version {}", snapshot.version),
        "keyfleet_rotations_total{trigger=\"manual\"} 0",
        "keyfleet_key_next_rotation_timestamp_seconds ",
    ] {
        assert!(body.contains(line), "{line:?} missing from:\n{body}");
    }
    assert!(!body.contains(&auth.admin));

    assert_eq!(auth.get("/healthz").await.status, 200);
    assert_eq!(auth.get("/nope").await.status, 404);
    auth.stop().await;
}

#[tokio::test]
async fn a_failed_write_publishes_nothing() {
    let auth = TestAuthority::manual(&Clock::manual(START)).await;
    let mut client = auth.client().await;
    let first = jwks(&mut client).await;

    // The rename over the ring fails while its path is a non-empty directory.
    let ring = auth.dir().join(KEYRING_FILE);
    let saved = std::fs::read(&ring).unwrap();
    std::fs::remove_file(&ring).unwrap();
    std::fs::create_dir(&ring).unwrap();
    std::fs::write(ring.join("blocker"), b"").unwrap();
    let status = client
        .rotate_keys(auth.admin(pb::RotateKeysRequest {}))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert!(
        status.message().contains("cannot persist the key ring"),
        "{}",
        status.message()
    );
    let status = revoke_key(&auth, &mut client, &first.active_kid)
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    let now = jwks(&mut client).await;
    assert_eq!(
        (now.version, &now.keys, &now.active_kid),
        (first.version, &first.keys, &first.active_kid)
    );
    assert_eq!(issue(&auth, &mut client).await.kid, first.active_kid);

    // Once the disk takes writes again, the same request goes through.
    std::fs::remove_dir_all(&ring).unwrap();
    std::fs::write(&ring, saved).unwrap();
    let rotated = auth.rotate(&mut client).await;
    assert!(rotated.activated);
    assert_eq!(rotated.promoting_kid, next_kid(&first));
    let metrics = auth.get("/metrics").await.body;
    assert!(
        metrics.contains("keyfleet_keyring_persist_failures_total 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("keyfleet_rotations_total{trigger=\"manual\"} 1"),
        "{metrics}"
    );
    auth.stop().await;
}

/// Key management draws from the authenticated callers' budget (`--admin-rate`, bursts of
/// twice that); failed credentials never touch it (they have budgets of their own, per peer:
/// see `fleet::failed_credentials_are_limited_per_peer`); minting with the credential is not
/// rate-limited.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_calls_are_rate_limited() {
    let auth = TestAuthority::start_with(|config| Config {
        admin_rate: 1,
        ..config
    })
    .await;
    let mut client = auth.client().await;
    // Failed credentials first: they cost the operator nothing.
    for _ in 0..5 {
        let wrong = with_bearer(pb::RotateKeysRequest {}, "nope");
        assert_eq!(
            client.rotate_keys(wrong).await.unwrap_err().code(),
            Code::Unauthenticated
        );
    }
    // The burst (2): two revocations of a token.
    let revoke = pb::RevokeTokenRequest {
        jti: "j".into(),
        until: 0,
    };
    for _ in 0..2 {
        client
            .revoke_token(auth.admin(revoke.clone()))
            .await
            .unwrap();
    }
    // Now empty: key management is refused without touching the ring.
    let status = client.revoke_token(auth.admin(revoke)).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("--admin-rate"), "{status:?}");
    // Minting with the credential is not rate-limited.
    for _ in 0..5 {
        issue(&auth, &mut client).await;
    }
    auth.stop().await;
}

mod deltas;
mod fleet;
mod secure_files;
mod sessions;
