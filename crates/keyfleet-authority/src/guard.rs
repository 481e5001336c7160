//! What stands around the credential checks: admin RPCs only over TLS or loopback (unless
//! `--insecure-admin`); a budget for key management that only authenticated callers draw from
//! (`--admin-rate`); and failed credentials limited per peer in buckets of their own
//! ([`keyfleet_runtime::credentials`], shared with the relays), so that nobody's guesses can use
//! up anyone else's budget — least of all an operator's emergency revocation.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use keyfleet_runtime::credentials::{
    Bucket, FAILURE_PER_SECOND, FailedCredentials, MAX_FAILING_PEERS, Verdict, peer_key,
};
use tokio::time::Instant;

/// Decides whether an admin call may proceed.
#[derive(Debug)]
pub(crate) struct AdminGuard {
    /// TLS on the listener, a loopback listener, or `--insecure-admin`.
    transport_ok: bool,
    /// Key management by authenticated callers (`--admin-rate`, bursts of twice that).
    manage: Mutex<ManageBucket>,
    /// Failed credentials, per peer.
    failures: FailedCredentials,
}

impl AdminGuard {
    /// `per_second` key-management operations (burst twice that) on a listener at `listen`
    /// that has TLS or not.
    pub(crate) fn new(
        listen: SocketAddr,
        tls: bool,
        insecure_admin: bool,
        per_second: u32,
    ) -> AdminGuard {
        let per_second = f64::from(per_second.max(1));
        AdminGuard {
            transport_ok: tls || insecure_admin || listen.ip().is_loopback(),
            manage: Mutex::new(ManageBucket {
                bucket: Bucket::full(2.0 * per_second, Instant::now()),
                per_second,
            }),
            failures: FailedCredentials::new(),
        }
    }

    /// Whether the bearer token may travel over this connection: the listener is safe, or the
    /// peer is on this host (a local proxy, `keyfleet keys` on the machine itself).
    pub(crate) fn transport_ok(&self, peer: Option<SocketAddr>) -> bool {
        self.transport_ok || peer.is_some_and(|p| p.ip().is_loopback())
    }

    /// Judges a credential check that came out `accepted` for a call from `peer`
    /// ([`FailedCredentials::judge`]): the right credential is always accepted; a wrong one is
    /// charged to the peer's own failure bucket, never to the key-management budget.
    pub(crate) fn judge(&self, accepted: bool, peer: Option<SocketAddr>) -> Verdict {
        self.failures.judge(accepted, peer)
    }

    /// Takes one key-management operation from the authenticated callers' budget; false when
    /// it is spent.
    pub(crate) fn take_manage(&self) -> bool {
        let mut m = self.manage.lock().unwrap_or_else(PoisonError::into_inner);
        let per_second = m.per_second;
        m.bucket.take(Instant::now(), per_second, 2.0 * per_second)
    }
}

/// Unusable refresh tokens, limited per peer like failed credentials (a refresh token is the
/// credential of `Refresh`). The store is asked only after the peer's budget is checked: a
/// peer past its budget is answered `RESOURCE_EXHAUSTED` at once, whatever it presents, until
/// its budget refills a little — so a flood of guesses costs the store about
/// [`keyfleet_runtime::credentials::FAILURE_PER_SECOND`] look-ups per second per peer. Other
/// peers, and their valid refresh tokens, are never affected.
#[derive(Debug, Default)]
pub(crate) struct RefreshGuard {
    failures: FailedCredentials,
    /// Peers past their budget, until when they are refused without a look-up.
    limited: Mutex<HashMap<Option<IpAddr>, Instant>>,
}

impl RefreshGuard {
    /// False while `peer` is past its failure budget.
    pub(crate) fn may_try(&self, peer: Option<SocketAddr>) -> bool {
        let key = peer_key(peer);
        let mut limited = self.limited.lock().unwrap_or_else(PoisonError::into_inner);
        match limited.get(&key) {
            Some(until) if Instant::now() < *until => false,
            Some(_) => {
                limited.remove(&key);
                true
            }
            None => true,
        }
    }

