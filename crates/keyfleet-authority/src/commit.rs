//! [`AuthorityState::commit`]: the one place that changes the ring of record. **Invariant: once
//! the authority is open, only `commit` writes `keyring.json`** (`open.rs` writes the first ring
//! of an empty data directory), and it writes before anything else sees the change: the signer,
//! the published snapshot and the metrics follow the disk, never run ahead of it. A failed
//! write changes nothing, in memory or on disk.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use keyfleet_core::{RingError, UnixSeconds};
use tracing::{error, info};

use crate::authority::{AuthorityState, Signer};
use crate::convert::feed_state;
use crate::error::ServiceError;
use crate::keys::RingState;

/// The version and active kid after a committed change.
#[derive(Debug, Clone)]
pub(crate) struct Committed {
    pub version: u64,
    pub active_kid: String,
}

impl AuthorityState {
    /// Applies `change` to a copy of the ring, tops up the next key, drops private keys the ring
    /// no longer needs, persists, and only then swaps the copy in and publishes it. On any error
    /// nothing changes, in memory or on disk.
    pub(crate) async fn commit<T>(
        &self,
        change: impl FnOnce(&mut RingState, UnixSeconds) -> Result<T, ServiceError>,
    ) -> Result<(T, Committed), ServiceError> {
        let mut state = self.ring.lock().await;
        let now = self.clock.now();
        let mut work = state.clone();
        let value = change(&mut work, now)?;
        work.ensure_next(now)?;
        let needed: Vec<String> = work.ring.signing_capable().map(str::to_owned).collect();
        work.keys.retain(|kid, _| needed.contains(kid));
        if let Some(kid) = needed.iter().find(|kid| !work.keys.contains_key(*kid)) {
            return Err(RingError::Inconsistent(format!("no private key for {kid}")).into());
        }
        // Ended sessions change only with the version, so a changed ring covers them too.
        if work.ring != state.ring {
            let bytes = self.file.encode(&work).map_err(ServiceError::Random)?;
            // The write blocks on fsync: keep it off the async workers.
            let file = self.file.clone();
            let written = tokio::task::spawn_blocking(move || file.write(&bytes))
                .await
                .map_err(|_| ServiceError::ShuttingDown)?;
            if let Err(e) = written {
                self.metrics.persist_failures.inc();
                error!(path = %self.file.path().display(), error = %keyfleet_runtime::error_chain(&e), "cannot persist the key ring; the change is not applied");
                return Err(ServiceError::Persist(e));
            }
            let published = work.ring.version != state.ring.version;
            // A span per key-set change; no await follows while it is entered.
            let _change = published.then(|| {
                tracing::info_span!(
                    "jwks.publish",
                    version = work.ring.version,
                    previous = state.ring.version,
                    active_kid = %work.ring.active().kid,
                )
                .entered()
            });
            let old_next = state.ring.next().map(|k| k.kid.clone());
            *state = work;
            self.rotation_pending
                .store(state.ring.rotation_pending, Ordering::Relaxed);
            if let Some(next) = state
                .ring
                .next()
                .filter(|k| Some(&k.kid) != old_next.as_ref())
            {
                info!(kid = %next.kid, "next key published");
            }
            let active = state.ring.active();
            if self.signer.load().kid != active.kid {
                let key = state.keys[&active.kid].clone();
                self.signer.store(Arc::new(Signer {
                    kid: active.kid.clone(),
                    key,
                }));
            }
            if published {
                self.feed
                    .publish(feed_state(&state, &self.issuer), state.ring.version, now);
            }
            self.metrics.observe_ring(&state.ring);
        }
        let committed = Committed {
            version: state.ring.version,
            active_kid: state.ring.active().kid.clone(),
        };
        Ok((value, committed))
    }
}
