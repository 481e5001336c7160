//! `keyfleet demo`: the main job on embedded defaults. The load generator's engine starts a real
//! cluster on loopback (one authority, N verifiers in two regions) and sends `Verify` traffic
//! to random nodes while keys rotate and a node is killed and restarted, with tokens that must
//! be refused mixed in; then it prints the summary and writes the HTML report. A second act
//! shows persistent login on a fresh cluster: a session, scope and step-up checks, refreshes,
//! and a stolen refresh token whose replay ends the session on every node.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context as _, anyhow};
use keyfleet_loadtest::cluster::{ClusterOptions, LocalCluster};
use keyfleet_loadtest::{Load, LoadOptions, Pick, Target};
use keyfleet_proto::v1::verifier_client::VerifierClient;
use keyfleet_proto::v1::{
    Reason, RefreshRequest, SessionTokens, StartSessionRequest, VerifyRequest, VerifyResponse,
};
use tokio::time::Instant;
use tonic::Code;
use tonic::transport::Channel;

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
    let login = login_act(args.verifiers as usize).await?;
    println!(
        "\n  wrong verdicts  {}",
        report.false_rejects + report.false_accepts + login.wrong
    );
    let html = args
        .report_html
        .unwrap_or_else(|| std::env::temp_dir().join("keyfleet-demo-report.html"));
    report.write(None, Some(&html))?;
    println!("  HTML report     {}", html.display());
    if report.passed() && login.wrong == 0 {
        println!(
            "\nOK: every legitimate token verified on every node it was sent to ({:.1}% of tokens on 2+ nodes) \
across {} rotations and {} node restarts;\n    every forged, expired or wrong token was refused; the stolen refresh token ended its session \
on every node ({} of {} login checks as expected).",
            report.tokens_on_multiple_nodes_ratio * 100.0,
            report.rotations,
            report.kills,
            login.checks - login.wrong,
            login.checks
        );
        Ok(ExitCode::SUCCESS)
    } else {
        println!(
            "\nFAILED: {} legitimate tokens refused, {} bad tokens accepted, {} login checks not as expected",
            report.false_rejects, report.false_accepts, login.wrong
        );
        Ok(ExitCode::from(1))
    }
}

/// How the login act went: checks made, and those that did not answer as expected.
struct LoginAct {
    checks: u64,
    wrong: u64,
}

impl LoginAct {
    /// Counts one check and prints its line; `ok` is whether it answered as expected.
    fn check(&mut self, ok: bool, line: String) {
        self.checks += 1;
        if !ok {
            self.wrong += 1;
        }
        println!("  {line}{}", if ok { "" } else { "   <-- NOT AS EXPECTED" });
    }
}

/// The audience the login act's sessions are for.
const ORDERS: &str = "orders";
/// The step-up demand of the act: a login at most this old.
const STEP_UP: Duration = Duration::from_secs(300);
/// Longest wait for a node to refuse an ended session.
const REVOKE_WAIT: Duration = Duration::from_secs(10);

/// Act 2: persistent login on a fresh cluster of `verifiers` nodes.
async fn login_act(verifiers: usize) -> anyhow::Result<LoginAct> {
    println!(
        "\nAct 2, persistent login: a fresh authority and {verifiers} verifiers; a login service has just checked \
alice's password."
    );
    let cluster = LocalCluster::start(ClusterOptions {
        verifiers,
        audiences: vec![ORDERS.into()],
        ..ClusterOptions::default()
    })
    .await
    .context("starting the login act's cluster")?;
    let act = login_story(&cluster).await;
    cluster.shutdown().await.ok();
    act
}

