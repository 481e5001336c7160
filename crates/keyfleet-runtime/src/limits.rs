//! Abuse limits shared by both servers: request size and time, streams and connections, and
//! load shedding.
//!
//! A gRPC request takes a permit from its budget only once its message has arrived: until
//! then it holds no shared capacity at all, and a request whose message does not arrive within
//! [`Limits::body_timeout`] is answered `DEADLINE_EXCEEDED` and dropped. So headers without a
//! message (a "stalled" request, the gRPC form of slowloris) cannot take the permits that
//! honest callers need. Past a budget a server answers `RESOURCE_EXHAUSTED` at once (counted in
//! `keyfleet_shed_total`) instead of queueing without bound; a client backs off or tries
//! another node. Admin calls and watch streams have budgets of their own, so a flood of
//! `Verify`/`GetJwks` cannot block a revocation, and neither can a flood of watch streams.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body::Frame;
use http_body_util::BodyExt as _;
use prometheus_client::metrics::counter::Counter;
use tokio::sync::Semaphore;

/// Transport limits of one server (its gRPC and HTTP listeners).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Requests in progress (message received, answer not yet begun) across all connections;
    /// beyond it, `RESOURCE_EXHAUSTED`. Admin and watch calls have budgets of their own.
    pub max_inflight: usize,
    /// Admin calls in progress (`IssueToken`, `RotateKeys`, `RevokeKey`, `RevokeToken`,
    /// `ListKeys`).
    pub max_inflight_admin: usize,
    /// `WatchJwks` streams being opened at once (a stream holds it until its first answer).
    pub max_inflight_watch: usize,
    /// HTTP/2 streams one connection may have open at once (`SETTINGS_MAX_CONCURRENT_STREAMS`):
    /// each connection's own cap.
    pub max_streams_per_connection: u32,
    /// gRPC connections open at once; past it the listener stops accepting until one closes.
    pub max_grpc_connections: usize,
    /// A request still running after this is cancelled (`CANCELLED`); clients may ask for less
    /// with `grpc-timeout`.
    pub request_timeout: Duration,
    /// A request's message must have arrived this long after its headers (the whole body of a
    /// unary call, the first message of a client stream), or it is answered
    /// `DEADLINE_EXCEEDED` and dropped.
    pub body_timeout: Duration,
    /// Largest request body received before a permit is taken (bigger: `RESOURCE_EXHAUSTED`).
    /// Each service still enforces its own, smaller message limit.
    pub max_request_bytes: usize,
    /// Largest HTTP/2 header block a client may send.
    pub max_header_bytes: u32,
    /// HTTP connections open at once; past it the listener stops accepting until one closes.
    pub max_http_connections: usize,
    /// An HTTP/1.1 request's headers must arrive within this; it also bounds how long an idle
    /// keep-alive connection waits for its next request.
    pub http_header_timeout: Duration,
}

/// Descriptors kept free for everything that is not a client connection (key files, the
/// authority stream, logs, DNS).
const RESERVED_FDS: u64 = 64;

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_inflight: 2048,
            max_inflight_admin: 64,
            max_inflight_watch: 256,
            max_streams_per_connection: 256,
            max_grpc_connections: 8192,
            request_timeout: Duration::from_secs(30),
            body_timeout: Duration::from_secs(5),
            max_request_bytes: 256 * 1024,
            max_header_bytes: 16 * 1024,
            max_http_connections: 1024,
            http_header_timeout: Duration::from_secs(10),
        }
    }
}

impl Limits {
    /// These limits with the connection caps fitted to `open_files` descriptors (the process's
    /// `RLIMIT_NOFILE`): HTTP may use at most a quarter of them and gRPC at most half, so
    /// connections to one listener can never take the descriptors the other needs.
    pub fn fitted_to(&self, open_files: u64) -> Limits {
        let usable = open_files.saturating_sub(RESERVED_FDS).max(8);
        let cap = |n: usize, share: u64| n.min(usize::try_from(usable / share).unwrap_or(n)).max(1);
        Limits {
            max_http_connections: cap(self.max_http_connections, 4),
            max_grpc_connections: cap(self.max_grpc_connections, 2),
            ..self.clone()
        }
    }

