#!/usr/bin/env bash
# Creates the secrets of the overlays, once: for region-a (the authority's) secrets/kek (a
# random 32-byte key-encryption key as 64 hex characters), secrets/admin-token and
# secrets/node-token (the fleet credential every verifier sends to watch the JWKS), and for
# region-b a copy of that same node-token (its relay follows region a's authority, and its
# verifiers present the same credential to the relay).
# Existing files are kept. Never commit them (deploy/.gitignore); in production, take them
# from your secret store.
set -euo pipefail
overlays=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/overlays
dir=$overlays/region-a/secrets
mkdir -p "$dir"
chmod 0700 "$dir"
for name in kek admin-token node-token; do
    if [[ ! -s $dir/$name ]]; then
        (umask 077 && od -An -N32 -tx1 /dev/urandom | tr -d ' \n' >"$dir/$name")
        echo "make-secrets: created $dir/$name"
    fi
done
b=$overlays/region-b/secrets
mkdir -p "$b"
chmod 0700 "$b"
if ! cmp -s "$dir/node-token" "$b/node-token"; then
    (umask 077 && cp "$dir/node-token" "$b/node-token")
    echo "make-secrets: copied the fleet credential to $b/node-token"
fi
