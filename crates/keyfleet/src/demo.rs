//! `keyfleet demo`: the main job on embedded defaults. The load generator's engine starts a real
//! cluster on loopback (one authority, N verifiers in two regions) and sends `Verify` traffic
//! to random nodes while keys rotate and a node is killed and restarted, with tokens that must
//! be refused mixed in; then it prints the summary and writes the HTML report.

use std::process::ExitCode;
use std::time::Duration;

use keyfleet_loadtest::{Load, LoadOptions, Pick, Target};

use crate::cli::DemoArgs;

pub async fn run(args: DemoArgs) -> anyhow::Result<ExitCode> {
    println!(
        "keyfleet demo: starting 1 authority and {} verifiers on loopback; 8 s of Verify traffic on random \
nodes while keys rotate every 2.5 s and a node is killed and restarted...",
        args.verifiers
    );
    let options = LoadOptions {
        target: Target::Local {
            verifiers: args.verifiers as usize,
        },
        duration: Duration::from_secs(8),
        load: Load::Concurrency(16),
        tokens: args.tokens as usize,
        pick: Pick::Random,
        connections_per_node: 1,
        rotate_every: Some(Duration::from_millis(2500)),
        kill_every: Some(Duration::from_secs(4)),
        invalid_ratio: 0.05,
        ..LoadOptions::default()
    };
    let report = keyfleet_loadtest::run(options).await?;
    println!();
    print!("{}", report.summary());
    println!(
        "  wrong verdicts  {}",
        report.false_rejects + report.false_accepts
    );
    let html = args
        .report_html
        .unwrap_or_else(|| std::env::temp_dir().join("keyfleet-demo-report.html"));
    report.write(None, Some(&html))?;
    println!("  HTML report     {}", html.display());
    if report.passed() {
        println!(
            "\nOK: every legitimate token verified on every node it was sent to ({:.1}% of tokens on 2+ nodes) \
across {} rotations and {} node restarts;\n    every forged, expired or wrong token was refused.",
            report.tokens_on_multiple_nodes_ratio * 100.0,
            report.rotations,
            report.kills
        );
        Ok(ExitCode::SUCCESS)
    } else {
        println!(
            "\nFAILED: {} legitimate tokens refused, {} bad tokens accepted",
            report.false_rejects, report.false_accepts
        );
        Ok(ExitCode::from(1))
    }
}
