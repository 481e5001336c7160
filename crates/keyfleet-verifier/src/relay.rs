//! The relay (`--serve-watch`): a verifier that also serves `GetJwks` and `WatchJwks` to the
//! verifiers behind it, so a region hangs off one stream to the authority.
//!
//! It republishes every version it takes from its source (the source's version numbers and
//! state, so the same digests and deltas) into a [`Feed`] of its own, serves it with the shared
//! stream driver ([`keyfleet_feed::watch`]), asks its callers for the fleet credential it sends
//! upstream itself (failed credentials limited per peer address, as at the authority:
//! [`keyfleet_runtime::credentials`]; with mutual TLS the client certificate names the node, as
//! at the authority: [`keyfleet_runtime::tls::certified_node_id`]), and reports the nodes behind it upstream (all after each connect, then what
//! changed) so the authority's gate and `keys list` see them. A relay cut from its source keeps
//! serving its last state until its own set is older than `--max-stale`; then `GetJwks` and new
//! streams answer `UNAVAILABLE` and open streams end, so the nodes behind it stop renewing and go
//! stale in turn: a node behind a relay that lost the authority at time T verifies until at most
//! T + the relay's `--max-stale` + its own `--max-stale`.

use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::Duration;

use keyfleet_core::{UnixSeconds, escape_untrusted, is_valid_label};
use keyfleet_feed::watch::{
    self, Admitted, Full, HelloError, MAX_DOWNSTREAM_PER_MESSAGE, Slots, WatchOwner, WatchResponse,
    Watchers,
};
use keyfleet_feed::{Feed, FeedState, Limits, Published};
use keyfleet_proto::encoded::authority_server::Authority;
use keyfleet_proto::v1 as pb;
use keyfleet_proto::wire::EncodedSnapshot;
use keyfleet_runtime::credentials::{FailedCredentials, Verdict};
use keyfleet_runtime::tls::certified_node_id;
use keyfleet_runtime::{CancellationToken, Clock};
use tokio::sync::Notify;
use tonic::{Request, Response, Status, Streaming};

use crate::keyset::NodeKeys;
use crate::upstream::NodeToken;

/// Watch streams a relay serves at most (the authority's `--max-watchers` default).
pub(crate) const MAX_STREAMS: usize = 10_000;
/// Watch streams one peer address may hold (the authority's `--max-watchers-per-peer` default).
pub(crate) const MAX_STREAMS_PER_PEER: usize = 1_000;
/// Largest request the relay decodes: a hello or an ack, or a sub-relay's report
/// ([`MAX_DOWNSTREAM_PER_MESSAGE`] entries), as the authority.
pub(crate) const MAX_REQUEST_BYTES: usize = 16 * 1024;
/// How often the relay checks whether its own set went stale.
pub(crate) const STALE_CHECK: Duration = Duration::from_secs(1);

/// The fleet view behind this relay, as the shared stream driver keeps it.
struct RelayOwner {
    watchers: Mutex<Watchers>,
    clock: Clock,
    /// Woken when the view changed: the upstream stream reports the change.
    changed: Notify,
}

impl WatchOwner for RelayOwner {
    fn watchers(&self) -> MutexGuard<'_, Watchers> {
        self.watchers.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn now(&self) -> UnixSeconds {
        self.clock.now()
    }

    fn changed(&self) {
        self.changed.notify_one();
    }
}

/// Which token ends the open streams: a child of the node's shutdown, replaced each time the
/// relay ends its streams for staleness.
struct Streams {
    root: CancellationToken,
    current: CancellationToken,
}

/// The relay side of a verifier node.
pub(crate) struct Relay {
    /// Created with the first state the node takes from its source.
    feed: OnceLock<Feed>,
    /// Serialises publishers (the push stream and pulls).
    publish_lock: Mutex<()>,
    owner: Arc<RelayOwner>,
    token: NodeToken,
    slots: Slots,
    /// Failed credentials, per peer (as the authority counts them).
    failures: FailedCredentials,
    keys: Arc<NodeKeys>,
    streams: Mutex<Streams>,
}

