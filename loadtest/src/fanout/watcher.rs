//! The fan-out benchmark's simulated verifiers: one lean `WatchJwks` stream each, so the
//! client is not the bottleneck. A stream says hello with `accept_deltas` (and, on a
//! reconnect, the version and digest it holds), applies every message (a full snapshot or a
//! delta) to a [`FeedState`], checks the resulting digest against the one the message carries,
//! acknowledges the version, and repeats its acknowledgement every [`HEARTBEAT`] as a real
//! verifier does.
//!
//! Messages arrive as raw bytes ([`RawCodec`]), so their exact encoded length is counted and
//! the work of applying one is shared: every stream holding the same state that receives the
//! same bytes reaches the same result, so that result is computed once ([`Fleet::receive`]'s
//! cache, keyed by the held version, the held digest and the message bytes) and each stream
//! still checks it holds what the authority's digest names. Ten thousand streams then cost the
//! client one decode, apply and SHA-256 per distinct message, not per stream.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use keyfleet_feed::{Digest, FeedState};
use keyfleet_proto::v1::{JwksSnapshot, WatchJwksRequest};
use keyfleet_runtime::CancellationToken;
use prost::Message as _;
use prost::bytes::{Buf as _, Bytes};
use tokio::sync::{Semaphore, mpsc};
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::Channel;
use tonic::{Code, Request, Status};

const WATCH_PATH: &str = "/keyfleet.v1.Authority/WatchJwks";
/// How often an idle stream repeats its acknowledgement (a verifier's heartbeat).
pub(crate) const HEARTBEAT: Duration = Duration::from_secs(5);
/// Largest message a stream accepts: a full snapshot at the deny list's 100,000-entry cap is
/// ~3.2 MB.
const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;
/// Distinct (held state, message) results kept; the cache starts over past it.
const CACHE_ENTRIES: usize = 4096;
/// First and longest wait before a stream that failed is opened again.
const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// Error texts kept for the report.
const ERRORS_KEPT: usize = 10;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A gRPC codec that sends `WatchJwksRequest`s and receives each message as its bytes.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RawCodec;

#[derive(Debug)]
pub(crate) struct RawEncoder;

#[derive(Debug)]
pub(crate) struct RawDecoder;

impl Encoder for RawEncoder {
    type Item = WatchJwksRequest;
    type Error = Status;

    fn encode(&mut self, item: WatchJwksRequest, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        item.encode(dst)
            .map_err(|e| Status::internal(format!("encoding a watch request: {e}")))
    }
}

impl Decoder for RawDecoder {
    type Item = Bytes;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

impl Codec for RawCodec {
    type Encode = WatchJwksRequest;
    type Decode = Bytes;
    type Encoder = RawEncoder;
    type Decoder = RawDecoder;

    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }

    fn decoder(&mut self) -> RawDecoder {
        RawDecoder
    }
}

/// A state a stream holds: shared by every stream that reached it the same way.
#[derive(Debug)]
pub(crate) struct Held {
    pub(crate) version: u64,
    pub(crate) state: FeedState,
    pub(crate) digest: Digest,
}

/// What applying one message to one held state gave.
#[derive(Debug, Clone)]
enum Outcome {
    /// `checked`: the message named a digest and the state reached has it.
    Applied {
        held: Arc<Held>,
        full: bool,
        checked: bool,
    },
    /// A delta whose base is not the version held: the stream re-syncs.
    Gap {
        base: u64,
        held: u64,
    },
    /// The state reached is not the one the message's digest names: the stream re-syncs.
    Mismatch {
        version: u64,
    },
    Malformed(String),
}

/// The held version (0: nothing), the held digest (zeros: nothing) and the message.
type Key = (u64, Digest, Bytes);

/// The first message a resumed stream got (the reconnect measurement).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FirstMessage {
    pub(crate) full: bool,
    pub(crate) bytes: usize,
    pub(crate) version: u64,
}

