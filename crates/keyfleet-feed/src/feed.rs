//! The feed one server publishes and every watch stream reads: each version encoded once (a
//! full snapshot, the delta from the previous version), a bounded change log of deltas, and
//! per-stream cursors that walk it.

use std::collections::VecDeque;
use std::sync::Arc;

use keyfleet_proto::v1::{JwksDelta, JwksSnapshot};
use keyfleet_proto::wire::EncodedSnapshot;
use tokio::sync::watch;

use crate::state::{Digest, FeedState};

/// How far back the change log reaches. A node that held a version older than the log's
/// oldest delta gets a full snapshot instead.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Deltas kept.
    pub max_changes: usize,
    /// Encoded bytes of the deltas kept.
    pub max_bytes: usize,
}

impl Default for Limits {
    /// 1,024 changes or 4 MiB: a node away for a few minutes of busy revocations resumes with
    /// deltas; one away for longer gets the whole set, which costs about the same by then.
    fn default() -> Limits {
        Limits {
            max_changes: 1024,
            max_bytes: 4 * 1024 * 1024,
        }
    }
}

/// One delta in the change log.
#[derive(Debug)]
struct Change {
    base: u64,
    base_digest: Digest,
    version: u64,
    bytes: EncodedSnapshot,
}

/// One published version: its state, digest, and the messages every stream sends, each
/// encoded once.
#[derive(Debug)]
pub struct Published {
    pub version: u64,
    pub generated_at: i64,
    pub state: FeedState,
    pub digest: Digest,
    /// The full snapshot (with deny lists and digest).
    pub full: EncodedSnapshot,
    /// The snapshot without deny lists, for callers without the fleet credential (no digest:
    /// it names another state).
    pub public: EncodedSnapshot,
    /// "You hold this version": an empty delta from this version to itself, for a node that
    /// resumes at the newest version.
    current: EncodedSnapshot,
    /// Deltas, oldest first; each one's `base` is the previous one's `version`. Shared with the
    /// next version's log (copy-on-write of the list, never of the bytes).
    log: Arc<VecDeque<Arc<Change>>>,
    log_bytes: usize,
    /// Bumped whenever a version is published that is not newer than the last: what a node
    /// held before then is not comparable by version number.
    epoch: u64,
}

impl Published {
    /// The full snapshot, decoded (for callers that need the message rather than bytes).
    pub fn snapshot(&self) -> JwksSnapshot {
        self.state.snapshot(self.version, self.generated_at)
    }

    /// The oldest version a node may hold and still get deltas (the newest when the log is
    /// empty).
    pub fn oldest_resumable(&self) -> u64 {
        self.log.front().map_or(self.version, |c| c.base)
    }

    /// Deltas in the change log.
    pub fn log_len(&self) -> usize {
        self.log.len()
    }

    fn change_from(&self, base: u64) -> Option<&Arc<Change>> {
        let at = self.log.partition_point(|c| c.base < base);
        self.log.get(at).filter(|c| c.base == base)
    }
}

/// What a stream sends next.
#[derive(Debug, Clone)]
pub struct Message {
    /// The version the node holds once it has applied this message.
    pub version: u64,
    /// True for a full snapshot, false for a delta.
    pub full: bool,
    pub bytes: EncodedSnapshot,
}

/// The feed of one authority or relay. Publishing is cheap for readers: a stream never locks,
/// clones a state or encodes anything.
#[derive(Debug)]
pub struct Feed {
    tx: watch::Sender<Arc<Published>>,
    limits: Limits,
}

/// A delta's message: only what changed. `issuer` and `active_kid` are left empty when they
/// are the base's (a node keeps its own), so one revocation costs tens of bytes.
fn delta_message(
    old: &FeedState,
    new: &FeedState,
    delta: JwksDelta,
    version: u64,
    generated_at: i64,
    digest: &Digest,
) -> JwksSnapshot {
    JwksSnapshot {
        version,
        issuer: if new.issuer == old.issuer {
            String::new()
        } else {
            new.issuer.clone()
        },
        active_kid: if new.active_kid == old.active_kid {
            String::new()
        } else {
            new.active_kid.clone()
        },
        generated_at,
        digest: digest.to_vec(),
        delta: Some(delta),
        ..JwksSnapshot::default()
    }
}

