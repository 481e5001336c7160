#!/usr/bin/env bash
# Prepares deploy/compose for `docker compose up`: the KEK and admin token secrets (random,
# created once, never overwritten) and the folder the loadtest writes its reports to.
#
#   ./init.sh                    # into ./secrets and ./artifacts
#   KEYFLEET_SECRETS_DIR=/x KEYFLEET_REPORT_DIR=/y ./init.sh
#
# The containers run as uid 65532 and read the secrets through bind mounts, so the files must
# be readable by that uid: as root they are chowned to it (mode 0400), otherwise they are made
# readable (0444) inside a folder only you can enter (0700).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
secrets=${KEYFLEET_SECRETS_DIR:-./secrets}
reports=${KEYFLEET_REPORT_DIR:-./artifacts}
uid=65532

random_hex() { od -An -N32 -tx1 /dev/urandom | tr -d ' \n'; }

mkdir -p "$secrets" "$reports"
chmod 0700 "$secrets"
for name in kek admin_token; do
    file=$secrets/$name
    if [[ ! -s $file ]]; then
        (umask 077 && random_hex >"$file" && echo >>"$file")
        echo "init: created $file"
    fi
    if [[ $(id -u) == 0 ]]; then
        chown "$uid:$uid" "$file"
        chmod 0400 "$file"
    else
        chmod 0444 "$file"
    fi
done
if [[ $(id -u) == 0 ]]; then
    chown "$uid:$uid" "$reports"
else
    chmod 0777 "$reports"
fi
echo "init: secrets in $secrets, reports go to $reports"
