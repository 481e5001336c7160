//! Abuse limits shared by both servers: request size and time, streams per connection, and
//! load shedding. Past [`Limits::max_inflight`] concurrent requests a server answers
//! `RESOURCE_EXHAUSTED` at once (counted in `keyfleet_shed_total`) instead of queueing without
//! bound; a client backs off or tries another node.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use tokio::sync::Semaphore;

/// Transport limits of one gRPC server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Requests in progress across all connections; beyond it, `RESOURCE_EXHAUSTED`.
    pub max_inflight: usize,
    /// HTTP/2 streams one connection may have open at once (`SETTINGS_MAX_CONCURRENT_STREAMS`).
    pub max_streams_per_connection: u32,
    /// A request still running after this is cancelled (`CANCELLED`); clients may ask for less
    /// with `grpc-timeout`.
    pub request_timeout: Duration,
    /// Largest HTTP/2 header block a client may send.
    pub max_header_bytes: u32,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_inflight: 2048,
            max_streams_per_connection: 256,
            request_timeout: Duration::from_secs(30),
            max_header_bytes: 16 * 1024,
        }
    }
}

/// The load-shedding layer: a global permit per request in progress.
#[derive(Clone, Debug)]
pub struct ShedLayer {
    permits: Arc<Semaphore>,
    shed: Counter,
}

impl ShedLayer {
    /// Sheds past `max_inflight` requests in progress, counting each in `shed`.
    pub fn new(max_inflight: usize, shed: Counter) -> ShedLayer {
        ShedLayer {
            permits: Arc::new(Semaphore::new(max_inflight.max(1))),
            shed,
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

impl<S, B> tower_service::Service<http::Request<B>> for Shed<S>
where
    S: tower_service::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let Ok(permit) = self.layer.permits.clone().try_acquire_owned() else {
            self.layer.shed.inc();
            let status = tonic::Status::resource_exhausted(
                "the node is overloaded: retry with backoff or on another node",
            );
            return Box::pin(std::future::ready(Ok(status.into_http())));
        };
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = response.await;
            // Held until the answer's headers exist: a long stream (WatchJwks) does not
            // hold a permit for its lifetime.
            drop(permit);
            response
        })
    }
}
