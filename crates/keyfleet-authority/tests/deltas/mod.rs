//! Issue 13 on the authority's side: deltas with resume negotiated in the hello, old verifiers
//! kept on full snapshots, what one revocation costs a watcher, and the nodes a relay reports
//! behind it (listed, waited for by the gate, disconnected with the relay).

use keyfleet_feed::FeedState;
use keyfleet_proto::wire::EncodedSnapshot;

use super::*;

/// A hello of a verifier that applies deltas and holds `held` (version and digest), if any.
fn delta_hello(node_id: &str, held: Option<(u64, &[u8])>) -> pb::WatchJwksRequest {
    pb::WatchJwksRequest {
        node_id: node_id.into(),
        region: "eu-west".into(),
        acked_version: held.map_or(0, |(v, _)| v),
        accept_deltas: true,
        held_digest: held.map(|(_, d)| d.to_vec()).unwrap_or_default(),
        ..Default::default()
    }
}

/// A node behind a relay, as the relay reports it.
fn behind(node_id: &str, acked_version: u64, connected: bool) -> pb::DownstreamWatcher {
    pb::DownstreamWatcher {
        node_id: node_id.into(),
        region: "eu-west".into(),
        acked_version,
        connected,
    }
}

impl Watch {
    /// Opens a stream with the fleet credential that says `hello` first.
    async fn hello(
        auth: &TestAuthority,
        client: &mut AuthorityClient<Channel>,
        hello: pb::WatchJwksRequest,
    ) -> Watch {
        Watch::open_with(client, hello, Some(&auth.node))
            .await
            .expect("the watch stream opens")
    }

    async fn send(&self, request: pb::WatchJwksRequest) {
        self.acks.send(request).await.unwrap();
    }

    /// Reads messages until one carries `version`; returns it.
    async fn until_version(&mut self, version: u64) -> pb::JwksSnapshot {
        loop {
            let message = self.next().await;
            assert!(message.version <= version, "{message:?}");
            if message.version == version {
                return message;
            }
        }
    }
}

/// The encoded length of a message as it travelled.
fn wire_len(message: &pb::JwksSnapshot) -> usize {
    EncodedSnapshot::encode(message).len()
}

async fn revoke(auth: &TestAuthority, client: &mut AuthorityClient<Channel>, jti: &str) -> u64 {
    client
        .revoke_token(auth.admin(pb::RevokeTokenRequest {
            jti: jti.into(),
            until: 0,
        }))
        .await
        .unwrap()
        .into_inner()
        .version
}

/// A jti shaped like the ones the authority mints (22 characters of base64url).
fn jti(i: usize) -> String {
    format!("Zx{i:04}q7Lw9VbN3kRtY2mP")
}

/// The node's state after a full snapshot, checked against the digest it carries.
fn held_after(full: &pb::JwksSnapshot) -> FeedState {
    assert!(full.delta.is_none(), "a full snapshot: {full:?}");
    let state = FeedState::from_snapshot(full);
    assert_eq!(state.digest().to_vec(), full.digest);
    state
}

/// A node that was away for one revocation names the version and digest it holds and gets
/// only that revocation, which brings it exactly to the authority's set.
#[tokio::test]
async fn a_node_that_missed_one_change_resumes_with_only_that_delta() {
    let auth = TestAuthority::manual(&Clock::manual(START)).await;
    let mut client = auth.client().await;
    let mut watch = Watch::hello(&auth, &mut client, delta_hello("node-a", None)).await;
    let first = watch.next().await;
    let mut held = held_after(&first);
    watch.ack(first.version).await;
    drop(watch);
    auth.until_watchers("the node's stream is gone", |w| {
        w.iter().all(|w| !w.connected)
    })
    .await;

    let version = revoke(&auth, &mut client, &jti(1)).await;
    let hello = delta_hello("node-a", Some((first.version, &first.digest)));
    let mut watch = Watch::hello(&auth, &mut client, hello).await;
    let resumed = watch.next().await;
    let delta = resumed.delta.clone().expect("a delta, not the whole set");
    assert_eq!(
        (delta.base_version, resumed.version),
        (first.version, version)
    );
    assert_eq!(delta.revoked_tokens_added.len(), 1, "{delta:?}");
    assert!(delta.upserted_keys.is_empty() && delta.removed_kids.is_empty());
    assert!(resumed.keys.is_empty() && resumed.revoked_tokens.is_empty());
    held.apply(&delta, &resumed.issuer, &resumed.active_kid);
    assert_eq!(
        held.digest().to_vec(),
        resumed.digest,
        "the node holds exactly the set"
    );
    let full = client
        .get_jwks(auth.node(pb::GetJwksRequest {}))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(held, FeedState::from_snapshot(&full));
    // It acks the delta's version like any other.
    watch.ack(version).await;
    auth.until_watchers("the resumed node's ack is recorded", |w| {
        w.iter().any(|w| w.connected && w.acked_version == version)
    })
    .await;
    let metrics = auth.get("/metrics").await.body;
    for line in [
        r#"keyfleet_watch_messages_total{kind="full"} 1"#,
        r#"keyfleet_watch_messages_total{kind="delta"} 1"#,
    ] {
        assert!(metrics.contains(line), "{line:?} missing from:\n{metrics}");
    }
    assert!(
        metrics.contains(&format!(
            r#"keyfleet_watch_bytes_total{{kind="delta"}} {}"#,
            wire_len(&resumed)
        )),
        "{metrics}"
    );
    auth.stop().await;
}

