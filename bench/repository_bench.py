"""Issue 26's three serving targets for the model repository, on one MiniLM bundle copied into repositories
(docs/benchmarks.md §13):

  1. memory: three models in one process vs one: RSS(3) ≤ 1.2 × RSS(1) + 2 × model size;
  2. ensemble cost: a 4-member mean ensemble at c = 16 ≥ 0.8 × (single-model items/s ÷ 4), both served by the
     same process, cells alternating per round;
  3. hot swap: 2,000 /v1/score requests at c = 16 while version 2 is dropped into the repository and
     `POST /admin/reload` swaps it in: 0 errors, and p99 of the requests sent during the swap (from the reload
     call until 1 s after the first answer from version 2) ≤ 2 × p99 of those answered before it.

    python bench/repository_bench.py BUNDLE --data-dir ../shared/data --out docs/bench_repository.json

The servers are real `rewardserve serve` processes on 127.0.0.1; the load comes from bench/loadgen.py's
closed loop (aiohttp). Medians over rounds where a figure is noisy.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.gpu_check import Server, free_port  # noqa: E402
from bench.loadgen import pct, run_closed_loop  # noqa: E402
from bench.machine import environment  # noqa: E402

KEY = "bench-admin-key"  # the reload route needs a key with the admin scope (a key listed without scopes lacks it)


def rss_mib(pid: int) -> float:
    """Resident memory of the process and its children (MiB), from /proc."""
    import subprocess

    pids = [str(pid)] + subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    total = 0
    for p in pids:
        for line in Path(f"/proc/{p}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total / 1024


def serve(args: list[str], name: str, env_keys: bool = False) -> Server:
    port = free_port()
    argv = [sys.executable, "-m", "service.cli", "serve", *args, "--port", str(port), "--log-level", "warning"]
    if env_keys:
        argv = ["env", f"REWARDSERVE_API_KEYS={KEY} api admin", *argv]
    s = Server(name, argv, port, Path(tempfile.gettempdir()) / f"repo-bench-{name}.log")
    s.wait_ready(600)
    return s


def bodies_for(items: list[dict], model: str | None) -> list[bytes]:
    extra = {"model": model} if model else {}
    return [json.dumps({"prompt": i["prompt"], "response": i["response"], **extra}).encode() for i in items]


def make_repository(root: Path, bundle: Path, models: list[str], ensemble: list[str] | None = None) -> Path:
    """root/<m>/1/ = a copy of the bundle for every model (separate files: nothing is shared between the
    models' sessions but the page cache); root/ens/ensemble.json when `ensemble` names members."""
    for m in models:
        shutil.copytree(bundle, root / m / "1")
    if ensemble:
        (root / "ens").mkdir()
        (root / "ens" / "ensemble.json").write_text(json.dumps({"members": ensemble, "aggregate": "mean"}))
    return root


def headers() -> dict:
    return {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}


def memory(bundle: Path, items: list[dict], work: Path) -> dict:
    """RSS after warm-up and 200 requests to every model, one-bundle process vs three-model repository."""
    model_mib = (bundle / "model.onnx").stat().st_size / 2 ** 20 if (bundle / "model.onnx").exists() else None
    out = {"model_file_mib": model_mib}
    one = serve(["--bundle", str(bundle)], "one")
    try:
        run_closed_loop(one.url + "/v1/score", bodies_for(items, None), [1] * len(items), 0, 8, 60, 0, 200, 120)
        out["rss_one_mib"] = rss_mib(one.proc.pid)
    finally:
        one.stop()
    repo = make_repository(work / "mem", bundle, ["a", "b", "c"])
    three = serve(["--repository", str(repo), "--default-model", "a"], "three")
    try:
        for m in ("a", "b", "c"):
            run_closed_loop(three.url + "/v1/score", bodies_for(items, m), [1] * len(items), 0, 8, 60, 0, 200, 120)
        out["rss_three_mib"] = rss_mib(three.proc.pid)
    finally:
        three.stop()
    bound = 1.2 * out["rss_one_mib"] + 2 * (model_mib or 0)
    out.update(bound_mib=bound, met=out["rss_three_mib"] <= bound)
    return out


def ensemble_cost(bundle: Path, items: list[dict], work: Path, rounds: int, seconds: float) -> dict:
    """Single model `a` vs the 4-member mean ensemble `ens` (members a, b, c, d), same process, c = 16."""
    repo = make_repository(work / "ens", bundle, ["a", "b", "c", "d"], ["a", "b", "c", "d"])
    s = serve(["--repository", str(repo), "--default-model", "a"], "ensemble")
    lengths = [i["n_tokens"] for i in items]
    cells: dict[str, list[float]] = {"single": [], "ensemble": []}
    cursor = {"single": 0, "ensemble": 0}
    try:
        for name, model in (("single", "a"), ("ensemble", "ens")):  # untimed warm-up on items the cells skip
            run_closed_loop(s.url + "/v1/score", bodies_for(items[-300:], model), lengths[-300:], 0, 16, 3, 0,
                            10 ** 9, 120)
        for r in range(rounds):
            order = (("single", "a"), ("ensemble", "ens")) if r % 2 == 0 else (("ensemble", "ens"), ("single", "a"))
            for name, model in order:
                cell = run_closed_loop(s.url + "/v1/score", bodies_for(items[:-300], model), lengths[:-300],
                                       cursor[name], 16, seconds, 1.0, 10 ** 9, 120)
                if cell["errors"]:
                    raise RuntimeError(f"{name} cell had errors: {cell['error_kinds']}")
                cursor[name] += cell["requests"]
                cells[name].append(cell["items_per_s"])
    finally:
        s.stop()
    ratios = [e / (one / 4) for one, e in zip(cells["single"], cells["ensemble"])]
    med = statistics.median(ratios)
    return {"items_per_s": cells, "ratio_per_round": ratios, "ratio_median": med, "met": med >= 0.8}


async def _swap_load(url: str, bodies: list[bytes], total: int, concurrency: int, repo: Path, staged: Path,
                     swap_after: int) -> dict:
    """`total` requests at `concurrency`; after `swap_after` answers, version 2 is moved into the repository
    (one rename) and /admin/reload is called. Every request's (sent, answered, status, version) is kept."""
    import aiohttp

    records: list[tuple[float, float, int, str | None]] = []
    sent = iter(range(total))
    marks: dict[str, float] = {}

    async with aiohttp.ClientSession(headers=headers(), timeout=aiohttp.ClientTimeout(total=300)) as session:
        async def client() -> None:
            for k in sent:
                t0 = time.perf_counter()
                version = None
                try:
                    async with session.post(url + "/v1/score", data=bodies[k % len(bodies)]) as resp:
                        body = await resp.json(content_type=None)
                        status = resp.status
                        version = body.get("version") if status == 200 else None
                except Exception:  # noqa: BLE001 - an error is counted, never raised
                    status = -1
                t1 = time.perf_counter()
                records.append((t0, t1, status, version))
                if version == "2" and "first_v2" not in marks:
                    marks["first_v2"] = t1

        async def swapper() -> None:
            while sum(1 for r in records if r[2] == 200) < swap_after:
                await asyncio.sleep(0.01)
            staged.rename(repo / "a" / "2")
            marks["reload_sent"] = time.perf_counter()
            async with session.post(url + "/admin/reload") as resp:
                marks["reload_status"] = resp.status
                marks["reload_answer"] = await resp.json(content_type=None)
            marks["reload_returned"] = time.perf_counter()

        await asyncio.gather(swapper(), *(client() for _ in range(concurrency)))
    return {"records": records, "marks": marks}


def hot_swap(bundle: Path, items: list[dict], work: Path, total: int, rounds: int) -> dict:
    results = []
    for r in range(rounds):
        repo = make_repository(work / f"swap{r}", bundle, ["a"])
        staged = work / f"swap{r}-v2"
        shutil.copytree(bundle, staged)
        s = serve(["--repository", str(repo)], f"swap{r}", env_keys=True)
        try:
            bodies = bodies_for(items, "a")
            out = asyncio.run(_swap_load(s.url, bodies, total, 16, repo, staged, total // 3))
        finally:
            s.stop()
        rec, marks = out["records"], out["marks"]
        errors = sum(1 for x in rec if x[2] != 200)
        t_r = marks["reload_sent"]
        t_end = marks.get("first_v2", marks["reload_returned"]) + 1.0
        before = [(b - a) * 1000 for a, b, st, _ in rec if b < t_r and st == 200][50:]  # after a short warm-up
        during = [(b - a) * 1000 for a, b, st, _ in rec if t_r <= a <= t_end and st == 200]
        versions = {v: sum(1 for x in rec if x[3] == v) for v in {x[3] for x in rec}}
        p99_before, p99_during = pct(before, 99), pct(during, 99)
        results.append({"requests": len(rec), "errors": errors, "versions": versions,
                        "reload_status": marks.get("reload_status"), "reload_answer": marks.get("reload_answer"),
                        "reload_s": marks["reload_returned"] - t_r,
                        "first_v2_after_reload_s": marks["first_v2"] - t_r if "first_v2" in marks else None,
                        "n_before": len(before), "n_during": len(during),
                        "p50_before_ms": pct(before, 50), "p99_before_ms": p99_before,
                        "p50_during_ms": pct(during, 50), "p99_during_ms": p99_during,
                        "p99_ratio": p99_during / p99_before})
    ratios = [x["p99_ratio"] for x in results]
    return {"rounds": results, "errors": sum(x["errors"] for x in results),
            "p99_ratio_median": statistics.median(ratios),
            "met": all(x["errors"] == 0 and x["reload_status"] == 200 and x["versions"].get("2") for x in results)
            and statistics.median(ratios) <= 2.0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data")
    ap.add_argument("--out", type=Path, default=Path("docs/bench_repository.json"))
    ap.add_argument("--parts", nargs="*", default=["memory", "ensemble", "swap"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=8.0, help="length of one ensemble-cost cell")
    ap.add_argument("--swap-requests", type=int, default=2000)
    args = ap.parse_args()
    from bench.workload import build_workloads

    items = build_workloads(args.bundle, args.data_dir, 0, 8, 6000, 2)["workloads"]["mixed"]
    report: dict = {"machine": environment(), "bundle": str(args.bundle), "args": vars(args) | {
        "bundle": str(args.bundle), "data_dir": str(args.data_dir), "out": str(args.out)}}
    with tempfile.TemporaryDirectory(prefix="repo-bench-") as tmp:
        work = Path(tmp)
        if "memory" in args.parts:
            report["memory"] = memory(args.bundle, items, work)
            print("memory", json.dumps(report["memory"]), flush=True)
        if "ensemble" in args.parts:
            report["ensemble"] = ensemble_cost(args.bundle, items, work, args.rounds, args.seconds)
            print("ensemble", json.dumps(report["ensemble"]), flush=True)
        if "swap" in args.parts:
            report["swap"] = hot_swap(args.bundle, items, work, args.swap_requests, args.rounds)
            print("swap", json.dumps({k: v for k, v in report["swap"].items()}), flush=True)
    args.out.write_text(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()
