//! A Rust client for keyfleet: verify bearer tokens from a Rust service, through the fleet or
//! in-process.
//!
//! - [`VerifierPool`]: `Verify` over many verifier nodes (a static list, or a DNS name
//!   re-resolved), balanced by power of two choices on in-flight calls, with a failing node
//!   ejected and probed back, and **hedging**: a request not answered after the pool's recent
//!   p95 latency (at least 2 ms, at most 50 ms) is sent to another node too, the first answer
//!   wins and the other call is cancelled. Hedges are at most 10 % of requests. A stopped or
//!   partitioned node costs a few milliseconds, not a timeout.
//! - [`VerifyLayer`]: a tower layer for axum/hyper and tonic services: takes the bearer token,
//!   verifies it under the route's [`Demands`] (audience, scopes, a recent login), puts the
//!   [`VerifiedClaims`] in the request's extensions, and answers 401/403/503 (HTTP) or
//!   `UNAUTHENTICATED`/`PERMISSION_DENIED`/`UNAVAILABLE` (gRPC) itself.
//! - [`LocalVerifier`]: a verifier node inside this process (the verifier crate's own node,
//!   following an authority's watch stream or a JWKS URL), so a verdict costs no network hop;
//!   same key set, revocation and staleness rules, same verdicts.
//!
//! The pool and the local verifier both implement [`TokenVerifier`], which the layer takes.
//!
//! # Example: a pool behind an axum app
//!
//! ```no_run
//! use axum::{Extension, Router, routing::get};
//! use keyfleet_client::{VerifiedClaims, VerifierPool, VerifyLayer};
//!
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! let pool = VerifierPool::builder()
//!     .dns("verifiers.keyfleet.svc.cluster.local", 7000, std::time::Duration::from_secs(10))
//!     .build()
//!     .await?;
//! let app: Router = Router::new()
//!     .route("/me", get(|Extension(c): Extension<VerifiedClaims>| async move { c.subject }))
//!     .layer(VerifyLayer::new(pool).audience("api"));
//! # let _ = app;
//! # Ok(())
//! # }
//! ```
//!
//! # Example: verifying one token
//!
//! ```no_run
//! use keyfleet_client::{Demands, TokenVerifier, VerifierPool, VerifyError};
//!
//! # async fn example(token: &str) -> Result<(), Box<dyn std::error::Error>> {
//! let pool = VerifierPool::builder().urls(["http://127.0.0.1:7000"]).build().await?;
//! let demands = Demands { audience: Some("api".into()), ..Demands::none() };
//! match TokenVerifier::verify(&pool, token, &demands).await {
//!     Ok(claims) => println!("{} until {}", claims.subject, claims.expires_at),
//!     Err(VerifyError::Refused { reason, .. }) => println!("refused: {reason}"),
//!     Err(VerifyError::Unavailable(why)) => println!("try again later: {why}"),
//! }
//! # Ok(())
//! # }
//! ```
//!
//! Where things are: `pool.rs` the pool and its race (first attempt, hedge, retries),
//! `pool/latency.rs` the p95 histogram, `pool/budget.rs` the hedge budget, `pool/discovery.rs`
//! static and DNS endpoints; `layer.rs` the tower layer; `local.rs` the in-process verifier;
//! `verdict.rs` the types they share.

mod layer;
mod local;
mod pool;
mod verdict;

pub use layer::{VerifyLayer, VerifyService};
pub use local::{LocalError, LocalVerifier};
pub use pool::{
    BuildError, Endpoints, NodeStats, PoolBuilder, PoolConfig, PoolError, PoolStats, Resolve,
    SystemResolver, VerifierPool,
};
pub use verdict::{BoxFuture, Demands, TokenVerifier, VerifiedClaims, VerifyError};
