//! A whole keyfleet cluster in this process on `127.0.0.1:0`: one authority and N verifiers,
//! each a real server on real sockets, with node restarts and kills for tests and the demo.
//! Its calls to the authority go through the one admin client (`AdminClient`), its channels
//! use the operator commands' gRPC settings (`Settings::COMMAND`).

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context as _, anyhow};
use keyfleet_authority::client::AdminClient;
use keyfleet_proto::v1::authority_client::AuthorityClient;
use keyfleet_proto::v1::verifier_client::VerifierClient;
use keyfleet_proto::v1::{IssueTokenRequest, VerifyRequest};
use keyfleet_runtime::client::Settings;
use keyfleet_runtime::tls::ClientTls;
use keyfleet_runtime::{CancellationToken, Clock};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tonic::Request;
use tonic::transport::Channel;

/// How often [`LocalCluster::rotate`] looks whether the promoted key signs yet.
const ROTATE_POLL: Duration = Duration::from_millis(50);

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
                leeway: keyfleet_core::DEFAULT_LEEWAY_SECS,
                rotation_period: keyfleet_core::DEFAULT_ROTATION_PERIOD_SECS,
                publish_ahead: 30,
            },
            issuer: "https://keyfleet.local".into(),
            clock: Clock::system(),
            runtime: None,
            cache_entries: None,
            // The load generator's default audience (`keyfleet loadtest --audience`).
            audiences: vec![crate::engine::DEFAULT_AUDIENCE.into()],
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
    /// The authority's admin client (with `admin_token`).
    admin: AdminClient,
    dir: tempfile::TempDir,
}

/// Binds `addr` again for a restarted node. A killed node's listener closes a moment after the
/// kill (its accept task sees the cancellation on its next poll), so the address may still be
/// taken briefly: retried for up to 5 s.
async fn rebind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        match TcpListener::bind(addr).await {
            Err(e)
                if e.kind() == std::io::ErrorKind::AddrInUse
                    && tokio::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            bound => return bound.with_context(|| format!("binding {addr} again")),
        }
    }
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
        let admin = admin_client(&authority, &admin_token)?;
        let mut cluster = LocalCluster {
            authority,
            verifiers: Vec::new(),
            admin_token,
            options,
            admin,
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
            issuer: options.issuer.clone(),
            policy: options.policy,
            clock: options.clock.clone(),
            watcher_timeout: Duration::from_secs(10),
            tick_interval: Duration::from_millis(200),
            ..keyfleet_authority::Config::for_test(&data_dir)
        };
        let authority =
            keyfleet_authority::Authority::open(config).context("starting the authority")?;
        let admin_token = authority.admin_token();
        let (grpc, http) = match addrs {
            Some((g, h)) => (rebind(g).await?, rebind(h).await?),
            None => (listen().await?, listen().await?),
        };
        let (g, h) = (grpc.local_addr()?, http.local_addr()?);
        let stop = CancellationToken::new();
        let serve = authority.serve(grpc, http, stop.clone());
        let task = tokio::spawn(async move { Ok(serve.await?) });
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
        // Node defaults for anything not set here; shorter intervals, so tests see changes soon.
        let mut config = keyfleet_verifier::Config::new(source);
        config.audiences = self.options.audiences.clone();
        config.any_audience = self.options.audiences.is_empty();
        config.leeway = Duration::from_secs(self.options.policy.leeway as u64);
        config.refresh_interval = Duration::from_secs(30);
        config.unknown_kid_cooldown = Duration::from_secs(1);
        config.max_stale = Duration::from_secs(3600);
        config.cache_dir = Some(self.dir.path().join(&name));
        // The fleet credential the authority wrote on its first start.
        config.node_token_file = Some(self.node_token_file());
        config.node_id = name.clone();
        config.region = region.clone();
        if let Some(entries) = self.options.cache_entries {
            config.cache_entries = entries;
        }
        config.clock = self.options.clock.clone();
        let (grpc, http) = match addrs {
            Some((g, h)) => (rebind(g).await?, rebind(h).await?),
            None => (listen().await?, listen().await?),
        };
        let (g, h) = (grpc.local_addr()?, http.local_addr()?);
        let stop = CancellationToken::new();
        let verifier = keyfleet_verifier::Verifier::open(config).await?;
        let serve = verifier.clone().serve(grpc, http, stop.clone());
        let serve = async move { serve.await.map_err(anyhow::Error::from) };
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
        self.admin = admin_client(&node, &token)?;
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

    /// The authority's admin client (cheap to clone).
    pub fn admin_client(&self) -> AdminClient {
        self.admin.clone()
    }

    /// Wraps `msg` with the admin credential.
    pub fn admin<T>(&self, msg: T) -> Request<T> {
        self.admin.authorize(msg)
    }

    /// Mints a token for `subject` and `audience` at the authority.
    pub async fn issue(
        &self,
        subject: &str,
        audience: &str,
    ) -> anyhow::Result<keyfleet_proto::v1::IssueTokenResponse> {
        let request = IssueTokenRequest {
            subject: subject.into(),
            audience: vec![audience.into()],
            ..IssueTokenRequest::default()
        };
        Ok(self.admin.issue(request).await?)
    }

    /// Rotates and waits until the promoted key signs. Returns its kid.
    pub async fn rotate(&self, timeout: Duration) -> anyhow::Result<String> {
        Ok(self.admin.rotate_and_wait(timeout, ROTATE_POLL).await?)
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
                    ..Default::default()
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

/// The admin client of the authority `node`, connecting on first use.
fn admin_client(node: &Node, admin_token: &str) -> anyhow::Result<AdminClient> {
    let (url, tls) = (node.grpc_url(), ClientTls::default());
    Ok(AdminClient::lazy(
        &url,
        &tls,
        &Settings::COMMAND,
        admin_token,
    )?)
}

/// A lazily connecting channel to `url` (one per client; reused for every call).
pub async fn channel(url: &str) -> anyhow::Result<Channel> {
    let tls = ClientTls::default();
    Ok(keyfleet_runtime::client::endpoint(url, &tls, &Settings::COMMAND)?.connect_lazy())
}
