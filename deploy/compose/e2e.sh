#!/usr/bin/env bash
# End-to-end test of the two-region compose cluster, for real, on this machine's Docker engine.
#
# Builds the image (deploy/build-image.sh), brings deploy/compose up under a unique project
# name (authority -> relay-a, relay-b -> two verifiers each), and runs `keyfleet loadtest`
# against every verifier of both regions for about 60 s while it:
#   t≈6s   rotates the keys (1st rotation; the gate waits for the nodes behind the relays)
#   t≈12s  docker-kills verifier-a2, starts it again at t≈18s
#   t≈22s  cuts region b off the authority for 20 s: relay-b, region b's only link, leaves the
#          interregion network; verifier-b* stay connected to relay-b, which keeps serving its
#          last state, and the loadtest still reaches them over region-b
#   t≈30s  rotates the keys again, while region b is cut off
#   t≈48s  restarts the authority
# A probe runs beside the loadtest: every ~2 s it verifies, on every running node (relays
# included: they are full verifiers), a token minted once before the chaos, a token minted
# just now, and a forged token.
#
# Pass: the loadtest exits 0 with zero false rejects and zero false accepts, every verifier
# served requests, both regions served requests, tokens were verified on several nodes (and
# in both regions when the report says so); the probe saw no wrong verdict; region b's
# verifiers cannot reach the authority except through relay-b, and verify while it is cut off;
# `keys list` shows every verifier connected through its region's relay (`via`) before and
# after the chaos, and every node holding the authority's newest version after it; the token
# minted before the chaos, and one of the newest key, verify on every node of both regions
# after it; both rotations changed the signing key. The JSON (and HTML) report, a summary, the
# fleet as `keys list --json` saw it and the containers' logs are copied to
# deploy/compose/artifacts/. Everything is torn down (containers, networks, volumes), also on
# failure or Ctrl-C.
#
# Environment: KEYFLEET_E2E_SKIP_BUILD=1 (reuse $KEYFLEET_IMAGE), KEYFLEET_IMAGE (default
# keyfleet:local), KEYFLEET_E2E_DURATION (default 60), KEYFLEET_E2E_RATE (requests/s, default
# 200), KEYFLEET_E2E_LOADTEST=0 (debugging the deploy files only: run the scenario with the
# probe alone; says so, and never what CI runs).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
artifacts=$here/artifacts
started=$SECONDS

say() { printf '[e2e %4ds] %s\n' "$((SECONDS - started))" "$*"; }
die() { say "FAIL: $*"; exit 1; }

# --- Docker is required -----------------------------------------------------------------------
if ! command -v docker >/dev/null 2>&1; then
    echo "e2e: this test needs Docker (a Docker engine and docker compose); 'docker' is not installed" >&2
    exit 2
fi
if ! docker info >/dev/null 2>&1; then
    echo "e2e: this test needs Docker: no Docker engine answers ('docker info' failed)" >&2
    exit 2
fi
if docker compose version >/dev/null 2>&1; then
    compose_cmd=(docker compose)
elif command -v docker-compose >/dev/null 2>&1; then
    compose_cmd=(docker-compose)
else
    echo "e2e: this test needs docker compose (v2 plugin) or docker-compose" >&2
    exit 2
fi
command -v python3 >/dev/null 2>&1 || die "python3 is needed to read the loadtest report"

export KEYFLEET_IMAGE=${KEYFLEET_IMAGE:-keyfleet:local}
duration=${KEYFLEET_E2E_DURATION:-60}
rate=${KEYFLEET_E2E_RATE:-200}
with_loadtest=${KEYFLEET_E2E_LOADTEST:-1}
project=keyfleet-e2e-$(date +%s)-$$
work=$(mktemp -d "${TMPDIR:-/tmp}/keyfleet-e2e.XXXXXX")
mkdir -p "$artifacts"
rm -f "$artifacts"/e2e-*

export KEYFLEET_SECRETS_DIR=$work/secrets KEYFLEET_REPORT_DIR=$work/reports
export KEYFLEET_LOADTEST_DURATION=${duration}s KEYFLEET_LOADTEST_RATE=$rate
export COMPOSE_PROJECT_NAME=$project
compose() { (cd "$here" && "${compose_cmd[@]}" -p "$project" -f "$here/compose.yaml" "$@"); }

