//! Integration tests of keyfleet-client against real servers on loopback: an authority and
//! verifier nodes in this process (and one node as its own process, to stop it with SIGSTOP),
//! a fake JWKS server for hand-signed tokens, and services guarded by the layer.

mod dns;
mod layer;
mod local;
mod pool;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use ed25519_dalek::SigningKey;
use keyfleet_authority::client::AdminClient;
use keyfleet_client::{PoolConfig, VerifierPool};
use keyfleet_core::jwk::thumbprint;
use keyfleet_core::{Jwk, TokenClaims, sign_token};
use keyfleet_proto::v1::IssueTokenRequest;
use keyfleet_runtime::client::Settings;
use keyfleet_runtime::tls::ClientTls;
use keyfleet_testkit::serve::{Pair, Task};
use keyfleet_verifier::{Config, Source, Verifier};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// An authority in this process and the verifier nodes that follow it.
struct Fleet {
    dir: tempfile::TempDir,
    authority: Pair,
    admin: AdminClient,
    nodes: Vec<Pair>,
}

impl Fleet {
    /// An authority and `n` verifier nodes (any audience), each holding the key set.
    async fn start(n: usize) -> Fleet {
        let dir = tempfile::tempdir().unwrap();
        let config = keyfleet_authority::Config::for_test(&dir.path().join("authority"));
        let authority = keyfleet_authority::Authority::open(config).unwrap();
        let admin_token = authority.admin_token();
        let authority = Pair::start(|g, h, stop| authority.serve(g, h, stop)).await;
        let admin = AdminClient::lazy(
            &authority.grpc_url(),
            &ClientTls::default(),
            &Settings::COMMAND,
            &admin_token,
        )
        .unwrap();
        let mut fleet = Fleet {
            dir,
            authority,
            admin,
            nodes: Vec::new(),
        };
        for i in 0..n {
            let node = fleet.start_node(&format!("node-{i}")).await;
            fleet.nodes.push(node);
        }
        fleet
    }

    fn node_token_file(&self) -> PathBuf {
        self.dir
            .path()
            .join("authority")
            .join(keyfleet_authority::NODE_TOKEN_FILE)
    }

    /// A node's configuration: following the authority with the fleet credential.
    fn node_config(&self, name: &str) -> Config {
        let mut config = Config::for_test(Source::Authority {
            url: self.authority.grpc_url(),
        });
        config.node_token_file = Some(self.node_token_file());
        config.node_id = name.to_owned();
        config
    }

    /// A verifier node in this process, holding the key set.
    async fn start_node(&self, name: &str) -> Pair {
        let node = Verifier::open(self.node_config(name)).await.unwrap();
        let ready = node.clone();
        let pair = Pair::start(|g, h, stop| node.serve(g, h, stop)).await;
        keyfleet_testkit::eventually(&format!("{name} holds the key set"), || {
            let ready = ready.clone();
            async move { ready.is_ready() }
        })
        .await;
        pair
    }

    fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(Pair::grpc_url).collect()
    }

    /// A token for `subject` and audience `api`, with `claims`.
    async fn issue(&self, subject: &str, claims: &[(&str, &str)]) -> String {
        self.admin
            .issue(IssueTokenRequest {
                subject: subject.into(),
                audience: vec!["api".into()],
                claims: claims
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect(),
                ..Default::default()
            })
            .await
            .unwrap()
            .token
    }
}

/// A pool over `urls` with fast probes (tests wait for readmission).
async fn pool(urls: Vec<String>, hedging: bool) -> VerifierPool {
    VerifierPool::builder()
        .urls(urls)
        .config(PoolConfig {
            hedging,
            probe_backoff: Duration::from_millis(50),
            probe_backoff_max: Duration::from_millis(400),
            ..PoolConfig::default()
        })
        .build()
        .await
        .unwrap()
}

/// The `exp`/`iat` base of hand-signed tokens: the system clock (verifiers in these tests use it).
fn now() -> i64 {
    keyfleet_runtime::Clock::system().now()
}

/// A signing key of a fake JWKS, and the tokens it signs.
struct Signer {
    key: SigningKey,
    kid: String,
}

const ISSUER: &str = "https://auth.test";

impl Signer {
    fn new(seed: u8) -> Signer {
        let key = SigningKey::from_bytes(&[seed; 32]);
        let kid = thumbprint(&key.verifying_key().to_bytes());
        Signer { key, kid }
    }

    fn jwks(&self) -> String {
        let jwk = Jwk::ed25519(&self.kid, &self.key.verifying_key().to_bytes());
        serde_json::json!({ "keys": [jwk] }).to_string()
    }

    /// A token for `alice` and audience `api`, valid 5 minutes, with `extra` claims.
    fn token(&self, extra: serde_json::Value) -> String {
        let now = now();
        let serde_json::Value::Object(extra) = extra else {
            panic!("claims must be an object")
        };
        let claims = TokenClaims {
            iss: ISSUER.into(),
            sub: "alice".into(),
            aud: vec!["api".into()],
            iat: now,
            nbf: now,
            exp: now + 300,
            jti: format!("jti-{}", rand_suffix()),
            extra,
        };
        sign_token(&self.key, &self.kid, &claims)
    }
}

fn rand_suffix() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(0u8)
}

/// A JWKS document served over HTTP on loopback.
async fn serve_jwks(body: String) -> (String, Task) {
    let router = axum::Router::new().route(
        "/jwks.json",
        axum::routing::get(move || {
            let body = body.clone();
            async move { ([("content-type", "application/json")], body) }
        }),
    );
    let (addr, task) = keyfleet_testkit::serve::http(router).await;
    (format!("http://{addr}/jwks.json"), task)
}

/// An HTTP/1.1 GET with an optional `authorization`: the status and the `www-authenticate`
/// header, and the body.
async fn get(addr: SocketAddr, path: &str, authorization: Option<&str>) -> (u16, String, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let auth = authorization
        .map(|a| format!("Authorization: {a}\r\n"))
        .unwrap_or_default();
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Connection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut raw = String::new();
    stream.read_to_string(&mut raw).await.unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let challenge = head
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("www-authenticate")
                .then(|| value.trim().to_owned())
        })
        .unwrap_or_default();
    (status, challenge, body.to_owned())
}
