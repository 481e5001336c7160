//! `keyfleet loadtest`: the command line of the load generator in `keyfleet-loadtest`. Exit 0
//! when no legitimate token was refused and no bad token accepted, 1 otherwise.
//! `keyfleet loadtest fanout`: the fan-out benchmark (`keyfleet_loadtest::fanout`). Exit 0 when
//! every watcher got every change and ended on the authority's state, 1 otherwise.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand, ValueEnum};
use keyfleet_loadtest::fanout::{self, AuthoritySource, FanoutOptions};
use keyfleet_loadtest::login::LoginOptions;
use keyfleet_loadtest::{Invalid, Load, LoadOptions, Pick, Target, engine};
use keyfleet_runtime::parse_duration;

use crate::cli::{AdminCred, ClientTlsArgs, default_duration};
use crate::exit::CliError;

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum InvalidArg {
    Any,
    Forged,
    Expired,
    WrongAudience,
    UnknownKid,
}

/// What traffic `keyfleet loadtest` sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ScenarioArg {
    /// Verify traffic with tokens of known verdicts (rotations, node kills, bad tokens).
    Verify,
    /// Persistent login: users log in, refresh on a schedule and are checked with scopes and
    /// step-up demands; a thief replays a spent refresh token mid-run and the report shows the
    /// theft detected and the session refused (SESSION_REVOKED) on every node, and how fast.
    Login,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum PickArg {
    Random,
    RoundRobin,
}

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct LoadtestArgs {
    #[command(subcommand)]
    pub benchmark: Option<Benchmark>,
    /// Which traffic: `verify` (tokens of known verdicts) or `login` (sessions: logins,
    /// refreshes, scope and step-up checks, a stolen refresh token replayed; see --users,
    /// --refresh-every, --thefts, --revocation-bound).
    #[arg(long, env = "KEYFLEET_SCENARIO", value_enum, default_value = "verify")]
    pub scenario: ScenarioArg,
    /// Login scenario: users that log in (one session each).
    #[arg(long, env = "KEYFLEET_USERS", default_value_t = keyfleet_loadtest::login::DEFAULT_USERS)]
    pub users: usize,
    /// Login scenario: each user refreshes this often (keep it below the access tokens' ttl).
    #[arg(long, env = "KEYFLEET_REFRESH_EVERY", default_value = default_duration(keyfleet_loadtest::login::DEFAULT_REFRESH_EVERY), value_parser = parse_duration)]
    pub refresh_every: Duration,
    /// Login scenario: stolen refresh tokens replayed during the run (each a different victim).
    #[arg(long, env = "KEYFLEET_THEFTS", default_value_t = keyfleet_loadtest::login::DEFAULT_THEFTS)]
    pub thefts: usize,
    /// Login scenario: from the replay of a stolen refresh token until every node refuses the
    /// session's access tokens (SESSION_REVOKED) may take at most this long (exit 1 otherwise).
    #[arg(long, env = "KEYFLEET_REVOCATION_BOUND", default_value = default_duration(keyfleet_loadtest::login::DEFAULT_REVOCATION_BOUND), value_parser = parse_duration)]
    pub revocation_bound: Duration,
    /// gRPC URL of the authority that mints the tokens (needs the admin credential).
    #[arg(long, env = "KEYFLEET_AUTHORITY", required_unless_present = "local")]
    pub authority: Option<String>,
    /// gRPC URLs of the verifiers to load, comma-separated.
    #[arg(
        long,
        env = "KEYFLEET_VERIFIERS",
        value_delimiter = ',',
        required_unless_present = "local"
    )]
    pub verifiers: Vec<String>,
    /// Start an authority and N verifiers on loopback (regions a and b) instead.
    #[arg(long, env = "KEYFLEET_LOCAL", conflicts_with_all = ["authority", "verifiers"], value_parser = clap::value_parser!(u16).range(1..=64))]
    pub local: Option<u16>,
    /// How long to load.
    #[arg(long, env = "KEYFLEET_DURATION", default_value = default_duration(engine::DEFAULT_DURATION), value_parser = parse_duration)]
    pub duration: Duration,
    /// Open loop: this many requests per second, latency measured from the intended send time.
    #[arg(long, env = "KEYFLEET_RATE", conflicts_with = "concurrency")]
    pub rate: Option<u64>,
    /// Closed loop: this many requests in flight (the default, unless --rate).
    #[arg(long, env = "KEYFLEET_CONCURRENCY", default_value_t = engine::DEFAULT_CONCURRENCY)]
    pub concurrency: usize,
    /// Legitimate tokens in the pool (minted before the run; fresh ones replace some during it).
    #[arg(long, env = "KEYFLEET_TOKENS", default_value_t = engine::DEFAULT_TOKENS)]
    pub tokens: usize,
    /// How each request picks its node.
    #[arg(long, env = "KEYFLEET_PICK", value_enum, default_value = "random")]
    pub pick: PickArg,
    /// gRPC connections to each node.
    #[arg(long, env = "KEYFLEET_CONNECTIONS_PER_NODE", default_value_t = engine::DEFAULT_CONNECTIONS_PER_NODE)]
    pub connections_per_node: usize,
    /// Rotate the keys this often (RotateKeys on the authority).
    #[arg(long, env = "KEYFLEET_ROTATE_EVERY", value_parser = parse_duration)]
    pub rotate_every: Option<Duration>,
    /// With --local: kill a random verifier this often and start it again shortly after.
    #[arg(long, env = "KEYFLEET_KILL_EVERY", value_parser = parse_duration, requires = "local")]
    pub kill_every: Option<Duration>,
    /// Share of requests carrying a token that must be refused (forged, expired, wrong
    /// audience, unknown kid).
    #[arg(long, env = "KEYFLEET_INVALID_RATIO", default_value_t = engine::DEFAULT_INVALID_RATIO)]
    pub invalid_ratio: f64,
    /// Which tokens that must be refused: any kind, or only one (e.g. unknown-kid for a flood
    /// of made-up kids).
    #[arg(long, env = "KEYFLEET_INVALID_KIND", value_enum, default_value = "any")]
    pub invalid_kind: InvalidArg,
    /// Audience minted into the tokens and asked for in Verify.
    #[arg(long, env = "KEYFLEET_AUDIENCE", default_value = engine::DEFAULT_AUDIENCE)]
    pub audience: String,
    /// The verifiers' clock leeway: expired tokens are sent only once surely refused.
    #[arg(long, env = "KEYFLEET_LEEWAY", default_value = default_duration(keyfleet_verifier::DEFAULT_LEEWAY), value_parser = parse_duration)]
    pub leeway: Duration,
    /// With --local: the verifiers' verified-token cache bound (0 turns it off).
    #[arg(long, env = "KEYFLEET_CACHE_ENTRIES")]
    pub cache_entries: Option<usize>,
    /// Skip the server-cost measurements after the load (efficiency, efficiency_unique, batch ratio).
    #[arg(long, env = "KEYFLEET_NO_COST")]
    pub no_cost: bool,
    /// Write the JSON report here.
    #[arg(long, env = "KEYFLEET_REPORT_JSON")]
    pub report_json: Option<PathBuf>,
    /// Write the HTML report (one self-contained page) here.
    #[arg(long, env = "KEYFLEET_REPORT_HTML")]
    pub report_html: Option<PathBuf>,
    #[command(flatten)]
    pub cred: AdminCred,
    #[command(flatten)]
    pub tls: ClientTlsArgs,
}

