//! The authority played against as an attacker would: guessing credentials to block an
//! emergency revocation, watching the JWKS without the fleet credential, taking over a live
//! node's name, holding a rotation with stale acks, flooding watch streams, and sending
//! oversized or hostile hellos. Each test fails on a build without the defence it names.

use std::net::{IpAddr, Ipv4Addr};

use keyfleet_runtime::tls::{ClientTls, ServerTls};
use keyfleet_testkit::eventually_some;
use keyfleet_testkit::tls::Pki;
use tonic::transport::Endpoint;

use super::*;

/// A second loopback address, so one test can be two peers.
const OTHER_PEER: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));

/// A client whose connections come from `local` (a loopback address of this host).
async fn client_from(auth: &TestAuthority, local: IpAddr) -> AuthorityClient<Channel> {
    let channel = Endpoint::from_shared(format!("http://{}", auth.grpc))
        .unwrap()
        .local_address(Some(local))
        .connect()
        .await
        .unwrap();
    AuthorityClient::new(channel)
}

/// Opens a watch stream as `node_id`, retrying for at most 10 s while it is refused with
/// `refused` (as a verifier does with backoff).
async fn retry_open(
    auth: &TestAuthority,
    client: &mut AuthorityClient<Channel>,
    node_id: &str,
    region: &str,
    refused: Code,
) -> Watch {
    let what = format!("a stream as {node_id} (refused with {refused:?} until then)");
    eventually_some(&what, Duration::from_secs(10), || {
        let mut client = client.clone();
        async move {
            match Watch::try_open(auth, &mut client, node_id, region).await {
                Ok(watch) => Some(watch),
                Err(status) => {
                    assert_eq!(status.code(), refused, "{status:?}");
                    None
                }
            }
        }
    })
    .await
}

fn revoke_token(jti: &str) -> pb::RevokeTokenRequest {
    pb::RevokeTokenRequest {
        jti: jti.into(),
        until: 0,
    }
}

/// Issue 11, item 2: 30 bad-credential calls at once and then 15 a second from one peer, while
/// the operator revokes 10 times from another. Before, both drew from one bucket (`--admin-rate`
/// 10/s, burst 20) and the operator's revocations were refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocations_succeed_while_another_peer_guesses() {
    let defaults = Config::new(Path::new("unused"));
    assert_eq!(defaults.admin_rate, 10, "the test runs at the shipped rate");
    let auth = TestAuthority::start_with(|config| Config {
        admin_rate: defaults.admin_rate,
        ..config
    })
    .await;
    let attacker = auth.client().await;
    let mut operator = client_from(&auth, OTHER_PEER).await;
    let kid = jwks(&mut operator.clone()).await.active_kid;

    let guess = |mut client: AuthorityClient<Channel>, i: usize| async move {
        let req = with_bearer(revoke_token(&format!("guess-{i}")), &format!("{i:064x}"));
        client.revoke_token(req).await.map(drop).unwrap_err().code()
    };
    let burst: Vec<_> = (0..30)
        .map(|i| tokio::spawn(guess(attacker.clone(), i)))
        .collect();
    let mut codes = Vec::new();
    for call in burst {
        codes.push(call.await.unwrap());
    }
    let guessing = tokio::spawn({
        let attacker = attacker.clone();
        async move {
            let mut codes = Vec::new();
            let mut every = tokio::time::interval(Duration::from_millis(1000 / 15));
            for i in 30.. {
                every.tick().await;
                codes.push(guess(attacker.clone(), i).await);
                if codes.len() >= 45 {
                    break;
                }
            }
            codes
        }
    });

    let mut ok = 0;
    for i in 0..10 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let result = if i == 9 {
            // The emergency itself: the signing key.
            operator
                .revoke_key(auth.admin(pb::RevokeKeyRequest { kid: kid.clone() }))
                .await
                .map(drop)
        } else {
            operator
                .revoke_token(auth.admin(revoke_token(&format!("stolen-{i}"))))
                .await
                .map(drop)
        };
        match result {
            Ok(()) => ok += 1,
            Err(status) => eprintln!("revocation {i} refused: {status:?}"),
        }
    }
    assert_eq!(
        ok, 10,
        "every revocation succeeds while another peer guesses"
    );
    codes.extend(guessing.await.unwrap());
    let limited = codes
        .iter()
        .filter(|c| **c == Code::ResourceExhausted)
        .count();
    assert!(
        codes
            .iter()
            .all(|c| matches!(c, Code::Unauthenticated | Code::ResourceExhausted)),
        "{codes:?}"
    );
    assert!(
        limited >= 40,
        "guesses past the peer's budget are refused without an answer: {codes:?}"
    );
    // The right credential from the guessing address itself still works: a lockout would let
    // anyone who can reach the port (on loopback: any local user) block the operator.
    attacker
        .clone()
        .revoke_token(auth.admin(revoke_token("from-the-same-address")))
        .await
        .unwrap();
    auth.stop().await;
}

