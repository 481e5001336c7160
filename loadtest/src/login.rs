//! The login scenario (`keyfleet loadtest --scenario login`): N users log in (`StartSession`),
//! refresh on a schedule (`Refresh`), and their access tokens are checked on random verifier
//! nodes with required scopes and step-up demands (`Verify`), where every verdict is known in
//! advance. Mid-run a thief replays a victim's stolen, already spent refresh token: the
//! authority must refuse it (`UNAUTHENTICATED`) and end the session, and every node must then
//! refuse the victim's latest access token and the thief's stolen one with `SESSION_REVOKED`;
//! the time from the replay until the last node does so is measured on every node.
//!
//! The JSON report's fields ([`LoginReport`]) are stable; `loadtest/scenarios/README.md` lists
//! them.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context as _, anyhow};
use hdrhistogram::Histogram;
use keyfleet_authority::client::AdminBearer;
use keyfleet_proto::v1::authority_client::AuthorityClient;
use keyfleet_proto::v1::verifier_client::VerifierClient;
use keyfleet_proto::v1::{
    ListSessionsRequest, Reason, RefreshRequest, SessionTokens, StartSessionRequest, VerifyRequest,
};
use keyfleet_runtime::client::Settings;
use keyfleet_runtime::tls::ClientTls;
use serde::Serialize;
use tokio::time::Instant;
use tonic::transport::Channel;
use tonic::{Code, Request};

use crate::cluster::{ClusterOptions, LocalCluster};
use crate::engine::Target;

/// `--users` unless set.
pub const DEFAULT_USERS: usize = 200;
/// `--refresh-every` unless set: each user refreshes this often.
pub const DEFAULT_REFRESH_EVERY: Duration = Duration::from_secs(3);
/// `--thefts` unless set.
pub const DEFAULT_THEFTS: usize = 1;
/// `--revocation-bound` unless set: the goal for theft → SESSION_REVOKED on every node.
pub const DEFAULT_REVOCATION_BOUND: Duration = Duration::from_secs(1);
/// How long a node is polled for SESSION_REVOKED before the theft counts as not propagated.
const REVOCATION_TIMEOUT: Duration = Duration::from_secs(10);
/// Access-token lifetime of the local cluster's authority (`--token-ttl`): short, as for
/// sessions, yet long enough that a scheduled refresh always comes first.
const LOCAL_ACCESS_TTL_SECS: i64 = 120;
/// The scope every user holds, and the one only every other user holds.
const SCOPE_READ: &str = "profile:read";
const SCOPE_WRITE: &str = "orders:write";
/// How old an "old" login is (a user who stayed logged in for two days).
const OLD_LOGIN_SECS: i64 = 2 * 24 * 3600;
/// Step-up demand: a login at most this old (well between a fresh and an old login).
const STEP_UP_SECS: i64 = 24 * 3600;

/// What to run.
#[derive(Debug, Clone)]
pub struct LoginOptions {
    pub target: Target,
    /// How long users refresh and verify after logging in.
    pub duration: Duration,
    pub users: usize,
    pub refresh_every: Duration,
    /// Verify calls in flight (closed loop).
    pub concurrency: usize,
    /// Stolen refresh tokens replayed, spread over the run (each a different victim).
    pub thefts: usize,
    /// The audience the sessions are for and Verify asks for.
    pub audience: String,
    /// Theft → SESSION_REVOKED on every node must take at most this long.
    pub revocation_bound: Duration,
    pub tls: ClientTls,
    /// Progress lines on stderr.
    pub progress: bool,
}

impl Default for LoginOptions {
    fn default() -> Self {
        LoginOptions {
            target: Target::Local { verifiers: 3 },
            duration: Duration::from_secs(30),
            users: DEFAULT_USERS,
            refresh_every: DEFAULT_REFRESH_EVERY,
            concurrency: 16,
            thefts: DEFAULT_THEFTS,
            audience: crate::engine::DEFAULT_AUDIENCE.into(),
            revocation_bound: DEFAULT_REVOCATION_BOUND,
            tls: ClientTls::default(),
            progress: false,
        }
    }
}

