//! The `keyfleet.v1.Authority` gRPC service: credential checks (the admin token for admin
//! calls, the fleet's node token for `WatchJwks` and the deny lists of `GetJwks`), then the
//! shared state's operations; and the admission of `WatchJwks` streams, which
//! `keyfleet_feed::watch` then drives. Key-set answers are bytes the feed encoded once per
//! version (`keyfleet_proto::encoded`), never encoded per call.

use std::net::SocketAddr;
use std::sync::Arc;

use keyfleet_core::{escape_untrusted, is_valid_label};
use keyfleet_feed::watch::{self, Admitted, Full, HelloError, NodeIdTaken, WatchResponse};
use keyfleet_proto::encoded::authority_server::Authority;
use keyfleet_proto::v1 as pb;
use keyfleet_proto::wire::EncodedSnapshot;
use keyfleet_runtime::CancellationToken;
use keyfleet_runtime::credentials::Verdict;
use keyfleet_runtime::tls::certified_node_id;
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, warn};

use crate::admin::AdminToken;
use crate::authority::AuthorityState;
use crate::error::ServiceError;
use crate::guard::{AdminGuard, RefreshGuard};
use crate::metrics::Credential;
use crate::session_store::{EndBy, EndReason};
use crate::sessions::{Unusable, check_shape, hash};

/// Largest message the authority decodes. Its requests are small (a hello, an ack, a token
/// request under the 8 KiB token limit, a relay's report of at most
/// `watch::MAX_DOWNSTREAM_PER_MESSAGE` nodes); a bigger one is refused before it costs memory.
pub(crate) const MAX_REQUEST_BYTES: usize = 16 * 1024;
/// Characters of an untrusted string shown in a log line.
const LOGGED_CHARS: usize = 64;

pub(crate) struct AuthorityService {
    shared: Arc<AuthorityState>,
    /// Cancelled on shutdown: ends every watch stream so the server can drain.
    stop: CancellationToken,
    guard: AdminGuard,
    /// Unusable refresh tokens, per peer.
    refresh_guard: RefreshGuard,
}

/// What an admin call does, for the rate limit.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Admin {
    /// `IssueToken` and `ListKeys`: bounded by load shedding only.
    Unmetered,
    /// Key and deny-list changes: the authenticated callers' `--admin-rate` budget.
    Manage,
}

fn authorization<T>(request: &Request<T>) -> Option<&[u8]> {
    request
        .metadata()
        .get("authorization")
        .map(|v| v.as_bytes())
}

/// At most [`LOGGED_CHARS`] of `text`, escaped, for a log line.
fn shown(text: &str) -> String {
    let cut: String = text.chars().take(LOGGED_CHARS).collect();
    escape_untrusted(&cut).into_owned()
}

impl AuthorityService {
    pub(crate) fn new(
        shared: Arc<AuthorityState>,
        stop: CancellationToken,
        guard: AdminGuard,
    ) -> AuthorityService {
        AuthorityService {
            shared,
            stop,
            guard,
            refresh_guard: RefreshGuard::default(),
        }
    }

    /// Checks `token` against the call's `authorization`, in constant time. A failure is
    /// charged to the peer's own failure budget (never to anyone else's, and never to the
    /// key-management budget); past it the peer gets `RESOURCE_EXHAUSTED`. The right credential
    /// is accepted whatever the address failed before.
    fn credential<T>(
        &self,
        request: &Request<T>,
        token: &AdminToken,
        which: Credential,
        rpc: &'static str,
    ) -> Result<(), ServiceError> {
        let peer = request.remote_addr();
        let accepted = token.accepts(authorization(request));
        match self.guard.judge(accepted, peer) {
            Verdict::Accepted => Ok(()),
            Verdict::Refused => {
                self.shared.metrics.auth_failed(which, false);
                warn!(peer = %peer_name(peer), rpc, credential = which.as_str(), "credential refused");
                Err(match which {
                    Credential::Admin => ServiceError::Unauthenticated,
                    Credential::Node => ServiceError::NodeUnauthenticated,
                })
            }
            Verdict::TooManyFailures => {
                self.shared.metrics.auth_failed(which, true);
                Err(ServiceError::TooManyFailures)
            }
        }
    }

