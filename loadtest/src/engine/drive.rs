//! One run, for any target, from connecting to the report: fill the token pool, start the
//! background tasks (minting, rotations, kills, the ticker), generate the load, then measure
//! memory, the cache hit ratio and (local cluster) the server cost.

use std::io::IsTerminal as _;
use std::sync::Arc;

use anyhow::Context as _;
use keyfleet_authority::client::AdminClient;
use keyfleet_client::{PoolConfig, PoolStats};
use tokio::time::Instant;

use super::counters::RunFacts;
use super::schedule::schedule;
use super::state::Shared;
use super::ticker::{Ticked, tick_loop};
use super::{LoadOptions, SERVER_THREADS, chaos, cost, tokens};
use crate::cluster::LocalCluster;
use crate::cpu;
use crate::report::{Memory, Report};

/// Runs the load described by `options` against the verifiers at `urls`; `cluster` is the
/// local cluster when there is one (for kills and the server-cost measurements).
pub(super) async fn drive(
    options: &LoadOptions,
    target: String,
    urls: &[String],
    authority: AdminClient,
    cluster: Option<Arc<tokio::sync::Mutex<LocalCluster>>>,
    pool: PoolConfig,
) -> anyhow::Result<(Report, PoolStats)> {
    let shared = Shared::connect(options, urls, pool).await?;
    let with_invalid = options.invalid_ratio > 0.0;
    let expiring = tokens::fill(&shared, &authority, options.tokens, with_invalid).await?;

    let started = Instant::now();
    let end = started + options.duration;
    let rss_start = cpu::rss_bytes().unwrap_or(0);
    let cpu_start = cpu::threads_cpu_ns(SERVER_THREADS);
    let cache_before = match &cluster {
        Some(c) => cost::cache_counts(&c.lock().await.verifiers),
        None => None,
    };

    let mut background = tokio::task::JoinSet::new();
    background.spawn(tokens::mint_loop(
        shared.clone(),
        authority.clone(),
        expiring,
        options.leeway,
        with_invalid,
    ));
    if let Some(every) = options.rotate_every {
        background.spawn(chaos::rotate_loop(
            shared.clone(),
            authority.clone(),
            every,
            started,
        ));
    }
    if let (Some(every), Some(cluster)) = (options.kill_every, cluster.clone()) {
        background.spawn(chaos::kill_loop(shared.clone(), cluster, every, started));
    }
    let ticker = tokio::spawn(tick_loop(
        shared.clone(),
        started,
        options.progress && std::io::stderr().is_terminal(),
    ));

    let load = shared.clone();
    let answered = schedule(options.load, end, move |slot| {
        let token = load.choose()?;
        let load = load.clone();
        Some(async move { u64::from(load.one(&token, slot.due).await) })
    })
    .await;
    let elapsed = started.elapsed();
    let pool_stats = shared.verifiers.stats();
    shared.stop();
    let cpu_end = cpu::threads_cpu_ns(SERVER_THREADS);
    while background.join_next().await.is_some() {}
    let Ticked {
        mut totals,
        timeline,
        kids,
    } = ticker.await.context("the ticker panicked")?;

    // Requests sent to another node after one failed or could not decide; hedges apart.
    totals.retries = pool_stats.retries;
    tracing::info!(
        requests = pool_stats.requests,
        hedges = pool_stats.hedges,
        hedge_wins = pool_stats.hedge_wins,
        retries = pool_stats.retries,
        ejections = pool_stats.ejections,
        readmissions = pool_stats.readmissions,
        "verifier pool"
    );

    // Server cost: only where the verifiers run in this process.
    let mut cost = cost::unmeasured();
    let mut memory = Memory {
        rss_bytes_start: rss_start,
        ..Memory::default()
    };
    if let Some(cluster) = &cluster {
        let cluster = cluster.lock().await;
        let verifiers: Vec<_> = cluster
            .verifiers
            .iter()
            .filter_map(|n| n.verifier.clone().map(|v| (n.name.clone(), v)))
            .collect();
        if let (Some(a), Some(b)) = (cpu_start, cpu_end)
            && answered > 0
        {
            cost.server_cpu_us_per_verify = Some((b - a) as f64 / 1000.0 / answered as f64);
        }
        if let (Some(before), Some(after)) = (cache_before, cost::cache_counts(&cluster.verifiers))
        {
            // A node restarted by a kill counts from zero again: never below zero.
            let hits = after.0.saturating_sub(before.0);
            let misses = after.1.saturating_sub(before.1);
            if hits + misses > 0 {
                cost.cache_hit_ratio = Some(hits as f64 / (hits + misses) as f64);
            }
        }
        drop(cluster);
        for (name, v) in &verifiers {
            let (len, cap) = v.cache_usage();
            memory.cache_entries.insert(name.clone(), len as u64);
            memory.cache_capacity = Some(cap as u64);
        }
        if options.measure_cost {
            cost::measure_cost(&shared, options, &verifiers, &authority, &mut cost).await;
        }
    }
    memory.rss_bytes_end = cpu::rss_bytes().unwrap_or(0);
    memory.rss_bytes_max = timeline
        .iter()
        .map(|s| s.rss_bytes)
        .chain([rss_start, memory.rss_bytes_end])
        .max()
        .unwrap_or(0);
    let efficiency = match (
        cost.inprocess_verify_us,
        cost.empty_call_us,
        cost.server_cpu_us_per_verify,
    ) {
        (Some(i), Some(e), Some(s)) if s > 0.0 => Some((i + e) / s),
        _ => None,
    };
    // The same for a token's first check, against a bare signature check (issue 14's measure).
    let efficiency_unique = match (
        cost.inprocess_strict_verify_us,
        cost.empty_call_us,
        cost.server_cpu_us_per_verify_unique,
    ) {
        (Some(i), Some(e), Some(s)) if s > 0.0 => Some((i + e) / s),
        _ => None,
    };

    let report = totals.into_report(RunFacts {
        target,
        load: options.load,
        elapsed,
        efficiency,
        efficiency_unique,
        cost,
        memory,
        events: shared.take_events(),
        timeline,
        kids_seen: kids.into_iter().collect(),
    });
    Ok((report, pool_stats))
}