/// Benchmarks other than the Verify load.
#[derive(Debug, Subcommand)]
pub enum Benchmark {
    /// Hold N WatchJwks streams (lean in-process clients, like a fleet of verifiers) on an
    /// authority, directly or through relays; revoke tokens and rotate keys; report push latency
    /// to all N, the servers' CPU per delivered update, bytes per watcher per change, memory per
    /// watcher, and what a node that missed a change gets back. By default the authority (and
    /// any relay) is started from this binary as a child process on loopback.
    Fanout(FanoutArgs),
}

#[derive(Debug, Args)]
pub struct FanoutArgs {
    /// Watch streams to hold.
    #[arg(long, env = "KEYFLEET_WATCHERS", default_value_t = fanout::DEFAULT_WATCHERS)]
    pub watchers: usize,
    /// Token revocations to push (one at a time, each once every watcher has the last).
    #[arg(long, env = "KEYFLEET_REVOCATIONS", default_value_t = fanout::DEFAULT_REVOCATIONS)]
    pub revocations: usize,
    /// Key rotations to push, spread among the revocations.
    #[arg(long, env = "KEYFLEET_ROTATIONS", default_value_t = fanout::DEFAULT_ROTATIONS)]
    pub rotations: usize,
    /// Token revocations made before the watchers connect (a long deny list).
    #[arg(long, env = "KEYFLEET_PRELOAD_REVOCATIONS", default_value_t = 0)]
    pub preload_revocations: usize,
    /// Relays (`keyfleet verifier --serve-watch`, started as child processes) to spread the
    /// watchers over; 0 puts every watcher on the authority.
    #[arg(long, env = "KEYFLEET_RELAYS", default_value_t = 0)]
    pub relays: usize,
    /// Watch streams per HTTP/2 connection: 1 is one connection per watcher, like a real fleet.
    #[arg(long, env = "KEYFLEET_CONNECTIONS", default_value_t = fanout::DEFAULT_STREAMS_PER_CONNECTION as u16, value_parser = clap::value_parser!(u16).range(1..=fanout::MAX_STREAMS_PER_CONNECTION as i64))]
    pub connections: u16,
    /// Watchers that disconnect, miss one revocation, and come back naming what they hold.
    #[arg(long, env = "KEYFLEET_RECONNECTS", default_value_t = fanout::DEFAULT_RECONNECTS)]
    pub reconnects: usize,
    /// An authority already running (gRPC URL) instead of a local one; needs
    /// --node-token-file and the admin credential, and must allow the streams (its
    /// --max-watchers, --max-watchers-per-peer) and the changes (--admin-rate).
    #[arg(long, env = "KEYFLEET_AUTHORITY", requires = "node_token_file")]
    pub authority: Option<String>,
    /// The fleet credential of --authority (a copy of its <data-dir>/node.token).
    #[arg(long, env = "KEYFLEET_NODE_TOKEN_FILE", requires = "authority")]
    pub node_token_file: Option<PathBuf>,
    /// The pid of --authority when it runs on this machine, to measure its CPU and memory.
    #[arg(long, env = "KEYFLEET_AUTHORITY_PID", requires = "authority")]
    pub authority_pid: Option<u32>,
    /// Streams being opened at once (servers refuse opens past their own bound).
    #[arg(long, env = "KEYFLEET_MAX_OPENING", default_value_t = fanout::DEFAULT_MAX_OPENING)]
    pub max_opening: usize,
    /// Give up waiting for every watcher to hold the key set after this long.
    #[arg(long, env = "KEYFLEET_RAMP_TIMEOUT", default_value = default_duration(fanout::DEFAULT_RAMP_TIMEOUT), value_parser = parse_duration)]
    pub ramp_timeout: Duration,
    /// Give up waiting for every watcher to hold one change after this long.
    #[arg(long, env = "KEYFLEET_CHANGE_TIMEOUT", default_value = default_duration(fanout::DEFAULT_CHANGE_TIMEOUT), value_parser = parse_duration)]
    pub change_timeout: Duration,
    /// Wait between one change reaching every watcher and the next change.
    #[arg(long, env = "KEYFLEET_PAUSE", default_value = default_duration(fanout::DEFAULT_PAUSE), value_parser = parse_duration)]
    pub pause: Duration,
    /// Write the JSON report here.
    #[arg(long, env = "KEYFLEET_REPORT_JSON")]
    pub json: Option<PathBuf>,
    #[command(flatten)]
    pub cred: AdminCred,
    #[command(flatten)]
    pub tls: ClientTlsArgs,
}

