//! The verifier node's typed configuration, its defaults (`DEFAULT_*`, also the CLI's), and
//! its validation: [`Config::check`] is the one place a configuration is judged.

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
    /// The audiences this node guards: a token must name at least one of them (and also the
    /// one a caller asks for). Empty only together with `any_audience`.
    pub audiences: Vec<String>,
    /// Accept tokens for any audience: the explicit opposite of `audiences`. A node must be
    /// given one or the other, so that no verifier accepts every audience by omission.
    pub any_audience: bool,
    /// Clock skew allowed on `exp`, `nbf` and `iat` (whole seconds count).
    pub leeway: Duration,
    /// Periodic pull, the fallback for a broken push stream (and the only refresh of a JWKS URL).
    pub refresh_interval: Duration,
    /// At most one unknown-`kid` refresh per this interval.
    pub unknown_kid_cooldown: Duration,
    /// A key set older than this is not trusted: `Verify` answers `UNAVAILABLE`.
    pub max_stale: Duration,
    /// `--cache-dir`: where the saved key set (the last good one, `jwks-cache.json`) is kept
    /// across restarts. Not the verified-token cache, which lives in memory only.
    pub cache_dir: Option<PathBuf>,
    /// Bound of the verified-token cache, in answers (0 turns it off).
    pub cache_entries: usize,
    /// `--verify-batch-max`: most concurrent `Verify` calls whose signatures are checked in
    /// one Ed25519 batch (1 turns the combining off). At most [`crate::MAX_BATCH`].
    pub verify_batch_max: usize,
    /// `--verify-batch-window`: longest a batch's leader waits for requests already on their
    /// way to it (never when none is); zero never waits. At most [`MAX_VERIFY_BATCH_WINDOW`].
    pub verify_batch_window: Duration,
    pub node_id: String,
    pub region: String,
    /// Tokens longer than this are refused before any parsing.
    pub max_token_bytes: usize,
    /// When set, a token may not live longer than this (`exp - iat`, or `exp - now`).
    /// [`DEFAULT_MAX_LIFETIME`] unless turned off with `None`.
    pub max_lifetime: Option<Duration>,
    /// TLS (and mTLS with a client CA) on both listeners; plaintext when `None`.
    pub tls: Option<ServerTls>,
    /// What the node trusts (`--authority-ca`) and presents when it calls an `https://` source.
    pub source_tls: ClientTls,
    /// The fleet credential (`--node-token-file`, the authority's `<data-dir>/node.token`),
    /// sent as `authorization: Bearer …` on `WatchJwks` and `GetJwks`. Without it an authority
    /// refuses the watch stream and sends public keys only (no deny lists).
    pub node_token_file: Option<PathBuf>,
    /// `--serve-watch`: also serve `GetJwks` and `WatchJwks` on the gRPC port, as a relay for
    /// downstream verifiers (which point `--authority` at this node). Needs an authority source
    /// and the fleet credential, which downstream callers must present too.
    pub serve_watch: bool,
    /// gRPC transport limits and load shedding.
    pub limits: Limits,
    pub clock: Clock,
    /// `--authz-header`: the request header Envoy's ext_authz `Check` and HTTP `/auth` read
    /// the bearer token from (lower case; [`DEFAULT_AUTHZ_HEADER`]).
    pub authz_header: String,
    /// `--claim-header CLAIM=HEADER` (repeatable): claims passed upstream as headers by
    /// ext_authz and `/auth` when a token is allowed.
    pub claim_headers: Vec<ClaimHeader>,
    /// `--keep-authorization`: ext_authz leaves the token's header on the request it allows
    /// (by default it is removed, so upstreams never see the raw token).
    pub keep_authorization: bool,
}

/// `--authz-header`'s default.
pub const DEFAULT_AUTHZ_HEADER: &str = "authorization";

/// One `--claim-header CLAIM=HEADER`: the token's top-level claim `claim` goes upstream in
/// header `header` (a string as it is, any other JSON value as JSON; control characters
/// dropped). The header name is kept in lower case.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimHeader {
    pub claim: String,
    pub header: String,
}

/// Headers a `--claim-header` may not set: hop-by-hop and framing headers, and the ones
/// ext_authz and `/auth` set themselves.
const RESERVED_HEADERS: [&str; 16] = [
    "connection",
    "content-length",
    "content-type",
    "host",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "www-authenticate",
    "x-keyfleet-subject",
    "x-keyfleet-kid",
    "x-keyfleet-reason",
    "remote-user",
];

impl std::str::FromStr for ClaimHeader {
    type Err = ConfigError;

