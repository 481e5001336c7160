//! The verifier node's typed configuration, validated once by [`Config::check`].

use std::path::PathBuf;
use std::time::Duration;

use keyfleet_runtime::Clock;
use keyfleet_runtime::limits::Limits;
use keyfleet_runtime::tls::{ClientTls, ServerTls};

/// Where the node gets its public keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A keyfleet authority over gRPC (`http://host:port`, or `https://` for TLS): push stream
    /// plus pulls.
    Authority { url: String },
    /// Any standard JWKS document over HTTP(S) (`https://host/jwks.json`): periodic pulls.
    JwksUrl { url: String },
}

impl Source {
    pub fn url(&self) -> &str {
        match self {
            Source::Authority { url } | Source::JwksUrl { url } => url,
        }
    }
}

/// Everything a verifier node needs to run.
#[derive(Debug, Clone)]
pub struct Config {
    pub source: Source,
    /// Required `iss`. Needed for [`Source::JwksUrl`]; learned from the snapshot otherwise.
    pub issuer: Option<String>,
    /// Audience every token must name (in addition to the one a caller asks for).
    pub audience: Option<String>,
    /// Clock skew allowed on `exp`, `nbf` and `iat`.
    pub leeway: Duration,
    /// Periodic pull, the fallback for a broken push stream (and the only refresh of a JWKS URL).
    pub refresh_interval: Duration,
    /// At most one unknown-`kid` refresh per this interval.
    pub unknown_kid_cooldown: Duration,
    /// A key set older than this is not trusted: `Verify` answers `UNAVAILABLE`.
    pub max_stale: Duration,
    /// Where the last good key set is kept across restarts.
    pub cache_dir: Option<PathBuf>,
    /// Bound of the verified-token cache, in answers (0 turns it off).
    pub cache_entries: usize,
    pub node_id: String,
    pub region: String,
    /// Tokens longer than this are refused before any parsing.
    pub max_token_bytes: usize,
    /// When set, a token may not live longer than this (`exp - iat`, or `exp - now`).
    pub max_lifetime: Option<Duration>,
    /// TLS (and mTLS with a client CA) on both listeners; plaintext when `None`.
    pub tls: Option<ServerTls>,
    /// What the node trusts (`--authority-ca`) and presents when it calls an `https://` source.
    pub source_tls: ClientTls,
    /// gRPC transport limits and load shedding.
    pub limits: Limits,
    pub clock: Clock,
}

impl Config {
    /// The design's defaults for `source`.
    pub fn new(source: Source) -> Config {
        Config {
            source,
            issuer: None,
            audience: None,
            leeway: Duration::from_secs(60),
            refresh_interval: Duration::from_secs(5 * 60),
            unknown_kid_cooldown: Duration::from_secs(5),
            max_stale: Duration::from_secs(24 * 60 * 60),
            cache_dir: None,
            cache_entries: crate::cache::DEFAULT_CACHE_ENTRIES,
            node_id: "verifier".to_owned(),
            region: "default".to_owned(),
            max_token_bytes: 8 * 1024,
            max_lifetime: None,
            tls: None,
            source_tls: ClientTls::default(),
            limits: Limits::default(),
            clock: Clock::system(),
        }
    }

    /// Defaults for tests: node `test-node` in region `test`, short intervals.
    pub fn for_test(source: Source) -> Config {
        Config {
            refresh_interval: Duration::from_secs(1),
            unknown_kid_cooldown: Duration::from_millis(200),
            max_stale: Duration::from_secs(60 * 60),
            node_id: "test-node".to_owned(),
            region: "test".to_owned(),
            ..Config::new(source)
        }
    }

    /// Refuses a configuration the node cannot run with.
    pub fn check(&self) -> Result<(), ConfigError> {
        let url = self.source.url();
        if !url.starts_with("http://") && !url.starts_with("https://") {
            return Err(ConfigError::BadUrl(url.to_owned()));
        }
        if url.starts_with("http://") && !self.source_tls.is_default() {
            return Err(ConfigError::TlsOnPlainUrl(url.to_owned()));
        }
        if self.max_lifetime.is_some_and(|d| d.is_zero()) {
            return Err(ConfigError::Zero("max lifetime"));
        }
        if self.limits.max_inflight == 0 {
            return Err(ConfigError::Zero("max in-flight requests"));
        }
        if matches!(self.source, Source::JwksUrl { .. })
            && self.issuer.as_deref().is_none_or(str::is_empty)
        {
            return Err(ConfigError::IssuerRequired);
        }
        if self.issuer.as_deref() == Some("") {
            return Err(ConfigError::Empty("issuer"));
        }
        if self.audience.as_deref() == Some("") {
            return Err(ConfigError::Empty("audience"));
        }
        if self.node_id.is_empty() {
            return Err(ConfigError::Empty("node id"));
        }
        for (name, value) in [
            ("refresh interval", self.refresh_interval),
            ("max stale", self.max_stale),
        ] {
            if value.is_zero() {
                return Err(ConfigError::Zero(name));
            }
        }
        if self.max_token_bytes == 0 {
            return Err(ConfigError::Zero("max token bytes"));
        }
        Ok(())
    }
}

/// Why a [`Config`] was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(
        "a verifier fed by --jwks-url needs --issuer (a JWKS document does not name its issuer)"
    )]
    IssuerRequired,
    #[error("source url {0:?} is not an http:// or https:// url")]
    BadUrl(String),
    #[error(
        "--authority-ca or a client certificate is set but the source url {0:?} is plain http: use https://"
    )]
    TlsOnPlainUrl(String),
    #[error("{0} may not be empty")]
    Empty(&'static str),
    #[error("{0} may not be zero")]
    Zero(&'static str),
}
