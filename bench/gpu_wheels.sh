#!/usr/bin/env bash
# The small wheels bench/gpu_check.py needs on the GPU machine beside what it already has (Python 3.12,
# torch + CUDA, transformers, safetensors, tokenizers, numpy, jinja2, httpx and its anyio/idna/h11,
# prometheus-client, uvloop): the web stack of the service.
#
# Here (download): the dependency closure of fastapi, uvicorn, pydantic-settings, httptools and
# prometheus-client as this project's venv has it (the versions it runs, markers evaluated for Python 3.12),
# for CPython 3.12 on x86-64 manylinux, into .whl/ (git-ignored through .git/info/exclude).
#
# There (--install): only what the device lacks is installed. A carried wheel is skipped when the device has
# that distribution at a version every carried package accepts; it is installed when the device lacks it or
# has a version one of them refuses (each decision printed). Carrying a package the device already has and
# putting it first on PYTHONPATH shadowed the device's own copy: an anyio that needed sniffio (neither on the
# device nor carried) broke `import fastapi`. A requirement that is neither on the device nor carried is
# printed as a warning, and gpu_check.py prints the exception of every module that does not import.
#
# The one device run (carry: .whl; ≤ 8 minutes of device time, `--quick` < 4):
#
#   bash bench/gpu_wheels.sh --install .whl /tmp/site && export PYTHONPATH=/tmp/site && \
#       PYTHONUNBUFFERED=1 python3 bench/gpu_check.py --out $OUT/gpu_check.json 2>&1 | tee $OUT/gpu_check.log
#
# Usage: bash bench/gpu_wheels.sh [DEST]                     (here; default .whl in the repository root)
#        bash bench/gpu_wheels.sh --install [SRC [TARGET]]   (on the device; default .whl, /tmp/site;
#                                                             DRY_RUN=1: print the decisions only)
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--install" ]; then
    src="${2:-.whl}"
    target="${3:-/tmp/site}"
    exec "${PYTHON:-python3}" - "$src" "$target" <<'EOF'
import os
import re
import subprocess
import sys
import zipfile
from importlib.metadata import PackageNotFoundError, requires, version
from pathlib import Path

try:
    from packaging.requirements import Requirement
except ImportError:  # pip vendors it
    from pip._vendor.packaging.requirements import Requirement


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


src, target = Path(sys.argv[1]), sys.argv[2]
wheels = {}  # name -> (file, its unconditional requirements on this interpreter)
for wheel in sorted(src.glob("*.whl")):
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        lines = z.read(meta).decode("utf-8", "replace").splitlines()
    reqs = [Requirement(line.split(":", 1)[1].strip()) for line in lines if line.startswith("Requires-Dist:")]
    wheels[norm(wheel.name.split("-")[0])] = (wheel, [r for r in reqs if r.marker is None or r.marker.evaluate({"extra": ""})])
def device_requires(name: str) -> list:
    return [r for r in map(Requirement, requires(name) or []) if r.marker is None or r.marker.evaluate({"extra": ""})]


# Install what the device lacks; then, until nothing changes, also each carried package the device has at a
# version refused by what will be in effect (a carried wheel's requirements where it is installed, the
# device's own package's where it is kept: a kept pydantic keeps needing its own pydantic-core).
have = {}
for name in wheels:
    try:
        have[name] = version(name)
    except PackageNotFoundError:
        pass
install = {name: f"the device lacks {name}" for name in wheels if name not in have}
while True:
    wanted = {}  # name -> [(required by, specifier)]
    for name in set(wheels) | set(have):
        for r in (wheels[name][1] if name in install else device_requires(name) if name in have else []):
            wanted.setdefault(norm(r.name), []).append((name, r.specifier))
    more = {}
    for name in wheels:
        refused = [f"{by} needs {name}{spec}" for by, spec in wanted.get(name, [])
                   if name not in install and not spec.contains(have[name], prereleases=True)]
        if refused:
            more[name] = f"the device's {name} {have[name]} is refused ({'; '.join(refused)})"
    if not more:
        break
    install.update(more)
for name, (wheel, _) in wheels.items():
    print(f"install {wheel.name}: {install[name]}" if name in install
          else f"keep the device's {name} {have[name]} (carried {wheel.name.split('-')[1]}, not installed)")
for name, by in sorted(wanted.items()):
    if name not in wheels:
        try:
            version(name)
        except PackageNotFoundError:
            print(f"WARNING: {name} (needed by {by[0][0]}) is neither on the device nor carried")
if install and not os.environ.get("DRY_RUN"):
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--no-cache-dir", "--upgrade", "--target", target, *(str(wheels[n][0]) for n in install)],
                   check=True)
print(f"{len(install)} of {len(wheels)} carried wheels installed into {target}" + (" (dry run)" if os.environ.get("DRY_RUN") else ""))
EOF
fi

dest="${1:-.whl}"
case "$dest" in /*) ;; *) grep -qx "/${dest}/" .git/info/exclude 2>/dev/null || echo "/${dest}/" >> .git/info/exclude ;; esac
python="${PYTHON:-.venv/bin/python}"
# name==version of the closure, as installed here (pure-Python wheels, except pydantic-core and httptools)
wheels=$("$python" - <<'EOF'
import re
from importlib.metadata import PackageNotFoundError, requires, version

from packaging.requirements import Requirement

ROOTS = ["fastapi", "uvicorn", "pydantic-settings", "httptools", "prometheus-client"]
ENV = {"python_version": "3.12", "python_full_version": "3.12.3", "extra": "", "sys_platform": "linux",
       "platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython",
       "platform_python_implementation": "CPython", "os_name": "posix"}
norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()  # noqa: E731
seen, todo = {}, list(ROOTS)
while todo:
    name = norm(todo.pop())
    if name in seen:
        continue
    try:
        seen[name] = version(name)
    except PackageNotFoundError:
        raise SystemExit(f"{name} is needed but not installed in this venv")
    for line in requires(name) or []:
        r = Requirement(line)
        if r.marker is None or r.marker.evaluate(ENV):
            todo.append(r.name)
print(" ".join(f"{n}=={v}" for n, v in sorted(seen.items())))
EOF
)
mkdir -p "$dest"
# shellcheck disable=SC2086
"$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$dest" $wheels
ls -1 "$dest"
du -sh "$dest"
