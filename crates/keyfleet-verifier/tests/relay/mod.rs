//! Relays (issue 13): a verifier with `--serve-watch` serves `GetJwks`/`WatchJwks` to the
//! verifiers behind it, against a real authority on loopback. A chain authority → relay → 3
//! nodes verifies a freshly rotated key's tokens with no false reject, the authority's gate waits
//! for the nodes behind the relay (listed with `via`), a revocation reaches every node through
//! the relay, a relay cut from the authority keeps its nodes answering until its own set is
//! older than `--max-stale`, and a client of the old protocol (no deltas) still works.

use std::path::PathBuf;

use keyfleet_authority::Authority as AuthorityServer;
use keyfleet_core::RingPolicy;
use keyfleet_proto::v1::authority_client::AuthorityClient;
use keyfleet_proto::v1::{KeyState, WatcherInfo};
use keyfleet_testkit::eventually_within;
use keyfleet_testkit::grpc::bearer;
use tempfile::TempDir;
use tonic::Code;

use super::*;

const RELAY: &str = "relay-eu";

/// A real authority on loopback with its data dir, and the fleet credential in a file for the
/// verifiers.
struct TestAuthority {
    served: Pair,
    admin: String,
    node: String,
    token_file: PathBuf,
    _dir: TempDir,
}

impl TestAuthority {
    /// Rotations wait for the fleet's acks (the fallback `--publish-ahead` is 10 minutes away),
    /// and a watcher stays live for 30 s between heartbeats.
    async fn start() -> TestAuthority {
        keyfleet_runtime::telemetry::test_init();
        let dir = tempfile::tempdir().unwrap();
        let config = keyfleet_authority::Config {
            policy: RingPolicy {
                token_ttl: 300,
                leeway: 5,
                rotation_period: 3600,
                publish_ahead: 600,
            },
            watcher_timeout: Duration::from_secs(30),
            ..keyfleet_authority::Config::for_test(&dir.path().join("authority"))
        };
        let authority = AuthorityServer::open(config).unwrap();
        let (admin, node) = (authority.admin_token(), authority.node_token());
        let token_file = dir.path().join("node.token");
        write_private(&token_file, format!("{node}\n"));
        let served =
            Pair::start(|grpc, http, shutdown| authority.serve(grpc, http, shutdown)).await;
        TestAuthority {
            served,
            admin,
            node,
            token_file,
            _dir: dir,
        }
    }

    fn client(&self) -> AuthorityClient<Channel> {
        AuthorityClient::new(grpc::lazy_channel(self.served.grpc))
    }

    async fn issue(&self) -> pb::IssueTokenResponse {
        let request = pb::IssueTokenRequest {
            subject: "alice".into(),
            audience: vec!["api".into()],
            ..Default::default()
        };
        self.client()
            .issue_token(bearer(request, &self.admin))
            .await
            .unwrap()
            .into_inner()
    }

    async fn list(&self) -> pb::ListKeysResponse {
        self.client()
            .list_keys(bearer(pb::ListKeysRequest {}, &self.admin))
            .await
            .unwrap()
            .into_inner()
    }

    async fn watcher(&self, node_id: &str) -> Option<WatcherInfo> {
        self.list()
            .await
            .watchers
            .into_iter()
            .find(|w| w.node_id == node_id)
    }
}

/// A verifier fed by `url` (the authority or a relay) under `node_id`, with the fleet
/// credential in `token_file`.
fn verifier(token_file: &std::path::Path, url: String, node_id: &str) -> Config {
    Config {
        node_id: node_id.into(),
        node_token_file: Some(token_file.to_owned()),
        ..Config::for_test(Source::Authority { url })
    }
}

/// A relay in front of `auth`.
fn relay(auth: &TestAuthority) -> Config {
    Config {
        serve_watch: true,
        ..verifier(&auth.token_file, auth.served.grpc_url(), RELAY)
    }
}

fn node_name(i: usize) -> String {
    format!("node-{i}")
}