/// `state`'s messages at `version`; `full` and `digest` from [`FeedState::snapshot_and_digest`].
#[allow(clippy::too_many_arguments)]
fn publish_version(
    state: FeedState,
    full: &JwksSnapshot,
    digest: Digest,
    version: u64,
    generated_at: i64,
    log: Arc<VecDeque<Arc<Change>>>,
    log_bytes: usize,
    epoch: u64,
) -> Published {
    let full = EncodedSnapshot::encode(full);
    let public = EncodedSnapshot::encode(&JwksSnapshot {
        version,
        issuer: state.issuer.clone(),
        keys: state.keys.values().cloned().collect(),
        active_kid: state.active_kid.clone(),
        generated_at,
        ..JwksSnapshot::default()
    });
    let current = EncodedSnapshot::encode(&delta_message(
        &state,
        &state,
        JwksDelta {
            base_version: version,
            ..JwksDelta::default()
        },
        version,
        generated_at,
        &digest,
    ));
    Published {
        version,
        generated_at,
        state,
        digest,
        full,
        public,
        current,
        log,
        log_bytes,
        epoch,
    }
}

impl Feed {
    /// A feed starting at `state`, `version`, with an empty change log.
    pub fn new(state: FeedState, version: u64, generated_at: i64, limits: Limits) -> Feed {
        let (full, digest) = state.snapshot_and_digest(version, generated_at);
        let first = publish_version(
            state,
            &full,
            digest,
            version,
            generated_at,
            Arc::default(),
            0,
            0,
        );
        Feed {
            tx: watch::Sender::new(Arc::new(first)),
            limits,
        }
    }

    /// The newest version.
    pub fn current(&self) -> Arc<Published> {
        self.tx.borrow().clone()
    }

    /// Publishes `state` as `version`, with the delta from the newest version into the change
    /// log. A version that is not newer than the newest starts a new log (every stream then
    /// gets a full snapshot); the same version with the same state again is ignored.
    pub fn publish(&self, state: FeedState, version: u64, generated_at: i64) {
        let previous = self.current();
        if version == previous.version && state == previous.state {
            return;
        }
        let (full, digest) = state.snapshot_and_digest(version, generated_at);
        let mut epoch = previous.epoch;
        let (log, log_bytes) = if version > previous.version {
            let delta = previous.state.diff(&state, previous.version);
            let bytes = EncodedSnapshot::encode(&delta_message(
                &previous.state,
                &state,
                delta,
                version,
                generated_at,
                &digest,
            ));
            let mut log_bytes = previous.log_bytes + bytes.len();
            let mut log = VecDeque::clone(&previous.log);
            log.push_back(Arc::new(Change {
                base: previous.version,
                base_digest: previous.digest,
                version,
                bytes,
            }));
            while log.len() > self.limits.max_changes || log_bytes > self.limits.max_bytes {
                match log.pop_front() {
                    Some(dropped) => log_bytes -= dropped.bytes.len(),
                    None => break,
                }
            }
            (Arc::new(log), log_bytes)
        } else {
            epoch += 1;
            (Arc::default(), 0)
        };
        self.tx.send_replace(Arc::new(publish_version(
            state,
            &full,
            digest,
            version,
            generated_at,
            log,
            log_bytes,
            epoch,
        )));
    }

    /// A cursor for one stream. `deltas`: the node applies deltas. `held`: the version and
    /// digest the node says it holds; with `deltas`, the stream starts with the changes since
    /// (an empty delta when it is the newest version) if the log still reaches back to it and
    /// the digest is that version's, and with a full snapshot otherwise.
    pub fn subscribe(&self, deltas: bool, held: Option<(u64, &[u8])>) -> Subscription {
        let mut rx = self.tx.subscribe();
        let newest = rx.borrow_and_update().clone();
        let mut resume = Resume::Full;
        if let (true, Some((version, digest))) = (deltas, held) {
            if version == newest.version && digest == newest.digest {
                resume = Resume::Current(newest.current.clone(), version);
            } else if newest
                .change_from(version)
                .is_some_and(|c| c.base_digest.as_slice() == digest)
            {
                resume = Resume::From(version);
            }
        }
        Subscription {
            rx,
            deltas,
            held: None,
            epoch: newest.epoch,
            first: Some(resume),
            pending: Some(newest),
        }
    }