/// One simulated verifier.
#[derive(Debug, Default)]
pub(crate) struct Slot {
    /// The version held (0 before the first message); stored after `held` and `events`.
    pub(crate) version: AtomicU64,
    held: Mutex<Option<Arc<Held>>>,
    /// Versions applied, with when, since the coordinator last collected them.
    events: Mutex<Vec<(u64, Instant)>>,
    /// Set by the first message after a resume ([`Fleet::resume_next`]).
    first: Mutex<Option<FirstMessage>>,
    resumed: std::sync::atomic::AtomicBool,
}

impl Slot {
    pub(crate) fn held(&self) -> Option<Arc<Held>> {
        lock(&self.held).clone()
    }
}

/// Counts over every stream (monotonic; the coordinator diffs them around each phase).
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) full_messages: AtomicU64,
    pub(crate) full_bytes: AtomicU64,
    pub(crate) delta_messages: AtomicU64,
    pub(crate) delta_bytes: AtomicU64,
    pub(crate) gaps: AtomicU64,
    pub(crate) digest_mismatches: AtomicU64,
    pub(crate) malformed: AtomicU64,
    /// Messages without a digest (an authority that predates deltas).
    pub(crate) no_digest: AtomicU64,
    /// Streams that failed or ended after they were open.
    pub(crate) stream_errors: AtomicU64,
    /// Stream opens refused or failed (retried).
    pub(crate) open_errors: AtomicU64,
}

/// A copy of [`Counters`] at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct CountersSnapshot {
    pub full_messages: u64,
    pub full_bytes: u64,
    pub delta_messages: u64,
    pub delta_bytes: u64,
    pub gaps: u64,
    pub digest_mismatches: u64,
    pub malformed: u64,
    pub no_digest: u64,
    pub stream_errors: u64,
    pub open_errors: u64,
}

impl CountersSnapshot {
    /// `self - earlier`, field by field.
    pub fn since(&self, earlier: &CountersSnapshot) -> CountersSnapshot {
        CountersSnapshot {
            full_messages: self.full_messages - earlier.full_messages,
            full_bytes: self.full_bytes - earlier.full_bytes,
            delta_messages: self.delta_messages - earlier.delta_messages,
            delta_bytes: self.delta_bytes - earlier.delta_bytes,
            gaps: self.gaps - earlier.gaps,
            digest_mismatches: self.digest_mismatches - earlier.digest_mismatches,
            malformed: self.malformed - earlier.malformed,
            no_digest: self.no_digest - earlier.no_digest,
            stream_errors: self.stream_errors - earlier.stream_errors,
            open_errors: self.open_errors - earlier.open_errors,
        }
    }

    pub fn messages(&self) -> u64 {
        self.full_messages + self.delta_messages
    }
}

/// Every simulated verifier and what they share.
#[derive(Debug)]
pub(crate) struct Fleet {
    pub(crate) slots: Vec<Slot>,
    pub(crate) counters: Counters,
    bearer: Option<MetadataValue<Ascii>>,
    node_prefix: String,
    cache: Mutex<HashMap<Key, Outcome>>,
    /// The active kid of every version any stream reached (to tell when a rotation arrived).
    active_kids: Mutex<BTreeMap<u64, String>>,
    errors: Mutex<Vec<String>>,
}

fn ack(version: u64) -> WatchJwksRequest {
    WatchJwksRequest {
        acked_version: version,
        ..WatchJwksRequest::default()
    }
}