/// A node naming a version with a digest that is not the authority's (a node that went astray,
/// or another authority's state) gets the whole set.
#[tokio::test]
async fn a_wrong_held_digest_gets_a_full_snapshot() {
    let auth = TestAuthority::manual(&Clock::manual(START)).await;
    let mut client = auth.client().await;
    let version = revoke(&auth, &mut client, &jti(1)).await;
    revoke(&auth, &mut client, &jti(2)).await;
    let wrong = [7u8; 32];
    let hello = delta_hello("node-a", Some((version, &wrong)));
    let mut watch = Watch::hello(&auth, &mut client, hello).await;
    let first = watch.next().await;
    assert_eq!(held_after(&first).revoked_tokens.len(), 2);
    auth.stop().await;
}

/// A verifier that predates deltas says nothing of them in its hello: it gets full snapshots
/// on every change, deny lists included, and its acks hold a promotion back as before.
#[tokio::test]
async fn an_old_protocol_watcher_gets_full_snapshots_and_its_acks_gate_promotion() {
    let clock = Clock::manual(START);
    let (auth, mut client, mut old, first) = watched(&clock, "old-verifier").await;
    assert!(first.delta.is_none());
    let version = revoke(&auth, &mut client, &jti(1)).await;
    let pushed = old.until_version(version).await;
    assert!(pushed.delta.is_none(), "{pushed:?}");
    assert_eq!(pushed.keys.len(), 2);
    assert_eq!(pushed.revoked_tokens.len(), 1);
    assert_eq!(pushed.issuer, first.issuer);
    assert_eq!(pushed.active_kid, first.active_kid);

    let rotated = auth.rotate(&mut client).await;
    assert!(
        !rotated.activated,
        "the old verifier has not acked: {rotated:?}"
    );
    old.ack(version).await;
    let promoted = old.next().await;
    assert!(promoted.delta.is_none());
    assert_eq!(promoted.active_kid, rotated.promoting_kid);
    assert_eq!(promoted.revoked_tokens.len(), 1);
    auth.stop().await;
}

/// Issue 13's goal: after 200 token revocations, one more costs a watcher that applies deltas
/// at most 128 bytes of message; a watcher on full snapshots pays for the whole deny list.
#[tokio::test]
async fn after_200_revocations_one_more_costs_a_delta_watcher_at_most_128_bytes() {
    let auth = TestAuthority::manual(&Clock::manual(START)).await;
    let mut client = auth.client().await;
    let mut deltas = Watch::hello(&auth, &mut client, delta_hello("node-d", None)).await;
    let mut fulls = Watch::open(&auth, &mut client, "node-f").await;
    deltas.next().await;
    fulls.next().await;
    let mut version = 0;
    for i in 0..200 {
        version = revoke(&auth, &mut client, &jti(i)).await;
    }
    deltas.until_version(version).await;
    fulls.until_version(version).await;

    let version = revoke(&auth, &mut client, &jti(200)).await;
    let delta = deltas.next().await;
    let full = fulls.next().await;
    assert_eq!((delta.version, full.version), (version, version));
    let (delta_bytes, full_bytes) = (wire_len(&delta), wire_len(&full));
    eprintln!("revocation 201: {delta_bytes} B as a delta, {full_bytes} B as a full snapshot");
    assert!(delta.delta.is_some());
    assert!(delta_bytes <= 128, "{delta_bytes} B: {delta:?}");
    assert_eq!(full.revoked_tokens.len(), 201);
    assert!(full_bytes > 50 * delta_bytes, "{full_bytes} B");
    auth.stop().await;
}

