#!/usr/bin/env python3
"""Renders docs/dashboard.png from real /metrics scrapes of a local keyfleet fleet.

Starts an authority and three verifiers (eu-1, eu-2 in region eu; us-1 in region us) from a
built binary on loopback, sends a little traffic through `keyfleet token verify` (valid,
expired, unknown kid, wrong audience), rotates the keys, then stops the authority, scraping
every node's /metrics all along. Needs matplotlib (`pip install matplotlib`).

    python3 docs/dashboard.py [target/debug/keyfleet]
"""

import base64
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.request

BIN = sys.argv[1] if len(sys.argv) > 1 else "target/debug/keyfleet"
AUTH_GRPC, AUTH_HTTP = 17700, 17701
NODES = [("eu-1", "eu", 17710), ("eu-2", "eu", 17720), ("us-1", "us", 17730)]
ROTATE_AT, AUTHORITY_DOWN_AT, END_AT = 50, 100, 160
SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$')


def scrape(port):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
            text = r.read().decode()
    except OSError:
        return None
    samples = []
    for line in text.splitlines():
        m = SAMPLE.match(line)
        if m:
            labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
            samples.append((m.group(1), labels, float(m.group(3))))
    return samples


def run(*args, **kw):
    return subprocess.run([BIN, *args], capture_output=True, text=True, **kw)


