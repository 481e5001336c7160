//! `keyfleet demo`: the main job on embedded defaults. A real cluster on loopback (one authority,
//! N verifiers in two regions) mints tokens once and verifies every one on every node, across a
//! key rotation and a node restart, then prints what happened.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use keyfleet_loadtest::cluster::{ClusterOptions, LocalCluster, channel};
use keyfleet_proto::v1::verifier_client::VerifierClient;
use keyfleet_proto::v1::{Reason, VerifyRequest};
use tonic::transport::Channel;

use crate::cli::DemoArgs;

/// One token the demo minted, with the verdict every node must give.
struct DemoToken {
    token: String,
    kid: String,
    want: Reason,
    label: &'static str,
}

#[derive(Default)]
struct Tally {
    checks: u64,
    wrong: u64,
    by_node: BTreeMap<String, u64>,
    by_reason: BTreeMap<&'static str, u64>,
}

pub async fn run(args: DemoArgs) -> anyhow::Result<ExitCode> {
    let started = Instant::now();
    let options = ClusterOptions {
        verifiers: args.verifiers as usize,
        ..ClusterOptions::default()
    };
    println!(
        "keyfleet demo: starting 1 authority and {} verifiers on loopback...",
        options.verifiers
    );
    let mut cluster = LocalCluster::start(options)
        .await
        .context("starting the local cluster")?;
    println!(
        "  authority  grpc {}  http {}/.well-known/jwks.json",
        cluster.authority.grpc_url(),
        cluster.authority.http_url()
    );
    for v in &cluster.verifiers {
        println!(
            "  {:<10} grpc {}  region {}",
            v.name,
            v.grpc_url(),
            v.region
        );
    }

    let mut tally = Tally::default();
    let mut tokens = Vec::new();

    // 1. Mint once, verify everywhere.
    let first = mint(&cluster, args.tokens, "before rotation").await?;
    let kid1 = first[0].kid.clone();
    tokens.extend(first);
    tokens.extend(hostile(&tokens[0].token));
    verify_everywhere(&cluster, &tokens, &mut tally).await?;
    println!(
        "\n[1] minted {} tokens with key {}; every token checked on every node",
        args.tokens,
        short(&kid1)
    );

    // 2. Rotate while the fleet holds the next key: no token may fail.
    let t = Instant::now();
    let kid2 = cluster
        .rotate(Duration::from_secs(30))
        .await
        .context("rotating keys")?;
    println!(
        "[2] rotated: {} -> {} in {} ms (promoted once every verifier acknowledged it)",
        short(&kid1),
        short(&kid2),
        t.elapsed().as_millis()
    );
    let second = mint(&cluster, args.tokens, "after rotation").await?;
    tokens.extend(second);
    verify_everywhere(&cluster, &tokens, &mut tally).await?;
    println!("    old and new tokens re-checked on every node");

    // 3. Restart a node: it comes back with its cached key set and serves everything.
    let t = Instant::now();
    cluster
        .restart_verifier(0)
        .await
        .context("restarting verifier-1")?;
    cluster.wait_ready(Duration::from_secs(10)).await?;
    println!(
        "[3] restarted {} in {} ms; all tokens re-checked on every node",
        cluster.verifiers[0].name,
        t.elapsed().as_millis()
    );
    verify_everywhere(&cluster, &tokens, &mut tally).await?;

    println!("\nSummary");
    println!(
        "  verdicts        {} (every token on every one of {} nodes, after each step)",
        tally.checks,
        cluster.verifiers.len()
    );
    println!("  wrong verdicts  {}", tally.wrong);
    for (node, n) in &tally.by_node {
        println!("  {node:<15} {n} answers");
    }
    for (reason, n) in &tally.by_reason {
        println!("  {reason:<15} {n}");
    }
    println!("  took            {:.1}s", started.elapsed().as_secs_f64());
    cluster.shutdown().await?;
    if tally.wrong == 0 {
        println!(
            "\nOK: every legitimate token verified on every node across the rotation and the restart;\n    every forged or wrong token was refused everywhere."
        );
        Ok(ExitCode::SUCCESS)
    } else {
        println!("\nFAILED: {} wrong verdicts", tally.wrong);
        Ok(ExitCode::from(1))
    }
}

fn short(kid: &str) -> &str {
    &kid[..kid.len().min(10)]
}

async fn mint(
    cluster: &LocalCluster,
    n: u32,
    label: &'static str,
) -> anyhow::Result<Vec<DemoToken>> {
    let mut out = Vec::new();
    for i in 0..n {
        let r = cluster
            .issue(&format!("user-{i}"), "demo")
            .await
            .context("minting a token")?;
        out.push(DemoToken {
            token: r.token,
            kid: r.kid,
            want: Reason::Ok,
            label,
        });
    }
    Ok(out)
}

/// Tokens every node must refuse: a forged signature and a made-up kid.
fn hostile(good: &str) -> Vec<DemoToken> {
    let mut forged = good.to_owned();
    let last = forged
        .pop()
        .map_or('A', |c| if c == 'A' { 'Q' } else { 'A' });
    forged.push(last);
    let parts: Vec<&str> = good.split('.').collect();
    let fake_header = "eyJhbGciOiJFZERTQSIsImtpZCI6Im1hZGUtdXAiLCJ0eXAiOiJKV1QifQ"; // {"alg":"EdDSA","kid":"made-up","typ":"JWT"}
    vec![
        DemoToken {
            token: forged,
            kid: String::new(),
            want: Reason::BadSignature,
            label: "forged",
        },
        DemoToken {
            token: format!("{fake_header}.{}.{}", parts[1], parts[2]),
            kid: String::new(),
            want: Reason::UnknownKid,
            label: "unknown kid",
        },
    ]
}

async fn verify_everywhere(
    cluster: &LocalCluster,
    tokens: &[DemoToken],
    tally: &mut Tally,
) -> anyhow::Result<()> {
    let mut clients: Vec<(String, VerifierClient<Channel>)> = Vec::new();
    for node in &cluster.verifiers {
        clients.push((
            node.name.clone(),
            VerifierClient::new(channel(&node.grpc_url()).await?),
        ));
    }
    for t in tokens {
        for (name, client) in &mut clients {
            let r = client
                .verify(VerifyRequest {
                    token: t.token.clone(),
                    audience: "demo".into(),
                })
                .await
                .with_context(|| format!("Verify on {name}"))?
                .into_inner();
            tally.checks += 1;
            *tally.by_node.entry(name.clone()).or_default() += 1;
            let got = Reason::try_from(r.reason).unwrap_or(Reason::Unspecified);
            *tally.by_reason.entry(got.as_str_name()).or_default() += 1;
            if got != t.want || r.valid != (t.want == Reason::Ok) {
                tally.wrong += 1;
                println!(
                    "  WRONG: {name} said {} for a {} token (want {})",
                    got.as_str_name(),
                    t.label,
                    t.want.as_str_name()
                );
            }
        }
    }
    Ok(())
}
