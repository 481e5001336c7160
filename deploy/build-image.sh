#!/usr/bin/env bash
# Builds the keyfleet container image from a checkout: a static release binary (glibc,
# static-pie) in its own target dir, then a FROM scratch image around it (deploy/docker/).
#
#   deploy/build-image.sh                 # builds keyfleet:local
#   KEYFLEET_IMAGE=registry.example/keyfleet:1.2.3 deploy/build-image.sh
#   KEYFLEET_BINARY=path/to/static/keyfleet deploy/build-image.sh   # skip cargo, use this binary
#
# Environment: KEYFLEET_IMAGE (tag, default keyfleet:local), KEYFLEET_STATIC_TARGET_DIR
# (default target/static, kept apart from the normal build cache), KEYFLEET_BINARY,
# KEYFLEET_CARGO_LOCKED (default 1: build with --locked, like CI).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
image=${KEYFLEET_IMAGE:-keyfleet:local}
target_dir=${KEYFLEET_STATIC_TARGET_DIR:-$root/target/static}
case "$(uname -m)" in
    x86_64) triple=x86_64-unknown-linux-gnu ;;
    aarch64 | arm64) triple=aarch64-unknown-linux-gnu ;;
    *) echo "build-image: unsupported machine $(uname -m)" >&2; exit 1 ;;
esac

if ! docker info >/dev/null 2>&1; then
    echo "build-image: no Docker engine answers (docker info failed); the image needs Docker" >&2
    exit 1
fi

binary=${KEYFLEET_BINARY:-}
if [[ -z $binary ]]; then
    locked=()
    [[ ${KEYFLEET_CARGO_LOCKED:-1} == 1 ]] && locked=(--locked)
    # crt-static links glibc statically (a static-pie that runs in FROM scratch). It is added as
    # target.<triple>.rustflags, which cargo joins with the workspace's own target rustflags
    # (.cargo/config.toml: the curve25519 IFMA backend). An inherited RUSTFLAGS (CI exports
    # -D warnings) would replace all of them, so the image build ignores it.
    if [[ -n ${RUSTFLAGS:-} ]]; then
        echo "build-image: ignoring RUSTFLAGS='$RUSTFLAGS' (the image uses the workspace's rustflags)" >&2
        unset RUSTFLAGS
    fi
    unset CARGO_ENCODED_RUSTFLAGS
    cargo build --manifest-path "$root/Cargo.toml" --release "${locked[@]}" \
        --config "target.$triple.rustflags=[\"-C\", \"target-feature=+crt-static\"]" \
        --target "$triple" --target-dir "$target_dir" -p keyfleet --bin keyfleet
    binary=$target_dir/$triple/release/keyfleet
fi
[[ -x $binary ]] || { echo "build-image: no executable at $binary" >&2; exit 1; }
if command -v readelf >/dev/null && readelf -l "$binary" | grep -q 'INTERP'; then
    echo "build-image: $binary is dynamically linked; FROM scratch needs a static binary" >&2
    exit 1
fi

# A small, clean build context: the binary, the few /etc files, an empty state directory.
context=$target_dir/docker-context
rm -rf "$context"
mkdir -p "$context/state"
# The servers refuse a data or cache dir that group or others can write: never let a umask of
# 002 leak into the image's state directories.
chmod 0700 "$context/state"
cp -R "$root/deploy/docker/rootfs" "$context/rootfs"
cp "$root/deploy/docker/Dockerfile" "$context/Dockerfile"
cp "$binary" "$context/keyfleet"
strip --strip-all "$context/keyfleet" 2>/dev/null || true
chmod 0755 "$context/keyfleet"
chmod -R u=rwX,go=rX "$context/rootfs"

version=$("$binary" --version | awk '{print $2}')
revision=$(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown)
# Without the buildx plugin, docker's CLI needs the classic builder, which this Dockerfile
# (no syntax directive, no RUN) is written for; BuildKit builds it the same.
if ! docker buildx version >/dev/null 2>&1; then
    export DOCKER_BUILDKIT=0
fi
docker build --quiet -t "$image" \
    --build-arg VERSION="${version:-dev}" --build-arg REVISION="$revision" \
    "$context" >/dev/null
size=$(docker image inspect -f '{{.Size}}' "$image")
echo "build-image: built $image ($((size / 1024 / 1024)) MiB) from $binary"
docker run --rm "$image" --version
