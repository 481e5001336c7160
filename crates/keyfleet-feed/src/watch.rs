//! The serving side of `WatchJwks`, shared by the authority and relays: the fleet view
//! ([`Watchers`]: which node holds which version, directly or behind a relay), the caps on
//! watch streams ([`Slots`]), and the driver of one admitted stream ([`open`]), which sends what
//! the node's [`Subscription`] yields and records its acknowledgements, heartbeats and (from a
//! relay) the nodes behind it.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use futures_util::{Stream, StreamExt as _};
use keyfleet_core::{UnixSeconds, is_valid_label};
use keyfleet_proto::v1::{DownstreamWatcher, WatchJwksRequest, WatcherInfo};
use keyfleet_proto::wire::EncodedSnapshot;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::Status;
use tracing::{debug, info, warn};

use crate::{Feed, Message, Subscription};

/// How long a disconnected watcher stays listed.
pub const FORGET_AFTER: Duration = Duration::from_secs(600);
/// Listed watchers past which the oldest disconnected ones are forgotten early (connected ones
/// always stay listed). Checked again after every 10% of growth, so that a fleet of connected
/// nodes larger than this does not cost a scan per new node.
pub const MAX_LISTED: usize = 10_000;
/// How often a verifier repeats its acknowledgement on an idle stream (the verifier's
/// `HEARTBEAT` is the same 5 s).
pub const HEARTBEAT: Duration = Duration::from_secs(5);
/// A stream heard from within three heartbeats is live: its node id cannot be taken over by
/// another connection. A restarted node gets its name back once the old stream has ended or
/// been silent this long (it keeps retrying meanwhile).
pub const LIVE_WINDOW: Duration = Duration::from_secs(3 * HEARTBEAT.as_secs());
/// How long a stream to a node that takes deltas may stay silent before it tells the node that
/// it still holds the newest version (an empty delta, ~80 bytes): the node renews its freshness
/// from it, so an idle fleet never falls back to pulling the whole set (a verifier pulls every
/// `--refresh-interval`, 5 min by default, only when its stream delivered nothing since).
pub const RENEW_IDLE: Duration = Duration::from_secs(60);
/// A full snapshot larger than this ends the stream that carried it (to a node that takes
/// deltas), and the node resumes at once on a new stream from the version it now holds. tonic
/// keeps a stream's send buffer at the size of the largest message it carried for as long as
/// the stream lives; without this, a deny list of 100,000 entries (~3.2 MB) would cost that
/// much memory per watcher for good. Smaller snapshots stay within tonic's 8 KiB buffer or
/// close to it, and keep their stream.
pub const FULL_ENDS_STREAM_ABOVE: usize = 16 * 1024;
/// A watch stream must send its hello this soon ([`read_hello`]).
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(5);
/// Most `WatchJwksRequest.downstream` entries a relay puts in one message: 50 entries with
/// 128-character node ids and regions (278 bytes each) plus a full hello stay under the 16 KiB
/// a server decodes. A relay with more nodes sends several messages.
pub const MAX_DOWNSTREAM_PER_MESSAGE: usize = 50;
/// Most nodes behind relays one fleet view tracks (all relays together); entries past it are
/// refused (logged), so a misbehaving relay cannot grow the table without bound.
pub const MAX_DOWNSTREAM: usize = 200_000;

#[derive(Debug)]
struct Watcher {
    region: String,
    acked_version: u64,
    /// Wall-clock time of the last message (or disconnect), for operators.
    last_seen: UnixSeconds,
    /// Monotonic time of the same, for liveness and forgetting.
    seen_at: Instant,
    connected: bool,
    /// The stream that owns this entry: its own, or (with `via`) its relay's. A reconnect under
    /// the same node id takes the entry over.
    conn: u64,
    /// The relay (its node id) this node watches through; `None` for a direct watcher.
    via: Option<Arc<str>>,
}

/// The nodes watching and the version each has acknowledged, directly or through a relay: the
/// authority promotes a next key once every live one holds it. A direct watcher is live while
/// its stream is connected and heard from within a timeout; a node behind a relay while the
/// relay's stream is, and the relay reports it connected.
#[derive(Debug, Default)]
pub struct Watchers {
    map: HashMap<String, Watcher>,
    next_conn: u64,
    /// Entries with `via`.
    downstream: usize,
    /// Streams that reported nodes behind them (their end disconnects those nodes).
    relays: HashSet<u64>,
    /// Node ids whose reportable fields changed since the last [`Watchers::report_changes`];
    /// kept only when made with [`Watchers::reporting`].
    dirty: Option<HashSet<String>>,
    /// The table size at which [`Watchers::make_room`] looks for disconnected entries again.
    room_check_at: usize,
}

/// The fleet view in one pass, for gauges ([`Watchers::summary`]).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    /// Connected watchers, direct and behind relays.
    pub connected: usize,
    /// Connected watchers behind relays.
    pub behind_relays: usize,
    /// Live watchers that have not acknowledged the version asked about.
    pub lagging: usize,
    /// The lowest version a live watcher acknowledged.
    pub min_acked: Option<u64>,
}

