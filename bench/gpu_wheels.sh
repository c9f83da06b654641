#!/usr/bin/env bash
# The small wheels bench/gpu_check.py needs on the GPU machine beside what it already has (Python 3.12,
# torch + CUDA, transformers, safetensors, tokenizers, numpy, jinja2, httpx, prometheus-client, uvloop):
# the web stack of the service. Downloaded here into .whl/ (git-ignored through .git/info/exclude), the
# versions this project's venv runs, for CPython 3.12 on x86-64 manylinux. Then, on the GPU machine, one run
# (carry: .whl; ≤ 8 minutes of the device time):
#
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
#       .whl/*.whl && export PYTHONPATH=/tmp/site && PYTHONUNBUFFERED=1 python3 bench/gpu_check.py \
#       --out $OUT/gpu_check.json 2>&1 | tee $OUT/gpu_check.log
#
# Usage: bash bench/gpu_wheels.sh [DEST]   (default .whl in the repository root)
set -euo pipefail
cd "$(dirname "$0")/.."
dest="${1:-.whl}"
grep -qx "/${dest}/" .git/info/exclude 2>/dev/null || echo "/${dest}/" >> .git/info/exclude
python="${PYTHON:-.venv/bin/python}"
# name==version of each, as installed here (pure-Python wheels, except pydantic-core and httptools)
wheels=$("$python" - <<'EOF'
from importlib.metadata import version
names = ["fastapi", "starlette", "uvicorn", "pydantic", "pydantic-core", "pydantic-settings", "python-dotenv",
         "annotated-types", "typing-inspection", "typing-extensions", "h11", "click", "anyio", "idna",
         "httptools"]
print(" ".join(f"{n}=={version(n)}" for n in names))
EOF
)
mkdir -p "$dest"
# shellcheck disable=SC2086
"$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$dest" $wheels
ls -1 "$dest"
du -sh "$dest"
