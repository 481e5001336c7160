//! What a fan-out run measured ([`FanoutReport`]): as text for a terminal and as JSON.

use std::fmt::Write as _;
use std::time::Duration;

use serde::Serialize;

use super::watcher::CountersSnapshot;

/// The cost of one tier of servers (the authority, or every relay together).
#[derive(Debug, Clone, Default, Serialize)]
pub struct TierCost {
    /// Processes measured (0: none could be read, e.g. a remote authority without its pid).
    pub processes: usize,
    /// Resident memory before any watcher connected, and with every watcher held.
    pub rss_before_bytes: u64,
    pub rss_held_bytes: u64,
    /// `(rss_held - rss_before) / nodes`: every watcher this tier serves or (the authority,
    /// behind relays) tracks.
    pub rss_per_watcher_bytes: f64,
    /// CPU over the change phase.
    pub change_cpu_ns: u64,
    /// CPU per second with every watcher held and nothing changing (heartbeats, pings, ticks).
    pub idle_cpu_ns_per_second: f64,
    /// Updates this tier delivered in the change phase (messages to its own watchers).
    pub updates_delivered: u64,
    /// `change_cpu_ns / updates_delivered`, in µs.
    pub cpu_us_per_update: f64,
    /// The same, less the idle CPU over the change phase's length.
    pub cpu_us_per_update_net_of_idle: f64,
    /// `change_cpu_ns` per update the watchers received (the same as `cpu_us_per_update`
    /// for the tier that serves them; for the authority behind relays, its share per node).
    pub cpu_us_per_node_update: f64,
}

/// One change and how it reached the fleet.
#[derive(Debug, Clone, Serialize)]
pub struct ChangeReport {
    /// `revocation` or `rotation`.
    pub kind: &'static str,
    /// The version that carries it (for a rotation: the first with the new key signing).
    pub version: u64,
    /// Watchers that held it (or newer) before the change's timeout.
    pub reached: usize,
    /// From the admin call to each watcher's apply.
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// Encoded message bytes received per watcher during this change, by kind.
    pub delta_bytes_per_watcher: f64,
    pub full_bytes_per_watcher: f64,
    pub deltas: u64,
    pub full_snapshots: u64,
}

/// Every change of one kind together.
#[derive(Debug, Clone, Default, Serialize)]
pub struct KindSummary {
    pub changes: usize,
    /// Over every watcher of every change of this kind.
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// Mean over the changes of the bytes per watcher (deltas and full snapshots together).
    pub bytes_per_watcher: f64,
    /// The last change's bytes per watcher (after every earlier one: the deny list is longest).
    pub last_bytes_per_watcher: f64,
}

/// Nodes that missed one change and came back naming the version they held.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ReconnectReport {
    pub nodes: usize,
    /// How many got a delta first, and how many a full snapshot.
    pub deltas: usize,
    pub full_snapshots: usize,
    /// How many were up to date after that first message alone.
    pub caught_up_in_one: usize,
    /// Mean encoded bytes of that first message.
    pub first_message_bytes: f64,
}

/// The whole run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct FanoutReport {
    pub watchers: usize,
    /// Watchers holding the key set when the ramp ended.
    pub held: usize,
    pub relays: usize,
    pub streams_per_connection: usize,
    pub connections: usize,
    /// Deny-list entries made before the watchers connected.
    pub preloaded_revocations: usize,
    /// From the first stream opened to the last one holding the key set.
    pub ramp_seconds: f64,
    /// The authority's cost (its watchers are the relays when there are relays).
    pub authority: TierCost,
    pub relay_tier: Option<TierCost>,
    pub changes: Vec<ChangeReport>,
    pub revocations: KindSummary,
    pub rotations: KindSummary,
    /// The change phase's length.
    pub change_seconds: f64,
    /// This process's CPU (the simulated fleet) per update received in the change phase: on a
    /// shared machine the clients' share slows the servers down.
    pub client_cpu_us_per_update: f64,
    pub reconnect: Option<ReconnectReport>,
    /// The authority's newest version at the end, its full snapshot's encoded size and its
    /// deny list's length.
    pub final_version: u64,
    pub full_snapshot_bytes: usize,
    pub deny_list_entries: usize,
    /// Watchers that ended holding `final_version` with the authority's digest.
    pub final_matching: usize,
    /// Over the change phase, and over the whole run.
    pub change_phase: CountersSnapshot,
    pub total: CountersSnapshot,
    /// The first few stream errors.
    pub errors: Vec<String>,
    /// What the reader should know (limits hit, figures that could not be measured).
    pub notes: Vec<String>,
}

/// p50, p99 and max of `samples`, in ms (zeros when empty).
pub(crate) fn percentiles(samples: &mut [Duration]) -> (f64, f64, f64) {
    if samples.is_empty() {
        return (0.0, 0.0, 0.0);
    }
    samples.sort_unstable();
    let at = |q: f64| {
        let i = ((samples.len() as f64 * q).ceil() as usize).clamp(1, samples.len()) - 1;
        samples[i].as_secs_f64() * 1e3
    };
    (at(0.50), at(0.99), at(1.0))
}

