//! The command line: every command and flag of DESIGN.md, each flag also read from
//! `KEYFLEET_<FLAG>`, with the owning crates' `DEFAULT_*` as defaults; `run` hands each command
//! to its module (`servers`, `client`, `demo`, `loadtest`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use keyfleet_runtime::parse_duration;
use keyfleet_runtime::telemetry::{self, LogFormat};

use crate::{client, demo, servers};

#[derive(Debug, Parser)]
#[command(
    name = "keyfleet",
    version,
    about = "A token-verification cluster: one Ed25519 signing authority, many stateless verifiers",
    long_about = "keyfleet mints short-lived EdDSA JWTs at one signing authority and verifies them on any number \
of stateless verifier nodes that cache the authority's public keys (JWKS). Keys rotate without downtime.\n\n\
Start with `keyfleet demo`: it runs a whole cluster on loopback and shows it working.",
    after_help = "Every flag can also be set with an environment variable KEYFLEET_<FLAG> (for example \
--grpc-listen is KEYFLEET_GRPC_LISTEN). Durations read like 90s, 15m, 24h."
)]
pub struct Cli {
    /// Log format on stderr: text or json (filter with RUST_LOG, e.g. RUST_LOG=keyfleet=debug).
    #[arg(
        long,
        global = true,
        env = "KEYFLEET_LOG_FORMAT",
        default_value = "text"
    )]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a whole cluster on loopback (an authority and 3 verifiers) under a short load: tokens
    /// verified on random nodes across key rotations and a node restart; prints a summary and
    /// writes an HTML report.
    Demo(DemoArgs),
    /// Run the signing authority: owns the keys, mints tokens, publishes the JWKS.
    Authority(AuthorityArgs),
    /// Run a stateless verifier node that answers Verify from cached public keys.
    Verifier(VerifierArgs),
    /// Mint, check and revoke tokens.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Inspect and operate the key ring.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Persistent login: start a session for a user whose password was just checked, refresh
    /// it, end it (logout), end every session of a user, list them.
    #[command(subcommand, long_about = SESSION_ABOUT)]
    Session(SessionCommand),
    /// Load verifiers with Verify traffic (tokens of known verdicts, rotations, node kills) and
    /// report throughput, latency, per-node spread and server cost. Exit 1 on any wrong verdict.
    Loadtest(crate::loadtest::LoadtestArgs),
    /// Ask a server's gRPC health service; exit 0 when SERVING (for container health checks).
    Health {
        /// gRPC URL of the server.
        #[arg(long, env = "KEYFLEET_GRPC", default_value = "http://127.0.0.1:7100")]
        grpc: String,
        /// Service name to ask about (empty: the server as a whole).
        #[arg(long, default_value = "")]
        service: String,
        #[command(flatten)]
        tls: ClientTlsArgs,
    },
}

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// How many verifier nodes to start.
    #[arg(long, env = "KEYFLEET_VERIFIERS_COUNT", default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..=16))]
    pub verifiers: u16,
    /// How many legitimate tokens the load uses (fresh ones replace some as it runs).
    #[arg(long, env = "KEYFLEET_TOKENS", default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=10000))]
    pub tokens: u32,
    /// Where to write the HTML report [default: keyfleet-demo-report.html in the temp dir].
    #[arg(long, env = "KEYFLEET_REPORT_HTML")]
    pub report_html: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct AuthorityArgs {
    /// Address for the gRPC API (Authority, health, reflection).
    #[arg(long, env = "KEYFLEET_GRPC_LISTEN", default_value = "127.0.0.1:7000")]
    pub grpc_listen: SocketAddr,
    /// Address for HTTP (/.well-known/jwks.json, /.well-known/openid-configuration, /metrics).
    #[arg(long, env = "KEYFLEET_HTTP_LISTEN", default_value = "127.0.0.1:7001")]
    pub http_listen: SocketAddr,
    /// Directory holding the key ring (created if missing; keep it on durable storage).
    #[arg(long, env = "KEYFLEET_DATA_DIR", default_value = "keyfleet-data")]
    pub data_dir: PathBuf,
    /// The `iss` written into every token (verifiers fed by this authority learn it).
    #[arg(long, env = "KEYFLEET_ISSUER", default_value = keyfleet_authority::DEFAULT_ISSUER)]
    pub issuer: String,
    /// File with the admin bearer token; created (mode 0600) with a random token if missing.
    /// [default: <data-dir>/admin.token]
    #[arg(long, env = "KEYFLEET_ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<PathBuf>,
    /// File with the fleet credential verifiers must send (their --node-token-file) to watch
    /// the JWKS and receive the deny lists; created (mode 0600) with a random token if missing.
    /// Must differ from the admin token. [default: <data-dir>/node.token]
    #[arg(long, env = "KEYFLEET_NODE_TOKEN_FILE")]
    pub node_token_file: Option<PathBuf>,
    /// Open WatchJwks streams (one per verifier) served at most; more are refused with
    /// RESOURCE_EXHAUSTED.
    #[arg(long, env = "KEYFLEET_MAX_WATCHERS", default_value_t = keyfleet_authority::DEFAULT_MAX_WATCHERS)]
    pub max_watchers: usize,
    /// Open WatchJwks streams one client address may hold (verifiers behind one NAT share it).
    #[arg(long, env = "KEYFLEET_MAX_WATCHERS_PER_PEER", default_value_t = keyfleet_authority::DEFAULT_MAX_WATCHERS_PER_PEER)]
    pub max_watchers_per_peer: usize,
    /// Longest lifetime of a minted token (also the default).
    #[arg(long, env = "KEYFLEET_TOKEN_TTL", default_value = default_secs(keyfleet_core::DEFAULT_TOKEN_TTL_SECS), value_parser = parse_duration)]
    pub token_ttl: Duration,
    /// How long a key signs before the scheduled rotation.
    #[arg(long, env = "KEYFLEET_ROTATION_PERIOD", default_value = default_secs(keyfleet_core::DEFAULT_ROTATION_PERIOD_SECS), value_parser = parse_duration)]
    pub rotation_period: Duration,
    /// Longest wait for every watching verifier to acknowledge a next key before it signs anyway.
    #[arg(long, env = "KEYFLEET_PUBLISH_AHEAD", default_value = default_secs(keyfleet_core::DEFAULT_PUBLISH_AHEAD_SECS), value_parser = parse_duration)]
    pub publish_ahead: Duration,
    /// Clock skew verifiers allow; a retiring key stays published token-ttl + leeway after it stops signing.
    #[arg(long, env = "KEYFLEET_LEEWAY", default_value = default_secs(keyfleet_core::DEFAULT_LEEWAY_SECS), value_parser = parse_duration)]
    pub leeway: Duration,
    /// File with a 32-byte key-encryption key (64 hex chars) that seals private keys at rest.
    /// Or set KEYFLEET_KEK to the key itself.
    #[arg(long, env = "KEYFLEET_KEK_FILE")]
    pub kek_file: Option<PathBuf>,
    #[command(flatten)]
    pub tls: ServerTlsArgs,
    /// Serve admin RPCs (issue, rotate, revoke) over plaintext on a non-loopback listener.
    /// Without it such a listener refuses them unless the caller is on this host.
    #[arg(long, env = "KEYFLEET_INSECURE_ADMIN")]
    pub insecure_admin: bool,
    /// Key rotations and revocations allowed per second with the admin credential (bursts of
    /// twice that). Failed credentials never use it up: they are limited per client address.
    #[arg(long, env = "KEYFLEET_ADMIN_RATE", default_value_t = keyfleet_authority::DEFAULT_ADMIN_RATE)]
    pub admin_rate: u32,
    /// Requests in progress before new ones are refused with RESOURCE_EXHAUSTED (load shedding).
    #[arg(long, env = "KEYFLEET_MAX_INFLIGHT", default_value_t = default_max_inflight(), value_parser = clap::value_parser!(u32).range(1..))]
    pub max_inflight: u32,
    /// How long the immediately previous refresh token of a session may be presented again (a
    /// client whose answer was lost retries); any other spent refresh token ends the session.
    /// 0s turns the window off.
    #[arg(long, env = "KEYFLEET_REFRESH_REUSE_GRACE", default_value = default_duration(keyfleet_authority::DEFAULT_REFRESH_REUSE_GRACE), value_parser = parse_duration)]
    pub refresh_reuse_grace: Duration,
    /// A session not refreshed for this long ends (each refresh extends it).
    #[arg(long, env = "KEYFLEET_SESSION_IDLE", default_value = default_duration(keyfleet_authority::DEFAULT_SESSION_IDLE), value_parser = parse_duration)]
    pub session_idle: Duration,
    /// A session ends this long after its login, refreshed or not.
    #[arg(long, env = "KEYFLEET_SESSION_MAX", default_value = default_duration(keyfleet_authority::DEFAULT_SESSION_MAX), value_parser = parse_duration)]
    pub session_max: Duration,
}

