"""What a benchmark ran on: CPU model, cores, Python and package versions, date, command line."""

from __future__ import annotations

import datetime as dt
import os
import platform
import shlex
import subprocess
import sys

PACKAGES = ("onnxruntime", "fastapi", "uvicorn", "litserve", "aiohttp", "numpy", "tokenizers")


def cpu_model() -> str:
    """lscpu's "Model name", or "unknown"."""
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def environment(packages: tuple[str, ...] = PACKAGES) -> dict:
    import importlib.metadata as md

    versions = {}
    for pkg in packages:
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    return {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "cpu": cpu_model(),
            "cores": os.cpu_count(), "python": platform.python_version(), "versions": versions,
            "command": " ".join(shlex.quote(a) for a in sys.argv)}
