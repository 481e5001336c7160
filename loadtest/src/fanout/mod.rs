//! The fan-out benchmark (`keyfleet loadtest fanout --watchers N`): holds N `WatchJwks`
//! streams in this process with lean clients ([`watcher`]), directly on an authority or through
//! a tier of relays, triggers token revocations and key rotations through the admin API, and
//! measures what one change costs at fleet scale: push latency to every watcher, the
//! authority's (and the relays') CPU per delivered update, bytes per watcher per change,
//! memory per watcher, and what a node that missed a change gets when it comes back.
//!
//! The authority is, by default, a child process (`keyfleet authority` from this executable,
//! on loopback, with a temporary data dir), so its CPU and memory are read from
//! `/proc/<pid>` apart from the client's ([`crate::cpu::process_sample`]).
//!
//! Bytes are the messages' encoded protobuf lengths as received; on the wire each message adds
//! 5 bytes of gRPC framing and 9 of an HTTP/2 DATA frame (and TLS, when used).

mod report;
mod servers;
mod watcher;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use keyfleet_authority::client::AdminClient;
use keyfleet_feed::FeedState;
use keyfleet_proto::v1::GetJwksRequest;
use keyfleet_proto::v1::authority_client::AuthorityClient;
use keyfleet_runtime::CancellationToken;
use keyfleet_runtime::client::Settings;
use keyfleet_runtime::tls::ClientTls;
use prost::Message as _;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tonic::transport::Channel;

use crate::cpu::{ProcessSample, process_sample};
pub use report::{ChangeReport, FanoutReport, KindSummary, ReconnectReport, TierCost};
pub use watcher::CountersSnapshot;
use watcher::Fleet;

/// `keyfleet loadtest fanout`'s defaults.
pub const DEFAULT_WATCHERS: usize = 1000;
pub const DEFAULT_REVOCATIONS: usize = 20;
pub const DEFAULT_ROTATIONS: usize = 2;
pub const DEFAULT_STREAMS_PER_CONNECTION: usize = 1;
pub const DEFAULT_RECONNECTS: usize = 10;
pub const DEFAULT_MAX_OPENING: usize = 128;
pub const DEFAULT_RAMP_TIMEOUT: Duration = Duration::from_secs(600);
pub const DEFAULT_CHANGE_TIMEOUT: Duration = Duration::from_secs(60);
pub const DEFAULT_PAUSE: Duration = Duration::from_millis(200);
/// HTTP/2 streams a keyfleet server allows per connection.
pub const MAX_STREAMS_PER_CONNECTION: usize = 256;
/// How long the held fleet is watched doing nothing, for the idle CPU (a whole heartbeat
/// period, so every watcher's heartbeat falls in it once).
const IDLE_WINDOW: Duration = watcher::HEARTBEAT;
/// How often the coordinator looks whether every watcher holds a version.
const POLL: Duration = Duration::from_millis(2);

/// Where the authority comes from.
#[derive(Debug, Clone)]
pub enum AuthoritySource {
    /// Start `program authority` (the `keyfleet` binary) as a child process on loopback.
    Spawn,
    /// An authority already running: its URL, credentials, and its pid when it runs on this
    /// machine (for its CPU and memory; without it they are not measured).
    Remote {
        url: String,
        admin_token: String,
        node_token_file: PathBuf,
        pid: Option<u32>,
    },
}

/// What a fan-out run does.
#[derive(Debug, Clone)]
pub struct FanoutOptions {
    pub watchers: usize,
    pub revocations: usize,
    pub rotations: usize,
    /// Token revocations made before the watchers connect (a long deny list).
    pub preload_revocations: usize,
    /// Relays (`keyfleet verifier --serve-watch`, child processes) the watchers spread over;
    /// 0: every watcher on the authority.
    pub relays: usize,
    /// Watch streams per HTTP/2 connection (1: one connection per watcher, like a fleet).
    pub streams_per_connection: usize,
    /// Nodes that disconnect, miss one change, and come back naming what they hold.
    pub reconnects: usize,
    pub authority: AuthoritySource,
    /// The `keyfleet` binary (for a spawned authority and for relays).
    pub program: Option<PathBuf>,
    pub tls: ClientTls,
    /// Streams being opened at once (a server refuses opens past its own bound).
    pub max_opening: usize,
    pub ramp_timeout: Duration,
    pub change_timeout: Duration,
    /// Wait between one change reaching everyone and the next.
    pub pause: Duration,
    /// Progress lines on stderr.
    pub progress: bool,
}

