//! The nodes watching the JWKS and the version each has acknowledged: the authority promotes a
//! next key once every live watcher holds it. Also the caps on watch streams, overall and per
//! peer address.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use keyfleet_core::UnixSeconds;
use keyfleet_proto::v1::WatcherInfo;
use tokio::time::Instant;

/// How long a disconnected watcher stays listed by `ListKeys`.
pub(crate) const FORGET_AFTER: Duration = Duration::from_secs(600);
/// Upper bound of listed watchers; the oldest disconnected ones go first past it.
const MAX_LISTED: usize = 10_000;
/// How often a verifier repeats its acknowledgement on an idle stream (the verifier's
/// `HEARTBEAT` is the same 5 s).
pub(crate) const HEARTBEAT: Duration = Duration::from_secs(5);
/// A stream heard from within three heartbeats is live: its node id cannot be taken over by
/// another connection. A restarted node gets its name back once the old stream has ended or
/// been silent this long (it keeps retrying meanwhile).
pub(crate) const LIVE_WINDOW: Duration = Duration::from_secs(3 * HEARTBEAT.as_secs());

#[derive(Debug)]
struct Watcher {
    region: String,
    acked_version: u64,
    /// Wall-clock time of the last message (or disconnect), for operators.
    last_seen: UnixSeconds,
    /// Monotonic time of the same, for liveness and forgetting.
    seen_at: Instant,
    connected: bool,
    /// The stream that owns this entry: a reconnect under the same node id takes it over.
    conn: u64,
}

#[derive(Debug, Default)]
pub(crate) struct Watchers {
    map: HashMap<String, Watcher>,
    next_conn: u64,
}

impl Watchers {
    /// Registers a stream for `node_id`; returns its connection id, or `None` when a live
    /// stream (connected and heard from within [`LIVE_WINDOW`]) holds that node id.
    pub(crate) fn connect(
        &mut self,
        node_id: &str,
        region: &str,
        acked: u64,
        now: UnixSeconds,
    ) -> Option<u64> {
        let seen_at = Instant::now();
        if self.map.get(node_id).is_some_and(|w| {
            w.connected && seen_at.saturating_duration_since(w.seen_at) <= LIVE_WINDOW
        }) {
            return None;
        }
        self.next_conn += 1;
        let conn = self.next_conn;
        if self.map.len() >= MAX_LISTED && !self.map.contains_key(node_id) {
            self.evict_oldest_disconnected();
        }
        self.map.insert(
            node_id.to_owned(),
            Watcher {
                region: region.to_owned(),
                acked_version: acked,
                last_seen: now,
                seen_at,
                connected: true,
                conn,
            },
        );
        Some(conn)
    }

    /// Records a message (an ack of `acked`) from the stream `conn` of `node_id`.
    pub(crate) fn ack(&mut self, node_id: &str, conn: u64, acked: u64, now: UnixSeconds) {
        if let Some(w) = self.map.get_mut(node_id).filter(|w| w.conn == conn) {
            w.acked_version = w.acked_version.max(acked);
            w.last_seen = now;
            w.seen_at = Instant::now();
        }
    }

    pub(crate) fn disconnect(&mut self, node_id: &str, conn: u64, now: UnixSeconds) {
        if let Some(w) = self.map.get_mut(node_id).filter(|w| w.conn == conn) {
            w.connected = false;
            w.last_seen = now;
            w.seen_at = Instant::now();
        }
    }

    /// The lowest version acknowledged by a live watcher (connected and heard from within
    /// `timeout`); `None` when no watcher is live.
    pub(crate) fn min_acked(&self, timeout: Duration) -> Option<u64> {
        let now = Instant::now();
        self.map
            .values()
            .filter(|w| w.connected && now.saturating_duration_since(w.seen_at) <= timeout)
            .map(|w| w.acked_version)
            .min()
    }

    /// Live watchers (as in [`Watchers::min_acked`]) that have not acknowledged `version`.
    pub(crate) fn lagging(&self, version: u64, timeout: Duration) -> usize {
        let now = Instant::now();
        self.map
            .values()
            .filter(|w| w.connected && now.saturating_duration_since(w.seen_at) <= timeout)
            .filter(|w| w.acked_version < version)
            .count()
    }

    pub(crate) fn connected(&self) -> usize {
        self.map.values().filter(|w| w.connected).count()
    }

    /// Forgets watchers disconnected for longer than [`FORGET_AFTER`].
    pub(crate) fn prune(&mut self) {
        let now = Instant::now();
        self.map
            .retain(|_, w| w.connected || now.saturating_duration_since(w.seen_at) <= FORGET_AFTER);
    }

    fn evict_oldest_disconnected(&mut self) {
        let oldest = self
            .map
            .iter()
            .filter(|(_, w)| !w.connected)
            .min_by_key(|(_, w)| w.seen_at);
        if let Some(id) = oldest.map(|(id, _)| id.clone()) {
            self.map.remove(&id);
        }
    }

    /// Every listed watcher, sorted by node id.
    pub(crate) fn list(&self) -> Vec<WatcherInfo> {
        let mut out: Vec<WatcherInfo> = self
            .map
            .iter()
            .map(|(id, w)| WatcherInfo {
                node_id: id.clone(),
                region: w.region.clone(),
                acked_version: w.acked_version,
                last_seen: w.last_seen,
                connected: w.connected,
            })
            .collect();
        out.sort_by(|a, b| a.node_id.cmp(&b.node_id));
        out
    }
}

