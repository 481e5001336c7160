//! Envoy external authorization: `envoy.service.auth.v3.Authorization/Check` on the gRPC
//! port, next to `keyfleet.v1.Verifier` and behind the same limits (its path takes the serve
//! budget of `keyfleet_runtime::limits`).
//!
//! The token comes from `--authz-header` (Envoy lower-cases header names; `encode_raw_headers`
//! is understood too) and is verified exactly like `Verify` (`authz.rs`). The route's policy
//! comes from the route's `context_extensions`: `audience`, `scopes` (space-separated) and
//! `max_auth_age` (seconds). Answers:
//! - allowed: `OK`, with `x-keyfleet-subject`, `x-keyfleet-kid` and the `--claim-header`
//!   mappings overwriting whatever the client sent under those names (a mapped claim the token
//!   lacks removes the client's header), and the token's header removed unless
//!   `--keep-authorization`;
//! - refused: `UNAUTHENTICATED` (401) or `PERMISSION_DENIED` (403, scope or step-up), a
//!   `WWW-Authenticate` challenge and `x-keyfleet-reason` for the client;
//! - cannot decide (no key set, older than `--max-stale`): the call fails with `UNAVAILABLE`,
//!   so Envoy's `failure_mode_allow` decides, never a denial;
//! - a `max_auth_age` that is not a number: the call fails with `INVALID_ARGUMENT` (a
//!   misconfigured route is loud, not silently allowed or denied).

use envoy_types::ext_authz::v3::pb::{
    Authorization, CheckRequest, CheckResponse, DeniedHttpResponse, HeaderAppendAction,
    HeaderValue, HeaderValueOption, HttpResponse, HttpStatus, OkHttpResponse,
};
use envoy_types::pb::google::rpc;
use tonic::{Code, Request, Response, Status};

use super::Verifier;
use super::authz::{Decision, RoutePolicy};

/// `CheckRequest`s larger than this are refused before they are buffered: Envoy's default
/// header limit (60 KiB) with room to spare. Do not have Envoy send request bodies.
pub(super) const MAX_CHECK_REQUEST_BYTES: usize = 256 * 1024;

/// The `Authorization` service of a node.
#[derive(Clone)]
pub(crate) struct ExtAuthz(pub(crate) Verifier);

#[tonic::async_trait]
impl Authorization for ExtAuthz {
    async fn check(
        &self,
        request: Request<CheckRequest>,
    ) -> Result<Response<CheckResponse>, Status> {
        let node = &self.0;
        let config = &node.inner.config;
        let attributes = request.into_inner().attributes.unwrap_or_default();
        let context = &attributes.context_extensions;
        let route = RoutePolicy::parse(
            context.get("audience").map(String::as_str),
            context.get("scopes").map(String::as_str),
            context.get("max_auth_age").map(String::as_str),
        )
        .map_err(Status::invalid_argument)?;
        let http = attributes.request.and_then(|r| r.http).unwrap_or_default();
        let name = config.authz_header.as_str();
        let authorization = match http.headers.get(name) {
            Some(value) => Some(value.clone()),
            // `encode_raw_headers`: repeated entries, not merged (merged here as Envoy would).
            None => http.header_map.and_then(|map| {
                let values: Vec<String> = (map.headers.iter())
                    .filter(|h| h.key.eq_ignore_ascii_case(name))
                    .map(|h| match h.raw_value.is_empty() {
                        true => h.value.clone(),
                        false => String::from_utf8_lossy(&h.raw_value).into_owned(),
                    })
                    .collect();
                (!values.is_empty()).then(|| values.join(","))
            }),
        };
        let answer = match node
            .authorize(authorization.as_deref(), &route, false)
            .await?
        {
            Decision::Allowed(allowed) => {
                let mut headers = Vec::new();
                let mut headers_to_remove = Vec::new();
                if !config.keep_authorization {
                    headers_to_remove.push(name.to_owned());
                }
                // A value with nothing printable left is removed: Envoy skips an empty value,
                // which would leave a client's header of that name in place.
                let subject = Some(allowed.subject.clone()).filter(|s| !s.is_empty());
                let kid = Some(allowed.kid.clone()).filter(|s| !s.is_empty());
                let ours = [("x-keyfleet-subject", subject), ("x-keyfleet-kid", kid)];
                for (name, value) in ours
                    .into_iter()
                    .chain(allowed.mapped(&config.claim_headers))
                {
                    match value {
                        Some(value) => headers.push(header(name, value)),
                        None => headers_to_remove.push(name.to_owned()),
                    }
                }
                CheckResponse {
                    status: Some(rpc::Status {
                        code: Code::Ok as i32,
                        ..rpc::Status::default()
                    }),
                    http_response: Some(HttpResponse::OkResponse(OkHttpResponse {
                        headers,
                        headers_to_remove,
                        ..OkHttpResponse::default()
                    })),
                    ..CheckResponse::default()
                }
            }
            Decision::Denied(denial) => CheckResponse {
                status: Some(rpc::Status {
                    code: denial.code as i32,
                    message: denial.reason.to_owned(),
                    ..rpc::Status::default()
                }),
                http_response: Some(HttpResponse::DeniedResponse(DeniedHttpResponse {
                    status: Some(HttpStatus {
                        code: i32::from(denial.http_status),
                    }),
                    headers: vec![
                        header("www-authenticate", denial.challenge),
                        header("x-keyfleet-reason", denial.reason.to_owned()),
                    ],
                    body: format!("{}\n", denial.reason),
                })),
                ..CheckResponse::default()
            },
        };
        Ok(Response::new(answer))
    }
}

/// A header that replaces any of the same name (the client's own `x-keyfleet-subject` never
/// reaches the upstream next to ours).
fn header(key: &str, value: String) -> HeaderValueOption {
    HeaderValueOption {
        header: Some(HeaderValue {
            key: key.to_owned(),
            value,
            ..HeaderValue::default()
        }),
        append_action: HeaderAppendAction::OverwriteIfExistsOrAdd as i32,
        ..HeaderValueOption::default()
    }
}
