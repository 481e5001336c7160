#!/usr/bin/env bash
# Scenario "steady" (see README.md in this folder). Exit status: keyfleet loadtest's own.
set -euo pipefail
exec "${KEYFLEET:-keyfleet}" loadtest --local 3 --duration 60s --rate 2000 --tokens 1000 \
  --report-json "${REPORT_DIR:-.}/steady.json" --report-html "${REPORT_DIR:-.}/steady.html" "$@"
