//! The authority's configuration: its defaults (`DEFAULT_*`, one place for each), and
//! [`Config::check`], every check that needs no disk (run by `Authority::open` before it
//! touches anything).

use std::path::{Path, PathBuf};
use std::time::Duration;

use keyfleet_core::RingPolicy;
use keyfleet_runtime::Clock;
use keyfleet_runtime::limits::Limits;
use keyfleet_runtime::tls::ServerTls;

use crate::kek::Kek;

/// `--issuer` unless configured: the `iss` of every token.
pub const DEFAULT_ISSUER: &str = "keyfleet";
/// The admin credential's file name in the data directory (unless `--admin-token-file`).
pub const ADMIN_TOKEN_FILE: &str = "admin.token";
/// The fleet credential's file name in the data directory (unless `--node-token-file`).
pub const NODE_TOKEN_FILE: &str = "node.token";
/// `--max-watchers`: open `WatchJwks` streams the authority serves at most.
pub const DEFAULT_MAX_WATCHERS: usize = 10_000;
/// Open `WatchJwks` streams one peer address may hold. A tenth of the overall cap: enough for a
/// large region behind one NAT address, while one address (a leaked fleet credential, a
/// runaway client) cannot take every slot.
pub const DEFAULT_MAX_WATCHERS_PER_PEER: usize = 1_000;
/// `--admin-rate`: key-management calls per second by authenticated callers.
pub const DEFAULT_ADMIN_RATE: u32 = 10;
/// A watcher not heard from this long does not hold back a promotion.
pub const DEFAULT_WATCHER_TIMEOUT: Duration = Duration::from_secs(30);
/// Period of the lifecycle tick (promotion, retirement, scheduled rotation).
pub const DEFAULT_TICK_INTERVAL: Duration = Duration::from_secs(1);
/// `--session-idle`: a session not refreshed for this long ends.
pub const DEFAULT_SESSION_IDLE: Duration = Duration::from_secs(14 * 24 * 3600);
/// `--session-max`: a session ends this long after its login, refreshed or not.
pub const DEFAULT_SESSION_MAX: Duration = Duration::from_secs(90 * 24 * 3600);
/// `--refresh-reuse-grace`: how long the immediately previous refresh token may be presented
/// again (a client whose answer was lost retries); 0 turns the window off.
pub const DEFAULT_REFRESH_REUSE_GRACE: Duration = Duration::from_secs(10);

/// The lifetimes of sessions, in seconds (see the `DEFAULT_SESSION_*` constants).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionPolicy {
    /// `--session-idle`.
    pub idle: i64,
    /// `--session-max`.
    pub max: i64,
    /// `--refresh-reuse-grace` (0: off).
    pub reuse_grace: i64,
}

impl Default for SessionPolicy {
    fn default() -> SessionPolicy {
        SessionPolicy {
            idle: DEFAULT_SESSION_IDLE.as_secs() as i64,
            max: DEFAULT_SESSION_MAX.as_secs() as i64,
            reuse_grace: DEFAULT_REFRESH_REUSE_GRACE.as_secs() as i64,
        }
    }
}

/// The authority's configuration, validated by [`Config::check`] (which [`crate::Authority::open`]
/// runs first).
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
    /// Session lifetimes and the refresh-token reuse grace window.
    pub sessions: SessionPolicy,
    /// Session-store operations one commit carries at most (group commit; 1: a commit each).
    pub session_batch: usize,
}

/// A configuration the authority refuses before it touches the disk.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// Unsafe lifecycle timings; the message names the flag.
    #[error("{0}")]
    Policy(String),
    #[error("--issuer must not be empty")]
    EmptyIssuer,
    #[error("the tick interval and watcher timeout must be positive")]
    ZeroInterval,
    #[error("--max-watchers and the per-peer cap must be at least 1")]
    NoWatchers,
    #[error("--admin-rate must be at least 1")]
    NoAdminRate,
    #[error(
        "--session-idle and --session-max must be at least 1s, and --refresh-reuse-grace at most 5m (it lets a spent refresh token be presented again)"
    )]
    SessionLifetimes,
    #[error(
        "the fleet credential (--node-token-file) and the admin credential (--admin-token-file) are the same file {}: verifiers would hold admin power; give each its own file",
        .path.display()
    )]
    SameTokenFiles { path: PathBuf },
}