def collect(work):
    env = dict(os.environ, RUST_LOG="warn")
    procs = [subprocess.Popen([BIN, "authority", "--grpc-listen", f"127.0.0.1:{AUTH_GRPC}",
                               "--http-listen", f"127.0.0.1:{AUTH_HTTP}", "--data-dir", work,
                               "--issuer", "https://auth.example", "--publish-ahead", "20s"],
                              env=env)]
    for node, region, port in NODES:
        procs.append(subprocess.Popen([BIN, "verifier", "--grpc-listen", f"127.0.0.1:{port}",
                                       "--http-listen", f"127.0.0.1:{port + 1}",
                                       "--authority", f"http://127.0.0.1:{AUTH_GRPC}",
                                       "--node-id", node, "--region", region,
                                       "--refresh-interval", "5s"], env=env))
    authority = f"http://127.0.0.1:{AUTH_GRPC}"
    admin = ["--admin-token-file", os.path.join(work, "admin.token")]
    deadline = time.time() + 30
    while any(scrape(p + 1) is None for _, _, p in NODES) or scrape(AUTH_HTTP) is None:
        assert time.time() < deadline, "the fleet did not start"
        time.sleep(0.2)
    time.sleep(1)
    issue = lambda *extra: run("token", "issue", "--authority", authority, *admin, "--subject",
                               "alice", "--audience", "orders", *extra).stdout.strip()
    valid, short = issue(), issue("--ttl", "1s")
    head, rest = valid.split(".", 1)
    forged = base64.urlsafe_b64encode(json.dumps(
        {"alg": "EdDSA", "kid": "not-a-published-key"}).encode()).decode().rstrip("=") + "." + rest
    # Per node: how many of each token per tick (a mix that differs by node and region).
    mix = {"eu-1": [(valid, "orders", 5), (short, "orders", 1)],
           "eu-2": [(valid, "orders", 2), (valid, "billing", 1)],
           "us-1": [(valid, "orders", 2), (forged, "orders", 2), (short, "orders", 1)]}
    series, start, rotated, down = [], time.time(), False, False
    while (t := time.time() - start) < END_AT:
        if t > ROTATE_AT and not rotated:
            valid_before = valid
            run("keys", "rotate", "--authority", authority, *admin)
            valid = issue()
            for node in mix:
                mix[node] = [(valid if tok == valid_before else tok, aud, n)
                             for tok, aud, n in mix[node]]
            rotated = True
        if t > AUTHORITY_DOWN_AT and not down:
            procs[0].terminate()
            procs[0].wait()
            down = True
        verifies = []
        for node, _, port in NODES:
            for token, audience, n in mix[node]:
                for _ in range(n):
                    verifies.append(subprocess.Popen(
                        [BIN, "token", "verify", "--verifier", f"http://127.0.0.1:{port}",
                         "--audience", audience, token],
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        for p in verifies:
            p.wait()
        snapshot = {"t": time.time() - start}
        for node, _, port in NODES:
            snapshot[node] = scrape(port + 1)
        snapshot["authority"] = scrape(AUTH_HTTP)
        series.append(snapshot)
        time.sleep(max(0.0, 2.0 - (time.time() - start - snapshot["t"])))
    for p in procs:
        p.terminate()
        p.wait()
    return series


def value(samples, name, **labels):
    if not samples:
        return None
    total = None
    for n, l, v in samples:
        if n == name and all(l.get(k) == w for k, w in labels.items()):
            total = (total or 0.0) + v
    return total


def rate(series, who, name, **labels):
    ts, out = [], []
    for a, b in zip(series, series[1:]):
        va, vb = value(a[who], name, **labels), value(b[who], name, **labels)
        if va is not None and vb is not None:
            ts.append(b["t"])
            out.append(max(0.0, vb - va) / (b["t"] - a["t"]))
    return ts, out


def quantile(series, who, q):
    ts, out = [], []
    for a, b in zip(series, series[1:]):
        if not a[who] or not b[who]:
            continue
        buckets = sorted(
            (float(l["le"]), v - value(a[who], n, le=l["le"]))
            for n, l, v in b[who] if n == "keyfleet_verify_duration_seconds_bucket")
        total = buckets[-1][1] if buckets else 0
        if total <= 0:
            continue
        le = next(le for le, c in buckets if c >= q * total)
        ts.append(b["t"])
        out.append(le * 1000)
    return ts, out


def render(series, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 8, "axes.titlesize": 9, "axes.titleweight": "bold"})
    fig, axes = plt.subplots(2, 3, figsize=(15, 7.5), facecolor="#111217")
    for ax in axes.flat:
        ax.set_facecolor("#181b1f")
        ax.tick_params(colors="#ccccdc")
        ax.title.set_color("#ccccdc")
        for s in ax.spines.values():
            s.set_color("#2c3235")
        ax.grid(color="#2c3235", linewidth=0.5)
        ax.axvline(ROTATE_AT, color="#b877d9", linestyle="--", linewidth=0.8)
        ax.axvline(AUTHORITY_DOWN_AT, color="#f2495c", linestyle="--", linewidth=0.8)
        ax.set_xlabel("seconds (purple: keys rotate, red: authority stops)", color="#8e8e8e")
    nodes = [(n, r) for n, r, _ in NODES]

    ax = axes[0, 0]
    ax.set_title("Verify rate by node and region (req/s)")
    for node, region in nodes:
        ax.plot(*rate(series, node, "keyfleet_verify_total"), label=f"{region}/{node}")

    ax = axes[0, 1]
    ax.set_title("Refusals by reason, all nodes (req/s)")
    for reason in ["EXPIRED", "UNKNOWN_KID", "WRONG_AUDIENCE", "UNAVAILABLE"]:
        per_node = [rate(series, n, "keyfleet_verify_total", reason=reason) for n, _ in nodes]
        ts = per_node[0][0]
        ax.plot(ts, [sum(v) for v in zip(*(p[1] for p in per_node))], label=reason)

    ax = axes[0, 2]
    ax.set_title("Verify latency p99 by node (ms, bucket bound)")
    for node, region in nodes:
        ax.step(*quantile(series, node, 0.99), where="post", label=f"{region}/{node}")

    ax = axes[1, 0]
    ax.set_title("Key set age by node (s)")
    for node, region in nodes:
        ax.plot([s["t"] for s in series],
                [value(s[node], "keyfleet_jwks_age_seconds") for s in series],
                label=f"{region}/{node}")

    ax = axes[1, 1]
    ax.set_title("Rotation progress: JWKS version")
    ax.step([s["t"] for s in series],
            [value(s["authority"], "keyfleet_jwks_version") for s in series],
            where="post", linewidth=3, alpha=0.5, label="authority (published)")
    for node, region in nodes:
        ax.step([s["t"] for s in series], [value(s[node], "keyfleet_jwks_version") for s in series],
                where="post", label=f"{region}/{node}")

    ax = axes[1, 2]
    ax.set_title("Authority: watchers and keys by state")
    up = [s for s in series if s["authority"]]
    ts = [s["t"] for s in up]
    states = ["active", "next", "retiring"]
    ax.stackplot(ts, *[[value(s["authority"], "keyfleet_keys", state=st) for s in up]
                       for st in states],
                 labels=[f"keys {st}" for st in states], alpha=0.35, step="post")
    ax.step(ts, [value(s["authority"], "keyfleet_watchers") for s in up], where="post",
            linewidth=2, label="watchers connected")
    ax.step(ts, [value(s["authority"], "keyfleet_watchers_lagging") for s in up],
            where="post", linewidth=2, label="watchers lagging")

    for ax in axes.flat:
        legend = ax.legend(loc="upper left", fontsize=7, facecolor="#181b1f", edgecolor="#2c3235")
        for text in legend.get_texts():
            text.set_color("#ccccdc")
    fig.suptitle("keyfleet: panels of deploy/observability/grafana/keyfleet.json, from real /metrics scrapes",
                 color="#ccccdc", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=90, facecolor=fig.get_facecolor())


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as work:
        data = collect(work)
    with open(os.path.join(tempfile.gettempdir(), "keyfleet-dashboard.json"), "w") as f:
        json.dump(data, f)
    render(data, os.path.join(os.path.dirname(os.path.abspath(__file__)), "dashboard.png"))
    print("wrote docs/dashboard.png")