/// The caps on open watch streams: `--max-watchers` overall and a bound per peer address.
#[derive(Debug, Clone)]
pub(crate) struct Slots {
    inner: Arc<Mutex<SlotCounts>>,
    max_total: usize,
    max_per_peer: usize,
}

#[derive(Debug, Default)]
struct SlotCounts {
    total: usize,
    per_peer: HashMap<Option<IpAddr>, usize>,
}

/// Why a stream got no slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Full {
    Total(usize),
    Peer(usize),
}

/// One open watch stream's place under the caps; freed when dropped.
#[derive(Debug)]
pub(crate) struct Slot {
    inner: Arc<Mutex<SlotCounts>>,
    peer: Option<IpAddr>,
}

impl Slots {
    pub(crate) fn new(max_total: usize, max_per_peer: usize) -> Slots {
        Slots {
            inner: Arc::default(),
            max_total,
            max_per_peer,
        }
    }

    /// A slot for a stream from `peer`, or which cap is reached.
    pub(crate) fn take(&self, peer: Option<IpAddr>) -> Result<Slot, Full> {
        let mut counts = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        if counts.total >= self.max_total {
            return Err(Full::Total(self.max_total));
        }
        let mine = counts.per_peer.entry(peer).or_default();
        if *mine >= self.max_per_peer {
            return Err(Full::Peer(self.max_per_peer));
        }
        *mine += 1;
        counts.total += 1;
        Ok(Slot {
            inner: self.inner.clone(),
            peer,
        })
    }

    /// Streams holding a slot.
    #[cfg(test)]
    pub(crate) fn open(&self) -> usize {
        self.inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .total
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut counts = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        counts.total -= 1;
        if let Some(n) = counts.per_peer.get_mut(&self.peer) {
            *n -= 1;
            if *n == 0 {
                counts.per_peer.remove(&self.peer);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn liveness_and_min_acked() {
        let timeout = Duration::from_secs(30);
        let mut w = Watchers::default();
        assert_eq!(w.min_acked(timeout), None);
        let a = w.connect("a", "eu", 0, 100).unwrap();
        let b = w.connect("b", "us", 3, 100).unwrap();
        assert_eq!(w.min_acked(timeout), Some(0));
        w.ack("a", a, 5, 101);
        assert_eq!(w.min_acked(timeout), Some(3));
        // A stale stream id does not move the current one.
        w.ack("b", b + 100, 9, 101);
        assert_eq!(w.min_acked(timeout), Some(3));
        tokio::time::advance(Duration::from_secs(31)).await;
        w.ack("a", a, 6, 130);
        assert_eq!(w.min_acked(timeout), Some(6), "b went quiet");
        w.disconnect("a", a, 131);
        assert_eq!(w.min_acked(timeout), None);
        assert_eq!(w.connected(), 1);
        assert_eq!(w.list().len(), 2);
        tokio::time::advance(FORGET_AFTER + Duration::from_secs(1)).await;
        w.prune();
        let left: Vec<String> = w.list().into_iter().map(|i| i.node_id).collect();
        assert_eq!(left, vec!["b".to_owned()]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_live_node_id_cannot_be_taken_over() {
        let mut w = Watchers::default();
        let real = w.connect("n1", "eu", 4, 100).unwrap();
        assert_eq!(w.connect("n1", "evil", 0, 100), None, "live: refused");
        tokio::time::advance(LIVE_WINDOW - Duration::from_secs(1)).await;
        w.ack("n1", real, 4, 110);
        tokio::time::advance(LIVE_WINDOW - Duration::from_secs(1)).await;
        assert_eq!(w.connect("n1", "evil", 0, 120), None, "heartbeats keep it");
        let listed = &w.list()[0];
        assert_eq!((listed.region.as_str(), listed.acked_version), ("eu", 4));
        // Silent for three heartbeats: a restarted node may take its name back.
        tokio::time::advance(Duration::from_secs(2)).await;
        let again = w.connect("n1", "eu", 0, 130).unwrap();
        w.ack("n1", real, 9, 131);
        assert_eq!(
            w.list()[0].acked_version,
            0,
            "the old stream no longer counts"
        );
        // A stream that ended frees the name at once.
        w.disconnect("n1", again, 132);
        assert!(w.connect("n1", "eu", 0, 132).is_some());
    }

    #[test]
    fn slots_cap_overall_and_per_peer() {
        let slots = Slots::new(3, 2);
        let a: Option<IpAddr> = Some("192.0.2.1".parse().unwrap());
        let b: Option<IpAddr> = Some("192.0.2.2".parse().unwrap());
        let a1 = slots.take(a).unwrap();
        let _a2 = slots.take(a).unwrap();
        assert_eq!(slots.take(a).unwrap_err(), Full::Peer(2));
        let _b1 = slots.take(b).unwrap();
        assert_eq!(slots.take(b).unwrap_err(), Full::Total(3));
        drop(a1);
        assert_eq!(slots.open(), 2);
        let _a3 = slots.take(a).unwrap();
    }
}
