//! The authority's HTTP side: the standard JWKS and OpenID discovery documents, Prometheus
//! metrics and a liveness probe.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Json};
use axum::routing::get;
use serde_json::{Value, json};

use crate::authority::AuthorityState;

#[derive(Clone)]
struct HttpState {
    shared: Arc<AuthorityState>,
    local_addr: SocketAddr,
}

pub(crate) fn router(shared: Arc<AuthorityState>, local_addr: SocketAddr) -> Router {
    Router::new()
        .route("/.well-known/jwks.json", get(jwks))
        .route(
            "/.well-known/openid-configuration",
            get(openid_configuration),
        )
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .with_state(HttpState { shared, local_addr })
}

/// RFC 7517 JWKS of the published keys, cacheable for a fraction of `--publish-ahead` so a
/// cached copy always learns a next key before it signs.
async fn jwks(State(state): State<HttpState>) -> impl IntoResponse {
    let published = state.shared.current();
    let keys: Vec<Value> = published
        .state
        .keys
        .values()
        .map(|k| json!({ "kty": k.kty, "crv": k.crv, "x": k.x, "kid": k.kid, "use": k.r#use, "alg": k.alg }))
        .collect();
    let cache = format!("public, max-age={}", state.shared.jwks_max_age());
    let cache = HeaderValue::from_str(&cache).expect("a digits-only header value is valid");
    (
        [(header::CACHE_CONTROL, cache)],
        Json(json!({ "keys": keys })),
    )
}

async fn openid_configuration(
    State(state): State<HttpState>,
    headers: HeaderMap,
) -> impl IntoResponse {
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .filter(|h| {
            !h.is_empty()
                && h.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-.:[]_".contains(c))
        })
        .map_or_else(|| state.local_addr.to_string(), str::to_owned);
    Json(json!({
        "issuer": state.shared.issuer,
        "jwks_uri": format!("http://{host}/.well-known/jwks.json"),
        "id_token_signing_alg_values_supported": ["EdDSA"],
    }))
}

async fn metrics(State(state): State<HttpState>) -> impl IntoResponse {
    state.shared.observe_watchers();
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.shared.metrics.encode(),
    )
}
