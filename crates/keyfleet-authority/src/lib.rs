//! keyfleet's signing authority: owns the Ed25519 key ring, mints tokens and publishes the
//! JWKS over gRPC (`GetJwks`, the `WatchJwks` push stream) and HTTP.
//!
//! Every change to the ring is persisted (atomically, fsynced) before it is published, so what
//! verifiers have seen is always on disk; a restart publishes exactly the same keys.

mod admin;
mod authority;
mod error;
mod grpc;
mod guard;
mod http;
mod kek;
mod metrics;
mod store;
mod watchers;

use std::path::{Path, PathBuf};
use std::time::Duration;

use keyfleet_core::RingPolicy;
use keyfleet_runtime::Clock;
use keyfleet_runtime::limits::Limits;
use keyfleet_runtime::tls::ServerTls;

pub use authority::Authority;
pub use error::OpenError;
pub use kek::{Kek, KekError};
pub use store::KEYRING_FILE;

/// The fleet credential's file name in the data directory (unless `--node-token-file`).
pub const NODE_TOKEN_FILE: &str = "node.token";
/// `--max-watchers`: open `WatchJwks` streams the authority serves at most.
pub const DEFAULT_MAX_WATCHERS: usize = 10_000;
/// Open `WatchJwks` streams one peer address may hold. A tenth of the overall cap: enough for a
/// large region behind one NAT address, while one address (a leaked fleet credential, a
/// runaway client) cannot take every slot.
pub const DEFAULT_MAX_WATCHERS_PER_PEER: usize = 1_000;

/// The authority's configuration, validated by [`Authority::open`].
#[derive(Debug, Clone)]
pub struct Config {
    /// Holds `keyring.json`.
    pub data_dir: PathBuf,
    /// The `iss` of every token.
    pub issuer: String,
    /// The admin bearer token; created (mode 0600, random) when missing.
    pub admin_token_file: PathBuf,
    /// The fleet credential verifiers send on `WatchJwks` and `GetJwks`; created (mode 0600,
    /// random) when missing. Must differ from the admin token.
    pub node_token_file: PathBuf,
    /// Open watch streams served at most (`--max-watchers`).
    pub max_watchers: usize,
    /// Open watch streams one peer address may hold.
    pub max_watchers_per_peer: usize,
    pub policy: RingPolicy,
    /// When set, private keys are sealed at rest with it.
    pub kek: Option<Kek>,
    pub clock: Clock,
    /// A watcher not heard from this long does not hold back a promotion.
    pub watcher_timeout: Duration,
    /// Period of the lifecycle tick (promotion, retirement, scheduled rotation).
    pub tick_interval: Duration,
    /// TLS (and mTLS with a client CA) on both listeners; plaintext when `None`.
    pub tls: Option<ServerTls>,
    /// Serve admin RPCs over plaintext on a non-loopback listener anyway.
    pub insecure_admin: bool,
    /// Key-management calls by authenticated callers allowed per second; bursts of twice that.
    /// Failed credentials have budgets of their own, per peer.
    pub admin_rate: u32,
    /// gRPC transport limits and load shedding.
    pub limits: Limits,
}

impl Config {
    /// The design's defaults (`--token-ttl 15m`, `--rotation-period 24h`, `--publish-ahead
    /// 10m`, leeway 60s) with the key ring and admin token in `data_dir`.
    pub fn new(data_dir: &Path) -> Config {
        Config {
            data_dir: data_dir.to_owned(),
            issuer: "keyfleet".into(),
            admin_token_file: data_dir.join("admin.token"),
            node_token_file: data_dir.join(NODE_TOKEN_FILE),
            max_watchers: DEFAULT_MAX_WATCHERS,
            max_watchers_per_peer: DEFAULT_MAX_WATCHERS_PER_PEER,
            policy: RingPolicy {
                token_ttl: 15 * 60,
                leeway: 60,
                rotation_period: 24 * 3600,
                publish_ahead: 10 * 60,
            },
            kek: None,
            clock: Clock::system(),
            watcher_timeout: Duration::from_secs(30),
            tick_interval: Duration::from_secs(1),
            tls: None,
            insecure_admin: false,
            admin_rate: 10,
            limits: Limits::default(),
        }
    }

    /// A configuration for tests: the system clock, fast ticks, a 2s publish-ahead, a 60s token
    /// TTL, the token files inside `data_dir`, and a generous admin rate (tests that are about
    /// the rate set their own).
    pub fn for_test(data_dir: &Path) -> Config {
        Config {
            policy: RingPolicy {
                token_ttl: 60,
                leeway: 5,
                rotation_period: 3600,
                publish_ahead: 2,
            },
            watcher_timeout: Duration::from_secs(5),
            tick_interval: Duration::from_millis(50),
            admin_rate: 1000,
            ..Config::new(data_dir)
        }
    }
}
