//! Keeping the key set fresh: the `WatchJwks` push stream (with acks and heartbeats), the
//! periodic pull, JWKS URL polling, and the one fetch-and-apply they (and the unknown-kid
//! refresh) share; jittered exponential backoff between failures.

use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::Ordering;
use std::time::Duration;

use keyfleet_core::escape_untrusted;
use keyfleet_proto::v1::WatchJwksRequest;
use keyfleet_runtime::CancellationToken;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tonic::Status;

use super::Verifier;
use crate::config::Source;
use crate::keyset::Applied;
use crate::metrics::Origin;
use crate::upstream::{Fetched, Upstream};

const BACKOFF_START: Duration = Duration::from_millis(100);
const BACKOFF_CAP: Duration = Duration::from_secs(10);
/// How often an idle watch stream repeats its ack. The authority holds a node id for a stream
/// heard from within three heartbeats, and refuses another stream under that id meanwhile.
const HEARTBEAT: Duration = Duration::from_secs(5);

impl Verifier {
    /// One pull from the source, applied. Logs and counts the outcome.
    pub(super) async fn fetch_and_apply(&self, origin: Origin) -> bool {
        let metrics = &self.inner.metrics;
        let fetched = match self.inner.upstream.fetch().await {
            Ok(f) => f,
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

    /// Keeps a `WatchJwks` stream open, reconnecting with jittered exponential backoff.
    async fn watch_loop(self, shutdown: CancellationToken) {
        let mut backoff = Backoff::new();
        loop {
            let outcome = tokio::select! {
                _ = shutdown.cancelled() => return,
                outcome = self.watch_once(&mut backoff) => outcome,
            };
            self.inner.keys.watching.store(false, Ordering::Release);
            match outcome {
                Ok(()) => tracing::info!("the authority ended the jwks stream; reconnecting"),
                Err(status) => {
                    tracing::warn!(code = ?status.code(), message = %escape_untrusted(status.message()), "jwks stream failed; reconnecting")
                }
            }
            let delay = backoff.next();
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }

    /// One `WatchJwks` stream: the hello (node id, region, the version held), then an ack for
    /// every snapshot applied, and a heartbeat (the last ack again) every [`HEARTBEAT`] so the
    /// authority knows the stream is live: its node id cannot be taken over while it is, and a
    /// silent stream stops holding rotations back.
    async fn watch_once(&self, backoff: &mut Backoff) -> Result<(), Status> {
        let config = &self.inner.config;
        let Upstream::Authority(client) = &self.inner.upstream else {
            return Ok(());
        };
        let (acks, requests) = tokio::sync::mpsc::channel(16);
        let mut acked = self.inner.keys.version();
        let hello = WatchJwksRequest {
            node_id: config.node_id.clone(),
            region: config.region.clone(),
            acked_version: acked,
        };
        let _ = acks.try_send(hello);
        let mut stream = client
            .clone()
            .watch_jwks(tokio_stream::wrappers::ReceiverStream::new(requests))
            .await?
            .into_inner();
        let mut heartbeat = tokio::time::interval_at(Instant::now() + HEARTBEAT, HEARTBEAT);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let snapshot = tokio::select! {
                message = stream.message() => match message? {
                    Some(snapshot) => snapshot,
                    None => return Ok(()),
                },
                _ = heartbeat.tick() => {
                    // A full queue already holds messages that tell the same.
                    let _ = acks.try_send(WatchJwksRequest {
                        acked_version: acked,
                        ..Default::default()
                    });
                    continue;
                }
            };
            backoff.reset();
            self.inner.keys.watching.store(true, Ordering::Release);
            let version = snapshot.version;
            if self.apply(snapshot.into(), Origin::Push).await {
                acked = version;
                // A full queue only drops an ack that a later one supersedes.
                let _ = acks.try_send(WatchJwksRequest {
                    acked_version: version,
                    ..Default::default()
                });
            }
        }
    }

    /// The fallback pull every `refresh_interval`.
    async fn pull_loop(self, shutdown: CancellationToken) {
        let period = self.inner.config.refresh_interval;
        let mut ticks = tokio::time::interval_at(Instant::now() + period, period);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = ticks.tick() => {}
            }
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
