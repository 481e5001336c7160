//! The node's HTTP endpoints: `GET /metrics`, `GET /healthz`, `GET /readyz`, and `/auth`
//! (any method), the forward-auth endpoint of nginx `auth_request`, Traefik `ForwardAuth` and
//! Caddy `forward_auth`.
//!
//! `/auth` takes the token from `--authz-header` (`Authorization: Bearer …`) and the route's
//! policy from the query parameters `audience`, `scopes` (space-separated) and `max_auth_age`
//! (seconds), or, for a parameter the query does not name, from the headers
//! `X-Keyfleet-Audience`, `X-Keyfleet-Scopes` and `X-Keyfleet-Max-Auth-Age` (a proxy that
//! forwards the client's headers lets a client add demands, never lift one: each part only
//! narrows what passes). It verifies exactly like `Verify` (`authz.rs`) and answers 200 with
//! `X-Auth-Request-User` and `Remote-User` (the `sub` claim), `X-Auth-Request-Email` (when the
//! token has an `email` claim) and the `--claim-header` mappings; 401 or 403 with
//! `WWW-Authenticate` and `X-Keyfleet-Reason`; 503 when the node cannot decide; 400 for a
//! `max_auth_age` that is not a number. The body is never read; the HTTP server's limits
//! (header deadline, connection cap: `keyfleet_runtime::serve`) apply as to every endpoint.

use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};

use super::Verifier;
use super::authz::{Decision, RoutePolicy};

impl Verifier {
    /// `GET /metrics`, `GET /healthz`, `GET /readyz`, `/auth`.
    pub fn router(&self) -> axum::Router {
        axum::Router::new()
            .route("/metrics", get(metrics_handler))
            .route("/healthz", get(|| async { "ok" }))
            .route("/readyz", get(readyz_handler))
            .route("/auth", any(auth_handler))
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

/// `/auth`'s query parameters (others are ignored).
#[derive(serde::Deserialize)]
struct AuthQuery {
    audience: Option<String>,
    scopes: Option<String>,
    max_auth_age: Option<String>,
}

async fn auth_handler(
    State(node): State<Verifier>,
    Query(query): Query<AuthQuery>,
    headers: HeaderMap,
) -> Response {
    let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let route = RoutePolicy::parse(
        query
            .audience
            .as_deref()
            .or_else(|| text("x-keyfleet-audience")),
        query
            .scopes
            .as_deref()
            .or_else(|| text("x-keyfleet-scopes")),
        query
            .max_auth_age
            .as_deref()
            .or_else(|| text("x-keyfleet-max-auth-age")),
    );
    let route = match route {
        Ok(route) => route,
        Err(why) => return (StatusCode::BAD_REQUEST, format!("{why}\n")).into_response(),
    };
    let config = &node.inner.config;
    let authorization = text(&config.authz_header);
    let decision = match node.authorize(authorization, &route, true).await {
        Ok(decision) => decision,
        Err(status) => {
            let body = format!("the verifier cannot decide: {}\n", status.message());
            return (StatusCode::SERVICE_UNAVAILABLE, body).into_response();
        }
    };
    let mut out = HeaderMap::new();
    let mut set = |name: &str, value: &str| {
        // `header_value` already dropped every control character; a value the header type
        // still refuses is left out rather than sent broken.
        if let (Ok(name), Ok(value)) = (
            HeaderName::try_from(name),
            HeaderValue::from_bytes(value.as_bytes()),
        ) {
            out.insert(name, value);
        }
    };
    match decision {
        Decision::Allowed(allowed) => {
            if !allowed.subject.is_empty() {
                set("x-auth-request-user", &allowed.subject);
                set("remote-user", &allowed.subject);
            }
            if let Some(email) = allowed.claim("email") {
                set("x-auth-request-email", &email);
            }
            for (name, value) in allowed.mapped(&config.claim_headers) {
                if let Some(value) = value {
                    set(name, &value);
                }
            }
            (StatusCode::OK, out).into_response()
        }
        Decision::Denied(denial) => {
            set("www-authenticate", &denial.challenge);
            set("x-keyfleet-reason", denial.reason);
            let status =
                StatusCode::from_u16(denial.http_status).unwrap_or(StatusCode::UNAUTHORIZED);
            (status, out, format!("{}\n", denial.reason)).into_response()
        }
    }
}
