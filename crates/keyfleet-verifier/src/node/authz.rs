//! What the proxy front ends share (Envoy ext_authz in `ext_authz.rs`, HTTP forward-auth
//! `/auth` in `http.rs`): the bearer token taken from a header, the route's policy
//! (`audience`, `scopes`, `max_auth_age`), one verdict through [`Verifier::verify_token`] (the
//! `Verify` path: cache, combined batches, metrics), and how a verdict reads for a proxy —
//! the RFC 6750 / RFC 9470 `WWW-Authenticate` challenge, the HTTP status, the gRPC code, and
//! the claims passed upstream as headers with nothing from a token able to break a header.

use keyfleet_core::Demands;
use keyfleet_proto::v1::{Reason, VerifyResponse};
use serde_json::{Map, Value};
use tonic::{Code, Status};

use super::Verifier;
use crate::config::ClaimHeader;

/// The realm of the challenge sent when a request carries no bearer token.
pub(super) const REALM: &str = "keyfleet";
/// `x-keyfleet-reason` of a request without a bearer token (no `Verify` reason applies).
pub(super) const NO_TOKEN: &str = "NO_TOKEN";

/// A route's policy, as the proxy names it per route (Envoy `context_extensions`, `/auth`
/// query parameters or headers). Each part only adds to what the node's own policy demands.
#[derive(Debug, Default)]
pub(super) struct RoutePolicy {
    /// The token's `aud` must contain it (empty: only the node's `--audience`).
    pub(super) audience: String,
    /// Each must be in the token's `scope`.
    pub(super) scopes: Vec<String>,
    /// Seconds; 0 means no step-up check.
    pub(super) max_auth_age: i64,
}

impl RoutePolicy {
    /// The policy from its three text parts (`scopes` space-separated, `max_auth_age` whole
    /// seconds). An unparseable `max_auth_age` is the proxy's misconfiguration: the error says
    /// what to fix, and the caller fails the call loudly rather than allow or deny.
    pub(super) fn parse(
        audience: Option<&str>,
        scopes: Option<&str>,
        max_auth_age: Option<&str>,
    ) -> Result<RoutePolicy, String> {
        let max_auth_age = match max_auth_age.map(str::trim) {
            None | Some("") => 0,
            Some(text) => text.parse::<i64>().ok().filter(|n| *n >= 0).ok_or_else(|| {
                format!(
                    "max_auth_age {:?} is not a whole number of seconds (0 or more): fix the route's configuration",
                    keyfleet_core::escape_untrusted(text)
                )
            })?,
        };
        Ok(RoutePolicy {
            audience: audience.unwrap_or_default().to_owned(),
            scopes: scopes
                .unwrap_or_default()
                .split_ascii_whitespace()
                .map(str::to_owned)
                .collect(),
            max_auth_age,
        })
    }

    fn demands(&self) -> Demands<'_> {
        Demands {
            required_scopes: &self.scopes,
            max_auth_age: self.max_auth_age,
        }
    }
}

/// The token of an `Authorization`-style header value: `Bearer <token>`, the scheme in any
/// case (RFC 7235). Anything else (another scheme, no token) is no bearer token at all.
pub(super) fn bearer(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    let token = token.trim_start_matches(' ');
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// What a proxy is told about one request.
pub(super) enum Decision {
    Allowed(Allowed),
    Denied(Denial),
}

/// An allowed request: what goes upstream.
pub(super) struct Allowed {
    pub(super) subject: String,
    pub(super) kid: String,
    /// The token's claims, parsed only when some header needs one.
    claims: Option<Map<String, Value>>,
}

impl Allowed {
    /// Each `--claim-header` mapping: its header and the claim's value made safe for a header,
    /// or `None` when the token has no such claim (the proxy must then drop any header of that
    /// name the client sent).
    pub(super) fn mapped<'m>(
        &self,
        mappings: &'m [ClaimHeader],
    ) -> impl Iterator<Item = (&'m str, Option<String>)> {
        mappings
            .iter()
            .map(|m| (m.header.as_str(), self.claim(&m.claim)))
    }

    /// The claim `name` as a header value: a string as it is, anything else as JSON; `None`
    /// when absent or when nothing printable is left.
    pub(super) fn claim(&self, name: &str) -> Option<String> {
        let value = match self.claims.as_ref()?.get(name)? {
            Value::String(s) => header_value(s),
            other => header_value(&other.to_string()),
        };
        (!value.is_empty()).then_some(value)
    }
}

/// A refused request.
pub(super) struct Denial {
    /// 401 (the token: missing, invalid, expired, revoked...) or 403 (scope or step-up).
    pub(super) http_status: u16,
    /// UNAUTHENTICATED or PERMISSION_DENIED, for ext_authz's `CheckResponse.status`.
    pub(super) code: Code,
    /// The keyfleet reason (`x-keyfleet-reason`), or [`NO_TOKEN`].
    pub(super) reason: &'static str,
    /// The `WWW-Authenticate` challenge.
    pub(super) challenge: String,
}

