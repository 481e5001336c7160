//! Persistent login (the session RPCs after the credential checks of `grpc.rs`): start a
//! session, refresh it (rotating its refresh token), end it, end a subject's, list them. The
//! store (`session_store.rs`) decides and persists; this file mints the access tokens, makes
//! the refresh tokens, and publishes ended sessions to the fleet through `commit`, like revoked
//! tokens.

use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use keyfleet_core::token::REGISTERED_CLAIMS;
use keyfleet_core::{DEFAULT_MAX_TOKEN_BYTES, TokenClaims, UnixSeconds};
use keyfleet_proto::v1 as pb;
use serde_json::{Map, Value};
use sha2::{Digest as _, Sha256};
use tracing::{info, warn};
use zeroize::Zeroizing;

use crate::authority::AuthorityState;
use crate::error::ServiceError;
use crate::session_store::{
    EndBy, EndReason, Ended, Ending, Lifetimes, Refreshed, Rotate, Session, SessionStore,
    StoreError, TokenHash,
};

/// Every refresh token starts with it (so a leaked one is recognisable, e.g. by secret scanners).
pub(crate) const REFRESH_PREFIX: &str = "kfr_";
/// Random bytes in a refresh token.
const REFRESH_BYTES: usize = 32;
/// Length of a refresh token: the prefix and 32 bytes of unpadded base64url.
const REFRESH_LEN: usize = REFRESH_PREFIX.len() + 43;
/// A presented refresh token longer than this is refused before anything else is done.
pub(crate) const MAX_REFRESH_TOKEN_BYTES: usize = 512;
/// Claims a session's access tokens carry that StartSession's `claims` may not set.
const SESSION_CLAIMS: [&str; 5] = ["sid", "auth_time", "scope", "acr", "amr"];
/// Scopes, audiences and `amr` values a session may name, and the length of each.
const MAX_LIST: usize = 64;
const MAX_ITEM: usize = 256;

/// A refresh token: its text (for the caller, once) and its hash (for the store).
struct RefreshToken {
    text: Zeroizing<String>,
    hash: TokenHash,
}

impl RefreshToken {
    fn generate() -> Result<RefreshToken, ServiceError> {
        let mut bytes = Zeroizing::new([0u8; REFRESH_BYTES]);
        getrandom::fill(&mut bytes[..]).map_err(ServiceError::Random)?;
        let text = Zeroizing::new(format!(
            "{REFRESH_PREFIX}{}",
            URL_SAFE_NO_PAD.encode(&bytes[..])
        ));
        let hash = hash(&text);
        Ok(RefreshToken { text, hash })
    }
}

pub(crate) fn hash(token: &str) -> TokenHash {
    Sha256::digest(token.as_bytes()).into()
}

/// Why a presented refresh token cannot be used, as the caller is told. Spent, expired and
/// ended are said only of a token that was really issued; anything else is "unknown".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Unusable {
    Empty,
    TooLarge,
    /// Malformed or never issued (or forgotten long ago).
    Unknown,
    /// Spent: the session is ended (reuse).
    Spent,
    Expired(EndReason),
    Ended(EndReason),
}

impl Unusable {
    /// The metric label.
    pub(crate) fn kind(self) -> &'static str {
        match self {
            Unusable::Empty => "empty",
            Unusable::TooLarge => "too_large",
            Unusable::Unknown => "unknown",
            Unusable::Spent => "spent",
            Unusable::Expired(_) => "expired",
            Unusable::Ended(_) => "ended",
        }
    }

    pub(crate) fn message(self) -> String {
        match self {
            Unusable::Empty => "the refresh token is empty: send the one the last StartSession or Refresh returned".into(),
            Unusable::TooLarge => format!("the refresh token is longer than {MAX_REFRESH_TOKEN_BYTES} bytes: it is not one this authority issued"),
            Unusable::Unknown => "unknown or malformed refresh token: log in again".into(),
            Unusable::Spent => "the refresh token was already spent: the session is ended, since whoever holds its tokens may have stolen them; log in again".into(),
            Unusable::Expired(reason) => format!(
                "the refresh token's session has expired ({}): log in again",
                match reason {
                    EndReason::MaxAgeExpired => "--session-max reached",
                    _ => "not refreshed within --session-idle",
                }
            ),
            Unusable::Ended(reason) => format!(
                "the refresh token's session has ended ({}): log in again",
                reason.as_str()
            ),
        }
    }
}

