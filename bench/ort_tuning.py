"""ONNX Runtime session options compared in-process: one worker process per configuration, configurations
interleaved (order rotated each round), median of the rounds.

Each worker builds its own session (the options of ORT_CONFIGS; the default is what service.runtime
builds on CPU: graph optimization ALL, spinning off, intra-op threads = cores, sequential) and times
session.run alone on pre-tokenized items of the serving benchmark's workloads (bench/workload.py):
one 128-token item per run (p50), batches of 8 × 128 tokens, and the mixed-length items in
length-sorted runs of 4 (service.scorer's runs).

  python bench/ort_tuning.py --bundle runs/bench_bundle --data-dir ../shared/data --rounds 3 \
      --out docs/bench_ort_tuning.json [--configs NAME ...]

One configuration in this process, on items a comparison wrote (prints one JSON line; the comparison
runs this for every configuration and round):

  python bench/ort_tuning.py --worker 'spinning on' --bundle runs/bench_bundle --items ITEMS.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

ORT_CONFIGS = {
    "default (ALL, no spin, intra=cores, sequential)": {},
    "intra_op_threads=1": {"intra": 1},
    "spinning on": {"spin": True},
    "spinning during a run only (force_spinning_stop)": {"spin": True, "force_stop": True},
    "graph opt EXTENDED": {"opt": "EXTENDED"},
    "graph opt BASIC": {"opt": "BASIC"},
    "graph opt DISABLE": {"opt": "DISABLE"},
    "parallel execution (inter_op=2)": {"parallel": True},
}
METRICS = ("single128_p50_ms", "fixed128_bs8_items_per_s", "mixed_sorted_bs4_items_per_s")


def session_options(config: dict, threads: int):
    import onnxruntime as ort

    o = ort.SessionOptions()
    o.graph_optimization_level = getattr(ort.GraphOptimizationLevel, "ORT_" + {
        "ALL": "ENABLE_ALL", "EXTENDED": "ENABLE_EXTENDED", "BASIC": "ENABLE_BASIC",
        "DISABLE": "DISABLE_ALL"}[config.get("opt", "ALL")])
    o.intra_op_num_threads = config.get("intra", threads)
    o.inter_op_num_threads = 2 if config.get("parallel") else 1
    o.execution_mode = ort.ExecutionMode.ORT_PARALLEL if config.get("parallel") else ort.ExecutionMode.ORT_SEQUENTIAL
    spin = "1" if config.get("spin") else "0"
    o.add_session_config_entry("session.intra_op.allow_spinning", spin)
    o.add_session_config_entry("session.inter_op.allow_spinning", spin)
    if config.get("force_stop"):
        o.add_session_config_entry("session.force_spinning_stop", "1")
    return o


def worker(bundle: Path, config: dict, threads: int, items_file: Path, seconds: float) -> dict:
    """One configuration's numbers; `seconds` of load for each of the first two (at least 10 runs / 32 items)."""
    import onnxruntime as ort

    from service.bundle import open_bundle
    from service.scorer import score_sorted

    manifest, encoder = open_bundle(bundle)
    t0 = time.perf_counter()
    sess = ort.InferenceSession(str(Path(bundle) / manifest.model_file), sess_options=session_options(config, threads),
                                providers=["CPUExecutionProvider"])
    load_s = time.perf_counter() - t0
    names = [i.name for i in sess.get_inputs()]
    data = json.loads(Path(items_file).read_text())
    fixed = encoder.encode([i["prompt"] for i in data["fixed128"]], [i["response"] for i in data["fixed128"]])
    mixed = encoder.encode([i["prompt"] for i in data["mixed"]], [i["response"] for i in data["mixed"]])
    times: list[float] = []

    def run(items) -> np.ndarray:  # session.run alone is timed, not the padding
        feed = {k: v for k, v in encoder.pad(items).items() if k in names}
        t = time.perf_counter()
        out = sess.run(None, feed)[0]
        times.append(time.perf_counter() - t)
        return out

    run(fixed[:1]), run(fixed[:8]), run(sorted(mixed, key=lambda e: e.n_tokens)[-4:])  # allocate the shapes
    out = {"load_s": load_s}
    times.clear()
    deadline = time.perf_counter() + seconds
    for e in itertools.cycle(fixed):
        run([e])
        if time.perf_counter() > deadline and len(times) >= 10:
            break
    out["single128_p50_ms"] = float(np.percentile(times, 50)) * 1000
    times.clear()
    deadline = time.perf_counter() + seconds
    for i in itertools.cycle(range(0, len(fixed) - 7, 8)):
        run(fixed[i:i + 8])
        if time.perf_counter() > deadline and len(times) >= 4:
            break
    out["fixed128_bs8_items_per_s"] = 8 * len(times) / sum(times)
    times.clear()
    score_sorted(mixed, run, max_items=4)
    out["mixed_sorted_bs4_items_per_s"] = len(mixed) / sum(times)
    return out