impl Fleet {
    /// `watchers` streams named `<node_prefix>-<n>`, sending `node_token` (when given) as
    /// `authorization: Bearer …`.
    pub(crate) fn new(
        watchers: usize,
        node_prefix: &str,
        node_token: Option<&str>,
    ) -> anyhow::Result<Fleet> {
        let bearer = node_token
            .map(|t| format!("Bearer {}", t.trim()).parse::<MetadataValue<Ascii>>())
            .transpose()
            .map_err(|_| anyhow::anyhow!("the node token cannot be sent in a header"))?;
        Ok(Fleet {
            slots: (0..watchers).map(|_| Slot::default()).collect(),
            counters: Counters::default(),
            bearer,
            node_prefix: node_prefix.to_owned(),
            cache: Mutex::default(),
            active_kids: Mutex::default(),
            errors: Mutex::default(),
        })
    }

    pub(crate) fn node_id(&self, index: usize) -> String {
        format!("{}-{index:05}", self.node_prefix)
    }

    pub(crate) fn counters(&self) -> CountersSnapshot {
        let c = &self.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        CountersSnapshot {
            full_messages: get(&c.full_messages),
            full_bytes: get(&c.full_bytes),
            delta_messages: get(&c.delta_messages),
            delta_bytes: get(&c.delta_bytes),
            gaps: get(&c.gaps),
            digest_mismatches: get(&c.digest_mismatches),
            malformed: get(&c.malformed),
            no_digest: get(&c.no_digest),
            stream_errors: get(&c.stream_errors),
            open_errors: get(&c.open_errors),
        }
    }

    pub(crate) fn errors(&self) -> Vec<String> {
        lock(&self.errors).clone()
    }

    fn note_error(&self, text: String) {
        let mut errors = lock(&self.errors);
        if errors.len() < ERRORS_KEPT {
            errors.push(text);
        }
    }

    /// Streams that hold at least `version`.
    pub(crate) fn holding(&self, version: u64) -> usize {
        self.slots
            .iter()
            .filter(|s| s.version.load(Ordering::Acquire) >= version)
            .count()
    }

    /// The lowest version any stream reached whose active kid is `kid`.
    pub(crate) fn first_version_with_active(&self, kid: &str) -> Option<u64> {
        lock(&self.active_kids)
            .iter()
            .find(|(_, k)| k.as_str() == kid)
            .map(|(v, _)| *v)
    }

    /// Versions any stream reached in `(after, upto]`.
    pub(crate) fn versions_between(&self, after: u64, upto: u64) -> usize {
        lock(&self.active_kids).range(after + 1..=upto).count()
    }

    /// For each stream (in `indices`), how long after `start` it first held `version` or newer;
    /// clears what the streams recorded. Streams that never got there are left out.
    pub(crate) fn collect_latencies(
        &self,
        indices: impl Iterator<Item = usize>,
        start: Instant,
        version: u64,
    ) -> Vec<Duration> {
        let mut out = Vec::new();
        for i in indices {
            let mut events = lock(&self.slots[i].events);
            if let Some((_, at)) = events.iter().find(|(v, _)| *v >= version) {
                out.push(at.saturating_duration_since(start));
            }
            events.clear();
        }
        out
    }

    /// Forgets what the streams recorded so far.
    pub(crate) fn clear_events(&self) {
        for slot in &self.slots {
            lock(&slot.events).clear();
        }
    }

    /// Marks stream `index` so the first message it gets after it reconnects is recorded.
    pub(crate) fn resume_next(&self, index: usize) {
        *lock(&self.slots[index].first) = None;
        self.slots[index].resumed.store(true, Ordering::Release);
    }

    pub(crate) fn first_after_resume(&self, index: usize) -> Option<FirstMessage> {
        *lock(&self.slots[index].first)
    }