/// Three nodes behind `relay`, ready.
async fn nodes_behind(auth: &TestAuthority, relay: &Node) -> Vec<Node> {
    let mut nodes = Vec::new();
    for i in 1..=3 {
        let url = format!("http://{}", relay.served.grpc);
        nodes.push(ready_node(verifier(&auth.token_file, url, &node_name(i))).await);
    }
    nodes
}

async fn reason(node: &Node, token: &str) -> Reason {
    node.verify(token, "api")
        .await
        .unwrap_or_else(|s| panic!("gRPC error {s:?}"))
        .reason()
}

/// A client of the relay's `Authority` service with the fleet credential, or none.
fn relay_client(relay: &Node) -> AuthorityClient<Channel> {
    AuthorityClient::new(relay.channel.clone())
}

/// A raw watch stream on `relay` (as a verifier that does (not) take deltas): the sender of
/// its requests, and its messages.
async fn raw_watch(
    relay: &Node,
    token: &str,
    node_id: &str,
    accept_deltas: bool,
) -> (mpsc::Sender<WatchJwksRequest>, Streaming<JwksSnapshot>) {
    let (tx, rx) = mpsc::channel(8);
    tx.send(WatchJwksRequest {
        node_id: node_id.into(),
        region: "test".into(),
        accept_deltas,
        ..Default::default()
    })
    .await
    .unwrap();
    let stream = relay_client(relay)
        .watch_jwks(bearer(ReceiverStream::new(rx), token))
        .await
        .unwrap()
        .into_inner();
    (tx, stream)
}

/// Authority → relay → 3 nodes: all listed by the authority with `via` = the relay; a rotation
/// waits for every node behind the relay (here held back by one that has not acknowledged);
/// then the freshly rotated key's tokens verify on every node, none refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_chain_verifies_a_freshly_rotated_key_and_the_gate_waits_for_its_nodes() {
    let auth = TestAuthority::start().await;
    let relay = ready_node(relay(&auth)).await;
    let nodes = nodes_behind(&auth, &relay).await;
    // A node behind the relay that has acknowledged nothing yet.
    let (laggard, mut laggard_stream) = raw_watch(&relay, &auth.node, "laggard", true).await;
    let first = laggard_stream.message().await.unwrap().unwrap();
    assert!(
        first.delta.is_none(),
        "a node with nothing gets a full snapshot"
    );

    eventually(
        "the authority lists every node behind the relay",
        || async {
            let list = auth.list().await.watchers;
            let behind: Vec<&str> = list
                .iter()
                .filter(|w| w.via == RELAY && w.connected)
                .map(|w| w.node_id.as_str())
                .collect();
            behind.len() == 4
                && (1..=3).all(|i| behind.contains(&node_name(i).as_str()))
                && list.iter().any(|w| w.node_id == RELAY && w.via.is_empty())
        },
    )
    .await;

    let rotated = auth
        .client()
        .rotate_keys(bearer(pb::RotateKeysRequest {}, &auth.admin))
        .await
        .unwrap()
        .into_inner();
    assert!(
        !rotated.activated,
        "the laggard behind the relay holds the rotation"
    );
    let promoting = rotated.promoting_kid;
    let version = auth.list().await.version;
    eventually("the three nodes acknowledge the newest version", || async {
        let list = auth.list().await.watchers;
        (1..=3).all(|i| {
            list.iter()
                .any(|w| w.node_id == node_name(i) && w.acked_version >= version)
        })
    })
    .await;
    let state = |list: &pb::ListKeysResponse| {
        list.keys
            .iter()
            .find(|k| k.kid == promoting)
            .map(|k| k.state())
    };
    let list = auth.list().await;
    assert_eq!(
        state(&list),
        Some(KeyState::Next),
        "still waiting for the laggard behind the relay: {:?}",
        list.watchers
    );
    let laggard_info = auth.watcher("laggard").await.unwrap();
    assert_eq!(
        (laggard_info.via.as_str(), laggard_info.acked_version),
        (RELAY, 0)
    );

    // The laggard catches up: the relay reports it, and the key is promoted.
    laggard
        .send(WatchJwksRequest {
            acked_version: version,
            ..Default::default()
        })
        .await
        .unwrap();
    eventually("the rotated key is promoted", || async {
        state(&auth.list().await) == Some(KeyState::Active)
    })
    .await;

    let mut rejects = 0;
    for _ in 0..10 {
        let issued = auth.issue().await;
        assert_eq!(issued.kid, promoting, "signed by the freshly rotated key");
        for node in &nodes {
            if reason(node, &issued.token).await != Reason::Ok {
                rejects += 1;
            }
        }
    }
    assert_eq!(rejects, 0, "false rejects of the freshly rotated key");
    drop(laggard);
    for node in nodes {
        node.stop().await;
    }
    relay.stop().await;
    auth.served.stop().await;
}

