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
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;

use crate::limits::{Limits, ShedLayer};
use crate::tls::{Handshaker, ServerTls};

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
) -> anyhow::Result<(Routes, tonic_health::server::HealthReporter)> {
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
        .build_v1()?;
    let reflection_alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(keyfleet_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;
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
) -> anyhow::Result<()> {
    serve_grpc_with(listener, routes, &Transport::default(), shutdown).await
}

/// [`serve_grpc`] with `transport`'s TLS, limits and load shedding.
pub async fn serve_grpc_with(
    listener: TcpListener,
    routes: Routes,
    transport: &Transport,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let limits = &transport.limits.fitted_to_process();
    let server = grpc_server_with(limits)
        .layer(ShedLayer::new(limits, transport.shed.clone()))
        .add_routes(routes);
    let conns = Arc::new(Semaphore::new(limits.max_grpc_connections.max(1)));
    if let Some(tls) = &transport.tls {
        let handshaker = Handshaker::new(tls.rustls_config(&[b"h2"])?);
        let incoming = accept(listener, conns, shutdown.clone(), move |tcp, peer| {
            let handshaker = handshaker.clone();
            async move { handshaker.accept(tcp, peer).await }
        });
        server
            .serve_with_incoming_shutdown(
                incoming.map(|c| Ok::<_, io::Error>(Coalesced::new(c))),
                shutdown.cancelled_owned(),
            )
            .await?;
        return Ok(());
    }
    let incoming = accept(listener, conns, shutdown.clone(), |tcp, _| async move {
        Some(tcp)
    });
    server
        .serve_with_incoming_shutdown(
            incoming.map(|c| Ok::<_, io::Error>(Coalesced::new(c))),
            shutdown.cancelled_owned(),
        )
        .await?;
    Ok(())
}

/// Accepts connections on `listener` while fewer than `conns` are open, runs `handshake` on
/// each in its own task (so a silent client never blocks the loop), and yields the connections
/// that came through it, each holding its `conns` permit for as long as it is open. Sockets
/// get `TCP_NODELAY`: without it Nagle + delayed ACK add ~40 ms to small answers.
fn accept<T, H, F>(
    listener: TcpListener,
    conns: Arc<Semaphore>,
    shutdown: CancellationToken,
    handshake: H,
) -> ReceiverStream<Capped<T>>
where
    T: Send + 'static,
    H: Fn(TcpStream, SocketAddr) -> F + Send + 'static,
    F: Future<Output = Option<T>> + Send + 'static,
{
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
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
    ReceiverStream::new(rx)
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
) -> anyhow::Result<()> {
    let limits = &transport.limits.fitted_to_process();
    let conns = Arc::new(Semaphore::new(limits.max_http_connections.max(1)));
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.http_header_timeout)
        .max_buf_size(64 * 1024);
    match &transport.tls {
        Some(tls) => {
            let handshaker = Handshaker::new(tls.rustls_config(&[b"http/1.1"])?);
            let incoming = accept(listener, conns, shutdown.clone(), move |tcp, peer| {
                let handshaker = handshaker.clone();
                async move { handshaker.accept(tcp, peer).await }
            });
            serve_http_connections(incoming, router, http, shutdown).await
        }
        None => {
            let incoming = accept(listener, conns, shutdown.clone(), |tcp, _| async move {
                Some(tcp)
            });
            serve_http_connections(incoming, router, http, shutdown).await
        }
    }
}

/// Serves an axum router over HTTP/1.1 on `listener` with the default limits.
pub async fn serve_http(
    listener: TcpListener,
    router: axum::Router,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    serve_http_with(listener, router, &Transport::default(), shutdown).await
}

async fn serve_http_connections<T>(
    mut incoming: ReceiverStream<Capped<T>>,
    router: axum::Router,
    http: hyper::server::conn::http1::Builder,
    shutdown: CancellationToken,
) -> anyhow::Result<()>
where
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
    Ok(())
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
