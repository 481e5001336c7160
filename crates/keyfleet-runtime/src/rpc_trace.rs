//! One `tracing` span per gRPC call, joined to the caller's trace through the W3C
//! `traceparent` metadata when OpenTelemetry export is on.
//!
//! Span fields are bounded: the method, the node's id and region, and the `reason`/`kid` a
//! handler may record (`Span::current().record(..)`); never a token or key material.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use opentelemetry::propagation::{Extractor, TextMapPropagator as _};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tonic::service::Routes;
use tower_layer::Layer;
use tower_service::Service;
use tracing::Span;
use tracing::field::Empty;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

/// Who serves: put on every RPC span.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServerLabels {
    /// `authority` or `verifier`.
    pub role: &'static str,
    pub node_id: String,
    pub region: String,
}

impl ServerLabels {
    /// The labels as metric attributes (see `metrics_bridge`).
    pub fn attributes(&self) -> [(&'static str, &str); 3] {
        [
            ("keyfleet_role", self.role),
            ("node_id", &self.node_id),
            ("region", &self.region),
        ]
    }
}

/// Wraps every service in `routes` (health and reflection calls pass untraced).
pub fn traced(routes: Routes, labels: ServerLabels) -> Routes {
    Routes::from(routes.into_axum_router().layer(RpcTraceLayer::new(labels)))
}

/// The tower layer behind [`traced`], for servers built by hand.
#[derive(Debug, Clone)]
pub struct RpcTraceLayer {
    labels: Arc<ServerLabels>,
}

impl RpcTraceLayer {
    pub fn new(labels: ServerLabels) -> RpcTraceLayer {
        RpcTraceLayer {
            labels: Arc::new(labels),
        }
    }
}

impl<S> Layer<S> for RpcTraceLayer {
    type Service = RpcTrace<S>;
    fn layer(&self, inner: S) -> RpcTrace<S> {
        RpcTrace {
            inner,
            labels: self.labels.clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct RpcTrace<S> {
    inner: S,
    labels: Arc<ServerLabels>,
}

impl<S, B, RB> Service<http::Request<B>> for RpcTrace<S>
where
    S: Service<http::Request<B>, Response = http::Response<RB>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Traced<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let span = rpc_span(&request, &self.labels);
        let inner = {
            let _entered = span.enter();
            self.inner.call(request)
        };
        Traced { inner, span }
    }
}

fn rpc_span<B>(request: &http::Request<B>, labels: &ServerLabels) -> Span {
    let path = request.uri().path();
    if path.starts_with("/grpc.health.") || path.starts_with("/grpc.reflection.") {
        return Span::none();
    }
    let (service, method) = path
        .trim_start_matches('/')
        .split_once('/')
        .unwrap_or(("unknown", "unknown"));
    macro_rules! rpc_span {
        ($level:expr) => {
            tracing::span!(
                $level,
                "grpc.request",
                otel.name = path.trim_start_matches('/'),
                otel.kind = "server",
                otel.status_code = Empty,
                rpc.system = "grpc",
                rpc.service = service,
                rpc.method = method,
                rpc.grpc.status_code = Empty,
                keyfleet.role = labels.role,
                node_id = labels.node_id.as_str(),
                region = labels.region.as_str(),
                reason = Empty,
                kid = Empty,
            )
        };
    }
    // Exported, the span is INFO; otherwise DEBUG, so that by default (RUST_LOG=info) the hot
    // path does not even build it.
    let span = if crate::telemetry::otel_enabled() {
        rpc_span!(tracing::Level::INFO)
    } else {
        rpc_span!(tracing::Level::DEBUG)
    };
    if crate::telemetry::otel_enabled() && !span.is_disabled() {
        let parent = TraceContextPropagator::new().extract(&Headers(request.headers()));
        let _ = span.set_parent(parent);
    }
    span
}

/// The W3C trace context headers as OpenTelemetry's propagator reads them.
struct Headers<'a>(&'a http::HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

pin_project_lite::pin_project! {
    /// The inner future, run inside the RPC span; records a non-OK `grpc-status`.
    pub struct Traced<F> {
        #[pin]
        inner: F,
        span: Span,
    }
}

impl<F, RB, E> Future for Traced<F>
where
    F: Future<Output = Result<http::Response<RB>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let _entered = this.span.enter();
        let output = std::task::ready!(this.inner.poll(cx));
        if let Ok(response) = &output {
            // A handler's error travels in the headers (trailers-only response); success
            // (status 0) comes in the trailers, after this span ends.
            let status = response
                .headers()
                .get("grpc-status")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<i64>().ok());
            match status {
                Some(code) if code != 0 => {
                    this.span.record("rpc.grpc.status_code", code);
                    this.span.record("otel.status_code", "ERROR");
                }
                _ => {
                    this.span.record("rpc.grpc.status_code", 0);
                }
            }
        } else {
            this.span.record("otel.status_code", "ERROR");
        }
        Poll::Ready(output)
    }
}
