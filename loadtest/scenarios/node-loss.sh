#!/usr/bin/env bash
# Scenario "node-loss" (see README.md in this folder). Exit status: keyfleet loadtest's own.
set -euo pipefail
exec "${KEYFLEET:-keyfleet}" loadtest --local 4 --duration 40s --concurrency 32 --kill-every 4s --rotate-every 10s \
  --report-json "${REPORT_DIR:-.}/node-loss.json" --report-html "${REPORT_DIR:-.}/node-loss.html" "$@"