impl Relay {
    pub(crate) fn new(token: NodeToken, keys: Arc<NodeKeys>, clock: Clock) -> Relay {
        let root = CancellationToken::new();
        Relay {
            feed: OnceLock::new(),
            publish_lock: Mutex::new(()),
            owner: Arc::new(RelayOwner {
                watchers: Mutex::new(Watchers::reporting()),
                clock,
                changed: Notify::new(),
            }),
            token,
            slots: Slots::new(MAX_STREAMS, MAX_STREAMS_PER_PEER),
            failures: FailedCredentials::new(),
            keys,
            streams: Mutex::new(Streams {
                current: root.child_token(),
                root,
            }),
        }
    }

    /// Ties the open streams to `shutdown` (the node's own token).
    pub(crate) fn start(&self, shutdown: CancellationToken) {
        let mut streams = lock(&self.streams);
        streams.current = shutdown.child_token();
        streams.root = shutdown;
    }

    /// Publishes the source's `state` at `version` to the nodes behind this relay. A version
    /// older than the newest published is only taken from a full snapshot of the push stream
    /// (the source restarted its numbering: every stream then gets a full snapshot); the same
    /// version again only when a full snapshot says it differs.
    pub(crate) fn publish(&self, state: &FeedState, version: u64, generated_at: i64, full: bool) {
        let _guard = lock(&self.publish_lock);
        let Some(feed) = self.feed.get() else {
            let _ = self.feed.set(Feed::new(
                state.clone(),
                version,
                generated_at,
                Limits::default(),
            ));
            return;
        };
        let newest = feed.current().version;
        if full || version > newest {
            feed.publish(state.clone(), version, generated_at);
        }
    }

    /// Publishes a pulled snapshot when it is newer than what the relay serves (the push stream
    /// is down or behind).
    pub(crate) fn publish_pulled(&self, snapshot: &pb::JwksSnapshot) {
        if self
            .feed
            .get()
            .is_some_and(|f| f.current().version >= snapshot.version)
        {
            return;
        }
        let state = FeedState::from_snapshot(snapshot);
        self.publish(&state, snapshot.version, snapshot.generated_at, false);
    }

    /// The nodes behind this relay as `WatchJwksRequest.downstream` chunks: every one of them
    /// (`all`, after a connect) or those that changed since the last report.
    pub(crate) fn downstream_report(&self, all: bool) -> Vec<Vec<pb::DownstreamWatcher>> {
        let entries = {
            let mut watchers = self.owner.watchers();
            if all {
                watchers.report_all()
            } else {
                watchers.report_changes()
            }
        };
        entries
            .chunks(MAX_DOWNSTREAM_PER_MESSAGE)
            .map(<[_]>::to_vec)
            .collect()
    }

    /// Resolves when the nodes behind this relay changed.
    pub(crate) async fn downstream_changed(&self) {
        self.owner.changed.notified().await;
    }

    /// Watch streams open.
    pub(crate) fn streams_open(&self) -> usize {
        self.slots.open()
    }

    /// The newest version served, or why nothing is served.
    fn serving(&self) -> Result<(&Feed, Arc<Published>), Status> {
        let Some(feed) = self.feed.get() else {
            return Err(Status::unavailable(
                "this relay holds no key set yet (it has not reached its authority): retry later",
            ));
        };
        if self.keys.is_stale() {
            return Err(Status::unavailable(
                "this relay's key set is older than its --max-stale (it cannot reach its authority): retry later",
            ));
        }
        Ok((feed, feed.current()))
    }

