"""The in-process ceiling: what the bundle's own runtime does with no HTTP and no tokenization.

The same session rewardserve builds (service.runtime.load_runtime, same provider and intra-op threads)
scores pre-tokenized items through the project's offline scorer (service.scorer: length-sorted runs),
timing pad + run:

  scan    the items in length-sorted runs of each batch size (items/s per size; the best is the
          ceiling), and once more cut by the runtime's own batch hint (score_with_runtime: the runs
          the server's batcher may form at most). A batch size over the hint's max_batch_size is
          skipped: its scores would depend on the batch (dynamic int8), so no server could answer them.
  single  one item per run (latency of each run)
  rank    one best-of-N request's RANK_N candidates in one run (within the hint's max_batch_size)
  scores  raw scores as the server would answer them (the probe that every contender agrees)

Standalone, on the serving benchmark's workloads (bench/workload.py):

  python bench/ceiling.py --bundle runs/bench_bundle --data-dir ../shared/data [--threads 0] \
      [--provider cpu] [--workloads fixed128 mixed] [--items 96] [--out /tmp/ceiling.json]

As the worker bench/serve_bench.py drives in its own process (`CeilingProcess`): `--stdio` reads one
JSON command per line on stdin ({"op": "load" | "scan" | "single" | "rank" | "scores" | "quit", ...})
and answers one JSON line each on stdout, the first ({"ready": true, "describe": ...}) unasked.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from service.scorer import score_sorted, score_with_runtime, sorted_runs  # noqa: E402


def batch_sizes(workload: str) -> list[int]:
    """The batch sizes scanned for a workload (64 only where items are short enough to fit it)."""
    return [1, 2, 4, 8, 16, 32] + ([64] if workload == "fixed128" else [])


class InProcessCeiling:
    def __init__(self, bundle: str | Path, threads: int = 0, provider: str = "cpu"):
        from service.bundle import open_bundle
        from service.runtime import load_runtime

        manifest, self.encoder = open_bundle(bundle)
        self.runtime = load_runtime(Path(bundle), manifest, provider=provider, intra_op_threads=threads)
        self.max_items = self.runtime.batch_hint.max_batch_size  # None: any batch size gives the same scores
        self.encoded: dict[str, list] = {}
        self.rank_items: list[list] = []

    def _timed(self, times: list[float]):
        """A scorer `run` that appends the seconds of each pad + run to `times`."""
        def run(batch):
            t0 = time.perf_counter()
            scores = self.runtime.run(self.encoder.pad(batch))
            times.append(time.perf_counter() - t0)
            return scores
        return run

    def describe(self) -> dict:
        return self.runtime.describe()

    def load(self, workloads: dict[str, list[dict]], rank: dict | None = None) -> dict:
        """Tokenize the items once ({name: [{"prompt", "response", ...}]}; rank: {"prompts", "responses"})."""
        for name, items in workloads.items():
            self.encoded[name] = self.encoder.encode([i["prompt"] for i in items], [i["response"] for i in items])
        if rank:
            self.rank_items = [self.encoder.encode_shared_prompt(p, rank["responses"]) for p in rank["prompts"]]
        first = next(iter(self.encoded.values()), [])
        if first:
            self._timed([])(first[:4])  # the session's first run allocates
        return {"lengths": {k: [e.n_tokens for e in v] for k, v in self.encoded.items()}}

    def scan(self, workload: str, batch_sizes: list[int], n: int) -> dict:
        """items/s of the first `n` items in length-sorted runs, per batch size ({"1": ..., "2": ...})."""
        items = self.encoded[workload][:n]
        lengths = [e.n_tokens for e in items]
        cpu0, result, skipped = time.process_time(), {}, []
        for bs in batch_sizes:
            if self.max_items is not None and bs > self.max_items:
                skipped.append(bs)
                continue
            times: list[float] = []
            run = self._timed(times)
            run([items[i] for i in sorted_runs(lengths, bs)[0]])  # first run of a new shape allocates
            times.clear()
            score_sorted(items, run, max_items=bs)
            result[str(bs)] = len(items) / sum(times)
        t0 = time.perf_counter()
        score_with_runtime(self.runtime, self.encoder, items)
        hint = len(items) / (time.perf_counter() - t0)
        return {"items_per_s": result, "hint_items_per_s": hint, "skipped": skipped,
                "cpu_s": time.process_time() - cpu0}

    def single(self, workload: str, n: int) -> dict:
        """Seconds of each one-item run over the first `n` items."""
        times: list[float] = []
        score_sorted(self.encoded[workload][:n], self._timed(times), max_items=1)
        return {"latencies": times}

    def rank(self, index: int) -> dict:
        """Seconds to score rank prompt `index`'s candidates: one run, or one per candidate where the hint's
        max_batch_size is 1."""
        items, times = self.rank_items[index], []
        score_sorted(items, self._timed(times), max_items=min(len(items), self.max_items or len(items)))
        return {"latencies": [sum(times)], "runs": len(times)}

    def scores(self, items: list[dict]) -> dict:
        """Raw scores of [{"prompt", "response"}], run as the server runs them."""
        enc = self.encoder.encode([i["prompt"] for i in items], [i["response"] for i in items])
        return {"scores": score_with_runtime(self.runtime, self.encoder, enc).tolist()}


OPS = ("load", "scan", "single", "rank", "scores")


def serve_stdio(ceiling: InProcessCeiling) -> None:
    def reply(obj) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    reply({"ready": True, "describe": ceiling.describe()})
    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd.pop("op")
        if op == "quit":
            return
        if op not in OPS:
            reply({"error": f"unknown op {op!r}"})
            continue
        reply(getattr(ceiling, op)(**cmd))


class CeilingProcess:
    """The ceiling in its own process (`python bench/ceiling.py --stdio`), so that its threads compete with
    nothing in the load generator's process; `ask(op, ...)` is the in-process method of the same name."""

    def __init__(self, bundle: Path, threads: int, log: Path, provider: str = "cpu"):
        argv = [sys.executable, str(Path(__file__).resolve()), "--stdio", "--bundle", str(bundle),
                "--threads", str(threads), "--provider", provider]
        self.log = log
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=open(log, "wb"),
                                     text=True, cwd=REPO)
        self.hello = self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"ceiling worker died; see {self.log}:\n{self.log.read_text()[-2000:]}")
        answer = json.loads(line)
        if "error" in answer:
            raise RuntimeError(f"ceiling worker: {answer['error']}")
        return answer

    def ask(self, op: str, **args) -> dict:
        self.proc.stdin.write(json.dumps({"op": op, **args}) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def stop(self) -> None:
        try:
            self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
            self.proc.stdin.close()
        except (BrokenPipeError, ValueError, OSError):
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def standalone(args) -> dict:
    from bench.workload import build_workloads

    data = build_workloads(args.bundle, args.data_dir, args.seed, max(args.items, args.single),
                           max(args.items, 1), args.rank + 1)
    ceiling = InProcessCeiling(args.bundle, args.threads, args.provider)
    ceiling.load({k: v for k, v in data["workloads"].items() if k in args.workloads}, data["rank"])
    print(f"# ceiling: {json.dumps(ceiling.describe())}", flush=True)
    out = {"runtime": ceiling.describe(), "workloads": {}}
    for name in args.workloads:
        scan = ceiling.scan(name, batch_sizes(name), args.items)
        best = max(scan["items_per_s"], key=scan["items_per_s"].get)
        row = {**scan, "best_batch_size": int(best), "best_items_per_s": scan["items_per_s"][best]}
        if args.single:
            row["single_p50_ms"] = float(np.median(ceiling.single(name, args.single)["latencies"])) * 1000
        out["workloads"][name] = row
        print(f"{name}: {row['best_items_per_s']:.1f} items/s at batch {best} (scan "
              f"{ {k: round(v, 1) for k, v in scan['items_per_s'].items()} }); within the runtime's batch hint "
              f"{scan['hint_items_per_s']:.1f} items/s"
              + (f"; single-item p50 {row['single_p50_ms']:.2f} ms" if "single_p50_ms" in row else "")
              + (f"; skipped batch sizes {scan['skipped']} (over the hint's max_batch_size)"
                 if scan["skipped"] else ""),
              flush=True)
    if args.rank:
        lat = [t for k in range(1, args.rank + 1) for t in ceiling.rank(k)["latencies"]]
        out["rank_p50_ms"] = float(np.median(lat)) * 1000
        runs = ceiling.rank(1)["runs"]
        print(f"rank: {len(data['rank']['responses'])} candidates in {runs} run{'s' * (runs > 1)}, "
              f"p50 {out['rank_p50_ms']:.2f} ms")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description="In-process ceiling: the bundle's runtime without HTTP or tokenization.")
    ap.add_argument("--bundle", type=Path, default=REPO / "runs/bench_bundle")
    ap.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0 = all cores)")
    ap.add_argument("--provider", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--stdio", action="store_true", help="be serve_bench's worker: JSON commands on stdin")
    ap.add_argument("--data-dir", type=Path, default=REPO.parent / "shared/data",
                    help="standalone: the folder of train.jsonl")
    ap.add_argument("--workloads", nargs="+", default=["fixed128", "mixed"], choices=["fixed128", "mixed"])
    ap.add_argument("--items", type=int, default=96, help="standalone: items per batch-size pass")
    ap.add_argument("--single", type=int, default=40, help="standalone: one-item runs (0: none)")
    ap.add_argument("--rank", type=int, default=15, help="standalone: best-of-N runs (0: none)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="standalone: write the results here (JSON)")
    args = ap.parse_args()
    if args.stdio:
        return serve_stdio(InProcessCeiling(args.bundle, args.threads, args.provider))
    result = standalone(args)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
