//! Deltas on the push stream (issue 13): a node asks for them in its hello, applies a delta only
//! to the version it names and only when the result has the source's digest, re-syncs (a full
//! snapshot, counted in `keyfleet_jwks_resyncs_total`) on a gap or a digest mismatch, and on
//! reconnect names the version and digest it holds so it gets only what changed since.
//!
//! Two fakes play the source: [`FeedUpstream`] serves the real [`Feed`] through the shared stream
//! driver (what the authority and relays serve), and can cut streams and refuse new ones for a
//! while; the raw [`FakeAuthority`] of `verifier.rs` sends whatever a test hands it, such as a
//! delta for a version the node never had or one with a wrong digest.

use std::sync::atomic::AtomicBool;

use keyfleet_feed::watch::{self, Admitted, WatchOwner, WatchResponse, Watchers};
use keyfleet_feed::{Feed, FeedState, Limits, Message};
use keyfleet_proto::encoded::authority_server as encoded;
use keyfleet_proto::wire::EncodedSnapshot;

use super::*;

/// The state `snap` names, as the source holds it.
fn state_of(snap: &JwksSnapshot) -> FeedState {
    FeedState::from_snapshot(snap)
}

struct FeedOwner {
    watchers: Mutex<Watchers>,
    /// Every message handed to a stream: its version and whether it was a full snapshot.
    sent: Mutex<Vec<(u64, bool)>>,
}

impl WatchOwner for FeedOwner {
    fn watchers(&self) -> std::sync::MutexGuard<'_, Watchers> {
        self.watchers.lock().unwrap()
    }
    fn now(&self) -> i64 {
        NOW
    }
    fn sent(&self, message: &Message) {
        self.sent
            .lock()
            .unwrap()
            .push((message.version, message.full));
    }
}

#[derive(Clone)]
struct FeedService {
    feed: Arc<Feed>,
    owner: Arc<FeedOwner>,
    /// Cancelled to cut every open stream (then replaced).
    streams: Arc<Mutex<CancellationToken>>,
    /// While set, new streams are refused (UNAVAILABLE).
    paused: Arc<AtomicBool>,
    hellos: Arc<Mutex<Vec<WatchJwksRequest>>>,
}

#[tonic::async_trait]
impl encoded::Authority for FeedService {
    async fn get_jwks(
        &self,
        _: Request<pb::GetJwksRequest>,
    ) -> Result<Response<EncodedSnapshot>, Status> {
        Ok(Response::new(self.feed.current().full.clone()))
    }

    type WatchJwksStream = WatchResponse;