/// A peer's failed credentials have a budget of their own: past it, guesses get
/// `RESOURCE_EXHAUSTED`, and neither the right credential nor another peer is affected.
#[tokio::test]
async fn failed_credentials_are_limited_per_peer() {
    let auth = TestAuthority::start().await;
    let mut guesser = auth.client().await;
    let mut other = client_from(&auth, OTHER_PEER).await;
    let mut codes = Vec::new();
    for i in 0..40 {
        let req = with_bearer(pb::ListKeysRequest {}, &format!("guess-{i}"));
        codes.push(guesser.list_keys(req).await.unwrap_err().code());
    }
    assert_eq!(codes[0], Code::Unauthenticated);
    assert_eq!(codes[39], Code::ResourceExhausted, "{codes:?}");
    guesser
        .get_jwks(auth.node(pb::GetJwksRequest {}))
        .await
        .expect("the right fleet credential passes");
    guesser
        .list_keys(auth.admin(pb::ListKeysRequest {}))
        .await
        .unwrap();
    let status = other
        .list_keys(with_bearer(pb::ListKeysRequest {}, "guess"))
        .await
        .unwrap_err();
    assert_eq!(
        status.code(),
        Code::Unauthenticated,
        "another peer has its own budget"
    );
    let metrics = auth.get("/metrics").await.body;
    assert!(
        metrics.contains(r#"keyfleet_auth_failures_total{credential="admin",outcome="limited"}"#),
        "{metrics}"
    );
    auth.stop().await;
}

/// `ListKeys` shows the fleet and the schedule: admin credential only (not the fleet's).
#[tokio::test]
async fn list_keys_needs_the_admin_credential() {
    let auth = TestAuthority::start().await;
    let mut client = auth.client().await;
    for request in [
        Request::new(pb::ListKeysRequest {}),
        auth.node(pb::ListKeysRequest {}),
        with_bearer(pb::ListKeysRequest {}, "nope"),
    ] {
        let status = client.list_keys(request).await.unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
        assert!(
            status.message().contains("--admin-token-file"),
            "{status:?}"
        );
    }
    let listed = list(&mut client, &auth.admin).await;
    assert_eq!(listed.keys.len(), 2);
    auth.stop().await;
}

/// Without the fleet credential (or with the admin's) nobody can watch: not listed, not in the
/// gate.
#[tokio::test]
async fn watch_needs_the_fleet_credential() {
    let auth = TestAuthority::start().await;
    let mut client = auth.client().await;
    for token in [None, Some("nope"), Some(auth.admin.as_str())] {
        let status = Watch::open_as(&mut client, "node-a", "eu-west", token)
            .await
            .err()
            .unwrap_or_else(|| panic!("a stream with {token:?} is refused"));
        assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
        assert!(status.message().contains("--node-token-file"), "{status:?}");
    }
    assert!(list(&mut client, &auth.admin).await.watchers.is_empty());
    let mut watch = Watch::open(&auth, &mut client, "node-a").await;
    watch.next().await;
    auth.stop().await;
}

/// `GetJwks` without the fleet credential is what the HTTP JWKS is: public keys, no deny lists.
#[tokio::test]
async fn get_jwks_without_the_fleet_credential_has_no_deny_lists() {
    let auth = TestAuthority::start().await;
    let mut client = auth.client().await;
    let first = jwks(&mut client).await;
    revoke_key(&auth, &mut client, &first.active_kid)
        .await
        .unwrap();
    client
        .revoke_token(auth.admin(revoke_token("stolen")))
        .await
        .unwrap();
    let public = jwks(&mut client).await;
    assert!(public.revoked_kids.is_empty(), "{public:?}");
    assert!(public.revoked_tokens.is_empty(), "{public:?}");
    assert!(!kids(&public).contains(&first.active_kid));
    assert_eq!(public.keys.len(), 2);
    let full = client
        .get_jwks(auth.node(pb::GetJwksRequest {}))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(full.keys, public.keys);
    assert_eq!(full.version, public.version);
    assert_eq!(full.revoked_kids, vec![first.active_kid.clone()]);
    assert_eq!(full.revoked_tokens.len(), 1);
    assert_eq!(full.revoked_tokens[0].jti, "stolen");
    // A wrong credential is an error, not a quietly smaller answer.
    let status = client
        .get_jwks(with_bearer(pb::GetJwksRequest {}, "nope"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    auth.stop().await;
}

/// A node id held by a live stream cannot be taken over, not even with the fleet credential;
/// the fleet view keeps the real node's region and acks. Once the real stream is gone the
/// name is free again (a restarted node gets it back).
#[tokio::test]
async fn a_live_node_id_cannot_be_taken_over() {
    let auth = TestAuthority::start().await;
    let mut client = auth.client().await;
    let mut real = Watch::open(&auth, &mut client, "node-a").await;
    let version = real.next().await.version;
    real.ack(version).await;
    auth.until_watchers("the real node's ack is recorded", |watchers| {
        watchers
            .iter()
            .any(|w| w.node_id == "node-a" && w.acked_version == version)
    })
    .await;

    for token in [None, Some(auth.node.as_str())] {
        let status = Watch::open_as(&mut client, "node-a", "evil", token)
            .await
            .err()
            .expect("the takeover is refused");
        let want = if token.is_some() {
            Code::AlreadyExists
        } else {
            Code::Unauthenticated
        };
        assert_eq!(status.code(), want, "{status:?}");
    }
    let listed = list(&mut client, &auth.admin).await;
    assert_eq!(listed.watchers.len(), 1, "{:?}", listed.watchers);
    let w = &listed.watchers[0];
    assert_eq!(
        (
            w.node_id.as_str(),
            w.region.as_str(),
            w.acked_version,
            w.connected
        ),
        ("node-a", "eu-west", version, true)
    );

    drop(real);
    let mut back = retry_open(
        &auth,
        &mut client,
        "node-a",
        "eu-central",
        Code::AlreadyExists,
    )
    .await;
    back.next().await;
    let listed = list(&mut client, &auth.admin).await;
    assert_eq!(listed.watchers[0].region, "eu-central");
    auth.stop().await;
}

/// Before, anyone could open a stream, ack version 0 and hold every rotation for the full
/// `--publish-ahead`. Now such a stream is refused and the rotation follows the real fleet.
#[tokio::test]
async fn an_unauthenticated_stream_cannot_hold_a_rotation() {
    let auth = TestAuthority::manual(&Clock::manual(START)).await;
    let mut client = auth.client().await;
    let mut real = Watch::open(&auth, &mut client, "node-a").await;
    let first = real.next().await;
    real.ack(first.version).await;
    let (acks, rx) = mpsc::channel(8);
    acks.send(pb::WatchJwksRequest {
        node_id: "holder".into(),
        region: "x".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let status = client
        .watch_jwks(ReceiverStream::new(rx))
        .await
        .expect_err("refused");
    assert_eq!(status.code(), Code::Unauthenticated);
    auth.until_watchers("the real node's ack is recorded", |watchers| {
        watchers.iter().all(|w| w.acked_version == first.version)
    })
    .await;
    // The clock stands still: only the fleet's acks can release the next key.
    let rotated = auth.rotate(&mut client).await;
    assert!(rotated.activated, "{rotated:?}");
    drop(acks);
    auth.stop().await;
}

/// `--max-watchers` overall and a cap per peer address; a closed stream frees its slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_streams_are_capped_overall_and_per_peer() {
    let auth = TestAuthority::start_with(|config| Config {
        max_watchers: 3,
        max_watchers_per_peer: 2,
        ..config
    })
    .await;
    let mut here = auth.client().await;
    let mut there = client_from(&auth, OTHER_PEER).await;
    let a = Watch::open(&auth, &mut here, "a").await;
    let _b = Watch::open(&auth, &mut here, "b").await;
    let status = Watch::try_open(&auth, &mut here, "c", "eu")
        .await
        .err()
        .expect("a third stream from one address is refused");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("per-peer"), "{status:?}");
    let _c = Watch::open(&auth, &mut there, "c").await;
    let status = Watch::try_open(&auth, &mut there, "d", "eu")
        .await
        .err()
        .expect("a fourth stream is refused");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("--max-watchers"), "{status:?}");
    drop(a);
    let mut d = retry_open(&auth, &mut there, "d", "eu", Code::ResourceExhausted).await;
    d.next().await;
    auth.stop().await;
}

/// Hellos are small and name the node in a safe alphabet: an oversized one is refused before
/// it is decoded, and a node id or region that could forge a log line or a terminal escape is
/// refused (never cut or stored).
#[tokio::test]
async fn hostile_hellos_are_refused() {
    let auth = TestAuthority::start().await;
    let mut client = auth.client().await;
    let huge = "x".repeat(64 * 1024);
    let status = Watch::try_open(&auth, &mut client, &huge, "eu")
        .await
        .err()
        .expect("a 64 KiB hello is refused");
    assert!(
        matches!(status.code(), Code::OutOfRange | Code::ResourceExhausted),
        "{status:?}"
    );
    let long = "n".repeat(129);
    let cases = [
        ("node\nERROR KEY RING CORRUPTED", "eu"),
        ("", "eu"),
        ("nöde", "eu"),
        ("a b", "eu"),
        (long.as_str(), "eu"),
        ("node-1", "eu\u{1b}[2J"),
        ("node-1", ""),
        ("node-1", "eu/west"),
    ];
    for (node_id, region) in cases {
        let status = Watch::try_open(&auth, &mut client, node_id, region)
            .await
            .err()
            .unwrap_or_else(|| panic!("{node_id:?} in {region:?} is refused"));
        assert_eq!(
            status.code(),
            Code::InvalidArgument,
            "{node_id:?}: {status:?}"
        );
        assert!(
            !status.message().contains('\n') && !status.message().contains('\u{1b}'),
            "the refusal does not echo the input: {status:?}"
        );
    }
    assert!(list(&mut client, &auth.admin).await.watchers.is_empty());
    let ok = "n".repeat(128);
    let mut watch = Watch::try_open(&auth, &mut client, &ok, "eu-1.a_b:c")
        .await
        .unwrap();
    watch.next().await;
    auth.stop().await;
}

/// The fleet credential must not be the admin's: verifiers would hold admin power.
#[test]
fn the_fleet_and_admin_tokens_differ() {
    let dir = tempfile::tempdir().unwrap();
    let same = Config {
        node_token_file: dir.path().join("admin.token"),
        ..Config::for_test(dir.path())
    };
    let err = Authority::open(same).unwrap_err();
    assert!(
        matches!(
            err,
            OpenError::Config(keyfleet_authority::ConfigError::SameTokenFiles { .. })
        ),
        "{err}"
    );
    assert!(
        !dir.path().join(KEYRING_FILE).exists(),
        "refused before any write"
    );
    let auth = Authority::open(Config::for_test(dir.path())).unwrap();
    assert_ne!(auth.admin_token(), auth.node_token());
    assert!(auth.node_token().len() >= 32);
    drop(auth);
    // A copied admin token in the node token file is refused at the next start.
    let admin = std::fs::read_to_string(dir.path().join("admin.token")).unwrap();
    std::fs::write(dir.path().join("node.token"), admin).unwrap();
    let err = Authority::open(Config::for_test(dir.path())).unwrap_err();
    assert!(matches!(err, OpenError::SameTokens), "{err}");
}

/// With mutual TLS the client certificate names the node: the hello cannot choose (or take
/// over) another name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_names_the_node_by_its_certificate() {
    let pki = Pki::new("fleet CA");
    let (cert, key) = pki.server(&["localhost"]);
    let tls = ServerTls::from_pem(cert, key)
        .unwrap()
        .with_client_ca(pki.ca.clone())
        .unwrap();
    let auth = TestAuthority::start_with(|config| Config {
        tls: Some(tls),
        ..config
    })
    .await;
    let client_for = |names: &[&str]| {
        let (cert, key) = pki.client(names);
        let tls = ClientTls::default()
            .with_ca(pki.ca.clone())
            .unwrap()
            .with_identity(cert, key)
            .unwrap();
        let url = format!("https://localhost:{}", auth.grpc.port());
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
    let mut node7 = client_for(&["node-7.fleet", "other.fleet"]);
    let mut watch = Watch::try_open(&auth, &mut node7, "node-1", "eu")
        .await
        .unwrap();
    watch.next().await;
    let listed = list(&mut node7, &auth.admin).await;
    let names: Vec<&str> = listed.watchers.iter().map(|w| w.node_id.as_str()).collect();
    assert_eq!(
        names,
        ["node-7.fleet"],
        "named by the certificate, not the hello"
    );
    // Another certificate cannot pose as node-7 by its hello.
    let mut node8 = client_for(&["node-8.fleet"]);
    let mut other = Watch::try_open(&auth, &mut node8, "node-7.fleet", "eu")
        .await
        .unwrap();
    other.next().await;
    let listed = list(&mut node8, &auth.admin).await;
    let names: Vec<&str> = listed.watchers.iter().map(|w| w.node_id.as_str()).collect();
    assert_eq!(names, ["node-7.fleet", "node-8.fleet"]);
    assert_eq!(listed.watchers[0].region, "eu");
    // A second stream with node-7's certificate meets the live one.
    let status = Watch::try_open(&auth, &mut node7, "x", "eu")
        .await
        .err()
        .expect("refused");
    assert_eq!(status.code(), Code::AlreadyExists, "{status:?}");
    auth.stop().await;
}
