//! Failed credentials, limited per peer: the authority (admin and fleet credentials) and a relay
//! (the fleet credential) judge every check here. Each peer address (each IPv6 /64) has a
//! bucket of its own, so nobody's guesses can use up anyone else's budget — least of all an
//! operator's emergency revocation — and the right credential is always accepted, whatever the
//! same address failed before: a lockout would let anyone who can reach the port block the
//! operator or the fleet.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::{Mutex, PoisonError};

use tokio::time::Instant;

/// Failed credentials one peer may present in a burst. Enough for an operator's typos; a
/// guesser gains nothing from more, since a token is at least 32 random bytes.
pub const FAILURE_BURST: f64 = 20.0;
/// Failed credentials one peer may present per second once its burst is spent.
pub const FAILURE_PER_SECOND: f64 = 2.0;
/// Peers whose failures are remembered; past it the least recently failing peer is forgotten
/// (first those whose bucket has refilled anyway), so a flood of addresses costs bounded memory.
pub const MAX_FAILING_PEERS: usize = 10_000;

/// The outcome of a credential check, as the caller must answer it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The right credential: proceed (subject to the caller's own budgets).
    Accepted,
    /// A wrong or missing credential, within the peer's failure budget: `UNAUTHENTICATED`.
    Refused,
    /// A wrong or missing credential from a peer past its failure budget:
    /// `RESOURCE_EXHAUSTED`.
    TooManyFailures,
}

/// A token bucket on tokio's clock (so tests can pause time).
#[derive(Debug, Clone)]
pub struct Bucket {
    tokens: f64,
    last: Instant,
}

impl Bucket {
    /// A bucket holding `burst` tokens at `now`.
    pub fn full(burst: f64, now: Instant) -> Bucket {
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

    /// Takes one token after refilling at `per_second` up to `burst`; false when there is
    /// none.
    pub fn take(&mut self, now: Instant, per_second: f64, burst: f64) -> bool {
        self.refill(now, per_second, burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Failed credentials per peer: [`FAILURE_BURST`] then [`FAILURE_PER_SECOND`] for each peer
/// address (IPv6: each /64), remembered for at most [`MAX_FAILING_PEERS`] peers.
#[derive(Debug, Default)]
pub struct FailedCredentials {
    peers: Mutex<FailingPeers>,
}

impl FailedCredentials {
    /// No failures yet.
    pub fn new() -> FailedCredentials {
        FailedCredentials::default()
    }

    /// Judges a credential check that came out `accepted` for a call from `peer`. The right
    /// credential is always accepted, whatever anyone (the same address included) has failed
    /// before. A wrong one is charged to the peer's own failure bucket, and past that budget is
    /// answered [`Verdict::TooManyFailures`].
    pub fn judge(&self, accepted: bool, peer: Option<SocketAddr>) -> Verdict {
        if accepted {
            return Verdict::Accepted;
        }
        let mut peers = self.peers.lock().unwrap_or_else(PoisonError::into_inner);
        if peers.charge(peer_key(peer), Instant::now()) {
            Verdict::Refused
        } else {
            Verdict::TooManyFailures
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
pub fn peer_key(peer: Option<SocketAddr>) -> Option<IpAddr> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn failures_are_per_peer_and_never_refuse_the_right_credential() {
        let failures = FailedCredentials::new();
        let attacker: SocketAddr = "192.0.2.7:5000".parse().unwrap();
        let neighbour: SocketAddr = "192.0.2.7:5001".parse().unwrap();
        let operator: SocketAddr = "192.0.2.8:5000".parse().unwrap();
        let burst = FAILURE_BURST as usize;
        for _ in 0..burst {
            assert_eq!(failures.judge(false, Some(attacker)), Verdict::Refused);
        }
        assert_eq!(
            failures.judge(false, Some(neighbour)),
            Verdict::TooManyFailures,
            "the budget is per address, not per connection"
        );
        assert_eq!(failures.judge(false, Some(operator)), Verdict::Refused);
        assert_eq!(failures.judge(true, Some(attacker)), Verdict::Accepted);
        tokio::time::advance(Duration::from_millis(500)).await;
        assert_eq!(failures.judge(false, Some(attacker)), Verdict::Refused);
        assert_eq!(
            failures.judge(false, Some(attacker)),
            Verdict::TooManyFailures
        );
    }

    #[tokio::test(start_paused = true)]
    async fn callers_without_an_address_share_one_budget_of_their_own() {
        let failures = FailedCredentials::new();
        for _ in 0..FAILURE_BURST as usize {
            assert_eq!(failures.judge(false, None), Verdict::Refused);
        }
        assert_eq!(failures.judge(false, None), Verdict::TooManyFailures);
        assert_eq!(failures.judge(true, None), Verdict::Accepted);
        let peer: SocketAddr = "192.0.2.9:1".parse().unwrap();
        assert_eq!(failures.judge(false, Some(peer)), Verdict::Refused);
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

    #[tokio::test(start_paused = true)]
    async fn a_bucket_refills_at_its_rate_up_to_its_burst() {
        let mut bucket = Bucket::full(10.0, Instant::now());
        let taken = (0..20)
            .filter(|_| bucket.take(Instant::now(), 5.0, 10.0))
            .count();
        assert_eq!(taken, 10, "the burst");
        tokio::time::advance(Duration::from_millis(400)).await;
        let taken = (0..10)
            .filter(|_| bucket.take(Instant::now(), 5.0, 10.0))
            .count();
        assert_eq!(taken, 2);
        tokio::time::advance(Duration::from_secs(3600)).await;
        let taken = (0..30)
            .filter(|_| bucket.take(Instant::now(), 5.0, 10.0))
            .count();
        assert_eq!(taken, 10, "never more than the burst");
    }
}
