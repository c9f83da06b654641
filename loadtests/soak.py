"""Soak test: find the server's capacity, hold a fraction of it for a while, watch errors and memory.

    .venv/bin/python loadtests/soak.py --bundle runs/bundle --duration 600 --out runs/soak   # the 10-minute soak
    .venv/bin/python loadtests/soak.py --bundle B --duration 30 --probe 5 --out DIR          # CI (tests/test_soak.py)
    .venv/bin/python loadtests/soak.py --url http://127.0.0.1:8000 --pid 1234 ...            # an already running server

Steps:
  1. start `rewardserve serve` on a free 127.0.0.1 port (unless --url/--pid name a running server);
  2. capacity probe: locust headless for --probe seconds, closed loop (no wait), same scenario:
     capacity = completed requests/s; this also warms the server up (allocator pools, ONNX Runtime
     buffers for every shape), so the soak's memory baseline is taken after warm-up;
  3. soak: locust headless for --duration seconds at --load × capacity (constant throughput per user);
     the server's RSS is sampled every second (psutil) and the machine's load average every 10 s;
  4. summary: locust's CSV files (<out>/<scenario>_stats.csv, _failures.csv, _stats_history.csv),
     <out>/soak.json and a printed table. RSS growth = (median RSS of the last 10 % of the soak −
     median of its first 10 %) / the latter. The script exits 1 on any failed request, any refusal
     or drop counted by the server, or RSS growth ≥ --max-rss-growth.

Locust and the server share the machine; on a small shared box the capacity measured is that of the
pair, and noisy neighbours show in the load average that is recorded with the result.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil

REPO = Path(__file__).resolve().parents[1]
LOCUSTFILE = Path(__file__).resolve().parent / "locustfile.py"
SCENARIOS = {"rlhf": ["RLHFScoring"], "bestofn": ["BestOfN"], "mixed": ["RLHFScoring", "BestOfN"]}
# One thread each for the model and the tokenizer (locust needs the rest of a small machine). The score
# cache is kept small so that it is full after the probe: its memory is bounded by design (an LRU of
# cache_size entries), and a soak that measured it filling up would report growth that is no leak, while
# a full cache keeps its eviction path under test for the whole soak.
DEFAULT_SERVER_ARGS = ["--intra-op-threads", "1", "--tokenizer-threads", "1", "--cache-size", "2000"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(bundle: Path, out: Path, server_args: list[str]) -> tuple[str, subprocess.Popen]:
    port = free_port()
    log = open(out / "server.log", "wb")
    env = {k: v for k, v in os.environ.items() if not k.startswith("REWARDSERVE_")}
    proc = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--bundle", str(bundle), "--host",
                             "127.0.0.1", "--port", str(port), "--log-level", "warning", *server_args],
                            stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"server exited with {proc.returncode}; see {out / 'server.log'}")
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return url, proc
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    sys.exit("server not ready after 120 s")


def run_locust(url: str, classes: list[str], users: int, seconds: float, prefix: Path,
               rate_per_user: float = 0.0) -> dict:
    """Run locust headless; return the 'Aggregated' row of its stats CSV plus failure details."""
    env = {**os.environ, "LOCUST_RATE_PER_USER": str(rate_per_user)}
    argv = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--only-summary",
            "-u", str(users), "-r", str(users), "-t", f"{int(round(seconds))}s", "--stop-timeout", "10",
            "--host", url, "--csv", str(prefix), "--csv-full-history", "--exit-code-on-error", "0",
            "--loglevel", "WARNING", *classes]
    with open(f"{prefix}.log", "wb") as log:
        subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env,
                       timeout=seconds + 120, check=True)
    rows = {row["Name"]: row for row in csv.DictReader(open(f"{prefix}_stats.csv"))}
    total = rows["Aggregated"]
    failures = list(csv.DictReader(open(f"{prefix}_failures.csv")))
    return {"requests": int(total["Request Count"]), "failures": int(total["Failure Count"]),
            "rps": float(total["Requests/s"]), "p50_ms": float(total["50%"]), "p95_ms": float(total["95%"]),
            "p99_ms": float(total["99%"]), "max_ms": float(total["Max Response Time"]),
            "by_route": {name: {"requests": int(r["Request Count"]), "failures": int(r["Failure Count"]),
                                "p50_ms": float(r["50%"]), "p99_ms": float(r["99%"])}
                         for name, r in rows.items() if name != "Aggregated"},
            "failure_examples": [{"name": f["Name"], "error": f["Error"], "count": int(f["Occurrences"])}
                                 for f in failures[:5]]}


def metric_sum(text: str, name: str, **labels) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name):
            continue
        match = re.match(re.escape(name) + r"(\{[^}]*\})? (\S+)$", line)
        if match and all(f'{k}="{v}"' in (match.group(1) or "") for k, v in labels.items()):
            total += float(match.group(2))
    return total


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    where = ap.add_mutually_exclusive_group(required=True)
    where.add_argument("--bundle", type=Path, help="start a server on this bundle")
    where.add_argument("--url", help="use a running server (give --pid for its memory)")
    ap.add_argument("--pid", type=int, help="pid of the server at --url")
    ap.add_argument("--scenario", choices=sorted(SCENARIOS), default="mixed")
    ap.add_argument("--duration", type=float, default=600, help="soak seconds")
    ap.add_argument("--probe", type=float, default=20, help="capacity probe seconds")
    ap.add_argument("--load", type=float, default=0.7, help="fraction of the measured capacity to hold")
    ap.add_argument("--users", type=int, default=8, help="locust users in the soak")
    ap.add_argument("--probe-users", type=int, default=16, help="locust users in the closed-loop probe")
    ap.add_argument("--max-rss-growth", type=float, default=0.05)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--server-arg", action="append", default=None,
                    help="`rewardserve serve` flag (repeat; replaces the default: "
                         + " ".join(DEFAULT_SERVER_ARGS) + ")")
    args = ap.parse_args(argv)
    if args.url and not args.pid:
        ap.error("--url needs --pid (the server's memory is what the soak watches)")
    args.out.mkdir(parents=True, exist_ok=True)
    server_args = args.server_arg if args.server_arg is not None else DEFAULT_SERVER_ARGS
    proc = None
    if args.bundle:
        url, proc = start_server(args.bundle, args.out, server_args)
        pid = proc.pid
    else:
        url, pid = args.url.rstrip("/"), args.pid
    server = psutil.Process(pid)
    classes = SCENARIOS[args.scenario]
    try:
        print(f"probe: {args.probe:g} s closed loop, {args.probe_users} users, scenario {args.scenario}", flush=True)
        probe = run_locust(url, classes, args.probe_users, args.probe, args.out / f"{args.scenario}_probe")
        capacity = probe["requests"] / args.probe if probe["rps"] <= 0 else probe["rps"]
        target = args.load * capacity
        print(f"capacity {capacity:.1f} req/s (probe p50 {probe['p50_ms']:.0f} ms, failures {probe['failures']}); "
              f"soak at {target:.1f} req/s for {args.duration:g} s", flush=True)
        metrics_before = httpx.get(url + "/metrics", timeout=10).text

        samples: list[tuple[float, int]] = []
        loads: list[tuple[float, float]] = []
        stop = threading.Event()
        t0 = time.monotonic()

        def sample():
            while not stop.is_set():
                now = time.monotonic() - t0
                samples.append((now, server.memory_info().rss))
                if not loads or now - loads[-1][0] >= 10:
                    loads.append((now, os.getloadavg()[0]))
                stop.wait(1.0)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            soak = run_locust(url, classes, args.users, args.duration, args.out / args.scenario,
                              rate_per_user=target / args.users)
        finally:
            stop.set()
            sampler.join(5)
        metrics_after = httpx.get(url + "/metrics", timeout=10).text
        alive = server.is_running() and httpx.get(url + "/readyz", timeout=10).status_code == 200
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()

    window = max(3, len(samples) // 10)
    start_rss = statistics.median(r for _, r in samples[:window])
    end_rss = statistics.median(r for _, r in samples[-window:])
    peak_rss = max(r for _, r in samples)
    refused = {reason: metric_sum(metrics_after, "rewardserve_rejected_total", reason=reason)
               - metric_sum(metrics_before, "rewardserve_rejected_total", reason=reason)
               for reason in ("queue_full", "draining", "too_large", "too_long", "deadline", "disconnected",
                              "error")}
    server_5xx = sum(metric_sum(metrics_after, "rewardserve_requests_total", status=str(code))
                     - metric_sum(metrics_before, "rewardserve_requests_total", status=str(code))
                     for code in (500, 503, 504))
    result = {
        "scenario": args.scenario, "duration_s": args.duration, "load_fraction": args.load,
        "capacity_rps": round(capacity, 2), "target_rps": round(target, 2), "achieved_rps": soak["rps"],
        "requests": soak["requests"], "failures": soak["failures"], "server_5xx": server_5xx,
        "server_refusals_and_drops": {k: v for k, v in refused.items() if v},
        "latency_ms": {k: soak[k] for k in ("p50_ms", "p95_ms", "p99_ms", "max_ms")},
        "by_route": soak["by_route"], "failure_examples": soak["failure_examples"],
        "rss_start_mb": round(start_rss / 2**20, 1), "rss_end_mb": round(end_rss / 2**20, 1),
        "rss_peak_mb": round(peak_rss / 2**20, 1), "rss_growth": round((end_rss - start_rss) / start_rss, 4),
        "rss_samples": len(samples), "load_average": [round(v, 2) for _, v in loads],
        "cpu_count": os.cpu_count(), "server_ready_after": alive,
        "probe": {k: probe[k] for k in ("requests", "failures", "rps", "p50_ms", "p99_ms")},
    }
    (args.out / "soak.json").write_text(json.dumps(result, indent=2))
    with open(args.out / "rss.csv", "w") as f:
        f.write("seconds,rss_bytes\n" + "".join(f"{t:.1f},{r}\n" for t, r in samples))
    ok = (result["failures"] == 0 and not result["server_refusals_and_drops"] and server_5xx == 0
          and result["rss_growth"] < args.max_rss_growth and alive and result["requests"] > 0)
    print(json.dumps({k: v for k, v in result.items() if k not in ("by_route",)}, indent=2))
    print(f"\nsoak {'PASSED' if ok else 'FAILED'}: {result['requests']} requests at {result['achieved_rps']:.1f} "
          f"req/s ({args.load:.0%} of {capacity:.1f}), {result['failures']} failures, RSS "
          f"{result['rss_start_mb']} -> {result['rss_end_mb']} MB ({result['rss_growth']:+.2%}), load average "
          f"{result['load_average']} on {os.cpu_count()} cores")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
