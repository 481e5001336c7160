//! The verifier node's handle: [`Verifier::open`] builds it from a checked [`Config`],
//! [`Verifier::serve`] runs it. The verify path is in `node/decide.rs` (with
//! `node/combine.rs`, `node/signatures.rs`, and `node/batch.rs` for `VerifyBatch`),
//! the background refreshes in `node/refresh.rs`, the HTTP endpoints in `node/http.rs`
//! (with forward-auth `/auth`), Envoy's ext_authz `Check` in `node/ext_authz.rs`, and what
//! the two proxy front doors share (bearer token, route policy, challenges) in `node/authz.rs`.

use std::sync::Arc;

use envoy_types::ext_authz::v3::pb::AuthorizationServer;
use keyfleet_proto::encoded::authority_server::AuthorityServer;
use keyfleet_proto::v1::verifier_server::VerifierServer;
use keyfleet_runtime::CancellationToken;
use keyfleet_runtime::rpc_trace::ServerLabels;
use keyfleet_runtime::secure_fs::SecureFsError;
use keyfleet_runtime::serve::{ServeError, Transport, serve_pair, with_health_and_reflection};
use tokio::net::TcpListener;
use tonic::service::Routes;

use crate::cache::VerifyCache;
use crate::config::{Config, ConfigError};
use crate::gate::Gate;
use crate::keyset::NodeKeys;
use crate::metrics::Metrics;
use crate::node::combine::Combiner;
use crate::relay::{MAX_REQUEST_BYTES, Relay, RelayService};
use crate::upstream::{Upstream, UpstreamError};

mod authz;
mod batch;
mod combine;
mod decide;
mod ext_authz;
mod http;
mod refresh;
mod signatures;

pub use batch::MAX_BATCH;
pub use combine::BatchCounts;
pub(crate) use signatures::Unbatchable;

/// The gRPC service name, as health reports it.
const SERVICE: &str = "keyfleet.v1.Verifier";

/// A verifier node. Cheap to clone; every clone is the same node.
#[derive(Clone)]
pub struct Verifier {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("node_id", &self.inner.config.node_id)
            .field("source", &self.inner.config.source)
            .field("version", &self.inner.keys.version())
            .finish_non_exhaustive()
    }
}

struct Inner {
    config: Config,
    keys: Arc<NodeKeys>,
    upstream: Upstream,
    gate: Gate,
    metrics: Arc<Metrics>,
    /// The verified-token cache.
    cache: VerifyCache,
    /// Concurrent `Verify` calls checked in one batch (`node/combine.rs`).
    combiner: Combiner,
    /// `--serve-watch`: the relay side, serving the source's key set to downstream verifiers.
    relay: Option<Arc<Relay>>,
}

