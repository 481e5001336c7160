//! The issue's measurement of a stopped node: an authority in this process and three verifier
//! nodes as processes (`examples/verifier_process.rs`), an open-loop load through the load
//! generator's engine (so through `VerifierPool`), and one node stopped with SIGSTOP (no reset:
//! requests sent to it hang) for a while in the middle of the run. Prints the load report and
//! what the pool did.
//!
//! ```text
//! cargo build --release -p keyfleet-client --example verifier_process --example sigstop_load
//! target/release/examples/sigstop_load [--no-hedge] [--rate 500] [--duration 20] [--stop-at 5] [--stop-for 5]
//! ```

use std::process::Stdio;
use std::time::Duration;

use anyhow::Context as _;
use keyfleet_client::PoolConfig;
use keyfleet_loadtest::{Load, LoadOptions, Target};
use keyfleet_proto::v1::VerifyRequest;
use keyfleet_proto::v1::verifier_client::VerifierClient;
use keyfleet_runtime::CancellationToken;
use tokio::io::AsyncBufReadExt as _;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let flag = |name: &str, default: u64| -> anyhow::Result<u64> {
        match args.iter().position(|a| a == name) {
            Some(i) => args
                .get(i + 1)
                .context("a flag without its value")?
                .parse()
                .with_context(|| format!("{name} takes a whole number")),
            None => Ok(default),
        }
    };
    let hedging = !args.iter().any(|a| a == "--no-hedge");
    let (rate, duration) = (flag("--rate", 500)?, flag("--duration", 20)?);
    let (stop_at, stop_for) = (flag("--stop-at", 5)?, flag("--stop-for", 5)?);

    let dir = tempfile::tempdir()?;
    let data_dir = dir.path().join("authority");
    let authority =
        keyfleet_authority::Authority::open(keyfleet_authority::Config::for_test(&data_dir))?;
    let admin_token = authority.admin_token();
    let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let http = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let authority_url = format!("http://{}", grpc.local_addr()?);
    let stop = CancellationToken::new();
    let served = tokio::spawn(authority.serve(grpc, http, stop.clone()));

    let exe = std::env::current_exe()?.with_file_name("verifier_process");
    let token_file = data_dir.join(keyfleet_authority::NODE_TOKEN_FILE);
    let mut nodes = Vec::new();
    for i in 0..3 {
        let mut child = tokio::process::Command::new(&exe)
            .arg(&authority_url)
            .arg(&token_file)
            .arg(format!("node-{i}"))
            .arg(keyfleet_loadtest::engine::DEFAULT_AUDIENCE)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("spawning {} (build it first)", exe.display()))?;
        let mut line = String::new();
        tokio::io::BufReader::new(child.stdout.take().context("no stdout")?)
            .read_line(&mut line)
            .await?;
        let addr = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("grpc="))
            .context("the node did not print its address")?;
        let url = format!("http://{addr}");
        let mut client = VerifierClient::connect(url.clone()).await?;
        // Ready once it answers a verdict (it holds the key set).
        while client.verify(VerifyRequest::default()).await.is_err() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        nodes.push((child, url));
    }
    let urls: Vec<String> = nodes.iter().map(|(_, u)| u.clone()).collect();
    let victim = nodes[0].0.id().context("no pid")?.to_string();
    let signal = move |sig: &'static str, pid: String| async move {
        let _ = tokio::process::Command::new("kill")
            .args([sig, &pid])
            .status()
            .await;
    };
    let chaos = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(stop_at)).await;
        eprintln!("SIGSTOP node-0 for {stop_for}s");
        signal("-STOP", victim.clone()).await;
        tokio::time::sleep(Duration::from_secs(stop_for)).await;
        signal("-CONT", victim).await;
        eprintln!("SIGCONT node-0");
    });

    let options = LoadOptions {
        target: Target::Remote {
            authority: authority_url,
            verifiers: urls,
            admin_token,
        },
        duration: Duration::from_secs(duration),
        load: Load::Rate(rate),
        tokens: 200,
        measure_cost: false,
        progress: false,
        ..LoadOptions::default()
    };
    let pool = PoolConfig {
        hedging,
        ..PoolConfig::default()
    };
    let (report, stats) = keyfleet_loadtest::engine::run_with_pool(options, pool).await?;
    chaos.await?;
    println!("{}", report.summary());
    println!(
        "hedging {}: p50 {} µs, p99 {} µs, p99.9 {} µs, max {} µs, errors {}; pool: {} requests, {} hedges ({:.2} %), {} hedge wins, {} retries, {} ejections, {} readmissions",
        if hedging { "on" } else { "off" },
        report.latency_us.p50,
        report.latency_us.p99,
        report.latency_us.p999,
        report.latency_us.max,
        report.errors,
        stats.requests,
        stats.hedges,
        100.0 * stats.hedges as f64 / stats.requests.max(1) as f64,
        stats.hedge_wins,
        stats.retries,
        stats.ejections,
        stats.readmissions,
    );
    stop.cancel();
    let _ = served.await;
    Ok(())
}
