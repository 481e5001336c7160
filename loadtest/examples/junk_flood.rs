//! What a flood of 1 MiB junk tokens costs a verifier, against real verifications, measured as
//! the CPU time of the verifier's own threads (and its resident memory) in one run.
//!
//! `cargo run --release -p keyfleet-loadtest --example junk_flood [-- COUNT]`

use std::time::Duration;

use keyfleet_loadtest::cluster::{ClusterOptions, LocalCluster, channel};
use keyfleet_loadtest::cpu::{rss_bytes, threads_cpu_ns};
use keyfleet_proto::v1::VerifyRequest;
use keyfleet_proto::v1::verifier_client::VerifierClient;

const SERVER_THREADS: &str = "kf-verifier";

fn main() -> anyhow::Result<()> {
    let count: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(500);
    let server = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name(SERVER_THREADS)
        .enable_all()
        .build()?;
    let client = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    client.block_on(async {
        let options = ClusterOptions {
            verifiers: 1,
            runtime: Some(server.handle().clone()),
            cache_entries: Some(0),
            audiences: vec!["flood".into()],
            ..ClusterOptions::default()
        };
        let cluster = LocalCluster::start(options).await?;
        let mut node = VerifierClient::new(channel(&cluster.verifier_urls()[0]).await?);
        let mut tokens = Vec::new();
        for i in 0..count {
            tokens.push(cluster.issue(&format!("u{i}"), "flood").await?.token);
        }
        // Warm up the connection and the code paths.
        for t in tokens.iter().take(20) {
            node.verify(VerifyRequest { token: t.clone(), audience: "flood".into(), ..Default::default() }).await?;
        }

        let cpu0 = threads_cpu_ns(SERVER_THREADS).unwrap_or(0);
        let mut valid = 0;
        for t in &tokens {
            valid += node.verify(VerifyRequest { token: t.clone(), audience: "flood".into(), ..Default::default() }).await?.into_inner().valid as usize;
        }
        let real_ns = threads_cpu_ns(SERVER_THREADS).unwrap_or(0) - cpu0;

        let junk: String = "A".repeat(1 << 20);
        let rss_before = rss_bytes().unwrap_or(0);
        let cpu0 = threads_cpu_ns(SERVER_THREADS).unwrap_or(0);
        let mut refused = 0;
        for _ in 0..count {
            match node.verify(VerifyRequest { token: junk.clone(), audience: String::new(), ..Default::default() }).await {
                Err(_) => refused += 1,
                Ok(r) => anyhow::ensure!(!r.into_inner().valid, "a junk token was accepted"),
            }
        }
        let junk_ns = threads_cpu_ns(SERVER_THREADS).unwrap_or(0) - cpu0;
        let rss_after = rss_bytes().unwrap_or(0);
        // The node still serves.
        let ok = node.verify(VerifyRequest { token: tokens[0].clone(), audience: "flood".into(), ..Default::default() }).await?.into_inner().valid;

        println!("real verifies   {count} ({valid} valid): {:.1} µs server CPU each", real_ns as f64 / count as f64 / 1e3);
        println!("1 MiB junk      {count} ({refused} refused by the transport): {:.1} µs server CPU each", junk_ns as f64 / count as f64 / 1e3);
        println!("ratio junk/real {:.2}", junk_ns as f64 / real_ns.max(1) as f64);
        println!("process RSS     {:.1} MiB before the flood, {:.1} MiB after", rss_before as f64 / 1048576.0, rss_after as f64 / 1048576.0);
        println!("still serving   {ok}");
        tokio::time::sleep(Duration::from_millis(10)).await;
        cluster.shutdown().await
    })
}
