"""The serving benchmark's contenders as server processes on 127.0.0.1: start, wait for ready, measure
their CPU, suspend/resume between cells, stop.

  naive        bench/naive_server.py: FastAPI, one synchronous model run per request (OpenRLHF serve_rm)
  litserve     bench/litserve_server.py: LitServe max_batch_size/batch_timeout batching
  rewardserve  `python -m service.cli serve --bundle ...` with default settings
  variants     NAME=FLAGS: rewardserve again, with extra serve flags

Every contender loads the same bundle with the same ONNX Runtime provider and intra-op threads. A
suspended contender (SIGSTOP to its whole process tree) costs the one under load nothing, not even an
idle poll (LitServe's worker polls its queue every millisecond).
"""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONTENDERS = ("naive", "litserve", "rewardserve")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, name: str, argv: list[str], port: int, score_path: str, health_path: str, log: Path):
        self.name, self.argv, self.port = name, argv, port
        self.url = f"http://127.0.0.1:{port}"
        self.score_path, self.health_path, self.log = score_path, health_path, log
        self.proc: subprocess.Popen | None = None
        self._tree: list = []

    @property
    def is_rewardserve(self) -> bool:
        """rewardserve or one of its variants: it has /metrics and /v1/rank."""
        return self.score_path == "/v1/score"

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("REWARDSERVE_")}
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=env)

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(self.url + self.health_path, timeout=2) as r:
                    if r.status == 200:
                        time.sleep(0.5)
                        self.refresh_tree()
                        return
            except OSError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"{self.name} not ready after {timeout} s:\n{self.log.read_text()[-3000:]}")

    def refresh_tree(self) -> None:
        import psutil

        root = psutil.Process(self.proc.pid)
        self._tree = [root] + root.children(recursive=True)

    def _each(self, method: str) -> None:
        for p in self._tree:
            try:
                getattr(p, method)()
            except Exception:  # noqa: BLE001 - a process of the tree may be gone
                pass

    def cpu_seconds(self) -> float:
        total = 0.0
        for p in self._tree:
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except Exception:  # noqa: BLE001 - a process of the tree may be gone
                pass
        return total

    def suspend(self) -> None:
        self._each("suspend")

    def resume(self) -> None:
        self._each("resume")

    def stop(self) -> None:
        if self.proc is None:
            return
        self.resume()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for p in self._tree[1:]:  # LitServe leaves its workers behind on SIGTERM: end them by pid
            try:
                if p.is_running():
                    p.kill()
            except Exception:  # noqa: BLE001 - already gone
                pass


def make_servers(bundle: Path, log_dir: Path, contenders: list[str], variants: list[str] = (), threads: int = 0,
                 provider: str = "cpu", litserve_batch: int = 16, litserve_timeout: float = 0.005) -> list[Server]:
    """Servers (not started) for `contenders` (names of CONTENDERS), then one rewardserve per variant
    "NAME=FLAGS"; each on a free port, logging to log_dir/NAME.log."""
    unknown = set(contenders) - set(CONTENDERS)
    if unknown:
        raise SystemExit(f"unknown contenders {sorted(unknown)}; known: {', '.join(CONTENDERS)}")
    py, b, t = sys.executable, str(bundle), str(threads)
    servers = []
    if "naive" in contenders:
        port = free_port()
        servers.append(Server("naive", [py, "bench/naive_server.py", "--bundle", b, "--port", str(port),
                                        "--threads", t, "--provider", provider], port, "/score", "/health",
                              log_dir / "naive.log"))
    if "litserve" in contenders:
        port = free_port()
        servers.append(Server("litserve", [py, "bench/litserve_server.py", "--bundle", b, "--port", str(port),
                                           "--threads", t, "--provider", provider,
                                           "--max-batch-size", str(litserve_batch),
                                           "--batch-timeout", str(litserve_timeout)],
                              port, "/predict", "/health", log_dir / "litserve.log"))
    named = [("rewardserve", "")] if "rewardserve" in contenders else []
    for v in variants:
        name, sep, extra = v.partition("=")
        if not sep or not name:
            raise SystemExit(f"--variant wants NAME=FLAGS, got {v!r}")
        named.append((name, extra))
    for name, extra in named:
        port = free_port()
        argv = [py, "-m", "service.cli", "serve", "--bundle", b, "--host", "127.0.0.1", "--port", str(port),
                "--intra-op-threads", t, "--provider", provider, "--log-level", "warning"] + shlex.split(extra)
        servers.append(Server(name, argv, port, "/v1/score", "/readyz", log_dir / f"{name}.log"))
    return servers
