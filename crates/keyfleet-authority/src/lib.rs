//! keyfleet's signing authority: owns the Ed25519 key ring, mints tokens and publishes the
//! JWKS over gRPC (`GetJwks`, the `WatchJwks` push stream) and HTTP.
//!
//! Every change to the ring is persisted (atomically, fsynced) before it is published, so what
//! verifiers have seen is always on disk; a restart publishes exactly the same keys.
//!
//! Where things are: `config.rs` (defaults, checks), `open.rs` (startup), `serve.rs` (servers,
//! lifecycle loop), `commit.rs` (the only writer of `keyring.json`), `ops.rs` (what the RPCs
//! do), `grpc.rs`/`http.rs` (the APIs), `record.rs` (the file's versioned layout),
//! `ring_file.rs` (the file itself), `keys.rs` (private keys), `convert.rs` (ring → proto),
//! `admin.rs`/`guard.rs` (credentials, admin rules), `kek.rs` (sealing), `metrics.rs`,
//! `client.rs` (the admin client). Persistent login: `sessions.rs` (the session RPCs, refresh
//! tokens, publishing ended sessions), `session_store.rs` (the store trait and the refresh
//! rule), `sqlite.rs` (the embedded store, `sessions.db`). The fleet view and the watch-stream driver are
//! `keyfleet_feed::watch`, shared with relays.

mod admin;
mod authority;
pub mod client;
mod commit;
mod config;
mod convert;
mod error;
mod grpc;
mod guard;
mod http;
mod kek;
mod keys;
mod metrics;
mod open;
mod ops;
mod record;
mod ring_file;
mod serve;
pub mod session_store;
mod sessions;
pub mod sqlite;

pub use authority::Authority;
pub use config::{
    ADMIN_TOKEN_FILE, Config, ConfigError, DEFAULT_ADMIN_RATE, DEFAULT_ISSUER,
    DEFAULT_MAX_WATCHERS, DEFAULT_MAX_WATCHERS_PER_PEER, DEFAULT_REFRESH_REUSE_GRACE,
    DEFAULT_SESSION_IDLE, DEFAULT_SESSION_MAX, DEFAULT_TICK_INTERVAL, DEFAULT_WATCHER_TIMEOUT,
    NODE_TOKEN_FILE, SessionPolicy,
};
pub use error::{OpenError, ServeError};
pub use kek::{Kek, KekError};
pub use ring_file::KEYRING_FILE;
