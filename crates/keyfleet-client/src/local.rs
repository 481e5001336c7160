//! [`LocalVerifier`]: a verifier node inside the service's own process. It *is* the verifier
//! crate's node (`keyfleet_verifier::Verifier`), opened from the same [`Config`]: the same
//! key-set follower (the `WatchJwks` stream with deltas and the fleet credential, the fallback
//! pull, or a JWKS URL), the same screening, revocation lists, unknown-kid refresh, verified-token
//! cache and `--max-stale` rule, and the same decision path — one piece of code for one job, so
//! its verdicts are a node's by construction. A verdict costs no network hop.
//!
//! The verifier crate starts its key-set follower only from `Verifier::serve`, so the node
//! also serves its gRPC and HTTP endpoints, on two loopback ports the system picks
//! ([`LocalVerifier::metrics_url`] gives its Prometheus `/metrics`). Nothing needs them to
//! verify; they go once the verifier crate exposes its follower alone.

use std::net::SocketAddr;
use std::time::Duration;

use keyfleet_proto::v1::VerifyResponse;
use keyfleet_verifier::{Config, OpenError, ServeError, Verifier};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::verdict::{BoxFuture, Demands, TokenVerifier, VerifiedClaims, VerifyError};

/// Why a [`LocalVerifier`] could not start.
#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    /// The configuration was refused, or the saved key set or source client could not be set up.
    #[error(transparent)]
    Open(#[from] OpenError),
    #[error("cannot bind a loopback port for the in-process node's endpoints")]
    Bind(#[source] std::io::Error),
    /// The node stopped (its servers failed).
    #[error("the in-process verifier stopped")]
    Stopped(#[source] ServeError),
    #[error("no key set within {0:?}: is the source reachable, and the fleet credential right?")]
    NotReady(Duration),
}

/// A verifier node in this process: verifies tokens with no network hop, following an
/// authority (or a JWKS URL) exactly as a node does. Stops when dropped.
///
/// ```no_run
/// # async fn example() -> Result<(), Box<dyn std::error::Error>> {
/// use std::time::Duration;
/// use keyfleet_client::{Demands, LocalVerifier, TokenVerifier};
/// use keyfleet_verifier::{Config, Source};
///
/// let mut config = Config::new(Source::Authority { url: "https://authority.internal:7000".into() });
/// config.audiences = vec!["orders".into()];
/// config.node_token_file = Some("/run/secrets/keyfleet-node.token".into());
/// config.node_id = "orders-api-1".into();
/// let local = LocalVerifier::start(config).await?;
/// local.wait_ready(Duration::from_secs(10)).await?;
///
/// let claims = local.verify("eyJ…", &Demands::none()).await?;
/// println!("{} (key {})", claims.subject, claims.kid);
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct LocalVerifier {
    node: Verifier,
    grpc: SocketAddr,
    http: SocketAddr,
    stop: CancellationToken,
    task: JoinHandle<Result<(), ServeError>>,
}

impl LocalVerifier {
    /// Checks `config` (as a node would: an audience policy is mandatory), loads the saved key
    /// set if `cache_dir` is set, and starts following the source. Must run inside a Tokio
    /// runtime; verifies as soon as a key set is held ([`LocalVerifier::wait_ready`]).
    pub async fn start(config: Config) -> Result<LocalVerifier, LocalError> {
        let node = Verifier::open(config).await?;
        let grpc = loopback().await?;
        let http = loopback().await?;
        let (grpc_addr, http_addr) = (
            grpc.local_addr().map_err(LocalError::Bind)?,
            http.local_addr().map_err(LocalError::Bind)?,
        );
        let stop = CancellationToken::new();
        let task = tokio::spawn(node.clone().serve(grpc, http, stop.clone()));
        Ok(LocalVerifier {
            node,
            grpc: grpc_addr,
            http: http_addr,
            stop,
            task,
        })
    }

    /// Waits until a key set is held (at most `timeout`).
    pub async fn wait_ready(&self, timeout: Duration) -> Result<(), LocalError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut step = Duration::from_millis(5);
        while !self.node.is_ready() {
            if self.task.is_finished() || tokio::time::Instant::now() >= deadline {
                return Err(LocalError::NotReady(timeout));
            }
            tokio::time::sleep(step).await;
            step = (step * 2).min(Duration::from_millis(100));
        }
        Ok(())
    }

    /// True while a key set no older than `max_stale` is held.
    pub fn is_ready(&self) -> bool {
        self.node.is_ready()
    }

    /// The version of the key set held (0 before any, and for a JWKS URL).
    pub fn version(&self) -> u64 {
        self.node.version()
    }

    /// The node itself (cache bounds, batching settings, counters).
    pub fn node(&self) -> &Verifier {
        &self.node
    }

    /// The in-process node's Prometheus endpoint (`http://127.0.0.1:PORT/metrics`).
    pub fn metrics_url(&self) -> String {
        format!("http://{}/metrics", self.http)
    }

    /// The in-process node's gRPC address (loopback), should another process want to ask it.
    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc
    }

    /// The node's answer, exactly as `Verify` would give it (valid or a refusal with its
    /// reason); an error when it holds no key set yet.
    pub async fn verify_raw(
        &self,
        token: &str,
        demands: &Demands,
    ) -> Result<VerifyResponse, tonic::Status> {
        let core = keyfleet_core::Demands {
            required_scopes: &demands.required_scopes,
            max_auth_age: demands.max_auth_age_seconds(),
        };
        self.node
            .verify_token(token, demands.audience.as_deref().unwrap_or(""), core)
            .await
    }

    /// Stops following the source and waits for the node to finish.
    pub async fn shutdown(mut self) -> Result<(), LocalError> {
        self.stop.cancel();
        match (&mut self.task).await {
            Ok(Ok(())) | Err(_) => Ok(()),
            Ok(Err(e)) => Err(LocalError::Stopped(e)),
        }
    }
}

impl Drop for LocalVerifier {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl TokenVerifier for LocalVerifier {
    fn verify<'a>(
        &'a self,
        token: &'a str,
        demands: &'a Demands,
    ) -> BoxFuture<'a, Result<VerifiedClaims, VerifyError>> {
        Box::pin(async move {
            match self.verify_raw(token, demands).await {
                Ok(answer) => crate::verdict::from_response(answer),
                Err(status) => Err(VerifyError::Unavailable(status.message().to_owned())),
            }
        })
    }
}

async fn loopback() -> Result<TcpListener, LocalError> {
    TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(LocalError::Bind)
}