/// One node's answer to a theft: when it first refused both tokens with SESSION_REVOKED.
#[derive(Debug, Clone, Serialize)]
pub struct NodeRevocation {
    /// The node's gRPC URL.
    pub node: String,
    /// Milliseconds from the replay until this node refused both tokens; `None` if it did not
    /// within the poll timeout (10 s).
    pub ms: Option<f64>,
    /// The last refusal reason seen for the victim's latest access token.
    pub last_reason: String,
}

/// One replayed refresh token.
#[derive(Debug, Clone, Serialize)]
pub struct Theft {
    pub victim: String,
    pub session_id: String,
    /// Seconds into the run when the spent refresh token was replayed.
    pub t: f64,
    /// Both tokens verified on every node just before the replay (so the refusals after it are
    /// the theft's doing).
    pub valid_before: bool,
    /// The replay was refused with UNAUTHENTICATED.
    pub detected: bool,
    /// The gRPC code and message of the replay's answer (`OK` if it was wrongly accepted).
    pub replay_code: String,
    pub replay_message: String,
    /// The victim's latest refresh token (never spent) was refused afterwards too: the whole
    /// session ended.
    pub session_ended: bool,
    /// The session's end reason as ListSessions reports it (empty if it could not be read).
    pub end_reason: String,
    pub nodes: Vec<NodeRevocation>,
    /// Every node refused both tokens with SESSION_REVOKED.
    pub revoked_everywhere: bool,
    /// Milliseconds until the last node did (the time the fleet took).
    pub max_ms: Option<f64>,
}

/// The login scenario's findings (`--report-json`).
#[derive(Debug, Clone, Serialize)]
pub struct LoginReport {
    /// Always `"login"`.
    pub scenario: String,
    pub nodes: usize,
    pub users: usize,
    /// Seconds of refresh and verify traffic (the rates are per second of it).
    pub duration_seconds: f64,
    pub refresh_every_seconds: f64,
    pub logins: u64,
    pub login_p99_ms: f64,
    /// Honest refreshes answered with new tokens.
    pub refreshes: u64,
    pub refreshes_per_second: f64,
    pub refresh_p50_ms: f64,
    pub refresh_p99_ms: f64,
    pub refresh_max_ms: f64,
    /// Honest refreshes refused or failed (must be 0).
    pub refresh_failures: u64,
    pub verifies: u64,
    pub verifies_per_second: f64,
    pub verify_p99_ms: f64,
    /// Answers by kind: valid, and the expected refusals of the scope and step-up checks.
    pub verified_valid: u64,
    pub refused_insufficient_scope: u64,
    pub refused_login_too_old: u64,
    /// An honest user's token refused where it had to verify (must be 0).
    pub false_rejects: u64,
    /// A scope or step-up demand that had to fail, answered valid (must be 0).
    pub false_accepts: u64,
    /// A refusal with another reason than the expected one (must be 0).
    pub wrong_reasons: u64,
    /// Verify calls that failed as calls (gRPC errors), not verdicts.
    pub verify_errors: u64,
    pub thefts: Vec<Theft>,
    /// Every theft was detected (replay refused UNAUTHENTICATED, session ended).
    pub theft_detected: bool,
    /// Replay → SESSION_REVOKED, across every node of every theft, in milliseconds.
    pub revocation_p50_ms: f64,
    pub revocation_p99_ms: f64,
    pub revocation_max_ms: f64,
    pub revocation_bound_ms: f64,
    /// Every node of every theft refused within the bound.
    pub revocation_within_bound: bool,
    pub passed: bool,
    /// Why it did not pass (empty when it did).
    pub failures: Vec<String>,
}

impl LoginReport {
    pub fn passed(&self) -> bool {
        self.passed
    }

