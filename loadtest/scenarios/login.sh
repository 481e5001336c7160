#!/usr/bin/env bash
# Scenario "login" (see README.md in this folder): persistent login under load. 200 users log in,
# refresh every 3 s and are checked on random nodes with scopes and step-up demands (every verdict
# known); mid-run a thief replays 5 victims' spent refresh tokens, one after another. Exit status:
# keyfleet loadtest's own (1 if an honest user was refused, a theft went undetected, or a node took
# longer than --revocation-bound, 1s by default, to refuse the stolen session with SESSION_REVOKED).
#
# DURATION=5m overrides the 60 s run (clap refuses a second --duration).
#
# The JSON report (login.json) has these stable fields:
#   scenario ("login"), nodes, users, duration_seconds, refresh_every_seconds,
#   logins, login_p99_ms,
#   refreshes, refreshes_per_second, refresh_p50_ms, refresh_p99_ms, refresh_max_ms, refresh_failures,
#   verifies, verifies_per_second, verify_p99_ms, verified_valid, refused_insufficient_scope,
#   refused_login_too_old, false_rejects, false_accepts, wrong_reasons, verify_errors,
#   thefts[]: victim, session_id, t, valid_before, detected, replay_code, replay_message,
#             session_ended, end_reason, nodes[] {node, ms, last_reason}, revoked_everywhere, max_ms,
#   theft_detected, revocation_p50_ms, revocation_p99_ms, revocation_max_ms, revocation_bound_ms,
#   revocation_within_bound, passed, failures[].
set -euo pipefail
exec "${KEYFLEET:-keyfleet}" loadtest --scenario login --local 3 --duration "${DURATION:-60s}" --users 200 \
  --refresh-every 3s --thefts 5 --concurrency 16 \
  --report-json "${REPORT_DIR:-.}/login.json" "$@"
