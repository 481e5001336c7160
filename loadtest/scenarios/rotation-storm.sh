#!/usr/bin/env bash
# Scenario "rotation-storm" (see README.md in this folder). Exit status: keyfleet loadtest's own.
set -euo pipefail
exec "${KEYFLEET:-keyfleet}" loadtest --local 3 --duration 30s --concurrency 32 --rotate-every 1s \
  --report-json "${REPORT_DIR:-.}/rotation-storm.json" --report-html "${REPORT_DIR:-.}/rotation-storm.html" "$@"
