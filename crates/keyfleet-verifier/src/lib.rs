//! keyfleet's stateless verifier node: caches the authority's public keys by `kid` (push stream,
//! periodic pull, coalesced unknown-kid refresh, on-disk cache) and answers `Verify` from them
//! without ever calling the authority for a known kid.

mod cache;
mod config;
mod gate;
mod metrics;
mod node;
mod store;
mod upstream;

pub use cache::DEFAULT_CACHE_ENTRIES;
pub use config::{Config, ConfigError, DEFAULT_MAX_LIFETIME, Source};
pub use keyfleet_runtime::CancellationToken;
pub use node::MAX_BATCH;
pub use node::Verifier;
pub use store::CACHE_FILE;
pub use upstream::{MIN_NODE_TOKEN_BYTES, NodeTokenError};

use tokio::net::TcpListener;

/// Runs a verifier node on already-bound listeners until `shutdown` is cancelled. A bad
/// `config` is an immediate error.
pub async fn run(
    grpc: TcpListener,
    http: TcpListener,
    config: Config,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    Verifier::open(config)
        .await?
        .serve(grpc, http, shutdown)
        .await
}