#[derive(Debug, Args)]
pub struct VerifierArgs {
    /// Address for the gRPC API (Verifier, health, reflection).
    #[arg(long, env = "KEYFLEET_GRPC_LISTEN", default_value = "127.0.0.1:7100")]
    pub grpc_listen: SocketAddr,
    /// Address for HTTP (/metrics, /healthz, /readyz).
    #[arg(long, env = "KEYFLEET_HTTP_LISTEN", default_value = "127.0.0.1:7101")]
    pub http_listen: SocketAddr,
    /// gRPC URL of the keyfleet authority to follow (push stream + periodic pull).
    #[arg(
        long,
        env = "KEYFLEET_AUTHORITY",
        required_unless_present = "jwks_url",
        conflicts_with = "jwks_url"
    )]
    pub authority: Option<String>,
    /// Trust any standard JWKS served over HTTP instead of a keyfleet authority (needs --issuer).
    #[arg(long, env = "KEYFLEET_JWKS_URL")]
    pub jwks_url: Option<String>,
    /// Required `iss` (learned from the authority when not set).
    #[arg(long, env = "KEYFLEET_ISSUER")]
    pub issuer: Option<String>,
    /// An audience this node guards: a token must name at least one of them in its `aud`
    /// (refused otherwise with WRONG_AUDIENCE); a caller may require one more per request.
    /// Repeatable; comma-separated in KEYFLEET_AUDIENCE. A verifier needs this or --any-audience.
    #[arg(
        long,
        env = "KEYFLEET_AUDIENCE",
        value_name = "NAME",
        value_delimiter = ','
    )]
    pub audience: Vec<String>,
    /// Accept tokens for any audience (only an audience a caller names per request is checked):
    /// the explicit alternative to --audience, for a node that does not guard particular services.
    #[arg(long, env = "KEYFLEET_ANY_AUDIENCE")]
    pub any_audience: bool,
    /// Clock skew allowed on exp, nbf and iat.
    #[arg(long, env = "KEYFLEET_LEEWAY", default_value = default_duration(keyfleet_verifier::DEFAULT_LEEWAY), value_parser = parse_duration)]
    pub leeway: Duration,
    /// Periodic pull of the key set, the fallback when the push stream is down.
    #[arg(long, env = "KEYFLEET_REFRESH_INTERVAL", default_value = default_duration(keyfleet_verifier::DEFAULT_REFRESH_INTERVAL), value_parser = parse_duration)]
    pub refresh_interval: Duration,
    /// At most one refresh per this period on unknown `kid`s (a flood of made-up kids costs nothing).
    #[arg(long, env = "KEYFLEET_UNKNOWN_KID_COOLDOWN", default_value = default_duration(keyfleet_verifier::DEFAULT_UNKNOWN_KID_COOLDOWN), value_parser = parse_duration)]
    pub unknown_kid_cooldown: Duration,
    /// Keep verifying from the last good key set this long when the source is unreachable;
    /// after that answer UNAVAILABLE (fail closed).
    #[arg(long, env = "KEYFLEET_MAX_STALE", default_value = default_duration(keyfleet_verifier::DEFAULT_MAX_STALE), value_parser = parse_duration)]
    pub max_stale: Duration,
    /// Directory for the last good key set, so a restart during an authority outage serves at once.
    #[arg(long, env = "KEYFLEET_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Bound of the verified-token cache, in answers (~0.5–1 KiB each): a token seen again is
    /// answered from it, re-checked against the current keys, revocations and its `exp`.
    /// 0 turns it off.
    #[arg(long, env = "KEYFLEET_CACHE_ENTRIES", default_value_t = keyfleet_verifier::DEFAULT_CACHE_ENTRIES)]
    pub cache_entries: usize,
    /// Most concurrent Verify calls whose signatures are checked as one Ed25519 batch (each
    /// answer stays the one a lone check gives); 1 turns batching off. At most 1024.
    #[arg(long, env = "KEYFLEET_VERIFY_BATCH_MAX", default_value_t = keyfleet_verifier::DEFAULT_VERIFY_BATCH_MAX)]
    pub verify_batch_max: usize,
    /// Longest a batch waits for requests already on their way to it (a lone request never
    /// waits); 0s never waits. At most 10ms.
    #[arg(long, env = "KEYFLEET_VERIFY_BATCH_WINDOW", default_value = default_duration(keyfleet_verifier::DEFAULT_VERIFY_BATCH_WINDOW), value_parser = parse_duration)]
    pub verify_batch_window: Duration,
    /// This node's name, reported to the authority and in every answer. [default: verifier-<grpc port>]
    #[arg(long, env = "KEYFLEET_NODE_ID")]
    pub node_id: Option<String>,
    /// Region label of this node.
    #[arg(long, env = "KEYFLEET_REGION", default_value = keyfleet_verifier::DEFAULT_REGION)]
    pub region: String,
    /// Tokens longer than this are refused (TOO_LARGE) before any decoding.
    #[arg(long, env = "KEYFLEET_MAX_TOKEN_BYTES", default_value_t = keyfleet_core::DEFAULT_MAX_TOKEN_BYTES)]
    pub max_token_bytes: usize,
    /// Refuse tokens meant to live longer than this (exp - iat, or exp - now without iat) as
    /// MALFORMED, whoever signed them; 0 turns the check off.
    #[arg(long, env = "KEYFLEET_MAX_LIFETIME", default_value = default_duration(keyfleet_verifier::DEFAULT_MAX_LIFETIME), value_parser = parse_duration)]
    pub max_lifetime: Duration,
    #[command(flatten)]
    pub tls: ServerTlsArgs,
    /// PEM CA bundle to trust for an https:// --authority or --jwks-url [default: the web PKI roots].
    #[arg(long, env = "KEYFLEET_AUTHORITY_CA")]
    pub authority_ca: Option<PathBuf>,
    /// PEM client certificate presented to an https:// source that requires mutual TLS.
    #[arg(
        long,
        env = "KEYFLEET_AUTHORITY_CLIENT_CERT",
        requires = "authority_client_key"
    )]
    pub authority_client_cert: Option<PathBuf>,
    /// PEM private key of --authority-client-cert.
    #[arg(
        long,
        env = "KEYFLEET_AUTHORITY_CLIENT_KEY",
        requires = "authority_client_cert"
    )]
    pub authority_client_key: Option<PathBuf>,
    /// Requests in progress before new ones are refused with RESOURCE_EXHAUSTED (load shedding).
    #[arg(long, env = "KEYFLEET_MAX_INFLIGHT", default_value_t = default_max_inflight())]
    pub max_inflight: u32,
    /// File with the fleet credential (a copy of the authority's <data-dir>/node.token), sent on
    /// WatchJwks and GetJwks. Required with --authority.
    #[arg(long, env = "KEYFLEET_NODE_TOKEN_FILE")]
    pub node_token_file: Option<PathBuf>,
    /// Also serve GetJwks and WatchJwks on the gRPC port, as a relay: downstream verifiers point
    /// --authority at this node (with the same node token) and get the authority's versions,
    /// deltas and digests from it; the authority sees them (via this node) in `keys list`.
    /// Needs --authority.
    #[arg(long, env = "KEYFLEET_SERVE_WATCH")]
    pub serve_watch: bool,
    /// The request header Envoy ext_authz `Check` and HTTP `/auth` read the bearer token from.
    #[arg(long, env = "KEYFLEET_AUTHZ_HEADER", default_value = keyfleet_verifier::DEFAULT_AUTHZ_HEADER)]
    pub authz_header: String,
    /// CLAIM=HEADER (repeatable): pass the token's claim upstream in this header when ext_authz
    /// or /auth allows a request (strings as they are, other values as JSON).
    #[arg(
        long,
        env = "KEYFLEET_CLAIM_HEADER",
        value_name = "CLAIM=HEADER",
        value_delimiter = ','
    )]
    pub claim_header: Vec<keyfleet_verifier::ClaimHeader>,
    /// Leave the token's header on requests ext_authz allows (by default Envoy removes it, so
    /// upstreams never see the raw token).
    #[arg(long, env = "KEYFLEET_KEEP_AUTHORIZATION")]
    pub keep_authorization: bool,
}

