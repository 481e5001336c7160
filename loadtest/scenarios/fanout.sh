#!/usr/bin/env bash
# Scenario "fanout" (see README.md in this folder): 10,000 watchers on one local authority, 200
# token revocations and 2 rotations, then the same through one relay. Exit status: the last
# run's (0 when every watcher got every change and ended on the authority's state).
set -euo pipefail
kf="${KEYFLEET:-keyfleet}"
out="${REPORT_DIR:-.}"
"$kf" loadtest fanout --watchers 10000 --revocations 200 --rotations 2 \
  --json "$out/fanout-direct.json" "$@"
exec "$kf" loadtest fanout --watchers 10000 --relays 1 --revocations 200 --rotations 2 \
  --json "$out/fanout-relay.json" "$@"
