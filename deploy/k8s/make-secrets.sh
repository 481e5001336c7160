#!/usr/bin/env bash
# Creates the authority's secrets for the region-a overlay, once: secrets/kek (a random
# 32-byte key-encryption key as 64 hex characters) and secrets/admin-token. Existing files are
# kept. Never commit them (deploy/.gitignore); in production, take them from your secret store.
set -euo pipefail
dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/overlays/region-a/secrets
mkdir -p "$dir"
chmod 0700 "$dir"
for name in kek admin-token; do
    if [[ ! -s $dir/$name ]]; then
        (umask 077 && od -An -N32 -tx1 /dev/urandom | tr -d ' \n' >"$dir/$name")
        echo "make-secrets: created $dir/$name"
    fi
done
