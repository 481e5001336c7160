//! Attacks on the servers around token verification, played for real on loopback (issue 11):
//! gRPC requests that send headers and never their message (stalls), and HTTP connections that
//! never finish their headers (slowloris). Each test fails on a build that lets them hold
//! shared capacity.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use keyfleet_loadtest::cluster::{ClusterOptions, LocalCluster, channel};
use keyfleet_proto::v1::authority_client::AuthorityClient;
use keyfleet_proto::v1::verifier_client::VerifierClient;
use keyfleet_proto::v1::{GetJwksRequest, RevokeTokenRequest, VerifyRequest};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// Requests that sent their headers and never their message, on their own connections.
struct Stalls {
    /// Each stream's answer, once the server gives one.
    answers: Vec<h2::client::ResponseFuture>,
    /// Kept so the streams stay open (dropping one would reset the stream).
    _bodies: Vec<h2::SendStream<Bytes>>,
    _clients: Vec<h2::client::SendRequest<Bytes>>,
}

/// Opens `per_connection` stalled calls of `path` on each of `connections` fresh connections.
async fn stall(addr: SocketAddr, path: &str, connections: usize, per_connection: usize) -> Stalls {
    let mut stalls = Stalls {
        answers: Vec::new(),
        _bodies: Vec::new(),
        _clients: Vec::new(),
    };
    for _ in 0..connections {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let (client, connection) = h2::client::handshake(tcp).await.unwrap();
        tokio::spawn(connection);
        let mut client = client.ready().await.unwrap();
        for _ in 0..per_connection {
            let request = http::Request::post(format!("http://{addr}{path}"))
                .header("content-type", "application/grpc")
                .header("te", "trailers")
                .body(())
                .unwrap();
            let (answer, body) = client.send_request(request, false).unwrap();
            stalls.answers.push(answer);
            stalls._bodies.push(body);
            client = client.ready().await.unwrap();
        }
        stalls._clients.push(client);
    }
    stalls
}

/// The grpc-status of a trailers-only answer (what a server gives a request it refuses).
async fn grpc_status(answer: h2::client::ResponseFuture) -> Option<String> {
    let response = answer.await.ok()?;
    let status = response.headers().get("grpc-status")?.to_str().ok()?;
    Some(status.to_owned())
}

/// An audience the cluster's verifiers guard.
fn audience_of(cluster: &LocalCluster) -> String {
    cluster
        .options
        .audiences
        .first()
        .cloned()
        .unwrap_or_else(|| "orders".into())
}

fn p99(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[(samples.len() * 99 / 100).min(samples.len() - 1)]
}

/// A cluster with one verifier.
async fn one_verifier() -> LocalCluster {
    LocalCluster::start(ClusterOptions {
        verifiers: 1,
        ..ClusterOptions::default()
    })
    .await
    .unwrap()
}