# The loadtest's targets (what clients call) ...
verifiers=(verifier-a1 verifier-a2 verifier-b1 verifier-b2)
# ... the relays, each region's one stream to the authority (and full verifiers too) ...
relays=(relay-a relay-b)
# ... every node, and which relay each verifier follows.
nodes=("${relays[@]}" "${verifiers[@]}")
declare -A relay_of=([verifier-a1]=relay-a [verifier-a2]=relay-a [verifier-b1]=relay-b [verifier-b2]=relay-b)
region_b=(relay-b verifier-b1 verifier-b2)
declare -A cid

# --- teardown, always ---------------------------------------------------------------------------
probe_pid='' loadtest_pid=''
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    set +e
    [[ -n $probe_pid ]] && kill "$probe_pid" 2>/dev/null
    [[ -n $loadtest_pid ]] && kill "$loadtest_pid" 2>/dev/null
    if [[ -n $(docker ps -aq --filter "label=com.docker.compose.project=$project") ]]; then
        compose ps >"$artifacts/e2e-ps.txt" 2>&1
        compose logs --no-color --timestamps >"$artifacts/e2e-compose.log" 2>&1
    fi
    compose --profile loadtest down --volumes --remove-orphans --timeout 5 >/dev/null 2>&1 \
        || compose down --volumes --remove-orphans --timeout 5 >/dev/null 2>&1
    # Belt and braces (a one-off `run` container, or an older compose): anything labelled with
    # this project goes, with its anonymous volumes.
    local left
    left=$(docker ps -aq --filter "label=com.docker.compose.project=$project")
    [[ -n $left ]] && docker rm -f -v $left >/dev/null 2>&1
    left=$(docker network ls -q --filter "label=com.docker.compose.project=$project")
    [[ -n $left ]] && docker network rm $left >/dev/null 2>&1
    left=$(docker volume ls -q --filter "label=com.docker.compose.project=$project")
    [[ -n $left ]] && docker volume rm -f $left >/dev/null 2>&1
    rm -rf "$work"
    if [[ $rc == 0 ]]; then
        say "PASS in $((SECONDS - started))s (artifacts in ${artifacts#"$root"/})"
    else
        say "FAILED (exit $rc) after $((SECONDS - started))s; logs in ${artifacts#"$root"/}"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- image and cluster ----------------------------------------------------------------------------
if [[ ${KEYFLEET_E2E_SKIP_BUILD:-0} != 1 ]]; then
    say "building the image $KEYFLEET_IMAGE"
    "$root/deploy/build-image.sh"
fi
docker image inspect "$KEYFLEET_IMAGE" >/dev/null 2>&1 || die "no image $KEYFLEET_IMAGE"
docker run --rm "$KEYFLEET_IMAGE" health --help >/dev/null 2>&1 \
    || die "the image's keyfleet has no 'health' subcommand (the compose health checks use it)"
if [[ $with_loadtest == 1 ]]; then
    docker run --rm "$KEYFLEET_IMAGE" loadtest --help >/dev/null 2>&1 \
        || die "the image's keyfleet has no 'loadtest' subcommand yet"
else
    say "WARNING: KEYFLEET_E2E_LOADTEST=0: the scenario runs with the probe only, without the loadtest"
fi

"$here/init.sh" >/dev/null
say "starting project $project (${compose_cmd[*]})"
compose up -d >"$work/up.log" 2>&1 || { cat "$work/up.log"; die "compose up failed"; }

for s in authority "${nodes[@]}"; do
    cid[$s]=$(compose ps -q "$s")
    [[ -n ${cid[$s]} ]] || die "no container for $s"
done

# Waits until the container's compose health check (gRPC health) says healthy.
wait_healthy() {
    local service=$1 deadline=$((SECONDS + ${2:-90})) status
    while :; do
        status=$(docker inspect -f '{{if .State.Health}}{{.State.Health.Status}}{{else}}none{{end}}' "${cid[$service]}" 2>/dev/null || echo gone)
        [[ $status == healthy ]] && return 0
        ((SECONDS < deadline)) || die "$service is not healthy (status: $status)"
        sleep 1
    done
}
for s in authority "${nodes[@]}"; do wait_healthy "$s" 120; done
say "authority, ${#relays[@]} relays and ${#verifiers[@]} verifiers healthy (gRPC health)"