    /// Checks the fleet credential (the one this relay sends upstream), in constant time. A
    /// failure is charged to the peer's own failure budget, never to anyone else's; past it the
    /// peer gets `RESOURCE_EXHAUSTED`. The right credential is accepted whatever the address
    /// failed before, so nobody's guesses lock out a node.
    fn credential<T>(&self, request: &Request<T>, rpc: &'static str) -> Result<(), Status> {
        let presented = request
            .metadata()
            .get("authorization")
            .map(|v| v.as_bytes());
        let peer = request.remote_addr();
        match self.failures.judge(self.token.accepts(presented), peer) {
            Verdict::Accepted => Ok(()),
            Verdict::Refused => {
                tracing::warn!(peer = ?peer, rpc, "relay: credential refused");
                Err(Status::unauthenticated(
                    "watching the JWKS (and its deny lists) through a relay needs the fleet credential: send `authorization: Bearer <token>` with the authority's node token (a verifier takes it from --node-token-file)",
                ))
            }
            Verdict::TooManyFailures => Err(Status::resource_exhausted(
                "too many failed credentials from this address: wait a few seconds, then retry with the right token",
            )),
        }
    }

    /// Ends every open stream when the relay's own set is stale (their nodes reconnect and are
    /// refused until it is fresh again). Called every [`STALE_CHECK`].
    pub(crate) fn end_streams_if_stale(&self) {
        if !self.keys.is_stale() || self.slots.open() == 0 {
            return;
        }
        let mut streams = lock(&self.streams);
        tracing::warn!(
            "relay: the key set is older than --max-stale; ending the streams of the nodes behind this relay"
        );
        streams.current.cancel();
        streams.current = streams.root.child_token();
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The `keyfleet.v1.Authority` service of a relay: `GetJwks` and `WatchJwks` only.
#[derive(Clone)]
pub(crate) struct RelayService(pub(crate) Arc<Relay>);

fn relay_only(rpc: &str) -> Status {
    Status::unimplemented(format!(
        "{rpc}: this is a keyfleet relay (verifier --serve-watch), which serves only GetJwks and WatchJwks; call the authority"
    ))
}

#[tonic::async_trait]
impl Authority for RelayService {
    /// Public keys for anyone; the deny lists only with the fleet credential, as the authority.
    async fn get_jwks(
        &self,
        request: Request<pb::GetJwksRequest>,
    ) -> Result<Response<EncodedSnapshot>, Status> {
        let (_, published) = self.0.serving()?;
        if request.metadata().get("authorization").is_none() {
            return Ok(Response::new(published.public.clone()));
        }
        self.0.credential(&request, "GetJwks")?;
        Ok(Response::new(published.full.clone()))
    }

    type WatchJwksStream = WatchResponse;

    async fn watch_jwks(
        &self,
        request: Request<Streaming<pb::WatchJwksRequest>>,
    ) -> Result<Response<Self::WatchJwksStream>, Status> {
        let relay = &self.0;
        relay.credential(&request, "WatchJwks")?;
        relay.serving()?;
        let peer = request.remote_addr();
        // With mutual TLS the client certificate names the node, as at the authority.
        let certified = certified_node_id(request.peer_certs().as_deref().map(Vec::as_slice))
            .map_err(|refused| {
                tracing::warn!(peer = ?peer, "relay: watch refused, {refused}");
                Status::permission_denied(refused.to_string())
            })?;
        let slot = relay.slots.take(peer.map(|p| p.ip())).map_err(|full| {
            Status::resource_exhausted(match full {
                Full::Total(n) => {
                    format!("this relay serves at most {n} watch streams: retry later")
                }
                Full::Peer(n) => {
                    format!("this address already has {n} watch streams open: retry later")
                }
            })
        })?;
        let mut inbound = request.into_inner();
        let hello = match watch::read_hello(&mut inbound).await {
            Ok(hello) => hello,
            Err(HelloError::Missing) => {
                return Err(Status::invalid_argument(format!(
                    "watch stream: send the hello (node_id, region, acked_version) as the first message, within {}s",
                    watch::HELLO_TIMEOUT.as_secs()
                )));
            }
            Err(HelloError::Unreadable(status)) => return Err(status),
        };
        if !is_valid_label(&hello.region) {
            return Err(Status::invalid_argument(
                "watch hello: region must be 1 to 128 characters from A-Z a-z 0-9 . _ : -",
            ));
        }
        let node_id = match certified {
            Some(name) => {
                if !hello.node_id.is_empty() && hello.node_id != name {
                    tracing::debug!(certificate = %name, hello = %escape_untrusted(&hello.node_id.chars().take(64).collect::<String>()), "relay: the client certificate names the node; the hello's node id is ignored");
                }
                name
            }
            None if is_valid_label(&hello.node_id) => hello.node_id.clone(),
            None => {
                return Err(Status::invalid_argument(
                    "watch hello: node_id must be 1 to 128 characters from A-Z a-z 0-9 . _ : - (the verifier's --node-id)",
                ));
            }
        };
        // Checked again: the hello may have taken seconds.
        let (feed, _) = relay.serving()?;
        let admitted = Admitted {
            inbound,
            hello,
            node_id,
            slot: Some(slot),
        };
        let stop = lock(&relay.streams).current.clone();
        match watch::open(relay.owner.clone(), feed, stop, admitted) {
            Ok(stream) => Ok(Response::new(stream)),
            Err(taken) => {
                tracing::warn!(node_id = %escape_untrusted(&taken.0), "relay: watch refused, a live stream holds this node id");
                Err(Status::already_exists(format!(
                    "node id {:?} is held by a live watch stream: give every verifier its own --node-id (a restarted node gets its id back once the old stream is gone, within 15s)",
                    taken.0
                )))
            }
        }
    }

    async fn issue_token(
        &self,
        _: Request<pb::IssueTokenRequest>,
    ) -> Result<Response<pb::IssueTokenResponse>, Status> {
        Err(relay_only("IssueToken"))
    }

    async fn rotate_keys(
        &self,
        _: Request<pb::RotateKeysRequest>,
    ) -> Result<Response<pb::RotateKeysResponse>, Status> {
        Err(relay_only("RotateKeys"))
    }

    async fn revoke_key(
        &self,
        _: Request<pb::RevokeKeyRequest>,
    ) -> Result<Response<pb::RevokeKeyResponse>, Status> {
        Err(relay_only("RevokeKey"))
    }

    async fn revoke_token(
        &self,
        _: Request<pb::RevokeTokenRequest>,
    ) -> Result<Response<pb::RevokeTokenResponse>, Status> {
        Err(relay_only("RevokeToken"))
    }

    async fn list_keys(
        &self,
        _: Request<pb::ListKeysRequest>,
    ) -> Result<Response<pb::ListKeysResponse>, Status> {
        Err(relay_only("ListKeys"))
    }

    async fn start_session(
        &self,
        _: Request<pb::StartSessionRequest>,
    ) -> Result<Response<pb::SessionTokens>, Status> {
        Err(relay_only("StartSession"))
    }

    async fn refresh(
        &self,
        _: Request<pb::RefreshRequest>,
    ) -> Result<Response<pb::SessionTokens>, Status> {
        Err(relay_only("Refresh"))
    }

    async fn end_session(
        &self,
        _: Request<pb::EndSessionRequest>,
    ) -> Result<Response<pb::EndSessionResponse>, Status> {
        Err(relay_only("EndSession"))
    }

    async fn revoke_subject(
        &self,
        _: Request<pb::RevokeSubjectRequest>,
    ) -> Result<Response<pb::RevokeSubjectResponse>, Status> {
        Err(relay_only("RevokeSubject"))
    }

    async fn list_sessions(
        &self,
        _: Request<pb::ListSessionsRequest>,
    ) -> Result<Response<pb::ListSessionsResponse>, Status> {
        Err(relay_only("ListSessions"))
    }
}
