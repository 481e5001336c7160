#!/usr/bin/env bash
# Scenario "fanout" (see README.md in this folder): 10,000 watchers on one local authority, 200
# token revocations and 2 rotations, then the same through one relay. Exit status: the last
# run's (0 when every watcher got every change and ended on the authority's state).
set -euo pipefail
kf="${KEYFLEET:-keyfleet}"
out="${REPORT_DIR:-.}"
# Two watch streams per connection: one connection per watcher needs about 2 descriptors per
# watcher on each side, past the 20,000 open files this project's test machine allows (a server
# gives its gRPC listener half of its descriptors). Pass --connections 1 where the limit allows.
"$kf" loadtest fanout --watchers 10000 --connections 2 --revocations 200 --rotations 2 \
  --json "$out/fanout-direct.json" "$@"
exec "$kf" loadtest fanout --watchers 10000 --connections 2 --relays 1 --revocations 200 \
  --rotations 2 --json "$out/fanout-relay.json" "$@"