async fn login_story(cluster: &LocalCluster) -> anyhow::Result<LoginAct> {
    let mut act = LoginAct {
        checks: 0,
        wrong: 0,
    };
    let mut authority = cluster.authority_client().await?;
    let mut nodes = Vec::new();
    for node in &cluster.verifiers {
        let channel = keyfleet_loadtest::cluster::channel(&node.grpc_url()).await?;
        nodes.push((node.name.clone(), VerifierClient::new(channel)));
    }
    let start = |subject: &str, auth_time: i64| StartSessionRequest {
        subject: subject.into(),
        audience: vec![ORDERS.into()],
        scopes: vec!["orders:read".into()],
        auth_time,
        amr: vec!["pwd".into()],
        ..StartSessionRequest::default()
    };
    let alice = authority
        .start_session(cluster.admin(start("alice", 0)))
        .await
        .map_err(|s| anyhow!("StartSession: {} ({:?})", s.message(), s.code()))?
        .into_inner();
    let now = keyfleet_runtime::clock::system_now();
    println!(
        "  StartSession(alice, scope orders:read) -> session {}, an access token for {} s (claims sid, auth_time, scope)\n\
  \x20   and a refresh token (opaque, {} characters; the authority keeps only its hash)",
        alice.session_id,
        alice.access_expires_at - now,
        alice.refresh_token.len()
    );
    let n = nodes.len();
    let read = verify(&mut nodes[0].1, &alice.access_token, &["orders:read"], None).await?;
    act.check(
        read.valid,
        row(
            format!("{}: Verify, scope orders:read required", nodes[0].0),
            verdict(&read),
        ),
    );
    let write = verify(
        &mut nodes[1 % n].1,
        &alice.access_token,
        &["orders:write"],
        None,
    )
    .await?;
    act.check(
        !write.valid && write.reason() == Reason::InsufficientScope,
        row(
            format!("{}: Verify, scope orders:write required", nodes[1 % n].0),
            verdict(&write),
        ),
    );
    let fresh = verify(&mut nodes[2 % n].1, &alice.access_token, &[], Some(STEP_UP)).await?;
    act.check(
        fresh.valid,
        row(
            format!("{}: Verify, step-up: login at most 5m old", nodes[2 % n].0),
            format!("{} (she logged in just now)", verdict(&fresh)),
        ),
    );
    let bob = authority
        .start_session(cluster.admin(start("bob", now - 2 * 3600)))
        .await
        .map_err(|s| anyhow!("StartSession: {} ({:?})", s.message(), s.code()))?
        .into_inner();
    let old = verify(&mut nodes[0].1, &bob.access_token, &[], Some(STEP_UP)).await?;
    act.check(
        !old.valid && old.reason() == Reason::LoginTooOld,
        row(
            "bob logged in 2 h ago; the same step-up demand".into(),
            format!("{}: ask for his password again", verdict(&old)),
        ),
    );
    // The thief copies alice's tokens now; her app goes on refreshing as usual.
    let stolen = alice.clone();
    let mut latest = alice;
    for _ in 0..2 {
        latest = refresh(&mut authority, &latest.refresh_token)
            .await
            .map_err(|s| anyhow!("Refresh: {} ({:?})", s.message(), s.code()))?;
    }
    println!(
        "  a thief copies alice's refresh token; her app refreshes twice: a new access token and a new refresh\n\
  \x20   token each time, and each presented refresh token is spent"
    );
    let replayed = Instant::now();
    let replay = refresh(&mut authority, &stolen.refresh_token).await;
    act.check(
        matches!(&replay, Err(s) if s.code() == Code::Unauthenticated),
        row(
            "the thief replays the stolen (spent) refresh token".into(),
            format!(
                "{}: theft detected, the session is ended",
                match &replay {
                    Ok(_) => "accepted".to_owned(),
                    Err(s) => format!("{:?}", s.code()).to_uppercase(),
                }
            ),
        ),
    );
    let mut times = Vec::new();
    for (name, node) in &mut nodes {
        let mut refused = [false, false];
        while !(refused[0] && refused[1]) && replayed.elapsed() < REVOKE_WAIT {
            for (i, token) in [&latest.access_token, &stolen.access_token]
                .into_iter()
                .enumerate()
            {
                let r = verify(node, token, &[], None).await?;
                refused[i] |= !r.valid && r.reason() == Reason::SessionRevoked;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let ok = refused[0] && refused[1];
        act.checks += 1;
        act.wrong += u64::from(!ok);
        times.push(if ok {
            format!("{name} after {} ms", replayed.elapsed().as_millis())
        } else {
            format!("{name} NOT within {} s", REVOKE_WAIT.as_secs())
        });
    }
    println!(
        "  alice's latest access token and the thief's copy: SESSION_REVOKED on {}",
        times.join(", ")
    );
    let after = refresh(&mut authority, &latest.refresh_token).await;
    act.check(
        matches!(&after, Err(s) if s.code() == Code::Unauthenticated),
        row(
            "alice's latest refresh token".into(),
            format!(
                "{}: the whole session is over; she logs in again",
                match &after {
                    Ok(_) => "accepted".to_owned(),
                    Err(s) => format!("{:?}", s.code()).to_uppercase(),
                }
            ),
        ),
    );
    Ok(act)
}

async fn refresh(
    authority: &mut keyfleet_proto::v1::authority_client::AuthorityClient<Channel>,
    refresh_token: &str,
) -> Result<SessionTokens, tonic::Status> {
    let request = RefreshRequest {
        refresh_token: refresh_token.to_owned(),
        scopes: Vec::new(),
    };
    Ok(authority.refresh(request).await?.into_inner())
}

async fn verify(
    node: &mut VerifierClient<Channel>,
    token: &str,
    scopes: &[&str],
    max_auth_age: Option<Duration>,
) -> anyhow::Result<VerifyResponse> {
    let request = VerifyRequest {
        token: token.to_owned(),
        audience: ORDERS.into(),
        required_scopes: scopes.iter().map(|s| (*s).to_owned()).collect(),
        max_auth_age_seconds: max_auth_age.map_or(0, |d| d.as_secs() as i64),
    };
    Ok(node
        .verify(request)
        .await
        .map_err(|s| anyhow!("Verify: {} ({:?})", s.message(), s.code()))?
        .into_inner())
}

/// One line of the story: what was done, and what came back.
fn row(what: String, answer: String) -> String {
    format!("{what:<52} -> {answer}")
}

/// `valid`, or the refusal reason with its detail.
fn verdict(r: &VerifyResponse) -> String {
    if r.valid {
        "valid".into()
    } else if r.detail.is_empty() {
        r.reason().as_str_name().to_owned()
    } else {
        format!(
            "{} ({})",
            r.reason().as_str_name(),
            keyfleet_core::escape_untrusted(&r.detail)
        )
    }
}