# Admin and client calls run the image's own binary inside the containers (no shell there).
kf_exec() { local service=$1; shift; docker exec "${cid[$service]}" /keyfleet "$@"; }
admin=(--authority http://127.0.0.1:7000 --admin-token-file /run/secrets/admin_token)
mint() { kf_exec authority token issue "${admin[@]}" --subject "$1" --audience e2e --ttl 9m; }
verify_on() { kf_exec "$1" token verify --verifier http://127.0.0.1:7100 --audience e2e "$2" >/dev/null 2>&1; }
# The same, printing what the node answered (the verdict's reason and detail, or the error) on
# one line, so a wrong verdict in the probe's log says why.
verdict_on() {
    kf_exec "$1" token verify --verifier http://127.0.0.1:7100 --audience e2e "$2" 2>&1 | tr -s ' \n' ' ' | head -c 600
    return "${PIPESTATUS[0]}"
}
active_kid() {
    kf_exec authority keys list "${admin[@]}" --json \
        | python3 -c 'import json,sys; print(next(k["kid"] for k in json.load(sys.stdin)["keys"] if k["state"] == "active"))'
}
rotate() {
    timeout 120 docker exec "${cid[authority]}" /keyfleet keys rotate "${admin[@]}" --timeout 100s >/dev/null \
        || die "keys rotate failed"
}
# Exit 0 when `service` reaches the authority's gRPC health service.
reaches_authority() { timeout 20 docker exec "${cid[$1]}" /keyfleet health --grpc http://authority:7000 >/dev/null 2>&1; }

# The fleet as the authority sees it (`keys list --json`, saved as artifacts/e2e-fleet-<label>.json):
# every relay and verifier listed and connected, each verifier through its region's relay
# (WatcherInfo.via), each relay directly; with `caught-up`, every one of them holding the
# authority's newest version. Prints what is not so yet (nothing when all is).
fleet_problems() {
    local label=$1 mode=${2:-connected} spec='' s
    for s in "${relays[@]}"; do spec+="$s= "; done
    for s in "${verifiers[@]}"; do spec+="$s=${relay_of[$s]} "; done
    kf_exec authority keys list "${admin[@]}" --json >"$work/fleet.json" 2>"$work/fleet.err" \
        || { echo "keys list failed: $(head -c 300 "$work/fleet.err")"; return; }
    cp "$work/fleet.json" "$artifacts/e2e-fleet-$label.json"
    python3 - "$work/fleet.json" "$mode" "$work/fleet.novia" $spec <<'PY' || echo "cannot read keys list --json: $(head -c 200 "$work/fleet.json")"
import json, sys
listing = json.load(open(sys.argv[1]))
mode, novia = sys.argv[2], sys.argv[3]
watchers = {w.get("node_id"): w for w in listing.get("watchers", [])}
version = listing.get("version", 0)
bad = []
for item in sys.argv[4:]:
    node, via = item.split("=", 1)
    w = watchers.get(node)
    if w is None:
        bad.append(f"{node} is not listed (watchers: {sorted(watchers)})")
        continue
    if not w.get("connected"):
        bad.append(f"{node} is not connected")
    if "via" in w:
        if (w.get("via") or "") != via:
            bad.append(f"{node} is listed via {w.get('via')!r}, expected {via or 'the authority directly'!r}")
    else:
        open(novia, "w").write("keys list --json has no 'via' field\n")
    if mode == "caught-up" and w.get("acked_version", 0) < version:
        bad.append(f"{node} holds v{w.get('acked_version')}, the authority is at v{version}")
print("\n".join(bad))
PY
}
# Waits (up to `seconds`) until fleet_problems has nothing to say.
wait_fleet() {
    local label=$1 mode=$2 seconds=$3 deadline problems
    deadline=$((SECONDS + seconds))
    while :; do
        problems=$(fleet_problems "$label" "$mode")
        [[ -z $problems ]] && break
        ((SECONDS < deadline)) || die "keys list ($label): $(echo "$problems" | head -4 | tr '\n' ';')"
        sleep 1
    done
    if [[ -e $work/fleet.novia ]]; then
        say "WARNING: keys list --json shows no 'via' yet: checked that every node is listed and connected, not through which relay"
    fi
}

# --- the layout: region b reaches the authority only through relay-b; keys list shows who follows whom
for s in verifier-b1 verifier-b2; do
    ! reaches_authority "$s" || die "$s reaches the authority directly (it must only see relay-b)"
done
reaches_authority relay-b || die "relay-b does not reach the authority over interregion"
wait_fleet start connected 60
say "keys list: relays connected directly, verifier-a* via relay-a, verifier-b* via relay-b"

# --- before the chaos: one token, verified on every node of both regions --------------------------
token0=$(mint before-chaos) || die "cannot mint a token"
for s in "${nodes[@]}"; do verify_on "$s" "$token0" || die "$s refused a fresh token"; done
kid0=$(active_kid)
say "token minted once (kid ${kid0:0:8}…) verified on ${nodes[*]}"

# --- the probe: verdicts on every running verifier every ~2 s ------------------------------------
probe() {
    local round=0 tok forged s rc out
    # A forged token: the signature's first character changed.
    local sig=${token0##*.}
    local first=${sig:0:1}
    [[ $first == A ]] && first=B || first=A
    forged=${token0%.*}.$first${sig:1}
    while [[ ! -e $work/probe.stop ]]; do
        round=$((round + 1))
        tok=$(mint "probe-$round" 2>/dev/null) || tok=''
        for s in "${nodes[@]}"; do
            [[ $(docker inspect -f '{{.State.Running}}' "${cid[$s]}" 2>/dev/null) == true ]] || { echo "down $s"; continue; }
            for t in "$token0" $tok; do
                rc=0; out=$(verdict_on "$s" "$t") || rc=$?
                case $rc in
                    0) echo "ok $s" ;;
                    1) echo "FALSE_REJECT $s round=$round at=$(date -u +%H:%M:%S.%N | head -c 12) answer: $out" ;;
                    *) echo "unavailable $s rc=$rc" ;;
                esac
            done
            rc=0; out=$(verdict_on "$s" "$forged") || rc=$?
            case $rc in
                0) echo "FALSE_ACCEPT $s round=$round at=$(date -u +%H:%M:%S.%N | head -c 12) answer: $out" ;;
                1) echo "ok-refused $s" ;;
                *) echo "unavailable $s rc=$rc" ;;
            esac
        done
        sleep 2
    done
}
probe >"$work/probe.log" 2>&1 &
probe_pid=$!