    /// [`Limits::fitted_to`] the process's descriptor limit, after raising its soft limit to
    /// the hard one (what Go's runtime does at start): a server should not run out of
    /// descriptors below what the operator allowed.
    pub fn fitted_to_process(&self) -> Limits {
        let open_files = match rlimit::increase_nofile_limit(u64::MAX) {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the open-files limit; assuming 1024");
                1024
            }
        };
        self.fitted_to(open_files)
    }
}

/// Which budget a gRPC method draws from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Budget {
    /// Everything else: `Verify`, `GetJwks`, health, reflection.
    Serve,
    /// Admin calls on the authority.
    Admin,
    /// `WatchJwks` stream opens.
    Watch,
}

/// The budget of the gRPC method at `path` (`/package.Service/Method`).
pub fn budget_of(path: &str) -> Budget {
    match path.strip_prefix("/keyfleet.v1.Authority/") {
        Some("WatchJwks") => Budget::Watch,
        Some("GetJwks") | None => Budget::Serve,
        Some(_) => Budget::Admin,
    }
}

/// Whether the method at `path` streams messages from the client, so only its first message
/// is awaited before it runs (a unary call's whole body is awaited).
fn client_streams(path: &str) -> bool {
    path == "/keyfleet.v1.Authority/WatchJwks" || path.ends_with("/ServerReflectionInfo")
}

/// The load-shedding layer: waits for a request's message (without holding anything shared),
/// then takes a permit from the method's budget for as long as the handler runs.
#[derive(Clone, Debug)]
pub struct ShedLayer {
    serve: Arc<Semaphore>,
    admin: Arc<Semaphore>,
    watch: Arc<Semaphore>,
    body_timeout: Duration,
    max_request_bytes: usize,
    shed: Counter,
}

impl ShedLayer {
    /// Sheds past `limits`' budgets, counting each refusal in `shed`.
    pub fn new(limits: &Limits, shed: Counter) -> ShedLayer {
        let budget = |n: usize| Arc::new(Semaphore::new(n.max(1)));
        ShedLayer {
            serve: budget(limits.max_inflight),
            admin: budget(limits.max_inflight_admin),
            watch: budget(limits.max_inflight_watch),
            body_timeout: limits.body_timeout,
            max_request_bytes: limits.max_request_bytes,
            shed,
        }
    }

    fn budget(&self, budget: Budget) -> &Arc<Semaphore> {
        match budget {
            Budget::Serve => &self.serve,
            Budget::Admin => &self.admin,
            Budget::Watch => &self.watch,
        }
    }
}

impl<S> tower_layer::Layer<S> for ShedLayer {
    type Service = Shed<S>;

    fn layer(&self, inner: S) -> Shed<S> {
        Shed {
            inner,
            layer: self.clone(),
        }
    }
}

/// See [`ShedLayer`].
#[derive(Clone, Debug)]
pub struct Shed<S> {
    inner: S,
    layer: ShedLayer,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S> tower_service::Service<http::Request<tonic::body::Body>> for Shed<S>
where
    S: tower_service::Service<
            http::Request<tonic::body::Body>,
            Response = http::Response<tonic::body::Body>,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, S::Error>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Readiness is checked on the clone that runs the request, once its message is in.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        // The clone that runs this request; `self.inner` stays ready for the next one.
        let inner = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, inner);
        let layer = self.layer.clone();
        let budget = budget_of(request.uri().path());
        let first_only = client_streams(request.uri().path());
        Box::pin(async move {
            let (parts, body) = request.into_parts();
            let received = tokio::time::timeout(
                layer.body_timeout,
                receive(body, first_only, layer.max_request_bytes),
            )
            .await;
            let body = match received {
                Ok(Ok(body)) => body,
                Ok(Err(status)) => return Ok(status.into_http()),
                Err(_) => {
                    return Ok(tonic::Status::deadline_exceeded(format!(
                        "the request message did not arrive within {:?} of its headers",
                        layer.body_timeout
                    ))
                    .into_http());
                }
            };
            let Ok(permit) = layer.budget(budget).clone().try_acquire_owned() else {
                layer.shed.inc();
                let status = tonic::Status::resource_exhausted(
                    "the node is overloaded: retry with backoff or on another node",
                );
                return Ok(status.into_http());
            };
            std::future::poll_fn(|cx| inner.poll_ready(cx)).await?;
            let response = inner
                .call(http::Request::from_parts(
                    parts,
                    tonic::body::Body::new(body),
                ))
                .await;
            // Held until the answer's headers exist: a long stream (WatchJwks) does not
            // hold a permit for its lifetime.
            drop(permit);
            response
        })
    }
}

