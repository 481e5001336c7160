//! What stands around the credential checks: admin RPCs only over TLS or loopback (unless
//! `--insecure-admin`); a budget for key management that only authenticated callers draw from
//! (`--admin-rate`); and failed credentials limited per peer in buckets of their own, so that
//! nobody's guesses can use up anyone else's budget — least of all an operator's emergency
//! revocation.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::{Mutex, PoisonError};

use tokio::time::Instant;

/// Failed credentials one peer may present in a burst. Enough for an operator's typos; a
/// guesser gains nothing from more, since a token is at least 32 random bytes.
pub(crate) const FAILURE_BURST: f64 = 20.0;
/// Failed credentials one peer may present per second once its burst is spent.
pub(crate) const FAILURE_PER_SECOND: f64 = 2.0;
/// Peers whose failures are remembered; past it the least recently failing peer is forgotten
/// (first those whose bucket has refilled anyway), so a flood of addresses costs bounded memory.
pub(crate) const MAX_FAILING_PEERS: usize = 10_000;

/// The outcome of a credential check, as the caller must answer it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// The right credential: proceed (subject to the caller's own budget).
    Accepted,
    /// A wrong or missing credential, within the peer's failure budget.
    Refused,
    /// A wrong or missing credential from a peer past its failure budget.
    TooManyFailures,
}

/// Decides whether an admin call may proceed.
#[derive(Debug)]
pub(crate) struct AdminGuard {
    /// TLS on the listener, a loopback listener, or `--insecure-admin`.
    transport_ok: bool,
    /// Key management by authenticated callers (`--admin-rate`, bursts of twice that).
    manage: Mutex<ManageBucket>,
    /// Failed credentials, per peer.
    failures: Mutex<FailingPeers>,
}

#[derive(Debug, Clone)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

impl Bucket {
    fn full(burst: f64, now: Instant) -> Bucket {
        Bucket {
            tokens: burst,
            last: now,
        }
    }

    fn refill(&mut self, now: Instant, per_second: f64, burst: f64) {
        let refill = now.saturating_duration_since(self.last).as_secs_f64() * per_second;
        self.tokens = (self.tokens + refill).min(burst);
        self.last = now;
    }

