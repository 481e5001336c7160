//! `keyfleet authority` and `keyfleet verifier`: each server's typed config built from the
//! library's defaults and the flags, opened (every check passed) before a socket is bound,
//! then served until SIGTERM or Ctrl-C.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use keyfleet_runtime::CancellationToken;
use tokio::net::TcpListener;

use crate::cli::{AuthorityArgs, VerifierArgs};
use crate::exit::CliError;

fn secs(d: Duration) -> i64 {
    d.as_secs() as i64
}

async fn bind(addr: SocketAddr, what: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr).await.with_context(|| {
        format!("cannot listen on {addr} for {what}: is another process using it? choose another address with --{what}-listen")
    })
}

/// Cancels `token` on SIGTERM or Ctrl-C.
fn cancel_on_signal(token: CancellationToken) {
    tokio::spawn(async move {
        keyfleet_runtime::serve::shutdown_signal().await;
        tracing::info!("shutdown signal received, draining");
        token.cancel();
    });
}

pub async fn run_authority(args: AuthorityArgs) -> anyhow::Result<ExitCode> {
    // The library's defaults; only what the flags say is set here.
    let mut config = keyfleet_authority::Config::new(&args.data_dir);
    config.issuer = args.issuer;
    if let Some(file) = args.admin_token_file {
        config.admin_token_file = file;
    }
    if let Some(file) = args.node_token_file {
        config.node_token_file = file;
    }
    config.max_watchers = args.max_watchers;
    config.max_watchers_per_peer = args.max_watchers_per_peer;
    config.policy = keyfleet_core::RingPolicy {
        token_ttl: secs(args.token_ttl),
        leeway: secs(args.leeway),
        rotation_period: secs(args.rotation_period),
        publish_ahead: secs(args.publish_ahead),
    };
    config.kek = match (&args.kek_file, std::env::var("KEYFLEET_KEK").ok()) {
        (Some(path), _) => Some(keyfleet_authority::Kek::from_file(path)?),
        (None, Some(text)) => Some(keyfleet_authority::Kek::parse(&text).context("KEYFLEET_KEK")?),
        (None, None) => None,
    };
    config.tls = args.tls.load()?;
    config.insecure_admin = args.insecure_admin;
    config.admin_rate = args.admin_rate;
    config.limits.max_inflight = args.max_inflight as usize;
    config.sessions = keyfleet_authority::SessionPolicy {
        idle: secs(args.session_idle),
        max: secs(args.session_max),
        reuse_grace: secs(args.refresh_reuse_grace),
    };
    let authority = keyfleet_authority::Authority::open(config)?;
    let grpc = bind(args.grpc_listen, "grpc").await?;
    let http = bind(args.http_listen, "http").await?;
    let shutdown = CancellationToken::new();
    cancel_on_signal(shutdown.clone());
    authority.serve(grpc, http, shutdown).await?;
    Ok(ExitCode::SUCCESS)
}

pub async fn run_verifier(args: VerifierArgs) -> anyhow::Result<ExitCode> {
    // clap takes exactly one of --authority and --jwks-url.
    let source = match (args.authority, args.jwks_url) {
        (Some(_), None) if args.node_token_file.is_none() => {
            return Err(CliError::Usage(
                "--authority needs --node-token-file (KEYFLEET_NODE_TOKEN_FILE): a copy of the authority's <data-dir>/node.token; without it the authority refuses the watch stream and withholds the deny lists".into(),
            )
            .into());
        }
        (Some(url), None) => keyfleet_verifier::Source::Authority { url },
        (None, Some(url)) => keyfleet_verifier::Source::JwksUrl { url },
        _ => {
            return Err(
                CliError::Usage("give exactly one of --authority or --jwks-url".into()).into(),
            );
        }
    };
    // The library's defaults; only what the flags say is set here.
    let mut config = keyfleet_verifier::Config::new(source);
    config.issuer = args.issuer;
    config.audiences = args.audience;
    config.any_audience = args.any_audience;
    config.leeway = args.leeway;
    config.refresh_interval = args.refresh_interval;
    config.unknown_kid_cooldown = args.unknown_kid_cooldown;
    config.max_stale = args.max_stale;
    config.cache_dir = args.cache_dir;
    config.cache_entries = args.cache_entries;
    config.verify_batch_max = args.verify_batch_max;
    config.verify_batch_window = args.verify_batch_window;
    config.node_id = args
        .node_id
        .unwrap_or_else(|| format!("verifier-{}", args.grpc_listen.port()));
    config.region = args.region;
    config.max_token_bytes = args.max_token_bytes;
    // An explicit 0 turns the check off.
    config.max_lifetime = (!args.max_lifetime.is_zero()).then_some(args.max_lifetime);
    config.tls = args.tls.load()?;
    config.source_tls = keyfleet_runtime::tls::ClientTls::from_files(
        args.authority_ca.as_deref(),
        args.authority_client_cert.as_deref(),
        args.authority_client_key.as_deref(),
        "--authority-ca",
    )?;
    config.limits.max_inflight = args.max_inflight as usize;
    config.node_token_file = args.node_token_file;
    config.serve_watch = args.serve_watch;
    config.authz_header = args.authz_header.to_ascii_lowercase();
    config.claim_headers = args.claim_header;
    config.keep_authorization = args.keep_authorization;
    let node_id = config.node_id.clone();
    // The whole configuration is checked (`Config::check`) and the node built before any
    // socket is bound: a bad one exits 64 without ever having listened.
    let verifier = keyfleet_verifier::Verifier::open(config).await?;
    let grpc = bind(args.grpc_listen, "grpc").await?;
    let http = bind(args.http_listen, "http").await?;
    tracing::info!(grpc = %grpc.local_addr()?, http = %http.local_addr()?, node_id = %node_id, "verifier listening");
    let shutdown = CancellationToken::new();
    cancel_on_signal(shutdown.clone());
    verifier.serve(grpc, http, shutdown).await?;
    Ok(ExitCode::SUCCESS)
}
