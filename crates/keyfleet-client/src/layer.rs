//! [`VerifyLayer`]: a tower layer that guards an HTTP (axum, hyper) or gRPC (tonic) service.
//! It takes the bearer token from `authorization`, verifies it with any [`TokenVerifier`]
//! under the route's [`Demands`], puts the [`VerifiedClaims`] in the request's extensions and
//! calls the service; otherwise it answers itself:
//!
//! | verdict | HTTP | gRPC (`content-type: application/grpc…`) |
//! |---|---|---|
//! | no bearer token | 401, `WWW-Authenticate: Bearer` | `UNAUTHENTICATED` (16) |
//! | refused (expired, bad signature, revoked, …) | 401, `Bearer error="invalid_token", error_description="<REASON>"` | `UNAUTHENTICATED` |
//! | `INSUFFICIENT_SCOPE` | 403, `error="insufficient_scope"` and the `scope` needed | `PERMISSION_DENIED` (7) |
//! | `LOGIN_TOO_OLD` | 403, `error="insufficient_user_authentication"`, `max_age` (RFC 9470) | `PERMISSION_DENIED` |
//! | no verifier could decide | 503, `Retry-After: 1` | `UNAVAILABLE` (14) |
//!
//! gRPC refusals are trailers-only responses (`grpc-status` and `grpc-message` in the
//! headers), which every gRPC client reads as the call's status.

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue, RETRY_AFTER, WWW_AUTHENTICATE};
use http::{Request, Response, StatusCode};
use keyfleet_core::Reason;
use tower::{Layer, Service};

use crate::verdict::{BoxFuture, Demands, TokenVerifier, VerifiedClaims, VerifyError};

/// Guards a service with bearer-token verification (see the [module docs](self)). One layer
/// per set of demands: give each route the layer it needs.
///
/// ```
/// # async fn example(pool: keyfleet_client::VerifierPool) {
/// use axum::{Extension, Router, routing::get};
/// use keyfleet_client::{VerifiedClaims, VerifyLayer};
///
/// async fn orders(Extension(claims): Extension<VerifiedClaims>) -> String {
///     format!("orders of {}", claims.subject)
/// }
///
/// let read = VerifyLayer::new(pool.clone()).audience("orders").require_scopes(["orders:read"]);
/// let pay = VerifyLayer::new(pool)
///     .audience("orders")
///     .require_scopes(["orders:pay"])
///     .max_auth_age(std::time::Duration::from_secs(300));
/// let app: Router = Router::new()
///     .route("/orders", get(orders).route_layer(read))
///     .route("/pay", get(orders).route_layer(pay));
/// # let _ = app;
/// # }
/// ```
#[derive(Clone)]
pub struct VerifyLayer {
    verifier: Arc<dyn TokenVerifier>,
    demands: Arc<Demands>,
}

impl std::fmt::Debug for VerifyLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerifyLayer")
            .field("demands", &self.demands)
            .finish_non_exhaustive()
    }
}

impl VerifyLayer {
    /// Verifies with `verifier` (a [`crate::VerifierPool`], a [`crate::LocalVerifier`], or an
    /// `Arc` of one), demanding nothing beyond its policy.
    pub fn new(verifier: impl TokenVerifier) -> VerifyLayer {
        VerifyLayer {
            verifier: Arc::new(verifier),
            demands: Arc::new(Demands::none()),
        }
    }

    /// Everything demanded at once.
    pub fn demands(mut self, demands: Demands) -> VerifyLayer {
        self.demands = Arc::new(demands);
        self
    }

    /// The token's `aud` must name `audience`.
    pub fn audience(mut self, audience: impl Into<String>) -> VerifyLayer {
        Arc::make_mut(&mut self.demands).audience = Some(audience.into());
        self
    }

    /// The token's `scope` must hold each of `scopes` (else 403 / `PERMISSION_DENIED`).
    pub fn require_scopes<I: IntoIterator<Item = S>, S: Into<String>>(
        mut self,
        scopes: I,
    ) -> VerifyLayer {
        Arc::make_mut(&mut self.demands)
            .required_scopes
            .extend(scopes.into_iter().map(Into::into));
        self
    }

    /// The login behind the token may be at most `age` old (else 403 / `PERMISSION_DENIED`
    /// with `max_age`, the RFC 9470 step-up hint).
    pub fn max_auth_age(mut self, age: Duration) -> VerifyLayer {
        Arc::make_mut(&mut self.demands).max_auth_age = Some(age);
        self
    }
}

impl<S> Layer<S> for VerifyLayer {
    type Service = VerifyService<S>;

    fn layer(&self, inner: S) -> VerifyService<S> {
        VerifyService {
            inner,
            verifier: self.verifier.clone(),
            demands: self.demands.clone(),
        }
    }
}

/// The service [`VerifyLayer`] makes.
#[derive(Clone)]
pub struct VerifyService<S> {
    inner: S,
    verifier: Arc<dyn TokenVerifier>,
    demands: Arc<Demands>,
}