# --- the loadtest, in the background ----------------------------------------------------------------
t0=$SECONDS
at() { local wait=$((t0 + $1 - SECONDS)); ((wait > 0)) && sleep "$wait"; return 0; }
if [[ $with_loadtest == 1 ]]; then
    say "loadtest: ${duration}s at $rate req/s over ${#verifiers[@]} verifiers in 2 regions"
    (cd "$here" && exec timeout -k 10 $((duration + 240)) "${compose_cmd[@]}" -p "$project" \
        -f "$here/compose.yaml" run --rm --no-deps -T loadtest) >"$work/loadtest.out" 2>&1 &
    loadtest_pid=$!
fi

# --- the chaos -------------------------------------------------------------------------------------
at 6
say "rotation 1"
rotate
kid1=$(active_kid)
[[ $kid1 != "$kid0" ]] || die "rotation 1 did not change the active key"
say "rotation 1 done: active key ${kid1:0:8}…"

at 12
say "docker kill verifier-a2"
docker kill "${cid[verifier-a2]}" >/dev/null
at 18
say "docker start verifier-a2"
docker start "${cid[verifier-a2]}" >/dev/null

at 22
interregion=$(docker inspect -f '{{range $k, $v := .NetworkSettings.Networks}}{{$k}} {{end}}' "${cid[relay-b]}" | tr ' ' '\n' | grep 'interregion$' || true)
[[ -n $interregion ]] || die "relay-b is not on the interregion network"
say "cutting region b off the authority (relay-b leaves $interregion) for 20s"
docker network disconnect "$interregion" "${cid[relay-b]}"
# (verifier-b* never could: checked at the start.)
! reaches_authority relay-b || die "relay-b still reaches the authority after the cut"
say "region b cannot reach the authority"