    /// Parses `CLAIM=HEADER`.
    fn from_str(s: &str) -> Result<ClaimHeader, ConfigError> {
        let bad = |why: &'static str| ConfigError::BadClaimHeader {
            value: s.to_owned(),
            why,
        };
        let (claim, header) = s.split_once('=').ok_or_else(|| bad("no '='"))?;
        if claim.is_empty() || claim.len() > 128 || claim.chars().any(char::is_control) {
            return Err(bad("the claim name must be 1 to 128 printable characters"));
        }
        let header = header.to_ascii_lowercase();
        let tchar = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
        if header.is_empty() || header.len() > 128 || !header.bytes().all(tchar) {
            return Err(bad(
                "the header name must be 1 to 128 of A-Z a-z 0-9 and !#$%&'*+-.^_`|~",
            ));
        }
        if RESERVED_HEADERS.contains(&header.as_str()) || header.starts_with("x-auth-request-") {
            return Err(bad(
                "that header is hop-by-hop, framing, or one keyfleet sets itself",
            ));
        }
        Ok(ClaimHeader {
            claim: claim.to_owned(),
            header,
        })
    }
}

/// Longest token lifetime a node accepts unless configured otherwise (`--max-lifetime`): a
/// token meant to live for years is a stolen-forever credential, whoever signed it.
pub const DEFAULT_MAX_LIFETIME: Duration = Duration::from_secs(24 * 60 * 60);
/// `--leeway`: keyfleet-core's default clock skew, which the authority also plans rotations with.
pub const DEFAULT_LEEWAY: Duration = Duration::from_secs(keyfleet_core::DEFAULT_LEEWAY_SECS as u64);
/// `--refresh-interval`: the fallback pull behind the push stream (and a JWKS URL's only refresh).
pub const DEFAULT_REFRESH_INTERVAL: Duration = Duration::from_secs(5 * 60);
/// `--unknown-kid-cooldown`: at most one unknown-kid refresh this often (see `gate.rs`).
pub const DEFAULT_UNKNOWN_KID_COOLDOWN: Duration = Duration::from_secs(5);
/// `--max-stale`: how long a node keeps verifying from its last good key set while the source
/// is unreachable, before it answers UNAVAILABLE (fail closed).
pub const DEFAULT_MAX_STALE: Duration = Duration::from_secs(24 * 60 * 60);
/// `--verify-batch-max`: concurrent `Verify` calls checked in one Ed25519 batch at most.
pub const DEFAULT_VERIFY_BATCH_MAX: usize = 64;
/// `--verify-batch-window`: a leader waits at most this for requests about to join its batch;
/// a lone request never waits.
pub const DEFAULT_VERIFY_BATCH_WINDOW: Duration = Duration::from_micros(50);
/// The largest `--verify-batch-window` accepted: it bounds what a request may wait for others.
pub const MAX_VERIFY_BATCH_WINDOW: Duration = Duration::from_millis(10);
/// The node id of [`Config::new`] (the binary names a node `verifier-<grpc port>` instead).
pub const DEFAULT_NODE_ID: &str = "verifier";
/// `--region`.
pub const DEFAULT_REGION: &str = "default";

impl Config {
    /// The design's defaults for `source`. No audience policy is chosen: set `audiences` or
    /// `any_audience`, or [`Config::check`] refuses the configuration.
    pub fn new(source: Source) -> Config {
        Config {
            source,
            issuer: None,
            audiences: Vec::new(),
            any_audience: false,
            leeway: DEFAULT_LEEWAY,
            refresh_interval: DEFAULT_REFRESH_INTERVAL,
            unknown_kid_cooldown: DEFAULT_UNKNOWN_KID_COOLDOWN,
            max_stale: DEFAULT_MAX_STALE,
            cache_dir: None,
            cache_entries: crate::cache::DEFAULT_CACHE_ENTRIES,
            verify_batch_max: DEFAULT_VERIFY_BATCH_MAX,
            verify_batch_window: DEFAULT_VERIFY_BATCH_WINDOW,
            node_id: DEFAULT_NODE_ID.to_owned(),
            region: DEFAULT_REGION.to_owned(),
            max_token_bytes: keyfleet_core::DEFAULT_MAX_TOKEN_BYTES,
            max_lifetime: Some(DEFAULT_MAX_LIFETIME),
            tls: None,
            source_tls: ClientTls::default(),
            node_token_file: None,
            serve_watch: false,
            limits: Limits::default(),
            clock: Clock::system(),
            authz_header: DEFAULT_AUTHZ_HEADER.to_owned(),
            claim_headers: Vec::new(),
            keep_authorization: false,
        }
    }