#[derive(Debug, Args)]
pub struct AuthorityConn {
    /// gRPC URL of the authority (https:// for TLS).
    #[arg(
        long,
        env = "KEYFLEET_AUTHORITY",
        default_value = "http://127.0.0.1:7000"
    )]
    pub authority: String,
    #[command(flatten)]
    pub tls: ClientTlsArgs,
}

/// TLS of a server's listeners (gRPC and HTTP alike).
#[derive(Debug, Args)]
pub struct ServerTlsArgs {
    /// PEM certificate chain (leaf first) to serve TLS on every listener; needs --tls-key.
    #[arg(long, env = "KEYFLEET_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "KEYFLEET_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// PEM CA bundle: clients must present a certificate that chains to it (mutual TLS).
    #[arg(long, env = "KEYFLEET_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
}

impl ServerTlsArgs {
    pub fn load(&self) -> anyhow::Result<Option<keyfleet_runtime::tls::ServerTls>> {
        let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) else {
            return Ok(None);
        };
        Ok(Some(keyfleet_runtime::tls::ServerTls::from_files(
            cert,
            key,
            self.tls_client_ca.as_deref(),
        )?))
    }
}

/// What a client trusts and presents when it calls an https:// server.
#[derive(Debug, Args, Default)]
pub struct ClientTlsArgs {
    /// PEM CA bundle to trust for https:// servers [default: the built-in web PKI roots].
    #[arg(long, env = "KEYFLEET_CA")]
    pub ca: Option<PathBuf>,
    /// PEM client certificate for servers that require mutual TLS; needs --tls-key.
    #[arg(long, env = "KEYFLEET_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "KEYFLEET_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
}