at 30
say "rotation 2 (region b still cut off)"
rotate
kid2=$(active_kid)
[[ $kid2 != "$kid1" && $kid2 != "$kid0" ]] || die "rotation 2 did not change the active key"
say "rotation 2 done: active key ${kid2:0:8}…"
# Region b still answers from relay-b's last state: the first token, and one of the new active
# key (published a whole rotation ahead, so relay-b passed it on before the cut).
token2=$(mint during-cut) || die "cannot mint during the cut"
for s in "${region_b[@]}"; do
    verify_on "$s" "$token0" || die "$s refused the first token while cut off"
    verify_on "$s" "$token2" || die "$s refused a token of the new key ${kid2:0:8}… while cut off"
done
fleet_problems cut connected >/dev/null
say "region b verifies while cut off (tokens of ${kid0:0:8}… and ${kid2:0:8}…)"

at 42
say "reconnecting region b (relay-b rejoins $interregion)"
docker network connect --alias relay-b "$interregion" "${cid[relay-b]}"

at 47
# For the record only (relay-b's reconnect backoff decides when): the check that counts is at the end.
lag=$(fleet_problems reconnect caught-up)
say "5s after the reconnect: $([[ -z $lag ]] && echo "every node holds the authority's newest version" || echo "not caught up yet: $(echo "$lag" | head -2 | tr '\n' ';')")"

at 48
say "restarting the authority"
docker restart -t 10 "${cid[authority]}" >/dev/null
wait_healthy authority 60
say "authority healthy again"

# --- the end ---------------------------------------------------------------------------------------
loadtest_rc=0
if [[ -n $loadtest_pid ]]; then
    wait "$loadtest_pid" || loadtest_rc=$?
    loadtest_pid=''
    cp "$work/loadtest.out" "$artifacts/e2e-loadtest.out"
    say "loadtest exited $loadtest_rc"
else
    at "$duration"
fi
touch "$work/probe.stop"
wait "$probe_pid" || true
probe_pid=''
cp "$work/probe.log" "$artifacts/e2e-probe.log"

for s in "${nodes[@]}"; do wait_healthy "$s" 60; done
# Every node reconnected (the verifiers through their relays) and holds the newest version.
wait_fleet end caught-up 90
say "keys list: every node connected through its relay again and holding the authority's newest version"
kf_exec authority keys list "${admin[@]}" >"$artifacts/e2e-keys-list.txt" 2>&1 || true
token1=$(mint after-chaos) || die "cannot mint after the chaos"
kid_end=$(active_kid)
for s in "${nodes[@]}"; do
    verify_on "$s" "$token0" || die "$s refuses the token minted before the chaos"
    verify_on "$s" "$token1" || die "$s refuses a token of the newest key ${kid_end:0:8}… minted after the chaos"
done
say "on every node of both regions: the token minted before the chaos and one of the newest key verify"

failures=()
probe_ok=$(grep -c '^ok' "$work/probe.log" || true)
probe_bad=$(grep -c '^FALSE_' "$work/probe.log" || true)
probe_unavailable=$(grep -c '^unavailable\|^down' "$work/probe.log" || true)
say "probe: $probe_ok right verdicts, $probe_bad wrong, $probe_unavailable skipped (node down)"
((probe_bad == 0)) || failures+=("the probe saw wrong verdicts: $(grep '^FALSE_' "$work/probe.log" | head -3 | tr '\n' ' ')")
((probe_ok > 0)) || failures+=("the probe got no verdict")