impl FanoutArgs {
    fn options(self) -> anyhow::Result<FanoutOptions> {
        let authority = match (self.authority, self.node_token_file) {
            (Some(url), Some(node_token_file)) => AuthoritySource::Remote {
                url,
                admin_token: crate::client::admin_token(&self.cred)?,
                node_token_file,
                pid: self.authority_pid,
            },
            _ => AuthoritySource::Spawn,
        };
        if self.watchers == 0 {
            return Err(CliError::Usage("--watchers must be at least 1".into()).into());
        }
        Ok(FanoutOptions {
            watchers: self.watchers,
            revocations: self.revocations,
            rotations: self.rotations,
            preload_revocations: self.preload_revocations,
            relays: self.relays,
            streams_per_connection: self.connections.into(),
            reconnects: self.reconnects,
            authority,
            program: std::env::current_exe().ok(),
            tls: self.tls.load()?,
            max_opening: self.max_opening.max(1),
            ramp_timeout: self.ramp_timeout,
            change_timeout: self.change_timeout,
            pause: self.pause,
            progress: true,
        })
    }
}

async fn run_fanout(args: FanoutArgs) -> anyhow::Result<ExitCode> {
    let json = args.json.clone();
    let report = fanout::run(args.options()?).await?;
    print!("{}", report.summary());
    if let Some(path) = &json {
        let text = serde_json::to_string_pretty(&report)?;
        std::fs::write(path, text + "\n")
            .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?;
        println!("  JSON report     {}", path.display());
    }
    if report.passed() {
        println!("OK: every watcher got every change and holds the authority's state.");
        Ok(ExitCode::SUCCESS)
    } else {
        println!(
            "FAILED: see above (watchers missing a change, gaps, digest mismatches or full snapshots on reconnect)."
        );
        Ok(ExitCode::from(1))
    }
}

