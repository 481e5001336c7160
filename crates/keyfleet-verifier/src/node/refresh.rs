//! Keeping the key set fresh: the `WatchJwks` push stream (with acks and heartbeats), the
//! periodic pull, JWKS URL polling, and the one fetch-and-apply they (and the unknown-kid
//! refresh) share; jittered exponential backoff between failures.

use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::Ordering;
use std::time::Duration;

use keyfleet_core::escape_untrusted;
use keyfleet_feed::{Digest, FeedState};
use keyfleet_proto::v1::{JwksSnapshot, WatchJwksRequest};
use keyfleet_runtime::CancellationToken;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tonic::Status;

use super::Verifier;
use crate::config::Source;
use crate::keyset::Applied;
use crate::metrics::{Origin, Resync};
use crate::relay::Relay;
use crate::upstream::{Fetched, Pulled, Upstream};

const BACKOFF_START: Duration = Duration::from_millis(100);
const BACKOFF_CAP: Duration = Duration::from_secs(10);
/// How often an idle watch stream repeats its ack. The authority holds a node id for a stream
/// heard from within three heartbeats, and refuses another stream under that id meanwhile.
const HEARTBEAT: Duration = Duration::from_secs(5);
/// While the source answers but refuses this node a watch stream, the node pulls the key set at
/// most this often instead (see [`refused_but_up`]).
const REFUSED_PULL_EVERY: Duration = Duration::from_secs(5);

impl Verifier {
    /// One pull from the source, applied. Logs and counts the outcome.
    pub(super) async fn fetch_and_apply(&self, origin: Origin) -> bool {
        let metrics = &self.inner.metrics;
        let fetched = match self.inner.upstream.fetch().await {
            Ok(Pulled::Jwks(fetched)) => fetched,
            Ok(Pulled::Snapshot(snapshot)) => {
                if let Some(relay) = &self.inner.relay {
                    relay.publish_pulled(&snapshot);
                }
                snapshot.into()
            }
            Err(e) => {
                metrics.fetched(origin, false);
                // The error may carry a remote server's own message: escaped, it cannot forge a line.
                tracing::warn!(source = origin.as_str(), error = %escape_untrusted(&keyfleet_runtime::error_chain(&e)), "key set fetch failed; keeping the last good set");
                return false;
            }
        };
        self.apply(fetched, origin).await
    }

    /// Installs `fetched` and, when it changed what the node holds, saves it.
    async fn apply(&self, fetched: Fetched, origin: Origin) -> bool {
        match self.inner.keys.apply(fetched, origin) {
            Ok(applied) => {
                self.inner.metrics.fetched(origin, true);
                if applied != Applied::Ignored && self.inner.config.cache_dir.is_some() {
                    let keys = self.inner.keys.clone();
                    let _ = tokio::task::spawn_blocking(move || keys.save()).await;
                }
                true
            }
            Err(e) => {
                self.inner.metrics.fetched(origin, false);
                tracing::warn!(source = origin.as_str(), error = %e, "key set refused; keeping the last good set");
                false
            }
        }
    }

    /// The refresh tasks of this node's source, stopping on `shutdown`.
    pub(super) fn spawn_refreshers(&self, shutdown: &CancellationToken) -> Vec<JoinHandle<()>> {
        match self.inner.config.source {
            Source::Authority { .. } => vec![
                tokio::spawn(self.clone().watch_loop(shutdown.clone())),
                tokio::spawn(self.clone().pull_loop(shutdown.clone())),
            ],
            Source::JwksUrl { .. } => vec![tokio::spawn(self.clone().http_loop(shutdown.clone()))],
        }
    }

