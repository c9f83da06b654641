"""Serving benchmark (CPU): rewardserve vs a naive FastAPI server vs LitServe vs raw ONNX Runtime.

One command starts every contender on 127.0.0.1 as its own subprocess (same bundle, same ONNX
Runtime session options and intra-op threads), then drives each with the same bounded closed-loop
load from one asyncio/aiohttp client process, at several concurrencies, on two workloads built from
real preference texts (../shared/data/train.jsonl):

  fixed128  every request is exactly 128 tokens (special tokens included)
  mixed     lengths drawn uniformly from 16..512 tokens (or the bundle's max_length if smaller)

Contenders:
  ceiling      raw in-process ONNX Runtime (service.runtime, the session rewardserve builds), no HTTP,
               no tokenization: the workload's items sorted by length and run at the batch size that
               gives the most items/s (scanned every round). A separate worker process.
  naive        bench/naive_server.py: FastAPI, one synchronous model run per request (OpenRLHF serve_rm)
  litserve     bench/litserve_server.py: LitServe max_batch_size/batch_timeout batching
  rewardserve  `python -m service.cli serve --bundle ...` with default settings

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

ORT session-option comparison (in-process, one worker process per configuration, interleaved):

  python bench/serve_bench.py --ort-tuning --bundle runs/bench_bundle --data-dir ../shared/data \
      --out docs/bench_ort_tuning.json
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import itertools
import json
import os
import platform
import resource
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

RANK_N = 16


# ---------------------------------------------------------------- workloads from real texts

def _read_texts(path: Path) -> list[tuple[str, str]]:
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                rec = json.loads(line)
                for key in ("chosen", "rejected"):
                    if rec.get("prompt") and rec.get(key):
                        out.append((rec["prompt"], rec[key]))
    return out


class _Cutter:
    """Cuts real (prompt, response) texts so that the pair encodes to exactly `n` tokens (checked by encoding)."""

    def __init__(self, encoder, texts: list[tuple[str, str]]):
        self.encoder = encoder
        tok = encoder.tokenizer
        self.texts = texts
        self.p_off = [e.offsets for e in tok.encode_batch([p for p, _ in texts], add_special_tokens=False)]
        self.r_off = [e.offsets for e in tok.encode_batch([r for _, r in texts], add_special_tokens=False)]

    def cut(self, i: int, n: int, shift: int = 0) -> tuple[str, str] | None:
        """`shift` moves the prompt/response split, so one text can give several distinct items."""
        prompt, response = self.texts[i]
        p_off, r_off = self.p_off[i], self.r_off[i]
        body = n - self.encoder.n_special
        r = min(len(r_off), max(1, body // 2 - shift))
        p = body - r
        if p > len(p_off):
            p = len(p_off)
            r = body - p
        if p < 1 or r < 1 or r > len(r_off):
            return None
        pt, rt = prompt[: p_off[p - 1][1]].strip(), response[: r_off[r - 1][1]].strip()
        if not pt or not rt:
            return None
        e = self.encoder.encode([pt], [rt])[0]
        return (pt, rt) if e.n_tokens == n and not e.truncated else None

    def cut_prompt(self, i: int, n: int) -> str | None:
        off = self.p_off[i]
        return self.texts[i][0][: off[n - 1][1]].strip() if len(off) >= n else None

    def cut_response(self, i: int, n: int) -> str | None:
        off = self.r_off[i]
        if len(off) < n:
            return None
        text = self.texts[i][1][: off[n - 1][1]].strip()
        return text if len(self.encoder.tokenizer.encode(text, add_special_tokens=False).ids) == n else None


def build_workloads(bundle: Path, data_dir: Path, seed: int, n_fixed: int, n_mixed: int, n_prompts: int) -> dict:
    """Pools of distinct items (every request of a run is a different text, so no cache can answer it)."""
    from service.bundle import open_bundle

    manifest, encoder = open_bundle(bundle)
    max_len = manifest.text.max_length
    texts = _read_texts(data_dir / "train.jsonl")
    rng = np.random.default_rng(seed)
    cutter = _Cutter(encoder, texts)
    cursor = itertools.cycle(rng.permutation(len(texts)).tolist())

    def make(lengths: list[int]) -> list[dict]:
        items, seen, used = [], set(), 0
        for n in lengths:
            for _ in range(len(texts)):
                i = next(cursor)
                got = cutter.cut(i, n, shift=4 * (used // len(texts)))  # a new split on each pass
                used += 1
                if got and got not in seen:  # chosen and rejected often share a prefix: no duplicates
                    seen.add(got)
                    items.append({"prompt": got[0], "response": got[1], "n_tokens": n})
                    break
            else:
                raise SystemExit(f"no text in {data_dir} can be cut to {n} tokens")
        return items

    workloads = {
        "fixed128": make([min(128, max_len)] * n_fixed),
        "mixed": make(rng.integers(16, min(512, max_len) + 1, size=n_mixed).tolist()),
    }
    # best-of-N: distinct real prompts of 48 tokens (one per request), 16 real responses of 32..max tokens
    prompts = []
    for _ in range(len(texts)):
        got = cutter.cut_prompt(next(cursor), 48)
        if got and got not in prompts:
            prompts.append(got)
            if len(prompts) == n_prompts:
                break
    r_hi = max_len - 48 - encoder.n_special - 2
    responses = []
    for n in rng.integers(32, r_hi + 1, size=RANK_N).tolist():
        for _ in range(len(texts)):
            got = cutter.cut_response(next(cursor), n)
            if got:
                responses.append(got)
                break
    enc = encoder.encode_shared_prompt(prompts[0], responses)
    return {"workloads": workloads, "max_length": max_len,
            "rank": {"prompts": prompts, "responses": responses, "n_tokens": [e.n_tokens for e in enc]}}


# ---------------------------------------------------------------- the ceiling worker (own process)

def ceiling_worker(bundle: str, threads: int, provider: str = "cpu") -> None:
    """JSON commands on stdin, one JSON answer per line on stdout."""
    from service.bundle import open_bundle
    from service.runtime import load_runtime

    manifest, encoder = open_bundle(bundle)
    runtime = load_runtime(Path(bundle), manifest, provider=provider, intra_op_threads=threads)
    encoded: dict[str, list] = {}
    rank_items = None

    def run(items) -> float:
        t0 = time.perf_counter()
        runtime.run(encoder.pad(items))
        return time.perf_counter() - t0

    def reply(obj) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    reply({"ready": True, "describe": runtime.describe()})
    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd["op"]
        if op == "load":
            for name, items in cmd["workloads"].items():
                encoded[name] = encoder.encode([i["prompt"] for i in items], [i["response"] for i in items])
            rank_items = [encoder.encode_shared_prompt(p, cmd["rank"]["responses"]) for p in cmd["rank"]["prompts"]]
            run(encoded["fixed128"][:4])
            reply({"ok": True, "lengths": {k: [e.n_tokens for e in v] for k, v in encoded.items()}})
        elif op == "scan":  # items sorted by length, one pass per batch size: items/s of pad + run
            items = sorted(encoded[cmd["workload"]][: cmd["n"]], key=lambda e: e.n_tokens)
            cpu0, result = time.process_time(), {}
            for bs in cmd["batch_sizes"]:
                run(items[:bs])  # first run of a new shape allocates
                total = sum(run(items[i:i + bs]) for i in range(0, len(items), bs))
                result[bs] = len(items) / total
            reply({"items_per_s": result, "cpu_s": time.process_time() - cpu0})
        elif op == "single":  # one item per run
            items = encoded[cmd["workload"]][: cmd["n"]]
            reply({"latencies": [run([e]) for e in items]})
        elif op == "rank":  # the 16 best-of-N candidates in one batched run
            reply({"latencies": [run(rank_items[cmd["index"]])]})
        elif op == "quit":
            return


class Ceiling:
    def __init__(self, bundle: Path, threads: int, log: Path, provider: str = "cpu"):
        argv = [sys.executable, str(Path(__file__).resolve()), "--_ceiling-worker", "--bundle", str(bundle),
                "--threads", str(threads), "--provider", provider]
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=open(log, "wb"),
                                     text=True, cwd=REPO)
        self.hello = self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("ceiling worker died; see its log")
        return json.loads(line)

    def ask(self, **cmd) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def stop(self) -> None:
        try:
            self.ask(op="quit")
        except (BrokenPipeError, RuntimeError, ValueError):
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


# ---------------------------------------------------------------- server processes

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

    def cpu_seconds(self) -> float:
        total = 0.0
        for p in self._tree:
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except Exception:
                pass
        return total

    def suspend(self) -> None:
        for p in self._tree:
            try:
                p.suspend()
            except Exception:
                pass

    def resume(self) -> None:
        for p in self._tree:
            try:
                p.resume()
            except Exception:
                pass

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
            except Exception:
                pass


def make_servers(args, tmp: Path) -> list[Server]:
    py, b, t, pv = sys.executable, str(args.bundle), str(args.threads), args.provider
    servers = []
    if "naive" in args.contenders:
        port = free_port()
        servers.append(Server("naive", [py, "bench/naive_server.py", "--bundle", b, "--port", str(port),
                                        "--threads", t, "--provider", pv], port, "/score", "/health",
                              tmp / "naive.log"))
    if "litserve" in args.contenders:
        port = free_port()
        servers.append(Server("litserve", [py, "bench/litserve_server.py", "--bundle", b, "--port", str(port),
                                           "--threads", t, "--provider", pv,
                                           "--max-batch-size", str(args.litserve_batch),
                                           "--batch-timeout", str(args.litserve_timeout)],
                              port, "/predict", "/health", tmp / "litserve.log"))
    variants = [("rewardserve", "")] if "rewardserve" in args.contenders else []
    variants += [tuple(v.split("=", 1)) for v in args.variant]
    for name, extra in variants:
        port = free_port()
        argv = [py, "-m", "service.cli", "serve", "--bundle", b, "--host", "127.0.0.1", "--port", str(port),
                "--intra-op-threads", t, "--provider", pv, "--log-level", "warning"] + shlex.split(extra)
        servers.append(Server(name, argv, port, "/v1/score", "/readyz", tmp / f"{name}.log"))
    return servers


# ---------------------------------------------------------------- the load generator

def _rusage() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def closed_loop(url: str, bodies: list[bytes], lengths: list[int], start: int, concurrency: int,
                      duration: float, warmup: float, max_requests: int, timeout: float) -> dict:
    import aiohttp

    records: list[tuple[float, float, int, int]] = []
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
    started = [r for r in records if r[0] >= w0]
    lat = np.array([r[1] - r[0] for r in started if r[2] == 200]) * 1000
    return {
        "requests": len(records), "measured": int(lat.size), "errors": sum(errors.values()), "error_kinds": errors,
        "items_per_s": len(done_in_window) / window,
        "tokens_per_s": sum(lengths[r[3]] for r in done_in_window) / window,
        "p50_ms": float(np.percentile(lat, 50)) if lat.size else float("nan"),
        "p90_ms": float(np.percentile(lat, 90)) if lat.size else float("nan"),
        "p99_ms": float(np.percentile(lat, 99)) if lat.size else float("nan"),
        "mean_ms": float(lat.mean()) if lat.size else float("nan"),
        "wall_s": t_done - t_start, "loadgen_cpu_pct": 100 * cpu / (t_done - t_start),
        "real_tokens_sent": sum(lengths[r[3]] for r in records if r[2] == 200),
    }


async def post_json(url: str, body: bytes, timeout: float = 120) -> tuple[int, dict, float]:
    import aiohttp

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session:
        t0 = time.perf_counter()
        async with session.post(url, data=body, headers={"Content-Type": "application/json"}) as resp:
            payload = await resp.json()
            return resp.status, payload, time.perf_counter() - t0


def scrape(url: str) -> dict[str, float]:
    wanted = ("rewardserve_padding_efficiency_sum", "rewardserve_padding_efficiency_count",
              "rewardserve_batch_size_sum", "rewardserve_batch_tokens_sum", "rewardserve_model_run_seconds_sum",
              "rewardserve_cache_hits_total")
    out = {}
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        for line in r.read().decode().splitlines():
            name, _, value = line.partition(" ")
            if name in wanted:
                out[name] = float(value)
    return out


# ---------------------------------------------------------------- orchestration

def environment() -> dict:
    import importlib.metadata as md

    model = "unknown"
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    versions = {}
    for pkg in ("onnxruntime", "fastapi", "uvicorn", "litserve", "aiohttp", "numpy", "tokenizers"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    return {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "cpu": model,
            "cores": os.cpu_count(), "python": platform.python_version(), "versions": versions,
            "command": " ".join(shlex.quote(a) for a in sys.argv)}


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


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
    servers = make_servers(args, tmp)
    ceiling = None
    results: list[dict] = []
    ceilings: list[dict] = []
    rank_rows: list[dict] = []
    idle: dict[str, float] = {}
    try:
        for s in servers:
            s.start()
        ceiling = Ceiling(args.bundle, args.threads, tmp / "ceiling.log", args.provider)
        head = {k: v[: max(args.ceiling_items, 40)] for k, v in data["workloads"].items()}
        lengths_check = ceiling.ask(op="load", workloads=head, rank=data["rank"])["lengths"]
        for name, items in head.items():
            assert lengths_check[name] == [i["n_tokens"] for i in items], f"{name}: token counts differ"
        for s in servers:
            s.wait_ready(180)
        # idle CPU of each server (all up, none loaded), then everyone suspended
        cpu0 = {s.name: s.cpu_seconds() for s in servers}
        time.sleep(3)
        idle = {s.name: 100 * (s.cpu_seconds() - cpu0[s.name]) / 3 for s in servers}
        print(f"idle CPU % per server: {idle}", flush=True)
        # the same first items through every contender: same scores?
        probe = data["workloads"]["mixed"][:3]
        for s in servers:
            scores = []
            for it in probe:
                status, payload, _ = asyncio.run(post_json(
                    s.url + s.score_path, json.dumps({"prompt": it["prompt"], "response": it["response"]}).encode()))
                if status != 200:
                    raise RuntimeError(f"{s.name}: probe answered {status} {payload}")
                scores.append(payload.get("raw", payload.get("reward")))
            print(f"probe scores {s.name}: {[round(x, 5) for x in scores]}", flush=True)
            s.suspend()

        cell_no = 0
        cursor = {w: 0 for w in workloads}
        for rnd in range(args.rounds):
            for wname, items in workloads.items():
                bodies = [json.dumps({"prompt": i["prompt"], "response": i["response"]}).encode() for i in items]
                lengths = [i["n_tokens"] for i in items]
                sizes = [1, 2, 4, 8, 16, 32] + ([64] if wname == "fixed128" else [])
                scan = ceiling.ask(op="scan", workload=wname, batch_sizes=sizes, n=args.ceiling_items)
                best_bs = max(scan["items_per_s"], key=lambda k: scan["items_per_s"][k])
                crow = {"round": rnd, "workload": wname, "items_per_s": scan["items_per_s"][best_bs],
                        "best_batch_size": int(best_bs), "scan": scan["items_per_s"],
                        "loadavg": os.getloadavg()}
                if wname == "fixed128":
                    single = ceiling.ask(op="single", workload=wname, n=40)["latencies"]
                    crow["single_p50_ms"] = pct(single, 50) * 1000
                ceilings.append(crow)
                print(f"[round {rnd}] ceiling {wname}: {crow['items_per_s']:.1f} items/s at batch {best_bs} "
                      f"(scan {json.dumps({k: round(v, 1) for k, v in scan['items_per_s'].items()})})"
                      + (f", single-item p50 {crow['single_p50_ms']:.1f} ms" if "single_p50_ms" in crow else ""),
                      flush=True)
                for c in args.concurrency:
                    rotation = cell_no % len(servers)
                    cell_no += 1
                    start, issued = cursor[wname], 0  # every contender gets the same, never-sent-before items
                    for s in servers[rotation:] + servers[:rotation]:
                        s.resume()
                        before = scrape(s.url) if s.name.startswith("rewardserve") else None
                        scpu0, la0 = s.cpu_seconds(), os.getloadavg()[0]
                        duration = args.duration * (1.5 if wname == "mixed" else 1.0)
                        warmup = min(args.warmup * (1.5 if wname == "mixed" else 1.0), duration / 3)
                        row = asyncio.run(closed_loop(s.url + s.score_path, bodies, lengths, start, c, duration,
                                                      warmup, args.max_requests, args.request_timeout))
                        row["server_cpu_pct"] = 100 * (s.cpu_seconds() - scpu0) / row["wall_s"]
                        row.update(round=rnd, workload=wname, concurrency=c, contender=s.name,
                                   loadavg=[la0, os.getloadavg()[0]], first_item=start)
                        issued = max(issued, row["requests"])
                        if before is not None:
                            after = scrape(s.url)
                            d = {k: after.get(k, 0) - before.get(k, 0) for k in after}
                            runs = d.get("rewardserve_padding_efficiency_count", 0)
                            if runs:
                                row["model_runs"] = runs
                                row["padding_efficiency_mean"] = d["rewardserve_padding_efficiency_sum"] / runs
                                row["padding_efficiency_tokens"] = (row["real_tokens_sent"]
                                                                    / d["rewardserve_batch_tokens_sum"])
                                row["mean_batch_size"] = d["rewardserve_batch_size_sum"] / runs
                            row["cache_hits"] = d.get("rewardserve_cache_hits_total", 0)
                        s.suspend()
                        results.append(row)
                        if row.get("cache_hits", 0) > 0.01 * row["requests"]:
                            print(f"WARNING: {row['cache_hits']:.0f} cache hits in this cell (pool too small "
                                  f"for the run: raise --n-fixed/--n-mixed); its numbers are not model work")
                        extra = (f" pad-eff {row['padding_efficiency_mean']:.3f}/{row['padding_efficiency_tokens']:.3f}"
                                 f" batch {row['mean_batch_size']:.1f}" if "model_runs" in row else "")
                        print(f"[round {rnd}] {wname:8s} c={c:<3d} {s.name:12s} {row['items_per_s']:7.1f} items/s "
                              f"p50 {row['p50_ms']:8.1f} ms p99 {row['p99_ms']:8.1f} ms err {row['errors']} "
                              f"n {row['measured']} srv-cpu {row['server_cpu_pct']:.0f}% "
                              f"gen-cpu {row['loadgen_cpu_pct']:.0f}% load {la0:.2f}{extra}", flush=True)
                    cursor[wname] += issued
                    if cursor[wname] > len(items):
                        print(f"WARNING: {wname} pool ({len(items)}) exhausted: items repeat (a cache may answer)")
            # best-of-N: /v1/rank with 16 candidates vs one batched in-process run of the same 16 items,
            # alternated so both see the same background load
            for s in servers:
                if s.name != "rewardserve" or args.rank_repeats < 1:
                    continue
                s.resume()
                def body(k: int) -> bytes:  # a distinct prompt per request: nothing can come from a cache
                    return json.dumps({"prompt": data["rank"]["prompts"][k],
                                       "responses": data["rank"]["responses"]}).encode()

                asyncio.run(post_json(s.url + "/v1/rank", body(0)))  # warm
                http, inproc = [], []
                for k in range(1 + rnd * args.rank_repeats, 1 + (rnd + 1) * args.rank_repeats):
                    inproc += ceiling.ask(op="rank", index=k)["latencies"]
                    status, payload, took = asyncio.run(post_json(s.url + "/v1/rank", body(k)))
                    if status != 200:
                        raise RuntimeError(f"rank answered {status}: {payload}")
                    http.append(took)
                s.suspend()
                row = {"round": rnd, "contender": s.name, "n": RANK_N, "http_p50_ms": pct(http, 50) * 1000,
                       "inprocess_p50_ms": pct(inproc, 50) * 1000, "loadavg": os.getloadavg()}
                row["ratio"] = row["http_p50_ms"] / row["inprocess_p50_ms"]
                rank_rows.append(row)
                print(f"[round {rnd}] rank N={RANK_N} {s.name}: HTTP p50 {row['http_p50_ms']:.1f} ms vs one batched "
                      f"in-process run {row['inprocess_p50_ms']:.1f} ms → {row['ratio']:.2f}×", flush=True)
    finally:
        if ceiling is not None:
            ceiling.stop()
        for s in servers:
            s.stop()
    report = {"environment": env, "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "workload_lengths": {k: [i["n_tokens"] for i in v] for k, v in data["workloads"].items()},
              "rank_lengths": data["rank"]["n_tokens"], "idle_cpu_pct": idle,
              "ceiling": ceilings, "cells": results, "rank": rank_rows, "logs": str(tmp)}
    report["summary"] = summarize(report)
    report["targets"] = targets(report)
    report["targets_by_round"] = targets_by_round(report)
    return report


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


# ---------------------------------------------------------------- ORT session options, in-process

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


def ort_worker(bundle: str, config: dict, threads: int, workloads_file: str, seconds: float) -> None:
    import onnxruntime as ort

    from service.bundle import open_bundle

    manifest, encoder = open_bundle(bundle)
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
    t0 = time.perf_counter()
    sess = ort.InferenceSession(str(Path(bundle) / manifest.model_file), sess_options=o,
                                providers=["CPUExecutionProvider"])
    load_s = time.perf_counter() - t0
    names = [i.name for i in sess.get_inputs()]
    data = json.loads(Path(workloads_file).read_text())
    fixed = encoder.encode([i["prompt"] for i in data["fixed128"]], [i["response"] for i in data["fixed128"]])
    mixed = sorted(encoder.encode([i["prompt"] for i in data["mixed"]], [i["response"] for i in data["mixed"]]),
                   key=lambda e: e.n_tokens)

    def run(items) -> float:
        feed = {k: v for k, v in encoder.pad(items).items() if k in names}
        t = time.perf_counter()
        sess.run(None, feed)
        return time.perf_counter() - t

    run(fixed[:1]), run(fixed[:8]), run(mixed[-4:])
    out = {"load_s": load_s}
    single, deadline = [], time.perf_counter() + seconds
    for e in itertools.cycle(fixed):
        single.append(run([e]))
        if time.perf_counter() > deadline and len(single) >= 10:
            break
    out["single128_p50_ms"] = pct(single, 50) * 1000
    n, total, deadline = 0, 0.0, time.perf_counter() + seconds
    for i in itertools.cycle(range(0, len(fixed) - 7, 8)):
        total += run(fixed[i:i + 8])
        n += 8
        if time.perf_counter() > deadline and n >= 32:
            break
    out["fixed128_bs8_items_per_s"] = n / total
    total = sum(run(mixed[i:i + 4]) for i in range(0, len(mixed), 4))
    out["mixed_sorted_bs4_items_per_s"] = len(mixed) / total
    print(json.dumps(out), flush=True)


def ort_tuning(args) -> dict:
    env = environment()
    data = build_workloads(args.bundle, args.data_dir, args.seed, 64, 48, 1)
    wl = Path(tempfile.mkdtemp(prefix="ort_tuning.")) / "workloads.json"
    wl.write_text(json.dumps(data["workloads"]))
    names = args.ort_configs or list(ORT_CONFIGS)
    rows: dict[str, list[dict]] = {k: [] for k in names}
    for rnd in range(args.rounds):
        for name in names[rnd % len(names):] + names[: rnd % len(names)]:
            la = os.getloadavg()[0]
            argv = [sys.executable, str(Path(__file__).resolve()), "--_ort-worker", json.dumps(ORT_CONFIGS[name]),
                    "--bundle", str(args.bundle), "--threads", str(args.threads), "--_workloads", str(wl)]
            proc = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, timeout=300)
            if proc.returncode:
                raise RuntimeError(proc.stderr[-2000:])
            row = json.loads(proc.stdout.strip().splitlines()[-1]) | {"loadavg": la}
            rows[name].append(row)
            print(f"[round {rnd}] {name:48s} single@128 p50 {row['single128_p50_ms']:6.1f} ms | bs8@128 "
                  f"{row['fixed128_bs8_items_per_s']:6.1f} items/s | mixed sorted bs4 "
                  f"{row['mixed_sorted_bs4_items_per_s']:6.1f} items/s | load {la:.2f}", flush=True)
    base = names[0]
    summary = []
    for name in names:
        s = {k: float(np.median([r[k] for r in rows[name]])) for k in
             ("single128_p50_ms", "fixed128_bs8_items_per_s", "mixed_sorted_bs4_items_per_s", "loadavg")}
        summary.append({"config": name, **s})
    b = summary[0]
    print(f"\n## ORT session options — {env['cpu']}, {env['cores']} cores, {env['date']}, ORT "
          f"{env['versions']['onnxruntime']}, median of {args.rounds} interleaved rounds\n")
    print("| configuration | single @128 p50 ms | × default | batch 8 @128 items/s | × default | mixed (sorted, "
          "batch 4) items/s | × default | load avg |\n|---|---|---|---|---|---|---|---|")
    for s in summary:
        print(f"| {s['config']} | {s['single128_p50_ms']:.1f} | {s['single128_p50_ms'] / b['single128_p50_ms']:.2f} | "
              f"{s['fixed128_bs8_items_per_s']:.1f} | {s['fixed128_bs8_items_per_s'] / b['fixed128_bs8_items_per_s']:.2f}"
              f" | {s['mixed_sorted_bs4_items_per_s']:.1f} | "
              f"{s['mixed_sorted_bs4_items_per_s'] / b['mixed_sorted_bs4_items_per_s']:.2f} | {s['loadavg']:.2f} |")
    return {"environment": env, "baseline": base, "rows": rows, "summary": summary}


# ---------------------------------------------------------------- CLI

def main() -> None:
    ap = argparse.ArgumentParser(description="Serving benchmark: ceiling vs naive vs LitServe vs rewardserve.")
    ap.add_argument("--bundle", type=Path, default=REPO / "runs/bench_bundle")
    ap.add_argument("--data-dir", type=Path, default=REPO.parent / "shared/data")
    ap.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads for every contender "
                    "(0 = all cores, rewardserve's default)")
    ap.add_argument("--contenders", nargs="+", default=["naive", "litserve", "rewardserve"])
    ap.add_argument("--provider", default="cpu", choices=["cpu", "cuda"], help="every contender and the ceiling "
                    "(cuda: ONNX Runtime's CUDA EP, fp16 and IO binding by default, as the service runs it)")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=FLAGS",
                    help="an extra rewardserve contender with extra serve flags, e.g. spin='--ort-spinning'")
    ap.add_argument("--workloads", nargs="+", default=["fixed128", "mixed"])
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
    ap.add_argument("--ort-tuning", action="store_true", help="compare ORT session options in-process instead")
    ap.add_argument("--ort-configs", nargs="*", default=None, help="--ort-tuning: only these configurations")
    ap.add_argument("--_ceiling-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--_ort-worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_workloads", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._ceiling_worker:
        return ceiling_worker(str(args.bundle), args.threads, args.provider)
    if args._ort_worker is not None:
        return ort_worker(str(args.bundle), json.loads(args._ort_worker), args.threads, args._workloads, 2.0)
    if args.ort_tuning:
        report = ort_tuning(args)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1))
        print(f"\nwrote {args.out}")
        return
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