/// A token revoked at the authority is refused by every node behind the relay within a second
/// (measured by polling; the bound asserted is generous, the time is printed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_through_a_relay_reaches_every_node_quickly() {
    let auth = TestAuthority::start().await;
    let relay = ready_node(relay(&auth)).await;
    let nodes = nodes_behind(&auth, &relay).await;
    let issued = auth.issue().await;
    for node in &nodes {
        eventually("the token verifies", || async {
            reason(node, &issued.token).await == Reason::Ok
        })
        .await;
    }
    let revoked = auth
        .client()
        .revoke_token(bearer(
            pb::RevokeTokenRequest {
                jti: issued.jti.clone(),
                until: issued.expires_at,
            },
            &auth.admin,
        ))
        .await
        .unwrap()
        .into_inner();
    let took = eventually_within(
        "every node refuses the token",
        Duration::from_secs(10),
        || async {
            for node in &nodes {
                if reason(node, &issued.token).await != Reason::TokenRevoked {
                    return false;
                }
            }
            true
        },
    )
    .await;
    println!("revocation through one relay reached 3 nodes in {took:?}");
    assert!(took < Duration::from_secs(1), "took {took:?}");
    // Each node got it as a delta, at the authority's version.
    for node in &nodes {
        let held = node.metric("keyfleet_jwks_version ").await.unwrap_or(0.0);
        assert!(held >= revoked.version as f64, "{held}");
        let deltas = node
            .metric("keyfleet_jwks_updates_total{kind=\"delta\"}")
            .await
            .unwrap_or(0.0);
        assert!(deltas >= 1.0, "the revocation came as a delta");
    }
    for node in nodes {
        node.stop().await;
    }
    relay.stop().await;
    auth.served.stop().await;
}

/// Cut from the authority, a relay keeps serving its last state: its nodes keep verifying and
/// keep their streams, and new callers (a node started after the cut) still get the set. Once
/// the relay's own set is older than its `--max-stale`, it stops: `GetJwks` and new streams
/// answer UNAVAILABLE and open streams end, so its nodes cannot renew either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_cut_from_the_authority_keeps_its_nodes_answering_until_max_stale() {
    let auth = TestAuthority::start().await;
    let relay_clock = Clock::manual(keyfleet_runtime::clock::system_now());
    let relay = ready_node(Config {
        clock: relay_clock.clone(),
        max_stale: Duration::from_secs(600),
        ..relay(&auth)
    })
    .await;
    let nodes = nodes_behind(&auth, &relay).await;
    let issued = auth.issue().await;
    let version = auth.list().await.version;
    auth.served.stop().await;

    for node in &nodes {
        assert_eq!(reason(node, &issued.token).await, Reason::Ok);
    }
    assert_eq!(relay.metric("keyfleet_relay_streams ").await, Some(3.0));
    let pulled = relay_client(&relay)
        .get_jwks(bearer(pb::GetJwksRequest {}, &auth.node))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(pulled.version, version);
    let url = format!("http://{}", relay.served.grpc);
    let late = ready_node(verifier(&auth.token_file, url, "late")).await;
    assert_eq!(reason(&late, &issued.token).await, Reason::Ok);
    late.stop().await;
    for node in &nodes {
        assert_eq!(reason(node, &issued.token).await, Reason::Ok);
    }

    // Past the relay's --max-stale: it refuses, and ends the streams of its nodes.
    relay_clock.advance(601);
    let refused = raw_watch_refused(&relay, &auth.node, "probe").await;
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    let refused = relay_client(&relay)
        .get_jwks(bearer(pb::GetJwksRequest {}, &auth.node))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    assert!(refused.message().contains("--max-stale"), "{refused:?}");
    eventually("the relay ended its streams", || async {
        relay.metric("keyfleet_relay_streams ").await == Some(0.0)
    })
    .await;
    for node in nodes {
        node.stop().await;
    }
    relay.stop().await;
}

