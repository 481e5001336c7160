//! The pool against real nodes: spread, verdicts as answers, dead nodes retried around and
//! ejected, and a node stopped with SIGSTOP (its own process: no reset, requests just hang)
//! hedged around, ejected, and probed back after SIGCONT.

use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use keyfleet_client::{Demands, TokenVerifier, VerifierPool, VerifyError};
use keyfleet_proto::v1::Reason;
use tokio::io::AsyncBufReadExt as _;
use tokio::time::Instant;

use super::{Fleet, pool};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_spread_over_every_node_and_hedges_stay_within_budget() {
    let fleet = Fleet::start(3).await;
    let pool = pool(fleet.urls(), true).await;
    let token = fleet.issue("alice", &[]).await;
    let mut by_node = std::collections::HashMap::<String, u32>::new();
    for _ in 0..300 {
        let answer = pool
            .verify_request(Demands::none().request(&token))
            .await
            .unwrap();
        assert!(answer.valid, "{answer:?}");
        *by_node.entry(answer.node_id).or_default() += 1;
    }
    // No stickiness: every node answers a fair share of one token's requests (1/3 expected).
    assert_eq!(by_node.len(), 3, "{by_node:?}");
    assert!(by_node.values().all(|n| *n >= 40), "{by_node:?}");
    let stats = pool.stats();
    assert_eq!((stats.requests, stats.answers), (300, 300), "{stats:?}");
    assert_eq!(stats.ejections, 0, "{stats:?}");
    // The budget: 10 saved up, then at most one hedge per 10 requests.
    assert!(stats.hedges <= 300 / 10 + 10, "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_are_answers_not_failures() {
    let fleet = Fleet::start(2).await;
    let pool = pool(fleet.urls(), true).await;
    let token = fleet.issue("alice", &[]).await;
    // One character of the signature changed (not the last, whose low bits must stay zero).
    let at = token.len() - 10;
    let swap = if &token[at..=at] == "A" { "B" } else { "A" };
    let forged = format!("{}{swap}{}", &token[..at], &token[at + 1..]);
    for _ in 0..20 {
        let answer = pool
            .verify_request(Demands::none().request(&forged))
            .await
            .unwrap();
        assert!(!answer.valid);
        assert_eq!(answer.reason(), Reason::BadSignature);
    }
    let demands = Demands {
        audience: Some("other".into()),
        ..Demands::none()
    };
    let refused = TokenVerifier::verify(&pool, &token, &demands)
        .await
        .unwrap_err();
    assert!(
        matches!(
            refused,
            VerifyError::Refused {
                reason: keyfleet_core::Reason::WrongAudience,
                ..
            }
        ),
        "{refused:?}"
    );
    let stats = pool.stats();
    assert_eq!(
        (stats.failures, stats.retries, stats.ejections),
        (0, 0, 0),
        "{stats:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_node_is_retried_around_and_ejected() {
    let fleet = Fleet::start(2).await;
    // A port nothing listens on any more: connections are refused.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    let mut urls = fleet.urls();
    urls.push(dead.clone());
    let pool = pool(urls, true).await;
    let token = fleet.issue("alice", &[]).await;
    for _ in 0..60 {
        let answer = pool
            .verify_request(Demands::none().request(&token))
            .await
            .unwrap();
        assert!(answer.valid);
    }
    let stats = pool.stats();
    assert!(stats.ejections >= 1, "{stats:?}");
    let nodes = pool.nodes();
    let node = nodes.iter().find(|n| n.url == dead).unwrap();
    assert!(node.ejected && node.answers == 0, "{nodes:?}");

    // A pool of dead nodes only says so, within its deadline.
    let all_dead = pool_of(vec![dead]).await;
    let err = all_dead
        .verify_request(Demands::none().request(&token))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("failed"), "{err}");
}

async fn pool_of(urls: Vec<String>) -> VerifierPool {
    super::pool(urls, true).await
}

/// A verifier node as its own process (`examples/verifier_process.rs`), killed on drop.
struct NodeProcess {
    child: tokio::process::Child,
    url: String,
}

impl NodeProcess {
    async fn start(fleet: &Fleet, name: &str) -> NodeProcess {
        let exe = example_binary("verifier_process");
        let mut child = tokio::process::Command::new(&exe)
            .arg(fleet.authority.grpc_url())
            .arg(fleet.node_token_file())
            .arg(name)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", exe.display()));
        let stdout = child.stdout.take().unwrap();
        let mut line = String::new();
        tokio::io::BufReader::new(stdout)
            .read_line(&mut line)
            .await
            .unwrap();
        let grpc = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("grpc="))
            .unwrap_or_else(|| panic!("no address from the node process: {line:?}"));
        NodeProcess {
            url: format!("http://{grpc}"),
            child,
        }
    }

    fn signal(&self, signal: &str) {
        let pid = self.child.id().unwrap().to_string();
        let status = std::process::Command::new("kill")
            .args([signal, &pid])
            .status()
            .unwrap();
        assert!(status.success(), "kill {signal} {pid}");
    }
}