impl ClientTlsArgs {
    pub fn load(&self) -> anyhow::Result<keyfleet_runtime::tls::ClientTls> {
        Ok(keyfleet_runtime::tls::ClientTls::from_files(
            self.ca.as_deref(),
            self.tls_cert.as_deref(),
            self.tls_key.as_deref(),
            "--ca",
        )?)
    }
}

#[derive(Debug, Args)]
pub struct AdminCred {
    /// File holding the admin token (the authority's <data-dir>/admin.token). Or set
    /// KEYFLEET_ADMIN_TOKEN to the token itself.
    #[arg(long, env = "KEYFLEET_ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Mint a token at the authority and print it (compact JWT) on stdout.
    Issue {
        #[command(flatten)]
        conn: AuthorityConn,
        #[command(flatten)]
        cred: AdminCred,
        /// The token's `sub`.
        #[arg(long, env = "KEYFLEET_SUBJECT")]
        subject: String,
        /// The token's `aud` (repeat for several).
        #[arg(long, env = "KEYFLEET_AUDIENCE", required = true)]
        audience: Vec<String>,
        /// Lifetime (at most the authority's --token-ttl). [default: the authority's --token-ttl]
        #[arg(long, env = "KEYFLEET_TTL", value_parser = parse_duration)]
        ttl: Option<Duration>,
        /// A custom claim as key=value; a JSON value (42, true, ["a"]) is kept as JSON. Repeatable.
        #[arg(long = "claim", value_name = "KEY=VALUE")]
        claims: Vec<String>,
    },
    /// Ask a verifier about a token; prints the verdict as JSON. Exit 0 valid, 1 invalid.
    Verify {
        /// gRPC URL of a verifier node.
        #[arg(
            long,
            env = "KEYFLEET_VERIFIER",
            default_value = "http://127.0.0.1:7100"
        )]
        verifier: String,
        /// Audience the token must carry.
        #[arg(long, env = "KEYFLEET_AUDIENCE")]
        audience: Option<String>,
        /// A scope the token's `scope` claim must grant (refused INSUFFICIENT_SCOPE otherwise).
        /// Repeatable; all must be granted.
        #[arg(long = "scope", value_name = "SCOPE")]
        scopes: Vec<String>,
        /// Step-up check: the login behind the token (its `auth_time`) may be at most this old
        /// (a duration like 5m, or seconds); refused LOGIN_TOO_OLD otherwise, or when the token
        /// has no `auth_time` — ask the user for the password again.
        #[arg(long, value_name = "AGE", value_parser = parse_age)]
        max_auth_age: Option<Duration>,
        #[command(flatten)]
        tls: ClientTlsArgs,
        /// The compact JWT, or - to read it from stdin.
        token: String,
    },
    /// Deny one token (by its jti) on every verifier until it expires.
    Revoke {
        #[command(flatten)]
        conn: AuthorityConn,
        #[command(flatten)]
        cred: AdminCred,
        /// The token's `jti` (one that starts with `-` is taken as it is).
        #[arg(allow_hyphen_values = true)]
        jti: String,
        /// Until when: the token's `exp` as Unix seconds, an RFC 3339 time, or a duration from now (15m).
        #[arg(long)]
        until: String,
    },
}