    async fn watch_jwks(
        &self,
        request: Request<Streaming<WatchJwksRequest>>,
    ) -> Result<Response<WatchResponse>, Status> {
        if self.paused.load(Ordering::SeqCst) {
            return Err(Status::unavailable("paused by the test"));
        }
        let mut inbound = request.into_inner();
        let hello = watch::read_hello(&mut inbound)
            .await
            .map_err(|e| Status::invalid_argument(format!("{e:?}")))?;
        self.hellos.lock().unwrap().push(hello.clone());
        let admitted = Admitted {
            inbound,
            node_id: hello.node_id.clone(),
            hello,
            slot: None,
        };
        let stop = self.streams.lock().unwrap().clone();
        watch::open(self.owner.clone(), &self.feed, stop, admitted)
            .map(Response::new)
            .map_err(|taken| Status::already_exists(taken.0))
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

/// A source serving the real feed, as the authority and relays do.
struct FeedUpstream {
    service: FeedService,
    url: String,
    _task: Task,
}

impl FeedUpstream {
    async fn start(first: &JwksSnapshot) -> FeedUpstream {
        let service = FeedService {
            feed: Arc::new(Feed::new(
                state_of(first),
                first.version,
                NOW,
                Limits::default(),
            )),
            owner: Arc::new(FeedOwner {
                watchers: Mutex::new(Watchers::default()),
                sent: Mutex::new(Vec::new()),
            }),
            streams: Arc::new(Mutex::new(CancellationToken::new())),
            paused: Arc::new(AtomicBool::new(false)),
            hellos: Arc::new(Mutex::new(Vec::new())),
        };
        let routes = Routes::new(encoded::AuthorityServer::new(service.clone()));
        let (addr, task) = serve::grpc(routes).await;
        FeedUpstream {
            service,
            url: format!("http://{addr}"),
            _task: task,
        }
    }

    fn source(&self) -> Source {
        Source::Authority {
            url: self.url.clone(),
        }
    }

    fn publish(&self, snap: &JwksSnapshot) {
        self.service.feed.publish(state_of(snap), snap.version, NOW);
    }

    fn sent(&self) -> Vec<(u64, bool)> {
        self.service.owner.sent.lock().unwrap().clone()
    }

    fn hellos(&self) -> Vec<WatchJwksRequest> {
        self.service.hellos.lock().unwrap().clone()
    }

    /// Ends every open stream; new ones are refused until [`FeedUpstream::resume`].
    fn cut(&self) {
        self.service.paused.store(true, Ordering::SeqCst);
        let mut streams = self.service.streams.lock().unwrap();
        streams.cancel();
        *streams = CancellationToken::new();
    }

    fn resume(&self) {
        self.service.paused.store(false, Ordering::SeqCst);
    }

    fn connected(&self) -> usize {
        self.service.owner.watchers.lock().unwrap().connected()
    }
}

/// A node that only learns from the push stream (no pulls during the test).
fn push_only(source: Source) -> Config {
    Config {
        refresh_interval: Duration::from_secs(3600),
        clock: Clock::manual(NOW),
        ..Config::for_test(source)
    }
}

/// A metric of `node`, 0 when absent.
async fn counter(node: &Node, series: &str) -> f64 {
    node.metric(series).await.unwrap_or(0.0)
}

/// Deltas give the verdicts full snapshots give: a key added by a delta verifies, a token and
/// a key revoked by deltas are refused, a key removed by one is unknown; and every delta is
/// acknowledged, with the node's state proven equal to the source's by its digest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delta_stream_gives_the_verdicts_of_full_snapshots() {
    let (a, b) = (key(1), key(2));
    let mut snap = snapshot(1, &[&a]);
    let upstream = FeedUpstream::start(&snap).await;
    let node = ready_node(push_only(upstream.source())).await;
    check(&node, "first key", &token(&a, NOW), "", Reason::Ok).await;
    let hello = &upstream.hellos()[0];
    assert!(hello.accept_deltas, "the node asks for deltas: {hello:?}");

    // Rotate: b is added and signs.
    snap.version = 2;
    snap.keys.push(b.pb());
    snap.active_kid = b.kid.clone();
    upstream.publish(&snap);
    eventually("version 2", || async {
        node.metric("keyfleet_jwks_version ").await == Some(2.0)
    })
    .await;
    check(&node, "rotated key", &token(&b, NOW), "", Reason::Ok).await;

    // Revoke a token signed by b (jti-1).
    snap.version = 3;
    snap.revoked_tokens.push(pb::RevokedToken {
        jti: "jti-1".into(),
        until: NOW + 3600,
    });
    upstream.publish(&snap);
    eventually("version 3", || async {
        node.metric("keyfleet_jwks_version ").await == Some(3.0)
    })
    .await;
    check(
        &node,
        "revoked token",
        &token(&b, NOW),
        "",
        Reason::TokenRevoked,
    )
    .await;
    let other = token_as(&b, &b.kid, NOW, |c| c.jti = "jti-2".into());
    check(&node, "another token of b", &other, "", Reason::Ok).await;

    // Revoke key a outright; retire nothing else.
    snap.version = 4;
    snap.keys.retain(|k| k.kid != a.kid);
    snap.revoked_kids.push(a.kid.clone());
    upstream.publish(&snap);
    eventually("version 4", || async {
        node.metric("keyfleet_jwks_version ").await == Some(4.0)
    })
    .await;
    check(
        &node,
        "revoked key",
        &token(&a, NOW),
        "",
        Reason::KeyRevoked,
    )
    .await;

    // One full snapshot, then only deltas, each applied and none re-synced.
    assert_eq!(
        upstream.sent(),
        vec![(1, true), (2, false), (3, false), (4, false)]
    );
    assert_eq!(
        counter(&node, "keyfleet_jwks_updates_total{kind=\"delta\"}").await,
        3.0
    );
    assert_eq!(
        counter(&node, "keyfleet_jwks_updates_total{kind=\"full\"}").await,
        1.0
    );
    for reason in ["gap", "digest"] {
        let series = format!("keyfleet_jwks_resyncs_total{{reason=\"{reason}\"}}");
        assert_eq!(counter(&node, &series).await, 0.0, "{series}");
    }
    eventually("ack of version 4", || async {
        upstream
            .service
            .owner
            .watchers
            .lock()
            .unwrap()
            .list()
            .iter()
            .any(|w| w.acked_version == 4)
    })
    .await;
    node.stop().await;
}

/// A node that missed one change while cut off names the version and digest it holds when it
/// reconnects, and gets exactly one delta: not the whole set again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_missed_one_change_resumes_with_one_delta() {
    let (a, b) = (key(1), key(2));
    let mut snap = snapshot(1, &[&a]);
    // A set worth not sending twice, yet under `FULL_ENDS_STREAM_ABOVE` (a larger full snapshot
    // ends its stream at once, and the node resumes from it: a second hello).
    snap.revoked_tokens = (0..300)
        .map(|i| pb::RevokedToken {
            jti: format!("old-{i}"),
            until: NOW + 3600,
        })
        .collect();
    let v1 = snap.clone();
    let upstream = FeedUpstream::start(&snap).await;
    let node = ready_node(push_only(upstream.source())).await;
    eventually("the stream is up", || async { upstream.connected() == 1 }).await;

