//! `--report-html`: one self-contained page (inline SVG and CSS, nothing fetched) to look at,
//! not read: the verdict, throughput and p99 over time with rotation and kill markers, requests
//! per node and per region, and which node verified which token.

use std::fmt::Write as _;

use crate::report::{Event, EventKind, Report};

const W: f64 = 900.0;
const BLUE: &str = "#2563eb";
const RED: &str = "#dc2626";
const GREEN: &str = "#16a34a";
const INK: &str = "#1f2937";
const MUTED: &str = "#6b7280";

/// The report as an HTML page.
pub fn render(r: &Report) -> String {
    let mut h = String::with_capacity(64 * 1024);
    let (verdict, colour) = if r.passed() {
        ("PASS", GREEN)
    } else {
        ("FAIL", RED)
    };
    let _ = write!(
        h,
        r#"<!doctype html><html lang="en"><head><meta charset="utf-8"><title>keyfleet loadtest</title>
<style>
body{{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;color:{INK};margin:24px auto;max-width:960px;background:#fff}}
h1{{font-size:22px;margin:0 0 4px}} h2{{font-size:15px;margin:26px 0 6px;color:{INK}}}
.sub{{color:{MUTED};font-size:13px}}
.tiles{{display:flex;flex-wrap:wrap;gap:10px;margin:16px 0}}
.tile{{border:1px solid #e5e7eb;border-radius:8px;padding:8px 12px;min-width:120px}}
.tile b{{display:block;font-size:20px}} .tile span{{font-size:12px;color:{MUTED}}}
.badge{{display:inline-block;padding:4px 14px;border-radius:6px;color:#fff;font-weight:700;background:{colour};margin-right:10px}}
table{{border-collapse:collapse;font-size:13px}} td{{padding:2px 12px 2px 0}}
</style></head><body>
<h1><span class="badge">{verdict}</span>keyfleet loadtest</h1>
<div class="sub">{} · {} · {:.1}s</div>
"#,
        esc(&r.target),
        esc(&r.mode),
        r.duration_s
    );
    h.push_str(r#"<div class="tiles">"#);
    let spread = format!("{:.1}%", r.tokens_on_multiple_nodes_ratio * 100.0);
    let ratio = |v: Option<f64>| v.map_or("n/a".to_owned(), |e| format!("{e:.2}"));
    let tiles: [(&str, String, &str); 10] = [
        ("requests", r.requests.to_string(), INK),
        (
            "false rejects",
            r.false_rejects.to_string(),
            ok(r.false_rejects == 0),
        ),
        (
            "false accepts",
            r.false_accepts.to_string(),
            ok(r.false_accepts == 0),
        ),
        ("req/s", format!("{:.0}", r.throughput_rps), INK),
        ("p99 latency", format!("{} µs", r.latency_us.p99), INK),
        (
            "tokens on 2+ nodes",
            spread,
            ok(r.tokens_on_multiple_nodes_ratio >= 0.99),
        ),
        (
            "rotations · kills",
            format!("{} · {}", r.rotations, r.kills),
            INK,
        ),
        (
            "retries · errors",
            format!("{} · {}", r.retries, r.errors),
            INK,
        ),
        ("efficiency, run's mix", ratio(r.efficiency), INK),
        ("efficiency, unique tokens", ratio(r.efficiency_unique), INK),
    ];
    for (label, value, c) in tiles {
        let _ = write!(
            h,
            r#"<div class="tile"><b style="color:{c}">{}</b><span>{label}</span></div>"#,
            esc(&value)
        );
    }
    h.push_str("</div>");

    let secs: Vec<f64> = r.timeline.iter().map(|s| s.t as f64).collect();
    h.push_str("<h2>Throughput (requests per second)</h2>");
    let rps: Vec<f64> = r.timeline.iter().map(|s| s.rps).collect();
    line_chart(&mut h, &secs, &rps, BLUE, &r.events, "req/s");
    h.push_str("<h2>p99 latency (µs, from the intended send time)</h2>");
    let p99: Vec<f64> = r.timeline.iter().map(|s| s.p99_us as f64).collect();
    line_chart(&mut h, &secs, &p99, "#7c3aed", &r.events, "µs");
    let _ = write!(
        h,
        r#"<div class="sub"><span style="color:{BLUE}">┆ key rotation</span> &nbsp; <span style="color:{RED}">┆ node killed and restarted</span></div>"#
    );

    h.push_str("<h2>Requests per node (dashed: an even share)</h2>");
    bars(&mut h, &r.per_node, true);
    h.push_str("<h2>Requests per region</h2>");
    bars(&mut h, &r.per_region, false);

    let _ = write!(
        h,
        "<h2>Token × node: who verified what (first {} tokens; {:.2}% of {} tokens verified on 2+ nodes)</h2>",
        r.token_spread.len(),
        r.tokens_on_multiple_nodes_ratio * 100.0,
        r.tokens_checked
    );
    heatmap(&mut h, &r.spread_nodes, &r.token_spread);

    h.push_str("<h2>Server cost (same run, same machine)</h2><table>");
    let c = &r.cost;
    let f = |v: Option<f64>, unit: &str| v.map_or("n/a".to_owned(), |v| format!("{v:.2} {unit}"));
    let unique = format!(
        "{} ({} tokens)",
        f(c.server_cpu_us_per_verify_unique, "µs"),
        c.unique_tokens
    );
    let rows = [
        ("efficiency, run's mix (goal ≥ 0.8)", f(r.efficiency, "")),
        (
            "efficiency, unique tokens (goal ≥ 1.2)",
            f(r.efficiency_unique, ""),
        ),
        ("curve25519-dalek backend", r.curve_backend.clone()),
        ("server CPU per Verify", f(c.server_cpu_us_per_verify, "µs")),
        ("empty gRPC call (health Check)", f(c.empty_call_us, "µs")),
        (
            "in-process verify path, run's mix",
            f(c.inprocess_verify_us, "µs"),
        ),
        (
            "in-process, uncached",
            f(c.inprocess_verify_uncached_us, "µs"),
        ),
        ("in-process, cache hit", f(c.inprocess_cache_hit_us, "µs")),
        (
            "in-process strict Ed25519 verify",
            f(c.inprocess_strict_verify_us, "µs"),
        ),
        (
            "server CPU per Verify, uncached",
            f(c.server_cpu_us_per_verify_uncached, "µs"),
        ),
        ("server CPU per Verify, unique tokens", unique),
        (
            "server CPU per batched token",
            f(c.server_cpu_us_per_batched_token, "µs"),
        ),
        ("batch ratio (goal ≤ 0.4)", f(c.batch_ratio, "")),
        ("cache hit ratio", f(c.cache_hit_ratio, "")),
    ];
    for (k, v) in rows {
        let _ = write!(h, "<tr><td>{k}</td><td><b>{}</b></td></tr>", esc(&v));
    }
    let _ = writeln!(
        h,
        "</table><p class=\"sub\">{}</p><p class=\"sub\">latency µs: p50 {} · p90 {} · p99 {} · p99.9 {} · max {} — memory: rss {:.1} → {:.1} MiB</p></body></html>",
        esc(&c.method),
        r.latency_us.p50,
        r.latency_us.p90,
        r.latency_us.p99,
        r.latency_us.p999,
        r.latency_us.max,
        r.memory.rss_bytes_start as f64 / 1048576.0,
        r.memory.rss_bytes_end as f64 / 1048576.0,
    );
    h
}

fn ok(good: bool) -> &'static str {
    if good { GREEN } else { RED }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A line over time with vertical event markers.
fn line_chart(h: &mut String, xs: &[f64], ys: &[f64], colour: &str, events: &[Event], unit: &str) {
    let (height, left, bottom, top) = (180.0, 60.0, 24.0, 10.0);
    let x_max = xs.last().copied().unwrap_or(1.0).max(1.0);
    let y_max = nice(ys.iter().copied().fold(0.0, f64::max));
    let px = |x: f64| left + (W - left - 10.0) * x / x_max;
    let py = |y: f64| top + (height - top - bottom) * (1.0 - y / y_max);
    let _ = write!(
        h,
        r#"<svg width="{W}" height="{height}" viewBox="0 0 {W} {height}" xmlns="http://www.w3.org/2000/svg" font-size="11" font-family="sans-serif">"#
    );
    for k in 0..=4 {
        let y = y_max * k as f64 / 4.0;
        let _ = write!(
            h,
            r##"<line x1="{left}" x2="{x2}" y1="{yy:.1}" y2="{yy:.1}" stroke="#e5e7eb"/><text x="{tx}" y="{ty:.1}" text-anchor="end" fill="{MUTED}">{label}</text>"##,
            x2 = W - 10.0,
            yy = py(y),
            tx = left - 6.0,
            ty = py(y) + 4.0,
            label = short(y)
        );
    }
    let _ = write!(
        h,
        r#"<text x="{left}" y="{}" fill="{MUTED}">0 s</text><text x="{}" y="{}" text-anchor="end" fill="{MUTED}">{x_max:.0} s · {unit}</text>"#,
        height - 6.0,
        W - 10.0,
        height - 6.0
    );
    for e in events {
        let c = if e.kind == EventKind::Kill { RED } else { BLUE };
        let _ = write!(
            h,
            r#"<line x1="{0:.1}" x2="{0:.1}" y1="{top}" y2="{1}" stroke="{c}" stroke-dasharray="4 3"><title>{2} {3} at {4:.1}s</title></line>"#,
            px(e.t),
            height - bottom,
            esc(e.kind.as_str()),
            esc(&e.detail),
            e.t
        );
    }
    let points: Vec<String> = xs
        .iter()
        .zip(ys)
        .map(|(x, y)| format!("{:.1},{:.1}", px(*x), py(*y)))
        .collect();
    let _ = write!(
        h,
        r#"<polyline points="{}" fill="none" stroke="{colour}" stroke-width="2"/></svg>"#,
        points.join(" ")
    );
}

/// Horizontal bars, one per key.
fn bars(h: &mut String, counts: &std::collections::BTreeMap<String, u64>, even_line: bool) {
    let row = 26.0;
    let height = row * counts.len().max(1) as f64 + 8.0;
    let (left, right) = (130.0, 120.0);
    let total: u64 = counts.values().sum();
    let max = counts.values().copied().max().unwrap_or(1).max(1) as f64;
    let scale = (W - left - right) / max;
    let _ = write!(
        h,
        r#"<svg width="{W}" height="{height}" viewBox="0 0 {W} {height}" xmlns="http://www.w3.org/2000/svg" font-size="12" font-family="sans-serif">"#
    );
    for (i, (name, n)) in counts.iter().enumerate() {
        let y = 4.0 + row * i as f64;
        let share = *n as f64 * 100.0 / total.max(1) as f64;
        let _ = write!(
            h,
            r#"<text x="{}" y="{}" text-anchor="end" fill="{INK}">{}</text><rect x="{left}" y="{y}" width="{:.1}" height="{}" fill="{BLUE}" rx="3"/><text x="{:.1}" y="{}" fill="{MUTED}">{n} ({share:.1}%)</text>"#,
            left - 8.0,
            y + 15.0,
            esc(if name.is_empty() { "(none)" } else { name }),
            *n as f64 * scale,
            row - 8.0,
            left + *n as f64 * scale + 6.0,
            y + 15.0
        );
    }
    if even_line && !counts.is_empty() {
        let x = left + total as f64 / counts.len() as f64 * scale;
        let _ = write!(
            h,
            r#"<line x1="{x:.1}" x2="{x:.1}" y1="0" y2="{height}" stroke="{INK}" stroke-dasharray="3 3"/>"#
        );
    }
    h.push_str("</svg>");
}

/// Tokens (columns) × nodes (rows), each cell shaded by how often that node verified it.
fn heatmap(h: &mut String, nodes: &[String], rows: &[Vec<u64>]) {
    let (left, cell) = (130.0, ((W - 140.0) / rows.len().max(1) as f64).min(28.0));
    let height = 20.0 * nodes.len() as f64 + 26.0;
    let max = rows.iter().flatten().copied().max().unwrap_or(1).max(1) as f64;
    let _ = write!(
        h,
        r#"<svg width="{W}" height="{height}" viewBox="0 0 {W} {height}" xmlns="http://www.w3.org/2000/svg" font-size="12" font-family="sans-serif">"#
    );
    for (j, node) in nodes.iter().enumerate() {
        let y = 20.0 * j as f64;
        let _ = write!(
            h,
            r#"<text x="{}" y="{}" text-anchor="end" fill="{INK}">{}</text>"#,
            left - 8.0,
            y + 14.0,
            esc(node)
        );
        for (i, row) in rows.iter().enumerate() {
            let n = row.get(j).copied().unwrap_or(0);
            let fill = if n == 0 {
                "#f3f4f6".to_owned()
            } else {
                let a = 0.25 + 0.75 * (n as f64 / max);
                format!("rgba(22,163,74,{a:.2})")
            };
            let _ = write!(
                h,
                r#"<rect x="{:.1}" y="{y}" width="{:.1}" height="18" fill="{fill}"><title>token {i}: {n} on {}</title></rect>"#,
                left + cell * i as f64,
                cell - 2.0,
                esc(node)
            );
        }
    }
    let _ = write!(
        h,
        r#"<text x="{left}" y="{}" fill="{MUTED}">each column is one token; green = verified there (darker = more often), grey = never sent there</text></svg>"#,
        height - 6.0
    );
}

fn nice(max: f64) -> f64 {
    if max <= 0.0 {
        return 1.0;
    }
    let mag = 10f64.powf(max.log10().floor());
    for step in [1.0, 2.0, 2.5, 5.0, 10.0] {
        if max <= step * mag {
            return step * mag;
        }
    }
    10.0 * mag
}

fn short(v: f64) -> String {
    if v >= 1_000_000.0 {
        format!("{:.1}M", v / 1_000_000.0)
    } else if v >= 10_000.0 {
        format!("{:.0}k", v / 1000.0)
    } else if v >= 1000.0 {
        format!("{:.1}k", v / 1000.0)
    } else {
        format!("{v:.0}")
    }
}