    pub fn summary(&self) -> String {
        let mut s = format!(
            concat!(
                "login scenario: {} users on {} nodes, {:.1} s, a refresh every {:.1} s per user\n",
                "  logins          {} (p99 {:.1} ms)\n",
                "  refreshes       {} ({:.0}/s, p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms), {} failed\n",
                "  verifies        {} ({:.0}/s, p99 {:.1} ms): {} valid, {} INSUFFICIENT_SCOPE, {} LOGIN_TOO_OLD as expected\n",
                "  wrong verdicts  {} false rejects, {} false accepts, {} wrong reasons ({} call errors)\n",
            ),
            self.users,
            self.nodes,
            self.duration_seconds,
            self.refresh_every_seconds,
            self.logins,
            self.login_p99_ms,
            self.refreshes,
            self.refreshes_per_second,
            self.refresh_p50_ms,
            self.refresh_p99_ms,
            self.refresh_max_ms,
            self.refresh_failures,
            self.verifies,
            self.verifies_per_second,
            self.verify_p99_ms,
            self.verified_valid,
            self.refused_insufficient_scope,
            self.refused_login_too_old,
            self.false_rejects,
            self.false_accepts,
            self.wrong_reasons,
            self.verify_errors,
        );
        for t in &self.thefts {
            let per_node = t
                .nodes
                .iter()
                .map(|n| {
                    n.ms.map_or(format!("never (last {})", n.last_reason), |ms| {
                        format!("{ms:.0} ms")
                    })
                })
                .collect::<Vec<_>>()
                .join(", ");
            s.push_str(&format!(
                "  theft at {:.1} s  victim {}: replay answered {} ({}), session ended: {} ({}); SESSION_REVOKED on every node: {} [{}]\n",
                t.t,
                t.victim,
                t.replay_code,
                t.replay_message,
                if t.session_ended { "yes" } else { "NO" },
                if t.end_reason.is_empty() { "-" } else { &t.end_reason },
                if t.revoked_everywhere { "yes" } else { "NO" },
                per_node,
            ));
        }
        s.push_str(&format!(
            "  revocation      replay → SESSION_REVOKED on every node: p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms (bound {:.0} ms)\n",
            self.revocation_p50_ms,
            self.revocation_p99_ms,
            self.revocation_max_ms,
            self.revocation_bound_ms
        ));
        s
    }
}

/// One honest user.
struct User {
    subject: String,
    write: bool,
    old_login: bool,
    /// Held across each refresh, so a thief sees a settled state.
    refresh_lock: tokio::sync::Mutex<()>,
    state: Mutex<UserTokens>,
    /// Set when a thief picks this user: no more honest traffic is judged for it.
    stolen: AtomicBool,
}

struct UserTokens {
    access: String,
    refresh: String,
    session_id: String,
}

/// The connections and credentials of a run.
struct Fleet {
    authority: AuthorityClient<Channel>,
    admin: AdminBearer,
    nodes: Vec<(String, VerifierClient<Channel>)>,
}

#[derive(Default)]
struct Counters {
    refreshes: AtomicU64,
    refresh_failures: AtomicU64,
    verifies: AtomicU64,
    valid: AtomicU64,
    insufficient_scope: AtomicU64,
    login_too_old: AtomicU64,
    false_rejects: AtomicU64,
    false_accepts: AtomicU64,
    wrong_reasons: AtomicU64,
    verify_errors: AtomicU64,
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds")
}

fn record(h: &Mutex<Histogram<u64>>, since: Instant) {
    let us = since.elapsed().as_micros().clamp(1, 60_000_000) as u64;
    if let Ok(mut h) = h.lock() {
        h.record(us).ok();
    }
}

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