/// What [`Watchers::report`] did with a relay's entries.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Reported {
    /// Entries recorded.
    pub accepted: usize,
    /// Entries ignored: a bad label, a node id a live stream of another holds, the table full,
    /// or a relay stream that no longer owns its own entry.
    pub refused: usize,
}

impl Watchers {
    /// A fleet view that also remembers which entries changed, for a relay that reports its
    /// nodes upstream ([`Watchers::report_all`], [`Watchers::report_changes`]).
    pub fn reporting() -> Watchers {
        Watchers {
            dirty: Some(HashSet::new()),
            ..Watchers::default()
        }
    }

    fn touch(&mut self, node_id: &str) {
        if let Some(dirty) = &mut self.dirty
            && !dirty.contains(node_id)
        {
            dirty.insert(node_id.to_owned());
        }
    }

    /// Whether `w`'s stream (its own, or its relay's) is connected and heard from within
    /// `window` of `now`.
    fn live(&self, w: &Watcher, window: Duration, now: Instant) -> bool {
        let fresh = |x: &Watcher| x.connected && now.saturating_duration_since(x.seen_at) <= window;
        match &w.via {
            None => fresh(w),
            Some(relay) => w.connected && self.relay(relay, w.conn).is_some_and(fresh),
        }
    }

    /// Whether `w` is connected, through its relay's current stream when it has one.
    fn connected_now(&self, w: &Watcher) -> bool {
        match &w.via {
            None => w.connected,
            Some(relay) => w.connected && self.relay(relay, w.conn).is_some_and(|r| r.connected),
        }
    }

    /// The direct entry of `relay` when its stream is `conn`.
    fn relay(&self, relay: &str, conn: u64) -> Option<&Watcher> {
        self.map
            .get(relay)
            .filter(|r| r.via.is_none() && r.conn == conn)
    }

    /// Registers a stream for `node_id`; returns its connection id, or `None` when a live
    /// stream (connected and heard from within [`LIVE_WINDOW`], or a live relay's report of a
    /// connected node) holds that node id.
    pub fn connect(
        &mut self,
        node_id: &str,
        region: &str,
        acked: u64,
        now: UnixSeconds,
    ) -> Option<u64> {
        let seen_at = Instant::now();
        if self
            .map
            .get(node_id)
            .is_some_and(|w| self.live(w, LIVE_WINDOW, seen_at))
        {
            return None;
        }
        self.next_conn += 1;
        let conn = self.next_conn;
        if !self.map.contains_key(node_id) {
            self.make_room();
        }
        let old = self.map.insert(
            node_id.to_owned(),
            Watcher {
                region: region.to_owned(),
                acked_version: acked,
                last_seen: now,
                seen_at,
                connected: true,
                conn,
                via: None,
            },
        );
        if old.is_some_and(|w| w.via.is_some()) {
            self.downstream -= 1;
        }
        self.touch(node_id);
        Some(conn)
    }

    /// Records a message (an ack of `acked`) from the stream `conn` of `node_id`; true when its
    /// acknowledged version moved.
    pub fn ack(&mut self, node_id: &str, conn: u64, acked: u64, now: UnixSeconds) -> bool {
        let Some(w) = self
            .map
            .get_mut(node_id)
            .filter(|w| w.conn == conn && w.via.is_none())
        else {
            return false;
        };
        let moved = acked > w.acked_version;
        w.acked_version = w.acked_version.max(acked);
        w.last_seen = now;
        w.seen_at = Instant::now();
        if moved {
            self.touch(node_id);
        }
        moved
    }

    /// Marks the stream `conn` of `node_id` disconnected (it stays listed for a while), and
    /// with it every node it reported behind it.
    pub fn disconnect(&mut self, node_id: &str, conn: u64, now: UnixSeconds) {
        let seen_at = Instant::now();
        if let Some(w) = self
            .map
            .get_mut(node_id)
            .filter(|w| w.conn == conn && w.via.is_none())
        {
            w.connected = false;
            w.last_seen = now;
            w.seen_at = seen_at;
            self.touch(node_id);
        }
        if self.relays.remove(&conn) {
            let mut gone = Vec::new();
            for (id, w) in &mut self.map {
                if w.conn == conn && w.via.as_deref() == Some(node_id) && w.connected {
                    w.connected = false;
                    w.last_seen = now;
                    w.seen_at = seen_at;
                    gone.push(id.clone());
                }
            }
            for id in gone {
                self.touch(&id);
            }
        }
    }