fn kib(bytes: f64) -> String {
    if bytes.abs() >= 1024.0 * 1024.0 {
        format!("{:.1} MiB", bytes / 1024.0 / 1024.0)
    } else if bytes.abs() >= 1024.0 {
        format!("{:.1} KiB", bytes / 1024.0)
    } else {
        format!("{bytes:.0} B")
    }
}

impl FanoutReport {
    /// Every held watcher got every change and ended on the authority's state, no stream saw
    /// a gap or a digest mismatch, and every reconnect resumed with one delta.
    pub fn passed(&self) -> bool {
        self.held == self.watchers
            && self.changes.iter().all(|c| c.reached == self.held)
            && self.final_matching == self.held
            && self.total.gaps == 0
            && self.total.digest_mismatches == 0
            && self.total.malformed == 0
            && self
                .reconnect
                .as_ref()
                .is_none_or(|r| r.deltas == r.nodes && r.caught_up_in_one == r.nodes)
    }

    fn tier(out: &mut String, name: &str, t: &TierCost, watchers: usize, per_node: bool) {
        if t.processes == 0 {
            let _ = writeln!(out, "  {name:<15} not measured (no pid to read /proc from)");
            return;
        }
        let _ = writeln!(
            out,
            "  {name:<15} {:.2} µs CPU per delivered update ({:.2} µs net of idle; {} updates in {:.2} s of CPU)",
            t.cpu_us_per_update,
            t.cpu_us_per_update_net_of_idle,
            t.updates_delivered,
            t.change_cpu_ns as f64 / 1e9
        );
        if per_node {
            let _ = writeln!(
                out,
                "  {:<15} {:.2} µs CPU per update a node behind the relays received",
                "", t.cpu_us_per_node_update
            );
        }
        let _ = writeln!(
            out,
            "  {:<15} RSS {} before, {} with {watchers} held: {} per watcher; idle {:.1}% of a core",
            "",
            kib(t.rss_before_bytes as f64),
            kib(t.rss_held_bytes as f64),
            kib(t.rss_per_watcher_bytes),
            t.idle_cpu_ns_per_second / 1e7
        );
    }

    /// The report for a terminal.
    pub fn summary(&self) -> String {
        let mut out = String::new();
        let path = if self.relays == 0 {
            "direct".to_owned()
        } else {
            format!("through {} relays", self.relays)
        };
        let _ = writeln!(
            out,
            "fan-out: {} watchers {path}, {} per HTTP/2 connection ({} connections); {} revocations + {} rotations{}",
            self.watchers,
            self.streams_per_connection,
            self.connections,
            self.revocations.changes,
            self.rotations.changes,
            if self.preloaded_revocations > 0 {
                format!(
                    " after {} preloaded revocations",
                    self.preloaded_revocations
                )
            } else {
                String::new()
            }
        );
        let _ = writeln!(
            out,
            "  ramp            {}/{} held in {:.2} s",
            self.held, self.watchers, self.ramp_seconds
        );
        for (name, k) in [
            ("revocation", &self.revocations),
            ("rotation", &self.rotations),
        ] {
            if k.changes == 0 {
                continue;
            }
            let _ = writeln!(
                out,
                "  {name:<15} to all: p50 {:.1} ms  p99 {:.1} ms  max {:.1} ms; {:.0} B per watcher per change (last: {:.0} B)",
                k.p50_ms, k.p99_ms, k.max_ms, k.bytes_per_watcher, k.last_bytes_per_watcher
            );
        }
        Self::tier(
            &mut out,
            "authority",
            &self.authority,
            self.held,
            self.relays > 0,
        );
        if let Some(t) = &self.relay_tier {
            Self::tier(&mut out, "relay tier", t, self.held, false);
        }
        let c = &self.change_phase;
        let _ = writeln!(
            out,
            "  change phase    {:.2} s: {} deltas ({} B), {} full snapshots ({} B); the clients used {:.2} µs CPU per update",
            self.change_seconds,
            c.delta_messages,
            c.delta_bytes,
            c.full_messages,
            c.full_bytes,
            self.client_cpu_us_per_update
        );
        let _ = writeln!(
            out,
            "  full snapshot   {} at the end ({} deny-list entries)",
            kib(self.full_snapshot_bytes as f64),
            self.deny_list_entries
        );
        if let Some(r) = &self.reconnect {
            let _ = writeln!(
                out,
                "  reconnect       {} nodes that missed 1 change: {} got a delta first ({:.0} B), {} a full snapshot; {} up to date after one message",
                r.nodes, r.deltas, r.first_message_bytes, r.full_snapshots, r.caught_up_in_one
            );
        }
        let _ = writeln!(
            out,
            "  final state     {}/{} hold version {} with the authority's digest",
            self.final_matching, self.held, self.final_version
        );
        let t = &self.total;
        let _ = writeln!(
            out,
            "  errors          {} gaps, {} digest mismatches, {} undecodable, {} stream errors, {} failed opens (retried), {} messages without digest",
            t.gaps, t.digest_mismatches, t.malformed, t.stream_errors, t.open_errors, t.no_digest
        );
        for e in &self.errors {
            let _ = writeln!(out, "    {}", keyfleet_core::escape_untrusted(e));
        }
        for n in &self.notes {
            let _ = writeln!(out, "  note: {n}");
        }
        out
    }
}