/// Runs the login scenario.
pub async fn run(options: LoginOptions) -> anyhow::Result<LoginReport> {
    if options.users == 0 {
        return Err(anyhow!("--users must be at least 1"));
    }
    if options.thefts > options.users {
        return Err(anyhow!(
            "--thefts {} needs at least as many --users",
            options.thefts
        ));
    }
    let (fleet, cluster) = match &options.target {
        Target::Local { verifiers } => {
            let cluster_options = ClusterOptions {
                verifiers: *verifiers,
                audiences: vec![options.audience.clone()],
                policy: keyfleet_core::RingPolicy {
                    token_ttl: LOCAL_ACCESS_TTL_SECS,
                    ..ClusterOptions::default().policy
                },
                ..ClusterOptions::default()
            };
            let cluster = LocalCluster::start(cluster_options)
                .await
                .context("starting the local cluster")?;
            let mut nodes = Vec::new();
            for url in cluster.verifier_urls() {
                let channel = crate::cluster::channel(&url).await?;
                nodes.push((url, VerifierClient::new(channel)));
            }
            let fleet = Fleet {
                authority: cluster.authority_client().await?,
                admin: AdminBearer::new(&cluster.admin_token)?,
                nodes,
            };
            (fleet, Some(cluster))
        }
        Target::Remote {
            authority,
            verifiers,
            admin_token,
        } => {
            let channel = |url: &str| -> anyhow::Result<Channel> {
                Ok(
                    keyfleet_runtime::client::endpoint(url, &options.tls, &Settings::COMMAND)?
                        .connect_lazy(),
                )
            };
            let nodes = verifiers
                .iter()
                .map(|url| Ok((url.clone(), VerifierClient::new(channel(url)?))))
                .collect::<anyhow::Result<Vec<_>>>()?;
            if nodes.is_empty() {
                return Err(anyhow!("no verifiers to load (--verifiers)"));
            }
            let fleet = Fleet {
                authority: AuthorityClient::new(channel(authority)?),
                admin: AdminBearer::new(admin_token)?,
                nodes,
            };
            (fleet, None)
        }
    };
    let result = drive(&options, Arc::new(fleet)).await;
    if let Some(cluster) = cluster {
        cluster.shutdown().await.ok();
    }
    result
}