    /// Records the nodes the relay `relay` (its stream `conn`) reports behind it, each with the
    /// version it acknowledged to the relay, at most `ceiling` (what this stream has sent the
    /// relay). A node id a live stream of another holds is refused, as in
    /// [`Watchers::connect`].
    pub fn report(
        &mut self,
        relay: &str,
        conn: u64,
        entries: &[DownstreamWatcher],
        ceiling: u64,
        now: UnixSeconds,
    ) -> Reported {
        let mut done = Reported::default();
        if self.relay(relay, conn).is_none() {
            done.refused = entries.len();
            return done;
        }
        self.relays.insert(conn);
        let via: Arc<str> = Arc::from(relay);
        let seen_at = Instant::now();
        for e in entries {
            if !is_valid_label(&e.node_id) || !is_valid_label(&e.region) || e.node_id == relay {
                done.refused += 1;
                continue;
            }
            let acked = e.acked_version.min(ceiling);
            let ours = |w: &Watcher| w.conn == conn && w.via.as_deref() == Some(relay);
            match self.map.get(&e.node_id) {
                Some(w) if ours(w) => {}
                Some(w) if !e.connected || self.live(w, LIVE_WINDOW, seen_at) => {
                    // Not ours to take: a live stream holds the name, or the report only says
                    // the node left this relay.
                    done.refused += usize::from(e.connected);
                    done.accepted += usize::from(!e.connected);
                    continue;
                }
                Some(_) => {}
                None if self.downstream >= MAX_DOWNSTREAM => {
                    done.refused += 1;
                    continue;
                }
                None => self.make_room(),
            }
            let entry = Watcher {
                region: e.region.clone(),
                acked_version: acked,
                last_seen: now,
                seen_at,
                connected: e.connected,
                conn,
                via: Some(via.clone()),
            };
            match self.map.get_mut(&e.node_id) {
                Some(w) if ours(w) => {
                    let changed = w.acked_version != acked
                        || w.connected != e.connected
                        || w.region != e.region;
                    *w = entry;
                    if changed {
                        self.touch(&e.node_id);
                    }
                }
                Some(w) => {
                    if w.via.is_none() {
                        self.downstream += 1;
                    }
                    *w = entry;
                    self.touch(&e.node_id);
                }
                None => {
                    self.downstream += 1;
                    self.map.insert(e.node_id.clone(), entry);
                    self.touch(&e.node_id);
                }
            }
            done.accepted += 1;
        }
        done
    }

    /// The lowest version acknowledged by a live watcher (as in [`Watchers::lagging`]); `None`
    /// when no watcher is live.
    pub fn min_acked(&self, timeout: Duration) -> Option<u64> {
        let now = Instant::now();
        self.map
            .values()
            .filter(|w| self.live(w, timeout, now))
            .map(|w| w.acked_version)
            .min()
    }

    /// Live watchers that have not acknowledged `version`: direct ones connected and heard
    /// from within `timeout`, nodes behind a relay whose stream is, reported connected.
    pub fn lagging(&self, version: u64, timeout: Duration) -> usize {
        let now = Instant::now();
        self.map
            .values()
            .filter(|w| w.acked_version < version && self.live(w, timeout, now))
            .count()
    }

    /// Everything the gauges show, in one pass: connected watchers (and how many of them are
    /// behind relays), and live ones lagging behind `version` (with `timeout` as in
    /// [`Watchers::lagging`]) and their lowest acknowledged version.
    pub fn summary(&self, version: u64, timeout: Duration) -> Summary {
        let now = Instant::now();
        let mut out = Summary::default();
        for w in self.map.values() {
            if self.connected_now(w) {
                out.connected += 1;
                out.behind_relays += usize::from(w.via.is_some());
            }
            if self.live(w, timeout, now) {
                out.lagging += usize::from(w.acked_version < version);
                out.min_acked = Some(
                    out.min_acked
                        .map_or(w.acked_version, |m| m.min(w.acked_version)),
                );
            }
        }
        out
    }

    /// Connected watchers, direct and behind relays.
    pub fn connected(&self) -> usize {
        self.map.values().filter(|w| self.connected_now(w)).count()
    }

    /// Connected watchers behind relays.
    pub fn connected_behind_relays(&self) -> usize {
        self.map
            .values()
            .filter(|w| w.via.is_some() && self.connected_now(w))
            .count()
    }

    /// Forgets watchers disconnected for longer than [`FORGET_AFTER`].
    pub fn prune(&mut self) {
        let now = Instant::now();
        let old: Vec<String> = self
            .map
            .iter()
            .filter(|(_, w)| {
                !self.connected_now(w) && now.saturating_duration_since(w.seen_at) > FORGET_AFTER
            })
            .map(|(id, _)| id.clone())
            .collect();
        for id in old {
            self.forget(&id);
        }
    }

    fn forget(&mut self, node_id: &str) {
        if let Some(w) = self.map.remove(node_id)
            && w.via.is_some()
        {
            self.downstream -= 1;
        }
        if let Some(dirty) = &mut self.dirty {
            dirty.remove(node_id);
        }
    }

    /// Before a new entry: past [`MAX_LISTED`], forgets the oldest disconnected entries down to
    /// 90% of it (as many as there are), then waits for 10% more growth before looking again.
    fn make_room(&mut self) {
        if self.map.len() < self.room_check_at.max(MAX_LISTED) {
            return;
        }
        let mut gone: Vec<(Instant, String)> = self
            .map
            .iter()
            .filter(|(_, w)| !self.connected_now(w))
            .map(|(id, w)| (w.seen_at, id.clone()))
            .collect();
        gone.sort_unstable();
        let excess = self.map.len().saturating_sub(MAX_LISTED * 9 / 10);
        for (_, id) in gone.into_iter().take(excess) {
            self.forget(&id);
        }
        self.room_check_at = self.map.len() + self.map.len() / 10 + 1;
    }

