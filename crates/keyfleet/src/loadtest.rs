//! `keyfleet loadtest`: the command line of the load generator in `keyfleet-loadtest`. Exit 0
//! when no legitimate token was refused and no bad token accepted, 1 otherwise.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, ValueEnum};
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

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum PickArg {
    Random,
    RoundRobin,
}

#[derive(Debug, Args)]
pub struct LoadtestArgs {
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

pub async fn run(args: LoadtestArgs) -> anyhow::Result<ExitCode> {
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