const SESSION_ABOUT: &str = "Persistent login. A login service checks a user's password, then calls \
`session start` (admin credential): the user gets a short-lived access token (with claims `sid`, \
`auth_time`, `scope`) and a refresh token (opaque, a secret: keep it like a password). \
`session refresh` spends the refresh token for a new access token and a NEW refresh token; the \
presented one is spent. Presenting a spent refresh token again (a thief's replay) ends the whole \
session, and every verifier refuses its access tokens with SESSION_REVOKED within a second. \
`session end` is logout; `session revoke-subject` ends every session of a user (e.g. after a \
password change).\n\n\
Refresh tokens never go on the command line if it can be helped (other users can read it in `ps`): \
pass --refresh-token-file FILE (or - for stdin), and --refresh-token-out FILE to store the new one \
(mode 0600) instead of printing it. Example:\n\n\
\x20 keyfleet session start --subject alice --audience orders --scope orders:read \\\n\
\x20     --refresh-token-out rt.txt\n\
\x20 keyfleet session refresh --refresh-token-file rt.txt --refresh-token-out rt.txt\n\
\x20 keyfleet session end --refresh-token-file rt.txt";

/// Where a refresh token comes from: a file (or stdin), or the command line.
#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
pub struct RefreshTokenIn {
    /// File holding the refresh token, or - to read it from stdin (preferred: a token on the
    /// command line is visible to other users in `ps`).
    #[arg(long, value_name = "FILE")]
    pub refresh_token_file: Option<PathBuf>,
    /// The refresh token itself (or KEYFLEET_REFRESH_TOKEN).
    #[arg(long, env = "KEYFLEET_REFRESH_TOKEN", hide_env_values = true)]
    pub refresh_token: Option<String>,
}

