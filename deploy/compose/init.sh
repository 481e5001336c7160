#!/usr/bin/env bash
# Prepares deploy/compose for `docker compose up`: the KEK, admin token and node token (the
# fleet credential verifiers send to watch the JWKS) secrets (random, created once, never
# overwritten) and the folder the loadtest writes its reports to.
#
#   ./init.sh                    # into ./secrets and ./artifacts
#   KEYFLEET_SECRETS_DIR=/x KEYFLEET_REPORT_DIR=/y ./init.sh
#
# The containers run as uid 65532 and read the secrets through bind mounts, so the files must
# be readable by that uid: as root they are chowned to it (mode 0400), otherwise they are made
# readable (0444) inside a folder only you can enter (0700).
# The authority trusts a token or KEK file only when it is its own (uid 65532, 0600 or
# stricter) or root's and writable by nobody else: a file another user owns could have been
# rewritten by them. So with a rootful Docker engine run this as root (sudo ./init.sh); with
# rootless Docker your files appear as root's inside the containers and are accepted as they are.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
secrets=${KEYFLEET_SECRETS_DIR:-./secrets}
reports=${KEYFLEET_REPORT_DIR:-./artifacts}
uid=65532

random_hex() { od -An -N32 -tx1 /dev/urandom | tr -d ' \n'; }

mkdir -p "$secrets" "$reports"
chmod 0700 "$secrets"
for name in kek admin_token node_token; do
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
if [[ $(id -u) != 0 ]]; then
    echo "init: not root: the secrets stay yours (0444); a rootful Docker engine shows them as uid $(id -u)'s, which the authority refuses: run sudo $0 to hand them to uid $uid" >&2
fi
echo "init: secrets in $secrets, reports go to $reports"