    /// Applies `bytes` to what stream `index` holds. Returns the version now held, or why the
    /// stream must re-sync.
    fn receive(&self, index: usize, bytes: Bytes) -> Result<u64, String> {
        let slot = &self.slots[index];
        let len = bytes.len() as u64;
        let held = slot.held();
        let key: Key = (
            held.as_ref().map_or(0, |h| h.version),
            held.as_ref().map_or([0; 32], |h| h.digest),
            bytes,
        );
        let cached = lock(&self.cache).get(&key).cloned();
        let outcome = match cached {
            Some(outcome) => outcome,
            None => {
                let outcome = self.compute(held.as_deref(), &key.2);
                let mut cache = lock(&self.cache);
                if cache.len() >= CACHE_ENTRIES {
                    cache.clear();
                }
                cache.insert(key, outcome.clone());
                outcome
            }
        };
        let c = &self.counters;
        match outcome {
            Outcome::Applied {
                held,
                full,
                checked,
            } => {
                if !checked {
                    c.no_digest.fetch_add(1, Ordering::Relaxed);
                }
                let (count, total) = if full {
                    (&c.full_messages, &c.full_bytes)
                } else {
                    (&c.delta_messages, &c.delta_bytes)
                };
                count.fetch_add(1, Ordering::Relaxed);
                total.fetch_add(len, Ordering::Relaxed);
                let version = held.version;
                if slot.resumed.swap(false, Ordering::AcqRel) {
                    *lock(&slot.first) = Some(FirstMessage {
                        full,
                        bytes: len as usize,
                        version,
                    });
                }
                lock(&slot.events).push((version, Instant::now()));
                *lock(&slot.held) = Some(held);
                slot.version.store(version, Ordering::Release);
                Ok(version)
            }
            Outcome::Gap { base, held } => {
                c.gaps.fetch_add(1, Ordering::Relaxed);
                *lock(&slot.held) = None;
                Err(format!(
                    "a delta from version {base} reached a node holding {held}"
                ))
            }
            Outcome::Mismatch { version } => {
                c.digest_mismatches.fetch_add(1, Ordering::Relaxed);
                *lock(&slot.held) = None;
                Err(format!(
                    "the state reached at version {version} does not have the digest the message names"
                ))
            }
            Outcome::Malformed(e) => {
                c.malformed.fetch_add(1, Ordering::Relaxed);
                *lock(&slot.held) = None;
                Err(format!("undecodable message: {e}"))
            }
        }
    }

    /// Decodes and applies one message to `held` (a full snapshot replaces it) and checks the
    /// digest.
    fn compute(&self, held: Option<&Held>, bytes: &Bytes) -> Outcome {
        let msg = match JwksSnapshot::decode(bytes.clone()) {
            Ok(msg) => msg,
            Err(e) => return Outcome::Malformed(e.to_string()),
        };
        let (state, full) = match (&msg.delta, held) {
            (None, _) => (FeedState::from_snapshot(&msg), true),
            (Some(delta), Some(h)) if delta.base_version == h.version => {
                let mut state = h.state.clone();
                state.apply(delta, &msg.issuer, &msg.active_kid);
                (state, false)
            }
            (Some(delta), held) => {
                return Outcome::Gap {
                    base: delta.base_version,
                    held: held.map_or(0, |h| h.version),
                };
            }
        };
        let digest = state.digest();
        let checked = !msg.digest.is_empty();
        if checked && msg.digest.as_slice() != digest.as_slice() {
            return Outcome::Mismatch {
                version: msg.version,
            };
        }
        lock(&self.active_kids)
            .entry(msg.version)
            .or_insert_with(|| state.active_kid.clone());
        Outcome::Applied {
            held: Arc::new(Held {
                version: msg.version,
                state,
                digest,
            }),
            full,
            checked,
        }
    }