/// The path of this crate's example `name`, built now if `cargo test` did not build it (it
/// does unless test targets are selected).
fn example_binary(name: &str) -> std::path::PathBuf {
    let exe = std::env::current_exe().unwrap();
    // target/<profile>/deps/client-HASH → target/<profile>/examples/NAME
    let path = exe
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("examples")
        .join(name);
    if !path.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = std::process::Command::new(cargo)
            .args(["build", "-p", "keyfleet-client", "--example", name])
            .status()
            .unwrap();
        assert!(status.success(), "building the example {name}");
    }
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_stopped_with_sigstop_is_hedged_around_ejected_and_probed_back() {
    let fleet = Fleet::start(2).await;
    let process = NodeProcess::start(&fleet, "stopped-node").await;
    let mut urls = fleet.urls();
    urls.push(process.url.clone());
    let pool = Arc::new(pool(urls, true).await);
    let token = fleet.issue("alice", &[]).await;
    let answered_by_process = |pool: Arc<VerifierPool>, token: String| async move {
        for _ in 0..30 {
            if let Ok(a) = pool.verify_request(Demands::none().request(&token)).await
                && a.node_id == "stopped-node"
            {
                return true;
            }
        }
        false
    };
    keyfleet_testkit::eventually("the node process answers through the pool", || {
        answered_by_process(pool.clone(), token.clone())
    })
    .await;
    // Enough answers for the pool's p95 (before it, hedges wait the ceiling).
    for _ in 0..50 {
        pool.verify_request(Demands::none().request(&token))
            .await
            .unwrap();
    }
    let before = pool.stats();

    process.signal("-STOP");
    // Four callers, 100 requests each, while the node hangs every request sent to it.
    let started = Instant::now();
    let mut callers = tokio::task::JoinSet::new();
    for _ in 0..4 {
        let (pool, token) = (pool.clone(), token.clone());
        callers.spawn(async move {
            let mut answered = 0u32;
            let mut slowest = Duration::ZERO;
            for _ in 0..100 {
                let t = Instant::now();
                let answer = pool.verify_request(Demands::none().request(&token)).await;
                slowest = slowest.max(t.elapsed());
                if answer.is_ok_and(|a| a.valid) {
                    answered += 1;
                }
            }
            (answered, slowest)
        });
    }
    let (mut answered, mut slowest) = (0, Duration::ZERO);
    while let Some(r) = callers.join_next().await {
        let (a, s) = r.unwrap();
        answered += a;
        slowest = slowest.max(s);
    }
    let during = pool.stats();
    let nodes = pool.nodes();
    eprintln!(
        "while stopped: {answered}/400 answered in {:?}, slowest {slowest:?} (hedge delay now {:?}); hedges {}, hedge wins {}, retries {}, ejections {}",
        started.elapsed(),
        pool.hedge_delay(),
        during.hedges - before.hedges,
        during.hedge_wins - before.hedge_wins,
        during.retries - before.retries,
        during.ejections - before.ejections,
    );
    assert_eq!(
        answered, 400,
        "every request answered while a node is stopped"
    );
    let stopped = nodes.iter().find(|n| n.url == process.url).unwrap();
    assert!(stopped.ejected, "the stopped node is ejected: {nodes:?}");
    assert!(during.ejections > before.ejections, "{during:?}");
    assert!(
        during.hedge_wins > before.hedge_wins || during.retries > before.retries,
        "answers came from other nodes: {during:?}"
    );

    process.signal("-CONT");
    keyfleet_testkit::eventually_within(
        "the resumed node is probed back into the pool",
        Duration::from_secs(30),
        || {
            let pool = pool.clone();
            async move { pool.nodes().iter().all(|n| !n.ejected) }
        },
    )
    .await;
    assert!(pool.stats().readmissions >= 1);
    keyfleet_testkit::eventually("the resumed node answers again", || {
        answered_by_process(pool.clone(), token.clone())
    })
    .await;
}
