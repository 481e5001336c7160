//! What the fleet goes through during the run: key rotations at the authority, and (local
//! cluster only) verifier kills followed by a restart; each one is a report event.

use std::sync::Arc;
use std::time::Duration;

use keyfleet_authority::client::AdminClient;
use rand::Rng as _;
use tokio::time::Instant;

use super::state::Shared;
use crate::cluster::LocalCluster;
use crate::report::EventKind;

/// How long a rotation may take to promote its key before it counts as failed.
const ROTATE_TIMEOUT: Duration = Duration::from_secs(30);
/// How often a rotation looks whether its key signs yet: the rotation is a timeline event,
/// placed within a few tens of milliseconds of the moment the key signs.
const ROTATE_POLL: Duration = Duration::from_millis(20);

/// Rotates the authority's keys every `every` from `started`, until the run stops.
pub(super) async fn rotate_loop(
    shared: Arc<Shared>,
    authority: AdminClient,
    every: Duration,
    started: Instant,
) {
    let mut next = started + every;
    loop {
        if !shared.sleep_until(next).await {
            return;
        }
        next += every;
        match authority.rotate_and_wait(ROTATE_TIMEOUT, ROTATE_POLL).await {
            Ok(kid) => {
                shared.set_current_kid(&kid);
                shared.event(started, EventKind::Rotation, kid);
            }
            Err(e) => tracing::warn!(error = %keyfleet_runtime::error_chain(&e), "rotation failed"),
        }
    }
}

/// Kills a random verifier every `every` from `started` and starts it again shortly after,
/// until the run stops.
pub(super) async fn kill_loop(
    shared: Arc<Shared>,
    cluster: Arc<tokio::sync::Mutex<LocalCluster>>,
    every: Duration,
    started: Instant,
) {
    // Down long enough for clients to notice, short enough for the shares to stay even.
    let down = (every / 10).min(Duration::from_millis(500));
    let mut next = started + every;
    loop {
        if !shared.sleep_until(next).await {
            return;
        }
        next += every;
        let (i, name) = {
            let mut c = cluster.lock().await;
            let i = rand::rng().random_range(0..c.verifiers.len());
            c.kill_verifier(i);
            (i, c.verifiers[i].name.clone())
        };
        shared.event(started, EventKind::Kill, name.clone());
        // Revived even when the run stops meanwhile: the cost phases need every node up.
        tokio::time::sleep(down).await;
        if let Err(e) = cluster.lock().await.revive_verifier(i).await {
            tracing::warn!(node = %name, error = %e, "restarting a killed verifier failed");
        }
    }
}