/// A syntactically possible refresh token: the prefix, then 43 base64url characters.
pub(crate) fn check_shape(token: &str) -> Result<(), Unusable> {
    if token.is_empty() {
        return Err(Unusable::Empty);
    }
    if token.len() > MAX_REFRESH_TOKEN_BYTES {
        return Err(Unusable::TooLarge);
    }
    let well_formed = token.len() == REFRESH_LEN
        && token.starts_with(REFRESH_PREFIX)
        && URL_SAFE_NO_PAD
            .decode(&token[REFRESH_PREFIX.len()..])
            .is_ok_and(|b| b.len() == REFRESH_BYTES);
    if well_formed {
        Ok(())
    } else {
        Err(Unusable::Unknown)
    }
}

/// Scopes as a token carries them: in the order given, duplicates dropped; each non-empty,
/// without spaces (RFC 6749 scope tokens).
fn scopes(requested: Vec<String>) -> Result<Vec<String>, ServiceError> {
    let mut out: Vec<String> = Vec::new();
    for scope in requested {
        if scope.is_empty()
            || scope.len() > MAX_ITEM
            || scope
                .chars()
                .any(|c| c.is_whitespace() || c.is_control() || c == '"' || c == '\\')
        {
            return Err(ServiceError::InvalidArgument(format!(
                "scope {scope:?} is not a scope token: 1 to {MAX_ITEM} printable characters, no spaces, quotes or backslashes"
            )));
        }
        if !out.contains(&scope) {
            out.push(scope);
        }
    }
    if out.len() > MAX_LIST {
        return Err(ServiceError::InvalidArgument(format!(
            "at most {MAX_LIST} scopes"
        )));
    }
    Ok(out)
}

fn store_error(e: StoreError) -> ServiceError {
    warn!(error = %e, "session store operation failed");
    ServiceError::Store(e)
}

