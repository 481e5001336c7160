//! A whole keyfleet cluster in this process on `127.0.0.1:0`: one authority and N verifiers,
//! each a real server on real sockets, with node restarts and kills for tests and the demo.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context as _, anyhow};
use keyfleet_proto::v1::authority_client::AuthorityClient;
use keyfleet_proto::v1::verifier_client::VerifierClient;
use keyfleet_proto::v1::{IssueTokenRequest, ListKeysRequest, RotateKeysRequest, VerifyRequest};
use keyfleet_runtime::{CancellationToken, Clock};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tonic::Request;
use tonic::transport::{Channel, Endpoint};

/// How to build the local cluster.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    pub verifiers: usize,
    /// Region labels assigned round-robin to the verifiers.
    pub regions: Vec<String>,
    pub policy: keyfleet_core::RingPolicy,
    pub issuer: String,
    pub clock: Clock,
    /// Where the verifiers run (the load generator gives them their own runtime, so their CPU
    /// time can be told from its own); the caller's runtime when `None`.
    pub runtime: Option<tokio::runtime::Handle>,
    /// The verifiers' verified-token cache bound; the node default when `None`.
    pub cache_entries: Option<usize>,
    /// The audiences the verifiers guard (`--audience`): a token must name one of them. Empty
    /// gives them `--any-audience`.
    pub audiences: Vec<String>,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            verifiers: 3,
            regions: vec!["a".into(), "b".into()],
            policy: keyfleet_core::RingPolicy {
                token_ttl: 300,
                leeway: 60,
                rotation_period: 24 * 3600,
                publish_ahead: 30,
            },
            issuer: "https://keyfleet.local".into(),
            clock: Clock::system(),
            runtime: None,
            cache_entries: None,
            // The load generator's default audience (`keyfleet loadtest --audience`).
            audiences: vec!["loadtest".into()],
        }
    }
}

