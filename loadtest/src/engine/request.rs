//! One `Verify` of the load: sent through the verifier pool (which picks the node, hedges a
//! stalled request on another node and retries one that fails or cannot decide), timed from the
//! intended send time, and judged against the token's known verdict.

use keyfleet_core::escape_untrusted;
use keyfleet_proto::v1::{VerifyRequest, VerifyResponse};
use tokio::time::Instant;

use super::counters::Counters;
use super::state::{Shared, lock};
use super::tokens::{Expect, PoolToken};

impl Shared {
    /// Sends one request and records it, latency from `since`; true when some node answered.
    /// (Retries and hedges are the pool's, counted in its stats.)
    pub(super) async fn one(&self, token: &PoolToken, since: Instant) -> bool {
        let req = VerifyRequest {
            token: token.token.clone(),
            audience: self.audience.clone(),
            ..Default::default()
        };
        let answer = match self.verifiers.verify_request(req).await {
            Ok(r) => Some(r),
            Err(e) => {
                tracing::warn!(error = %keyfleet_runtime::error_chain(&e), "Verify failed on every node tried");
                None
            }
        };
        let micros = since.elapsed().as_micros() as u64;
        let mut c = lock(&self.counters);
        c.hist.saturating_record(micros.max(1));
        c.requests += 1;
        if token.expect != Expect::Valid {
            c.invalid += 1;
        }
        let Some(r) = answer else {
            c.errors += 1;
            return false;
        };
        judge(&mut c, token, &r);
        true
    }
}

/// Counts an answer: who gave it, and whether it is the verdict the token must get.
fn judge(c: &mut Counters, token: &PoolToken, r: &VerifyResponse) {
    c.answered_by(&r.node_id, &r.region);
    match token.expect {
        Expect::Valid if r.valid => c.verified_on(token.id, &r.node_id),
        Expect::Valid => {
            c.false_rejects += 1;
            // The node id and detail come from the server: escaped, they cannot forge a line.
            tracing::warn!(node = %escape_untrusted(&r.node_id), reason = ?r.reason(), detail = %escape_untrusted(&r.detail), "false reject");
        }
        Expect::Refused(_) if r.valid => {
            c.false_accepts += 1;
            tracing::warn!(node = %escape_untrusted(&r.node_id), "false accept");
        }
        Expect::Refused(want) if r.reason() != want => c.wrong_reasons += 1,
        Expect::Refused(_) => {}
    }
}
