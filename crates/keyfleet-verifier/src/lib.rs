//! keyfleet's stateless verifier node: holds the authority's public keys by `kid` (push stream,
//! periodic pull, coalesced unknown-kid refresh, a saved copy on disk) and answers `Verify`
//! from them without ever calling the authority for a known kid.
//!
//! Where things are: `node.rs` the handle (open, serve) with `node/decide.rs` (the verify
//! path), `node/combine.rs` (concurrent `Verify` calls checked as one batch),
//! `node/signatures.rs` (batched Ed25519 checks that answer as `verify_strict`),
//! `node/batch.rs` (`VerifyBatch`), `node/refresh.rs` (push, pull, JWKS URL polling),
//! `node/http.rs` (metrics, healthz, readyz); `keyset.rs` the key set in use; `saved.rs` the
//! saved key set in `--cache-dir`; `cache.rs` the verified-token cache; `gate.rs` the
//! unknown-kid refresh gate (cool-down and wait); `upstream.rs` the client to the source;
//! `config.rs` the configuration, its defaults and its check; `metrics.rs` the metrics;
//! `relay.rs` the relay side (`--serve-watch`: `GetJwks`/`WatchJwks` for downstream verifiers).

mod cache;
mod config;
mod gate;
mod keyset;
mod metrics;
mod node;
mod relay;
mod saved;
mod upstream;

pub use cache::DEFAULT_CACHE_ENTRIES;
pub use config::{
    Config, ConfigError, DEFAULT_LEEWAY, DEFAULT_MAX_LIFETIME, DEFAULT_MAX_STALE, DEFAULT_NODE_ID,
    DEFAULT_REFRESH_INTERVAL, DEFAULT_REGION, DEFAULT_UNKNOWN_KID_COOLDOWN,
    DEFAULT_VERIFY_BATCH_MAX, DEFAULT_VERIFY_BATCH_WINDOW, MAX_VERIFY_BATCH_WINDOW, Source,
};
pub use keyfleet_runtime::CancellationToken;
pub use keyfleet_runtime::serve::ServeError;
pub use node::{BatchCounts, MAX_BATCH, OpenError, RunError, Verifier};
pub use saved::SAVED_KEY_SET_FILE;
pub use upstream::{MIN_NODE_TOKEN_BYTES, NodeTokenError, UpstreamError};
// Proxies (issue 16): Envoy ext_authz and HTTP forward-auth settings.
pub use config::{ClaimHeader, DEFAULT_AUTHZ_HEADER};

use tokio::net::TcpListener;

/// Runs a verifier node on already-bound listeners until `shutdown` is cancelled. A bad
/// `config` is an immediate error.
pub async fn run(
    grpc: TcpListener,
    http: TcpListener,
    config: Config,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    Verifier::open(config)
        .await?
        .serve(grpc, http, shutdown)
        .await?;
    Ok(())
}