    /// Runs stream `index` over `channel` until `stop`: opens it (at most as many opening at
    /// once as `opening` has permits), applies and acknowledges every message, and opens it
    /// again with backoff when it fails or a message cannot be applied.
    pub(crate) async fn run(
        self: Arc<Fleet>,
        index: usize,
        channel: Channel,
        opening: Arc<Semaphore>,
        stop: CancellationToken,
    ) {
        let mut backoff = BACKOFF_MIN;
        loop {
            let mut opened = false;
            let outcome = tokio::select! {
                _ = stop.cancelled() => return,
                outcome = self.watch_once(index, &channel, &opening, &mut opened) => outcome,
            };
            let c = &self.counters;
            match (&outcome, opened) {
                // The server ends a stream after a large full snapshot; resume at once.
                (Ok(true), _) => {
                    backoff = BACKOFF_MIN;
                    continue;
                }
                (Ok(false), _) => {
                    c.stream_errors.fetch_add(1, Ordering::Relaxed);
                    self.note_error(format!(
                        "{}: the server ended the stream",
                        self.node_id(index)
                    ));
                }
                (Err(status), true) => {
                    c.stream_errors.fetch_add(1, Ordering::Relaxed);
                    self.note_error(format!(
                        "{}: stream failed: {:?}: {}",
                        self.node_id(index),
                        status.code(),
                        status.message()
                    ));
                }
                (Err(status), false) => {
                    c.open_errors.fetch_add(1, Ordering::Relaxed);
                    if status.code() != Code::ResourceExhausted {
                        self.note_error(format!(
                            "{}: open failed: {:?}: {}",
                            self.node_id(index),
                            status.code(),
                            status.message()
                        ));
                    }
                }
            }
            if opened {
                backoff = BACKOFF_MIN;
            }
            let jitter = rand::random_range(0..=backoff.as_millis() as u64);
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(backoff / 2 + Duration::from_millis(jitter / 2)) => {}
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    async fn watch_once(
        &self,
        index: usize,
        channel: &Channel,
        opening: &Semaphore,
        opened: &mut bool,
    ) -> Result<bool, Status> {
        let mut permit = Some(
            opening
                .acquire()
                .await
                .map_err(|_| Status::cancelled("stopping"))?,
        );
        let held = self.slots[index].held();
        let hello = WatchJwksRequest {
            node_id: self.node_id(index),
            region: "fanout".into(),
            acked_version: held.as_ref().map_or(0, |h| h.version),
            accept_deltas: true,
            held_digest: held.as_ref().map(|h| h.digest.to_vec()).unwrap_or_default(),
            ..WatchJwksRequest::default()
        };
        let mut acked = hello.acked_version;
        let (acks, requests) = mpsc::channel(16);
        let _ = acks.try_send(hello);
        let mut request = Request::new(ReceiverStream::new(requests));
        if let Some(bearer) = &self.bearer {
            request
                .metadata_mut()
                .insert("authorization", bearer.clone());
        }
        let mut grpc =
            tonic::client::Grpc::new(channel.clone()).max_decoding_message_size(MAX_MESSAGE_BYTES);
        grpc.ready()
            .await
            .map_err(|e| Status::unavailable(format!("connecting: {e}")))?;
        let mut stream = grpc
            .streaming(request, PathAndQuery::from_static(WATCH_PATH), RawCodec)
            .await?
            .into_inner();
        let mut heartbeat = tokio::time::interval_at(Instant::now() + HEARTBEAT, HEARTBEAT);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Whether the last message was one after which the server ends the stream (a full
        // snapshot over `FULL_ENDS_STREAM_ABOVE`); the result says so: true, resume at once.
        let mut last_was_large = false;
        loop {
            let bytes = tokio::select! {
                message = stream.message() => match message? {
                    Some(bytes) => bytes,
                    None => return Ok(last_was_large),
                },
                _ = heartbeat.tick() => {
                    // A full queue already holds messages that tell the same.
                    let _ = acks.try_send(ack(acked));
                    continue;
                }
            };
            *opened = true;
            permit.take();
            last_was_large = bytes.len() > keyfleet_feed::watch::FULL_ENDS_STREAM_ABOVE;
            match self.receive(index, bytes) {
                Ok(version) => {
                    acked = version;
                    let _ = acks.try_send(ack(version));
                }
                Err(why) => return Err(Status::data_loss(why)),
            }
        }
    }
}