    /// Keeps a `WatchJwks` stream open, reconnecting with jittered exponential backoff. The
    /// source's state as the stream left it survives reconnects (in memory only), so a
    /// reconnect resumes with the changes since. While the source answers but refuses the
    /// stream (a restarted node whose previous stream it still holds), the node pulls instead,
    /// at once and then at most every [`REFUSED_PULL_EVERY`].
    async fn watch_loop(self, shutdown: CancellationToken) {
        let mut backoff = Backoff::new();
        let mut tracked = None;
        let mut resumed_after_full = false;
        // When the last pull for a refused stream ran; none since a stream ended otherwise.
        let mut refused_pull: Option<Instant> = None;
        loop {
            let outcome = tokio::select! {
                _ = shutdown.cancelled() => return,
                outcome = self.watch_once(&mut backoff, &mut tracked) => outcome,
            };
            self.inner.keys.watching.store(false, Ordering::Release);
            let refused = matches!(&outcome, StreamEnd::Failed(status) if refused_but_up(status));
            match outcome {
                // Once in a row: a source that ends every stream after a full snapshot gets the
                // backoff like any other ending.
                StreamEnd::AfterFull if !resumed_after_full => {
                    resumed_after_full = true;
                    tracing::debug!(
                        "the source ended the stream after a large full snapshot; resuming from it"
                    );
                    continue;
                }
                StreamEnd::Closed | StreamEnd::AfterFull => {
                    tracing::info!("the authority ended the jwks stream; reconnecting")
                }
                StreamEnd::Failed(status) => {
                    tracing::warn!(code = ?status.code(), message = %escape_untrusted(status.message()), "jwks stream failed; reconnecting")
                }
                StreamEnd::Resync(why) => {
                    tracked = None;
                    self.inner.metrics.resynced(why);
                    tracing::warn!(
                        reason = why.as_str(),
                        "jwks delta does not match the state held; re-syncing with a full snapshot"
                    );
                }
            }
            resumed_after_full = false;
            if !refused {
                refused_pull = None;
            } else if refused_pull.is_none_or(|at| at.elapsed() >= REFUSED_PULL_EVERY) {
                // The source is up but will not stream to this node for a while (e.g. the
                // stream of this node's previous run, killed without closing it, still holds
                // the node id). The set held may be the one saved before a restart: pull the
                // source's (new keys, revocations) rather than serve it until the stream is
                // taken.
                refused_pull = Some(Instant::now());
                tracing::info!(
                    "the source refuses the jwks stream for now; pulling the key set until it takes it"
                );
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = self.fetch_and_apply(Origin::Pull) => {}
                }
            }
            let delay = backoff.next();
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }

    /// One `WatchJwks` stream: the hello (node id, region, the version held, and with a state
    /// held from an earlier stream its digest, to resume with deltas), then an ack for every
    /// message applied, and a heartbeat (the last ack again) every [`HEARTBEAT`] so the
    /// authority knows the stream is live: its node id cannot be taken over while it is, and a
    /// silent stream stops holding rotations back. A relay also reports the nodes behind it.
    async fn watch_once(&self, backoff: &mut Backoff, tracked: &mut Option<Tracked>) -> StreamEnd {
        let config = &self.inner.config;
        let Upstream::Authority(client) = &self.inner.upstream else {
            return StreamEnd::Closed;
        };
        let (acks, requests) = tokio::sync::mpsc::channel(16);
        let mut acked = tracked
            .as_ref()
            .map_or_else(|| self.inner.keys.version(), |t| t.version);
        let hello = WatchJwksRequest {
            node_id: config.node_id.clone(),
            region: config.region.clone(),
            acked_version: acked,
            accept_deltas: true,
            held_digest: tracked
                .as_ref()
                .map(|t| t.digest.to_vec())
                .unwrap_or_default(),
            downstream: Vec::new(),
        };
        let _ = acks.try_send(hello);
        // A relay lists every node behind it after each (re)connect, then sends changes.
        let mut reports = std::collections::VecDeque::new();
        if let Some(relay) = &self.inner.relay {
            reports.extend(relay.downstream_report(true));
        }
        let mut stream = match client
            .clone()
            .watch_jwks(tokio_stream::wrappers::ReceiverStream::new(requests))
            .await
        {
            Ok(response) => response.into_inner(),
            Err(status) => return StreamEnd::Failed(status),
        };
        let mut heartbeat = tokio::time::interval_at(Instant::now() + HEARTBEAT, HEARTBEAT);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_was_full = false;
        loop {
            let snapshot = tokio::select! {
                message = stream.message() => match message {
                    Ok(Some(snapshot)) => snapshot,
                    Ok(None) if last_was_full => return StreamEnd::AfterFull,
                    Ok(None) => return StreamEnd::Closed,
                    Err(status) => return StreamEnd::Failed(status),
                },
                _ = heartbeat.tick() => {
                    // A full queue already holds messages that tell the same.
                    let _ = acks.try_send(WatchJwksRequest {
                        acked_version: acked,
                        ..Default::default()
                    });
                    continue;
                }
                permit = acks.reserve(), if !reports.is_empty() => {
                    let Ok(permit) = permit else { return StreamEnd::Closed };
                    if let Some(downstream) = reports.pop_front() {
                        permit.send(WatchJwksRequest {
                            acked_version: acked,
                            downstream,
                            ..Default::default()
                        });
                    }
                    // What changed while the queue drained is taken now: the queue never holds
                    // more than the table, however slowly the source reads.
                    if let (true, Some(relay)) = (reports.is_empty(), &self.inner.relay) {
                        reports.extend(relay.downstream_report(false));
                    }
                    continue;
                }
                _ = relay_changed(self.inner.relay.as_deref()) => {
                    if let (true, Some(relay)) = (reports.is_empty(), &self.inner.relay) {
                        reports.extend(relay.downstream_report(false));
                    }
                    continue;
                }
            };
            let version = snapshot.version;
            last_was_full = snapshot.delta.is_none();
            let applied = match self.receive(snapshot, tracked).await {
                Ok(applied) => applied,
                Err(why) => return StreamEnd::Resync(why),
            };
            backoff.reset();
            self.inner.keys.watching.store(true, Ordering::Release);
            self.inner.keys.pushes.fetch_add(1, Ordering::AcqRel);
            if applied {
                acked = version;
                // A full queue only drops an ack that a later one supersedes.
                let _ = acks.try_send(WatchJwksRequest {
                    acked_version: version,
                    ..Default::default()
                });
            }
        }
    }