/// Reads `body` until its end (or, when `first_only`, until it holds one whole gRPC message:
/// a 5-byte prefix and the length it names), refusing more than `max` bytes.
async fn receive(
    mut body: tonic::body::Body,
    first_only: bool,
    max: usize,
) -> Result<Received, tonic::Status> {
    // Most requests arrive in one DATA frame: keep it as it came, copy only when there are more.
    let mut head = Bytes::new();
    let mut trailers = None;
    loop {
        if first_only && whole_message(&head) {
            return Ok(Received::new(head, None, Some(body)));
        }
        let Some(frame) = body.frame().await else {
            return Ok(Received::new(head, trailers, None));
        };
        match frame?.into_data() {
            Ok(data) => {
                if head.len() + data.len() > max {
                    return Err(tonic::Status::resource_exhausted(format!(
                        "request body larger than {max} bytes"
                    )));
                }
                head = if head.is_empty() {
                    data
                } else {
                    let mut joined = BytesMut::with_capacity(head.len() + data.len());
                    joined.extend_from_slice(&head);
                    joined.extend_from_slice(&data);
                    joined.freeze()
                };
            }
            Err(frame) => {
                if let Ok(t) = frame.into_trailers() {
                    trailers = Some(t);
                }
            }
        }
    }
}

/// Whether `buf` starts with a whole gRPC message.
fn whole_message(buf: &[u8]) -> bool {
    buf.len() >= 5 && {
        let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
        buf.len() - 5 >= len
    }
}

/// A request body whose beginning has been received: the bytes read so far, then (for a
/// client stream) the rest as it comes.
struct Received {
    head: Option<Bytes>,
    trailers: Option<http::HeaderMap>,
    rest: Option<tonic::body::Body>,
}

impl Received {
    fn new(
        head: Bytes,
        trailers: Option<http::HeaderMap>,
        rest: Option<tonic::body::Body>,
    ) -> Received {
        Received {
            head: Some(head).filter(|h| !h.is_empty()),
            trailers,
            rest,
        }
    }
}

impl http_body::Body for Received {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
        if let Some(head) = self.head.take() {
            return Poll::Ready(Some(Ok(Frame::data(head))));
        }
        if let Some(rest) = self.rest.as_mut() {
            return Pin::new(rest).poll_frame(cx);
        }
        Poll::Ready(self.trailers.take().map(|t| Ok(Frame::trailers(t))))
    }

    fn is_end_stream(&self) -> bool {
        self.head.is_none()
            && self.trailers.is_none()
            && self.rest.as_ref().is_none_or(|r| r.is_end_stream())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budgets_by_method() {
        let cases = [
            ("/keyfleet.v1.Verifier/Verify", Budget::Serve),
            ("/keyfleet.v1.Authority/GetJwks", Budget::Serve),
            ("/grpc.health.v1.Health/Check", Budget::Serve),
            ("/keyfleet.v1.Authority/WatchJwks", Budget::Watch),
            ("/keyfleet.v1.Authority/RevokeToken", Budget::Admin),
            ("/keyfleet.v1.Authority/IssueToken", Budget::Admin),
            ("/keyfleet.v1.Authority/ListKeys", Budget::Admin),
        ];
        for (path, want) in cases {
            assert_eq!(budget_of(path), want, "{path}");
        }
    }

    #[test]
    fn whole_messages() {
        assert!(!whole_message(b""));
        assert!(!whole_message(&[0, 0, 0, 0]));
        assert!(whole_message(&[0, 0, 0, 0, 0]));
        assert!(!whole_message(&[0, 0, 0, 0, 2, 1]));
        assert!(whole_message(&[0, 0, 0, 0, 2, 1, 2]));
    }

    #[test]
    fn connection_caps_fit_the_descriptor_limit() {
        let limits = Limits::default();
        let big = limits.fitted_to(1 << 20);
        assert_eq!(big.max_http_connections, limits.max_http_connections);
        assert_eq!(big.max_grpc_connections, limits.max_grpc_connections);
        let small = limits.fitted_to(256);
        assert_eq!(small.max_http_connections, 48);
        assert_eq!(small.max_grpc_connections, 96);
        assert!(small.max_http_connections + small.max_grpc_connections + 64 <= 256);
    }
}