    upstream.cut();
    eventually("the stream is down", || async { upstream.connected() == 0 }).await;
    snap.version = 2;
    snap.keys.push(b.pb());
    upstream.publish(&snap);
    upstream.resume();
    eventually("version 2 through the new stream", || async {
        node.metric("keyfleet_jwks_version ").await == Some(2.0)
    })
    .await;
    check(&node, "the missed key", &token(&b, NOW), "", Reason::Ok).await;

    let hellos = upstream.hellos();
    assert_eq!(hellos.len(), 2, "{hellos:?}");
    let resume = &hellos[1];
    assert_eq!(resume.acked_version, 1);
    assert!(resume.accept_deltas);
    assert_eq!(
        resume.held_digest,
        state_of(&v1).digest().to_vec(),
        "the node names the digest of the state it holds"
    );
    assert_eq!(
        upstream.sent(),
        vec![(1, true), (2, false)],
        "one full snapshot at first, one delta on resume"
    );
    assert_eq!(
        counter(&node, "keyfleet_jwks_updates_total{kind=\"full\"}").await,
        1.0
    );
    assert_eq!(
        counter(&node, "keyfleet_jwks_updates_total{kind=\"delta\"}").await,
        1.0
    );
    node.stop().await;
}

/// A full snapshot too large to keep in a stream's send buffer (a long deny list) ends the
/// stream that carried it; the node resumes at once from the version it now holds, and the new
/// stream carries only the small "you hold the newest" message and deltas after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_large_full_snapshot_the_node_resumes_on_a_new_stream() {
    let (a, b) = (key(1), key(2));
    let mut snap = snapshot(1, &[&a]);
    snap.revoked_tokens = (0..2000)
        .map(|i| pb::RevokedToken {
            jti: format!("old-{i}"),
            until: NOW + 3600,
        })
        .collect();
    let upstream = FeedUpstream::start(&snap).await;
    let node = ready_node(push_only(upstream.source())).await;
    eventually("the resumed stream is up", || async {
        upstream.hellos().len() == 2 && upstream.connected() == 1
    })
    .await;
    let resume = &upstream.hellos()[1];
    assert_eq!(resume.acked_version, 1);
    assert_eq!(resume.held_digest, state_of(&snap).digest().to_vec());
    snap.version = 2;
    snap.keys.push(b.pb());
    upstream.publish(&snap);
    eventually("version 2 as a delta", || async {
        node.metric("keyfleet_jwks_version ").await == Some(2.0)
    })
    .await;
    check(&node, "the new key", &token(&b, NOW), "", Reason::Ok).await;
    assert_eq!(
        upstream.sent(),
        vec![(1, true), (1, false), (2, false)],
        "the whole set once, then only small messages"
    );
    assert_eq!(
        upstream.hellos().len(),
        2,
        "no reconnect beyond the one resume"
    );
    node.stop().await;
}

