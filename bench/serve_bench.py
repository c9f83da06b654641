"""Serving benchmark (CPU or CUDA): rewardserve vs a naive FastAPI server vs LitServe vs raw ONNX Runtime.

One command starts every contender on 127.0.0.1 as its own subprocess (same bundle, same ONNX
Runtime session options and intra-op threads), then drives each with the same bounded closed-loop
load from this process, at several concurrencies, on two workloads built from real preference texts
(../shared/data/train.jsonl). The parts, each in its own module:

  bench/workload.py     the workloads: fixed128 (every request exactly 128 tokens), mixed (16..512
                        tokens, or the bundle's max_length if smaller), best-of-N prompts
  bench/contenders.py   the contender servers: naive (bench/naive_server.py, one synchronous model run
                        per request, as OpenRLHF's serve_rm), litserve (bench/litserve_server.py,
                        max_batch_size/batch_timeout batching), rewardserve (`python -m service.cli serve`,
                        default settings) and `--variant` rewardserves with extra serve flags
  bench/ceiling.py      the ceiling: raw in-process ONNX Runtime (the session rewardserve builds), no
                        HTTP, no tokenization, items in length-sorted runs (service.scorer) at the batch
                        size that gives the most items/s, scanned every round; its own worker process
  bench/loadgen.py      closed-loop clients, latency percentiles, rewardserve's /metrics around a cell
  bench/serve_bench.py  this file: the order of the cells, the report, the targets and the plot

Only the contender under load runs: the others are suspended (SIGSTOP) between their cells, so an
idle server's polling (LitServe's worker polls its queue every millisecond) costs the others nothing.
Contenders are interleaved cell by cell (order rotated) so that drifting background load on a shared
machine hits them alike: compare ratios, not absolute numbers.

Per cell: `--duration` seconds of closed-loop load (each of `c` clients sends its next request when
the previous answer arrives); throughput counts answers that arrive after the warm-up; latency
percentiles cover the requests sent after the warm-up (each waited for, so slow ones are not lost).
Also best-of-N: `/v1/rank` with 16 candidates vs one batched in-process run of the same 16 items.

  python bench/serve_bench.py --bundle runs/bench_bundle --data-dir ../shared/data \
      --out docs/bench_serving.json --plot docs/bench_serving.png

The ORT session-option comparison is bench/ort_tuning.py; the ceiling alone, bench/ceiling.py.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.ceiling import CeilingProcess, batch_sizes  # noqa: E402
from bench.contenders import CONTENDERS, Server, make_servers  # noqa: E402
from bench.loadgen import batching_fields, pct, post_json, run_closed_loop, scrape  # noqa: E402
from bench.machine import environment  # noqa: E402
from bench.workload import RANK_N, build_workloads  # noqa: E402

PROBE_TOLERANCE = 1e-3  # raw-score difference from the ceiling beyond which a contender is reported


# ---------------------------------------------------------------- the steps of a run

def probe(servers: list[Server], ceiling: CeilingProcess, items: list[dict]) -> dict[str, list[float]]:
    """The same first items through every contender and the ceiling: the same raw scores?"""
    scores = {"ceiling": ceiling.ask("scores", items=items)["scores"]}
    for s in servers:
        got = []
        for it in items:
            status, payload, _ = post_json(s.url + s.score_path,
                                           json.dumps({"prompt": it["prompt"], "response": it["response"]}).encode())
            if status != 200:
                raise RuntimeError(f"{s.name}: probe answered {status} {payload}")
            got.append(payload.get("raw", payload.get("reward")))
        scores[s.name] = got
        diff = float(np.max(np.abs(np.subtract(got, scores["ceiling"]))))
        print(f"probe scores {s.name}: {[round(x, 5) for x in got]} (max |diff| vs ceiling {diff:.1e})", flush=True)
        if diff > PROBE_TOLERANCE:
            print(f"WARNING: {s.name} scores differ from the ceiling's by {diff:.1e}: not the same model run")
        s.suspend()
    return scores


def measure_ceiling(ceiling: CeilingProcess, rnd: int, wname: str, n_items: int) -> dict:
    scan = ceiling.ask("scan", workload=wname, batch_sizes=batch_sizes(wname), n=n_items)
    best_bs = max(scan["items_per_s"], key=lambda k: scan["items_per_s"][k])
    row = {"round": rnd, "workload": wname, "items_per_s": scan["items_per_s"][best_bs],
           "best_batch_size": int(best_bs), "scan": scan["items_per_s"],
           "hint_items_per_s": scan["hint_items_per_s"], "loadavg": os.getloadavg()}
    if wname == "fixed128":
        row["single_p50_ms"] = pct(ceiling.ask("single", workload=wname, n=40)["latencies"], 50) * 1000
    print(f"[round {rnd}] ceiling {wname}: {row['items_per_s']:.1f} items/s at batch {best_bs} "
          f"(scan {json.dumps({k: round(v, 1) for k, v in scan['items_per_s'].items()})}; "
          f"within the runtime's batch hint {scan['hint_items_per_s']:.1f})"
          + (f", single-item p50 {row['single_p50_ms']:.1f} ms" if "single_p50_ms" in row else ""), flush=True)
    return row


def run_cell(s: Server, args, rnd: int, wname: str, c: int, bodies: list[bytes], lengths: list[int],
             start: int) -> dict:
    """One contender at one concurrency: resumed for the cell, suspended after it."""
    s.resume()
    before = scrape(s.url) if s.is_rewardserve else None
    scpu0, la0 = s.cpu_seconds(), os.getloadavg()[0]
    stretch = 1.5 if wname == "mixed" else 1.0
    duration = args.duration * stretch
    warmup = min(args.warmup * stretch, duration / 3)
    row = run_closed_loop(s.url + s.score_path, bodies, lengths, start, c, duration, warmup, args.max_requests,
                          args.request_timeout)
    row["server_cpu_pct"] = 100 * (s.cpu_seconds() - scpu0) / row["wall_s"]
    row.update(round=rnd, workload=wname, concurrency=c, contender=s.name,
               loadavg=[la0, os.getloadavg()[0]], first_item=start)
    if before is not None:
        row.update(batching_fields(before, scrape(s.url), row["real_tokens_sent"]))
    s.suspend()
    if row.get("cache_hits", 0) > 0.01 * row["requests"]:
        print(f"WARNING: {row['cache_hits']:.0f} cache hits in this cell (pool too small for the run: raise "
              f"--n-fixed/--n-mixed); its numbers are not model work")
    extra = (f" pad-eff {row['padding_efficiency_mean']:.3f}/{row['padding_efficiency_tokens']:.3f}"
             f" batch {row['mean_batch_size']:.1f}" if "model_runs" in row else "")
    print(f"[round {rnd}] {wname:8s} c={c:<3d} {s.name:12s} {row['items_per_s']:7.1f} items/s "
          f"p50 {row['p50_ms']:8.1f} ms p99 {row['p99_ms']:8.1f} ms err {row['errors']} "
          f"n {row['measured']} srv-cpu {row['server_cpu_pct']:.0f}% "
          f"gen-cpu {row['loadgen_cpu_pct']:.0f}% load {la0:.2f}{extra}", flush=True)
    return row


def rank_round(s: Server, ceiling: CeilingProcess, rank: dict, rnd: int, repeats: int) -> dict:
    """/v1/rank with RANK_N candidates vs one batched in-process run of the same items, alternated so both
    see the same background load; a distinct prompt per request, so nothing can come from a cache."""
    def body(k: int) -> bytes:
        return json.dumps({"prompt": rank["prompts"][k], "responses": rank["responses"]}).encode()

    s.resume()
    post_json(s.url + "/v1/rank", body(0))  # warm
    http, inproc = [], []
    for k in range(1 + rnd * repeats, 1 + (rnd + 1) * repeats):
        inproc += ceiling.ask("rank", index=k)["latencies"]
        status, payload, took = post_json(s.url + "/v1/rank", body(k))
        if status != 200:
            raise RuntimeError(f"rank answered {status}: {payload}")
        http.append(took)
    s.suspend()
    row = {"round": rnd, "contender": s.name, "n": RANK_N, "http_p50_ms": pct(http, 50) * 1000,
           "inprocess_p50_ms": pct(inproc, 50) * 1000, "loadavg": os.getloadavg()}
    row["ratio"] = row["http_p50_ms"] / row["inprocess_p50_ms"]
    print(f"[round {rnd}] rank N={RANK_N} {s.name}: HTTP p50 {row['http_p50_ms']:.1f} ms vs one batched "
          f"in-process run {row['inprocess_p50_ms']:.1f} ms → {row['ratio']:.2f}×", flush=True)
    return row


def serve_bench(args) -> dict:
    env = environment()
    print(f"# serve_bench {env['date']} on {env['cpu']} ({env['cores']} cores), load {os.getloadavg()}",
          flush=True)
    data = build_workloads(args.bundle, args.data_dir, args.seed, args.n_fixed, args.n_mixed,
                           args.rank_repeats * args.rounds + 1)
    print(f"workload pools: { {k: len(v) for k, v in data['workloads'].items()} } distinct items, "
          f"{len(data['rank']['prompts'])} rank prompts", flush=True)
    workloads = {k: v for k, v in data["workloads"].items() if k in args.workloads}
    tmp = Path(tempfile.mkdtemp(prefix="serve_bench."))
    servers = make_servers(args.bundle, tmp, args.contenders, args.variant, args.threads, args.provider,
                           args.litserve_batch, args.litserve_timeout)
    ceiling = None
    results: list[dict] = []
    ceilings: list[dict] = []
    rank_rows: list[dict] = []
    idle: dict[str, float] = {}
    probes: dict[str, list[float]] = {}
    try:
        for s in servers:
            s.start()
        ceiling = CeilingProcess(args.bundle, args.threads, tmp / "ceiling.log", args.provider)
        head = {k: v[: max(args.ceiling_items, 40)] for k, v in data["workloads"].items()}
        lengths_check = ceiling.ask("load", workloads=head, rank=data["rank"])["lengths"]
        for name, items in head.items():
            assert lengths_check[name] == [i["n_tokens"] for i in items], f"{name}: token counts differ"
        for s in servers:
            s.wait_ready(180)
        # idle CPU of each server (all up, none loaded), then everyone suspended after its probe
        cpu0 = {s.name: s.cpu_seconds() for s in servers}
        time.sleep(3)
        idle = {s.name: 100 * (s.cpu_seconds() - cpu0[s.name]) / 3 for s in servers}
        print(f"idle CPU % per server: {idle}", flush=True)
        probes = probe(servers, ceiling, data["workloads"]["mixed"][:3])

        cell_no = 0
        cursor = {w: 0 for w in workloads}
        for rnd in range(args.rounds):
            for wname, items in workloads.items():
                bodies = [json.dumps({"prompt": i["prompt"], "response": i["response"]}).encode() for i in items]
                lengths = [i["n_tokens"] for i in items]
                ceilings.append(measure_ceiling(ceiling, rnd, wname, args.ceiling_items))
                for c in args.concurrency:
                    rotation = cell_no % len(servers)
                    cell_no += 1
                    start, issued = cursor[wname], 0  # every contender gets the same, never-sent-before items
                    for s in servers[rotation:] + servers[:rotation]:
                        row = run_cell(s, args, rnd, wname, c, bodies, lengths, start)
                        issued = max(issued, row["requests"])
                        results.append(row)
                    cursor[wname] += issued
                    if cursor[wname] > len(items):
                        print(f"WARNING: {wname} pool ({len(items)}) exhausted: items repeat (a cache may answer)")
            if args.rank_repeats >= 1:
                for s in servers:
                    if s.name == "rewardserve":
                        rank_rows.append(rank_round(s, ceiling, data["rank"], rnd, args.rank_repeats))
    finally:
        if ceiling is not None:
            ceiling.stop()
        for s in servers:
            s.stop()
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    report = {"environment": env, "settings": settings,
              "workload_lengths": {k: [i["n_tokens"] for i in v] for k, v in data["workloads"].items()},
              "rank_lengths": data["rank"]["n_tokens"], "idle_cpu_pct": idle, "probe_scores": probes,
              "ceiling_runtime": ceiling.hello.get("describe") if ceiling else None,
              "ceiling": ceilings, "cells": results, "rank": rank_rows, "logs": str(tmp)}
    report["summary"] = summarize(report)
    report["targets"] = targets(report)
    report["targets_by_round"] = targets_by_round(report)
    return report


# ---------------------------------------------------------------- report

def targets_by_round(report: dict) -> dict[int, list[dict]]:
    """The targets evaluated on each round alone (background load can change between rounds)."""
    out = {}
    for rnd in sorted({c["round"] for c in report["cells"]}):
        sub = {**report, "ceiling": [c for c in report["ceiling"] if c["round"] == rnd],
               "cells": [c for c in report["cells"] if c["round"] == rnd],
               "rank": [c for c in report["rank"] if c["round"] == rnd]}
        sub["summary"] = summarize(sub)
        out[rnd] = targets(sub)
    return out


def summarize(report: dict) -> list[dict]:
    """Median over rounds of each cell, with ratios to the ceiling (same round) and to the others."""
    ceil = {}
    for c in report["ceiling"]:
        ceil.setdefault(c["workload"], []).append(c)
    cells: dict[tuple, list] = {}
    for r in report["cells"]:
        cells.setdefault((r["workload"], r["concurrency"], r["contender"]), []).append(r)
    rows = []
    for (w, c, name), rs in cells.items():
        ratios = []
        for r in rs:
            same_round = [x for x in ceil[w] if x["round"] == r["round"]]
            ratios.append(r["items_per_s"] / same_round[0]["items_per_s"])
        row = {"workload": w, "concurrency": c, "contender": name, "rounds": len(rs),
               "items_per_s": float(np.median([r["items_per_s"] for r in rs])),
               "x_ceiling": float(np.median(ratios)),
               "p50_ms": float(np.median([r["p50_ms"] for r in rs])),
               "p99_ms": float(np.median([r["p99_ms"] for r in rs])),
               "errors": int(sum(r["errors"] for r in rs)),
               "cache_hits": int(sum(r.get("cache_hits", 0) for r in rs)),
               "server_cpu_pct": float(np.median([r["server_cpu_pct"] for r in rs])),
               "loadgen_cpu_pct": float(np.median([r["loadgen_cpu_pct"] for r in rs])),
               "loadavg": float(np.median([r["loadavg"][0] for r in rs]))}
        if any("padding_efficiency_mean" in r for r in rs):
            row["padding_efficiency_mean"] = float(np.median([r["padding_efficiency_mean"] for r in rs
                                                              if "padding_efficiency_mean" in r]))
            row["padding_efficiency_tokens"] = float(np.median([r["padding_efficiency_tokens"] for r in rs
                                                                if "padding_efficiency_tokens" in r]))
            row["mean_batch_size"] = float(np.median([r["mean_batch_size"] for r in rs if "mean_batch_size" in r]))
        rows.append(row)
    for w, cs in ceil.items():
        rows.append({"workload": w, "concurrency": None, "contender": "ceiling", "rounds": len(cs),
                     "items_per_s": float(np.median([x["items_per_s"] for x in cs])), "x_ceiling": 1.0,
                     "best_batch_size": [x["best_batch_size"] for x in cs],
                     "single_p50_ms": (float(np.median([x["single_p50_ms"] for x in cs]))
                                       if "single_p50_ms" in cs[0] else None)})
    return rows


def targets(report: dict) -> list[dict]:
    rows = {(r["workload"], r["concurrency"], r["contender"]): r for r in report["summary"]}
    ceil = {r["workload"]: r for r in report["summary"] if r["contender"] == "ceiling"}
    out = []

    def add(name, value, limit, ok):
        out.append({"target": name, "value": value, "limit": limit, "met": bool(ok)})

    def get(w, c, name):
        return rows.get((w, c, name))

    concs = sorted({r["concurrency"] for r in report["summary"] if r["concurrency"]})
    for c in concs:
        rs = get("fixed128", c, "rewardserve")
        if rs and c >= 8:
            add(f"fixed128 c={c}: rewardserve items/s ≥ 0.95 × ceiling", rs["x_ceiling"], 0.95, rs["x_ceiling"] >= 0.95)
    for c in concs:
        rs, nv, ls = get("mixed", c, "rewardserve"), get("mixed", c, "naive"), get("mixed", c, "litserve")
        if rs and nv:
            x = rs["items_per_s"] / nv["items_per_s"]
            add(f"mixed c={c}: rewardserve items/s ≥ 1.0 × naive", x, 1.0, x >= 1.0)
            x = rs["p99_ms"] / nv["p99_ms"]
            add(f"mixed c={c}: rewardserve p99 ≤ 1/3 × naive p99", x, 1 / 3, x <= 1 / 3)
        if rs and ls:
            x = rs["items_per_s"] / ls["items_per_s"]
            add(f"mixed c={c}: rewardserve items/s ≥ 1.5 × LitServe", x, 1.5, x >= 1.5)
        if rs and "padding_efficiency_mean" in rs:
            add(f"mixed c={c}: padding efficiency (per-run mean, /metrics) ≥ 0.85", rs["padding_efficiency_mean"],
                0.85, rs["padding_efficiency_mean"] >= 0.85)
    rs = get("fixed128", 1, "rewardserve")
    if rs and ceil.get("fixed128", {}).get("single_p50_ms"):
        limit = ceil["fixed128"]["single_p50_ms"] + 3
        add("fixed128 c=1: rewardserve p50 ≤ ceiling single-item p50 + 3 ms (ms)", rs["p50_ms"], limit,
            rs["p50_ms"] <= limit)
    for w in ("fixed128", "mixed"):
        rs, nv = get(w, 128, "rewardserve"), get(w, 128, "naive")
        if rs and nv:
            x = rs["p99_ms"] / nv["p99_ms"]
            add(f"{w} c=128: rewardserve p99 ≤ 1/3 × naive p99", x, 1 / 3, x <= 1 / 3)
        if rs:
            add(f"{w} c=128: rewardserve errors = 0", rs["errors"], 0, rs["errors"] == 0)
    rk = [r for r in report["rank"] if r["contender"] == "rewardserve"]
    if rk:
        x = float(np.median([r["ratio"] for r in rk]))
        add(f"rank N={RANK_N}: HTTP p50 ≤ 1.2 × one batched in-process run", x, 1.2, x <= 1.2)
    return out


def print_report(report: dict) -> None:
    env = report["environment"]
    print(f"\n## Serving benchmark — {env['cpu']}, {env['cores']} cores, {env['date']}")
    print(f"versions: {env['versions']}; ORT intra-op threads {report['settings']['threads']}; "
          f"idle server CPU %: { {k: round(v, 1) for k, v in report['idle_cpu_pct'].items()} }\n")
    print("| workload | c | contender | items/s | × ceiling | p50 ms | p99 ms | errors | pad-eff (runs / tokens) "
          "| mean batch | server CPU % | load-gen CPU % | load avg |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    order = {"ceiling": 0, "naive": 1, "litserve": 2, "rewardserve": 3}
    for r in sorted(report["summary"], key=lambda r: (r["workload"], r["concurrency"] or 0,
                                                      order.get(r["contender"], 9), r["contender"])):
        if r["contender"] == "ceiling":
            single = f", single-item p50 {r['single_p50_ms']:.1f} ms" if r.get("single_p50_ms") else ""
            print(f"| {r['workload']} | – | ceiling (batch {r['best_batch_size']}{single}) | {r['items_per_s']:.1f} "
                  f"| 1.00 | | | | | | | | |")
            continue
        pe = (f"{r['padding_efficiency_mean']:.3f} / {r['padding_efficiency_tokens']:.3f}"
              if "padding_efficiency_mean" in r else "")
        mb = f"{r['mean_batch_size']:.1f}" if "mean_batch_size" in r else ""
        print(f"| {r['workload']} | {r['concurrency']} | {r['contender']} | {r['items_per_s']:.1f} | "
              f"{r['x_ceiling']:.2f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['errors']} | {pe} | {mb} | "
              f"{r['server_cpu_pct']:.0f} | {r['loadgen_cpu_pct']:.0f} | {r['loadavg']:.2f} |")
    for r in report["rank"]:
        print(f"\nrank N={r['n']} ({r['contender']}, round {r['round']}): HTTP p50 {r['http_p50_ms']:.1f} ms, one batched "
              f"in-process run p50 {r['inprocess_p50_ms']:.1f} ms, ratio {r['ratio']:.2f}")
    rounds = report.get("targets_by_round", {})
    head = "| target | limit | median of rounds |" + "".join(f" round {k} |" for k in rounds)
    print("\n" + head + "\n" + "|---" * (3 + len(rounds)) + "|")
    for i, t in enumerate(report["targets"]):
        cells = "".join(f" {r[i]['value']:.3f} {'met' if r[i]['met'] else 'MISSED'} |" for r in rounds.values()
                        if i < len(r) and r[i]["target"] == t["target"])
        print(f"| {t['target']} | {t['limit']:.3f} | {t['value']:.3f} {'met' if t['met'] else 'MISSED'} |{cells}")
    for rnd in sorted({c["round"] for c in report["ceiling"]}):
        la = [c["loadavg"][0] for c in report["cells"] if c["round"] == rnd]
        print(f"round {rnd}: load average {min(la):.2f}–{max(la):.2f} during its cells")


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    wls = [w for w in ("fixed128", "mixed") if any(r["workload"] == w for r in report["summary"])]
    fig, axes = plt.subplots(len(wls), 2, figsize=(11, 4 * len(wls)), squeeze=False)
    for row, w in zip(axes, wls):
        rs = [r for r in report["summary"] if r["workload"] == w]
        names = sorted({r["contender"] for r in rs if r["contender"] != "ceiling"})
        for name in names:
            pts = sorted((r["concurrency"], r["items_per_s"], r["p99_ms"]) for r in rs if r["contender"] == name)
            cs = [p[0] for p in pts]
            row[0].plot(cs, [p[1] for p in pts], marker="o", label=name)
            row[1].plot(cs, [p[2] for p in pts], marker="o", label=name)
        ceil = [r for r in rs if r["contender"] == "ceiling"]
        top = max([r["items_per_s"] for r in rs])
        if ceil:
            row[0].axhline(ceil[0]["items_per_s"], color="black", linestyle="--", label="ceiling (in-process ORT)")
        row[0].set_ylim(0, top * 1.1)
        row[0].set(title=f"{w}: throughput", xlabel="concurrency", ylabel="items/s", xscale="log")
        row[1].set(title=f"{w}: p99 latency", xlabel="concurrency", ylabel="ms", xscale="log", yscale="log")
        for ax in row:
            ax.set_xticks(sorted({r["concurrency"] for r in rs if r["concurrency"]}))
            ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=8)
    env = report["environment"]
    fig.suptitle(f"rewardserve serving benchmark — {env['cpu']} ({env['cores']} cores), {env['date'][:10]}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# ---------------------------------------------------------------- CLI

def main() -> None:
    ap = argparse.ArgumentParser(description="Serving benchmark: ceiling vs naive vs LitServe vs rewardserve.")
    ap.add_argument("--bundle", type=Path, default=REPO / "runs/bench_bundle")
    ap.add_argument("--data-dir", type=Path, default=REPO.parent / "shared/data")
    ap.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads for every contender "
                    "(0 = all cores, rewardserve's default)")
    ap.add_argument("--contenders", nargs="+", default=list(CONTENDERS), choices=CONTENDERS)
    ap.add_argument("--provider", default="cpu", choices=["cpu", "cuda"], help="every contender and the ceiling "
                    "(cuda: ONNX Runtime's CUDA EP, fp16 and IO binding by default, as the service runs it)")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=FLAGS",
                    help="an extra rewardserve contender with extra serve flags, e.g. spin='--ort-spinning'")
    ap.add_argument("--workloads", nargs="+", default=["fixed128", "mixed"], choices=["fixed128", "mixed"])
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 128])
    ap.add_argument("--duration", type=float, default=6.0, help="seconds of load per cell (×1.5 for mixed)")
    ap.add_argument("--warmup", type=float, default=1.5, help="seconds not measured at the start of a cell")
    ap.add_argument("--max-requests", type=int, default=20_000, help="per cell")
    ap.add_argument("--request-timeout", type=float, default=120.0)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--rank-repeats", type=int, default=15)
    ap.add_argument("--n-fixed", type=int, default=3000, help="distinct items in the fixed-length pool")
    ap.add_argument("--n-mixed", type=int, default=2000, help="distinct items in the mixed-length pool")
    ap.add_argument("--ceiling-items", type=int, default=96, help="items per batch-size pass of the ceiling scan")
    ap.add_argument("--litserve-batch", type=int, default=16, help="LitServe max_batch_size")
    ap.add_argument("--litserve-timeout", type=float, default=0.005, help="LitServe batch_timeout (s)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=REPO / "docs/bench_serving.json")
    ap.add_argument("--plot", default=str(REPO / "docs/bench_serving.png"), help="PNG path ('' for none)")
    args = ap.parse_args()
    t0 = time.monotonic()
    report = serve_bench(args)
    report["total_s"] = time.monotonic() - t0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print_report(report)
    if args.plot:
        plot(report, Path(args.plot))
    print(f"\nwrote {args.out}" + (f" and {args.plot}" if args.plot else "") + f" in {report['total_s']:.0f} s")


if __name__ == "__main__":
    main()