impl LoadtestArgs {
    fn options(self) -> anyhow::Result<LoadOptions> {
        let target = match self.local {
            Some(n) => Target::Local {
                verifiers: n as usize,
            },
            None => Target::Remote {
                authority: self.authority.ok_or_else(|| {
                    CliError::Usage("--authority is required without --local".into())
                })?,
                verifiers: self.verifiers,
                admin_token: crate::client::admin_token(&self.cred)?,
            },
        };
        if !(0.0..=1.0).contains(&self.invalid_ratio) {
            return Err(CliError::Usage("--invalid-ratio must be between 0 and 1".into()).into());
        }
        let load = match (self.rate, self.concurrency) {
            (Some(0), _) | (_, 0) => {
                return Err(CliError::Usage("--rate and --concurrency must be > 0".into()).into());
            }
            (Some(r), _) => Load::Rate(r),
            (None, c) => Load::Concurrency(c),
        };
        Ok(LoadOptions {
            target,
            duration: self.duration,
            load,
            tokens: self.tokens.max(1),
            pick: match self.pick {
                PickArg::Random => Pick::Random,
                PickArg::RoundRobin => Pick::RoundRobin,
            },
            connections_per_node: self.connections_per_node.max(1),
            rotate_every: self.rotate_every,
            kill_every: self.kill_every,
            invalid_ratio: self.invalid_ratio,
            invalid_kind: match self.invalid_kind {
                InvalidArg::Any => Invalid::Any,
                InvalidArg::Forged => Invalid::Forged,
                InvalidArg::Expired => Invalid::Expired,
                InvalidArg::WrongAudience => Invalid::WrongAudience,
                InvalidArg::UnknownKid => Invalid::UnknownKid,
            },
            audience: self.audience,
            leeway: self.leeway,
            cache_entries: self.cache_entries,
            measure_cost: !self.no_cost,
            progress: true,
            tls: self.tls.load()?,
        })
    }
}

/// `--scenario login`: the options of [`keyfleet_loadtest::login`].
fn login_options(args: LoadtestArgs) -> anyhow::Result<LoginOptions> {
    let target = match args.local {
        Some(n) => Target::Local {
            verifiers: n as usize,
        },
        None => Target::Remote {
            authority: args
                .authority
                .ok_or_else(|| CliError::Usage("--authority is required without --local".into()))?,
            verifiers: args.verifiers,
            admin_token: crate::client::admin_token(&args.cred)?,
        },
    };
    if args.users == 0 {
        return Err(CliError::Usage("--users must be at least 1".into()).into());
    }
    if args.thefts == 0 || args.thefts > args.users {
        return Err(CliError::Usage(
            "--thefts must be between 1 and --users (one victim each)".into(),
        )
        .into());
    }
    if args.refresh_every.is_zero() {
        return Err(CliError::Usage("--refresh-every must be more than 0s".into()).into());
    }
    if args.rate.is_some() || args.rotate_every.is_some() || args.kill_every.is_some() {
        return Err(CliError::Usage(
            "--scenario login takes --concurrency for its Verify traffic; --rate, --rotate-every and --kill-every belong to --scenario verify".into(),
        )
        .into());
    }
    if args.report_html.is_some() {
        return Err(CliError::Usage(
            "--scenario login writes a JSON report only (--report-json)".into(),
        )
        .into());
    }
    Ok(LoginOptions {
        target,
        duration: args.duration,
        users: args.users,
        refresh_every: args.refresh_every,
        concurrency: args.concurrency.max(1),
        thefts: args.thefts,
        audience: args.audience,
        revocation_bound: args.revocation_bound,
        tls: args.tls.load()?,
        progress: true,
    })
}

async fn run_login(args: LoadtestArgs) -> anyhow::Result<ExitCode> {
    let json = args.report_json.clone();
    let report = keyfleet_loadtest::login::run(login_options(args)?).await?;
    print!("{}", report.summary());
    if let Some(path) = &json {
        let text = serde_json::to_string_pretty(&report)?;
        std::fs::write(path, text + "\n")
            .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?;
        println!("  JSON report     {}", path.display());
    }
    if report.passed() {
        println!(
            "OK: no honest user refused; every stolen refresh token detected and its session refused on every node within {}.",
            humantime::format_duration(Duration::from_secs_f64(
                report.revocation_bound_ms / 1000.0
            ))
        );
        Ok(ExitCode::SUCCESS)
    } else {
        println!("FAILED: {}.", report.failures.join("; "));
        Ok(ExitCode::from(1))
    }
}