/// A watch stream on `relay` that must be refused: the status.
async fn raw_watch_refused(relay: &Node, token: &str, node_id: &str) -> Status {
    let (tx, rx) = mpsc::channel(8);
    tx.send(WatchJwksRequest {
        node_id: node_id.into(),
        region: "test".into(),
        accept_deltas: true,
        ..Default::default()
    })
    .await
    .unwrap();
    match relay_client(relay)
        .watch_jwks(bearer(ReceiverStream::new(rx), token))
        .await
    {
        Ok(_) => panic!("the relay accepted a watch stream it should refuse"),
        Err(status) => status,
    }
}

/// A client of the old protocol (no `accept_deltas`) watching through a relay gets full
/// snapshots with the deny lists, on connect and on every change; the relay answers only the
/// fleet credential, and says what it is when asked for anything but the key set.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_protocol_verifier_still_works_through_a_relay() {
    let auth = TestAuthority::start().await;
    let relay = ready_node(relay(&auth)).await;
    let (_tx, mut stream) = raw_watch(&relay, &auth.node, "old-node", false).await;
    let first = stream.message().await.unwrap().unwrap();
    assert!(first.delta.is_none() && !first.keys.is_empty(), "{first:?}");
    let issued = auth.issue().await;
    auth.client()
        .revoke_token(bearer(
            pb::RevokeTokenRequest {
                jti: issued.jti.clone(),
                until: issued.expires_at,
            },
            &auth.admin,
        ))
        .await
        .unwrap();
    let next = loop {
        let message = stream.message().await.unwrap().unwrap();
        assert!(message.delta.is_none(), "only full snapshots: {message:?}");
        if message.revoked_tokens.iter().any(|t| t.jti == issued.jti) {
            break message;
        }
    };
    assert!(next.version > first.version);
    // An old verifier node (its hello without deltas) is a raw client too; a real node behind
    // the relay still verifies and refuses the revoked token.
    let url = format!("http://{}", relay.served.grpc);
    let node = ready_node(verifier(&auth.token_file, url, "node-1")).await;
    assert_eq!(reason(&node, &issued.token).await, Reason::TokenRevoked);

    // The credential: none gets the public keys only, a wrong one is refused.
    let public = relay_client(&relay)
        .get_jwks(pb::GetJwksRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(!public.keys.is_empty() && public.revoked_tokens.is_empty());
    let wrong = "x".repeat(64);
    let refused = relay_client(&relay)
        .get_jwks(bearer(pb::GetJwksRequest {}, &wrong))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated);
    let refused = raw_watch_refused(&relay, &wrong, "intruder").await;
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
    let other = relay_client(&relay)
        .rotate_keys(bearer(pb::RotateKeysRequest {}, &auth.admin))
        .await
        .unwrap_err();
    assert_eq!(other.code(), Code::Unimplemented);
    assert!(other.message().contains("relay"), "{other:?}");
    node.stop().await;
    relay.stop().await;
    auth.served.stop().await;
}

/// `--serve-watch` needs an authority to relay and the fleet credential.
#[test]
fn serve_watch_needs_an_authority_and_the_fleet_credential() {
    let jwks_url = Config {
        serve_watch: true,
        issuer: Some(ISSUER.into()),
        ..Config::for_test(Source::JwksUrl {
            url: "http://127.0.0.1:1/jwks.json".into(),
        })
    };
    let err = jwks_url.check().unwrap_err();
    assert!(
        matches!(
            err,
            keyfleet_verifier::ConfigError::ServeWatchNeedsAuthority
        ),
        "{err}"
    );
    assert!(err.to_string().contains("--authority"), "{err}");
    let no_token = Config {
        serve_watch: true,
        ..Config::for_test(nowhere())
    };
    let err = no_token.check().unwrap_err();
    assert!(err.to_string().contains("--node-token-file"), "{err}");
}

