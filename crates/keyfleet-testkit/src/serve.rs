//! Servers under test on loopback port 0: bind, take the address, serve in a task, connect at
//! once. A [`Task`] is cancelled when dropped (a failing test leaves nothing serving), and
//! [`Task::stop`] checks that the server drains and returns `Ok`.

use std::fmt::Debug;
use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use keyfleet_runtime::CancellationToken;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tonic::service::Routes;

/// How long a server may take to drain once cancelled.
pub const DRAIN: Duration = Duration::from_secs(10);

/// A listener on 127.0.0.1 at a port the system picks, and that port's address.
pub async fn loopback() -> (TcpListener, SocketAddr) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    (listener, addr)
}

/// A spawned server: cancelled on drop.
pub struct Task {
    shutdown: CancellationToken,
    handle: JoinHandle<Result<(), String>>,
}

impl Task {
    /// Spawns `server`, which stops when `shutdown` is cancelled.
    pub fn spawn<Fut, E>(shutdown: CancellationToken, server: Fut) -> Task
    where
        Fut: Future<Output = Result<(), E>> + Send + 'static,
        E: Debug + Send + 'static,
    {
        let handle = tokio::spawn(async move { server.await.map_err(|e| format!("{e:?}")) });
        Task { shutdown, handle }
    }

    /// Cancels and checks that the server drains within [`DRAIN`] and returns `Ok`.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        tokio::time::timeout(DRAIN, &mut self.handle)
            .await
            .unwrap_or_else(|_| panic!("the server did not drain within {DRAIN:?}"))
            .expect("the server task panicked")
            .unwrap_or_else(|e| panic!("the server returned an error: {e}"));
    }
}

impl Drop for Task {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// A server with a gRPC and an HTTP listener, as keyfleet's authority and verifier are.
pub struct Pair {
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    pub task: Task,
}

impl Pair {
    /// Binds two loopback listeners and spawns `serve(grpc, http, shutdown)` on them.
    pub async fn start<F, Fut, E>(serve: F) -> Pair
    where
        F: FnOnce(TcpListener, TcpListener, CancellationToken) -> Fut,
        Fut: Future<Output = Result<(), E>> + Send + 'static,
        E: Debug + Send + 'static,
    {
        let (grpc_listener, grpc) = loopback().await;
        let (http_listener, http) = loopback().await;
        let shutdown = CancellationToken::new();
        let task = Task::spawn(
            shutdown.clone(),
            serve(grpc_listener, http_listener, shutdown),
        );
        Pair { grpc, http, task }
    }

    /// `http://` and the gRPC address.
    pub fn grpc_url(&self) -> String {
        format!("http://{}", self.grpc)
    }

    /// See [`Task::stop`].
    pub async fn stop(self) {
        self.task.stop().await;
    }
}

/// Serves `routes` (a fake gRPC service) on a loopback port.
pub async fn grpc(routes: Routes) -> (SocketAddr, Task) {
    let (listener, addr) = loopback().await;
    let shutdown = CancellationToken::new();
    let server = keyfleet_runtime::serve::serve_grpc(listener, routes, shutdown.clone());
    (addr, Task::spawn(shutdown, server))
}

/// Serves `router` (a fake HTTP service) on a loopback port.
pub async fn http(router: axum::Router) -> (SocketAddr, Task) {
    let (listener, addr) = loopback().await;
    let shutdown = CancellationToken::new();
    let server = keyfleet_runtime::serve::serve_http(listener, router, shutdown.clone());
    (addr, Task::spawn(shutdown, server))
}
