//! SIGKILL of the real `keyfleet authority` during a storm of refreshes (issue 15): after a
//! restart on the same data dir, every refresh that was answered before the kill survived (the
//! newest answered refresh token of each chain works), and no refresh token is both spent and
//! usable (the one spent for it is refused as reuse, which ends its session).
//!
//! Here rather than in `keyfleet-authority`'s tests because it needs the binary
//! (`CARGO_BIN_EXE_keyfleet` exists only in this crate's tests).

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use keyfleet_proto::v1 as pb;
use keyfleet_proto::v1::authority_client::AuthorityClient;
use keyfleet_testkit::process::{PORT_0, Process};
use tonic::transport::Channel;
use tonic::{Code, Request};

/// Concurrent refresh chains (one session each).
const CHAINS: usize = 8;
/// Answered refreshes (over all chains) before the kill.
const ANSWERED_BEFORE_KILL: usize = 150;

fn authority(dir: &Path) -> Process {
    let mut command = Command::new(env!("CARGO_BIN_EXE_keyfleet"));
    command
        .arg("authority")
        .args(PORT_0)
        .arg("--data-dir")
        .arg(dir)
        // Covers the restart: the refresh in flight at the kill may have been committed with
        // its answer lost, and the client then retries its newest token, as a real one would.
        .args(["--refresh-reuse-grace", "120s"]);
    Process::start(command)
}

fn admin<T>(msg: T, dir: &Path) -> Request<T> {
    let token = std::fs::read_to_string(dir.join("admin.token")).unwrap();
    keyfleet_testkit::grpc::bearer(msg, token.trim())
}

async fn refresh(
    client: &mut AuthorityClient<Channel>,
    token: &str,
) -> Result<String, tonic::Status> {
    client
        .refresh(pb::RefreshRequest {
            refresh_token: token.into(),
            scopes: Vec::new(),
        })
        .await
        .map(|r| r.into_inner().refresh_token)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_a_refresh_storm_loses_no_answered_rotation_and_revives_no_spent_token() {
    let dir = tempfile::tempdir().unwrap();
    let mut process = authority(dir.path());
    let mut client = AuthorityClient::connect(process.grpc.clone())
        .await
        .unwrap();
    let mut firsts = Vec::new();
    for i in 0..CHAINS {
        let req = pb::StartSessionRequest {
            subject: format!("user-{i}"),
            audience: vec!["api".into()],
            ..Default::default()
        };
        let tokens = client.start_session(admin(req, dir.path())).await.unwrap();
        firsts.push(tokens.into_inner().refresh_token);
    }

    // Each chain refreshes as fast as it can, recording every answered token in order, until
    // a call fails (the authority is gone).
    let answered = Arc::new(AtomicUsize::new(0));
    let mut chains = Vec::new();
    for first in firsts {
        let mut client = client.clone();
        let answered = answered.clone();
        chains.push(tokio::spawn(async move {
            let mut chain = vec![first];
            while let Ok(next) = refresh(&mut client, chain.last().unwrap()).await {
                chain.push(next);
                answered.fetch_add(1, Ordering::Relaxed);
            }
            chain
        }));
    }
    keyfleet_testkit::eventually("refreshes are answered", || {
        let answered = answered.clone();
        async move { answered.load(Ordering::Relaxed) >= ANSWERED_BEFORE_KILL }
    })
    .await;
    process.kill();
    let mut chains_seen = Vec::new();
    for chain in chains {
        chains_seen.push(
            tokio::time::timeout(Duration::from_secs(30), chain)
                .await
                .unwrap()
                .unwrap(),
        );
    }
    assert!(
        chains_seen.iter().all(|c| c.len() >= 2),
        "every chain was answered at least once"
    );

    let process = authority(dir.path());
    let mut client = AuthorityClient::connect(process.grpc.clone())
        .await
        .unwrap();
    for chain in &chains_seen {
        let newest = chain.last().unwrap();
        let spent = &chain[chain.len() - 2];
        // The newest answered token works: its rotation survived the kill.
        let after = refresh(&mut client, newest).await.unwrap_or_else(|s| {
            panic!("the newest answered refresh token must work after the restart: {s:?}")
        });
        // The token spent for it is not usable: presenting it is reuse and ends the session.
        let status = refresh(&mut client, spent).await.unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
        assert!(status.message().contains("already spent"), "{status:?}");
        let status = refresh(&mut client, &after).await.unwrap_err();
        assert!(
            status.message().contains("has ended (refresh_token_reuse)"),
            "{status:?}"
        );
    }
}
