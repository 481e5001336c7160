//! What a load test found: the JSON report (`--report-json`), and the text summary.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

/// Latency percentiles in microseconds, measured from the intended send time.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Latency {
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
}

/// One second of the run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Second {
    /// Seconds since the load started (the end of this second).
    pub t: u64,
    pub requests: u64,
    pub rps: f64,
    pub p99_us: u64,
    pub errors: u64,
    pub retries: u64,
    pub false_rejects: u64,
    pub false_accepts: u64,
    /// The kid the authority signed with last.
    pub kid: String,
    /// Resident memory of the load generator's process (for `--local`, the verifiers' too).
    pub rss_bytes: u64,
}

/// A rotation or a node kill, at `t` seconds into the run.
#[derive(Debug, Clone, Serialize)]
pub struct Event {
    pub t: f64,
    pub kind: EventKind,
    /// The new kid (rotation) or the killed node's name (kill).
    pub detail: String,
}

/// What happened; in the JSON report as `"rotation"` or `"kill"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EventKind {
    Rotation,
    Kill,
}

impl EventKind {
    /// The name the JSON report uses.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Rotation => "rotation",
            EventKind::Kill => "kill",
        }
    }
}

/// Server cost, measured in the same run on the same machine (the method: docs/perf.md).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Efficiency {
    /// How the numbers were taken.
    pub method: String,
    /// Verifier threads' CPU during the load ÷ Verify answers.
    pub server_cpu_us_per_verify: Option<f64>,
    /// Verifier threads' CPU per empty gRPC call (health `Check`) under the same load shape.
    pub empty_call_us: Option<f64>,
    /// One core running the verifier's verify path in-process over the run's token mix
    /// (the node's verified-token cache as warm as the run left it).
    pub inprocess_verify_us: Option<f64>,
    /// The same without the cache: every token fully checked.
    pub inprocess_verify_uncached_us: Option<f64>,
    /// One valid token answered from the cache, in-process.
    pub inprocess_cache_hit_us: Option<f64>,
    /// One strict Ed25519 signature check (`verify_strict`, the key decompressed beforehand)
    /// over a token's signing input, in-process: the reference of `efficiency_unique`.
    pub inprocess_strict_verify_us: Option<f64>,
    /// Per token, in-process, in `VerifyBatch`-sized batches without the cache.
    pub inprocess_batch_us: Option<f64>,
    /// Server CPU per Verify with the cache off (every token fully checked).
    pub server_cpu_us_per_verify_uncached: Option<f64>,
    /// Server CPU per Verify of tokens no node has seen before (minted for the purpose, caches
    /// on as in the run): the cost of a token's first check.
    pub server_cpu_us_per_verify_unique: Option<f64>,
    /// Answers in that measurement (each a different token).
    pub unique_tokens: u64,
    /// Server CPU per token of `VerifyBatch` (cache off), and the batch size used.
    pub server_cpu_us_per_batched_token: Option<f64>,
    pub batch_size: usize,
    /// `server_cpu_us_per_batched_token ÷ server_cpu_us_per_verify_uncached` (goal ≤ 0.4).
    pub batch_ratio: Option<f64>,
    /// `(inprocess_verify_uncached_us + empty_call_us) ÷ server_cpu_us_per_verify_uncached`.
    pub efficiency_uncached: Option<f64>,
    /// Share of the run's answers the nodes served from their cache.
    pub cache_hit_ratio: Option<f64>,
}

/// Memory over the run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Memory {
    pub rss_bytes_start: u64,
    pub rss_bytes_end: u64,
    pub rss_bytes_max: u64,
    /// Entries in each local verifier's cache at the end, and the bound they must stay under.
    pub cache_entries: BTreeMap<String, u64>,
    pub cache_capacity: Option<u64>,
}

/// The whole report. The field names are the contract of `--report-json`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    pub target: String,
    pub mode: String,
    pub duration_s: f64,
    pub requests: u64,
    pub false_rejects: u64,
    pub false_accepts: u64,
    /// Refusals whose reason differs from the one expected (still refused: not a false accept).
    pub wrong_reasons: u64,
    pub errors: u64,
    pub retries: u64,
    pub throughput_rps: f64,
    pub latency_us: Latency,
    pub per_node: BTreeMap<String, u64>,
    pub per_region: BTreeMap<String, u64>,
    /// Largest |share − even share| ÷ even share over the nodes.
    pub per_node_max_deviation: f64,
    /// Share of legitimate tokens that were verified (valid) on ≥ 2 distinct nodes, among those
    /// verified at least `SPREAD_MIN_CHECKS` (10) times: a sticky balancer drives it to 0.
    pub tokens_on_multiple_nodes_ratio: f64,
    pub tokens_checked: u64,
    pub invalid_requests: u64,
    pub rotations: u64,
    pub kills: u64,
    pub kids_seen: Vec<String>,
    /// `(in-process verify-path cost + empty-call cost) ÷ server CPU per Verify`, over the run's
    /// own mix of tokens (mostly cache hits); goal ≥ 0.8.
    pub efficiency: Option<f64>,
    /// `(in-process strict Ed25519 check + empty-call cost) ÷ server CPU per Verify` when every
    /// token is new (`cost.server_cpu_us_per_verify_unique`); goal ≥ 1.2 (issue 14).
    pub efficiency_unique: Option<f64>,
    /// The field backend curve25519-dalek runs in this process (the `--local` verifiers):
    /// `avx512ifma`, `avx2`, `serial` or `fiat` (see `keyfleet_loadtest::curve`).
    pub curve_backend: String,
    pub cost: Efficiency,
    pub memory: Memory,
    pub events: Vec<Event>,
    pub timeline: Vec<Second>,
    /// Up to 40 tokens × nodes: how many times each node verified each token.
    pub token_spread: Vec<Vec<u64>>,
    pub spread_nodes: Vec<String>,
}