/// A channel to `addr` whose connections leave from `source`: on Linux all of 127.0.0.0/8 is
/// this host, so 127.0.0.2 is another peer address to the relay than 127.0.0.1.
fn channel_from(source: std::net::IpAddr, addr: std::net::SocketAddr) -> Channel {
    tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_with_connector_lazy(tower::service_fn(
            move |_: tonic::transport::Uri| async move {
                let socket = tokio::net::TcpSocket::new_v4()?;
                socket.bind(std::net::SocketAddr::new(source, 0))?;
                let stream = socket.connect(addr).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
            },
        ))
}

/// A watch stream through `client` with `token` and a hello naming `node_id`: the sender of its
/// requests and its messages, or the refusal.
async fn watch_through(
    client: &AuthorityClient<Channel>,
    token: &str,
    node_id: &str,
) -> Result<(mpsc::Sender<WatchJwksRequest>, Streaming<JwksSnapshot>), Status> {
    let (tx, rx) = mpsc::channel(8);
    tx.send(WatchJwksRequest {
        node_id: node_id.into(),
        region: "test".into(),
        accept_deltas: true,
        ..Default::default()
    })
    .await
    .unwrap();
    let stream = client
        .clone()
        .watch_jwks(bearer(ReceiverStream::new(rx), token))
        .await?
        .into_inner();
    Ok((tx, stream))
}

/// Failed credentials are limited per peer at a relay, as at the authority: once one address
/// has spent its budget on wrong tokens (`GetJwks` and `WatchJwks` alike, answered
/// RESOURCE_EXHAUSTED), another address is still answered UNAUTHENTICATED for a wrong token and
/// served for the right one, a node from that address still starts behind the relay, and the
/// guesser's own address is served the moment it presents the right token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guessing_peer_spends_only_its_own_failure_budget_at_a_relay() {
    let auth = TestAuthority::start().await;
    let relay = ready_node(relay(&auth)).await;
    let guesser = AuthorityClient::new(channel_from([127, 0, 0, 2].into(), relay.served.grpc));
    let wrong = "x".repeat(64);
    let mut refused = 0;
    let exhausted = loop {
        let status = guesser
            .clone()
            .get_jwks(bearer(pb::GetJwksRequest {}, &wrong))
            .await
            .unwrap_err();
        if status.code() != Code::Unauthenticated {
            break status;
        }
        refused += 1;
        assert!(refused <= 1_000, "the guesser is never limited");
    };
    assert_eq!(exhausted.code(), Code::ResourceExhausted, "{exhausted:?}");
    assert!(
        exhausted.message().contains("this address"),
        "{exhausted:?}"
    );
    assert!(
        refused >= keyfleet_runtime::credentials::FAILURE_BURST as usize,
        "a burst of failures is answered UNAUTHENTICATED first: {refused}"
    );
    // Watch streams draw from the same budget (a few may be answered UNAUTHENTICATED from what
    // the bucket refilled meanwhile).
    let mut watches = 0;
    let status = loop {
        let status = watch_through(&guesser, &wrong, "intruder")
            .await
            .expect_err("refused");
        if status.code() != Code::Unauthenticated {
            break status;
        }
        watches += 1;
        assert!(
            watches <= 1_000,
            "the guesser's watch streams are never limited"
        );
    };
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");

    // Another address (127.0.0.1) has a budget of its own.
    let neighbour = relay_client(&relay);
    let status = neighbour
        .clone()
        .get_jwks(bearer(pb::GetJwksRequest {}, &wrong))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    let status = watch_through(&neighbour, &wrong, "intruder")
        .await
        .expect_err("refused");
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    let full = neighbour
        .clone()
        .get_jwks(bearer(pb::GetJwksRequest {}, &auth.node))
        .await
        .unwrap()
        .into_inner();
    assert!(!full.keys.is_empty());
    let url = format!("http://{}", relay.served.grpc);
    let node = ready_node(verifier(&auth.token_file, url, "node-1")).await;
    let issued = auth.issue().await;
    assert_eq!(reason(&node, &issued.token).await, Reason::Ok);

    // The right credential is accepted from the guesser's address too.
    guesser
        .clone()
        .get_jwks(bearer(pb::GetJwksRequest {}, &auth.node))
        .await
        .unwrap();
    let (_tx, mut stream) = watch_through(&guesser, &auth.node, "node-2").await.unwrap();
    assert!(stream.message().await.unwrap().is_some());
    node.stop().await;
    relay.stop().await;
    auth.served.stop().await;
}

