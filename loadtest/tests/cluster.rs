//! End to end on a real in-process cluster (an authority and 3+ verifiers on loopback):
//! continuous verification on random nodes while keys rotate, revocation reaching every node,
//! and the fleet verifying through an authority outage.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use keyfleet_loadtest::cluster::{ClusterOptions, LocalCluster, channel};
use keyfleet_proto::v1::verifier_client::VerifierClient;
use keyfleet_proto::v1::{
    Reason, RevokeKeyRequest, RevokeTokenRequest, VerifyRequest, VerifyResponse,
};
use rand::Rng;
use tokio::time::Instant;

async fn verify_on(url: &str, token: &str) -> VerifyResponse {
    let mut c = VerifierClient::new(channel(url).await.unwrap());
    c.verify(VerifyRequest {
        token: token.into(),
        audience: "orders".into(),
    })
    .await
    .unwrap()
    .into_inner()
}

/// Polls until every node gives `want` for `token`; returns how long it took.
async fn until_everywhere(
    cluster: &LocalCluster,
    token: &str,
    want: Reason,
    limit: Duration,
) -> Duration {
    let start = Instant::now();
    loop {
        let mut all = true;
        for url in cluster.verifier_urls() {
            all &= verify_on(&url, token).await.reason() == want;
        }
        if all {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < limit,
            "not every node answered {want:?} within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotations_under_load_cost_no_false_rejects() {
    keyfleet_runtime::telemetry::test_init();
    let cluster = Arc::new(
        LocalCluster::start(ClusterOptions {
            verifiers: 3,
            ..ClusterOptions::default()
        })
        .await
        .unwrap(),
    );
    let tokens = Arc::new(tokio::sync::RwLock::new(vec![
        cluster.issue("u0", "orders").await.unwrap().token,
    ]));
    let stop = Arc::new(AtomicBool::new(false));
    let (checks, false_rejects) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));

    // Four clients, each request to a random node, each token a random one minted so far.
    let mut clients = Vec::new();
    for _ in 0..4 {
        let (urls, tokens, stop, checks, bad) = (
            cluster.verifier_urls(),
            tokens.clone(),
            stop.clone(),
            checks.clone(),
            false_rejects.clone(),
        );
        clients.push(tokio::spawn(async move {
            let mut conns = Vec::new();
            for u in &urls {
                conns.push(VerifierClient::new(channel(u).await.unwrap()));
            }
            while !stop.load(Ordering::Relaxed) {
                let (node, token) = {
                    let t = tokens.read().await;
                    let mut rng = rand::rng();
                    (
                        rng.random_range(0..conns.len()),
                        t[rng.random_range(0..t.len())].clone(),
                    )
                };
                let r = conns[node]
                    .verify(VerifyRequest {
                        token,
                        audience: "orders".into(),
                    })
                    .await
                    .unwrap()
                    .into_inner();
                checks.fetch_add(1, Ordering::Relaxed);
                if !r.valid {
                    bad.fetch_add(1, Ordering::Relaxed);
                    eprintln!("false reject on node {node}: {:?} {}", r.reason(), r.detail);
                }
            }
        }));
    }

    let mut kids = vec![];
    for round in 0..6 {
        for i in 0..5 {
            let t = cluster
                .issue(&format!("u{round}-{i}"), "orders")
                .await
                .unwrap();
            kids.push(t.kid.clone());
            tokens.write().await.push(t.token);
        }
        let kid = cluster.rotate(Duration::from_secs(20)).await.unwrap();
        kids.push(kid);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }
    kids.dedup();
    assert!(
        kids.len() >= 6,
        "expected at least 6 distinct signing keys, saw {kids:?}"
    );
    assert!(
        checks.load(Ordering::Relaxed) > 100,
        "too little traffic to prove anything"
    );
    assert_eq!(
        false_rejects.load(Ordering::Relaxed),
        0,
        "legitimate tokens were refused during rotations"
    );
    Arc::into_inner(cluster).unwrap().shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocations_reach_every_node_within_two_seconds() {
    keyfleet_runtime::telemetry::test_init();
    let cluster = LocalCluster::start(ClusterOptions::default())
        .await
        .unwrap();
    let mut authority = cluster.authority_client().await.unwrap();

    // One token denied by jti.
    let t = cluster.issue("bob", "orders").await.unwrap();
    until_everywhere(&cluster, &t.token, Reason::Ok, Duration::from_secs(5)).await;
    authority
        .revoke_token(cluster.admin(RevokeTokenRequest {
            jti: t.jti.clone(),
            until: t.expires_at,
        }))
        .await
        .unwrap();
    let took = until_everywhere(
        &cluster,
        &t.token,
        Reason::TokenRevoked,
        Duration::from_secs(2),
    )
    .await;
    eprintln!("jti revocation reached every node in {took:?}");

    // The active key revoked: its tokens refused everywhere, signing goes on with another key.
    let old = cluster.issue("carol", "orders").await.unwrap();
    let r = authority
        .revoke_key(cluster.admin(RevokeKeyRequest {
            kid: old.kid.clone(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_ne!(r.active_kid, old.kid);
    let took = until_everywhere(
        &cluster,
        &old.token,
        Reason::KeyRevoked,
        Duration::from_secs(2),
    )
    .await;
    eprintln!("key revocation reached every node in {took:?}");
    let new = cluster.issue("carol", "orders").await.unwrap();
    assert_eq!(new.kid, r.active_kid);
    until_everywhere(&cluster, &new.token, Reason::Ok, Duration::from_secs(2)).await;
    cluster.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_keeps_verifying_through_an_authority_outage() {
    keyfleet_runtime::telemetry::test_init();
    let mut cluster = LocalCluster::start(ClusterOptions::default())
        .await
        .unwrap();
    let before = cluster.issue("dave", "orders").await.unwrap();
    until_everywhere(&cluster, &before.token, Reason::Ok, Duration::from_secs(5)).await;
    let jwks_before = cluster
        .authority_client()
        .await
        .unwrap()
        .get_jwks(keyfleet_proto::v1::GetJwksRequest {})
        .await
        .unwrap()
        .into_inner();

    cluster.kill_authority();
    // Nodes keep serving from their last good key set; a node restarted during the outage
    // serves at once from its cache dir.
    until_everywhere(&cluster, &before.token, Reason::Ok, Duration::from_secs(2)).await;
    cluster.restart_verifier(1).await.unwrap();
    cluster.wait_ready(Duration::from_secs(5)).await.unwrap();
    until_everywhere(&cluster, &before.token, Reason::Ok, Duration::from_secs(2)).await;

    cluster.restart_authority().await.unwrap();
    let jwks_after = cluster
        .authority_client()
        .await
        .unwrap()
        .get_jwks(keyfleet_proto::v1::GetJwksRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        jwks_after.keys, jwks_before.keys,
        "a restart must not change the published keys"
    );
    assert_eq!(jwks_after.active_kid, jwks_before.active_kid);
    let after = cluster.issue("dave", "orders").await.unwrap();
    assert_eq!(after.kid, before.kid);
    until_everywhere(&cluster, &after.token, Reason::Ok, Duration::from_secs(5)).await;
    cluster.shutdown().await.unwrap();
}
