"""A rollout burst from RLHF clients against rewardserve: how many rewards are lost, and how long it takes.

Each sample is one request, the whole batch sent at once, as OpenRLHF (v0.9+ `request_api_wrapper`, its
v0.11 executor fetching per sample) and verl's reward loop do. The client behaviour is the one in
tests/test_rlhf_burst.py (OpenRLHF: 5 tries 1 s apart, 180 s timeout, then the sample trains without a
reward) plus verl's (5xx and connection errors retried with exponential backoff, 4xx never retried).
A server configuration is a list of `rewardserve serve` flags; the first row is the defaults.

    python bench/rlhf_burst.py --bundle B --samples 2048 --out docs/bench_rlhf_burst.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.contenders import Server, free_port  # noqa: E402
from bench.machine import environment  # noqa: E402
from service.data import demo_data_path, read_pairs  # noqa: E402
from tests.test_rlhf_burst import openrlhf_reward  # noqa: E402

CONFIGS = {
    "defaults": [],
    "item limit 1024, 60 s (the old defaults)": ["--max-queue", "1024", "--request-timeout-s", "60"],
    "item limit 4": ["--max-queue", "4"],
    "item limit 4, 429": ["--max-queue", "4", "--overload-status", "429"],
}


def verl_reward(url: str, query: str, prompt: str, tries: int = 5) -> float | None:
    """verl-style: retry 5xx and connection errors with exponential backoff; a 4xx is final."""
    for attempt in range(tries):
        try:
            r = requests.post(url, json={"query": [query], "prompts": [prompt]}, timeout=180)
            if r.status_code < 400:
                return r.json()["rewards"][0]
            if r.status_code < 500:
                return None
        except requests.RequestException:
            pass
        time.sleep(min(2 ** attempt, 30))
    return None


CLIENTS = {"openrlhf": openrlhf_reward, "verl": verl_reward}


def burst(url: str, client, samples: list[tuple[str, str]]) -> dict:
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=len(samples)) as pool:
        rewards = list(pool.map(lambda s: client(url, *s), samples))
    return {"lost": sum(r is None for r in rewards), "seconds": round(time.monotonic() - started, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--samples", type=int, default=2048)
    ap.add_argument("--clients", nargs="+", default=list(CLIENTS), choices=list(CLIENTS))
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--threads", type=int, default=0, help="server intra-op threads (0: all cores)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    pairs, _ = read_pairs(demo_data_path())
    samples = [(p.prompt + (p.chosen if i % 2 else p.rejected), p.prompt)
               for i, p in enumerate(pairs * (args.samples // len(pairs) + 1))][:args.samples]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for config in args.configs:
            for client in args.clients:
                port = free_port()
                argv = [sys.executable, "-m", "service.cli", "serve", "--bundle", str(args.bundle), "--port",
                        str(port), "--intra-op-threads", str(args.threads), "--cache-size", "0",
                        "--log-level", "warning", *CONFIGS[config]]
                server = Server("rewardserve", argv, port, "/v1/score", "/readyz", Path(tmp) / f"{port}.log")
                server.start()
                try:
                    server.wait_ready(120)
                    row = {"config": config, "flags": CONFIGS[config], "client": client,
                           **burst(server.url + "/get_reward", CLIENTS[client], samples)}
                finally:
                    server.stop()
                rows.append(row)
                print(f"{config:<42} {client:<9} lost {row['lost']:>5} of {args.samples}  {row['seconds']:>7.1f} s",
                      flush=True)
    report = {"samples": args.samples, "bundle": str(args.bundle), "environment": environment(), "rows": rows}
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