impl Config {
    /// The design's defaults (the `DEFAULT_*` constants here and `RingPolicy::default()`:
    /// `--token-ttl 15m`, `--rotation-period 24h`, `--publish-ahead 10m`, leeway 60s) with the
    /// key ring and both token files in `data_dir`.
    pub fn new(data_dir: &Path) -> Config {
        Config {
            data_dir: data_dir.to_owned(),
            issuer: DEFAULT_ISSUER.into(),
            admin_token_file: data_dir.join(ADMIN_TOKEN_FILE),
            node_token_file: data_dir.join(NODE_TOKEN_FILE),
            max_watchers: DEFAULT_MAX_WATCHERS,
            max_watchers_per_peer: DEFAULT_MAX_WATCHERS_PER_PEER,
            policy: RingPolicy::default(),
            kek: None,
            clock: Clock::system(),
            watcher_timeout: DEFAULT_WATCHER_TIMEOUT,
            tick_interval: DEFAULT_TICK_INTERVAL,
            tls: None,
            insecure_admin: false,
            admin_rate: DEFAULT_ADMIN_RATE,
            limits: Limits::default(),
            sessions: SessionPolicy::default(),
            session_batch: crate::sqlite::DEFAULT_MAX_BATCH,
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

    /// Every check that needs no disk: the lifecycle timings, the issuer, the intervals and
    /// caps, and that the two credentials live in different files. (That they hold different
    /// tokens is checked by `Authority::open`, which reads them.)
    pub fn check(&self) -> Result<(), ConfigError> {
        self.policy.check().map_err(ConfigError::Policy)?;
        if self.issuer.trim().is_empty() {
            return Err(ConfigError::EmptyIssuer);
        }
        if self.tick_interval.is_zero() || self.watcher_timeout.is_zero() {
            return Err(ConfigError::ZeroInterval);
        }
        if self.max_watchers == 0 || self.max_watchers_per_peer == 0 {
            return Err(ConfigError::NoWatchers);
        }
        if self.admin_rate == 0 {
            return Err(ConfigError::NoAdminRate);
        }
        let s = self.sessions;
        if s.idle < 1 || s.max < 1 || !(0..=300).contains(&s.reuse_grace) {
            return Err(ConfigError::SessionLifetimes);
        }
        if self.admin_token_file == self.node_token_file {
            return Err(ConfigError::SameTokenFiles {
                path: self.admin_token_file.clone(),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_defaults_pass_and_each_bad_value_is_named() {
        let dir = Path::new("/nonexistent/keyfleet");
        assert_eq!(Config::new(dir).check(), Ok(()));
        assert_eq!(Config::for_test(dir).check(), Ok(()));
        type Spoil = fn(&mut Config);
        let bad: [(&str, Spoil, &str); 9] = [
            ("idle", |c| c.sessions.idle = 0, "--session-idle"),
            (
                "grace",
                |c| c.sessions.reuse_grace = 3600,
                "--refresh-reuse-grace",
            ),
            (
                "policy",
                |c| c.policy.publish_ahead = c.policy.rotation_period,
                "--publish-ahead",
            ),
            (
                "issuer",
                |c| c.issuer = " ".into(),
                "--issuer must not be empty",
            ),
            (
                "tick",
                |c| c.tick_interval = Duration::ZERO,
                "must be positive",
            ),
            (
                "timeout",
                |c| c.watcher_timeout = Duration::ZERO,
                "must be positive",
            ),
            (
                "watchers",
                |c| c.max_watchers_per_peer = 0,
                "--max-watchers",
            ),
            ("admin rate", |c| c.admin_rate = 0, "--admin-rate"),
            (
                "same files",
                |c| c.node_token_file = c.admin_token_file.clone(),
                "are the same file",
            ),
        ];
        for (what, spoil, want) in bad {
            let mut config = Config::new(dir);
            spoil(&mut config);
            let err = config.check().expect_err(what);
            assert!(err.to_string().contains(want), "{what}: {err}");
        }
    }
}