impl Default for FanoutOptions {
    fn default() -> FanoutOptions {
        FanoutOptions {
            watchers: DEFAULT_WATCHERS,
            revocations: DEFAULT_REVOCATIONS,
            rotations: DEFAULT_ROTATIONS,
            preload_revocations: 0,
            relays: 0,
            streams_per_connection: DEFAULT_STREAMS_PER_CONNECTION,
            reconnects: DEFAULT_RECONNECTS,
            authority: AuthoritySource::Spawn,
            program: None,
            tls: ClientTls::default(),
            max_opening: DEFAULT_MAX_OPENING,
            ramp_timeout: DEFAULT_RAMP_TIMEOUT,
            change_timeout: DEFAULT_CHANGE_TIMEOUT,
            pause: DEFAULT_PAUSE,
            progress: false,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Change {
    Revocation,
    Rotation,
}

impl Change {
    fn name(self) -> &'static str {
        match self {
            Change::Revocation => "revocation",
            Change::Rotation => "rotation",
        }
    }
}

/// The revocations with the rotations spread evenly among them.
fn schedule(revocations: usize, rotations: usize) -> Vec<Change> {
    let total = revocations + rotations;
    let mut out = vec![Change::Revocation; revocations];
    for k in (1..=rotations).rev() {
        let at = (k * total / (rotations + 1)).min(out.len());
        out.insert(at, Change::Rotation);
    }
    out
}

/// The processes measured: the authority (when its pid is known) and the relays.
struct Measured {
    authority: Option<u32>,
    relays: Vec<u32>,
}

impl Measured {
    fn authority(&self) -> Option<ProcessSample> {
        self.authority.and_then(process_sample)
    }
    fn relays(&self) -> Option<ProcessSample> {
        if self.relays.is_empty() {
            return None;
        }
        Some(ProcessSample::sum(
            self.relays.iter().filter_map(|p| process_sample(*p)),
        ))
    }
}

fn progress(on: bool, text: impl FnOnce() -> String) {
    if on {
        eprintln!("[fanout] {}", text());
    }
}

/// Raises this process's open-files limit (and so the child servers') to fit `needed`
/// descriptors: the soft limit to the hard one, and the hard one too when allowed (root).
/// Returns the limit now in force.
fn raise_fd_limit(needed: u64) -> u64 {
    let soft = rlimit::increase_nofile_limit(u64::MAX).unwrap_or(1024);
    if soft >= needed {
        return soft;
    }
    let ceiling = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(needed);
    let want = needed.min(ceiling);
    if rlimit::Resource::NOFILE.set(want, want).is_ok() {
        return want;
    }
    soft
}

/// Runs the benchmark.
pub async fn run(options: FanoutOptions) -> anyhow::Result<FanoutReport> {
    let o = &options;
    if o.watchers == 0 {
        bail!("--watchers must be at least 1");
    }
    if !(1..=MAX_STREAMS_PER_CONNECTION).contains(&o.streams_per_connection) {
        bail!(
            "--connections must be between 1 and {MAX_STREAMS_PER_CONNECTION} (a server's streams per connection)"
        );
    }
    let connections = o.watchers.div_ceil(o.streams_per_connection);
    let mut notes = Vec::new();
    // This process holds every client connection; a spawned authority (or relay) inherits the
    // limit and holds the server side.
    let fd_limit = raise_fd_limit(connections as u64 + 1024);
    if fd_limit < connections as u64 + 256 {
        notes.push(format!(
            "the open-files limit is {fd_limit}, too low for {connections} connections: use --connections to put more streams on each"
        ));
    }

    // The authority.
    let program = || {
        o.program
            .clone()
            .ok_or_else(|| anyhow!("no keyfleet binary to start servers from"))
    };
    let (local, url, admin_token, node_token_file, authority_pid) = match &o.authority {
        AuthoritySource::Spawn => {
            progress(o.progress, || "starting a local authority".into());
            let local = servers::start_authority(&program()?, o.watchers + o.relays).await?;
            let (url, admin, node, pid) = (
                local.server.grpc_url.clone(),
                local.admin_token.clone(),
                local.node_token_file.clone(),
                local.server.pid,
            );
            (Some(local), url, admin, node, Some(pid))
        }
        AuthoritySource::Remote {
            url,
            admin_token,
            node_token_file,
            pid,
        } => (
            None,
            url.clone(),
            admin_token.clone(),
            node_token_file.clone(),
            *pid,
        ),
    };
    if authority_pid.is_none() {
        notes.push("the authority's CPU and memory were not measured: give its pid (--authority-pid) when it runs on this machine".into());
    }
    let node_token = std::fs::read_to_string(&node_token_file)
        .with_context(|| format!("reading the node token {}", node_token_file.display()))?;
    let admin = AdminClient::connect(&url, &o.tls, &Settings::COMMAND, &admin_token)
        .await
        .with_context(|| format!("connecting to the authority at {url}"))?;
    // Connected now: an authority full of watch streams may accept no new connection later.
    let mut jwks = AuthorityClient::new(
        keyfleet_runtime::client::connect(&url, &o.tls, &Settings::COMMAND)
            .await
            .with_context(|| format!("connecting to the authority at {url}"))?,
    );
    let run_id = rand::random::<u32>();

    for i in 0..o.preload_revocations {
        if o.progress && i % 1000 == 0 {
            progress(true, || {
                format!("preloading revocations: {i}/{}", o.preload_revocations)
            });
        }
        admin
            .revoke_token(&format!("fanout-{run_id:08x}-pre-{i}"), 0)
            .await
            .context("preloading a revocation")?;
    }

    // The relays.
    let mut relays = Vec::new();
    for i in 0..o.relays {
        progress(o.progress, || {
            format!("starting relay {}/{}", i + 1, o.relays)
        });
        relays.push(
            servers::start_relay(
                &program()?,
                i,
                &url,
                &node_token_file,
                o.watchers.div_ceil(o.relays),
            )
            .await?,
        );
    }
    let measured = Measured {
        authority: authority_pid,
        relays: relays.iter().map(|r| r.pid).collect(),
    };
    // The servers settle (the relays hold the key set) before the baseline.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let authority_before = measured.authority();
    let relays_before = measured.relays();

    // Ramp: every stream opened, each holding the key set.
    let fleet = Arc::new(Fleet::new(
        o.watchers,
        &format!("fanout-{run_id:08x}"),
        Some(&node_token),
    )?);
    let stop = CancellationToken::new();
    let opening = Arc::new(Semaphore::new(o.max_opening.max(1)));
    let mut channels = Vec::with_capacity(connections);
    for c in 0..connections {
        let target = if relays.is_empty() {
            url.clone()
        } else {
            relays[c % relays.len()].grpc_url.clone()
        };
        let endpoint = keyfleet_runtime::client::endpoint(&target, &o.tls, &Settings::UPSTREAM)?;
        channels.push(
            endpoint
                .local_address(source_address(&target, c, o.streams_per_connection))
                .connect_lazy(),
        );
    }
    let channel_of = |i: usize| channels[i / o.streams_per_connection].clone();
    progress(o.progress, || {
        format!(
            "opening {} watch streams over {connections} connections",
            o.watchers
        )
    });
    let ramp_start = Instant::now();
    let mut tasks: Vec<(CancellationToken, JoinHandle<()>)> = (0..o.watchers)
        .map(|i| spawn_watcher(&fleet, i, channel_of(i), &opening, &stop))
        .collect();
    let held = wait_for(
        &fleet,
        1,
        o.watchers,
        o.ramp_timeout,
        o.progress.then_some("held"),
    )
    .await;
    let ramp_seconds = ramp_start.elapsed().as_secs_f64();
    progress(o.progress, || {
        format!("{held}/{} held in {ramp_seconds:.2} s", o.watchers)
    });
    if held < o.watchers {
        notes.push(format!(
            "only {held} of {} watchers held the key set within {}s; the rest were stopped and the figures are for {held} (see the errors; a keyfleet server accepts at most 8192 gRPC connections, so put more streams on each with --connections)",
            o.watchers,
            o.ramp_timeout.as_secs()
        ));
    }
    // Streams still opening would load the servers all through the measurements: they stop.
    for (i, (token, _)) in tasks.iter().enumerate() {
        if fleet.slots[i]
            .version
            .load(std::sync::atomic::Ordering::Acquire)
            == 0
        {
            token.cancel();
        }
    }
    // Allocations settle; then memory with every watcher held, and the idle CPU.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let authority_held = measured.authority();
    let relays_held = measured.relays();
    let idle_start = (Instant::now(), measured.authority(), measured.relays());
    tokio::time::sleep(IDLE_WINDOW).await;
    let idle_secs = idle_start.0.elapsed().as_secs_f64();
    let idle_rate =
        |before: Option<ProcessSample>, after: Option<ProcessSample>| match (before, after) {
            (Some(b), Some(a)) => a.cpu_ns.saturating_sub(b.cpu_ns) as f64 / idle_secs,
            _ => 0.0,
        };
    let authority_idle = idle_rate(idle_start.1, measured.authority());
    let relays_idle = idle_rate(idle_start.2, measured.relays());

    // Changes, one at a time: each from the admin call until every held watcher has it.
    let plan = schedule(o.revocations, o.rotations);
    fleet.clear_events();
    let counters_before = fleet.counters();
    let version_before = admin.list_keys().await?.version;
    let authority_start = measured.authority();
    let relays_start = measured.relays();
    let client_start = process_sample(std::process::id());
    let change_start = Instant::now();
    let mut changes = Vec::new();
    let mut latencies: [Vec<Duration>; 2] = [Vec::new(), Vec::new()];
    for (n, change) in plan.iter().enumerate() {
        let before = fleet.counters();
        let start = Instant::now();
        let version = match change {
            Change::Revocation => {
                // 23 characters, about an authority-minted jti (22: base64url of 16 bytes).
                admin
                    .revoke_token(&format!("fanout-{run_id:08x}-{n:07}"), 0)
                    .await
                    .context("revoking a token")?
                    .version
            }
            Change::Rotation => {
                let kid = admin.rotate().await.context("rotating")?.promoting_kid;
                let deadline = start + o.change_timeout;
                loop {
                    if let Some(v) = fleet.first_version_with_active(&kid) {
                        break v;
                    }
                    if Instant::now() >= deadline {
                        bail!(
                            "the rotation to {kid} reached no watcher within {:?}",
                            o.change_timeout
                        );
                    }
                    tokio::time::sleep(POLL).await;
                }
            }
        };
        let reached = wait_for(&fleet, version, held, o.change_timeout, None).await;
        let mut samples = fleet.collect_latencies(0..o.watchers, start, version);
        let (p50, p99, max) = report::percentiles(&mut samples);
        latencies[(*change == Change::Rotation) as usize].extend(samples);
        let during = fleet.counters().since(&before);
        let per = |b: u64| b as f64 / held.max(1) as f64;
        changes.push(ChangeReport {
            kind: change.name(),
            version,
            reached,
            p50_ms: p50,
            p99_ms: p99,
            max_ms: max,
            delta_bytes_per_watcher: per(during.delta_bytes),
            full_bytes_per_watcher: per(during.full_bytes),
            deltas: during.delta_messages,
            full_snapshots: during.full_messages,
        });
        progress(o.progress, || {
            format!(
                "{}/{} {} v{version}: {reached}/{held} in p50 {p50:.1} ms p99 {p99:.1} ms max {max:.1} ms, {:.0} B per watcher",
                n + 1,
                plan.len(),
                change.name(),
                per(during.delta_bytes + during.full_bytes)
            )
        });
        if reached < held {
            notes.push(format!(
                "{} to v{version}: only {reached} of {held} watchers got it within {:?}",
                change.name(),
                o.change_timeout
            ));
        }
        tokio::time::sleep(o.pause).await;
    }
    let change_seconds = change_start.elapsed().as_secs_f64();
    let authority_end = measured.authority();
    let relays_end = measured.relays();
    let client_cpu_ns = match (client_start, process_sample(std::process::id())) {
        (Some(a), Some(b)) => b.cpu_ns.saturating_sub(a.cpu_ns),
        _ => 0,
    };
    let change_phase = fleet.counters().since(&counters_before);
    let version_after = changes.last().map_or(version_before, |c| c.version);
    let versions = fleet.versions_between(version_before, version_after) as u64;

    // Nodes that miss one change and come back.
    let reconnect = if o.reconnects > 0 && held > o.reconnects {
        Some(
            reconnect(
                &fleet,
                &admin,
                &mut tasks,
                &channel_of,
                &opening,
                &stop,
                o,
                run_id,
                held,
            )
            .await?,
        )
    } else {
        None
    };

    // The end: every watcher on the authority's newest state.
    let mut request = tonic::Request::new(GetJwksRequest::default());
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {}", node_token.trim())
            .parse()
            .map_err(|_| anyhow!("the node token cannot be sent in a header"))?,
    );
    let snapshot = jwks.get_jwks(request).await?.into_inner();
    let final_state = FeedState::from_snapshot(&snapshot);
    let final_digest = final_state.digest();
    wait_for(&fleet, snapshot.version, held, o.change_timeout, None).await;
    let final_matching = fleet
        .slots
        .iter()
        .filter(|s| {
            s.held()
                .is_some_and(|h| h.version == snapshot.version && h.digest == final_digest)
        })
        .count();

    stop.cancel();
    for (_, task) in tasks {
        let _ = task.await;
    }
    drop(channels);
    let mut alive = true;
    for r in &mut relays {
        alive &= r.is_running();
    }
    if let Some(l) = &local {
        let _ = &l.server;
    }
    if !alive {
        notes.push("a relay exited during the run".into());
    }

    let direct = o.relays == 0;
    // Behind relays the authority delivers to the relays only, but still tracks every node
    // (the relays report them): its memory is per node, its CPU also per node update.
    let authority = tier(
        [
            authority_before,
            authority_held,
            authority_start,
            authority_end,
        ],
        authority_idle,
        change_seconds,
        held,
        if direct {
            change_phase.messages()
        } else {
            versions * o.relays as u64
        },
        change_phase.messages(),
        measured.authority.is_some() as usize,
    );
    let relay_tier = (!direct).then(|| {
        tier(
            [relays_before, relays_held, relays_start, relays_end],
            relays_idle,
            change_seconds,
            held,
            change_phase.messages(),
            change_phase.messages(),
            o.relays,
        )
    });
    let summary = |kind: Change, all: &mut Vec<Duration>| {
        let of_kind: Vec<&ChangeReport> =
            changes.iter().filter(|c| c.kind == kind.name()).collect();
        let (p50, p99, max) = report::percentiles(all);
        let bytes = |c: &ChangeReport| c.delta_bytes_per_watcher + c.full_bytes_per_watcher;
        KindSummary {
            changes: of_kind.len(),
            p50_ms: p50,
            p99_ms: p99,
            max_ms: max,
            bytes_per_watcher: if of_kind.is_empty() {
                0.0
            } else {
                of_kind.iter().map(|c| bytes(c)).sum::<f64>() / of_kind.len() as f64
            },
            last_bytes_per_watcher: of_kind.last().map_or(0.0, |c| bytes(c)),
        }
    };
    let [mut revocation_latencies, mut rotation_latencies] = latencies;
    let revocations = summary(Change::Revocation, &mut revocation_latencies);
    let rotations = summary(Change::Rotation, &mut rotation_latencies);
    Ok(FanoutReport {
        watchers: o.watchers,
        held,
        relays: o.relays,
        streams_per_connection: o.streams_per_connection,
        connections,
        preloaded_revocations: o.preload_revocations,
        ramp_seconds,
        authority,
        relay_tier,
        changes,
        revocations,
        rotations,
        change_seconds,
        client_cpu_us_per_update: client_cpu_ns as f64
            / change_phase.messages().max(1) as f64
            / 1e3,
        reconnect,
        final_version: snapshot.version,
        full_snapshot_bytes: snapshot.encoded_len(),
        deny_list_entries: snapshot.revoked_tokens.len(),
        final_matching,
        change_phase,
        total: fleet.counters(),
        errors: fleet.errors(),
        notes,
    })
}

fn spawn_watcher(
    fleet: &Arc<Fleet>,
    index: usize,
    channel: Channel,
    opening: &Arc<Semaphore>,
    stop: &CancellationToken,
) -> (CancellationToken, JoinHandle<()>) {
    let mine = stop.child_token();
    let task = tokio::spawn(
        fleet
            .clone()
            .run(index, channel, opening.clone(), mine.clone()),
    );
    (mine, task)
}

/// Streams sent from one source address at most: servers cap the streams one peer address may
/// hold (1,000 by default), as a real fleet's nodes each have their own address.
const STREAMS_PER_SOURCE: usize = 500;

/// The source address of connection `c` to a loopback `target`: 127.0.1.0 onwards, so that
/// each address carries at most [`STREAMS_PER_SOURCE`] streams (and has its own ephemeral
/// ports). `None` (the system's choice) for other targets.
fn source_address(
    target: &str,
    c: usize,
    streams_per_connection: usize,
) -> Option<std::net::IpAddr> {
    let host = target.split("://").nth(1)?.split(':').next()?;
    let ip: std::net::Ipv4Addr = host.parse().ok()?;
    if !ip.is_loopback() {
        return None;
    }
    let per_source = (STREAMS_PER_SOURCE / streams_per_connection).max(1);
    let index = u32::try_from(c / per_source).ok()?;
    Some(std::net::Ipv4Addr::from(u32::from(std::net::Ipv4Addr::new(127, 0, 1, 0)) + index).into())
}

/// Waits (at most `timeout`) until `want` watchers hold `version` or newer; returns how many
/// do. With `label`, prints progress every second.
async fn wait_for(
    fleet: &Fleet,
    version: u64,
    want: usize,
    timeout: Duration,
    label: Option<&str>,
) -> usize {
    let start = Instant::now();
    let mut next_line = start + Duration::from_secs(1);
    loop {
        let n = fleet.holding(version);
        let now = Instant::now();
        if n >= want || now >= start + timeout {
            return n;
        }
        if let Some(label) = label
            && now >= next_line
        {
            let c = fleet.counters();
            eprintln!(
                "[fanout] {n}/{want} {label} after {:.0} s ({} failed opens retried, {} stream errors)",
                (now - start).as_secs_f64(),
                c.open_errors,
                c.stream_errors
            );
            next_line = now + Duration::from_secs(1);
        }
        tokio::time::sleep(POLL).await;
    }
}

/// `reconnects` watchers disconnect, one token revocation happens without them, and they
/// reconnect naming the version and digest they hold: each should get exactly one delta.
#[allow(clippy::too_many_arguments)]
async fn reconnect(
    fleet: &Arc<Fleet>,
    admin: &AdminClient,
    tasks: &mut [(CancellationToken, JoinHandle<()>)],
    channel_of: &dyn Fn(usize) -> Channel,
    opening: &Arc<Semaphore>,
    stop: &CancellationToken,
    o: &FanoutOptions,
    run_id: u32,
    held: usize,
) -> anyhow::Result<ReconnectReport> {
    let k = o.reconnects;
    let chosen: Vec<usize> = (0..k)
        .map(|j| j * o.watchers / k)
        .filter(|i| {
            fleet.slots[*i]
                .version
                .load(std::sync::atomic::Ordering::Acquire)
                > 0
        })
        .collect();
    progress(o.progress, || {
        format!(
            "{} watchers disconnect, miss one revocation, and come back",
            chosen.len()
        )
    });
    for &i in &chosen {
        let (token, task) = &mut tasks[i];
        token.cancel();
        let _ = task.await;
    }
    let version = admin
        .revoke_token(&format!("fanout-{run_id:08x}-missed"), 0)
        .await
        .context("revoking a token while nodes are away")?
        .version;
    wait_for(fleet, version, held - chosen.len(), o.change_timeout, None).await;
    for &i in &chosen {
        fleet.resume_next(i);
        tasks[i] = spawn_watcher(fleet, i, channel_of(i), opening, stop);
    }
    wait_for(fleet, version, held, o.change_timeout, None).await;
    let firsts: Vec<_> = chosen
        .iter()
        .filter_map(|&i| fleet.first_after_resume(i))
        .collect();
    let deltas = firsts.iter().filter(|f| !f.full).count();
    let report = ReconnectReport {
        nodes: chosen.len(),
        deltas,
        full_snapshots: firsts.len() - deltas,
        caught_up_in_one: firsts.iter().filter(|f| f.version >= version).count(),
        first_message_bytes: if firsts.is_empty() {
            0.0
        } else {
            firsts.iter().map(|f| f.bytes as f64).sum::<f64>() / firsts.len() as f64
        },
    };
    fleet.clear_events();
    Ok(report)
}

/// One tier's cost from its samples (before the ramp, with every watcher held, at the start
/// and at the end of the change phase): memory per node of `nodes`, CPU per update it
/// delivered (`updates`) and per update the nodes received (`node_updates`).
fn tier(
    samples: [Option<ProcessSample>; 4],
    idle_ns_per_s: f64,
    change_seconds: f64,
    nodes: usize,
    updates: u64,
    node_updates: u64,
    processes: usize,
) -> TierCost {
    let [Some(before), Some(held), Some(start), Some(end)] = samples else {
        return TierCost {
            updates_delivered: updates,
            ..TierCost::default()
        };
    };
    let cpu = end.cpu_ns.saturating_sub(start.cpu_ns);
    let net = (cpu as f64 - idle_ns_per_s * change_seconds).max(0.0);
    let per = |ns: f64, n: u64| ns / n.max(1) as f64 / 1e3;
    TierCost {
        processes,
        rss_before_bytes: before.rss_bytes,
        rss_held_bytes: held.rss_bytes,
        rss_per_watcher_bytes: (held.rss_bytes as f64 - before.rss_bytes as f64)
            / nodes.max(1) as f64,
        change_cpu_ns: cpu,
        idle_cpu_ns_per_second: idle_ns_per_s,
        updates_delivered: updates,
        cpu_us_per_update: per(cpu as f64, updates),
        cpu_us_per_update_net_of_idle: per(net, updates),
        cpu_us_per_node_update: per(cpu as f64, node_updates),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotations_are_spread_among_the_revocations() {
        let plan = schedule(20, 2);
        assert_eq!(plan.len(), 22);
        let at: Vec<usize> = plan
            .iter()
            .enumerate()
            .filter(|(_, c)| **c == Change::Rotation)
            .map(|(i, _)| i)
            .collect();
        assert_eq!(at.len(), 2);
        assert!(at[0] > 0 && at[1] > at[0] + 1 && at[1] < 21, "{at:?}");
        assert_eq!(schedule(0, 1), vec![Change::Rotation]);
        assert_eq!(schedule(2, 0), vec![Change::Revocation; 2]);
    }

    #[test]
    fn loopback_connections_spread_over_source_addresses() {
        let at = |c, per| source_address("http://127.0.0.1:7000", c, per).map(|a| a.to_string());
        assert_eq!(at(0, 1).as_deref(), Some("127.0.1.0"));
        assert_eq!(at(499, 1).as_deref(), Some("127.0.1.0"));
        assert_eq!(at(500, 1).as_deref(), Some("127.0.1.1"));
        assert_eq!(at(1, 256).as_deref(), Some("127.0.1.1"));
        assert_eq!(at(300 * 500, 1).as_deref(), Some("127.0.2.44"));
        assert_eq!(source_address("https://authority.example:7000", 0, 1), None);
    }
}
