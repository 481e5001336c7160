//! The run's counts: one type both for the second in progress (the workers record into it, the
//! ticker takes it every second) and for the whole run (the seconds merged into it), so the
//! timeline and the totals always count the same things; and the report built from the totals.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use hdrhistogram::Histogram;

use super::{Load, SPREAD_MIN_CHECKS};
use crate::report::{Efficiency, Event, EventKind, Latency, Memory, Report, Second};

/// Requests, verdicts and latencies over a span of the run.
pub(super) struct Counters {
    /// Latency in µs, from the intended send time.
    pub(super) hist: Histogram<u64>,
    pub(super) requests: u64,
    /// Requests carrying a token that must be refused.
    pub(super) invalid: u64,
    pub(super) errors: u64,
    pub(super) retries: u64,
    pub(super) false_rejects: u64,
    pub(super) false_accepts: u64,
    pub(super) wrong_reasons: u64,
    /// Answers by node id and by region.
    pub(super) per_node: BTreeMap<String, u64>,
    pub(super) per_region: BTreeMap<String, u64>,
    /// Token id → node id → times that node verified that legitimate token as valid.
    pub(super) spread: HashMap<u32, BTreeMap<String, u64>>,
}

impl Counters {
    pub(super) fn new() -> Counters {
        Counters {
            // 1 µs .. 60 s at 3 significant figures.
            hist: Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds"),
            requests: 0,
            invalid: 0,
            errors: 0,
            retries: 0,
            false_rejects: 0,
            false_accepts: 0,
            wrong_reasons: 0,
            per_node: BTreeMap::new(),
            per_region: BTreeMap::new(),
            spread: HashMap::new(),
        }
    }

    /// Adds `other`'s counts to these.
    pub(super) fn merge(&mut self, other: Counters) {
        // Both histograms have the same bounds, so adding cannot fail.
        let _ = self.hist.add(&other.hist);
        self.requests += other.requests;
        self.invalid += other.invalid;
        self.errors += other.errors;
        self.retries += other.retries;
        self.false_rejects += other.false_rejects;
        self.false_accepts += other.false_accepts;
        self.wrong_reasons += other.wrong_reasons;
        for (node, n) in other.per_node {
            *self.per_node.entry(node).or_default() += n;
        }
        for (region, n) in other.per_region {
            *self.per_region.entry(region).or_default() += n;
        }
        for (id, nodes) in other.spread {
            let row = self.spread.entry(id).or_default();
            for (node, n) in nodes {
                *row.entry(node).or_default() += n;
            }
        }
    }

    /// One answer from `node` in `region`.
    pub(super) fn answered_by(&mut self, node: &str, region: &str) {
        bump(&mut self.per_node, node);
        bump(&mut self.per_region, region);
    }

    /// Legitimate token `id` verified as valid by `node`.
    pub(super) fn verified_on(&mut self, id: u32, node: &str) {
        bump(self.spread.entry(id).or_default(), node);
    }

    /// The timeline's entry for these counts, over `span` ending `t` seconds into the run.
    pub(super) fn second(&self, t: u64, span: Duration, kid: String, rss_bytes: u64) -> Second {
        Second {
            t,
            requests: self.requests,
            rps: self.requests as f64 / span.as_secs_f64(),
            p99_us: if self.hist.is_empty() {
                0
            } else {
                self.hist.value_at_quantile(0.99)
            },
            errors: self.errors,
            retries: self.retries,
            false_rejects: self.false_rejects,
            false_accepts: self.false_accepts,
            kid,
            rss_bytes,
        }
    }

