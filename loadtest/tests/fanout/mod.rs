//! The fan-out benchmark's engine against a real authority on loopback: 50 lean watchers,
//! a token revocation and a key rotation, and nodes that miss a change and come back.

use std::time::Duration;

use keyfleet_loadtest::cluster::{ClusterOptions, LocalCluster};
use keyfleet_loadtest::fanout::{self, AuthoritySource, FanoutOptions};

const WATCHERS: usize = 50;

/// Every watcher ends holding the authority's newest version with its digest; the changes
/// travelled as deltas (one full snapshot per watcher, at connect, and none after); and a node
/// that missed one change resumes with exactly one delta.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deltas_carry_every_change_to_every_watcher_and_a_returning_node_gets_one_delta() {
    let cluster = LocalCluster::start(ClusterOptions {
        verifiers: 0,
        ..ClusterOptions::default()
    })
    .await
    .unwrap();
    let options = FanoutOptions {
        watchers: WATCHERS,
        revocations: 1,
        rotations: 1,
        reconnects: 5,
        authority: AuthoritySource::Remote {
            url: cluster.authority.grpc_url(),
            admin_token: cluster.admin_token.clone(),
            node_token_file: cluster.node_token_file(),
            pid: None,
        },
        ramp_timeout: Duration::from_secs(60),
        change_timeout: Duration::from_secs(30),
        pause: Duration::from_millis(20),
        ..FanoutOptions::default()
    };
    let report = fanout::run(options).await.unwrap();
    let summary = report.summary();

    assert_eq!(report.held, WATCHERS, "{summary}");
    assert_eq!(report.changes.len(), 2, "{summary}");
    for change in &report.changes {
        assert_eq!(change.reached, WATCHERS, "{}: {summary}", change.kind);
        assert_eq!(change.full_snapshots, 0, "{}: {summary}", change.kind);
        assert!(
            change.deltas >= WATCHERS as u64,
            "{}: {summary}",
            change.kind
        );
    }
    assert_eq!(report.final_matching, WATCHERS, "{summary}");
    let total = &report.total;
    assert_eq!(total.full_messages, WATCHERS as u64, "{summary}");
    assert_eq!(
        (
            total.gaps,
            total.digest_mismatches,
            total.malformed,
            total.no_digest
        ),
        (0, 0, 0, 0),
        "{summary}"
    );
    // A revocation's delta is a small fraction of the whole state.
    assert!(
        report.revocations.bytes_per_watcher < report.full_snapshot_bytes as f64 / 2.0,
        "{summary}"
    );
    let reconnect = report
        .reconnect
        .as_ref()
        .expect("reconnects were asked for");
    assert_eq!(
        (
            reconnect.nodes,
            reconnect.deltas,
            reconnect.full_snapshots,
            reconnect.caught_up_in_one
        ),
        (5, 5, 0, 5),
        "{summary}"
    );
    assert!(report.passed(), "{summary}");
    cluster.shutdown().await.unwrap();
}