    /// Streams reading this feed.
    pub fn subscribers(&self) -> usize {
        self.tx.receiver_count()
    }
}

#[derive(Debug)]
enum Resume {
    Full,
    Current(EncodedSnapshot, u64),
    From(u64),
}

/// One stream's cursor through a [`Feed`].
#[derive(Debug)]
pub struct Subscription {
    rx: watch::Receiver<Arc<Published>>,
    deltas: bool,
    /// The version the node holds once it has applied what was sent.
    held: Option<u64>,
    /// The feed's epoch `held` belongs to.
    epoch: u64,
    first: Option<Resume>,
    /// A version seen but not yet caught up with.
    pending: Option<Arc<Published>>,
}

impl Subscription {
    /// The next message to send: waits while the node is up to date. A node that accepts
    /// deltas walks the change log one delta at a time; one that fell behind the log, or does
    /// not accept deltas, gets the newest full snapshot (a slow reader never gets a backlog of
    /// full snapshots). `None` once the feed is gone.
    pub async fn next(&mut self) -> Option<Message> {
        loop {
            if let Some(newest) = self.pending.take()
                && let Some(message) = self.step(&newest)
            {
                if message.version != newest.version {
                    self.pending = Some(newest);
                }
                return Some(message);
            }
            if self.rx.changed().await.is_err() {
                return None;
            }
            self.pending = Some(self.rx.borrow_and_update().clone());
        }
    }

    /// True when the node applies deltas (its hello set `accept_deltas`).
    pub fn takes_deltas(&self) -> bool {
        self.deltas
    }

    /// The version the node holds once it has applied everything sent so far.
    pub fn held(&self) -> Option<u64> {
        self.held
    }

    /// For an idle stream: the empty delta that tells a node holding the newest version that
    /// it still does (a node renews its freshness from it, so an idle fleet needs no pulls).
    /// `None` when the node does not take deltas (an old-protocol node would read an empty
    /// delta as an empty key set) or has something to catch up with.
    pub fn renewal(&self) -> Option<Message> {
        if !self.deltas || self.first.is_some() {
            return None;
        }
        let newest = self.rx.borrow().clone();
        (self.held == Some(newest.version) && self.epoch == newest.epoch).then(|| Message {
            version: newest.version,
            full: false,
            bytes: newest.current.clone(),
        })
    }

    fn step(&mut self, newest: &Published) -> Option<Message> {
        match self.first.take() {
            Some(Resume::Current(bytes, version)) if version == newest.version => {
                self.held = Some(version);
                return Some(Message {
                    version,
                    full: false,
                    bytes,
                });
            }
            Some(Resume::Current(_, version) | Resume::From(version)) => {
                self.held = Some(version);
            }
            Some(Resume::Full) | None => {}
        }
        if self.epoch != newest.epoch {
            self.epoch = newest.epoch;
            return Some(self.full(newest));
        }
        match self.held {
            Some(held) if held == newest.version => None,
            Some(held) if self.deltas => match newest.change_from(held) {
                Some(change) => {
                    self.held = Some(change.version);
                    Some(Message {
                        version: change.version,
                        full: false,
                        bytes: change.bytes.clone(),
                    })
                }
                None => Some(self.full(newest)),
            },
            _ => Some(self.full(newest)),
        }
    }

    fn full(&mut self, newest: &Published) -> Message {
        self.held = Some(newest.version);
        Message {
            version: newest.version,
            full: true,
            bytes: newest.full.clone(),
        }
    }
}

#[cfg(test)]
mod tests;