impl Report {
    /// No legitimate token refused and no bad token accepted.
    pub fn passed(&self) -> bool {
        self.false_rejects == 0 && self.false_accepts == 0
    }

    /// Writes the JSON report to `json` and the HTML page to `html`, where given.
    pub fn write(
        &self,
        json: Option<&std::path::Path>,
        html: Option<&std::path::Path>,
    ) -> anyhow::Result<()> {
        use anyhow::Context as _;
        if let Some(path) = json {
            let text = serde_json::to_string_pretty(self)? + "\n";
            std::fs::write(path, text)
                .with_context(|| format!("writing the JSON report to {}", path.display()))?;
        }
        if let Some(path) = html {
            std::fs::write(path, crate::html::render(self))
                .with_context(|| format!("writing the HTML report to {}", path.display()))?;
        }
        Ok(())
    }

    /// The human summary printed at the end of a run.
    pub fn summary(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "keyfleet loadtest: {} ({}) for {:.1}s",
            self.target, self.mode, self.duration_s
        );
        let _ = writeln!(
            s,
            "  requests        {} ({:.0} req/s), {} meant to be refused",
            self.requests, self.throughput_rps, self.invalid_requests
        );
        let _ = writeln!(
            s,
            "  false rejects   {}   false accepts {}   wrong reasons {}",
            self.false_rejects, self.false_accepts, self.wrong_reasons
        );
        let _ = writeln!(
            s,
            "  errors          {}   retries {} (on another node)",
            self.errors, self.retries
        );
        let l = &self.latency_us;
        let _ = writeln!(
            s,
            "  latency (µs)    p50 {}  p90 {}  p99 {}  p99.9 {}  max {}",
            l.p50, l.p90, l.p99, l.p999, l.max
        );
        let _ = writeln!(
            s,
            "  rotations       {}   kills {}   kids used {}",
            self.rotations,
            self.kills,
            self.kids_seen.len()
        );
        for (node, n) in &self.per_node {
            let share = *n as f64 / self.per_node.values().sum::<u64>().max(1) as f64;
            let _ = writeln!(s, "  {node:<15} {n:>9} answers ({:.1}%)", share * 100.0);
        }
        for (region, n) in &self.per_region {
            let _ = writeln!(s, "  region {region:<8} {n:>9} answers");
        }
        let _ = writeln!(
            s,
            "  spread          {:.4} of {} tokens verified on 2+ nodes (node shares within ±{:.1}% of even)",
            self.tokens_on_multiple_nodes_ratio,
            self.tokens_checked,
            self.per_node_max_deviation * 100.0
        );
        let c = &self.cost;
        let f = |v: Option<f64>| v.map_or("n/a".to_owned(), |v| format!("{v:.1}"));
        let r = |v: Option<f64>| v.map_or("n/a".to_owned(), |v| format!("{v:.2}"));
        let _ = writeln!(
            s,
            "  server CPU      {} µs per Verify ({} uncached, {} unique tokens), empty call {} µs, cache hit ratio {}",
            f(c.server_cpu_us_per_verify),
            f(c.server_cpu_us_per_verify_uncached),
            f(c.server_cpu_us_per_verify_unique),
            f(c.empty_call_us),
            r(c.cache_hit_ratio)
        );
        let _ = writeln!(
            s,
            "  in-process      {} µs per token (run's mix), {} uncached, {} cache hit, {} batched; strict Ed25519 {}",
            f(c.inprocess_verify_us),
            f(c.inprocess_verify_uncached_us),
            f(c.inprocess_cache_hit_us),
            f(c.inprocess_batch_us),
            f(c.inprocess_strict_verify_us)
        );
        let _ = writeln!(
            s,
            "  efficiency      {} run's mix (goal ≥ 0.8), {} unique tokens (goal ≥ 1.2), {} uncached",
            r(self.efficiency),
            r(self.efficiency_unique),
            r(c.efficiency_uncached)
        );
        let _ = writeln!(
            s,
            "  batch ratio     {} (goal ≤ 0.4; batches of {})   curve backend {}",
            r(c.batch_ratio),
            c.batch_size,
            self.curve_backend
        );
        let m = &self.memory;
        let _ = writeln!(
            s,
            "  memory          rss {:.1} → {:.1} MiB (max {:.1}); cache entries {:?} (bound {})",
            mib(m.rss_bytes_start),
            mib(m.rss_bytes_end),
            mib(m.rss_bytes_max),
            m.cache_entries.values().collect::<Vec<_>>(),
            m.cache_capacity.map_or("n/a".to_owned(), |c| c.to_string())
        );
        s
    }
}

fn mib(b: u64) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

#[cfg(test)]
mod tests {
    use super::{Event, EventKind};

    /// The event kinds are part of the `--report-json` contract.
    #[test]
    fn event_kinds_keep_their_json_names() {
        for (kind, name) in [(EventKind::Rotation, "rotation"), (EventKind::Kill, "kill")] {
            let event = Event {
                t: 1.5,
                kind,
                detail: "x".into(),
            };
            let json = serde_json::to_string(&event).expect("serializable");
            assert_eq!(json, format!(r#"{{"t":1.5,"kind":"{name}","detail":"x"}}"#));
            assert_eq!(kind.as_str(), name);
        }
    }
}