    /// Defaults for tests: node `test-node` in region `test`, short intervals, any audience
    /// (a test about audiences sets `audiences` and turns `any_audience` off).
    pub fn for_test(source: Source) -> Config {
        Config {
            any_audience: true,
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
        match (self.audiences.is_empty(), self.any_audience) {
            (true, false) => return Err(ConfigError::NoAudiencePolicy),
            (false, true) => return Err(ConfigError::AudienceConflict),
            _ => {}
        }
        if self.audiences.iter().any(String::is_empty) {
            return Err(ConfigError::Empty("audience"));
        }
        // Both reach logs, metrics labels and the authority's fleet view.
        for (flag, value) in [("--node-id", &self.node_id), ("--region", &self.region)] {
            if !keyfleet_core::is_valid_label(value) {
                return Err(ConfigError::BadLabel {
                    flag,
                    value: value.clone(),
                });
            }
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
        if self.verify_batch_max == 0 {
            return Err(ConfigError::Zero("--verify-batch-max"));
        }
        if self.verify_batch_max > crate::MAX_BATCH {
            return Err(ConfigError::VerifyBatchTooLarge(self.verify_batch_max));
        }
        if self.verify_batch_window > MAX_VERIFY_BATCH_WINDOW {
            return Err(ConfigError::VerifyBatchWindowTooLong(
                self.verify_batch_window,
            ));
        }
        if self.serve_watch {
            if !matches!(self.source, Source::Authority { .. }) {
                return Err(ConfigError::ServeWatchNeedsAuthority);
            }
            if self.node_token_file.is_none() {
                return Err(ConfigError::ServeWatchNeedsNodeToken);
            }
        }
        let authz: ClaimHeader = format!("authz={}", self.authz_header)
            .parse()
            .map_err(|_| ConfigError::BadAuthzHeader(self.authz_header.clone()))?;
        if authz.header != self.authz_header {
            return Err(ConfigError::BadAuthzHeader(self.authz_header.clone()));
        }
        let mut seen = std::collections::HashSet::new();
        for mapping in &self.claim_headers {
            // Also catches a mapping built without `FromStr`.
            let spec = format!("{}={}", mapping.claim, mapping.header);
            match spec.parse::<ClaimHeader>() {
                Err(e) => return Err(e),
                Ok(parsed) if parsed != *mapping => {
                    return Err(ConfigError::BadClaimHeader {
                        value: spec,
                        why: "the header name must be lower case",
                    });
                }
                Ok(_) => {}
            }
            if mapping.header == self.authz_header || !seen.insert(mapping.header.as_str()) {
                return Err(ConfigError::BadClaimHeader {
                    value: spec,
                    why: "the header is the token's own (--authz-header) or named twice",
                });
            }
        }
        if let (Source::Authority { .. }, Some(path)) = (&self.source, &self.node_token_file) {
            crate::upstream::load_node_token(path)?;
        }
        // Whoever can write the saved key set could plant keys the node trusts while its
        // source is unreachable: the directory and the file must be this user's alone.
        if let Some(dir) = &self.cache_dir {
            crate::saved::check(dir)?;
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
    #[error(
        "a verifier needs an audience policy: pass --audience NAME (repeatable) for the services it guards, or --any-audience to accept tokens for any audience"
    )]
    NoAudiencePolicy,
    #[error(
        "--audience and --any-audience contradict each other: keep --audience NAME for the services this node guards, or only --any-audience"
    )]
    AudienceConflict,
    #[error("{flag} {value:?} is not valid: use 1 to 128 of the characters A-Z a-z 0-9 . _ : -")]
    BadLabel { flag: &'static str, value: String },
    #[error(transparent)]
    NodeToken(#[from] crate::upstream::NodeTokenError),
    #[error("{0} may not be empty")]
    Empty(&'static str),
    /// `--cache-dir` or the saved key set in it (`jwks-cache.json`) is open to other users,
    /// theirs, or a link.
    #[error(transparent)]
    InsecureSavedKeySet(#[from] keyfleet_runtime::secure_fs::SecureFsError),
    #[error("{0} may not be zero")]
    Zero(&'static str),
    #[error(
        "--serve-watch relays a keyfleet authority's key set: it needs --authority (a --jwks-url source has no versions or deltas to relay)"
    )]
    ServeWatchNeedsAuthority,
    #[error(
        "--serve-watch needs --node-token-file: the relay sends the fleet credential upstream and requires the same one from the verifiers behind it"
    )]
    ServeWatchNeedsNodeToken,
    #[error("--verify-batch-max {0} is more than {max}", max = crate::MAX_BATCH)]
    VerifyBatchTooLarge(usize),
    #[error(
        "--verify-batch-window {0:?} is longer than {max:?} (it bounds how long a request may wait for others)",
        max = MAX_VERIFY_BATCH_WINDOW
    )]
    VerifyBatchWindowTooLong(Duration),
    #[error(
        "--claim-header {value:?} is not valid: {why} (the form is CLAIM=HEADER, e.g. email=x-user-email)"
    )]
    BadClaimHeader { value: String, why: &'static str },
    #[error(
        "--authz-header {0:?} is not valid: name one lower-case header that is not hop-by-hop (the default is \"authorization\")"
    )]
    BadAuthzHeader(String),
}