/// A cluster with one verifier, an audience it guards and a token for it.
async fn one_verifier_and_a_token() -> (LocalCluster, String, String) {
    let cluster = one_verifier().await;
    let audience = audience_of(&cluster);
    let token = cluster.issue("alice", &audience).await.unwrap().token;
    (cluster, audience, token)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_verify_requests_do_not_shut_out_a_separate_client() {
    let (cluster, audience, token) = one_verifier_and_a_token().await;
    let node = cluster.verifiers[0].grpc;
    let mut honest = VerifierClient::new(channel(&cluster.verifier_urls()[0]).await.unwrap());

    // More stalled requests than the node's whole in-flight budget (2,048), from the same
    // address as the honest client.
    let stalls = stall(node, "/keyfleet.v1.Verifier/Verify", 10, 250).await;
    let opened = Instant::now();

    let mut latencies = Vec::new();
    for _ in 0..200 {
        let start = Instant::now();
        let answer = honest
            .verify(VerifyRequest {
                token: token.clone(),
                audience: audience.clone(),
                ..Default::default()
            })
            .await
            .expect("the honest client's call succeeds");
        latencies.push(start.elapsed());
        assert!(answer.into_inner().valid);
    }
    let honest_done = opened.elapsed();
    let p99 = p99(latencies);
    eprintln!(
        "honest client: 200/200 calls, p99 {p99:?}, done {honest_done:?} after the stalls opened"
    );
    assert!(
        p99 < Duration::from_millis(100),
        "honest p99 {p99:?} with 2,500 stalled requests"
    );

    // The stalls were still open while the honest client ran, and each is then dropped after
    // the body deadline (5 s) with DEADLINE_EXCEEDED.
    let mut deadline_exceeded = 0;
    for answer in stalls.answers {
        let status = tokio::time::timeout(Duration::from_secs(20), grpc_status(answer))
            .await
            .expect("a stalled request is answered after the body deadline");
        deadline_exceeded += usize::from(status.as_deref() == Some("4"));
    }
    let dropped_after = opened.elapsed();
    eprintln!("2,500 stalls answered DEADLINE_EXCEEDED after {dropped_after:?}");
    assert_eq!(deadline_exceeded, 2500);
    assert!(
        honest_done < dropped_after,
        "the honest calls ran while the stalls were held"
    );
    assert!(
        dropped_after >= Duration::from_secs(4),
        "the stalls were held for the body deadline ({dropped_after:?})"
    );
    cluster.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_requests_on_the_authority_do_not_block_revocations() {
    let cluster = one_verifier().await;
    let addr = cluster.authority.grpc;
    let mut operator = AuthorityClient::new(channel(&cluster.authority.grpc_url()).await.unwrap());

    // GetJwks and admin calls, stalled past every budget.
    let jwks = stall(addr, "/keyfleet.v1.Authority/GetJwks", 9, 250).await;
    let admin = stall(addr, "/keyfleet.v1.Authority/RevokeToken", 1, 250).await;

    for i in 0..10 {
        let revoke = RevokeTokenRequest {
            jti: format!("stolen-{i}"),
            until: 4_000_000_000,
        };
        operator
            .revoke_token(cluster.admin(revoke))
            .await
            .expect("RevokeToken succeeds every time");
    }
    operator
        .get_jwks(GetJwksRequest {})
        .await
        .expect("GetJwks answers");
    assert!(
        jwks.answers.iter().len() + admin.answers.len() == 2500,
        "every stall was opened"
    );
    cluster.shutdown().await.unwrap();
}

/// Opens `n` HTTP connections that send part of a request's headers and then nothing.
async fn slowloris(addr: SocketAddr, n: usize) -> Vec<TcpStream> {
    let mut conns = Vec::with_capacity(n);
    for _ in 0..n {
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        tcp.write_all(b"GET /readyz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            .await
            .unwrap();
        conns.push(tcp);
    }
    conns
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_and_silent_connections_are_closed_and_starve_nothing() {
    let (cluster, audience, token) = one_verifier_and_a_token().await;
    let node = &cluster.verifiers[0];
    let conns = slowloris(node.http, 1000).await;
    // And connections to the gRPC port that never send the HTTP/2 preface.
    let mut silent = Vec::new();
    for _ in 0..200 {
        silent.push(TcpStream::connect(node.grpc).await.unwrap());
    }
    let opened = Instant::now();

    let readyz = tokio::time::timeout(
        Duration::from_secs(5),
        keyfleet_testkit::http::get(node.http, "/readyz"),
    )
    .await
    .expect("/readyz answers while 1,000 slowloris connections are open");
    assert_eq!(readyz.status, 200, "{readyz:?}");
    let mut client = VerifierClient::new(channel(&node.grpc_url()).await.unwrap());
    let answer = tokio::time::timeout(
        Duration::from_secs(5),
        client.verify(VerifyRequest {
            token,
            audience,
            ..Default::default()
        }),
    )
    .await
    .expect("Verify answers while 1,000 slowloris connections are open")
    .unwrap();
    assert!(answer.into_inner().valid);

    // Every half-open connection is closed by the server within the header timeout (10 s),
    // and every silent one within the first-bytes timeout (10 s).
    for mut conn in conns.into_iter().chain(silent) {
        let mut buf = [0u8; 256];
        let closed = tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                match conn.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await;
        assert!(closed.is_ok(), "a slowloris connection was left open");
    }
    let closed_after = opened.elapsed();
    assert!(
        closed_after < Duration::from_secs(20),
        "closed within the header timeout ({closed_after:?})"
    );
    cluster.shutdown().await.unwrap();
}