/// How session tokens are printed.
#[derive(Debug, Args)]
pub struct SessionOut {
    /// Write the new refresh token to this file (replaced atomically, mode 0600) instead of
    /// printing it; may be the file it was read from.
    #[arg(long, value_name = "FILE")]
    pub refresh_token_out: Option<PathBuf>,
    /// Print the answer as JSON (session_id, access_token, refresh_token, access_expires_at,
    /// session_expires_at).
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum SessionCommand {
    /// Log a user in (admin credential: call it once the password was checked). Prints the
    /// session id, the access token and the refresh token.
    Start {
        #[command(flatten)]
        conn: AuthorityConn,
        #[command(flatten)]
        cred: AdminCred,
        /// The user (`sub` of every access token of the session).
        #[arg(long, env = "KEYFLEET_SUBJECT")]
        subject: String,
        /// An audience of the access tokens (repeat for several).
        #[arg(long, env = "KEYFLEET_AUDIENCE", required = true)]
        audience: Vec<String>,
        /// A scope of the session (repeatable): the access tokens carry them in `scope`, and a
        /// refresh can only narrow them.
        #[arg(long = "scope", value_name = "SCOPE")]
        scopes: Vec<String>,
        /// A custom claim as key=value for every access token; a JSON value is kept as JSON.
        /// Repeatable.
        #[arg(long = "claim", value_name = "KEY=VALUE")]
        claims: Vec<String>,
        /// When the password (or second factor) was checked: Unix seconds or an RFC 3339 time.
        /// [default: now]
        #[arg(long, value_name = "TIME")]
        auth_time: Option<String>,
        /// Authentication context class (OIDC `acr`) copied into the access tokens.
        #[arg(long)]
        acr: Option<String>,
        /// An authentication method (OIDC `amr`, e.g. pwd, otp, hwk); repeatable.
        #[arg(long)]
        amr: Vec<String>,
        #[command(flatten)]
        out: SessionOut,
    },
    /// Spend a refresh token for a new access token and a new refresh token (no admin
    /// credential: the refresh token is the credential). Presenting a spent one ends the session.
    Refresh {
        #[command(flatten)]
        conn: AuthorityConn,
        #[command(flatten)]
        token: RefreshTokenIn,
        /// Narrow the new access token to these scopes (a subset of the session's); repeatable.
        /// [default: the session's scopes]
        #[arg(long = "scope", value_name = "SCOPE")]
        scopes: Vec<String>,
        #[command(flatten)]
        out: SessionOut,
    },
    /// Log out: end one session, by its refresh token (no admin credential) or by its id
    /// (admin credential). Every verifier then refuses its access tokens (SESSION_REVOKED).
    End {
        #[command(flatten)]
        conn: AuthorityConn,
        #[command(flatten)]
        cred: AdminCred,
        /// The session id (`sid`); needs the admin credential.
        #[arg(long, conflicts_with_all = ["refresh_token_file", "refresh_token"], required_unless_present_any = ["refresh_token_file", "refresh_token"])]
        session_id: Option<String>,
        /// File holding the session's refresh token, or - for stdin.
        #[arg(long, value_name = "FILE", conflicts_with = "refresh_token")]
        refresh_token_file: Option<PathBuf>,
        /// The session's refresh token itself (or KEYFLEET_REFRESH_TOKEN).
        #[arg(long, env = "KEYFLEET_REFRESH_TOKEN", hide_env_values = true)]
        refresh_token: Option<String>,
        /// Print the answer as JSON.
        #[arg(long)]
        json: bool,
    },
    /// End every session of a user (admin credential), e.g. after a password change.
    RevokeSubject {
        #[command(flatten)]
        conn: AuthorityConn,
        #[command(flatten)]
        cred: AdminCred,
        /// The user (`sub`); one that starts with `-` is taken as it is.
        #[arg(allow_hyphen_values = true)]
        subject: String,
        /// Print the answer as JSON.
        #[arg(long)]
        json: bool,
    },
    /// A user's sessions with their times, refreshes and end reasons (admin credential).
    List {
        #[command(flatten)]
        conn: AuthorityConn,
        #[command(flatten)]
        cred: AdminCred,
        /// The user (`sub`).
        #[arg(long, env = "KEYFLEET_SUBJECT")]
        subject: String,
        /// Print the raw answer as JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Every key with its state and times, and every watching verifier with the version it holds.
    List {
        #[command(flatten)]
        conn: AuthorityConn,
        #[command(flatten)]
        cred: AdminCred,
        /// Print the raw answer as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Rotate now: the published next key becomes active once every verifier holds it.
    Rotate {
        #[command(flatten)]
        conn: AuthorityConn,
        #[command(flatten)]
        cred: AdminCred,
        /// Return at once instead of waiting for the new key to be active.
        #[arg(long)]
        no_wait: bool,
        /// Give up waiting after this long.
        #[arg(long, default_value = "15m", value_parser = parse_duration)]
        timeout: Duration,
    },
    /// Emergency: remove a key from the JWKS at once; its tokens are refused (KEY_REVOKED).
    Revoke {
        #[command(flatten)]
        conn: AuthorityConn,
        #[command(flatten)]
        cred: AdminCred,
        /// The key's kid (see `keyfleet keys list`). Kids are base64url, so about one in 64
        /// starts with `-`: it is taken as the kid, not as a flag.
        #[arg(allow_hyphen_values = true)]
        kid: String,
    },
}

/// Runs the parsed command.
pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let server = matches!(cli.command, Command::Authority(_) | Command::Verifier(_));
    let service = match cli.command {
        Command::Authority(_) => "keyfleet-authority",
        Command::Verifier(_) => "keyfleet-verifier",
        _ => "keyfleet",
    };
    // Dropped when the command returns (after the servers drained): flushes OTLP export.
    let _telemetry = telemetry::init(
        cli.log_format,
        if server { "info" } else { "warn" },
        service,
    );
    match cli.command {
        Command::Demo(args) => demo::run(args).await,
        Command::Authority(args) => servers::run_authority(args).await,
        Command::Verifier(args) => servers::run_verifier(args).await,
        Command::Token(cmd) => client::token(cmd).await,
        Command::Keys(cmd) => client::keys(cmd).await,
        Command::Session(cmd) => crate::session::run(cmd).await,
        Command::Health { grpc, service, tls } => client::health(&grpc, &service, &tls).await,
        Command::Loadtest(args) => crate::loadtest::run(args).await,
    }
}

/// A library's default duration as `--help` shows it and `parse_duration` reads it back: whole
/// hours as `24h`, whole minutes from two on as `15m`, else seconds (`60s`, `5s`) or
/// milliseconds. Leaked once per flag when the command line is built, as clap's own
/// `default_value_t` does (clap wants a `&'static str`).
pub(crate) fn default_duration(d: Duration) -> &'static str {
    let (s, ms) = (d.as_secs(), d.subsec_millis());
    let text = match (s, ms) {
        (_, 1..) => format!("{}ms", d.as_millis()),
        (0, 0) if d.subsec_micros() > 0 => format!("{}us", d.as_micros()),
        (s, 0) if s > 0 && s % 3600 == 0 => format!("{}h", s / 3600),
        (s, 0) if s >= 120 && s % 60 == 0 => format!("{}m", s / 60),
        (s, 0) => format!("{s}s"),
    };
    Box::leak(text.into_boxed_str())
}

/// [`default_duration`] of a default kept in whole seconds (keyfleet-core's ring policy).
fn default_secs(secs: i64) -> &'static str {
    default_duration(Duration::from_secs(secs.unsigned_abs()))
}