/// One running server: its addresses and how to stop it.
#[derive(Debug)]
pub struct Node {
    pub name: String,
    pub region: String,
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    /// The verifier itself (for in-process measurements); `None` for the authority.
    pub verifier: Option<keyfleet_verifier::Verifier>,
    stop: CancellationToken,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

impl Node {
    pub fn grpc_url(&self) -> String {
        format!("http://{}", self.grpc)
    }
    pub fn http_url(&self) -> String {
        format!("http://{}", self.http)
    }
    pub fn is_running(&self) -> bool {
        self.task.as_ref().is_some_and(|t| !t.is_finished())
    }
    /// Cancels the server and waits for it to drain.
    pub async fn stop(&mut self) -> anyhow::Result<()> {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            task.await.context("server task panicked")??;
        }
        Ok(())
    }
    /// Aborts the server at once, as a crash would (no drain).
    pub fn kill(&mut self) {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// An authority and N verifiers running in this process.
#[derive(Debug)]
pub struct LocalCluster {
    pub authority: Node,
    pub verifiers: Vec<Node>,
    pub admin_token: String,
    pub options: ClusterOptions,
    dir: tempfile::TempDir,
}

async fn listen() -> anyhow::Result<TcpListener> {
    TcpListener::bind("127.0.0.1:0")
        .await
        .context("binding a loopback port")
}

impl LocalCluster {
    /// Starts the authority and the verifiers, and waits until every verifier holds the key set.
    pub async fn start(options: ClusterOptions) -> anyhow::Result<LocalCluster> {
        let dir = tempfile::tempdir().context("creating a temporary data dir")?;
        let (authority, admin_token) = Self::start_authority(&options, dir.path(), None).await?;
        let mut cluster = LocalCluster {
            authority,
            verifiers: Vec::new(),
            admin_token,
            options,
            dir,
        };
        for i in 0..cluster.options.verifiers {
            let node = cluster.start_verifier(i, None).await?;
            cluster.verifiers.push(node);
        }
        cluster.wait_ready(Duration::from_secs(20)).await?;
        Ok(cluster)
    }

    async fn start_authority(
        options: &ClusterOptions,
        dir: &std::path::Path,
        addrs: Option<(SocketAddr, SocketAddr)>,
    ) -> anyhow::Result<(Node, String)> {
        let data_dir = dir.join("authority");
        let config = keyfleet_authority::Config {
            data_dir: data_dir.clone(),
            issuer: options.issuer.clone(),
            admin_token_file: data_dir.join("admin.token"),
            node_token_file: data_dir.join(keyfleet_authority::NODE_TOKEN_FILE),
            policy: options.policy,
            kek: None,
            clock: options.clock.clone(),
            watcher_timeout: Duration::from_secs(10),
            tick_interval: Duration::from_millis(200),
            ..keyfleet_authority::Config::for_test(&data_dir)
        };
        let authority = keyfleet_authority::Authority::open(config).map_err(|e| anyhow!("{e}"))?;
        let admin_token = authority.admin_token();
        let (grpc, http) = match addrs {
            Some((g, h)) => (TcpListener::bind(g).await?, TcpListener::bind(h).await?),
            None => (listen().await?, listen().await?),
        };
        let (g, h) = (grpc.local_addr()?, http.local_addr()?);
        let stop = CancellationToken::new();
        let task = tokio::spawn(authority.serve(grpc, http, stop.clone()));
        let node = Node {
            name: "authority".into(),
            region: String::new(),
            grpc: g,
            http: h,
            verifier: None,
            stop,
            task: Some(task),
        };
        Ok((node, admin_token))
    }

    async fn start_verifier(
        &self,
        i: usize,
        addrs: Option<(SocketAddr, SocketAddr)>,
    ) -> anyhow::Result<Node> {
        let region = self.options.regions[i % self.options.regions.len().max(1)].clone();
        let name = format!("verifier-{}", i + 1);
        let source = keyfleet_verifier::Source::Authority {
            url: self.authority.grpc_url(),
        };
        // Node defaults for anything not set here (the config grows; this stays valid).
        let config = keyfleet_verifier::Config {
            source: source.clone(),
            issuer: None,
            audiences: self.options.audiences.clone(),
            any_audience: self.options.audiences.is_empty(),
            leeway: Duration::from_secs(self.options.policy.leeway as u64),
            refresh_interval: Duration::from_secs(30),
            unknown_kid_cooldown: Duration::from_secs(1),
            max_stale: Duration::from_secs(3600),
            cache_dir: Some(self.dir.path().join(&name)),
            // The fleet credential the authority wrote on its first start.
            node_token_file: Some(self.node_token_file()),
            node_id: name.clone(),
            region: region.clone(),
            max_token_bytes: 8192,
            cache_entries: self
                .options
                .cache_entries
                .unwrap_or(keyfleet_verifier::DEFAULT_CACHE_ENTRIES),
            clock: self.options.clock.clone(),
            ..keyfleet_verifier::Config::new(source)
        };
        let (grpc, http) = match addrs {
            Some((g, h)) => (TcpListener::bind(g).await?, TcpListener::bind(h).await?),
            None => (listen().await?, listen().await?),
        };
        let (g, h) = (grpc.local_addr()?, http.local_addr()?);
        let stop = CancellationToken::new();
        let verifier = keyfleet_verifier::Verifier::open(config).await?;
        let serve = verifier.clone().serve(grpc, http, stop.clone());
        let task = match &self.options.runtime {
            Some(rt) => rt.spawn(serve),
            None => tokio::spawn(serve),
        };
        Ok(Node {
            name,
            region,
            grpc: g,
            http: h,
            verifier: Some(verifier),
            stop,
            task: Some(task),
        })
    }

    /// Stops verifier `i` gracefully and starts it again on the same addresses and cache dir.
    pub async fn restart_verifier(&mut self, i: usize) -> anyhow::Result<()> {
        self.verifiers[i].stop().await?;
        let addrs = (self.verifiers[i].grpc, self.verifiers[i].http);
        self.verifiers[i] = self.start_verifier(i, Some(addrs)).await?;
        Ok(())
    }

    /// Kills verifier `i` (no drain), as a crash would.
    pub fn kill_verifier(&mut self, i: usize) {
        self.verifiers[i].kill();
    }

    /// Starts a killed or stopped verifier `i` again on its addresses.
    pub async fn revive_verifier(&mut self, i: usize) -> anyhow::Result<()> {
        let addrs = (self.verifiers[i].grpc, self.verifiers[i].http);
        self.verifiers[i] = self.start_verifier(i, Some(addrs)).await?;
        Ok(())
    }

    /// Kills the authority (no drain).
    pub fn kill_authority(&mut self) {
        self.authority.kill();
    }

    /// Starts the authority again on its addresses and data dir.
    pub async fn restart_authority(&mut self) -> anyhow::Result<()> {
        self.authority.stop().await.ok();
        let addrs = (self.authority.grpc, self.authority.http);
        let (node, token) =
            Self::start_authority(&self.options, self.dir.path(), Some(addrs)).await?;
        self.authority = node;
        self.admin_token = token;
        Ok(())
    }

    /// The authority's fleet credential file (verifiers send its token on WatchJwks/GetJwks).
    pub fn node_token_file(&self) -> std::path::PathBuf {
        self.dir
            .path()
            .join("authority")
            .join(keyfleet_authority::NODE_TOKEN_FILE)
    }

    pub fn verifier_urls(&self) -> Vec<String> {
        self.verifiers.iter().map(Node::grpc_url).collect()
    }

    pub async fn authority_client(&self) -> anyhow::Result<AuthorityClient<Channel>> {
        Ok(AuthorityClient::new(
            channel(&self.authority.grpc_url()).await?,
        ))
    }

    /// Wraps `msg` with the admin credential.
    pub fn admin<T>(&self, msg: T) -> Request<T> {
        let mut req = Request::new(msg);
        if let Ok(v) = format!("Bearer {}", self.admin_token).parse() {
            req.metadata_mut().insert("authorization", v);
        }
        req
    }

    /// Mints a token for `subject` and `audience` at the authority.
    pub async fn issue(
        &self,
        subject: &str,
        audience: &str,
    ) -> anyhow::Result<keyfleet_proto::v1::IssueTokenResponse> {
        let mut client = self.authority_client().await?;
        let req = IssueTokenRequest {
            subject: subject.into(),
            audience: vec![audience.into()],
            ttl_seconds: 0,
            claims: Default::default(),
        };
        Ok(client.issue_token(self.admin(req)).await?.into_inner())
    }

    /// Rotates and waits until the promoted key signs. Returns the new active kid.
    pub async fn rotate(&self, timeout: Duration) -> anyhow::Result<String> {
        let mut client = self.authority_client().await?;
        let r = client
            .rotate_keys(self.admin(RotateKeysRequest {}))
            .await?
            .into_inner();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let list = client
                .list_keys(self.admin(ListKeysRequest {}))
                .await?
                .into_inner();
            let active = list
                .keys
                .iter()
                .find(|k| k.state() == keyfleet_proto::v1::KeyState::Active);
            if active.is_some_and(|k| k.kid == r.promoting_kid) {
                return Ok(r.promoting_kid);
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(anyhow!(
                    "key {} did not become active within {timeout:?}",
                    r.promoting_kid
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until every verifier answers Verify with a verdict (it holds a key set).
    pub async fn wait_ready(&self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + timeout;
        for node in &self.verifiers {
            let mut client = VerifierClient::new(channel(&node.grpc_url()).await?);
            loop {
                let probe = VerifyRequest {
                    token: "probe".into(),
                    audience: String::new(),
                };
                if client.verify(probe).await.is_ok() {
                    break;
                }
                if tokio::time::Instant::now() >= deadline {
                    return Err(anyhow!(
                        "{} did not get a key set within {timeout:?}",
                        node.name
                    ));
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
        }
        Ok(())
    }

    /// Stops every server.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        for v in &mut self.verifiers {
            v.stop().await.ok();
        }
        self.authority.stop().await?;
        Ok(())
    }
}

/// A lazily connecting channel to `url` (one per client; reused for every call).
pub async fn channel(url: &str) -> anyhow::Result<Channel> {
    Ok(Endpoint::from_shared(url.to_owned())?
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(10))
        .connect_lazy())
}
