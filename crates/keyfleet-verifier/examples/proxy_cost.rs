//! Server CPU per call of the proxy front doors against `Verify`, for the same token (issue 16:
//! ext_authz `Check` and `/auth` within 10 % of `Verify`).
//!
//! One verifier node runs on its own runtime whose threads are named `node` (1 worker, so
//! the node has one core and the client the other); the CPU those threads burn per call, read
//! from `/proc/self/task/*/schedstat`, is the server's cost alone. Each path is called `CALLS`
//! times from `CONCURRENCY` client tasks over one connection (gRPC: one HTTP/2 channel;
//! `/auth`: a keep-alive HTTP/1.1 pool), rounds interleaved, the median round reported; once
//! with the verified-token cache (the same token again: a hit) and once without (every call
//! checks the signature).
//!
//! `cargo run --release -p keyfleet-verifier --example proxy_cost`

use std::collections::HashMap;
use std::fs;
use std::time::Duration;

use ed25519_dalek::SigningKey;
use envoy_types::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Request};
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use envoy_types::pb::envoy::service::auth::v3::{AttributeContext, CheckRequest};
use keyfleet_core::{Jwk, TokenClaims, sign_token};
use keyfleet_proto::v1::VerifyRequest;
use keyfleet_proto::v1::verifier_client::VerifierClient;
use keyfleet_runtime::{CancellationToken, Clock};
use keyfleet_verifier::{Config, Source, Verifier};
use tokio::net::TcpListener;

const ISSUER: &str = "https://issuer.bench";
const CALLS: usize = 20_000;
// Rounds are interleaved path by path, so load from elsewhere on the machine hits all alike.
const CONCURRENCY: usize = 8;
const ROUNDS: usize = 5;

