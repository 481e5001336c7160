//! One `Verify` of the load: sent to its node, retried on the next ones when a node cannot
//! answer, timed from the intended send time, and judged against the token's known verdict.

use keyfleet_core::escape_untrusted;
use keyfleet_proto::v1::{Reason, VerifyRequest, VerifyResponse};
use tokio::time::Instant;
use tonic::Code;

use super::counters::Counters;
use super::state::{Shared, lock};
use super::tokens::{Expect, PoolToken};

/// A request is tried on at most this many nodes (counting the first).
const MAX_ATTEMPTS: usize = 4;

impl Shared {
    /// Sends one request (retrying on other nodes) and records it, latency from `since`;
    /// true when some node answered.
    pub(super) async fn one(&self, token: &PoolToken, first: usize, since: Instant) -> bool {
        let mut retries = 0;
        let mut answer = None;
        for attempt in 0..MAX_ATTEMPTS {
            let node = (first + attempt) % self.nodes.len();
            if attempt > 0 {
                retries += 1;
            }
            let req = VerifyRequest {
                token: token.token.clone(),
                audience: self.audience.clone(),
                ..Default::default()
            };
            match self.client(node).verify(req).await {
                Ok(r) => {
                    let r = r.into_inner();
                    // A node that cannot vouch for its key set answers UNAVAILABLE: ask another.
                    if r.reason() == Reason::Unavailable {
                        continue;
                    }
                    answer = Some(r);
                    break;
                }
                Err(status) if retryable(status.code()) => {
                    tracing::debug!(node, code = ?status.code(), message = status.message(), "retrying on another node");
                    continue;
                }
                Err(status) => {
                    tracing::warn!(node, code = ?status.code(), message = status.message(), "Verify failed");
                    break;
                }
            }
        }
        let micros = since.elapsed().as_micros() as u64;
        let mut c = lock(&self.counters);
        c.hist.saturating_record(micros.max(1));
        c.requests += 1;
        c.retries += retries;
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

/// The failures another node may not have (down, restarting, overloaded, cut off mid-call).
fn retryable(code: Code) -> bool {
    matches!(
        code,
        Code::Unavailable
            | Code::Unknown
            | Code::Cancelled
            | Code::DeadlineExceeded
            | Code::Aborted
            | Code::Internal
    )
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