    /// Every listed watcher, sorted by node id.
    pub fn list(&self) -> Vec<WatcherInfo> {
        let mut out: Vec<WatcherInfo> = self
            .map
            .iter()
            .map(|(id, w)| WatcherInfo {
                node_id: id.clone(),
                region: w.region.clone(),
                acked_version: w.acked_version,
                last_seen: w.last_seen,
                connected: self.connected_now(w),
                via: w.via.as_deref().unwrap_or_default().to_owned(),
            })
            .collect();
        out.sort_by(|a, b| a.node_id.cmp(&b.node_id));
        out
    }

    fn downstream_entry(&self, node_id: &str) -> Option<DownstreamWatcher> {
        self.map.get(node_id).map(|w| DownstreamWatcher {
            node_id: node_id.to_owned(),
            region: w.region.clone(),
            acked_version: w.acked_version,
            connected: self.connected_now(w),
        })
    }

    /// Every listed watcher as a relay reports it upstream (the first message after the relay
    /// connects), sorted by node id; what changed before is taken as reported. Send it in
    /// chunks of [`MAX_DOWNSTREAM_PER_MESSAGE`].
    pub fn report_all(&mut self) -> Vec<DownstreamWatcher> {
        if let Some(dirty) = &mut self.dirty {
            dirty.clear();
        }
        let mut ids: Vec<&String> = self.map.keys().collect();
        ids.sort();
        ids.into_iter()
            .filter_map(|id| self.downstream_entry(id))
            .collect()
    }

    /// The watchers whose version, region or connection changed since the last
    /// [`Watchers::report_all`] or `report_changes` (only in a view made with
    /// [`Watchers::reporting`]; empty otherwise). A node that disconnected from a relay of this
    /// relay's (and so on) is reported disconnected.
    pub fn report_changes(&mut self) -> Vec<DownstreamWatcher> {
        let Some(dirty) = self.dirty.take() else {
            return Vec::new();
        };
        let mut ids: Vec<&String> = dirty.iter().collect();
        ids.sort();
        let out = ids
            .into_iter()
            .filter_map(|id| self.downstream_entry(id))
            .collect();
        self.dirty = Some(HashSet::new());
        out
    }
}

/// The caps on open watch streams: a maximum overall and a bound per peer address.
#[derive(Debug, Clone)]
pub struct Slots {
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
pub enum Full {
    /// The overall cap (the value) is reached.
    Total(usize),
    /// The peer's cap (the value) is reached.
    Peer(usize),
}

/// One open watch stream's place under the caps; freed when dropped.
#[derive(Debug)]
pub struct Slot {
    inner: Arc<Mutex<SlotCounts>>,
    peer: Option<IpAddr>,
}

impl Slots {
    /// At most `max_total` streams, `max_per_peer` from one address.
    pub fn new(max_total: usize, max_per_peer: usize) -> Slots {
        Slots {
            inner: Arc::default(),
            max_total,
            max_per_peer,
        }
    }