    /// Applies one message of the push stream: a full snapshot replaces the tracked state; a
    /// delta applies to it only when it is at the delta's base version, and the result must
    /// have the digest the message names. True when the node now holds the message's version.
    async fn receive(
        &self,
        mut snapshot: JwksSnapshot,
        tracked: &mut Option<Tracked>,
    ) -> Result<bool, Resync> {
        let version = snapshot.version;
        let metrics = &self.inner.metrics;
        let Some(delta) = snapshot.delta.take() else {
            let state = FeedState::from_snapshot(&snapshot);
            let digest = state.digest();
            if !snapshot.digest.is_empty() && snapshot.digest != digest {
                // The whole state came with it: nothing held could be wrong. Log and go on.
                tracing::warn!(
                    version,
                    "a full jwks snapshot came with a digest of another state"
                );
            }
            let generated_at = snapshot.generated_at;
            let applied = self.apply(snapshot.into(), Origin::Push).await;
            if applied {
                metrics.updated(true);
            }
            // The source's state, even when screening refused the set: deltas apply to it.
            if let Some(relay) = &self.inner.relay {
                relay.publish(&state, version, generated_at, true);
            }
            *tracked = Some(Tracked {
                version,
                state,
                digest,
            });
            return Ok(applied);
        };
        let Some(mut held) = tracked.take() else {
            return Err(Resync::Gap);
        };
        if held.version != delta.base_version || version < delta.base_version {
            tracing::debug!(
                held = held.version,
                base = delta.base_version,
                version,
                "jwks delta for another version"
            );
            return Err(Resync::Gap);
        }
        if version == delta.base_version {
            // "You hold the newest version": nothing changed.
            if snapshot.digest != held.digest {
                return Err(Resync::Digest);
            }
            self.inner.keys.renew(version);
            metrics.fetched(Origin::Push, true);
            metrics.updated(false);
            if let Some(relay) = &self.inner.relay {
                relay.publish(&held.state, version, snapshot.generated_at, false);
            }
            *tracked = Some(held);
            return Ok(true);
        }
        held.state
            .apply(&delta, &snapshot.issuer, &snapshot.active_kid);
        let digest = held.state.digest();
        if snapshot.digest != digest {
            return Err(Resync::Digest);
        }
        held.version = version;
        held.digest = digest;
        let applied = self
            .apply(Fetched::of_delta(&held.state, version), Origin::Push)
            .await;
        if applied {
            metrics.updated(false);
        }
        if let Some(relay) = &self.inner.relay {
            relay.publish(&held.state, version, snapshot.generated_at, false);
        }
        // Even a set screening refused is the source's state: later deltas apply to it.
        *tracked = Some(held);
        Ok(applied)
    }

