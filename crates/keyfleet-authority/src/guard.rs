//! What stands in front of the admin credential check: admin RPCs only over TLS or loopback
//! (unless `--insecure-admin`), and a token-bucket rate limit on key management and on failed
//! credentials, so a flood of guesses or rotations cannot hog the ring's lock or the logs.

use std::net::SocketAddr;
use std::sync::{Mutex, PoisonError};

use tokio::time::Instant;

/// Decides whether an admin call may proceed as far as the credential check.
#[derive(Debug)]
pub(crate) struct AdminGuard {
    /// TLS on the listener, a loopback listener, or `--insecure-admin`.
    transport_ok: bool,
    bucket: Mutex<Bucket>,
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    last: Instant,
    per_second: f64,
    burst: f64,
}

impl AdminGuard {
    /// `per_second` admin operations (burst twice that) on a listener at `listen` that has
    /// TLS or not.
    pub(crate) fn new(
        listen: SocketAddr,
        tls: bool,
        insecure_admin: bool,
        per_second: u32,
    ) -> AdminGuard {
        let per_second = f64::from(per_second.max(1));
        AdminGuard {
            transport_ok: tls || insecure_admin || listen.ip().is_loopback(),
            bucket: Mutex::new(Bucket {
                tokens: 2.0 * per_second,
                last: Instant::now(),
                per_second,
                burst: 2.0 * per_second,
            }),
        }
    }

    /// Whether the bearer token may travel over this connection: the listener is safe, or the
    /// peer is on this host (a local proxy, `keyfleet keys` on the machine itself).
    pub(crate) fn transport_ok(&self, peer: Option<SocketAddr>) -> bool {
        self.transport_ok || peer.is_some_and(|p| p.ip().is_loopback())
    }

    /// Takes one token from the bucket; false when it is empty.
    pub(crate) fn take(&self) -> bool {
        let mut b = self.bucket.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        let refill = now.duration_since(b.last).as_secs_f64() * b.per_second;
        b.tokens = (b.tokens + refill).min(b.burst);
        b.last = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }
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
    async fn bucket_refills_at_its_rate() {
        let guard = AdminGuard::new("127.0.0.1:1".parse().unwrap(), false, false, 5);
        assert_eq!((0..10).filter(|_| guard.take()).count(), 10, "burst of 2x");
        assert!(!guard.take());
        tokio::time::advance(Duration::from_millis(400)).await;
        assert_eq!((0..10).filter(|_| guard.take()).count(), 2);
    }
}