/// A relay reports the nodes behind it: `ListKeys` shows them with `via`, and a promotion
/// waits for them as for the authority's own watchers (acks capped at what the relay got).
#[tokio::test]
async fn nodes_behind_a_relay_are_listed_and_hold_back_a_promotion_until_they_ack() {
    let auth = TestAuthority::manual(&Clock::manual(START)).await;
    let mut client = auth.client().await;
    let hello = pb::WatchJwksRequest {
        downstream: vec![behind("node-1", 0, true), behind("node-2", 0, true)],
        ..delta_hello("relay-eu", None)
    };
    let mut relay = Watch::hello(&auth, &mut client, hello).await;
    let first = relay.next().await;
    let v = first.version;
    relay
        .send(pb::WatchJwksRequest {
            acked_version: v,
            downstream: vec![behind("node-1", v, true), behind("node-2", v + 5, false)],
            ..Default::default()
        })
        .await;
    auth.until_watchers("the relay's nodes are listed", |w| {
        let seen: Vec<(&str, &str, u64, bool)> = w
            .iter()
            .map(|w| {
                (
                    w.node_id.as_str(),
                    w.via.as_str(),
                    w.acked_version,
                    w.connected,
                )
            })
            .collect();
        seen == [
            ("node-1", "relay-eu", v, true),
            ("node-2", "relay-eu", v, false),
            ("relay-eu", "", v, true),
        ]
    })
    .await;
    // node-2 is back behind the relay and holds nothing yet.
    relay
        .send(pb::WatchJwksRequest {
            acked_version: v,
            downstream: vec![behind("node-2", 0, true)],
            ..Default::default()
        })
        .await;
    auth.until_watchers("node-2 is connected", |w| {
        w.iter().any(|w| w.node_id == "node-2" && w.connected)
    })
    .await;
    let rotated = auth.rotate(&mut client).await;
    assert!(!rotated.activated, "node-2 has not acked: {rotated:?}");
    let metrics = auth.get("/metrics").await.body;
    for line in [
        "keyfleet_watchers 3",
        "keyfleet_watchers_behind_relays 2",
        "keyfleet_watchers_lagging 1",
    ] {
        assert!(metrics.contains(line), "{line:?} missing from:\n{metrics}");
    }
    relay
        .send(pb::WatchJwksRequest {
            acked_version: v,
            downstream: vec![behind("node-2", v, true)],
            ..Default::default()
        })
        .await;
    let promoted = relay.next().await;
    let delta = promoted.delta.as_ref().expect("the relay gets deltas");
    assert_eq!(delta.base_version, v);
    assert_eq!(promoted.active_kid, rotated.promoting_kid);
    auth.stop().await;
}

/// When a relay's stream ends, the nodes behind it are disconnected: listed so, and no longer
/// waited for.
#[tokio::test]
async fn a_relay_streams_end_disconnects_the_nodes_behind_it() {
    let auth = TestAuthority::manual(&Clock::manual(START)).await;
    let mut client = auth.client().await;
    let hello = pb::WatchJwksRequest {
        downstream: vec![behind("node-1", 0, true), behind("node-2", 0, true)],
        ..delta_hello("relay-eu", None)
    };
    let mut relay = Watch::hello(&auth, &mut client, hello).await;
    relay.next().await;
    auth.until_watchers("three nodes are connected", |w| {
        w.len() == 3 && w.iter().all(|w| w.connected)
    })
    .await;
    // Another stream cannot take a relayed node's name while the relay reports it.
    let status = Watch::try_open(&auth, &mut client, "node-1", "eu")
        .await
        .err()
        .expect("node-1 is live behind the relay");
    assert_eq!(status.code(), Code::AlreadyExists, "{status:?}");

    drop(relay);
    auth.until_watchers("every node is disconnected", |w| {
        w.len() == 3 && w.iter().all(|w| !w.connected)
    })
    .await;
    let rotated = auth.rotate(&mut client).await;
    assert!(rotated.activated, "nobody is waited for: {rotated:?}");
    // The names are free again.
    let mut direct = Watch::open(&auth, &mut client, "node-1").await;
    direct.next().await;
    auth.stop().await;
}

/// A watcher whose connection goes away with its request stream still open (the process died)
/// is disconnected and its slot freed: the response stream is dropped and cleans up after
/// itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_whose_connection_drops_is_disconnected_and_frees_its_slot() {
    let auth = TestAuthority::start_with(|config| Config {
        max_watchers: 1,
        ..config
    })
    .await;
    let url = auth.served.grpc_url();
    let node = auth.node.clone();
    // A client on a runtime of its own: dropping that runtime closes its connection.
    tokio::task::spawn_blocking(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let watch = runtime.block_on(async {
            let mut client = AuthorityClient::connect(url).await.unwrap();
            let hello = delta_hello("node-gone", None);
            let mut watch = Watch::open_with(&mut client, hello, Some(&node))
                .await
                .unwrap();
            watch.next().await;
            watch
        });
        drop(runtime);
        drop(watch);
    })
    .await
    .unwrap();
    auth.until_watchers("the gone node is disconnected", |w| {
        w.len() == 1 && !w[0].connected
    })
    .await;
    let mut client = auth.client().await;
    let mut next = Watch::open(&auth, &mut client, "node-next").await;
    next.next().await;
    auth.stop().await;
}