/// Logs every user in, then runs the refresh, verify and theft traffic.
async fn drive(options: &LoginOptions, fleet: Arc<Fleet>) -> anyhow::Result<LoginReport> {
    let login_hist = Arc::new(Mutex::new(histogram()));
    let users = log_in(options, &fleet, &login_hist).await?;
    let logins = users.len() as u64;
    if options.progress {
        eprintln!(
            "login: {} users logged in; {:.0} s of refreshes (every {:.1} s) and scope/step-up checks on {} nodes, {} theft(s)...",
            users.len(),
            options.duration.as_secs_f64(),
            options.refresh_every.as_secs_f64(),
            fleet.nodes.len(),
            options.thefts
        );
    }
    let counters = Arc::new(Counters::default());
    let refresh_hist = Arc::new(Mutex::new(histogram()));
    let verify_hist = Arc::new(Mutex::new(histogram()));
    let start = Instant::now();
    let deadline = start + options.duration;
    let mut tasks = tokio::task::JoinSet::new();
    for user in &users {
        let (user, fleet, counters, hist) = (
            user.clone(),
            fleet.clone(),
            counters.clone(),
            refresh_hist.clone(),
        );
        let every = options.refresh_every;
        tasks.spawn(async move {
            // Spread the users over the period.
            let offset = every.mul_f64(rand::random_range(0.0..1.0));
            let mut next = Instant::now() + offset;
            loop {
                tokio::time::sleep_until(next).await;
                if Instant::now() >= deadline {
                    break;
                }
                next += every;
                let _held = user.refresh_lock.lock().await;
                if user.stolen.load(Ordering::Acquire) {
                    break;
                }
                match refresh(&fleet, &user, &hist).await {
                    Ok(()) => counters.refreshes.fetch_add(1, Ordering::Relaxed),
                    Err(e) => {
                        tracing::warn!(user = %user.subject, error = %e, "an honest refresh failed");
                        counters.refresh_failures.fetch_add(1, Ordering::Relaxed)
                    }
                };
            }
        });
    }
    for _ in 0..options.concurrency.max(1) {
        let (users, fleet, counters, hist) = (
            users.clone(),
            fleet.clone(),
            counters.clone(),
            verify_hist.clone(),
        );
        tasks.spawn(async move {
            while Instant::now() < deadline {
                verify_one(&fleet, &users, &counters, &hist).await;
            }
        });
    }
    let mut thefts = Vec::new();
    let victims = pick_victims(users.len(), options.thefts);
    for (j, victim) in victims.into_iter().enumerate() {
        let at = start
            + options
                .duration
                .mul_f64((j + 1) as f64 / (options.thefts + 1) as f64);
        tokio::time::sleep_until(at).await;
        let theft = steal(&fleet, &users[victim], &refresh_hist, &counters, start).await?;
        if options.progress {
            eprintln!(
                "login: theft at {:.1} s: detected {}, SESSION_REVOKED on every node after {}",
                theft.t,
                theft.detected,
                theft
                    .max_ms
                    .map_or("(not within 10 s)".into(), |ms| format!("{ms:.0} ms"))
            );
        }
        thefts.push(theft);
    }
    while let Some(done) = tasks.join_next().await {
        done.context("a load task panicked")?;
    }
    // Refreshes and verifies stop at the deadline; a theft still being measured may end later.
    let elapsed = options
        .duration
        .as_secs_f64()
        .min(start.elapsed().as_secs_f64())
        .max(1e-3);
    let login = login_hist
        .lock()
        .map(|h| h.value_at_quantile(0.99))
        .unwrap_or(0);
    let (r50, r99, rmax) = refresh_hist
        .lock()
        .map(|h| (h.value_at_quantile(0.5), h.value_at_quantile(0.99), h.max()))
        .unwrap_or_default();
    let v99 = verify_hist
        .lock()
        .map(|h| h.value_at_quantile(0.99))
        .unwrap_or(0);
    let mut revocations = histogram();
    for t in &thefts {
        for n in &t.nodes {
            if let Some(ms) = n.ms {
                revocations.record(((ms * 1000.0) as u64).max(1)).ok();
            }
        }
    }
    let c = &counters;
    let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let bound_ms = options.revocation_bound.as_secs_f64() * 1000.0;
    let theft_detected = thefts.iter().all(|t| t.detected && t.session_ended);
    let revocation_within_bound = thefts
        .iter()
        .all(|t| t.revoked_everywhere && t.max_ms.is_some_and(|ms| ms <= bound_ms));
    let mut report = LoginReport {
        scenario: "login".into(),
        nodes: fleet.nodes.len(),
        users: users.len(),
        duration_seconds: elapsed,
        refresh_every_seconds: options.refresh_every.as_secs_f64(),
        logins,
        login_p99_ms: ms(login),
        refreshes: get(&c.refreshes),
        refreshes_per_second: get(&c.refreshes) as f64 / elapsed,
        refresh_p50_ms: ms(r50),
        refresh_p99_ms: ms(r99),
        refresh_max_ms: ms(rmax),
        refresh_failures: get(&c.refresh_failures),
        verifies: get(&c.verifies),
        verifies_per_second: get(&c.verifies) as f64 / elapsed,
        verify_p99_ms: ms(v99),
        verified_valid: get(&c.valid),
        refused_insufficient_scope: get(&c.insufficient_scope),
        refused_login_too_old: get(&c.login_too_old),
        false_rejects: get(&c.false_rejects),
        false_accepts: get(&c.false_accepts),
        wrong_reasons: get(&c.wrong_reasons),
        verify_errors: get(&c.verify_errors),
        revocation_p50_ms: ms(revocations.value_at_quantile(0.5)),
        revocation_p99_ms: ms(revocations.value_at_quantile(0.99)),
        revocation_max_ms: ms(revocations.max()),
        revocation_bound_ms: bound_ms,
        thefts,
        theft_detected,
        revocation_within_bound,
        passed: false,
        failures: Vec::new(),
    };
    report.failures = failures(&report);
    report.passed = report.failures.is_empty();
    Ok(report)
}