    /// Charges an unusable refresh token to `peer`; false when that went past its budget (the
    /// peer is then refused without a look-up until one more failure fits).
    pub(crate) fn failed(&self, peer: Option<SocketAddr>) -> bool {
        match self.failures.judge(false, peer) {
            Verdict::TooManyFailures => {
                let mut limited = self.limited.lock().unwrap_or_else(PoisonError::into_inner);
                if limited.len() >= MAX_FAILING_PEERS {
                    let now = Instant::now();
                    limited.retain(|_, until| now < *until);
                }
                if limited.len() < MAX_FAILING_PEERS {
                    let refill = Duration::from_secs_f64(1.0 / FAILURE_PER_SECOND);
                    limited.insert(peer_key(peer), Instant::now() + refill);
                }
                false
            }
            Verdict::Refused | Verdict::Accepted => true,
        }
    }
}

#[derive(Debug)]
struct ManageBucket {
    bucket: Bucket,
    per_second: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transport_rule() {
        let any: SocketAddr = "0.0.0.0:7000".parse().unwrap();
        let lo: SocketAddr = "127.0.0.1:7000".parse().unwrap();
        let remote: SocketAddr = "192.0.2.7:5000".parse().unwrap();
        let local_peer: SocketAddr = "127.0.0.1:5000".parse().unwrap();
        let cases = [
            (any, false, false, Some(remote), false),
            (any, false, false, Some(local_peer), true),
            (any, false, false, None, false),
            (any, true, false, Some(remote), true),
            (any, false, true, Some(remote), true),
            (lo, false, false, Some(remote), true),
        ];
        for (listen, tls, insecure, peer, want) in cases {
            let guard = AdminGuard::new(listen, tls, insecure, 10);
            assert_eq!(
                guard.transport_ok(peer),
                want,
                "{listen} tls={tls} insecure={insecure} {peer:?}"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn manage_bucket_refills_at_its_rate() {
        let guard = AdminGuard::new("127.0.0.1:1".parse().unwrap(), false, false, 5);
        assert_eq!(
            (0..20).filter(|_| guard.take_manage()).count(),
            10,
            "burst of 2x"
        );
        assert!(!guard.take_manage());
        tokio::time::advance(Duration::from_millis(400)).await;
        assert_eq!((0..10).filter(|_| guard.take_manage()).count(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_peer_past_its_refresh_failures_is_refused_before_any_look_up_others_are_not() {
        let guard = RefreshGuard::default();
        let attacker: SocketAddr = "192.0.2.7:5000".parse().unwrap();
        let same_64: SocketAddr = "[2001:db8::1]:1".parse().unwrap();
        let other_in_64: SocketAddr = "[2001:db8::ffff]:1".parse().unwrap();
        let user: SocketAddr = "192.0.2.8:5000".parse().unwrap();
        let burst = keyfleet_runtime::credentials::FAILURE_BURST as usize;
        for _ in 0..burst {
            assert!(guard.may_try(Some(attacker)));
            assert!(guard.failed(Some(attacker)));
        }
        assert!(!guard.failed(Some(attacker)), "past the burst");
        assert!(!guard.may_try(Some(attacker)), "refused before the look-up");
        assert!(guard.may_try(Some(user)), "another peer is not limited");
        tokio::time::advance(Duration::from_millis(600)).await;
        assert!(
            guard.may_try(Some(attacker)),
            "one more try once the budget refilled"
        );
        for _ in 0..=burst {
            guard.failed(Some(same_64));
        }
        assert!(!guard.may_try(Some(other_in_64)), "an IPv6 /64 is one peer");
    }

    #[tokio::test(start_paused = true)]
    async fn failed_credentials_never_touch_the_key_management_budget() {
        let guard = AdminGuard::new("127.0.0.1:1".parse().unwrap(), false, false, 1);
        let attacker: SocketAddr = "192.0.2.7:5000".parse().unwrap();
        let operator: SocketAddr = "192.0.2.8:5000".parse().unwrap();
        let burst = keyfleet_runtime::credentials::FAILURE_BURST as usize;
        for _ in 0..burst {
            assert_eq!(guard.judge(false, Some(attacker)), Verdict::Refused);
        }
        assert_eq!(guard.judge(false, Some(attacker)), Verdict::TooManyFailures);
        assert_eq!(guard.judge(false, Some(operator)), Verdict::Refused);
        assert_eq!(guard.judge(true, Some(attacker)), Verdict::Accepted);
        assert!(guard.take_manage() && guard.take_manage());
    }
}