def compare(args) -> dict:
    from bench.machine import environment
    from bench.workload import build_workloads

    env = environment()
    names = args.configs or list(ORT_CONFIGS)
    unknown = [n for n in names if n not in ORT_CONFIGS]
    if unknown:
        raise SystemExit(f"unknown configurations {unknown}; known: {list(ORT_CONFIGS)}")
    data = build_workloads(args.bundle, args.data_dir, args.seed, args.n_fixed, args.n_mixed, 1)
    items_file = Path(tempfile.mkdtemp(prefix="ort_tuning.")) / "items.json"
    items_file.write_text(json.dumps(data["workloads"]))
    rows: dict[str, list[dict]] = {k: [] for k in names}
    for rnd in range(args.rounds):
        for name in names[rnd % len(names):] + names[: rnd % len(names)]:
            la = os.getloadavg()[0]
            argv = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--bundle", str(args.bundle),
                    "--threads", str(args.threads), "--items", str(items_file), "--seconds", str(args.seconds)]
            proc = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, timeout=300)
            if proc.returncode:
                raise RuntimeError(f"worker {name!r} failed:\n{proc.stderr[-2000:]}")
            row = json.loads(proc.stdout.strip().splitlines()[-1]) | {"loadavg": la}
            rows[name].append(row)
            print(f"[round {rnd}] {name:48s} single@128 p50 {row['single128_p50_ms']:6.1f} ms | bs8@128 "
                  f"{row['fixed128_bs8_items_per_s']:6.1f} items/s | mixed sorted bs4 "
                  f"{row['mixed_sorted_bs4_items_per_s']:6.1f} items/s | load {la:.2f}", flush=True)
    summary = [{"config": name, **{k: float(np.median([r[k] for r in rows[name]])) for k in METRICS + ("loadavg",)}}
               for name in names]
    return {"environment": env, "baseline": names[0], "rows": rows, "summary": summary}


def print_table(report: dict) -> None:
    env, summary = report["environment"], report["summary"]
    b = summary[0]
    rounds = len(report["rows"][b["config"]])
    print(f"\n## ORT session options — {env['cpu']}, {env['cores']} cores, {env['date']}, ORT "
          f"{env['versions']['onnxruntime']}, median of {rounds} interleaved rounds\n")
    print("| configuration | single @128 p50 ms | × default | batch 8 @128 items/s | × default | mixed (sorted, "
          "batch 4) items/s | × default | load avg |\n|---|---|---|---|---|---|---|---|")
    for s in summary:
        print(f"| {s['config']} | " + " | ".join(f"{s[k]:.1f} | {s[k] / b[k]:.2f}" for k in METRICS)
              + f" | {s['loadavg']:.2f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description="Compare ONNX Runtime session options in-process.")
    ap.add_argument("--bundle", type=Path, default=REPO / "runs/bench_bundle")
    ap.add_argument("--data-dir", type=Path, default=REPO.parent / "shared/data")
    ap.add_argument("--threads", type=int, default=0, help="intra-op threads where a configuration sets none "
                    "(0 = all cores)")
    ap.add_argument("--configs", "--ort-configs", nargs="*", default=None,
                    help="only these configurations (names of ORT_CONFIGS), the first being the baseline")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--seconds", type=float, default=2.0, help="seconds of each timed loop in a worker")
    ap.add_argument("--n-fixed", type=int, default=64, help="128-token items")
    ap.add_argument("--n-mixed", type=int, default=48, help="mixed-length items")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=REPO / "docs/bench_ort_tuning.json")
    ap.add_argument("--worker", metavar="CONFIG", default=None, help="measure this one configuration in this "
                    "process on the items of --items and print one JSON line")
    ap.add_argument("--items", type=Path, default=None, help="--worker: the items file a comparison wrote")
    args = ap.parse_args()
    if args.worker is not None:
        if args.worker not in ORT_CONFIGS or args.items is None:
            ap.error(f"--worker needs a configuration of {list(ORT_CONFIGS)} and --items")
        print(json.dumps(worker(args.bundle, ORT_CONFIGS[args.worker], args.threads, args.items, args.seconds)),
              flush=True)
        return
    report = compare(args)
    print_table(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
