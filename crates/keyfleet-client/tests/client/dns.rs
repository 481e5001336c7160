//! A pool that follows a DNS name: a new address joins, an address gone is drained; and a real
//! `localhost` resolution through the system resolver.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keyfleet_client::{BoxFuture, Demands, Endpoints, Resolve, VerifierPool};

use super::Fleet;

/// A resolver whose answer the test sets.
#[derive(Default)]
struct Switch(Mutex<Vec<SocketAddr>>);

impl Resolve for Switch {
    fn resolve<'a>(
        &'a self,
        _host: &'a str,
        _port: u16,
    ) -> BoxFuture<'a, std::io::Result<Vec<SocketAddr>>> {
        let addrs = self.0.lock().unwrap().clone();
        Box::pin(async move { Ok(addrs) })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn re_resolution_adds_new_nodes_and_drains_gone_ones() {
    let fleet = Fleet::start(2).await;
    let (a, b) = (fleet.nodes[0].grpc, fleet.nodes[1].grpc);
    let switch = Arc::new(Switch::default());
    *switch.0.lock().unwrap() = vec![a];
    let pool = VerifierPool::builder()
        .endpoints(Endpoints::Dns {
            host: "verifiers.test".into(),
            port: 0,
            tls: false,
            every: Duration::from_millis(50),
            resolver: switch.clone(),
        })
        .build()
        .await
        .unwrap();
    let token = fleet.issue("alice", &[]).await;
    let answered_by = |pool: VerifierPool, token: String| async move {
        let mut nodes = std::collections::BTreeSet::new();
        for _ in 0..30 {
            nodes.insert(
                pool.verify_request(Demands::none().request(&token))
                    .await
                    .unwrap()
                    .node_id,
            );
        }
        nodes
    };
    let only_a = answered_by(pool.clone(), token.clone()).await;
    assert_eq!(only_a.into_iter().collect::<Vec<_>>(), ["node-0"]);

    // A new address in the answer joins the pool and gets requests.
    *switch.0.lock().unwrap() = vec![a, b];
    keyfleet_testkit::eventually("the new node answers", || {
        let (pool, token) = (pool.clone(), token.clone());
        async move { answered_by(pool, token).await.contains("node-1") }
    })
    .await;

    // An address gone from the answer is drained: no request reaches it any more.
    *switch.0.lock().unwrap() = vec![b];
    keyfleet_testkit::eventually("the gone node leaves the pool", || {
        let pool = pool.clone();
        async move { pool.nodes().len() == 1 }
    })
    .await;
    assert_eq!(pool.nodes()[0].url, format!("http://{b}"));
    let only_b = answered_by(pool.clone(), token.clone()).await;
    assert_eq!(only_b.into_iter().collect::<Vec<_>>(), ["node-1"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn localhost_resolves_through_the_system_resolver() {
    let fleet = Fleet::start(1).await;
    let port = fleet.nodes[0].grpc.port();
    let pool = VerifierPool::builder()
        .dns("localhost", port, Duration::from_secs(60))
        .build()
        .await
        .unwrap();
    let urls: Vec<String> = pool.nodes().into_iter().map(|n| n.url).collect();
    assert!(
        urls.contains(&format!("http://127.0.0.1:{port}")),
        "localhost resolved to {urls:?}"
    );
    // Whatever else localhost names (::1, where nothing listens), an answer comes.
    let token = fleet.issue("alice", &[]).await;
    for _ in 0..10 {
        let answer = pool
            .verify_request(Demands::none().request(&token))
            .await
            .unwrap();
        assert!(answer.valid);
    }
}