/// Why [`Verifier::open`] refused to build a node.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The saved key set's directory or file is unsafe, or the directory cannot be created.
    #[error("cannot load the saved key set from --cache-dir")]
    SavedKeySet(#[source] SecureFsError),
    #[error("loading the saved key set did not finish")]
    SavedKeySetTask(#[source] tokio::task::JoinError),
    #[error("cannot set up the client of the key source")]
    Upstream(#[from] UpstreamError),
}

/// Why [`crate::run`] stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Open(#[from] OpenError),
    #[error(transparent)]
    Serve(#[from] ServeError),
}

impl Verifier {
    /// Checks `config`, builds the source client (without connecting) and loads the saved key
    /// set. Must run inside a Tokio runtime.
    pub async fn open(config: Config) -> Result<Verifier, OpenError> {
        config.check()?;
        let upstream = Upstream::new(
            &config.source,
            &config.source_tls,
            config.node_token_file.as_deref(),
        )?;
        let metrics = Arc::new(Metrics::new());
        metrics.describe_node(&config.node_id, &config.region);
        let keys = Arc::new(NodeKeys::new(config.clone(), metrics.clone()));
        let loader = keys.clone();
        // A cache dir or saved key set other users could have written refuses the start.
        tokio::task::spawn_blocking(move || loader.load_saved())
            .await
            .map_err(OpenError::SavedKeySetTask)?
            .map_err(OpenError::SavedKeySet)?;
        let relay = match (&config.node_token_file, config.serve_watch) {
            (Some(path), true) => {
                let token = crate::upstream::load_node_token(path).map_err(UpstreamError::from)?;
                Some(Arc::new(Relay::new(
                    token,
                    keys.clone(),
                    config.clock.clone(),
                )))
            }
            _ => None,
        };
        let gate = Gate::new(config.unknown_kid_cooldown);
        let cache = VerifyCache::new(config.cache_entries, metrics.cache.clone());
        let combiner = Combiner::new(
            config.verify_batch_max,
            config.verify_batch_window,
            combine::leader_seats(),
            metrics.batch.clone(),
        );
        Ok(Verifier {
            inner: Arc::new(Inner {
                config,
                keys,
                upstream,
                gate,
                metrics,
                cache,
                combiner,
                relay,
            }),
        })
    }

    /// True once the node holds a key set that is not older than `max_stale`.
    pub fn is_ready(&self) -> bool {
        self.inner.keys.current().is_some() && !self.inner.keys.is_stale()
    }

    /// The version of the held key set (0 before any, and for a JWKS URL).
    pub fn version(&self) -> u64 {
        self.inner.keys.version()
    }

    /// Bounds the verified-token cache to `entries` answers (0 turns it off).
    pub fn set_cache_capacity(&self, entries: usize) {
        self.inner.cache.set_capacity(entries);
    }

    /// Answers held by the verified-token cache, and its bound.
    pub fn cache_usage(&self) -> (usize, usize) {
        (self.inner.cache.len(), self.inner.cache.capacity())
    }

    /// Answers served from the verified-token cache since this node started
    /// (`keyfleet_cache_hits_total`), for in-process measurements.
    pub fn cache_hits(&self) -> u64 {
        self.inner.metrics.cache.hits.get()
    }

    /// Verify calls the cache could not answer since this node started
    /// (`keyfleet_cache_misses_total`).
    pub fn cache_misses(&self) -> u64 {
        self.inner.metrics.cache.misses.get()
    }

    /// What the combining of concurrent `Verify` calls into batches has done since this node
    /// started (`keyfleet_verify_batch_*`), for tests and in-process measurements.
    pub fn verify_batches(&self) -> BatchCounts {
        self.inner.combiner.counts()
    }

    /// Sets `--verify-batch-max` (1 turns the combining off) and `--verify-batch-window` of a
    /// running node, for in-process measurements.
    pub fn set_verify_batching(&self, max: usize, window: std::time::Duration) {
        self.inner.combiner.set(max, window);
    }

    /// Serves gRPC on `grpc` and HTTP on `http` and keeps the key set fresh, until `shutdown`
    /// (or until either server fails: both drain, then the refreshes stop).
    pub async fn serve(
        self,
        grpc: TcpListener,
        http: TcpListener,
        shutdown: CancellationToken,
    ) -> Result<(), ServeError> {
        // The node's own token: cancelled on shutdown, or by `serve_pair` when either server
        // ends; the refreshers stop with it.
        let stop = shutdown.child_token();
        let background = stop.clone();
        let mut tasks = self.spawn_refreshers(&background);
        // Room for a token of max_token_bytes (refused as TOO_LARGE, not as a transport error)
        // while a megabyte-sized request is refused before it is buffered.
        let max_request = self.inner.config.max_token_bytes.saturating_add(64 * 1024);
        let server = VerifierServer::new(self.clone()).max_decoding_message_size(max_request);
        // Envoy's ext_authz `Check` (`node/ext_authz.rs`): the same verify path, the same
        // transport limits and serve budget as `Verify`.
        let ext_authz = AuthorizationServer::new(ext_authz::ExtAuthz(self.clone()))
            .max_decoding_message_size(ext_authz::MAX_CHECK_REQUEST_BYTES + max_request);
        let mut routes = Routes::new(server).add_service(ext_authz);
        if let Some(relay) = &self.inner.relay {
            relay.start(background.clone());
            routes = routes.add_service(
                AuthorityServer::new(RelayService(relay.clone()))
                    .max_decoding_message_size(MAX_REQUEST_BYTES),
            );
            tasks.push(tokio::spawn(relay_sweeper(
                relay.clone(),
                background.clone(),
            )));
        }
        let (routes, health) = with_health_and_reflection(routes, SERVICE).await?;
        let routes = keyfleet_runtime::rpc_trace::traced(routes, self.labels());
        let node = Arc::downgrade(&self.inner);
        keyfleet_runtime::metrics_bridge::export(&self.labels().attributes(), move || {
            node.upgrade()
                .map(|inner| Verifier { inner }.render_metrics())
        });
        // gRPC health follows readiness: NOT_SERVING until the first key set.
        let mut ready = self.inner.keys.ready();
        if !*ready.borrow() {
            health
                .set_service_status(SERVICE, tonic_health::ServingStatus::NotServing)
                .await;
            let cancelled = background.clone();
            tasks.push(tokio::spawn(async move {
                tokio::select! {
                    _ = cancelled.cancelled() => {}
                    true = async { ready.wait_for(|r| *r).await.is_ok() } => {
                        health.set_service_status(SERVICE, tonic_health::ServingStatus::Serving).await;
                    }
                }
            }));
        }
        tracing::info!(
            node_id = %self.inner.config.node_id,
            region = %self.inner.config.region,
            grpc = ?grpc.local_addr().ok(),
            http = ?http.local_addr().ok(),
            "verifier serving"
        );
        let transport = Transport {
            tls: self.inner.config.tls.clone(),
            limits: self.inner.config.limits.clone(),
            shed: self.inner.metrics.shed.clone(),
        };
        let served = serve_pair(grpc, routes, http, self.router(), &transport, stop).await;
        background.cancel();
        for task in tasks {
            let _ = task.await;
        }
        served
    }

    /// What every RPC span and exported metric of this node carries.
    fn labels(&self) -> ServerLabels {
        ServerLabels {
            role: "verifier",
            node_id: self.inner.config.node_id.clone(),
            region: self.inner.config.region.clone(),
        }
    }
}

/// Ends a relay's streams while its own set is stale, until `shutdown`.
async fn relay_sweeper(relay: Arc<Relay>, shutdown: CancellationToken) {
    let mut ticks = tokio::time::interval(crate::relay::STALE_CHECK);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticks.tick() => relay.end_streams_if_stale(),
        }
    }
}
