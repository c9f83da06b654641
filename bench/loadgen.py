"""The serving benchmark's load generator: bounded closed-loop HTTP clients (asyncio + aiohttp), latency
percentiles, and rewardserve's /metrics counters around a cell.

Closed loop: each of `concurrency` clients sends its next request when the previous answer arrives,
for `duration` seconds (or `max_requests` requests). Throughput counts answers that arrive after the
warm-up; latency percentiles cover the requests sent after the warm-up, each waited for (slow ones are
not lost). Request k of a cell is body (start + k) mod len(bodies), so a cell can begin where the
previous one stopped and never repeat an item.
"""

from __future__ import annotations

import asyncio
import itertools
import resource
import time
import urllib.request

import numpy as np

# rewardserve's counters whose change over a cell gives its batching (padding efficiency, batch size)
METRICS = ("rewardserve_padding_efficiency_sum", "rewardserve_padding_efficiency_count",
           "rewardserve_batch_size_sum", "rewardserve_batch_tokens_sum", "rewardserve_model_run_seconds_sum",
           "rewardserve_cache_hits_total")


def pct(values, q: float) -> float:
    """The q-th percentile of `values`, nan when there are none."""
    values = np.asarray(values, dtype=float)
    return float(np.percentile(values, q)) if values.size else float("nan")


def _rusage() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def closed_loop(url: str, bodies: list[bytes], lengths: list[int], start: int, concurrency: int,
                      duration: float, warmup: float, max_requests: int, timeout: float) -> dict:
    import aiohttp

    records: list[tuple[float, float, int, int]] = []  # (sent, answered, status, body index)
    errors: dict[str, int] = {}
    counter = itertools.count()
    connector = aiohttp.TCPConnector(limit=concurrency, limit_per_host=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=timeout),
                                     headers={"Content-Type": "application/json"}) as session:
        t_start = time.perf_counter()
        t_end = t_start + duration

        async def client() -> None:
            while True:
                i = next(counter)
                if i >= max_requests or time.perf_counter() >= t_end:
                    return
                k = (start + i) % len(bodies)
                t0 = time.perf_counter()
                try:
                    async with session.post(url, data=bodies[k]) as resp:
                        await resp.read()
                        status = resp.status
                except Exception as exc:  # noqa: BLE001 - counted, reported
                    status = -1
                    errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
                if status != 200 and status != -1:
                    errors[str(status)] = errors.get(str(status), 0) + 1
                records.append((t0, time.perf_counter(), status, k))

        cpu0 = _rusage()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        t_done = time.perf_counter()
        cpu = _rusage() - cpu0
    w0 = t_start + warmup
    window = t_end - w0
    done_in_window = [r for r in records if r[2] == 200 and w0 <= r[1] <= t_end]
    lat = [(r[1] - r[0]) * 1000 for r in records if r[0] >= w0 and r[2] == 200]
    return {
        "requests": len(records), "measured": len(lat), "errors": sum(errors.values()), "error_kinds": errors,
        "items_per_s": len(done_in_window) / window,
        "tokens_per_s": sum(lengths[r[3]] for r in done_in_window) / window,
        "p50_ms": pct(lat, 50), "p90_ms": pct(lat, 90), "p99_ms": pct(lat, 99),
        "mean_ms": float(np.mean(lat)) if lat else float("nan"),
        "wall_s": t_done - t_start, "loadgen_cpu_pct": 100 * cpu / (t_done - t_start),
        "real_tokens_sent": sum(lengths[r[3]] for r in records if r[2] == 200),
    }


def run_closed_loop(*args, **kwargs) -> dict:
    """closed_loop in a fresh event loop (one per cell)."""
    return asyncio.run(closed_loop(*args, **kwargs))


async def _post_json(url: str, body: bytes, timeout: float) -> tuple[int, dict, float]:
    import aiohttp

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session:
        t0 = time.perf_counter()
        async with session.post(url, data=body, headers={"Content-Type": "application/json"}) as resp:
            payload = await resp.json()
            return resp.status, payload, time.perf_counter() - t0


def post_json(url: str, body: bytes, timeout: float = 120) -> tuple[int, dict, float]:
    """One request: (status, JSON answer, seconds from send to answer)."""
    return asyncio.run(_post_json(url, body, timeout))


def scrape(url: str) -> dict[str, float]:
    """The METRICS counters of the server at `url` (its /metrics page)."""
    out = {}
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        for line in r.read().decode().splitlines():
            name, _, value = line.partition(" ")
            if name in METRICS:
                out[name] = float(value)
    return out


def batching_fields(before: dict[str, float], after: dict[str, float], real_tokens_sent: int) -> dict:
    """What the server's counters say about a cell: model runs, padding efficiency (per-run mean, and real
    tokens sent / padded tokens run), mean batch size, cache hits."""
    d = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    out = {"cache_hits": d.get("rewardserve_cache_hits_total", 0)}
    runs = d.get("rewardserve_padding_efficiency_count", 0)
    if runs:
        out["model_runs"] = runs
        out["padding_efficiency_mean"] = d["rewardserve_padding_efficiency_sum"] / runs
        out["padding_efficiency_tokens"] = real_tokens_sent / d["rewardserve_batch_tokens_sum"]
        out["mean_batch_size"] = d["rewardserve_batch_size_sum"] / runs
    return out