/// With mutual TLS on the relay, the client certificate names the node behind it, as at the
/// authority: the hello cannot choose (or take over) another name, and a certificate that names
/// no node is refused with PERMISSION_DENIED.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_at_a_relay_names_the_node_by_its_certificate() {
    use keyfleet_runtime::tls::{ClientTls, ServerTls};
    use keyfleet_testkit::tls::Pki;

    let auth = TestAuthority::start().await;
    let pki = Pki::new("fleet CA");
    let (cert, key) = pki.server(&["localhost"]);
    let tls = ServerTls::from_pem(cert, key)
        .unwrap()
        .with_client_ca(pki.ca.clone())
        .unwrap();
    let relay = spawn_node(Config {
        tls: Some(tls),
        ..relay(&auth)
    })
    .await;
    let client_for = |names: &[&str]| {
        let (cert, key) = pki.client(names);
        let tls = ClientTls::default()
            .with_ca(pki.ca.clone())
            .unwrap()
            .with_identity(cert, key)
            .unwrap();
        let url = format!("https://localhost:{}", relay.served.grpc.port());
        AuthorityClient::new(
            keyfleet_runtime::client::endpoint(
                &url,
                &tls,
                &keyfleet_runtime::client::Settings::COMMAND,
            )
            .unwrap()
            .connect_lazy(),
        )
    };
    let node7 = client_for(&["node-7.fleet", "other.fleet"]);
    eventually("the relay serves the key set", || {
        let mut client = node7.clone();
        async move { client.get_jwks(pb::GetJwksRequest {}).await.is_ok() }
    })
    .await;
    let (_node7_tx, mut node7_stream) = watch_through(&node7, &auth.node, "node-1").await.unwrap();
    assert!(node7_stream.message().await.unwrap().is_some());
    eventually(
        "the authority lists node-7.fleet behind the relay",
        || async {
            auth.watcher("node-7.fleet")
                .await
                .is_some_and(|w| w.via == RELAY && w.connected)
        },
    )
    .await;
    assert!(
        auth.watcher("node-1").await.is_none(),
        "named by the certificate, not the hello"
    );
    // Another certificate cannot pose as node-7 by its hello: it is node-8.
    let node8 = client_for(&["node-8.fleet"]);
    let (_node8_tx, mut node8_stream) = watch_through(&node8, &auth.node, "node-7.fleet")
        .await
        .unwrap();
    assert!(node8_stream.message().await.unwrap().is_some());
    eventually(
        "the authority lists node-8.fleet behind the relay",
        || async { auth.watcher("node-8.fleet").await.is_some() },
    )
    .await;
    // A second stream with node-7's certificate meets the live one.
    let status = watch_through(&node7, &auth.node, "x")
        .await
        .expect_err("refused");
    assert_eq!(status.code(), Code::AlreadyExists, "{status:?}");
    // A certificate that names no node (an IP address only) is refused.
    let nameless = client_for(&["192.0.2.7"]);
    let status = watch_through(&nameless, &auth.node, "node-3")
        .await
        .expect_err("refused");
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(status.message().contains("subjectAltName"), "{status:?}");
    drop((node7_stream, node8_stream));
    relay.stop().await;
    auth.served.stop().await;
}