impl AuthorityState {
    /// Runs a store operation off the async workers (it waits for a durable commit).
    async fn in_store<R: Send + 'static>(
        &self,
        op: impl FnOnce(&dyn SessionStore) -> Result<R, StoreError> + Send + 'static,
    ) -> Result<R, ServiceError> {
        let store = Arc::clone(&self.sessions);
        tokio::task::spawn_blocking(move || op(store.as_ref()))
            .await
            .map_err(|_| ServiceError::ShuttingDown)?
            .map_err(store_error)
    }

    fn lifetimes(&self) -> Lifetimes {
        Lifetimes {
            idle: self.session_policy.idle,
            grace: self.session_policy.reuse_grace,
            access_ttl: self.policy.token_ttl,
        }
    }

    /// An access token of `session` with `scopes`, expiring at the session's
    /// `access_expires_at`.
    fn access_token(
        &self,
        session: &Session,
        scopes: &[String],
        now: UnixSeconds,
    ) -> Result<String, ServiceError> {
        let mut extra = session.claims.clone();
        extra.insert("sid".into(), Value::String(session.id.clone()));
        extra.insert("auth_time".into(), Value::from(session.auth_time));
        if !scopes.is_empty() {
            extra.insert("scope".into(), Value::String(scopes.join(" ")));
        }
        let mut jti = [0u8; 16];
        getrandom::fill(&mut jti).map_err(ServiceError::Random)?;
        let claims = TokenClaims {
            iss: self.issuer.clone(),
            sub: session.subject.clone(),
            aud: session.audience.clone(),
            iat: now,
            nbf: now,
            exp: session.access_expires_at,
            jti: URL_SAFE_NO_PAD.encode(jti),
            extra,
        };
        let signer = self.signer.load();
        let token = keyfleet_core::sign_token(signer.key.signing_key(), &signer.kid, &claims);
        if token.len() > DEFAULT_MAX_TOKEN_BYTES {
            return Err(ServiceError::InvalidArgument(format!(
                "the access token would be {} bytes, over the {DEFAULT_MAX_TOKEN_BYTES} verifiers accept: send fewer or shorter claims or scopes",
                token.len()
            )));
        }
        Ok(token)
    }

    pub(crate) async fn start_session(
        &self,
        req: pb::StartSessionRequest,
    ) -> Result<pb::SessionTokens, ServiceError> {
        let invalid = |m: String| ServiceError::InvalidArgument(m);
        if req.subject.trim().is_empty() || req.subject.len() > MAX_ITEM {
            return Err(invalid(format!(
                "subject is required (at most {MAX_ITEM} bytes)"
            )));
        }
        if req.audience.iter().any(|a| a.is_empty()) || req.audience.len() > MAX_LIST {
            return Err(invalid(format!(
                "an audience cannot be empty; at most {MAX_LIST}"
            )));
        }
        let scopes = scopes(req.scopes)?;
        let now = self.clock.now();
        let leeway = self.policy.leeway;
        let auth_time = match req.auth_time {
            0 => now,
            t if t < 0 || t > now + leeway => {
                return Err(invalid(format!(
                    "auth_time {t} is not a past Unix time (now is {now}): send when the password was checked, or 0 for now"
                )));
            }
            t => t,
        };
        let mut claims = Map::new();
        for (name, value) in req.claims {
            if name.is_empty() {
                return Err(invalid("a claim name cannot be empty".into()));
            }
            if REGISTERED_CLAIMS.contains(&name.as_str()) || SESSION_CLAIMS.contains(&name.as_str())
            {
                return Err(invalid(format!(
                    "claim {name:?} is set by the authority; use another name (acr and amr have fields of their own)"
                )));
            }
            let value = serde_json::from_str::<Value>(&value).unwrap_or(Value::String(value));
            claims.insert(name, value);
        }
        if !req.acr.is_empty() {
            claims.insert("acr".into(), Value::String(req.acr));
        }
        if req.amr.iter().any(|m| m.is_empty() || m.len() > MAX_ITEM) || req.amr.len() > MAX_LIST {
            return Err(invalid(format!(
                "amr values must be 1 to {MAX_ITEM} bytes; at most {MAX_LIST}"
            )));
        }
        if !req.amr.is_empty() {
            claims.insert("amr".into(), Value::from(req.amr));
        }
        let mut id = [0u8; 16];
        getrandom::fill(&mut id).map_err(ServiceError::Random)?;
        let policy = self.session_policy;
        let mut session = Session {
            id: URL_SAFE_NO_PAD.encode(id),
            subject: req.subject,
            audience: req.audience,
            scopes,
            claims,
            auth_time,
            started_at: now,
            last_refresh_at: 0,
            refresh_count: 0,
            idle_expires_at: now + policy.idle,
            absolute_expires_at: now + policy.max,
            access_expires_at: 0,
            ended_at: 0,
            end_reason: None,
        };
        session.access_expires_at = (now + self.policy.token_ttl).min(session.expires_at());
        // Minted before the session is stored: a session whose token is refused is not kept.
        let access_token = self.access_token(&session, &session.scopes, now)?;
        let refresh = RefreshToken::generate()?;
        let stored = session.clone();
        let hash = refresh.hash;
        self.in_store(move |store| store.start(&stored, hash))
            .await?;
        self.metrics.sessions_started.inc();
        info!(sid = %session.id, "session started");
        Ok(pb::SessionTokens {
            access_token,
            refresh_token: refresh.text.to_string(),
            session_id: session.id.clone(),
            access_expires_at: session.access_expires_at,
            session_expires_at: session.expires_at(),
        })
    }

    /// Spends `token` (already of the right shape) for a new pair. `Err(Ok(unusable))` says why
    /// the token cannot be used (the caller charges the failure to the peer).
    pub(crate) async fn refresh(
        &self,
        token: &str,
        requested: Vec<String>,
    ) -> Result<pb::SessionTokens, Result<Unusable, ServiceError>> {
        let requested = scopes(requested).map_err(Err)?;
        let refresh = RefreshToken::generate().map_err(Err)?;
        let rotate = Rotate {
            presented: hash(token),
            issued: refresh.hash,
            scopes: requested.clone(),
            now: self.clock.now(),
            lifetimes: self.lifetimes(),
        };
        let outcome = self
            .in_store(move |store| store.refresh(&rotate))
            .await
            .map_err(Err)?;
        let session = match outcome {
            Refreshed::Rotated(session) | Refreshed::Retried(session) => session,
            Refreshed::Unknown => return Err(Ok(Unusable::Unknown)),
            Refreshed::AlreadyEnded(reason) => return Err(Ok(Unusable::Ended(reason))),
            Refreshed::Expired(reason) => return Err(Ok(Unusable::Expired(reason))),
            Refreshed::ScopeNotGranted(scope) => {
                return Err(Err(ServiceError::ScopeNotGranted(scope)));
            }
            Refreshed::Reused(ended) => {
                warn!(sid = %ended.sid, "a spent refresh token was presented: session ended");
                self.metrics.sessions_ended(EndReason::RefreshTokenReuse, 1);
                self.publish_ended(vec![ended]).await.map_err(Err)?;
                return Err(Ok(Unusable::Spent));
            }
        };
        let scopes = if requested.is_empty() {
            session.scopes.clone()
        } else {
            requested
        };
        let access_token = self
            .access_token(&session, &scopes, self.clock.now())
            .map_err(Err)?;
        self.metrics.refreshes.inc();
        Ok(pb::SessionTokens {
            access_token,
            refresh_token: refresh.text.to_string(),
            session_id: session.id.clone(),
            access_expires_at: session.access_expires_at,
            session_expires_at: session.expires_at(),
        })
    }

    /// Ends the session `by` names. `Ok(None)` when no session matches.
    pub(crate) async fn end_session(
        &self,
        by: EndBy,
        reason: EndReason,
    ) -> Result<Option<pb::EndSessionResponse>, ServiceError> {
        let now = self.clock.now();
        let ending = self
            .in_store(move |store| store.end(&by, reason, now))
            .await?;
        Ok(Some(match ending {
            Ending::Unknown => return Ok(None),
            Ending::AlreadyEnded(sid) => pb::EndSessionResponse {
                session_id: sid,
                ended: false,
                version: self.current().version,
            },
            Ending::Ended(ended) => {
                let sid = ended.sid.clone();
                info!(sid = %sid, reason = reason.as_str(), "session ended");
                self.metrics.sessions_ended(reason, 1);
                let version = self.publish_ended(vec![ended]).await?;
                pb::EndSessionResponse {
                    session_id: sid,
                    ended: true,
                    version,
                }
            }
        }))
    }

    pub(crate) async fn revoke_subject(
        &self,
        subject: String,
    ) -> Result<pb::RevokeSubjectResponse, ServiceError> {
        if subject.is_empty() {
            return Err(ServiceError::InvalidArgument("subject is required".into()));
        }
        let now = self.clock.now();
        let ended = self
            .in_store(move |store| store.end_subject(&subject, EndReason::RevokedSubject, now))
            .await?;
        let count = ended.len();
        self.metrics
            .sessions_ended(EndReason::RevokedSubject, count as u64);
        info!(sessions = count, "every session of a subject ended");
        let version = self.publish_ended(ended).await?;
        Ok(pb::RevokeSubjectResponse {
            sessions_ended: u32::try_from(count).unwrap_or(u32::MAX),
            version,
        })
    }

    pub(crate) async fn list_sessions(
        &self,
        subject: String,
    ) -> Result<pb::ListSessionsResponse, ServiceError> {
        if subject.is_empty() {
            return Err(ServiceError::InvalidArgument("subject is required".into()));
        }
        let now = self.clock.now();
        let sessions = self.in_store(move |store| store.list(&subject)).await?;
        Ok(pb::ListSessionsResponse {
            sessions: sessions
                .into_iter()
                .map(|s| {
                    // A session past its expiry that nobody refreshed since is shown as ended.
                    let (ended_at, reason) = match (s.end_reason, s.expiry_at(now)) {
                        (Some(r), _) => (s.ended_at, r.as_str()),
                        (None, Some(r)) => (s.expires_at(), r.as_str()),
                        (None, None) => (0, ""),
                    };
                    pb::SessionInfo {
                        session_id: s.id,
                        subject: s.subject,
                        scopes: s.scopes,
                        auth_time: s.auth_time,
                        started_at: s.started_at,
                        last_refresh_at: s.last_refresh_at,
                        refresh_count: s.refresh_count,
                        idle_expires_at: s.idle_expires_at,
                        absolute_expires_at: s.absolute_expires_at,
                        ended_at,
                        end_reason: reason.into(),
                    }
                })
                .collect(),
        })
    }

    /// Publishes ended sessions to the fleet: each is denied until its newest access token has
    /// expired (plus the leeway verifiers allow on `exp`), in a new key-set version. Returns
    /// that version (the current one when nothing needed publishing).
    pub(crate) async fn publish_ended(&self, ended: Vec<Ended>) -> Result<u64, ServiceError> {
        let leeway = self.policy.leeway;
        let ((), committed) = self
            .commit(|work, now| {
                let mut changed = false;
                for e in ended {
                    let until = e.access_expires_at + leeway;
                    if until >= now && work.revoked_sessions.get(&e.sid).is_none_or(|u| *u < until)
                    {
                        work.revoked_sessions.insert(e.sid, until);
                        changed = true;
                    }
                }
                if changed {
                    work.ring.version += 1;
                }
                Ok(())
            })
            .await?;
        Ok(committed.version)
    }
}