    /// The fallback pull every `refresh_interval`, skipped while the push stream delivers.
    async fn pull_loop(self, shutdown: CancellationToken) {
        let period = self.inner.config.refresh_interval;
        let mut ticks = tokio::time::interval_at(Instant::now() + period, period);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let keys = &self.inner.keys;
        let mut pushes = keys.pushes.load(Ordering::Acquire);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = ticks.tick() => {}
            }
            // A stream that delivered since the last tick is not broken: the pull would only
            // fetch the whole set (deny lists included) again.
            let delivered = keys.pushes.load(Ordering::Acquire);
            if delivered != pushes && keys.watching.load(Ordering::Acquire) {
                pushes = delivered;
                continue;
            }
            pushes = delivered;
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = self.fetch_and_apply(Origin::Pull) => {}
            }
        }
    }

    /// Polls a JWKS URL: at once, then every `refresh_interval`; sooner after a failure.
    async fn http_loop(self, shutdown: CancellationToken) {
        let period = self.inner.config.refresh_interval;
        let mut backoff = Backoff::new();
        loop {
            let ok = tokio::select! {
                _ = shutdown.cancelled() => return,
                ok = self.fetch_and_apply(Origin::Http) => ok,
            };
            let delay = if ok {
                backoff.reset();
                period
            } else {
                backoff.next().min(period)
            };
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }
}

/// The source's state as the push stream left it: what its next delta applies to.
struct Tracked {
    version: u64,
    state: FeedState,
    digest: Digest,
}

/// How a watch stream ended.
enum StreamEnd {
    /// The source closed it.
    Closed,
    /// The source closed it right after a full snapshot: it does so after a large one
    /// (`keyfleet_feed::watch::FULL_ENDS_STREAM_ABOVE`) so that the stream's buffer is freed;
    /// the node resumes at once from the version it now holds.
    AfterFull,
    Failed(Status),
    /// A delta did not fit the state held: reconnect without it, for a full snapshot.
    Resync(Resync),
}

/// Whether a failed `WatchJwks` means the source is up but will not stream to this node for now:
/// a live stream holds the node id (`ALREADY_EXISTS`), or the source serves no more streams
/// (`RESOURCE_EXHAUSTED`). A pull then gets the newest set (were the source down, it would only
/// fail too).
fn refused_but_up(status: &Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::AlreadyExists | tonic::Code::ResourceExhausted
    )
}

/// Resolves when a relay's downstream watchers changed; never without a relay.
async fn relay_changed(relay: Option<&Relay>) {
    match relay {
        Some(relay) => relay.downstream_changed().await,
        None => std::future::pending().await,
    }
}

/// Jittered exponential backoff: 100 ms doubling to 10 s, each delay drawn from [d/2, d].
struct Backoff {
    next: Duration,
    random: RandomState,
    draws: u64,
}

impl Backoff {
    fn new() -> Backoff {
        Backoff {
            next: BACKOFF_START,
            random: RandomState::new(),
            draws: 0,
        }
    }

    fn reset(&mut self) {
        self.next = BACKOFF_START;
    }

    fn next(&mut self) -> Duration {
        let d = self.next;
        self.next = (d * 2).min(BACKOFF_CAP);
        self.draws += 1;
        let half = d / 2;
        let fraction = (self.random.hash_one(self.draws) % 1024) as u32;
        half + half * fraction / 1024
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_jittered_and_caps() {
        let mut b = Backoff::new();
        let first = b.next();
        assert!(first >= BACKOFF_START / 2 && first <= BACKOFF_START);
        let delays: Vec<_> = (0..20).map(|_| b.next()).collect();
        assert!(delays.iter().all(|d| *d <= BACKOFF_CAP));
        assert!(*delays.last().unwrap() >= BACKOFF_CAP / 2);
        b.reset();
        assert!(b.next() <= BACKOFF_START);
    }
}