    /// A slot for a stream from `peer`, or which cap is reached.
    pub fn take(&self, peer: Option<IpAddr>) -> Result<Slot, Full> {
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
    pub fn open(&self) -> usize {
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

/// What a stream driver needs from the server that owns it (an authority or a relay).
pub trait WatchOwner: Send + Sync + 'static {
    /// The fleet view.
    fn watchers(&self) -> MutexGuard<'_, Watchers>;
    /// Wall-clock Unix seconds, for `last_seen`.
    fn now(&self) -> UnixSeconds;
    /// The fleet view changed in a way that may let a promotion proceed (a connect, an ack
    /// that moved, a disconnect, a relay's report). Heartbeats that move nothing do not call it.
    fn changed(&self) {}
    /// `message` was handed to the transport of a stream.
    fn sent(&self, _message: &Message) {}
}

/// Why a hello was not read.
#[derive(Debug)]
pub enum HelloError {
    /// No message within [`HELLO_TIMEOUT`], or the client closed its side first.
    Missing,
    /// The first message could not be read (too large, not protobuf, a reset).
    Unreadable(Status),
}

/// Reads a watch stream's first message (its hello), for at most [`HELLO_TIMEOUT`]. The caller
/// checks its labels (`keyfleet_core::is_valid_label`).
pub async fn read_hello<S>(inbound: &mut S) -> Result<WatchJwksRequest, HelloError>
where
    S: Stream<Item = Result<WatchJwksRequest, Status>> + Unpin,
{
    match tokio::time::timeout(HELLO_TIMEOUT, inbound.next()).await {
        Ok(Some(Ok(hello))) => Ok(hello),
        Ok(None) | Err(_) => Err(HelloError::Missing),
        Ok(Some(Err(status))) => Err(HelloError::Unreadable(status)),
    }
}

/// The response stream of `WatchJwks` on an [`keyfleet_proto::encoded`] server.
pub type WatchResponse = Pin<Box<dyn Stream<Item = Result<EncodedSnapshot, Status>> + Send>>;

/// A stream that passed its owner's checks (credential, a [`Slot`], the hello read and its
/// labels valid).
#[derive(Debug)]
pub struct Admitted<S> {
    /// The rest of the client's messages.
    pub inbound: S,
    /// Its first message.
    pub hello: WatchJwksRequest,
    /// The node's name: the hello's, or the one its client certificate names.
    pub node_id: String,
    /// Its place under the caps, freed when the stream ends.
    pub slot: Option<Slot>,
}

/// The node id is held by a live stream ([`Watchers::connect`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeIdTaken(pub String);

/// Starts serving an admitted stream: registers the node in `owner`'s fleet view (refused when
/// a live stream holds its node id), negotiates what it gets from `feed` (deltas when the hello
/// sets `accept_deltas`, starting after the version and digest it names when the feed can;
/// full snapshots otherwise), records the nodes a relay lists in its hello, and returns the
/// response stream. The stream sends every message of the node's [`Subscription`], records
/// its acknowledgements (never beyond the newest version sent) and heartbeats and a relay's
/// reports, and ends on `stop`, when the feed goes, on a broken inbound stream, or when the
/// client goes away (the transport drops it). When the client half-closes or the stream ends,
/// the node is marked disconnected and its slot freed.
pub fn open<O, S>(
    owner: Arc<O>,
    feed: &Feed,
    stop: CancellationToken,
    admitted: Admitted<S>,
) -> Result<WatchResponse, NodeIdTaken>
where
    O: WatchOwner,
    S: Stream<Item = Result<WatchJwksRequest, Status>> + Send + Unpin + 'static,
{
    let Admitted {
        inbound,
        hello,
        node_id,
        slot,
    } = admitted;
    let subscription = feed.subscribe(
        hello.accept_deltas,
        hello
            .accept_deltas
            .then_some((hello.acked_version, hello.held_digest.as_slice())),
    );
    let ceiling = hello.acked_version.min(feed.current().version);
    let now = owner.now();
    let conn = {
        let mut watchers = owner.watchers();
        let conn = watchers
            .connect(&node_id, &hello.region, ceiling, now)
            .ok_or_else(|| NodeIdTaken(node_id.clone()))?;
        if !hello.downstream.is_empty() {
            let reported = watchers.report(&node_id, conn, &hello.downstream, ceiling, now);
            log_refused(&node_id, reported, true);
        }
        conn
    };
    info!(node_id = %node_id, region = %hello.region, deltas = hello.accept_deltas, relay = !hello.downstream.is_empty(), "watcher connected");
    owner.changed();
    let driver = Driver {
        leave: Leave {
            owner,
            me: Some((node_id, conn)),
        },
        stop,
        inbound,
        inbound_open: true,
        subscription,
        ceiling,
        renew: Box::pin(tokio::time::sleep(RENEW_IDLE)),
        ending: false,
        _slot: slot,
    };
    Ok(Box::pin(futures_util::stream::unfold(driver, Driver::step)))
}

/// Says that a relay's report was not all recorded: a warning for its hello, a debug line
/// later (a relay cannot fill the log by repeating itself).
fn log_refused(relay: &str, reported: Reported, hello: bool) {
    if reported.refused == 0 {
        return;
    }
    let (refused, accepted) = (reported.refused, reported.accepted);
    let what = "a relay reported nodes that were not recorded (bad names, names a live stream holds, or too many)";
    if hello {
        warn!(relay = %relay, refused, accepted, "{what}");
    } else {
        debug!(relay = %relay, refused, accepted, "{what}");
    }
}

/// Marks the node disconnected when the stream ends, however it ends (the transport drops the
/// response stream when the client goes away).
struct Leave<O: WatchOwner> {
    owner: Arc<O>,
    me: Option<(String, u64)>,
}

impl<O: WatchOwner> Leave<O> {
    fn leave(&mut self) {
        if let Some((node_id, conn)) = self.me.take() {
            let now = self.owner.now();
            self.owner.watchers().disconnect(&node_id, conn, now);
            info!(node_id = %node_id, "watcher disconnected");
            self.owner.changed();
        }
    }
}

impl<O: WatchOwner> Drop for Leave<O> {
    fn drop(&mut self) {
        self.leave();
    }
}

/// One stream's state between two messages.
struct Driver<O: WatchOwner, S> {
    leave: Leave<O>,
    stop: CancellationToken,
    inbound: S,
    /// A client that half-closes still gets messages, but no longer holds back promotions.
    inbound_open: bool,
    subscription: Subscription,
    /// The newest version sent (before the first: the one the hello claims): an ack beyond it
    /// is not believed.
    ceiling: u64,
    /// When an idle stream next tells its node that it still holds the newest version.
    renew: Pin<Box<tokio::time::Sleep>>,
    /// A full snapshot over [`FULL_ENDS_STREAM_ABOVE`] went out: end the stream cleanly.
    ending: bool,
    _slot: Option<Slot>,
}

impl<O, S> Driver<O, S>
where
    O: WatchOwner,
    S: Stream<Item = Result<WatchJwksRequest, Status>> + Send + Unpin + 'static,
{
    /// Records what the client says until there is a message to send; `None` ends the stream.
    async fn step(mut self) -> Option<(Result<EncodedSnapshot, Status>, Self)> {
        if self.ending {
            debug!(
                "a large full snapshot was sent: the stream ends, the node resumes on a new one"
            );
            return None;
        }
        loop {
            tokio::select! {
                _ = self.stop.cancelled() => return None,
                message = self.subscription.next() => {
                    let message = message?;
                    return Some(self.send(message));
                }
                () = &mut self.renew => {
                    self.renew.as_mut().reset(Instant::now() + RENEW_IDLE);
                    if let Some(message) = self.subscription.renewal() {
                        return Some(self.send(message));
                    }
                }
                request = self.inbound.next(), if self.inbound_open => match request {
                    Some(Ok(request)) => self.heard(&request),
                    None => {
                        self.inbound_open = false;
                        self.leave.leave();
                    }
                    Some(Err(status)) => {
                        debug!(code = ?status.code(), "watch stream broken");
                        return None;
                    }
                },
            }
        }
    }

    fn send(mut self, message: Message) -> (Result<EncodedSnapshot, Status>, Self) {
        self.ending = message.full
            && self.subscription.takes_deltas()
            && message.bytes.len() > FULL_ENDS_STREAM_ABOVE;
        self.ceiling = message.version;
        self.renew.as_mut().reset(Instant::now() + RENEW_IDLE);
        self.leave.owner.sent(&message);
        (Ok(message.bytes), self)
    }

    fn heard(&mut self, request: &WatchJwksRequest) {
        let Some((node_id, conn)) = &self.leave.me else {
            return;
        };
        let owner = &self.leave.owner;
        let acked = request.acked_version.min(self.ceiling);
        let now = owner.now();
        let mut changed;
        {
            let mut watchers = owner.watchers();
            changed = watchers.ack(node_id, *conn, acked, now);
            if !request.downstream.is_empty() {
                let reported =
                    watchers.report(node_id, *conn, &request.downstream, self.ceiling, now);
                log_refused(node_id, reported, false);
                changed = true;
            }
        }
        if changed {
            debug!(node_id = %node_id, acked, "watcher acknowledged");
            owner.changed();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn down(node_id: &str, acked: u64, connected: bool) -> DownstreamWatcher {
        DownstreamWatcher {
            node_id: node_id.into(),
            region: "eu".into(),
            acked_version: acked,
            connected,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn liveness_and_min_acked() {
        let timeout = Duration::from_secs(30);
        let mut w = Watchers::default();
        assert_eq!(w.min_acked(timeout), None);
        let a = w.connect("a", "eu", 0, 100).unwrap();
        let b = w.connect("b", "us", 3, 100).unwrap();
        assert_eq!(w.min_acked(timeout), Some(0));
        assert!(w.ack("a", a, 5, 101));
        assert_eq!(w.min_acked(timeout), Some(3));
        // A stale stream id does not move the current one.
        assert!(!w.ack("b", b + 100, 9, 101));
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

    #[tokio::test(start_paused = true)]
    async fn nodes_behind_a_relay_count_while_the_relay_stream_lives() {
        let timeout = Duration::from_secs(30);
        let mut w = Watchers::default();
        let relay = w.connect("relay-eu", "eu", 7, 100).unwrap();
        let reported = w.report(
            "relay-eu",
            relay,
            &[
                down("n1", 7, true),
                down("n2", 99, true),
                down("bad name", 7, true),
            ],
            7,
            100,
        );
        assert_eq!(
            reported,
            Reported {
                accepted: 2,
                refused: 1
            }
        );
        let listed = w.list();
        let via: Vec<(&str, &str, u64)> = listed
            .iter()
            .map(|i| (i.node_id.as_str(), i.via.as_str(), i.acked_version))
            .collect();
        assert_eq!(
            via,
            [
                ("n1", "relay-eu", 7),
                ("n2", "relay-eu", 7),
                ("relay-eu", "", 7)
            ],
            "an ack is never beyond what the relay was sent"
        );
        assert_eq!((w.connected(), w.connected_behind_relays()), (3, 2));
        assert_eq!(
            w.summary(8, timeout),
            Summary {
                connected: 3,
                behind_relays: 2,
                lagging: 3,
                min_acked: Some(7)
            }
        );
        // Later reports carry changes only.
        w.report("relay-eu", relay, &[down("n1", 5, true)], 9, 101);
        assert_eq!(w.min_acked(timeout), Some(5));
        assert_eq!(w.lagging(7, timeout), 1);
        // A node that left the relay no longer holds promotions back.
        w.report("relay-eu", relay, &[down("n1", 5, false)], 9, 102);
        assert_eq!(w.min_acked(timeout), Some(7));
        // Nor do its nodes once the relay goes quiet, and its stream's end disconnects them.
        tokio::time::advance(Duration::from_secs(31)).await;
        assert_eq!(w.min_acked(timeout), None);
        w.disconnect("relay-eu", relay, 140);
        assert_eq!(w.connected(), 0);
        assert!(w.list().iter().all(|i| !i.connected));
        // Their names are free again, directly or through another relay.
        assert!(w.connect("n1", "eu", 0, 141).is_some());
        let other = w.connect("relay-us", "us", 9, 141).unwrap();
        let taken = w.report(
            "relay-us",
            other,
            &[down("n2", 9, true), down("n1", 9, true)],
            9,
            141,
        );
        assert_eq!(
            taken,
            Reported {
                accepted: 1,
                refused: 1
            },
            "n1 is live directly"
        );
        assert_eq!(w.list()[1].via, "relay-us");
    }

    #[tokio::test(start_paused = true)]
    async fn a_relay_cannot_take_over_a_live_node_or_report_for_another_stream() {
        let mut w = Watchers::default();
        let direct = w.connect("n1", "eu", 4, 100).unwrap();
        let relay = w.connect("relay", "eu", 4, 100).unwrap();
        let reported = w.report(
            "relay",
            relay,
            &[down("n1", 0, true), down("relay", 0, true)],
            4,
            100,
        );
        assert_eq!(reported.refused, 2);
        assert_eq!(w.list()[0].via, "");
        // A stale relay stream (taken over after it went quiet) reports nothing.
        tokio::time::advance(LIVE_WINDOW + Duration::from_secs(1)).await;
        w.ack("n1", direct, 4, 120);
        let again = w.connect("relay", "eu", 4, 120).unwrap();
        assert_eq!(
            w.report("relay", relay, &[down("n9", 4, true)], 4, 120)
                .refused,
            1
        );
        assert_eq!(
            w.report("relay", again, &[down("n9", 4, true)], 4, 120)
                .accepted,
            1
        );
        // The old stream's end does not disconnect what the new one reported.
        w.disconnect("relay", relay, 121);
        assert_eq!(w.connected(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn a_relay_reports_everything_then_only_what_changed() {
        let mut w = Watchers::reporting();
        let a = w.connect("a", "eu", 1, 100).unwrap();
        let sub = w.connect("sub-relay", "eu", 1, 100).unwrap();
        w.report("sub-relay", sub, &[down("c", 1, true)], 1, 100);
        let all = w.report_all();
        assert_eq!(all.len(), 3);
        assert!(w.report_changes().is_empty());
        assert!(!w.ack("a", a, 1, 101), "a heartbeat changes nothing");
        assert!(w.report_changes().is_empty());
        w.ack("a", a, 2, 102);
        assert_eq!(w.report_changes(), vec![down("a", 2, true)]);
        w.disconnect("sub-relay", sub, 103);
        let changed = w.report_changes();
        let names: Vec<(&str, bool)> = changed
            .iter()
            .map(|d| (d.node_id.as_str(), d.connected))
            .collect();
        assert_eq!(names, [("c", false), ("sub-relay", false)]);
    }

    /// An owner of streams for tests: its fleet view, and what the streams told it.
    #[derive(Default)]
    struct TestOwner {
        watchers: Mutex<Watchers>,
        kicks: std::sync::atomic::AtomicUsize,
        sent: Mutex<Vec<(u64, bool)>>,
    }

    impl WatchOwner for TestOwner {
        fn watchers(&self) -> MutexGuard<'_, Watchers> {
            self.watchers.lock().unwrap()
        }
        fn now(&self) -> UnixSeconds {
            100
        }
        fn changed(&self) {
            self.kicks
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        fn sent(&self, message: &Message) {
            self.sent
                .lock()
                .unwrap()
                .push((message.version, message.full));
        }
    }

    type Inbound = tokio::sync::mpsc::UnboundedSender<Result<WatchJwksRequest, Status>>;

    fn admitted(
        node_id: &str,
        slots: &Slots,
    ) -> (
        Inbound,
        Admitted<impl Stream<Item = Result<WatchJwksRequest, Status>> + Send + Unpin + 'static>,
    ) {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let inbound = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx));
        let hello = WatchJwksRequest {
            node_id: node_id.into(),
            region: "eu".into(),
            accept_deltas: true,
            ..WatchJwksRequest::default()
        };
        let admitted = Admitted {
            inbound,
            hello,
            node_id: node_id.into(),
            slot: Some(slots.take(None).unwrap()),
        };
        (tx, admitted)
    }

    fn ack(version: u64) -> Result<WatchJwksRequest, Status> {
        Ok(WatchJwksRequest {
            acked_version: version,
            ..WatchJwksRequest::default()
        })
    }

    /// Polls `stream` until it has nothing to send (paused time: at once).
    async fn idle(stream: &mut WatchResponse) {
        let polled = tokio::time::timeout(Duration::from_millis(10), stream.next()).await;
        assert!(polled.is_err(), "nothing to send: {polled:?}");
    }

    fn acked(owner: &TestOwner) -> (u64, bool) {
        let listed = owner.watchers().list();
        (listed[0].acked_version, listed[0].connected)
    }

    #[tokio::test(start_paused = true)]
    async fn a_stream_sends_what_its_subscription_yields_and_caps_acks_at_what_it_sent() {
        let owner = Arc::new(TestOwner::default());
        let feed = Feed::new(crate::FeedState::default(), 1, 0, crate::Limits::default());
        let slots = Slots::new(10, 10);
        let stop = CancellationToken::new();
        let (acks, first) = admitted("n1", &slots);
        let mut stream = open(owner.clone(), &feed, stop.clone(), first).unwrap();
        eprintln!(
            "one stream's driver state: {} bytes",
            std::mem::size_of_val(&*stream)
        );
        let message = stream.next().await.unwrap().unwrap();
        assert_eq!(message.decode().unwrap().version, 1);
        acks.send(ack(99)).unwrap();
        idle(&mut stream).await;
        assert_eq!(acked(&owner), (1, true), "never beyond what was sent");
        let mut state = crate::FeedState::default();
        state.revoked_kids.insert("k".into());
        feed.publish(state, 2, 0);
        let delta = stream.next().await.unwrap().unwrap().decode().unwrap();
        assert_eq!(delta.delta.unwrap().base_version, 1);
        acks.send(ack(99)).unwrap();
        idle(&mut stream).await;
        assert_eq!(acked(&owner), (2, true));
        assert_eq!(*owner.sent.lock().unwrap(), [(1, true), (2, false)]);

        // The name is taken while the stream lives; its end (however it ends) frees it.
        let (_acks, second) = admitted("n1", &slots);
        assert!(open(owner.clone(), &feed, stop.clone(), second).is_err());
        let kicks = owner.kicks.load(std::sync::atomic::Ordering::Relaxed);
        drop(stream);
        assert_eq!(acked(&owner), (2, false));
        assert_eq!(slots.open(), 0, "the slot is freed with the stream");
        assert!(owner.kicks.load(std::sync::atomic::Ordering::Relaxed) > kicks);
    }

    #[tokio::test(start_paused = true)]
    async fn a_large_full_snapshot_ends_its_stream_and_the_node_resumes_with_deltas() {
        let owner = Arc::new(TestOwner::default());
        let mut state = crate::FeedState::default();
        for i in 0..2_000 {
            state
                .revoked_tokens
                .insert(format!("Zx{i:06}q7Lw9VbN3kRtY2mP"), 1_900_000_000);
        }
        let feed = Feed::new(state.clone(), 7, 0, crate::Limits::default());
        let slots = Slots::new(10, 10);
        let stop = CancellationToken::new();
        let (_acks, first) = admitted("n1", &slots);
        let mut stream = open(owner.clone(), &feed, stop.clone(), first).unwrap();
        let full = stream.next().await.unwrap().unwrap();
        assert!(full.len() > FULL_ENDS_STREAM_ABOVE);
        assert!(stream.next().await.is_none(), "the stream ends after it");
        assert_eq!(slots.open(), 0);
        // The node resumes from what it holds: a small message, and the stream stays.
        let (_acks, mut again) = admitted("n1", &slots);
        again.hello.acked_version = 7;
        again.hello.held_digest = state.digest().to_vec();
        let mut stream = open(owner.clone(), &feed, stop.clone(), again).unwrap();
        let current = stream.next().await.unwrap().unwrap();
        assert!(current.len() < 128);
        let mut newer = state.clone();
        newer.revoked_kids.insert("k".into());
        feed.publish(newer, 8, 0);
        let delta = stream.next().await.unwrap().unwrap().decode().unwrap();
        assert_eq!(delta.delta.unwrap().base_version, 7);
        // A node that predates deltas keeps its stream whatever the size: it could not resume.
        let (_acks, mut old) = admitted("n2", &slots);
        old.hello.accept_deltas = false;
        let mut stream = open(owner, &feed, stop, old).unwrap();
        assert!(stream.next().await.unwrap().unwrap().len() > FULL_ENDS_STREAM_ABOVE);
        idle(&mut stream).await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_half_closed_stream_still_gets_messages_and_stop_ends_it() {
        let owner = Arc::new(TestOwner::default());
        let feed = Feed::new(crate::FeedState::default(), 1, 0, crate::Limits::default());
        let slots = Slots::new(10, 10);
        let stop = CancellationToken::new();
        let (acks, admitted) = admitted("n1", &slots);
        let mut stream = open(owner.clone(), &feed, stop.clone(), admitted).unwrap();
        stream.next().await.unwrap().unwrap();
        drop(acks);
        idle(&mut stream).await;
        assert_eq!(
            acked(&owner),
            (0, false),
            "it no longer holds promotions back"
        );
        feed.publish(crate::FeedState::default(), 2, 0);
        stream.next().await.unwrap().unwrap();
        stop.cancel();
        assert!(stream.next().await.is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn past_the_listing_cap_the_oldest_disconnected_go_first() {
        let mut w = Watchers::default();
        let relay = w.connect("relay", "eu", 1, 100).unwrap();
        let gone: Vec<DownstreamWatcher> = (0..MAX_LISTED / 2)
            .map(|i| down(&format!("old-{i:05}"), 1, false))
            .collect();
        for chunk in gone.chunks(MAX_DOWNSTREAM_PER_MESSAGE) {
            w.report("relay", relay, chunk, 1, 100);
        }
        tokio::time::advance(Duration::from_secs(1)).await;
        let live: Vec<DownstreamWatcher> = (0..MAX_LISTED / 2 + 500)
            .map(|i| down(&format!("new-{i:05}"), 1, true))
            .collect();
        for chunk in live.chunks(MAX_DOWNSTREAM_PER_MESSAGE) {
            let reported = w.report("relay", relay, chunk, 1, 101);
            assert_eq!(reported.refused, 0);
        }
        let listed = w.list();
        assert_eq!(w.connected(), live.len() + 1, "connected nodes always stay");
        let old: Vec<&str> = listed
            .iter()
            .filter(|i| i.node_id.starts_with("old-"))
            .map(|i| i.node_id.as_str())
            .collect();
        // At the cap the oldest disconnected tenth went, the rest stays.
        assert_eq!(old.len(), MAX_LISTED / 2 - MAX_LISTED / 10);
        assert_eq!(old.first(), Some(&"old-01000"));
        assert!(listed.len() < MAX_LISTED, "{}", listed.len());
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
