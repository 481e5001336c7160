//! The `Verify` path: the key set in use, the verified-token cache, `validate` (through the
//! combiner of `combine.rs`, which checks concurrent requests in one batch), and on an unknown
//! kid the coalesced refresh behind the gate; then the caller's demands (scopes, a recent
//! login: [`check_demands`]) on a valid verdict, cached or not; then the answer in proto form.

use std::sync::Arc;

use keyfleet_core::token::Refusal;
use keyfleet_core::{Demands, Reason, UnixSeconds, Verified, check_demands, validate};
use keyfleet_proto::v1::verifier_server;
use keyfleet_proto::v1::{self as pb, VerifyRequest, VerifyResponse};
use tokio::time::Instant;
use tonic::{Request, Response, Status};

use super::Verifier;
use crate::cache::Grants;
use crate::gate::{self, Ticket};
use crate::keyset::{Held, NodeKeys};
use crate::metrics::{Metrics, Origin};

impl Verifier {
    /// Answers one `Verify`: an invalid token, or a valid one that does not meet the caller's
    /// `demands` (scopes, a recent login), is an `Ok` answer with `valid = false`; an error
    /// means the node cannot answer at all (no key set or no issuer yet).
    pub async fn verify_token(
        &self,
        token: &str,
        audience: &str,
        demands: Demands<'_>,
    ) -> Result<VerifyResponse, Status> {
        let metrics = &self.inner.metrics;
        let _inflight = Inflight::enter(metrics);
        let start = Instant::now();
        let answer = self.decide(token, audience, &demands).await;
        metrics
            .verify_duration
            .observe(start.elapsed().as_secs_f64());
        if let Ok(response) = &answer {
            metrics.verified(from_proto(response.reason()));
            record_verdict(response);
        }
        answer
    }

    pub(super) async fn decide(
        &self,
        token: &str,
        audience: &str,
        demands: &Demands<'_>,
    ) -> Result<VerifyResponse, Status> {
        // Counted from here until it reaches the combiner, so a batch leader can wait for it.
        let approach = self.inner.combiner.approach();
        let keys = &self.inner.keys;
        let held = usable(keys)?;
        let policy = policy_of(&held)?;
        if keys.is_stale() {
            let refusal = Refusal {
                reason: Reason::Unavailable,
                kid: None,
                detail: "the key set is older than --max-stale (the source is unreachable)"
                    .to_owned(),
            };
            return Ok(self.response(Err(refusal)));
        }
        let audience = (!audience.is_empty()).then_some(audience);
        let now = self.inner.config.clock.now();
        let cache_key = self.inner.cache.key(token, audience);
        if let Some(hit) = (self.inner.cache).get(cache_key.as_ref(), &held, policy, now, demands) {
            return Ok(hit.unwrap_or_else(|refusal| self.response(Err(refusal))));
        }
        // Checked together with the other requests in flight (`combine.rs`): same verdict.
        let verdict = (self.inner.combiner)
            .validate(approach, token, audience, &held, now)
            .await;
        let kid = match &verdict {
            Err(Refusal {
                reason: Reason::UnknownKid,
                kid: Some(kid),
                ..
            }) => kid.clone(),
            _ => return Ok(self.answer(verdict, cache_key, &held, demands, now)),
        };
        self.inner.metrics.unknown_kid.inc();
        if held.keys.is_ambiguous(&kid) || !self.refresh_for_unknown_kid(&kid).await {
            return Ok(self.response(verdict));
        }
        // The refresh may have brought the kid (or a new issuer); check once more.
        let Some(held) = keys.current() else {
            return Ok(self.response(verdict));
        };
        let Some(policy) = held.policy.as_ref() else {
            return Ok(self.response(verdict));
        };
        let now = self.inner.config.clock.now();
        let verdict = validate(token, &held.keys, now, policy, audience);
        if matches!(
            &verdict,
            Err(Refusal {
                reason: Reason::UnknownKid,
                ..
            })
        ) {
            self.inner.gate.missing(&kid);
        }
        Ok(self.response(demanded(verdict, demands, now)))
    }

