//! Serving on listeners the caller has already bound (so tests bind `127.0.0.1:0` and read the
//! port before anything runs), with the standard gRPC health and reflection services.
//!
//! Every listener accepts at most its share of connections ([`Limits::max_grpc_connections`],
//! [`Limits::max_http_connections`], fitted to the descriptor limit by the binary): past it
//! the listener stops accepting (new clients wait in the kernel's backlog) instead of running
//! the process out of descriptors, so HTTP clients can never starve gRPC or the other way
//! round. HTTP/1.1 connections must send their request headers within
//! [`Limits::http_header_timeout`] (which also ends idle keep-alive connections), so a
//! slowloris client holds a connection for seconds, not forever.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_rustls::server::TlsStream;
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;

use crate::limits::{Limits, ShedLayer};
use crate::tls::{Handshaker, ServerTls, TlsError};

/// Why a server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot set up TLS on the {listener} listener")]
    Tls {
        listener: &'static str,
        #[source]
        source: TlsError,
    },
    #[error("the gRPC server failed")]
    Grpc(#[source] tonic::transport::Error),
    #[error("cannot build the gRPC reflection service")]
    Reflection(#[source] tonic_reflection::server::Error),
}

/// How long a server waits for its HTTP connections to finish their requests on shutdown.
const HTTP_DRAIN: Duration = Duration::from_secs(10);

/// A gRPC server builder with `limits`. Requests beyond a connection's stream limit wait in
/// the client (HTTP/2 flow control), never in an unbounded server queue; the budgets are the
/// load-shedding layer added by [`serve_grpc_with`].
pub fn grpc_server_with(limits: &Limits) -> tonic::transport::Server {
    tonic::transport::Server::builder()
        .timeout(limits.request_timeout)
        .max_concurrent_streams(Some(limits.max_streams_per_connection))
        .http2_max_header_list_size(Some(limits.max_header_bytes))
        // Requests are small (a token is at most a few KiB): a small per-stream window means a
        // client pushing a huge message gets refused after ~16 KiB instead of streaming it all.
        .initial_stream_window_size(Some(16 * 1024))
        .http2_keepalive_interval(Some(Duration::from_secs(20)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .tcp_nodelay(true)
}

/// How a server's listeners are served: TLS or plaintext, limits, and the load-shed counter.
#[derive(Debug, Clone, Default)]
pub struct Transport {
    /// TLS on every listener of the server (and mTLS when it names a client CA).
    pub tls: Option<ServerTls>,
    pub limits: Limits,
    /// Counts requests refused by load shedding; servers register it as `keyfleet_shed`.
    pub shed: prometheus_client::metrics::counter::Counter,
}

/// The gRPC health service (with `service` and the empty overall name set to SERVING) and
/// server reflection over keyfleet's and health's descriptors, added to `routes`.
pub async fn with_health_and_reflection(
    routes: Routes,
    service: &str,
) -> Result<(Routes, tonic_health::server::HealthReporter), ServeError> {
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    reporter
        .set_service_status(service, tonic_health::ServingStatus::Serving)
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(keyfleet_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(ServeError::Reflection)?;
    let reflection_alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(keyfleet_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .map_err(ServeError::Reflection)?;
    Ok((
        routes
            .add_service(health)
            .add_service(reflection)
            .add_service(reflection_alpha),
        reporter,
    ))
}

/// Serves `routes` over gRPC on `listener` until `shutdown` is cancelled, then drains.
pub async fn serve_grpc(
    listener: TcpListener,
    routes: Routes,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    serve_grpc_with(listener, routes, &Transport::default(), shutdown).await
}

/// [`serve_grpc`] with `transport`'s TLS, limits and load shedding.
pub async fn serve_grpc_with(
    listener: TcpListener,
    routes: Routes,
    transport: &Transport,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    let limits = transport.limits.fitted_to_process();
    let conns = Arc::new(Semaphore::new(limits.max_grpc_connections.max(1)));
    match &transport.tls {
        Some(tls) => {
            let incoming = accept_tls(listener, conns, shutdown.clone(), tls, b"h2", "gRPC")?;
            serve_grpc_on(incoming, routes, &limits, transport, shutdown).await
        }
        None => {
            let incoming = accept_plain(listener, conns, shutdown.clone());
            serve_grpc_on(incoming, routes, &limits, transport, shutdown).await
        }
    }
}

/// The gRPC server over accepted connections of either kind (plain or TLS); returns once it has
/// drained and the listener is closed.
async fn serve_grpc_on<T>(
    (incoming, acceptor): Incoming<T>,
    routes: Routes,
    limits: &Limits,
    transport: &Transport,
    shutdown: CancellationToken,
) -> Result<(), ServeError>
where
    T: tokio::io::AsyncRead
        + tokio::io::AsyncWrite
        + tonic::transport::server::Connected
        + Unpin
        + Send
        + 'static,
{
    let served = grpc_server_with(limits)
        .layer(ShedLayer::new(limits, transport.shed.clone()))
        .add_routes(routes)
        .serve_with_incoming_shutdown(
            incoming.map(|c| Ok::<_, io::Error>(Coalesced::new(c))),
            shutdown.cancelled_owned(),
        )
        .await;
    acceptor.finish().await;
    served.map_err(ServeError::Grpc)
}

/// Serves gRPC `routes` on `grpc` and the HTTP `router` on `http` with `transport` until
/// `shutdown` is cancelled or either server stops: whichever stops first (an error, or the
/// shutdown) cancels `shutdown`, which stops the other, and both drain before this returns.
/// Returns the first error. Give it a token of the server's own (a child of the process's):
/// whatever else the server runs on that token (watch streams a draining gRPC server waits for,
/// background refreshes) ends with it.
pub async fn serve_pair(
    grpc: TcpListener,
    routes: Routes,
    http: TcpListener,
    router: axum::Router,
    transport: &Transport,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    stop_together(
        &shutdown,
        serve_grpc_with(grpc, routes, transport, shutdown.clone()),
        serve_http_with(http, router, transport, shutdown.clone()),
    )
    .await
}

/// Runs two servers that stop on `stop` to their end, cancelling `stop` as soon as either
/// ends; the first error (in time) wins.
async fn stop_together(
    stop: &CancellationToken,
    a: impl Future<Output = Result<(), ServeError>>,
    b: impl Future<Output = Result<(), ServeError>>,
) -> Result<(), ServeError> {
    let first_error = std::sync::Mutex::new(None);
    let ended = |result: Result<(), ServeError>| {
        if let Err(e) = result {
            let mut first = first_error.lock().unwrap_or_else(|e| e.into_inner());
            if first.is_none() {
                *first = Some(e);
            }
        }
        stop.cancel();
    };
    tokio::join!(async { ended(a.await) }, async { ended(b.await) });
    match first_error.into_inner().unwrap_or_else(|e| e.into_inner()) {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// [`accept`] with `tls`'s handshake, offering the protocol `alpn`; `name` names the listener
/// in the error when `tls` cannot be set up.
fn accept_tls(
    listener: TcpListener,
    conns: Arc<Semaphore>,
    shutdown: CancellationToken,
    tls: &ServerTls,
    alpn: &[u8],
    name: &'static str,
) -> Result<Incoming<TlsStream<TcpStream>>, ServeError> {
    let config = tls
        .rustls_config(&[alpn])
        .map_err(|source| ServeError::Tls {
            listener: name,
            source,
        })?;
    let handshaker = Handshaker::new(config);
    Ok(accept(listener, conns, shutdown, move |tcp, peer| {
        let handshaker = handshaker.clone();
        async move { handshaker.accept(tcp, peer).await }
    }))
}

/// [`accept`] for a plaintext listener.
fn accept_plain(
    listener: TcpListener,
    conns: Arc<Semaphore>,
    shutdown: CancellationToken,
) -> Incoming<TcpStream> {
    accept(listener, conns, shutdown, |tcp, _| async move { Some(tcp) })
}

/// Accepts connections on `listener` while fewer than `conns` are open, runs `handshake` on
/// each in its own task (so a silent client never blocks the loop), and yields the connections
/// that came through it, each holding its `conns` permit for as long as it is open. Sockets
/// get `TCP_NODELAY`: without it Nagle + delayed ACK add ~40 ms to small answers. The
/// [`Acceptor`] owns the listener: a server awaits [`Acceptor::finish`] after it stops, so the
/// port is closed (and free to bind again) by the time the server returns.
fn accept<T, H, F>(
    listener: TcpListener,
    conns: Arc<Semaphore>,
    shutdown: CancellationToken,
    handshake: H,
) -> Incoming<T>
where
    T: Send + 'static,
    H: Fn(TcpStream, SocketAddr) -> F + Send + 'static,
    F: Future<Output = Option<T>> + Send + 'static,
{
    let (tx, rx) = mpsc::channel(64);
    let task = tokio::spawn(async move {
        loop {
            let permit = tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tx.closed() => return,
                permit = conns.clone().acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => return,
                },
            };
            let (tcp, peer) = tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tx.closed() => return,
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        // Out of descriptors and the like: back off briefly.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let _ = tcp.set_nodelay(true);
            let handshake = handshake(tcp, peer);
            let tx = tx.clone();
            tokio::spawn(async move {
                if let Some(io) = handshake.await {
                    let _ = tx
                        .send(Capped {
                            io,
                            peer,
                            _permit: permit,
                            silent_until: Some(Box::pin(tokio::time::sleep(FIRST_BYTES_TIMEOUT))),
                        })
                        .await;
                }
            });
        }
    });
    (ReceiverStream::new(rx), Acceptor(task))
}

/// Accepted connections, and the task that accepts them.
type Incoming<T> = (ReceiverStream<Capped<T>>, Acceptor);

/// The task that accepts on a listener (and owns it). Dropped, it is aborted; a server that
/// stops normally awaits [`Acceptor::finish`], which returns once the listener is closed.
struct Acceptor(tokio::task::JoinHandle<()>);

impl Acceptor {
    /// Waits for the accept loop to end (it ends on the shutdown, or when the server stopped
    /// taking connections) and so for the listener to be closed.
    async fn finish(mut self) {
        let _ = (&mut self.0).await;
    }
}

impl Drop for Acceptor {
    fn drop(&mut self) {
        self.0.abort();
    }
}

pin_project_lite::pin_project! {
    /// An accepted connection holding its listener's connection permit until it is dropped.
    /// A client that sends nothing within [`FIRST_BYTES_TIMEOUT`] of connecting is cut off
    /// (its reads fail), so silent connections cannot fill the cap.
    #[derive(Debug)]
    pub struct Capped<T> {
        #[pin]
        io: T,
        peer: SocketAddr,
        _permit: OwnedSemaphorePermit,
        // Until the first byte arrives (boxed: connections must be `Unpin`).
        silent_until: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
    }
}

/// How long a new connection may stay silent (no TLS hello, no HTTP/2 preface, no request).
const FIRST_BYTES_TIMEOUT: Duration = Duration::from_secs(10);

impl<T: tokio::io::AsyncRead> tokio::io::AsyncRead for Capped<T> {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        let this = self.project();
        let before = buf.filled().len();
        let read = this.io.poll_read(cx, buf);
        let Some(deadline) = this.silent_until.as_mut() else {
            return read;
        };
        if read.is_ready() {
            if buf.filled().len() > before {
                *this.silent_until = None;
            }
            return read;
        }
        if deadline.as_mut().poll(cx).is_ready() {
            return std::task::Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the client sent nothing after connecting",
            )));
        }
        read
    }
}

impl<T: tokio::io::AsyncWrite> tokio::io::AsyncWrite for Capped<T> {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        self.project().io.poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> std::task::Poll<io::Result<usize>> {
        self.project().io.poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        self.project().io.poll_flush(cx)
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        self.project().io.poll_shutdown(cx)
    }
}

impl<T: tonic::transport::server::Connected> tonic::transport::server::Connected for Capped<T> {
    type ConnectInfo = T::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

pin_project_lite::pin_project! {
    /// A connection that tells HTTP/2 it has no vectored writes.
    ///
    /// Measured (loadtest, `perf record -e raw_syscalls:sys_enter` on the verifier threads):
    /// with vectored writes h2 "chains" any DATA payload over 256 bytes instead of copying it
    /// into its write buffer, and then cannot buffer another frame until it has flushed. A
    /// ~450-byte `Verify` answer then costs two `writev`s (HEADERS+DATA, then the trailers)
    /// and never shares one with other streams' answers: 1.7 writes per `Verify` against 0.85
    /// per health `Check`. Without vectored writes h2 copies payloads up to 1 KiB into its
    /// buffer, so an answer leaves in one write, batched with its neighbours.
    #[derive(Debug)]
    pub struct Coalesced<T> {
        #[pin]
        io: T,
    }
}

impl<T> Coalesced<T> {
    pub fn new(io: T) -> Coalesced<T> {
        Coalesced { io }
    }
}

impl<T: tokio::io::AsyncRead> tokio::io::AsyncRead for Coalesced<T> {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        self.project().io.poll_read(cx, buf)
    }
}

impl<T: tokio::io::AsyncWrite> tokio::io::AsyncWrite for Coalesced<T> {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.project().io.poll_write(cx, buf)
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        self.project().io.poll_flush(cx)
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        self.project().io.poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        false
    }
}