if [[ $with_loadtest == 1 ]]; then
    for f in loadtest.json loadtest.html; do
        [[ -f $work/reports/$f ]] && cp "$work/reports/$f" "$artifacts/e2e-$f"
    done
    [[ -f $artifacts/e2e-loadtest.json ]] || failures+=("the loadtest wrote no JSON report")
    ((loadtest_rc == 0)) || failures+=("the loadtest exited $loadtest_rc")
    if [[ -f $artifacts/e2e-loadtest.json ]]; then
        # Checks the report against the pass criteria; prints one line per failure.
        verdict=$(python3 - "$artifacts/e2e-loadtest.json" "$kid0 $kid1 $kid2" "${verifiers[@]}" \
            2>"$work/summary.json" <<'PY'
import json, sys

report = json.load(open(sys.argv[1]))
kids = sys.argv[2].split()
services = sys.argv[3:]
bad = []

def count(v):
    if isinstance(v, dict):
        for key in ("requests", "count", "total"):
            if key in v:
                return v[key]
        return 0
    return v or 0

for field in ("requests", "false_rejects", "false_accepts", "per_node", "per_region"):
    if field not in report:
        bad.append(f"the report has no {field}")
if report.get("requests", 0) <= 0:
    bad.append("no requests were sent")
if report.get("false_rejects", 1) != 0:
    bad.append(f"false_rejects = {report.get('false_rejects')}")
if report.get("false_accepts", 1) != 0:
    bad.append(f"false_accepts = {report.get('false_accepts')}")
per_node = report.get("per_node", {})
if isinstance(per_node, list):
    per_node = {str(n.get("node") or n.get("url") or n.get("name")): n for n in per_node}
for s in services:
    served = sum(count(v) for k, v in per_node.items() if k == s or f"//{s}:" in k)
    if served <= 0:
        bad.append(f"{s} served no requests (per_node: {sorted(per_node)})")
per_region = report.get("per_region", {})
if isinstance(per_region, list):
    per_region = {str(r.get("region") or r.get("name")): r for r in per_region}
if sum(1 for v in per_region.values() if count(v) > 0) < 2:
    bad.append(f"fewer than 2 regions served requests (per_region: {per_region})")
ratio = report.get("tokens_on_multiple_nodes_ratio")
if ratio is None or ratio < 0.9:
    bad.append(f"tokens_on_multiple_nodes_ratio = {ratio} (want >= 0.9)")
for key in ("tokens_on_multiple_regions_ratio", "tokens_in_all_regions_ratio"):
    if key in report and report[key] < 0.9:
        bad.append(f"{key} = {report[key]} (want >= 0.9)")
# Tokens of every key of the run (before, between and after the two rotations) were verified.
if "kids_seen" in report:
    missing = [k for k in kids if k not in report["kids_seen"]]
    if missing:
        bad.append(f"no token of key(s) {missing} was verified under load (kids_seen: {report['kids_seen']})")
print("\n".join(bad))
summary = {k: report.get(k) for k in ("requests", "false_rejects", "false_accepts", "errors", "retries",
                                       "tokens_on_multiple_nodes_ratio", "per_node", "per_region")}
summary["kids_seen"] = len(report.get("kids_seen", []))
summary["p99_us"] = report.get("latency_us", {}).get("p99")
print(json.dumps(summary), file=sys.stderr)
PY
        ) || failures+=("cannot read the loadtest report")
        say "loadtest report: $(cat "$work/summary.json")"
        while IFS= read -r line; do [[ -n $line ]] && failures+=("$line"); done <<<"$verdict"
    fi
fi

{
    echo "project: $project"
    echo "image: $KEYFLEET_IMAGE ($(docker image inspect -f '{{.Size}}' "$KEYFLEET_IMAGE") bytes)"
    echo "keys: $kid0 -> $kid1 -> $kid2"
    echo "probe: $probe_ok right, $probe_bad wrong, $probe_unavailable skipped"
    echo "relays: ${relays[*]}; via in keys list --json: $([[ -e $work/fleet.novia ]] && echo "not shown (not checked)" || echo checked)"
    echo "loadtest: $([[ $with_loadtest == 1 ]] && echo "exit $loadtest_rc, $(cat "$work/summary.json" 2>/dev/null)" || echo skipped)"
    echo "duration: $((SECONDS - started))s"
    ((${#failures[@]} == 0)) || printf 'failure: %s\n' "${failures[@]}"
} >"$artifacts/e2e-summary.txt"

if ((${#failures[@]} > 0)); then
    for f in "${failures[@]}"; do say "FAIL: $f"; done
    exit 1
fi
if [[ $with_loadtest != 1 ]]; then
    say "probe-only run: the scenario works, but this is not the full test (no loadtest)"
fi