/// What makes a run fail, in words.
fn failures(r: &LoginReport) -> Vec<String> {
    let mut out = Vec::new();
    if r.false_rejects > 0 {
        out.push(format!("{} honest tokens refused", r.false_rejects));
    }
    if r.refresh_failures > 0 {
        out.push(format!("{} honest refreshes failed", r.refresh_failures));
    }
    if r.false_accepts > 0 {
        out.push(format!(
            "{} scope or step-up demands wrongly met",
            r.false_accepts
        ));
    }
    if r.wrong_reasons > 0 {
        out.push(format!(
            "{} refusals with the wrong reason",
            r.wrong_reasons
        ));
    }
    if r.verifies == 0 {
        out.push("no Verify call was answered".into());
    }
    if !r.theft_detected {
        out.push(
            "a replayed refresh token was not detected as theft (or its session lived on)".into(),
        );
    }
    if r.thefts.iter().any(|t| !t.valid_before) {
        out.push("a victim's tokens did not verify everywhere before the theft".into());
    }
    if !r.revocation_within_bound {
        out.push(format!(
            "a node refused the stolen session later than {:.0} ms (max {:.0} ms) or never",
            r.revocation_bound_ms, r.revocation_max_ms
        ));
    }
    out
}

/// Each theft's victim: spread over the users.
fn pick_victims(users: usize, thefts: usize) -> Vec<usize> {
    (0..thefts).map(|j| j * users / thefts.max(1)).collect()
}

/// Starts every user's session (32 at a time).
async fn log_in(
    options: &LoginOptions,
    fleet: &Arc<Fleet>,
    hist: &Arc<Mutex<Histogram<u64>>>,
) -> anyhow::Result<Vec<Arc<User>>> {
    let now = keyfleet_runtime::clock::system_now();
    let sem = Arc::new(tokio::sync::Semaphore::new(32));
    let mut set = tokio::task::JoinSet::new();
    for i in 0..options.users {
        let (fleet, hist, sem) = (fleet.clone(), hist.clone(), sem.clone());
        let audience = options.audience.clone();
        set.spawn(async move {
            let _permit = sem.acquire_owned().await?;
            let write = i % 2 == 0;
            let old_login = i % 4 == 3;
            let subject = format!("login-user-{i}");
            let mut scopes = vec![SCOPE_READ.to_owned()];
            if write {
                scopes.push(SCOPE_WRITE.to_owned());
            }
            let request = StartSessionRequest {
                subject: subject.clone(),
                audience: vec![audience],
                scopes,
                auth_time: if old_login { now - OLD_LOGIN_SECS } else { 0 },
                amr: vec!["pwd".into()],
                ..StartSessionRequest::default()
            };
            let sent = Instant::now();
            let tokens = fleet
                .authority
                .clone()
                .start_session(fleet.admin.authorize(Request::new(request)))
                .await
                .map_err(|s| {
                    anyhow!(
                        "StartSession for {subject}: {} ({:?})",
                        s.message(),
                        s.code()
                    )
                })?
                .into_inner();
            record(&hist, sent);
            anyhow::Ok((
                i,
                Arc::new(User {
                    subject,
                    write,
                    old_login,
                    refresh_lock: tokio::sync::Mutex::new(()),
                    state: Mutex::new(tokens_of(tokens)),
                    stolen: AtomicBool::new(false),
                }),
            ))
        });
    }
    let mut users = Vec::with_capacity(options.users);
    while let Some(done) = set.join_next().await {
        users.push(done.context("a login task panicked")??);
    }
    users.sort_by_key(|(i, _)| *i);
    Ok(users.into_iter().map(|(_, u)| u).collect())
}

fn tokens_of(t: SessionTokens) -> UserTokens {
    UserTokens {
        access: t.access_token,
        refresh: t.refresh_token,
        session_id: t.session_id,
    }
}

/// One refresh of `user`'s session (the caller holds its refresh lock).
async fn refresh(fleet: &Fleet, user: &User, hist: &Mutex<Histogram<u64>>) -> anyhow::Result<()> {
    let refresh_token = user
        .state
        .lock()
        .map_err(|_| anyhow!("poisoned"))?
        .refresh
        .clone();
    let sent = Instant::now();
    let tokens = fleet
        .authority
        .clone()
        .refresh(RefreshRequest {
            refresh_token,
            scopes: Vec::new(),
        })
        .await
        .map_err(|s| anyhow!("Refresh: {} ({:?})", s.message(), s.code()))?
        .into_inner();
    record(hist, sent);
    *user.state.lock().map_err(|_| anyhow!("poisoned"))? = tokens_of(tokens);
    Ok(())
}