    /// Transport rule, the admin credential, then (for key management) the authenticated
    /// callers' rate.
    fn authorize<T>(
        &self,
        request: &Request<T>,
        kind: Admin,
        rpc: &'static str,
    ) -> Result<(), ServiceError> {
        if !self.guard.transport_ok(request.remote_addr()) {
            return Err(ServiceError::AdminNeedsTls);
        }
        self.credential(request, &self.shared.admin, Credential::Admin, rpc)?;
        if kind == Admin::Manage && !self.guard.take_manage() {
            return Err(ServiceError::RateLimited);
        }
        Ok(())
    }

    /// Everything `WatchJwks` checks before the stream starts: the fleet credential, a slot
    /// under the caps, the hello within `watch::HELLO_TIMEOUT`, valid labels. With mutual TLS
    /// the node id is the client certificate's, not the hello's. (That no live stream holds
    /// the node id is checked as the stream opens.)
    async fn admit(
        &self,
        request: Request<Streaming<pb::WatchJwksRequest>>,
    ) -> Result<Admitted<Streaming<pb::WatchJwksRequest>>, ServiceError> {
        self.credential(&request, &self.shared.node, Credential::Node, "WatchJwks")?;
        let peer = request.remote_addr();
        let certified = certified_node_id(request.peer_certs().as_deref().map(Vec::as_slice))?;
        let slot = self
            .shared
            .slots
            .take(peer.map(|p| p.ip()))
            .map_err(|full| {
                self.shared.metrics.watch_refused("full");
                warn!(peer = %peer_name(peer), ?full, "watch stream refused: too many watchers");
                ServiceError::WatchersFull(match full {
                    Full::Total(n) => {
                        format!("the authority serves at most {n} watch streams (--max-watchers)")
                    }
                    Full::Peer(n) => format!(
                        "this address already has {n} watch streams open (--max-watchers-per-peer)"
                    ),
                })
            })?;
        let mut inbound = request.into_inner();
        let hello = match watch::read_hello(&mut inbound).await {
            Ok(hello) => hello,
            Err(HelloError::Missing) => {
                return Err(ServiceError::InvalidArgument(format!(
                    "watch stream: send the hello (node_id, region, acked_version) as the first message, within {}s",
                    watch::HELLO_TIMEOUT.as_secs()
                )));
            }
            Err(HelloError::Unreadable(status)) => {
                self.shared.metrics.watch_refused("bad_hello");
                debug!(peer = %peer_name(peer), code = ?status.code(), "watch hello unreadable");
                return Err(ServiceError::Status(status));
            }
        };
        if !is_valid_label(&hello.region) {
            self.shared.metrics.watch_refused("bad_hello");
            warn!(peer = %peer_name(peer), region = %shown(&hello.region), "watch refused: bad region");
            return Err(ServiceError::InvalidArgument(
                "watch hello: region must be 1 to 128 characters from A-Z a-z 0-9 . _ : -".into(),
            ));
        }
        let by_certificate = certified.is_some();
        let node_id = match certified {
            Some(name) => {
                if !hello.node_id.is_empty() && hello.node_id != name {
                    debug!(certificate = %name, hello = %shown(&hello.node_id), "the client certificate names the node; the hello's node id is ignored");
                }
                name
            }
            None if is_valid_label(&hello.node_id) => hello.node_id.clone(),
            None => {
                self.shared.metrics.watch_refused("bad_hello");
                warn!(peer = %peer_name(peer), node_id = %shown(&hello.node_id), "watch refused: bad node id");
                return Err(ServiceError::InvalidArgument(
                    "watch hello: node_id must be 1 to 128 characters from A-Z a-z 0-9 . _ : - (the verifier's --node-id)".into(),
                ));
            }
        };
        debug!(node_id = %node_id, peer = %peer_name(peer), by_certificate, "watch stream admitted");
        Ok(Admitted {
            inbound,
            hello,
            node_id,
            slot: Some(slot),
        })
    }
}

