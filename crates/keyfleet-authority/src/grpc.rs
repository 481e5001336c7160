//! The `keyfleet.v1.Authority` gRPC service: admin checks, then the shared state's operations;
//! and the `WatchJwks` push stream with its acknowledgements.

use std::sync::Arc;

use keyfleet_proto::v1 as pb;
use keyfleet_runtime::CancellationToken;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, info};

use crate::authority::Shared;
use crate::error::ServiceError;
use crate::guard::AdminGuard;
use crate::watchers::bounded;

pub(crate) struct AuthorityService {
    shared: Arc<Shared>,
    /// Cancelled on shutdown: ends every watch stream so the server can drain.
    stop: CancellationToken,
    guard: AdminGuard,
}

/// What an admin call does, for the rate limit.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Admin {
    /// `IssueToken`: the minting path, bounded by load shedding only.
    Mint,
    /// Key and deny-list changes: rate-limited.
    Manage,
}

impl AuthorityService {
    pub(crate) fn new(
        shared: Arc<Shared>,
        stop: CancellationToken,
        guard: AdminGuard,
    ) -> AuthorityService {
        AuthorityService {
            shared,
            stop,
            guard,
        }
    }

    /// Transport rule, rate limit, then the credential (compared in constant time). A failed
    /// credential costs a token from the same bucket, so guessing is rate-limited too.
    fn authorize<T>(&self, request: &Request<T>, kind: Admin) -> Result<(), ServiceError> {
        if !self.guard.transport_ok(request.remote_addr()) {
            return Err(ServiceError::AdminNeedsTls);
        }
        if kind == Admin::Manage && !self.guard.take() {
            return Err(ServiceError::RateLimited);
        }
        let value = request
            .metadata()
            .get("authorization")
            .map(|v| v.as_bytes());
        if self.shared.admin.accepts(value) {
            Ok(())
        } else if kind == Admin::Mint && !self.guard.take() {
            Err(ServiceError::RateLimited)
        } else {
            Err(ServiceError::Unauthenticated)
        }
    }
}

#[tonic::async_trait]
impl pb::authority_server::Authority for AuthorityService {
    async fn get_jwks(
        &self,
        _: Request<pb::GetJwksRequest>,
    ) -> Result<Response<pb::JwksSnapshot>, Status> {
        Ok(Response::new((*self.shared.current()).clone()))
    }

    type WatchJwksStream = ReceiverStream<Result<pb::JwksSnapshot, Status>>;

    async fn watch_jwks(
        &self,
        request: Request<Streaming<pb::WatchJwksRequest>>,
    ) -> Result<Response<Self::WatchJwksStream>, Status> {
        let peer = request
            .remote_addr()
            .map_or_else(|| "unknown".to_owned(), |a| a.to_string());
        let (tx, rx) = mpsc::channel(1);
        tokio::spawn(watch(
            self.shared.clone(),
            self.stop.clone(),
            request.into_inner(),
            peer,
            tx,
        ));
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn issue_token(
        &self,
        request: Request<pb::IssueTokenRequest>,
    ) -> Result<Response<pb::IssueTokenResponse>, Status> {
        self.authorize(&request, Admin::Mint)?;
        Ok(Response::new(
            self.shared.issue_token(request.into_inner())?,
        ))
    }

    async fn rotate_keys(
        &self,
        request: Request<pb::RotateKeysRequest>,
    ) -> Result<Response<pb::RotateKeysResponse>, Status> {
        self.authorize(&request, Admin::Manage)?;
        Ok(Response::new(self.shared.rotate().await?))
    }

    async fn revoke_key(
        &self,
        request: Request<pb::RevokeKeyRequest>,
    ) -> Result<Response<pb::RevokeKeyResponse>, Status> {
        self.authorize(&request, Admin::Manage)?;
        Ok(Response::new(
            self.shared.revoke_key(request.into_inner().kid).await?,
        ))
    }

    async fn revoke_token(
        &self,
        request: Request<pb::RevokeTokenRequest>,
    ) -> Result<Response<pb::RevokeTokenResponse>, Status> {
        self.authorize(&request, Admin::Manage)?;
        let req = request.into_inner();
        Ok(Response::new(
            self.shared.revoke_token(req.jti, req.until).await?,
        ))
    }

    async fn list_keys(
        &self,
        _: Request<pb::ListKeysRequest>,
    ) -> Result<Response<pb::ListKeysResponse>, Status> {
        Ok(Response::new(self.shared.list_keys().await))
    }
}

/// Drives one watch stream: pushes the current snapshot at once and the latest one after every
/// change (a slow reader gets only the newest, never a backlog), and records the watcher's name
/// and acknowledgements. Ends when the client goes away or on shutdown.
async fn watch(
    shared: Arc<Shared>,
    stop: CancellationToken,
    mut inbound: Streaming<pb::WatchJwksRequest>,
    peer: String,
    tx: mpsc::Sender<Result<pb::JwksSnapshot, Status>>,
) {
    let mut snapshots = shared.snapshots.subscribe();
    let mut pending = Some(snapshots.borrow_and_update().clone());
    // The newest version queued for this client: an ack beyond it is not believed.
    let mut newest = pending.as_ref().map_or(0, |s| s.version);
    let mut me: Option<(String, u64)> = None;
    // A client that half-closes still gets snapshots, but can no longer hold back promotions.
    let mut inbound_open = true;
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            permit = tx.reserve(), if pending.is_some() => {
                let Ok(permit) = permit else { break };
                let snapshot = pending.take().expect("guarded by the branch condition");
                permit.send(Ok((*snapshot).clone()));
            }
            changed = snapshots.changed() => {
                if changed.is_err() {
                    break;
                }
                let snapshot = snapshots.borrow_and_update().clone();
                newest = snapshot.version;
                pending = Some(snapshot);
            }
            message = inbound.message(), if inbound_open => {
                let message = match message {
                    Ok(Some(message)) => message,
                    Ok(None) => {
                        inbound_open = false;
                        leave(&shared, me.take());
                        continue;
                    }
                    Err(_) => break,
                };
                let acked = message.acked_version.min(newest);
                let now = shared.clock.now();
                match &me {
                    None => {
                        let node_id = if message.node_id.is_empty() { peer.as_str() } else { bounded(&message.node_id) };
                        let region = bounded(&message.region);
                        let conn = shared.lock_watchers().connect(node_id, region, acked, now);
                        info!(node_id, region, peer = %peer, "watcher connected");
                        me = Some((node_id.to_owned(), conn));
                    }
                    Some((node_id, conn)) => {
                        debug!(node_id = %node_id, acked, "watcher acknowledged");
                        shared.lock_watchers().ack(node_id, *conn, acked, now);
                    }
                }
                shared.kick.notify_one();
            }
            _ = tx.closed() => break,
        }
    }
    leave(&shared, me);
}

/// Marks a watcher disconnected (it stays listed for a while) and lets promotions proceed.
fn leave(shared: &Shared, me: Option<(String, u64)>) {
    if let Some((node_id, conn)) = me {
        shared
            .lock_watchers()
            .disconnect(&node_id, conn, shared.clock.now());
        info!(node_id = %node_id, "watcher disconnected");
        shared.kick.notify_one();
    }
}