/// A delta for a version the node does not hold (a gap), and one whose result has another
/// digest than the source names, are not applied: the node drops its state, counts the
/// re-sync by reason, reconnects without a digest and takes the full snapshot it then gets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gap_or_a_digest_mismatch_triggers_a_resync() {
    let (a, b, c) = (key(1), key(2), key(3));
    let mut first = snapshot(1, &[&a]);
    first.digest = state_of(&first).digest().to_vec();
    let authority = FakeAuthority::start(first.clone()).await;
    let node = ready_node(push_only(authority.source())).await;
    eventually("ack of version 1", || async { authority.acked(1) }).await;
    let hellos = |authority: &FakeAuthority| -> Vec<WatchJwksRequest> {
        let requests = authority.state.requests.lock().unwrap();
        requests
            .iter()
            .filter(|r| !r.node_id.is_empty())
            .cloned()
            .collect()
    };

    // A gap: a delta from version 5, which the node never held, adding b.
    let mut with_b = first.clone();
    with_b.keys.push(b.pb());
    let gap = JwksSnapshot {
        version: 6,
        digest: state_of(&with_b).digest().to_vec(),
        delta: Some(pb::JwksDelta {
            base_version: 5,
            upserted_keys: vec![b.pb()],
            ..Default::default()
        }),
        ..Default::default()
    };
    let _ = authority.state.pushes.send(gap);
    eventually("a gap re-sync", || async {
        counter(&node, "keyfleet_jwks_resyncs_total{reason=\"gap\"}").await == 1.0
    })
    .await;
    eventually("a second hello", || async { hellos(&authority).len() == 2 }).await;
    let again = &hellos(&authority)[1];
    assert!(
        again.accept_deltas && again.held_digest.is_empty(),
        "{again:?}"
    );
    check(
        &node,
        "b was never applied",
        &token(&b, NOW),
        "",
        Reason::UnknownKid,
    )
    .await;
    assert_eq!(node.metric("keyfleet_jwks_version ").await, Some(1.0));

    // A digest mismatch: the right base, but the digest of another state. (The second
    // stream is subscribed once its hello is in: it sends the full snapshot first.)
    let mut with_c = first.clone();
    with_c.keys.push(c.pb());
    let lie = JwksSnapshot {
        version: 2,
        digest: state_of(&with_b).digest().to_vec(),
        delta: Some(pb::JwksDelta {
            base_version: 1,
            upserted_keys: vec![c.pb()],
            ..Default::default()
        }),
        ..Default::default()
    };
    let _ = authority.state.pushes.send(lie);
    eventually("a digest re-sync", || async {
        counter(&node, "keyfleet_jwks_resyncs_total{reason=\"digest\"}").await == 1.0
    })
    .await;
    eventually("a third hello", || async { hellos(&authority).len() == 3 }).await;
    check(
        &node,
        "c was never applied",
        &token(&c, NOW),
        "",
        Reason::UnknownKid,
    )
    .await;
    assert!(!authority.acked(2), "a refused delta is never acknowledged");

    // The right delta applies.
    let good = JwksSnapshot {
        version: 2,
        digest: state_of(&with_c).digest().to_vec(),
        delta: Some(pb::JwksDelta {
            base_version: 1,
            upserted_keys: vec![c.pb()],
            ..Default::default()
        }),
        ..Default::default()
    };
    let _ = authority.state.pushes.send(good);
    eventually("ack of the good delta", || async { authority.acked(2) }).await;
    check(&node, "c by delta", &token(&c, NOW), "", Reason::Ok).await;
    node.stop().await;
    authority.stop().await;
}

/// A delta that says "nothing changed since the version you hold" renews the node's freshness
/// (it keeps verifying past --max-stale while the source keeps saying so) and is acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_delta_renews_freshness() {
    let a = key(1);
    let mut first = snapshot(1, &[&a]);
    first.digest = state_of(&first).digest().to_vec();
    let authority = FakeAuthority::start(first.clone()).await;
    let clock = Clock::manual(NOW);
    let node = ready_node(Config {
        clock: clock.clone(),
        max_stale: Duration::from_secs(60),
        ..push_only(authority.source())
    })
    .await;
    eventually("ack of version 1", || async { authority.acked(1) }).await;
    clock.advance(50);
    let same = JwksSnapshot {
        version: 1,
        digest: first.digest.clone(),
        delta: Some(pb::JwksDelta {
            base_version: 1,
            ..Default::default()
        }),
        ..Default::default()
    };
    let _ = authority.state.pushes.send(same);
    eventually("the empty delta counted", || async {
        counter(&node, "keyfleet_jwks_updates_total{kind=\"delta\"}").await == 1.0
    })
    .await;
    clock.advance(50);
    let now = NOW + 100;
    check(&node, "fresh after 100 s", &token(&a, now), "", Reason::Ok).await;
    node.stop().await;
    authority.stop().await;
}

/// A session ended by a delta (issue 15) reaches the node: its tokens are refused with
/// SESSION_REVOKED, cached or not, and the node's state still has the source's digest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_ended_by_a_delta_is_refused() {
    let a = key(1);
    let mut snap = snapshot(1, &[&a]);
    let upstream = FeedUpstream::start(&snap).await;
    let node = ready_node(push_only(upstream.source())).await;
    let in_session = token_as(&a, &a.kid, NOW, |c| {
        c.extra.insert("sid".into(), "s-1".into());
    });
    // Valid, and cached as such.
    check(&node, "live session", &in_session, "", Reason::Ok).await;
    check(&node, "live session", &in_session, "", Reason::Ok).await;
    snap.version = 2;
    snap.revoked_sessions.push(pb::RevokedSession {
        sid: "s-1".into(),
        until: NOW + 3600,
    });
    upstream.publish(&snap);
    eventually("version 2", || async {
        node.metric("keyfleet_jwks_version ").await == Some(2.0)
    })
    .await;
    check(
        &node,
        "ended session",
        &in_session,
        "",
        Reason::SessionRevoked,
    )
    .await;
    assert_eq!(
        upstream.sent().last(),
        Some(&(2, false)),
        "it came as a delta: {:?}",
        upstream.sent()
    );
    assert_eq!(
        counter(&node, "keyfleet_jwks_resyncs_total{reason=\"digest\"}").await,
        0.0
    );
    node.stop().await;
}