/// The checks a caller makes of an access token, with the verdict each must get.
#[derive(Debug, Clone, Copy)]
enum Check {
    /// The scope every user holds.
    Read,
    /// The scope every other user holds.
    Write,
    /// A login no older than a day (old logins are two days old).
    StepUp,
}

/// One Verify of a random user's latest access token on a random node, judged.
async fn verify_one(
    fleet: &Fleet,
    users: &[Arc<User>],
    counters: &Counters,
    hist: &Mutex<Histogram<u64>>,
) {
    let user = &users[rand::random_range(0..users.len())];
    if user.stolen.load(Ordering::Acquire) {
        tokio::task::yield_now().await;
        return;
    }
    let Ok(token) = user.state.lock().map(|s| s.access.clone()) else {
        return;
    };
    let check = match rand::random_range(0..3u8) {
        0 => Check::Read,
        1 => Check::Write,
        _ => Check::StepUp,
    };
    let (required_scopes, max_auth_age_seconds, expect) = match check {
        Check::Read => (vec![SCOPE_READ.to_owned()], 0, Reason::Ok),
        Check::Write => (
            vec![SCOPE_WRITE.to_owned()],
            0,
            if user.write {
                Reason::Ok
            } else {
                Reason::InsufficientScope
            },
        ),
        Check::StepUp => (
            Vec::new(),
            STEP_UP_SECS,
            if user.old_login {
                Reason::LoginTooOld
            } else {
                Reason::Ok
            },
        ),
    };
    let (_, node) = &fleet.nodes[rand::random_range(0..fleet.nodes.len())];
    let request = VerifyRequest {
        token,
        audience: String::new(),
        required_scopes,
        max_auth_age_seconds,
    };
    let sent = Instant::now();
    let answer = node.clone().verify(request).await;
    // A thief may have picked this user while the call was out: its verdict says nothing.
    if user.stolen.load(Ordering::Acquire) {
        return;
    }
    let answer = match answer {
        Ok(a) => a.into_inner(),
        Err(_) => {
            counters.verify_errors.fetch_add(1, Ordering::Relaxed);
            return;
        }
    };
    record(hist, sent);
    counters.verifies.fetch_add(1, Ordering::Relaxed);
    let got = answer.reason();
    let counter = match (expect, answer.valid, got) {
        (Reason::Ok, true, _) => &counters.valid,
        (Reason::Ok, false, _) => {
            tracing::warn!(user = %user.subject, ?check, reason = ?got, detail = %answer.detail, "an honest token was refused");
            &counters.false_rejects
        }
        (_, true, _) => &counters.false_accepts,
        (want, false, got) if want == got => match got {
            Reason::InsufficientScope => &counters.insufficient_scope,
            _ => &counters.login_too_old,
        },
        (_, false, _) => &counters.wrong_reasons,
    };
    counter.fetch_add(1, Ordering::Relaxed);
}