    /// Takes one token after refilling; false when there is none.
    fn take(&mut self, now: Instant, per_second: f64, burst: f64) -> bool {
        self.refill(now, per_second, burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Per-peer buckets of failed credentials, bounded by [`MAX_FAILING_PEERS`].
#[derive(Debug, Default)]
struct FailingPeers {
    map: HashMap<Option<IpAddr>, Bucket>,
}

impl FailingPeers {
    /// Charges one failure to `peer`; false when its budget was already spent.
    fn charge(&mut self, peer: Option<IpAddr>, now: Instant) -> bool {
        if !self.map.contains_key(&peer) && self.map.len() >= MAX_FAILING_PEERS {
            self.make_room(now);
        }
        self.map
            .entry(peer)
            .or_insert_with(|| Bucket::full(FAILURE_BURST, now))
            .take(now, FAILURE_PER_SECOND, FAILURE_BURST)
    }

    /// Forgets every peer whose bucket has refilled (it carries no state), and when none has,
    /// the one that failed least recently.
    fn make_room(&mut self, now: Instant) {
        self.map.retain(|_, b| {
            let mut b = b.clone();
            b.refill(now, FAILURE_PER_SECOND, FAILURE_BURST);
            b.tokens < FAILURE_BURST
        });
        if self.map.len() >= MAX_FAILING_PEERS {
            let oldest = self.map.iter().min_by_key(|(_, b)| b.last).map(|(k, _)| *k);
            if let Some(peer) = oldest {
                self.map.remove(&peer);
            }
        }
    }
}

/// The key a peer's failures are counted under: its IP address, or its /64 for IPv6 (one host
/// commonly holds a whole /64, and would otherwise get a fresh budget per address).
fn peer_key(peer: Option<SocketAddr>) -> Option<IpAddr> {
    peer.map(|p| match p.ip() {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
        v4 => v4,
    })
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
            failures: Mutex::default(),
        }
    }

    /// Whether the bearer token may travel over this connection: the listener is safe, or the
    /// peer is on this host (a local proxy, `keyfleet keys` on the machine itself).
    pub(crate) fn transport_ok(&self, peer: Option<SocketAddr>) -> bool {
        self.transport_ok || peer.is_some_and(|p| p.ip().is_loopback())
    }

    /// Judges a credential check that came out `accepted` for a call from `peer`. The right
    /// credential is always accepted, whatever anyone (the same address included) has failed
    /// before: a lockout would let anyone who can reach the port block the operator. A wrong one
    /// is charged to the peer's own failure bucket, and past that budget is answered
    /// [`Verdict::TooManyFailures`].
    pub(crate) fn judge(&self, accepted: bool, peer: Option<SocketAddr>) -> Verdict {
        if accepted {
            return Verdict::Accepted;
        }
        let mut failures = self.failures.lock().unwrap_or_else(PoisonError::into_inner);
        if failures.charge(peer_key(peer), Instant::now()) {
            Verdict::Refused
        } else {
            Verdict::TooManyFailures
        }
    }

    /// Takes one key-management operation from the authenticated callers' budget; false when
    /// it is spent.
    pub(crate) fn take_manage(&self) -> bool {
        let mut m = self.manage.lock().unwrap_or_else(PoisonError::into_inner);
        let per_second = m.per_second;
        m.bucket.take(Instant::now(), per_second, 2.0 * per_second)
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
    use std::time::Duration;

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
    async fn failures_are_per_peer_and_never_refuse_the_right_credential() {
        let guard = AdminGuard::new("127.0.0.1:1".parse().unwrap(), false, false, 1);
        let attacker: SocketAddr = "192.0.2.7:5000".parse().unwrap();
        let neighbour: SocketAddr = "192.0.2.7:5001".parse().unwrap();
        let operator: SocketAddr = "192.0.2.8:5000".parse().unwrap();
        let burst = FAILURE_BURST as usize;
        for _ in 0..burst {
            assert_eq!(guard.judge(false, Some(attacker)), Verdict::Refused);
        }
        assert_eq!(
            guard.judge(false, Some(neighbour)),
            Verdict::TooManyFailures,
            "the budget is per address, not per connection"
        );
        assert_eq!(guard.judge(false, Some(operator)), Verdict::Refused);
        assert_eq!(guard.judge(true, Some(attacker)), Verdict::Accepted);
        // Failures never touch the key-management budget.
        assert!(guard.take_manage() && guard.take_manage());
        tokio::time::advance(Duration::from_millis(500)).await;
        assert_eq!(guard.judge(false, Some(attacker)), Verdict::Refused);
        assert_eq!(guard.judge(false, Some(attacker)), Verdict::TooManyFailures);
    }

    #[test]
    fn ipv6_peers_share_their_64() {
        let a: SocketAddr = "[2001:db8:1:2::1]:1".parse().unwrap();
        let b: SocketAddr = "[2001:db8:1:2:ffff::9]:1".parse().unwrap();
        let c: SocketAddr = "[2001:db8:1:3::1]:1".parse().unwrap();
        let mapped: SocketAddr = "[::ffff:192.0.2.7]:1".parse().unwrap();
        assert_eq!(peer_key(Some(a)), peer_key(Some(b)));
        assert_ne!(peer_key(Some(a)), peer_key(Some(c)));
        assert_eq!(peer_key(Some(mapped)), Some("192.0.2.7".parse().unwrap()));
    }

    #[tokio::test(start_paused = true)]
    async fn failing_peers_are_bounded() {
        let mut peers = FailingPeers::default();
        let now = Instant::now();
        for i in 0..MAX_FAILING_PEERS + 50 {
            let ip = IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + i as u32));
            peers.charge(Some(ip), now);
        }
        assert!(peers.map.len() <= MAX_FAILING_PEERS);
    }
}
