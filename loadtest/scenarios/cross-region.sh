#!/usr/bin/env bash
# Scenario "cross-region" (see README.md in this folder). Exit status: keyfleet loadtest's own.
set -euo pipefail
exec "${KEYFLEET:-keyfleet}" loadtest --local 4 --duration 30s --rate 1500 --pick round-robin --rotate-every 10s \
  --report-json "${REPORT_DIR:-.}/cross-region.json" --report-html "${REPORT_DIR:-.}/cross-region.html" "$@"