impl<T: tonic::transport::server::Connected> tonic::transport::server::Connected for Coalesced<T> {
    type ConnectInfo = T::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

/// Serves an axum router over HTTP/1.1 on `listener` (over TLS when `transport` has it) with
/// `transport`'s connection cap and header timeout, until `shutdown` is cancelled; then lets
/// the requests in progress finish (at most [`HTTP_DRAIN`]).
pub async fn serve_http_with(
    listener: TcpListener,
    router: axum::Router,
    transport: &Transport,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    let limits = &transport.limits.fitted_to_process();
    let conns = Arc::new(Semaphore::new(limits.max_http_connections.max(1)));
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.http_header_timeout)
        .max_buf_size(64 * 1024);
    match &transport.tls {
        Some(tls) => {
            let (incoming, acceptor) =
                accept_tls(listener, conns, shutdown.clone(), tls, b"http/1.1", "HTTP")?;
            serve_http_connections(incoming, router, http, shutdown).await;
            acceptor.finish().await;
        }
        None => {
            let (incoming, acceptor) = accept_plain(listener, conns, shutdown.clone());
            serve_http_connections(incoming, router, http, shutdown).await;
            acceptor.finish().await;
        }
    }
    Ok(())
}

/// Serves an axum router over HTTP/1.1 on `listener` with the default limits.
pub async fn serve_http(
    listener: TcpListener,
    router: axum::Router,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    serve_http_with(listener, router, &Transport::default(), shutdown).await
}

