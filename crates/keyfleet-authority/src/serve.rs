//! The running authority: [`Authority::serve`] (gRPC and HTTP on the caller's listeners, with
//! one shutdown and drain for both) and the lifecycle loop that promotes, retires and rotates
//! keys on a tick and whenever a watcher's acknowledgement may allow a promotion.

use std::sync::Arc;

use keyfleet_core::ring::TickOutcome;
use keyfleet_runtime::CancellationToken;
use tokio::net::TcpListener;
use tonic::service::Routes;
use tracing::{info, warn};

use crate::authority::{Authority, AuthorityState};
use crate::error::{ServeError, ServiceError};
use crate::guard::AdminGuard;
use crate::metrics::Trigger;
use crate::{grpc, http};

impl Authority {
    /// Serves gRPC on `grpc` and HTTP on `http` and runs the key lifecycle until `shutdown` is
    /// cancelled or a server fails; then ends every watch stream, drains both servers and
    /// returns.
    pub async fn serve(
        self,
        grpc: TcpListener,
        http: TcpListener,
        shutdown: CancellationToken,
    ) -> Result<(), ServeError> {
        let shared = self.shared;
        let address = |listener: &TcpListener, name| {
            listener
                .local_addr()
                .map_err(|source| ServeError::Listener {
                    listener: name,
                    source,
                })
        };
        let grpc_addr = address(&grpc, "gRPC")?;
        let http_addr = address(&http, "HTTP")?;
        // Ends the watch streams (so the gRPC server can drain) and the lifecycle loop.
        let stop = shutdown.child_token();
        let guard = AdminGuard::new(
            grpc_addr,
            shared.transport.tls.is_some(),
            shared.insecure_admin,
            shared.admin_rate,
        );
        if !guard.transport_ok(None) {
            warn!(grpc = %grpc_addr, "admin calls are refused on this plaintext non-loopback listener (except from this host): give --tls-cert/--tls-key, or --insecure-admin");
        }
        let service = grpc::AuthorityService::new(shared.clone(), stop.clone(), guard);
        let (routes, _health) = keyfleet_runtime::serve::with_health_and_reflection(
            Routes::new(
                keyfleet_proto::encoded::authority_server::AuthorityServer::new(service)
                    .max_decoding_message_size(grpc::MAX_REQUEST_BYTES),
            ),
            "keyfleet.v1.Authority",
        )
        .await?;
        let labels = keyfleet_runtime::rpc_trace::ServerLabels {
            role: "authority",
            node_id: "authority".to_owned(),
            region: String::new(),
        };
        let weak = Arc::downgrade(&shared);
        keyfleet_runtime::metrics_bridge::export(&labels.attributes(), move || {
            let shared = weak.upgrade()?;
            shared.observe_watchers();
            Some(shared.metrics.encode())
        });
        let routes = keyfleet_runtime::rpc_trace::traced(routes, labels);
        let router = http::router(shared.clone(), http_addr);
        info!(grpc = %grpc_addr, http = %http_addr, issuer = %shared.issuer, "authority listening");

        let lifecycle = tokio::spawn(lifecycle(shared.clone(), stop.clone()));
        // Both servers stop on `stop` (cancelled too when either server ends), which also ends
        // the watch streams the gRPC server waits for as it drains, and the lifecycle loop.
        let served = keyfleet_runtime::serve::serve_pair(
            grpc,
            routes,
            http,
            router,
            &shared.transport,
            stop.clone(),
        )
        .await;
        stop.cancel();
        let _ = lifecycle.await;
        served?;
        info!("authority stopped");
        Ok(())
    }
}

/// How often a step of the session purge sweep runs.
const PURGE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);
/// Sessions one purge step looks at (a few milliseconds of the store's time).
const PURGE_SCAN: usize = 2_000;
/// How long an ended or expired session stays listed (`ListSessions`) before it is forgotten.
const KEEP_ENDED_SECS: i64 = 7 * 24 * 3600;

/// Ticks the ring every `tick_interval` and whenever kicked, until `stop`; forgets long-gone
/// watchers and refreshes the watcher gauges on the interval; sweeps old sessions out of the
/// session store a step at a time.
async fn lifecycle(shared: Arc<AuthorityState>, stop: CancellationToken) {
    let mut interval = tokio::time::interval(shared.tick_interval);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut purge = tokio::time::interval(PURGE_INTERVAL);
    purge.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let kicked = tokio::select! {
            _ = stop.cancelled() => return,
            _ = interval.tick() => false,
            _ = shared.kick.notified() => true,
            _ = purge.tick() => {
                shared.purge_step().await;
                continue;
            }
        };
        // A kick (an ack during a pending rotation) needs the tick alone.
        if !kicked {
            shared.lock_watchers().prune();
            shared.observe_watchers();
        }
        match shared.tick().await {
            // Already logged where it happened.
            Ok(()) | Err(ServiceError::Persist(_)) => {}
            Err(e) => warn!(
                error = %keyfleet_runtime::error_chain(&e),
                "lifecycle tick failed; retrying on the next tick"
            ),
        }
    }
}

impl AuthorityState {
    /// One lifecycle step at the clock's now.
    pub(crate) async fn tick(&self) -> Result<(), ServiceError> {
        let min_acked = self.min_acked();
        let ((outcome, trigger), _) = self
            .commit(|work, now| {
                let trigger = if work.ring.rotation_pending && now < work.ring.next_rotation_at() {
                    Trigger::Manual
                } else {
                    Trigger::Scheduled
                };
                let outcome = work.ring.tick(now, min_acked);
                // Ended sessions leave the deny list once their last access token is dead.
                let before = work.revoked_sessions.len();
                work.revoked_sessions.retain(|_, until| now <= *until);
                if work.revoked_sessions.len() != before && !outcome.changed {
                    work.ring.version += 1;
                }
                Ok((outcome, trigger))
            })
            .await?;
        self.report(&outcome, trigger);
        Ok(())
    }

    /// One step of the sweep that forgets sessions ended or expired more than a week ago.
    async fn purge_step(&self) {
        let before = self.clock.now() - KEEP_ENDED_SECS;
        let after = self
            .purge_cursor
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        let store = Arc::clone(&self.sessions);
        let step =
            tokio::task::spawn_blocking(move || store.purge(before, &after, PURGE_SCAN)).await;
        match step {
            Ok(Ok(purged)) => {
                if purged.forgotten > 0 {
                    info!(sessions = purged.forgotten, "forgot old sessions");
                }
                *self
                    .purge_cursor
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) =
                    purged.next.unwrap_or_default();
            }
            Ok(Err(e)) => warn!(error = %e, "session purge failed; retrying on the next step"),
            Err(_) => {}
        }
    }

    /// Logs (and counts) what a tick changed.
    pub(crate) fn report(&self, outcome: &TickOutcome, trigger: Trigger) {
        let _span = (outcome.promoted.is_some()
            || !outcome.destroyed.is_empty()
            || !outcome.retired.is_empty())
        .then(|| tracing::info_span!("keyring.tick", trigger = trigger.as_str()).entered());
        if let Some(kid) = &outcome.promoted {
            self.metrics.rotated(trigger);
            info!(kid = %kid, trigger = trigger.as_str(), "key activated");
        }
        for kid in &outcome.destroyed {
            info!(kid = %kid, "key retiring: stopped signing, private key destroyed");
        }
        for kid in &outcome.retired {
            info!(kid = %kid, "key retired: removed from the JWKS");
        }
    }
}