impl Verifier {
    /// Decides one proxied request: `authorization` is the value of the token's header (when
    /// the request had one). `Err` means the node cannot decide (no key set yet, or one older
    /// than `--max-stale`): the proxy must treat it as a failure of the authorizer, never as a
    /// denial. `with_claims` parses the claims even without `--claim-header` mappings.
    pub(super) async fn authorize(
        &self,
        authorization: Option<&str>,
        route: &RoutePolicy,
        with_claims: bool,
    ) -> Result<Decision, Status> {
        let Some(token) = authorization.and_then(bearer) else {
            return Ok(Decision::Denied(Denial {
                http_status: 401,
                code: Code::Unauthenticated,
                reason: NO_TOKEN,
                challenge: format!("Bearer realm=\"{REALM}\""),
            }));
        };
        let response = self
            .verify_token(token, &route.audience, route.demands())
            .await?;
        if response.valid {
            let want = with_claims || !self.inner.config.claim_headers.is_empty();
            return Ok(Decision::Allowed(allowed(response, want)));
        }
        let reason = response.reason();
        let name = reason.as_str_name();
        let denial = match reason {
            Reason::Unavailable => return Err(Status::unavailable(response.detail)),
            Reason::InsufficientScope => {
                let mut challenge =
                    format!("Bearer error=\"insufficient_scope\", error_description=\"{name}\"");
                let wanted = scope_list(&route.scopes);
                if !wanted.is_empty() {
                    challenge.push_str(&format!(", scope=\"{wanted}\""));
                }
                Denial {
                    http_status: 403,
                    code: Code::PermissionDenied,
                    reason: name,
                    challenge,
                }
            }
            // RFC 9470: the client should have the user log in again, no longer ago than this.
            Reason::LoginTooOld => Denial {
                http_status: 403,
                code: Code::PermissionDenied,
                reason: name,
                challenge: format!(
                    "Bearer error=\"insufficient_user_authentication\", error_description=\"{name}\", max_age={}",
                    route.max_auth_age
                ),
            },
            _ => Denial {
                http_status: 401,
                code: Code::Unauthenticated,
                reason: name,
                challenge: format!("Bearer error=\"invalid_token\", error_description=\"{name}\""),
            },
        };
        Ok(Decision::Denied(denial))
    }
}

fn allowed(response: VerifyResponse, with_claims: bool) -> Allowed {
    let claims = with_claims
        .then(|| serde_json::from_str::<Map<String, Value>>(&response.claims_json).ok())
        .flatten();
    Allowed {
        subject: header_value(&response.subject),
        kid: header_value(&response.kid),
        claims,
    }
}

/// `text` made safe for an HTTP header value: every control character (CR, LF, NUL, DEL, C1
/// ...) dropped, surrounding blanks trimmed. What is left cannot end a header or start another.
pub(super) fn header_value(text: &str) -> String {
    let clean: String = text.chars().filter(|c| !c.is_control()).collect();
    clean.trim_matches(' ').to_owned()
}

/// The route's scopes for the challenge's `scope` attribute, each kept to RFC 6749's scope
/// characters (no quote or backslash can reach the header).
fn scope_list(scopes: &[String]) -> String {
    let allowed = |c: &char| matches!(c, '\x21' | '\x23'..='\x5b' | '\x5d'..='\x7e');
    let tokens: Vec<String> = scopes
        .iter()
        .map(|s| s.chars().filter(allowed).collect::<String>())
        .filter(|s| !s.is_empty())
        .collect();
    tokens.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_tokens_are_found_in_any_case_and_nothing_else_is() {
        assert_eq!(bearer("Bearer abc.def.ghi"), Some("abc.def.ghi"));
        assert_eq!(bearer("bearer  abc"), Some("abc"));
        assert_eq!(bearer("BEARER abc "), Some("abc"));
        assert_eq!(bearer("Basic dXNlcjpwYXNz"), None);
        assert_eq!(bearer("Bearer"), None);
        assert_eq!(bearer("Bearer "), None);
        assert_eq!(bearer("abc.def.ghi"), None);
        assert_eq!(bearer(""), None);
    }

    #[test]
    fn header_values_never_carry_control_characters() {
        assert_eq!(header_value("alice\r\nx-admin: yes"), "alicex-admin: yes");
        assert_eq!(header_value("a\u{0}b\u{7f}c\u{85}d\te"), "abcde");
        assert_eq!(header_value("  José  "), "José");
        assert_eq!(header_value("\r\n"), "");
    }

    #[test]
    fn route_policies_parse_or_say_what_is_wrong() {
        let p = RoutePolicy::parse(Some("orders"), Some(" read  write "), Some("300")).unwrap();
        assert_eq!(p.audience, "orders");
        assert_eq!(p.scopes, ["read", "write"]);
        assert_eq!(p.max_auth_age, 300);
        let p = RoutePolicy::parse(None, None, Some("")).unwrap();
        assert!(p.audience.is_empty() && p.scopes.is_empty() && p.max_auth_age == 0);
        for bad in ["5m", "-1", "1.5", "x"] {
            let err = RoutePolicy::parse(None, None, Some(bad)).unwrap_err();
            assert!(err.contains("max_auth_age"), "{err}");
        }
        assert_eq!(
            scope_list(&["read\"".into(), "a\\b".into(), "\"".into()]),
            "read ab"
        );
    }
}