async fn serve_http_connections<T>(
    mut incoming: ReceiverStream<Capped<T>>,
    router: axum::Router,
    http: hyper::server::conn::http1::Builder,
    shutdown: CancellationToken,
) where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    loop {
        let conn = tokio::select! {
            _ = shutdown.cancelled() => break,
            conn = incoming.next() => match conn {
                Some(conn) => conn,
                None => break,
            },
        };
        let peer = conn.peer;
        let service = hyper_util::service::TowerToHyperService::new(router.clone());
        let connection = graceful.watch(http.serve_connection(TokioIo::new(conn), service));
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(%peer, error = %e, "http connection ended");
            }
        });
    }
    drop(incoming);
    if tokio::time::timeout(HTTP_DRAIN, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::debug!("http connections still open after the drain period; closing them");
    }
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A server that fails stops its sibling, which still finishes the request in flight.
    #[tokio::test]
    async fn one_server_failing_stops_and_drains_the_other() {
        let http = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/slow", http.local_addr().unwrap());
        let router = axum::Router::new().route(
            "/slow",
            axum::routing::get(|| async {
                tokio::time::sleep(Duration::from_millis(400)).await;
                "done"
            }),
        );
        let stop = CancellationToken::new();
        let request = tokio::spawn(async move { reqwest::get(url).await?.text().await });
        let failing = async {
            tokio::time::sleep(Duration::from_millis(150)).await;
            Err(ServeError::Tls {
                listener: "gRPC",
                source: TlsError::NoKey,
            })
        };
        let transport = Transport::default();
        let http = serve_http_with(http, router, &transport, stop.clone());
        let served =
            tokio::time::timeout(Duration::from_secs(5), stop_together(&stop, failing, http))
                .await
                .expect("the HTTP server stopped when the other failed");
        assert!(matches!(served, Err(ServeError::Tls { .. })), "{served:?}");
        assert!(stop.is_cancelled());
        assert_eq!(
            request.await.unwrap().unwrap(),
            "done",
            "drained, not dropped"
        );
    }
}