/// The servers' default cap on requests in progress (`keyfleet_runtime::limits::Limits`).
fn default_max_inflight() -> u32 {
    keyfleet_runtime::limits::Limits::default().max_inflight as u32
}

/// A step-up age: whole seconds (`300`) or a duration (`5m`).
fn parse_age(s: &str) -> Result<Duration, String> {
    let age = match s.parse::<u64>() {
        Ok(secs) => Duration::from_secs(secs),
        Err(_) => parse_duration(s)?,
    };
    if age.is_zero() {
        return Err("0 would turn the step-up check off: leave --max-auth-age out for none".into());
    }
    Ok(age)
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;

    /// Kids and jtis are base64url: an operator must be able to revoke one that starts with `-`
    /// in an emergency without knowing to write `--` first.
    #[test]
    fn ids_that_start_with_a_hyphen_are_ids() {
        let cli = Cli::try_parse_from(["keyfleet", "keys", "revoke", "-AbCdEf_-12"]).unwrap();
        let Command::Keys(KeysCommand::Revoke { kid, .. }) = cli.command else {
            panic!("parsed as {:?}", cli.command);
        };
        assert_eq!(kid, "-AbCdEf_-12");
        for args in [
            ["keyfleet", "token", "revoke", "-hXyZ", "--until", "15m"],
            ["keyfleet", "token", "revoke", "--until", "15m", "-hXyZ"],
        ] {
            let cli = Cli::try_parse_from(args).unwrap();
            let Command::Token(TokenCommand::Revoke { jti, until, .. }) = cli.command else {
                panic!("parsed as {:?}", cli.command);
            };
            assert_eq!((jti.as_str(), until.as_str()), ("-hXyZ", "15m"), "{args:?}");
        }
    }

    /// `--help` shows the libraries' defaults the way an operator writes durations, and they
    /// parse back to the same values.
    #[test]
    fn default_durations_read_like_flags() {
        for (d, text) in [
            (keyfleet_verifier::DEFAULT_MAX_LIFETIME, "24h"),
            (keyfleet_verifier::DEFAULT_LEEWAY, "60s"),
            (Duration::from_secs(15 * 60), "15m"),
            (Duration::from_secs(90), "90s"),
            (Duration::from_millis(1500), "1500ms"),
            (keyfleet_verifier::DEFAULT_VERIFY_BATCH_WINDOW, "50us"),
        ] {
            assert_eq!(default_duration(d), text);
            assert_eq!(parse_duration(text), Ok(d));
        }
    }

    /// `--concurrency` has a default, yet `--rate` (which conflicts with it) is still accepted.
    #[test]
    fn a_rate_overrides_the_default_concurrency() {
        let cli = Cli::try_parse_from(["keyfleet", "loadtest", "--local", "1", "--rate", "10"]);
        assert!(cli.is_ok(), "{cli:?}");
        let both = [
            "keyfleet",
            "loadtest",
            "--local",
            "1",
            "--rate",
            "1",
            "--concurrency",
            "2",
        ];
        assert!(Cli::try_parse_from(both).is_err());
    }
}
