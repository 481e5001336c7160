//! What every verifier of this crate answers: the caller's [`Demands`], the [`VerifiedClaims`]
//! of a valid token, a [`VerifyError`] otherwise, and the [`TokenVerifier`] trait that the
//! pool and the in-process verifier implement (and [`crate::VerifyLayer`] calls).

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use keyfleet_core::{Reason, UnixSeconds};
use keyfleet_proto::v1::{self as pb, VerifyRequest, VerifyResponse};
use serde_json::{Map, Value};

/// A boxed, sendable future: what [`TokenVerifier::verify`] returns.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What a caller demands of a token beyond the verifier's own policy (per route, in
/// [`crate::VerifyLayer`]): an audience, scopes, a recent login.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Demands {
    /// The token's `aud` must contain it (besides one of the verifier's `--audience`s).
    pub audience: Option<String>,
    /// Each must be in the token's space-separated `scope` claim, else `INSUFFICIENT_SCOPE`.
    pub required_scopes: Vec<String>,
    /// When set, the login behind the token (`auth_time`) may be at most this old, else
    /// `LOGIN_TOO_OLD` (RFC 9470 step-up). Whole seconds count.
    pub max_auth_age: Option<Duration>,
}

impl Demands {
    /// Nothing beyond the verifier's policy.
    pub fn none() -> Demands {
        Demands::default()
    }

    /// The `Verify` request that asks a node for `token` under these demands.
    pub fn request(&self, token: &str) -> VerifyRequest {
        VerifyRequest {
            token: token.to_owned(),
            audience: self.audience.clone().unwrap_or_default(),
            required_scopes: self.required_scopes.clone(),
            max_auth_age_seconds: self.max_auth_age_seconds(),
        }
    }

    /// `max_auth_age` in the wire's whole seconds (0: no step-up check; a sub-second age
    /// counts as 1 s, never as "no check").
    pub fn max_auth_age_seconds(&self) -> i64 {
        self.max_auth_age.map_or(0, |age| {
            i64::try_from(age.as_secs().max(1)).unwrap_or(i64::MAX)
        })
    }
}

/// A valid token: who it names and what it says. [`crate::VerifyLayer`] puts it in the
/// request's extensions.
#[derive(Debug, Clone, PartialEq)]
pub struct VerifiedClaims {
    /// `sub`.
    pub subject: String,
    /// The key that signed it.
    pub kid: String,
    /// `iss`.
    pub issuer: String,
    /// `jti` (empty when the token has none).
    pub jti: String,
    /// `exp`, Unix seconds.
    pub expires_at: UnixSeconds,
    /// Every claim of the token, as JSON.
    pub claims: Map<String, Value>,
    /// The verifier node that answered (its `--node-id`), or the in-process verifier's.
    pub node_id: String,
}

impl VerifiedClaims {
    /// The token's scopes (`scope`, space-separated).
    pub fn scopes(&self) -> impl Iterator<Item = &str> {
        let scope = match self.claims.get("scope") {
            Some(Value::String(s)) => s.as_str(),
            _ => "",
        };
        scope.split(' ').filter(|s| !s.is_empty())
    }
}

/// Why a token was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    /// A verdict: the token is refused for `reason` (never [`Reason::Ok`] or
    /// [`Reason::Unavailable`]). `detail` is the verifier's explanation, for logs, not users.
    #[error("token refused: {reason} ({detail})")]
    Refused { reason: Reason, detail: String },
    /// No verifier could decide (every node failed or said UNAVAILABLE, the call's deadline
    /// passed, or the in-process key set is missing or older than `--max-stale`): fail closed
    /// and try again later.
    #[error("no verifier could decide: {0}")]
    Unavailable(String),
}

impl VerifyError {
    /// The verdict's reason ([`Reason::Unavailable`] when no verifier could decide).
    pub fn reason(&self) -> Reason {
        match self {
            VerifyError::Refused { reason, .. } => *reason,
            VerifyError::Unavailable(_) => Reason::Unavailable,
        }
    }
}

/// Something that verifies bearer tokens: a [`crate::VerifierPool`] (a node answers) or a
/// [`crate::LocalVerifier`] (this process answers). Same verdicts either way.
pub trait TokenVerifier: Send + Sync + 'static {
    /// Verifies `token` under `demands`.
    fn verify<'a>(
        &'a self,
        token: &'a str,
        demands: &'a Demands,
    ) -> BoxFuture<'a, Result<VerifiedClaims, VerifyError>>;
}

impl<T: TokenVerifier + ?Sized> TokenVerifier for std::sync::Arc<T> {
    fn verify<'a>(
        &'a self,
        token: &'a str,
        demands: &'a Demands,
    ) -> BoxFuture<'a, Result<VerifiedClaims, VerifyError>> {
        (**self).verify(token, demands)
    }
}

/// A node's answer as the trait's result. A valid answer whose claims are not a JSON object
/// (no node sends one) is treated as a node that cannot decide.
pub(crate) fn from_response(response: VerifyResponse) -> Result<VerifiedClaims, VerifyError> {
    let reason = response.reason();
    if !response.valid {
        return Err(match reason {
            pb::Reason::Unavailable | pb::Reason::Unspecified => {
                VerifyError::Unavailable(if response.detail.is_empty() {
                    "the verifier cannot decide".to_owned()
                } else {
                    response.detail
                })
            }
            _ => VerifyError::Refused {
                reason: Reason::parse(reason.as_str_name()).unwrap_or(Reason::Malformed),
                detail: response.detail,
            },
        });
    }
    let claims = match serde_json::from_str::<Value>(&response.claims_json) {
        Ok(Value::Object(claims)) => claims,
        _ => {
            return Err(VerifyError::Unavailable(
                "a verifier answered valid without a claims object".to_owned(),
            ));
        }
    };
    Ok(VerifiedClaims {
        subject: response.subject,
        kid: response.kid,
        issuer: response.issuer,
        jti: response.jti,
        expires_at: response.expires_at,
        claims,
        node_id: response.node_id,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sub_second_login_age_is_still_a_check() {
        let d = Demands {
            max_auth_age: Some(Duration::from_millis(10)),
            ..Demands::none()
        };
        assert_eq!(d.max_auth_age_seconds(), 1);
        assert_eq!(Demands::none().max_auth_age_seconds(), 0);
    }

    #[test]
    fn refusals_keep_their_reason_and_unavailable_is_not_a_verdict() {
        let mut r = VerifyResponse {
            detail: "x".into(),
            ..Default::default()
        };
        r.set_reason(pb::Reason::InsufficientScope);
        assert_eq!(
            from_response(r.clone()).unwrap_err().reason(),
            Reason::InsufficientScope
        );
        r.set_reason(pb::Reason::Unavailable);
        assert!(matches!(
            from_response(r).unwrap_err(),
            VerifyError::Unavailable(_)
        ));
    }
}
