//! nginx as the gRPC balancer in front of three verifiers (deploy/nginx/grpc-balancer.conf.template):
//! calls are spread over all three (no stickiness); one verifier is SIGKILLed mid-load and no
//! call is lost: nginx passes a call to the next verifier when the connection fails before
//! anything was answered, and the few it cannot retry (already passed on) come back
//! UNAVAILABLE and the client re-sends them, as the README tells clients to.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keyfleet_proto::v1::verifier_client::VerifierClient;
use keyfleet_proto::v1::{Reason, VerifyRequest};
use keyfleet_testkit::eventually_within;
use tonic::Code;
use tonic::transport::Channel;

use crate::fleet::{AUDIENCE, Fleet, channel, forged};
use crate::nginx::{self, Nginx};

/// Calls in all; the kill comes once a third of them are answered.
const CALLS: usize = 3_000;
/// Clients sending at once (HTTP/2 streams on one connection to nginx).
const CONCURRENCY: usize = 8;
/// How often one call may come back UNAVAILABLE before the test gives up on it.
const MAX_SENDS: usize = 20;

/// What the load saw.
#[derive(Default)]
struct Seen {
    /// Calls answered, per answering node.
    per_node: BTreeMap<String, usize>,
    /// Wrong verdicts and errors other than UNAVAILABLE, described.
    wrong: Vec<String>,
    /// Calls re-sent after UNAVAILABLE.
    resent: usize,
}

/// One call, re-sent while it comes back UNAVAILABLE: `Ok(node)` with the right verdict, or
/// what went wrong.
async fn call(
    client: &mut VerifierClient<Channel>,
    token: &str,
    valid: bool,
    seen: &Mutex<Seen>,
) -> Result<String, String> {
    for _ in 0..MAX_SENDS {
        let request = VerifyRequest {
            token: token.to_owned(),
            audience: AUDIENCE.into(),
            ..Default::default()
        };
        match client.verify(request).await {
            Ok(response) => {
                let r = response.into_inner();
                let right = if valid {
                    r.valid && r.subject == "alice"
                } else {
                    !r.valid && r.reason() == Reason::BadSignature
                };
                return if right {
                    Ok(r.node_id)
                } else {
                    Err(format!(
                        "wrong verdict from {}: valid={} reason={:?}",
                        r.node_id,
                        r.valid,
                        r.reason()
                    ))
                };
            }
            Err(status) if status.code() == Code::Unavailable => {
                seen.lock().unwrap().resent += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(status) => return Err(format!("{:?}: {}", status.code(), status.message())),
        }
    }
    Err(format!("still UNAVAILABLE after {MAX_SENDS} sends"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_grpc_pass_spreads_calls_over_three_verifiers_and_loses_none_when_one_is_killed() {
    let Some(binary) = nginx::binary() else {
        return;
    };
    let mut fleet = Fleet::start(3).await;
    let port = nginx::free_port();
    let grpc = |i: usize| {
        fleet.verifiers[i]
            .grpc
            .trim_start_matches("http://")
            .to_owned()
    };
    let conf = nginx::template(
        "grpc-balancer.conf.template",
        &[
            ("LISTEN", format!("127.0.0.1:{port}")),
            ("KEYFLEET_VERIFIER_1", grpc(0)),
            ("KEYFLEET_VERIFIER_2", grpc(1)),
            ("KEYFLEET_VERIFIER_3", grpc(2)),
        ],
    );
    let nginx = Nginx::start(&binary, &conf, port);
    let token = fleet.issue("alice", &[]).await;
    let bad = forged(&token);
    let client = VerifierClient::new(channel(&format!("http://127.0.0.1:{port}")));

    let next = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let seen = Arc::new(Mutex::new(Seen::default()));
    let workers: Vec<_> = (0..CONCURRENCY)
        .map(|_| {
            let (mut client, next, done, seen) =
                (client.clone(), next.clone(), done.clone(), seen.clone());
            let (token, bad) = (token.clone(), bad.clone());
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    if i >= CALLS {
                        return;
                    }
                    // Every fourth call carries a forged token, which must be refused.
                    let valid = i % 4 != 0;
                    let outcome =
                        call(&mut client, if valid { &token } else { &bad }, valid, &seen).await;
                    let mut seen = seen.lock().unwrap();
                    match outcome {
                        Ok(node) => *seen.per_node.entry(node).or_default() += 1,
                        Err(what) => seen.wrong.push(format!("call {i}: {what}")),
                    }
                    drop(seen);
                    done.fetch_add(1, Ordering::SeqCst);
                }
            })
        })
        .collect();

    eventually_within(
        "a third of the calls answered",
        Duration::from_secs(60),
        || async { done.load(Ordering::SeqCst) >= CALLS / 3 },
    )
    .await;
    let before = seen.lock().unwrap().per_node.clone();
    let killed_at = done.load(Ordering::SeqCst);
    fleet.verifiers[2].kill();
    for worker in workers {
        tokio::time::timeout(Duration::from_secs(120), worker)
            .await
            .expect("the load did not finish")
            .unwrap();
    }
    let seen = std::mem::take(&mut *seen.lock().unwrap());
    let answered: usize = seen.per_node.values().sum();
    eprintln!(
        "nginx grpc_pass: {CALLS} calls, node-3 killed after {killed_at}; per node before the kill {before:?}, in all {:?}; {} re-sent after UNAVAILABLE",
        seen.per_node, seen.resent
    );
    assert!(
        seen.wrong.is_empty(),
        "calls lost or answered wrongly ({} of {CALLS}): {:?}\nnginx:\n{}",
        seen.wrong.len(),
        &seen.wrong[..seen.wrong.len().min(10)],
        nginx.log()
    );
    assert_eq!(answered, CALLS, "every call answered once");
    let served_before: usize = before.values().sum();
    for node in ["node-1", "node-2", "node-3"] {
        let n = before.get(node).copied().unwrap_or(0);
        assert!(
            n * 10 >= served_before,
            "{node} served {n} of the {served_before} calls before the kill: not round robin ({before:?})"
        );
    }
    let after_kill = |node: &str| {
        seen.per_node.get(node).copied().unwrap_or(0) - before.get(node).copied().unwrap_or(0)
    };
    assert!(
        after_kill("node-1") > 0 && after_kill("node-2") > 0,
        "the two live nodes share the calls after the kill: {:?}",
        seen.per_node
    );

    // Another service through the balancer: a gRPC status, not nginx's HTML page.
    let other = keyfleet_proto::v1::authority_client::AuthorityClient::new(channel(&format!(
        "http://127.0.0.1:{port}"
    )))
    .list_keys(keyfleet_proto::v1::ListKeysRequest {})
    .await
    .unwrap_err();
    assert_eq!(other.code(), Code::Unimplemented, "{other:?}");
    drop(nginx);
}
