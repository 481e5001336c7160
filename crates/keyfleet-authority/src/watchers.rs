//! The nodes watching the JWKS and the version each has acknowledged: the authority promotes a
//! next key once every live watcher holds it.

use std::collections::HashMap;
use std::time::Duration;

use keyfleet_core::UnixSeconds;
use keyfleet_proto::v1::WatcherInfo;
use tokio::time::Instant;

/// How long a disconnected watcher stays listed by `ListKeys`.
pub(crate) const FORGET_AFTER: Duration = Duration::from_secs(600);
/// Upper bound of listed watchers; the oldest disconnected ones go first past it.
const MAX_WATCHERS: usize = 10_000;
/// Longest node id or region kept (longer ones are cut).
pub(crate) const MAX_LABEL_LEN: usize = 128;

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
    /// Registers a stream for `node_id`; returns its connection id.
    pub(crate) fn connect(
        &mut self,
        node_id: &str,
        region: &str,
        acked: u64,
        now: UnixSeconds,
    ) -> u64 {
        self.next_conn += 1;
        let conn = self.next_conn;
        if self.map.len() >= MAX_WATCHERS && !self.map.contains_key(node_id) {
            self.evict_oldest_disconnected();
        }
        self.map.insert(
            node_id.to_owned(),
            Watcher {
                region: region.to_owned(),
                acked_version: acked,
                last_seen: now,
                seen_at: Instant::now(),
                connected: true,
                conn,
            },
        );
        conn
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

/// Cuts a client-chosen label to [`MAX_LABEL_LEN`] bytes on a character boundary.
pub(crate) fn bounded(label: &str) -> &str {
    if label.len() <= MAX_LABEL_LEN {
        return label;
    }
    let mut end = MAX_LABEL_LEN;
    while !label.is_char_boundary(end) {
        end -= 1;
    }
    &label[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn liveness_and_min_acked() {
        let timeout = Duration::from_secs(30);
        let mut w = Watchers::default();
        assert_eq!(w.min_acked(timeout), None);
        let a = w.connect("a", "eu", 0, 100);
        let b = w.connect("b", "us", 3, 100);
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

    #[test]
    fn bounds_labels() {
        assert_eq!(bounded("node-1"), "node-1");
        let long = "é".repeat(100);
        assert!(bounded(&long).len() <= MAX_LABEL_LEN);
        assert!(bounded(&long).chars().all(|c| c == 'é'));
    }
}