    /// The report of a run whose totals these are.
    pub(super) fn into_report(self, run: RunFacts) -> Report {
        let q = |p: f64| self.hist.value_at_quantile(p);
        let checked: Vec<_> = self
            .spread
            .values()
            .filter(|nodes| nodes.values().sum::<u64>() >= SPREAD_MIN_CHECKS)
            .collect();
        let on_many = checked.iter().filter(|nodes| nodes.len() >= 2).count();
        let answers: u64 = self.per_node.values().sum();
        let even = answers as f64 / self.per_node.len().max(1) as f64;
        let deviation = self
            .per_node
            .values()
            .map(|n| (*n as f64 - even).abs() / even.max(1.0))
            .fold(0.0, f64::max);
        let spread_nodes: Vec<String> = self.per_node.keys().cloned().collect();
        let mut ids: Vec<_> = self.spread.keys().copied().collect();
        ids.sort_unstable();
        let token_spread = ids
            .iter()
            .take(40)
            .map(|id| {
                let row = &self.spread[id];
                spread_nodes
                    .iter()
                    .map(|n| row.get(n).copied().unwrap_or(0))
                    .collect()
            })
            .collect();
        let count = |kind| run.events.iter().filter(|e| e.kind == kind).count() as u64;
        Report {
            target: run.target,
            mode: match run.load {
                Load::Rate(r) => format!("open loop, {r} req/s"),
                Load::Concurrency(c) => format!("closed loop, {c} in flight"),
            },
            duration_s: run.elapsed.as_secs_f64(),
            requests: self.requests,
            false_rejects: self.false_rejects,
            false_accepts: self.false_accepts,
            wrong_reasons: self.wrong_reasons,
            errors: self.errors,
            retries: self.retries,
            throughput_rps: self.requests as f64 / run.elapsed.as_secs_f64().max(1e-9),
            latency_us: Latency {
                p50: q(0.5),
                p90: q(0.9),
                p99: q(0.99),
                p999: q(0.999),
                max: self.hist.max(),
            },
            per_node: self.per_node,
            per_region: self.per_region,
            per_node_max_deviation: deviation,
            tokens_on_multiple_nodes_ratio: if checked.is_empty() {
                0.0
            } else {
                on_many as f64 / checked.len() as f64
            },
            tokens_checked: checked.len() as u64,
            invalid_requests: self.invalid,
            rotations: count(EventKind::Rotation),
            kills: count(EventKind::Kill),
            kids_seen: run.kids_seen,
            efficiency: run.efficiency,
            efficiency_unique: run.efficiency_unique,
            curve_backend: crate::curve::backend().to_owned(),
            cost: run.cost,
            memory: run.memory,
            events: run.events,
            timeline: run.timeline,
            token_spread,
            spread_nodes,
        }
    }
}

/// Everything in the report that is not counted per request.
pub(super) struct RunFacts {
    pub(super) target: String,
    pub(super) load: Load,
    pub(super) elapsed: Duration,
    pub(super) efficiency: Option<f64>,
    pub(super) efficiency_unique: Option<f64>,
    pub(super) cost: Efficiency,
    pub(super) memory: Memory,
    pub(super) events: Vec<Event>,
    pub(super) timeline: Vec<Second>,
    /// Every kid the authority was signing with at a tick, sorted.
    pub(super) kids_seen: Vec<String>,
}

/// Counts one for `key`, allocating its name only the first time it is seen (this runs under
/// the counters' lock on every request).
fn bump(map: &mut BTreeMap<String, u64>, key: &str) {
    match map.get_mut(key) {
        Some(n) => *n += 1,
        None => {
            map.insert(key.to_owned(), 1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Counters;

    #[test]
    fn merge_adds_every_count() {
        let mut a = Counters::new();
        a.requests = 2;
        a.errors = 1;
        a.hist.record(100).expect("in bounds");
        a.answered_by("n1", "a");
        a.verified_on(7, "n1");
        let mut b = Counters::new();
        b.requests = 3;
        b.false_rejects = 1;
        b.hist.record(200).expect("in bounds");
        b.answered_by("n1", "a");
        b.answered_by("n2", "b");
        b.verified_on(7, "n2");
        b.verified_on(7, "n1");
        a.merge(b);
        assert_eq!((a.requests, a.errors, a.false_rejects), (5, 1, 1));
        assert_eq!(a.hist.len(), 2);
        assert_eq!(a.per_node["n1"], 2);
        assert_eq!(a.per_node["n2"], 1);
        assert_eq!(a.per_region["b"], 1);
        assert_eq!(a.spread[&7]["n1"], 2);
        assert_eq!(a.spread[&7]["n2"], 1);
    }
}