/// A peer address for a log line.
fn peer_name(peer: Option<SocketAddr>) -> String {
    peer.map_or_else(|| "unknown".to_owned(), |p| p.to_string())
}

#[tonic::async_trait]
impl Authority for AuthorityService {
    /// Public keys for anyone; the deny lists (`revoked_kids`, `revoked_tokens`) and the
    /// digest only with the fleet credential. A wrong credential is refused rather than quietly
    /// served less. Both answers were encoded once, when the version was published.
    async fn get_jwks(
        &self,
        request: Request<pb::GetJwksRequest>,
    ) -> Result<Response<EncodedSnapshot>, Status> {
        let current = self.shared.current();
        if authorization(&request).is_none() {
            return Ok(Response::new(current.public.clone()));
        }
        self.credential(&request, &self.shared.node, Credential::Node, "GetJwks")?;
        Ok(Response::new(current.full.clone()))
    }

    type WatchJwksStream = WatchResponse;

    /// Admits the stream, then `keyfleet_feed::watch` drives it: full snapshots for a node
    /// that does not accept deltas (the protocol before deltas), deltas after one full
    /// snapshot (or after the version and digest it names) for one that does.
    async fn watch_jwks(
        &self,
        request: Request<Streaming<pb::WatchJwksRequest>>,
    ) -> Result<Response<Self::WatchJwksStream>, Status> {
        let admitted = self.admit(request).await?;
        let stream = watch::open(
            self.shared.clone(),
            &self.shared.feed,
            self.stop.clone(),
            admitted,
        )
        .map_err(|NodeIdTaken(node_id)| {
            self.shared.metrics.watch_refused("node_id_taken");
            warn!(node_id = %node_id, "watch refused: a live stream holds this node id");
            ServiceError::NodeIdTaken(node_id)
        })?;
        Ok(Response::new(stream))
    }

    async fn issue_token(
        &self,
        request: Request<pb::IssueTokenRequest>,
    ) -> Result<Response<pb::IssueTokenResponse>, Status> {
        self.authorize(&request, Admin::Unmetered, "IssueToken")?;
        Ok(Response::new(
            self.shared.issue_token(request.into_inner())?,
        ))
    }

    async fn rotate_keys(
        &self,
        request: Request<pb::RotateKeysRequest>,
    ) -> Result<Response<pb::RotateKeysResponse>, Status> {
        self.authorize(&request, Admin::Manage, "RotateKeys")?;
        Ok(Response::new(self.shared.rotate().await?))
    }

    async fn revoke_key(
        &self,
        request: Request<pb::RevokeKeyRequest>,
    ) -> Result<Response<pb::RevokeKeyResponse>, Status> {
        self.authorize(&request, Admin::Manage, "RevokeKey")?;
        Ok(Response::new(
            self.shared.revoke_key(request.into_inner().kid).await?,
        ))
    }

    async fn revoke_token(
        &self,
        request: Request<pb::RevokeTokenRequest>,
    ) -> Result<Response<pb::RevokeTokenResponse>, Status> {
        self.authorize(&request, Admin::Manage, "RevokeToken")?;
        let req = request.into_inner();
        Ok(Response::new(
            self.shared.revoke_token(req.jti, req.until).await?,
        ))
    }

    /// Needs the admin credential: it shows the fleet (node ids, regions, addresses of trust)
    /// and the rotation schedule.
    async fn list_keys(
        &self,
        request: Request<pb::ListKeysRequest>,
    ) -> Result<Response<pb::ListKeysResponse>, Status> {
        self.authorize(&request, Admin::Unmetered, "ListKeys")?;
        Ok(Response::new(self.shared.list_keys().await))
    }

