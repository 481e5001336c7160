//! The operations behind the RPCs, after the credential checks of `grpc.rs`: mint a token,
//! rotate, revoke a key or a token, list the keys. Each change goes through `commit`.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use keyfleet_core::token::REGISTERED_CLAIMS;
use keyfleet_core::{DEFAULT_MAX_TOKEN_BYTES, RingError, TokenClaims, UnixSeconds};
use keyfleet_proto::v1 as pb;
use serde_json::Value;
use tracing::{info, warn};

use crate::authority::AuthorityState;
use crate::convert::key_infos;
use crate::error::ServiceError;
use crate::metrics::Trigger;

/// Longest jti `RevokeToken` accepts (the deny list is bounded in entries, not bytes).
const MAX_JTI_LEN: usize = 256;

impl AuthorityState {
    pub(crate) fn issue_token(
        &self,
        req: pb::IssueTokenRequest,
    ) -> Result<pb::IssueTokenResponse, ServiceError> {
        let invalid = |m: String| ServiceError::InvalidArgument(m);
        if req.subject.trim().is_empty() {
            return Err(invalid("subject is required".into()));
        }
        if req.audience.iter().any(|a| a.is_empty()) {
            return Err(invalid("an audience cannot be empty".into()));
        }
        let max_ttl = self.policy.token_ttl;
        let ttl = match req.ttl_seconds {
            0 => max_ttl,
            t if !(1..=max_ttl).contains(&t) => {
                return Err(invalid(format!(
                    "ttl_seconds must be between 1 and the authority's --token-ttl ({max_ttl}s), or 0 for the maximum; got {t}"
                )));
            }
            t => t,
        };
        let mut extra = serde_json::Map::new();
        for (name, value) in req.claims {
            if name.is_empty() {
                return Err(invalid("a claim name cannot be empty".into()));
            }
            if REGISTERED_CLAIMS.contains(&name.as_str()) {
                return Err(invalid(format!(
                    "claim {name:?} is registered and set by the authority; use another name"
                )));
            }
            let value = serde_json::from_str::<Value>(&value).unwrap_or(Value::String(value));
            extra.insert(name, value);
        }
        let mut jti = [0u8; 16];
        getrandom::fill(&mut jti).map_err(ServiceError::Random)?;
        let now = self.clock.now();
        let claims = TokenClaims {
            iss: self.issuer.clone(),
            sub: req.subject,
            aud: req.audience,
            iat: now,
            nbf: now,
            exp: now + ttl,
            jti: URL_SAFE_NO_PAD.encode(jti),
            extra,
        };
        let signer = self.signer.load();
        let token = keyfleet_core::sign_token(signer.key.signing_key(), &signer.kid, &claims);
        // Verifiers refuse longer tokens by default.
        if token.len() > DEFAULT_MAX_TOKEN_BYTES {
            return Err(invalid(format!(
                "the token would be {} bytes, over the {DEFAULT_MAX_TOKEN_BYTES} verifiers accept: send fewer or shorter claims",
                token.len()
            )));
        }
        self.metrics.tokens_issued.inc();
        Ok(pb::IssueTokenResponse {
            token,
            kid: signer.kid.clone(),
            jti: claims.jti,
            expires_at: claims.exp,
        })
    }

    pub(crate) async fn rotate(&self) -> Result<pb::RotateKeysResponse, ServiceError> {
        let min_acked = self.min_acked();
        let ((promoting, outcome), committed) = self
            .commit(|work, now| {
                work.ensure_next(now)?;
                let promoting = work.ring.request_rotation()?;
                Ok((promoting, work.ring.tick(now, min_acked)))
            })
            .await?;
        info!(kid = %promoting, activated = outcome.promoted.is_some(), "rotation requested");
        self.report(&outcome, Trigger::Manual);
        Ok(pb::RotateKeysResponse {
            activated: committed.active_kid == promoting,
            promoting_kid: promoting,
            active_kid: committed.active_kid,
        })
    }

    pub(crate) async fn revoke_key(
        &self,
        kid: String,
    ) -> Result<pb::RevokeKeyResponse, ServiceError> {
        if kid.is_empty() {
            return Err(ServiceError::InvalidArgument("kid is required".into()));
        }
        let (was_active, committed) = self
            .commit(|work, now| {
                let was_active = work.ring.active().kid == kid;
                match work.ring.revoke_key(&kid, now) {
                    Err(RingError::NoNextKey) => {
                        work.ensure_next(now)?;
                        work.ring.revoke_key(&kid, now)?;
                    }
                    other => {
                        other?;
                    }
                }
                Ok(was_active)
            })
            .await?;
        if was_active {
            self.metrics.rotated(Trigger::Revocation);
        }
        warn!(kid = %kid, was_active, active_kid = %committed.active_kid, "key revoked");
        Ok(pb::RevokeKeyResponse {
            revoked_kid: kid,
            active_kid: committed.active_kid,
            version: committed.version,
        })
    }

    pub(crate) async fn revoke_token(
        &self,
        jti: String,
        until: UnixSeconds,
    ) -> Result<pb::RevokeTokenResponse, ServiceError> {
        if jti.is_empty() {
            return Err(ServiceError::InvalidArgument("jti is required".into()));
        }
        if jti.len() > MAX_JTI_LEN {
            return Err(ServiceError::InvalidArgument(format!(
                "jti is longer than {MAX_JTI_LEN} bytes"
            )));
        }
        let policy_ttl = self.policy.token_ttl;
        let ((), committed) = self
            .commit(|work, now| {
                // 0 means "as long as any token can live".
                let until = if until == 0 { now + policy_ttl } else { until };
                Ok(work.ring.revoke_token(&jti, until, now)?)
            })
            .await?;
        info!(version = committed.version, "token revoked");
        Ok(pb::RevokeTokenResponse {
            version: committed.version,
        })
    }

    pub(crate) async fn list_keys(&self) -> pb::ListKeysResponse {
        let now = self.clock.now();
        let state = self.ring.lock().await;
        let ring = &state.ring;
        pb::ListKeysResponse {
            keys: key_infos(ring),
            watchers: self.lock_watchers().list(),
            version: ring.version,
            issuer: self.issuer.clone(),
            next_rotation_at: ring.next_rotation_at(),
            token_ttl_seconds: self.policy.token_ttl,
            publish_ahead_seconds: self.policy.publish_ahead,
            rotation_period_seconds: self.policy.rotation_period,
            now,
        }
    }
}