    /// The answer for a fresh `verdict`: a valid one is cached (the node's verdict, before
    /// the caller's demands), then `demands` are checked.
    pub(super) fn answer(
        &self,
        verdict: Result<Verified, Refusal>,
        cache_key: Option<crate::cache::CacheKey>,
        held: &Held,
        demands: &Demands<'_>,
        now: UnixSeconds,
    ) -> VerifyResponse {
        let Some(policy) = held.policy.as_ref() else {
            return self.response(demanded(verdict, demands, now));
        };
        let (grants, refused) = match &verdict {
            Ok(verified) => (
                cache_key.map(|_| Grants::of(verified)),
                demands_refuse(verified, demands, now),
            ),
            Err(_) => (None, None),
        };
        let response = self.response(verdict);
        (self.inner.cache).insert(cache_key, held, policy, &response, grants);
        match refused {
            Some(refusal) => self.response(Err(refusal)),
            None => response,
        }
    }

    /// Triggers or joins a coalesced, rate-limited refresh, and waits for it at most
    /// [`gate::UNKNOWN_KID_WAIT`]. True when one finished in time.
    async fn refresh_for_unknown_kid(&self, kid: &str) -> bool {
        let rx = match self.inner.gate.ticket(kid) {
            Ticket::Skip => return false,
            Ticket::Wait(rx) => rx,
            Ticket::Lead(lead, rx) => {
                // Its own task: a caller that gives up (or disconnects) never aborts the refresh.
                let node = self.clone();
                tokio::spawn(async move {
                    node.fetch_and_apply(Origin::UnknownKid).await;
                    lead.finish();
                });
                rx
            }
        };
        gate::wait(rx).await
    }

    /// The answer for `verdict`, naming this node.
    pub(super) fn response(&self, verdict: Result<Verified, Refusal>) -> VerifyResponse {
        let config = &self.inner.config;
        let mut response = match verdict {
            Ok(v) => VerifyResponse {
                valid: true,
                kid: v.kid,
                subject: v.subject,
                issuer: v.issuer,
                expires_at: v.expires_at,
                jti: v.jti,
                claims_json: serde_json::Value::Object(v.claims).to_string(),
                ..VerifyResponse::default()
            },
            Err(r) => VerifyResponse {
                valid: false,
                kid: r.kid.unwrap_or_default(),
                detail: r.detail,
                reason: to_proto(r.reason) as i32,
                ..VerifyResponse::default()
            },
        };
        if response.valid {
            response.set_reason(pb::Reason::Ok);
        }
        response.node_id = config.node_id.clone();
        response.region = config.region.clone();
        response
    }
}

#[tonic::async_trait]
impl verifier_server::Verifier for Verifier {
    async fn verify(
        &self,
        request: Request<VerifyRequest>,
    ) -> Result<Response<VerifyResponse>, Status> {
        let request = request.into_inner();
        self.verify_token(&request.token, &request.audience, demands_of(&request))
            .await
            .map(Response::new)
    }

    async fn verify_batch(
        &self,
        request: Request<pb::VerifyBatchRequest>,
    ) -> Result<Response<pb::VerifyBatchResponse>, Status> {
        let request = request.into_inner();
        self.verify_batch(&request.requests)
            .await
            .map(|responses| Response::new(pb::VerifyBatchResponse { responses }))
    }
}

/// The demands a `VerifyRequest` makes.
pub(super) fn demands_of(request: &VerifyRequest) -> Demands<'_> {
    Demands {
        required_scopes: &request.required_scopes,
        max_auth_age: request.max_auth_age_seconds,
    }
}

/// The refusal `demands` give a valid token, with its kid; `None` when it meets them (or
/// nothing is demanded: then no claim is looked at).
fn demands_refuse(verified: &Verified, demands: &Demands<'_>, now: UnixSeconds) -> Option<Refusal> {
    if demands.is_empty() {
        return None;
    }
    check_demands(&verified.claims, demands, now)
        .err()
        .map(|refusal| Refusal {
            kid: Some(verified.kid.clone()),
            ..refusal
        })
}