/// A thief steals `victim`'s refresh token (and the access token stored with it); the victim
/// refreshes twice as usual, so the stolen token is spent and is not even the latest spent
/// one (which a retry grace window may accept); then the thief replays it. Measures what the
/// authority answers and when every node refuses both access tokens.
async fn steal(
    fleet: &Fleet,
    victim: &User,
    hist: &Mutex<Histogram<u64>>,
    counters: &Counters,
    start: Instant,
) -> anyhow::Result<Theft> {
    let held = victim.refresh_lock.lock().await;
    let (stolen_refresh, stolen_access, session_id) = {
        let s = victim.state.lock().map_err(|_| anyhow!("poisoned"))?;
        (s.refresh.clone(), s.access.clone(), s.session_id.clone())
    };
    for _ in 0..2 {
        refresh(fleet, victim, hist)
            .await
            .with_context(|| format!("the victim {}'s own refresh", victim.subject))?;
        counters.refreshes.fetch_add(1, Ordering::Relaxed);
    }
    // From here on the victim's traffic is the thief's doing: not judged as honest.
    victim.stolen.store(true, Ordering::Release);
    drop(held);
    let (latest_access, latest_refresh) = {
        let s = victim.state.lock().map_err(|_| anyhow!("poisoned"))?;
        (s.access.clone(), s.refresh.clone())
    };
    let tokens = [latest_access, stolen_access];
    let mut valid_before = true;
    for (_, node) in &fleet.nodes {
        for token in &tokens {
            let r = node.clone().verify(plain(token)).await;
            valid_before &= r.is_ok_and(|a| a.into_inner().valid);
        }
    }
    let t = start.elapsed().as_secs_f64();
    let replayed = Instant::now();
    let replay = fleet
        .authority
        .clone()
        .refresh(RefreshRequest {
            refresh_token: stolen_refresh,
            scopes: Vec::new(),
        })
        .await;
    let (detected, replay_code, replay_message) = match &replay {
        Ok(_) => (
            false,
            "OK".to_owned(),
            "the spent token was accepted".to_owned(),
        ),
        Err(s) => (
            s.code() == Code::Unauthenticated,
            format!("{:?}", s.code()).to_uppercase(),
            s.message().to_owned(),
        ),
    };
    // Every node, polled at once, until it refuses both tokens with SESSION_REVOKED.
    let polls = fleet.nodes.iter().map(|(url, node)| {
        let (url, node, tokens) = (url.clone(), node.clone(), tokens.clone());
        async move {
            let mut last_reason = String::new();
            let mut done = [false, false];
            while replayed.elapsed() < REVOCATION_TIMEOUT {
                for (i, token) in tokens.iter().enumerate() {
                    if done[i] {
                        continue;
                    }
                    if let Ok(a) = node.clone().verify(plain(token)).await {
                        let a = a.into_inner();
                        done[i] = !a.valid && a.reason() == Reason::SessionRevoked;
                        if i == 0 {
                            last_reason = a.reason().as_str_name().to_owned();
                        }
                    }
                }
                if done == [true, true] {
                    let ms = replayed.elapsed().as_secs_f64() * 1000.0;
                    return NodeRevocation {
                        node: url,
                        ms: Some(ms),
                        last_reason,
                    };
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            NodeRevocation {
                node: url,
                ms: None,
                last_reason,
            }
        }
    });
    let nodes = join_all(polls).await?;
    // The whole session ended: the victim's latest refresh token (never spent) is dead too.
    let after = fleet
        .authority
        .clone()
        .refresh(RefreshRequest {
            refresh_token: latest_refresh,
            scopes: Vec::new(),
        })
        .await;
    let session_ended = matches!(&after, Err(s) if s.code() == Code::Unauthenticated);
    let end_reason = fleet
        .authority
        .clone()
        .list_sessions(fleet.admin.authorize(Request::new(ListSessionsRequest {
            subject: victim.subject.clone(),
        })))
        .await
        .ok()
        .and_then(|r| {
            r.into_inner()
                .sessions
                .into_iter()
                .find(|s| s.session_id == session_id)
        })
        .map(|s| s.end_reason)
        .unwrap_or_default();
    let revoked_everywhere = nodes.iter().all(|n| n.ms.is_some());
    let max_ms = if revoked_everywhere {
        nodes.iter().filter_map(|n| n.ms).reduce(f64::max)
    } else {
        None
    };
    Ok(Theft {
        victim: victim.subject.clone(),
        session_id,
        t,
        valid_before,
        detected,
        replay_code,
        replay_message,
        session_ended,
        end_reason,
        nodes,
        revoked_everywhere,
        max_ms,
    })
}

fn plain(token: &str) -> VerifyRequest {
    VerifyRequest {
        token: token.to_owned(),
        ..VerifyRequest::default()
    }
}

/// Runs every future at once (a task each) and collects their outputs in order.
async fn join_all<F>(futures: impl IntoIterator<Item = F>) -> anyhow::Result<Vec<F::Output>>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futures.into_iter().map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        out.push(h.await.context("a node poll task panicked")?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn victims_are_distinct_and_spread() {
        assert_eq!(pick_victims(200, 1), vec![0]);
        assert_eq!(pick_victims(200, 4), vec![0, 50, 100, 150]);
        let v = pick_victims(3, 3);
        assert_eq!(v, vec![0, 1, 2]);
    }
}
