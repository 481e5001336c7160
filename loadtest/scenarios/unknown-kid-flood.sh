#!/usr/bin/env bash
# Scenario "unknown-kid-flood" (see README.md in this folder). Exit status: keyfleet loadtest's own.
set -euo pipefail
exec "${KEYFLEET:-keyfleet}" loadtest --local 3 --duration 30s --concurrency 32 --invalid-ratio 0.5 --invalid-kind unknown-kid \
  --report-json "${REPORT_DIR:-.}/unknown-kid-flood.json" --report-html "${REPORT_DIR:-.}/unknown-kid-flood.html" "$@"