/// `verdict` with `demands` applied to it when it is valid.
fn demanded(
    verdict: Result<Verified, Refusal>,
    demands: &Demands<'_>,
    now: UnixSeconds,
) -> Result<Verified, Refusal> {
    match verdict {
        Ok(verified) => match demands_refuse(&verified, demands, now) {
            Some(refusal) => Err(refusal),
            None => Ok(verified),
        },
        refused => refused,
    }
}

/// The key set in use, or why the node cannot answer at all (a gRPC error, not a verdict).
pub(super) fn usable(keys: &NodeKeys) -> Result<Arc<Held>, Status> {
    keys.current().ok_or_else(|| {
        Status::unavailable("no key set yet: waiting for the first jwks from the source")
    })
}

/// The policy of `held`, or UNAVAILABLE while no issuer is known.
pub(super) fn policy_of(held: &Held) -> Result<&keyfleet_core::Policy, Status> {
    held.policy.as_ref().ok_or_else(|| {
        Status::unavailable("no issuer known yet: the source named none and --issuer is not set")
    })
}

/// Puts the verdict on the RPC span: the reason, and the kid only when it names a key the
/// node holds or revoked (a kid that matched nothing is attacker-chosen and unbounded).
fn record_verdict(response: &VerifyResponse) {
    let span = tracing::Span::current();
    if span.is_disabled() {
        return;
    }
    let reason = response.reason();
    span.record("reason", reason.as_str_name());
    let matched_a_key = !matches!(
        reason,
        pb::Reason::Unspecified
            | pb::Reason::Malformed
            | pb::Reason::UnsupportedAlgorithm
            | pb::Reason::UnknownKid
            | pb::Reason::TooLarge
            | pb::Reason::Unavailable
    );
    if matched_a_key && response.kid.len() <= 128 {
        span.record("kid", response.kid.as_str());
    }
}

/// Counts a `Verify` in progress, even one whose caller goes away mid-way.
pub(super) struct Inflight<'a>(&'a Metrics);

impl<'a> Inflight<'a> {
    pub(super) fn enter(metrics: &'a Metrics) -> Inflight<'a> {
        metrics.inflight.inc();
        Inflight(metrics)
    }
}

impl Drop for Inflight<'_> {
    fn drop(&mut self) {
        self.0.inflight.dec();
    }
}

fn to_proto(reason: Reason) -> pb::Reason {
    match reason {
        Reason::Ok => pb::Reason::Ok,
        Reason::Malformed => pb::Reason::Malformed,
        Reason::UnsupportedAlgorithm => pb::Reason::UnsupportedAlgorithm,
        Reason::UnknownKid => pb::Reason::UnknownKid,
        Reason::BadSignature => pb::Reason::BadSignature,
        Reason::Expired => pb::Reason::Expired,
        Reason::NotYetValid => pb::Reason::NotYetValid,
        Reason::WrongIssuer => pb::Reason::WrongIssuer,
        Reason::WrongAudience => pb::Reason::WrongAudience,
        Reason::KeyRevoked => pb::Reason::KeyRevoked,
        Reason::TokenRevoked => pb::Reason::TokenRevoked,
        Reason::TooLarge => pb::Reason::TooLarge,
        Reason::Unavailable => pb::Reason::Unavailable,
        Reason::SessionRevoked => pb::Reason::SessionRevoked,
        Reason::InsufficientScope => pb::Reason::InsufficientScope,
        Reason::LoginTooOld => pb::Reason::LoginTooOld,
    }
}

/// The reason an answer carries, for the metrics.
pub(super) fn from_proto(reason: pb::Reason) -> Reason {
    Reason::ALL
        .into_iter()
        .find(|r| to_proto(*r) == reason)
        .unwrap_or(Reason::Unavailable)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_maps_both_ways() {
        for reason in Reason::ALL {
            assert_eq!(from_proto(to_proto(reason)), reason);
        }
    }
}