/// Nanoseconds of CPU used so far by this process's threads named `prefix…`.
fn threads_cpu_ns(prefix: &str) -> u64 {
    let mut total = 0;
    for task in fs::read_dir("/proc/self/task")
        .into_iter()
        .flatten()
        .flatten()
    {
        let dir = task.path();
        let named = fs::read_to_string(dir.join("comm")).unwrap_or_default();
        if named.trim_end().starts_with(prefix) {
            let stat = fs::read_to_string(dir.join("schedstat")).unwrap_or_default();
            total += stat
                .split_whitespace()
                .next()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    total
}

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
enum Path {
    Verify,
    VerifyScoped,
    Check,
    CheckScoped,
    Auth,
}

const PATHS: [Path; 5] = [
    Path::Verify,
    Path::VerifyScoped,
    Path::Check,
    Path::CheckScoped,
    Path::Auth,
];

fn main() {
    let node_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("node")
        .enable_all()
        .build()
        .unwrap();
    let jwks_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("jwks")
        .enable_all()
        .build()
        .unwrap();
    let client_rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();

    let signing = SigningKey::from_bytes(&[7; 32]);
    let jwk = Jwk::ed25519("bench", &signing.verifying_key().to_bytes());
    let jwks = serde_json::json!({ "keys": [jwk] }).to_string();
    let now = Clock::system().now();
    let mut extra = serde_json::Map::new();
    extra.insert("scope".into(), "read write".into());
    extra.insert("auth_time".into(), now.into());
    extra.insert("email".into(), "alice@example.com".into());
    let token = sign_token(
        &signing,
        "bench",
        &TokenClaims {
            iss: ISSUER.into(),
            sub: "alice".into(),
            aud: vec!["api".into()],
            iat: now,
            nbf: now,
            exp: now + 3600,
            jti: "bench-1".into(),
            extra,
        },
    );

    // The key source: a JWKS document on its own runtime (fetched once).
    let jwks_addr = jwks_rt.block_on(async move {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let router = axum::Router::new().route(
            "/jwks.json",
            axum::routing::get(move || {
                let body = jwks.clone();
                async move { body }
            }),
        );
        tokio::spawn(async move { axum::serve(listener, router).await });
        addr
    });
    let mut config = Config::new(Source::JwksUrl {
        url: format!("http://{jwks_addr}/jwks.json"),
    });
    config.issuer = Some(ISSUER.into());
    config.audiences = vec!["api".into()];
    config.refresh_interval = Duration::from_secs(3600);
    // One mapped claim, as a deployment would have (`PROXY_COST_NO_CLAIMS=1`: none).
    if std::env::var_os("PROXY_COST_NO_CLAIMS").is_none() {
        config.claim_headers = vec!["email=x-user-email".parse().unwrap()];
    }
    let shutdown = CancellationToken::new();
    let (node, grpc, http) = node_rt.block_on(async {
        let node = Verifier::open(config).await.unwrap();
        let grpc = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let http = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addrs = (grpc.local_addr().unwrap(), http.local_addr().unwrap());
        tokio::spawn(node.clone().serve(grpc, http, shutdown.clone()));
        (node, addrs.0, addrs.1)
    });

    client_rt.block_on(async {
        let channel = tonic::transport::Channel::from_shared(format!("http://{grpc}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let verifier = VerifierClient::new(channel.clone());
        let authz = AuthorizationClient::new(channel);
        let http_client = reqwest::Client::builder()
            .pool_max_idle_per_host(CONCURRENCY)
            .build()
            .unwrap();
        let auth_url = format!("http://{http}/auth");
        while !node.is_ready() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let clients = Clients {
            verifier,
            authz,
            http: http_client,
            auth_url,
            token: token.clone(),
        };
        for (label, cache) in [("cache hit (same token)", true), ("no cache (signature checked)", false)] {
            node.set_cache_capacity(if cache { 16_384 } else { 0 });
            // Warm up every path (connections, cache).
            for path in PATHS {
                for _ in 0..500 {
                    clients.call(path).await;
                }
            }
            let mut samples: HashMap<Path, Vec<f64>> = HashMap::new();
            for _ in 0..ROUNDS {
                for path in PATHS {
                    let before = threads_cpu_ns("node");
                    let mut tasks = tokio::task::JoinSet::new();
                    for _ in 0..CONCURRENCY {
                        let clients = clients.clone();
                        tasks.spawn(async move {
                            for _ in 0..CALLS / CONCURRENCY {
                                clients.call(path).await;
                            }
                        });
                    }
                    while let Some(done) = tasks.join_next().await {
                        done.unwrap();
                    }
                    let spent = threads_cpu_ns("node") - before;
                    samples
                        .entry(path)
                        .or_default()
                        .push(spent as f64 / CALLS as f64);
                }
            }
            println!("{label}: server CPU per call (median of {ROUNDS} rounds of {CALLS}, {CONCURRENCY} in flight)");
            let median = |path: Path| {
                let mut v = samples[&path].clone();
                v.sort_by(f64::total_cmp);
                v[v.len() / 2]
            };
            let base = median(Path::Verify);
            for path in PATHS {
                let ns = median(path);
                println!(
                    "  {:<14} {:>8.1} µs  {:+6.1} % vs Verify",
                    format!("{path:?}"),
                    ns / 1000.0,
                    (ns / base - 1.0) * 100.0
                );
            }
        }
    });
    shutdown.cancel();
}

/// The three clients, one connection each, shared by the client tasks.
#[derive(Clone)]
struct Clients {
    verifier: VerifierClient<tonic::transport::Channel>,
    authz: AuthorizationClient<tonic::transport::Channel>,
    http: reqwest::Client,
    auth_url: String,
    token: String,
}

impl Clients {
    /// One call on `path`, checked to be an allow.
    async fn call(&self, path: Path) {
        let token = self.token.clone();
        match path {
            Path::Verify | Path::VerifyScoped => {
                let mut request = VerifyRequest {
                    token,
                    ..VerifyRequest::default()
                };
                if path == Path::VerifyScoped {
                    request.required_scopes = vec!["read".into()];
                    request.max_auth_age_seconds = 3600;
                }
                let answer = self
                    .verifier
                    .clone()
                    .verify(request)
                    .await
                    .unwrap()
                    .into_inner();
                assert!(answer.valid, "{answer:?}");
            }
            Path::Check | Path::CheckScoped => {
                // What Envoy sends for a plain GET: a handful of headers.
                let mut headers = HashMap::new();
                headers.insert("authorization".to_owned(), format!("Bearer {token}"));
                headers.insert(":path".to_owned(), "/orders".to_owned());
                headers.insert(":method".to_owned(), "GET".to_owned());
                headers.insert(":authority".to_owned(), "api.example".to_owned());
                headers.insert("user-agent".to_owned(), "bench".to_owned());
                let mut context = HashMap::new();
                if path == Path::CheckScoped {
                    context.insert("scopes".to_owned(), "read".to_owned());
                    context.insert("max_auth_age".to_owned(), "3600".to_owned());
                }
                let request = CheckRequest {
                    attributes: Some(AttributeContext {
                        request: Some(Request {
                            http: Some(HttpRequest {
                                method: "GET".into(),
                                path: "/orders".into(),
                                headers,
                                ..HttpRequest::default()
                            }),
                            ..Request::default()
                        }),
                        context_extensions: context,
                        ..AttributeContext::default()
                    }),
                };
                let answer = self
                    .authz
                    .clone()
                    .check(request)
                    .await
                    .unwrap()
                    .into_inner();
                assert_eq!(answer.status.map(|s| s.code), Some(0));
            }
            Path::Auth => {
                let answer = (self.http.get(&self.auth_url))
                    .bearer_auth(&token)
                    .send()
                    .await
                    .unwrap();
                assert_eq!(answer.status().as_u16(), 200);
            }
        }
    }
}
