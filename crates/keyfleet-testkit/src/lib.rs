//! Shared setup for keyfleet's tests, used only as a dev-dependency: each module is one job a
//! test would otherwise write again.
//!
//! - [`eventually`]: poll a condition until it holds, bounded (async, and blocking for tests
//!   that drive processes).
//! - [`http`]: a raw HTTP/1.1 GET (status, headers, body), async and blocking.
//! - [`grpc`]: a request with a bearer credential (or any `authorization`), a lazy channel.
//! - [`files`]: private (0600) files, modes and owners, the other user, a bait file.
//! - [`tls`]: a test CA and the server and client certificates it issues (rcgen).
//! - [`serve`]: a server on loopback port 0 (a pair of gRPC and HTTP listeners, or one fake),
//!   cancelled on drop, stopped with a check that it drains.
//! - [`process`]: the `keyfleet` binary as a server process that reports where it listens.

pub mod eventually;
pub mod files;
pub mod grpc;
pub mod http;
pub mod process;
pub mod serve;
pub mod tls;

pub use eventually::{eventually, eventually_some, eventually_within};