/// A node restarted while the watch stream of its previous run still holds its node id at the
/// relay (a killed container: the relay hears nothing and holds the id until it is no longer
/// live) is refused `WatchJwks` (`ALREADY_EXISTS`) until then. It must not serve the key set it
/// saved before it went down meanwhile: it pulls `GetJwks` instead, so a token revoked while it
/// was down is refused, and the key two rotations later verifies, as soon as it is up. Here the
/// old stream goes on heartbeating, so the id stays held for the whole test (the compose e2e's
/// flake: verifier-a2 served its saved set for 11 s after `docker start`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_node_whose_id_a_live_stream_still_holds_pulls_instead_of_serving_its_saved_set()
 {
    let auth = TestAuthority::start().await;
    let relay = ready_node(relay(&auth)).await;
    let relay_url = format!("http://{}", relay.served.grpc);
    let root = tempfile::tempdir().unwrap();
    let cache = root.path().join("cache");
    std::fs::create_dir(&cache).unwrap();
    chmod(&cache, 0o700);
    // As in deploy/compose: a pull every 60 s, the default unknown-kid cool-down.
    let config = Config {
        cache_dir: Some(cache.clone()),
        refresh_interval: Duration::from_secs(60),
        unknown_kid_cooldown: keyfleet_verifier::DEFAULT_UNKNOWN_KID_COOLDOWN,
        ..verifier(&auth.token_file, relay_url, "node-2")
    };
    let saved_version = |dir: &std::path::Path| {
        std::fs::read(dir.join(SAVED_KEY_SET_FILE))
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .and_then(|v| v["version"].as_u64())
    };

    // The first run saves the set it holds, then goes down.
    let first = ready_node(config.clone()).await;
    let revoked = auth.issue().await;
    let old_version = auth.list().await.version;
    eventually("the node saves the set it holds", || async {
        saved_version(&cache) == Some(old_version)
    })
    .await;
    first.stop().await;

    // While it is down: two rotations (the saved set lacks the key that signs now) and a
    // revocation.
    for _ in 0..2 {
        let version = auth.list().await.version;
        eventually("the relay acknowledges the newest version", || async {
            auth.watcher(RELAY)
                .await
                .is_some_and(|w| w.acked_version >= version)
        })
        .await;
        let promoting = auth
            .client()
            .rotate_keys(bearer(pb::RotateKeysRequest {}, &auth.admin))
            .await
            .unwrap()
            .into_inner()
            .promoting_kid;
        eventually("the rotated key signs", || async {
            auth.list()
                .await
                .keys
                .iter()
                .any(|k| k.kid == promoting && k.state() == KeyState::Active)
        })
        .await;
    }
    auth.client()
        .revoke_token(bearer(
            pb::RevokeTokenRequest {
                jti: revoked.jti.clone(),
                until: revoked.expires_at,
            },
            &auth.admin,
        ))
        .await
        .unwrap();
    let newest = auth.issue().await;
    let version = auth.list().await.version;
    eventually("the relay serves the newest version", || async {
        relay_client(&relay)
            .get_jwks(bearer(pb::GetJwksRequest {}, &auth.node))
            .await
            .is_ok_and(|r| r.into_inner().version == version)
    })
    .await;

    // The old run's stream still holds the id (it heartbeats; a killed node's stream is held
    // for up to keyfleet_feed::watch::LIVE_WINDOW without).
    let (held, mut held_stream) = raw_watch(&relay, &auth.node, "node-2", true).await;
    held_stream.message().await.unwrap().unwrap();
    let heartbeat = tokio::spawn(async move {
        loop {
            let ack = WatchJwksRequest {
                acked_version: old_version,
                ..Default::default()
            };
            if held.send(ack).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    });
    let refused = raw_watch_refused(&relay, &auth.node, "node-2").await;
    assert_eq!(refused.code(), Code::AlreadyExists, "{refused:?}");

    // The second run starts from the saved set, is refused the watch, and pulls.
    assert_eq!(saved_version(&cache), Some(old_version));
    let second = ready_node(config).await;
    eventually(
        "the restarted node refuses the token revoked while it was down",
        || async { reason(&second, &revoked.token).await == Reason::TokenRevoked },
    )
    .await;
    assert_eq!(reason(&second, &newest.token).await, Reason::Ok);
    assert!(
        auth.watcher("node-2").await.is_some(),
        "the old stream still holds the id"
    );
    heartbeat.abort();
    drop(held_stream);
    second.stop().await;
    relay.stop().await;
    auth.served.stop().await;
}
