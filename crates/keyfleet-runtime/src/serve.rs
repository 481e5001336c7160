//! Serving on listeners the caller has already bound (so tests bind `127.0.0.1:0` and read the
//! port before anything runs), with the standard gRPC health and reflection services.

use std::time::Duration;

use tokio::net::TcpListener;
use tokio_stream::StreamExt as _;
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;

use crate::limits::{Limits, ShedLayer};
use crate::tls::{ServerTls, TlsIncoming};

/// gRPC server limits shared by every keyfleet server (the defaults of [`Limits`]).
pub fn grpc_server() -> tonic::transport::Server {
    grpc_server_with(&Limits::default())
}

/// A gRPC server builder with `limits`. Requests beyond a connection's stream limit wait in
/// the client (HTTP/2 flow control), never in an unbounded server queue; the global in-flight
/// limit is the load-shedding layer added by [`serve_grpc_with`].
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
    let mut server = grpc_server_with(&transport.limits).layer(ShedLayer::new(
        transport.limits.max_inflight,
        transport.shed.clone(),
    ));
    if let Some(tls) = &transport.tls {
        let incoming = TlsIncoming::new(listener, tls.rustls_config(&[b"h2"])?, shutdown.clone())?;
        let incoming = incoming.into_stream().map(|io| io.map(Coalesced::new));
        server
            .add_routes(routes)
            .serve_with_incoming_shutdown(incoming, shutdown.cancelled_owned())
            .await?;
        return Ok(());
    }
    server
        .add_routes(routes)
        // `Server::tcp_nodelay` only applies to listeners tonic binds itself; without it on
        // accepted sockets, Nagle + delayed ACK add ~40 ms to small unary answers.
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(listener)
                .with_nodelay(Some(true))
                .map(|io| io.map(Coalesced::new)),
            shutdown.cancelled_owned(),
        )
        .await?;
    Ok(())
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

/// [`serve_http`] over TLS when `transport` has it.
pub async fn serve_http_with(
    listener: TcpListener,
    router: axum::Router,
    transport: &Transport,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let Some(tls) = &transport.tls else {
        return serve_http(listener, router, shutdown).await;
    };
    let incoming = TlsIncoming::new(
        listener,
        tls.rustls_config(&[b"http/1.1"])?,
        shutdown.clone(),
    )?;
    axum::serve(incoming, router)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await?;
    Ok(())
}

/// Serves an axum router over HTTP/1.1 on `listener` until `shutdown` is cancelled.
pub async fn serve_http(
    listener: TcpListener,
    router: axum::Router,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await?;
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