pub async fn run(mut args: LoadtestArgs) -> anyhow::Result<ExitCode> {
    if let Some(Benchmark::Fanout(fanout)) = args.benchmark.take() {
        return run_fanout(fanout).await;
    }
    if args.scenario == ScenarioArg::Login {
        return run_login(args).await;
    }
    let (json, html_file) = (args.report_json.clone(), args.report_html.clone());
    let options = args.options()?;
    let report = keyfleet_loadtest::run(options).await?;
    print!("{}", report.summary());
    report.write(json.as_deref(), html_file.as_deref())?;
    for (what, path) in [("JSON", &json), ("HTML", &html_file)] {
        if let Some(p) = path {
            println!("  {what} report     {}", p.display());
        }
    }
    if report.passed() {
        println!("OK: no legitimate token refused, no bad token accepted.");
        Ok(ExitCode::SUCCESS)
    } else {
        println!(
            "FAILED: {} legitimate tokens refused, {} bad tokens accepted.",
            report.false_rejects, report.false_accepts
        );
        Ok(ExitCode::from(1))
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;
    use crate::cli::{Cli, Command};

    fn fanout(args: &[&str]) -> Result<FanoutArgs, clap::Error> {
        let cli = Cli::try_parse_from(["keyfleet", "loadtest", "fanout"].iter().chain(args))?;
        match cli.command {
            Command::Loadtest(LoadtestArgs {
                benchmark: Some(Benchmark::Fanout(f)),
                ..
            }) => Ok(f),
            other => panic!("parsed as {other:?}"),
        }
    }

    fn loadtest(args: &[&str]) -> LoadtestArgs {
        let cli = Cli::try_parse_from(["keyfleet", "loadtest"].iter().chain(args)).unwrap();
        match cli.command {
            Command::Loadtest(l) => l,
            other => panic!("parsed as {other:?}"),
        }
    }

    /// `--scenario login` takes its own flags; the Verify load's open loop, rotations, kills and
    /// HTML report are refused with it (exit 64), as are more thefts than users.
    #[test]
    fn the_login_scenario_takes_its_flags_and_refuses_the_verify_loads() {
        let args = loadtest(&["--local", "3"]);
        assert_eq!(args.scenario, ScenarioArg::Verify);
        let args = loadtest(&[
            "--scenario",
            "login",
            "--local",
            "3",
            "--users",
            "10",
            "--thefts",
            "2",
            "--refresh-every",
            "500ms",
        ]);
        let o = login_options(args).unwrap();
        assert_eq!((o.users, o.thefts), (10, 2));
        assert_eq!(o.refresh_every, Duration::from_millis(500));
        for extra in [
            &["--rate", "100"][..],
            &["--rotate-every", "1s"],
            &["--report-html", "x.html"],
            &["--users", "1", "--thefts", "2"],
            &["--thefts", "0"],
        ] {
            let args = loadtest(&[&["--scenario", "login", "--local", "1"][..], extra].concat());
            let e = login_options(args).unwrap_err();
            assert_eq!(
                crate::exit::exit_code(&e),
                crate::exit::EXIT_CONFIG,
                "{extra:?}"
            );
        }
    }

    /// `keyfleet loadtest fanout` needs nothing else (it starts its own authority); an
    /// existing authority needs its node token; the Verify load's own flags stay apart.
    #[test]
    fn fanout_runs_on_its_defaults_or_on_a_named_authority() {
        let f = fanout(&[]).unwrap();
        assert_eq!(
            (
                f.watchers,
                f.revocations,
                f.rotations,
                f.relays,
                f.connections
            ),
            (1000, 20, 2, 0, 1)
        );
        assert!(f.authority.is_none());
        let f = fanout(&["--watchers", "10000", "--relays", "1", "--connections", "4"]).unwrap();
        assert_eq!((f.watchers, f.relays, f.connections), (10000, 1, 4));
        assert!(fanout(&["--authority", "http://127.0.0.1:7000"]).is_err());
        let f = fanout(&[
            "--authority",
            "http://127.0.0.1:7000",
            "--node-token-file",
            "node.token",
            "--authority-pid",
            "42",
        ])
        .unwrap();
        assert_eq!(f.authority_pid, Some(42));
        assert!(fanout(&["--connections", "0"]).is_err());
        assert!(fanout(&["--connections", "257"]).is_err());
        // The Verify load's flags belong to `keyfleet loadtest` itself.
        assert!(Cli::try_parse_from(["keyfleet", "loadtest", "--local", "1", "fanout"]).is_err());
    }
}