impl<S> std::fmt::Debug for VerifyService<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerifyService")
            .field("demands", &self.demands)
            .finish_non_exhaustive()
    }
}

/// A tonic service keeps its name (for `Routes` and reflection) under the layer.
impl<S: tonic::server::NamedService> tonic::server::NamedService for VerifyService<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for VerifyService<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    ReqBody: Send + 'static,
    ResBody: Default + Send + 'static,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Response<ResBody>, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<ReqBody>) -> Self::Future {
        // The service that was polled ready serves this request; a fresh clone takes its place.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let verifier = self.verifier.clone();
        let demands = self.demands.clone();
        Box::pin(async move {
            let grpc = is_grpc(&request);
            let Some(token) = bearer(&request) else {
                return Ok(refusal(grpc, Refusal::Missing, &demands));
            };
            let verdict = verifier.verify(&token, &demands).await;
            match verdict {
                Ok(claims) => {
                    request.extensions_mut().insert::<VerifiedClaims>(claims);
                    inner.call(request).await
                }
                Err(e) => Ok(refusal(grpc, Refusal::Verdict(&e), &demands)),
            }
        })
    }
}

/// The bearer token of `authorization` (scheme case-insensitive), if any.
fn bearer<B>(request: &Request<B>) -> Option<String> {
    let value = request.headers().get(AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then(|| token.to_owned())
}

fn is_grpc<B>(request: &Request<B>) -> bool {
    request
        .headers()
        .get(CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

enum Refusal<'a> {
    Missing,
    Verdict(&'a VerifyError),
}

/// The answer to a request that may not pass.
fn refusal<B: Default>(grpc: bool, why: Refusal<'_>, demands: &Demands) -> Response<B> {
    let reason = match &why {
        Refusal::Missing => None,
        Refusal::Verdict(e) => Some(e.reason()),
    };
    if grpc {
        let (code, message) = match reason {
            None => (16, "missing bearer token".to_owned()),
            Some(Reason::Unavailable) => (14, "no verifier could decide".to_owned()),
            Some(r @ (Reason::InsufficientScope | Reason::LoginTooOld)) => {
                (7, r.as_str().to_owned())
            }
            Some(r) => (16, r.as_str().to_owned()),
        };
        let mut response = Response::new(B::default());
        let headers = response.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        headers.insert("grpc-status", HeaderValue::from(code));
        if let Ok(message) = HeaderValue::from_str(&grpc_message(&message)) {
            headers.insert("grpc-message", message);
        }
        return response;
    }
    let (status, challenge) = match reason {
        None => (StatusCode::UNAUTHORIZED, Some("Bearer".to_owned())),
        Some(Reason::Unavailable) => (StatusCode::SERVICE_UNAVAILABLE, None),
        Some(Reason::InsufficientScope) => (
            StatusCode::FORBIDDEN,
            Some(format!(
                "Bearer error=\"insufficient_scope\", error_description=\"INSUFFICIENT_SCOPE\", scope=\"{}\"",
                quoted(&demands.required_scopes.join(" "))
            )),
        ),
        Some(Reason::LoginTooOld) => (
            StatusCode::FORBIDDEN,
            Some(format!(
                "Bearer error=\"insufficient_user_authentication\", error_description=\"LOGIN_TOO_OLD\", max_age={}",
                demands.max_auth_age_seconds()
            )),
        ),
        Some(r) => (
            StatusCode::UNAUTHORIZED,
            Some(format!(
                "Bearer error=\"invalid_token\", error_description=\"{}\"",
                r.as_str()
            )),
        ),
    };
    let mut response = Response::new(B::default());
    *response.status_mut() = status;
    let headers = response.headers_mut();
    match challenge {
        Some(c) => {
            let value = HeaderValue::from_str(&c).unwrap_or(HeaderValue::from_static("Bearer"));
            headers.insert(WWW_AUTHENTICATE, value);
        }
        None => {
            headers.insert(RETRY_AFTER, HeaderValue::from_static("1"));
        }
    }
    response
}

/// `s` with what cannot go inside a quoted header parameter left out.
fn quoted(s: &str) -> String {
    s.chars()
        .filter(|c| c.is_ascii_graphic() && *c != '"' && *c != '\\' || *c == ' ')
        .collect()
}

/// gRPC's percent-encoding of `grpc-message`: printable ASCII but `%` as it is.
fn grpc_message(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    for b in message.bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_tokens_are_found_whatever_the_scheme_case() {
        let with = |v: &str| {
            let r = Request::builder()
                .header(AUTHORIZATION, v)
                .body(())
                .unwrap();
            bearer(&r)
        };
        assert_eq!(with("Bearer abc").as_deref(), Some("abc"));
        assert_eq!(with("bearer  abc ").as_deref(), Some("abc"));
        assert_eq!(with("Basic abc"), None);
        assert_eq!(with("Bearer "), None);
        assert_eq!(bearer(&Request::new(())), None);
    }

    #[test]
    fn grpc_messages_are_percent_encoded() {
        assert_eq!(grpc_message("a b%c\u{e9}"), "a b%25c%C3%A9");
    }
}
