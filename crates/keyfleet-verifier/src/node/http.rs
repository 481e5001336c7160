//! The node's HTTP endpoints: `GET /metrics`, `GET /healthz`, `GET /readyz`.

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;

use super::Verifier;

impl Verifier {
    /// `GET /metrics`, `GET /healthz`, `GET /readyz`.
    pub fn router(&self) -> axum::Router {
        axum::Router::new()
            .route("/metrics", get(metrics_handler))
            .route("/healthz", get(|| async { "ok" }))
            .route("/readyz", get(readyz_handler))
            .with_state(self.clone())
    }

    /// The Prometheus exposition, with the gauges computed at scrape time refreshed.
    pub(super) fn render_metrics(&self) -> String {
        let metrics = &self.inner.metrics;
        metrics.jwks_age.set(self.inner.keys.age().unwrap_or(-1));
        metrics.jwks_version.set(self.inner.keys.version() as i64);
        if let Some(relay) = &self.inner.relay {
            metrics.relay_streams.set(relay.streams_open() as i64);
        }
        metrics.encode()
    }
}

async fn metrics_handler(State(node): State<Verifier>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        node.render_metrics(),
    )
}

async fn readyz_handler(State(node): State<Verifier>) -> (StatusCode, &'static str) {
    if node.inner.keys.current().is_none() {
        (StatusCode::SERVICE_UNAVAILABLE, "no key set yet\n")
    } else if node.inner.keys.is_stale() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "key set older than --max-stale\n",
        )
    } else {
        (StatusCode::OK, "ready\n")
    }
}