    /// Admin: the login service that checked the password starts the session.
    async fn start_session(
        &self,
        request: Request<pb::StartSessionRequest>,
    ) -> Result<Response<pb::SessionTokens>, Status> {
        self.authorize(&request, Admin::Unmetered, "StartSession")?;
        Ok(Response::new(
            self.shared.start_session(request.into_inner()).await?,
        ))
    }

    /// No admin credential: the refresh token is the credential. A peer past its budget of
    /// unusable refresh tokens is refused before the store is asked.
    async fn refresh(
        &self,
        request: Request<pb::RefreshRequest>,
    ) -> Result<Response<pb::SessionTokens>, Status> {
        let peer = request.remote_addr();
        if !self.refresh_guard.may_try(peer) {
            self.shared.metrics.refresh_refused("limited");
            return Err(ServiceError::TooManyRefreshFailures.into());
        }
        let req = request.into_inner();
        let refused = |unusable: Unusable| -> Status {
            self.shared.metrics.refresh_refused(unusable.kind());
            debug!(peer = %peer_name(peer), kind = unusable.kind(), "refresh refused");
            if !self.refresh_guard.failed(peer) {
                self.shared.metrics.refresh_refused("limited");
            }
            ServiceError::Refresh(unusable).into()
        };
        if let Err(unusable) = check_shape(&req.refresh_token) {
            return Err(refused(unusable));
        }
        match self.shared.refresh(&req.refresh_token, req.scopes).await {
            Ok(tokens) => Ok(Response::new(tokens)),
            Err(Ok(unusable)) => Err(refused(unusable)),
            Err(Err(e)) => Err(e.into()),
        }
    }

    /// Logout with the session's refresh token (no admin credential), or by session id with
    /// the admin credential.
    async fn end_session(
        &self,
        request: Request<pb::EndSessionRequest>,
    ) -> Result<Response<pb::EndSessionResponse>, Status> {
        let peer = request.remote_addr();
        let has_token = !request.get_ref().refresh_token.is_empty();
        let has_id = !request.get_ref().session_id.is_empty();
        match (has_token, has_id) {
            (true, true) | (false, false) => {
                return Err(ServiceError::InvalidArgument(
                    "send either refresh_token (logout) or session_id (with the admin credential), not both".into(),
                )
                .into());
            }
            (false, true) => {
                self.authorize(&request, Admin::Unmetered, "EndSession")?;
                let id = request.into_inner().session_id;
                return match self
                    .shared
                    .end_session(EndBy::Id(id.clone()), EndReason::Admin)
                    .await?
                {
                    Some(answer) => Ok(Response::new(answer)),
                    None => Err(ServiceError::NoSuchSession(id).into()),
                };
            }
            (true, false) => {}
        }
        if !self.refresh_guard.may_try(peer) {
            return Err(ServiceError::TooManyRefreshFailures.into());
        }
        let token = request.into_inner().refresh_token;
        let refused = |unusable: Unusable| -> Status {
            self.refresh_guard.failed(peer);
            ServiceError::Refresh(unusable).into()
        };
        check_shape(&token).map_err(refused)?;
        match self
            .shared
            .end_session(EndBy::Token(hash(&token)), EndReason::Logout)
            .await?
        {
            Some(answer) => Ok(Response::new(answer)),
            None => Err(refused(Unusable::Unknown)),
        }
    }

    async fn revoke_subject(
        &self,
        request: Request<pb::RevokeSubjectRequest>,
    ) -> Result<Response<pb::RevokeSubjectResponse>, Status> {
        self.authorize(&request, Admin::Unmetered, "RevokeSubject")?;
        Ok(Response::new(
            self.shared
                .revoke_subject(request.into_inner().subject)
                .await?,
        ))
    }

    async fn list_sessions(
        &self,
        request: Request<pb::ListSessionsRequest>,
    ) -> Result<Response<pb::ListSessionsResponse>, Status> {
        self.authorize(&request, Admin::Unmetered, "ListSessions")?;
        Ok(Response::new(
            self.shared
                .list_sessions(request.into_inner().subject)
                .await?,
        ))
    }
}
