"""Best-of-N prompt reuse: /v1/rank latency with and without it (docs/benchmarks.md §9, docs/decoders.md).

Target: best-of-16 with a 1,024-token prompt and candidates of 64-128 tokens on a random ≈100 M decoder, on
CPU: ≥ 2× lower /v1/rank latency with reuse than without, the same scores (fp32: ≤ 1e-4) and ranking.

One checkpoint (bench/gpu_check.py `build_checkpoint`, size "100m": a Qwen2-shaped bf16
Qwen2ForSequenceClassification of ≈100 M parameters, byte-level BPE tokenizer), imported as a transformers
bundle, served twice side by side: `--prompt-reuse-min-tokens 64` (the default) and `0` (off), both with
the score cache off. Each round posts one best-of-N request (a new prompt each round) to both servers, in
alternating order; the latency of each is the client's wall time of that request. Printed: the median
latency of each, the median of the per-round ratios (and their min-max), the largest score difference
and whether the rankings agree.

  python bench/prompt_reuse.py [--rounds 7] [--n 16] [--prompt-tokens 1024] [--out runs/prompt_reuse.json]
  python bench/prompt_reuse.py --smoke --out /tmp/reuse.json     (tiny model, seconds; the test suite runs it)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.gpu_check import Server, build_checkpoint, free_port, log  # noqa: E402


def texts(bundle: Path, rounds: int, n: int, prompt_tokens: int, lo: int, hi: int, seed: int = 0):
    """Per round: a prompt of `prompt_tokens` tokens and n candidates of lo..hi tokens, cut from the demo
    texts (decoded from token ids, so their lengths are what the model sees, give or take a merge)."""
    from service.bundle import open_bundle
    from service.data import demo_data_path, read_pairs

    _, encoder = open_bundle(bundle)
    tok = encoder.tokenizer
    pairs, _ = read_pairs(demo_data_path())
    corpus = tok.encode(" ".join(t for p in pairs for t in (p.prompt, p.chosen, p.rejected)),
                        add_special_tokens=False).ids
    rng = random.Random(seed)
    out = []
    for r in range(rounds):
        start = rng.randrange(0, len(corpus) - prompt_tokens)
        prompt = f"[{r}] " + tok.decode(corpus[start: start + prompt_tokens])
        responses = []
        for _ in range(n):
            k, at = rng.randint(lo, hi), rng.randrange(0, len(corpus) - hi)
            responses.append(tok.decode(corpus[at: at + k]))
        out.append({"prompt": prompt, "responses": responses})
    return out


def post_rank(url: str, body: dict) -> tuple[float, dict]:
    import httpx

    t0 = time.perf_counter()
    r = httpx.post(url + "/v1/rank", json=body, timeout=900)
    elapsed = time.perf_counter() - t0
    r.raise_for_status()
    return elapsed, r.json()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny model, short texts, 2 rounds (CI)")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--n", type=int, default=16, help="candidates per request")
    ap.add_argument("--prompt-tokens", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=2, help="torch threads of each server")
    ap.add_argument("--workdir")
    ap.add_argument("--out", default="runs/prompt_reuse.json")
    args = ap.parse_args()
    size, lo, hi = ("tiny", 16, 32) if args.smoke else ("100m", 64, 128)
    if args.smoke:
        args.rounds, args.n, args.prompt_tokens = 2, 4, 96

    work = Path(args.workdir or tempfile.mkdtemp(prefix="prompt-reuse-"))
    ckpt, bundle = work / "ckpt", work / "bundle"
    if not (bundle / "manifest.json").is_file():
        build_checkpoint(ckpt, size, "cpu")
        import subprocess

        subprocess.run([sys.executable, "-m", "service.cli", "export", str(ckpt), "--out", str(bundle), "--format",
                        "transformers", "--max-length", str(args.prompt_tokens + hi + 64), "--reference-pairs", "8"],
                       cwd=REPO, check=True)
    from safetensors import safe_open

    params = 0
    for path in bundle.glob("*.safetensors"):
        with safe_open(str(path), "np") as f:
            params += sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    rounds = texts(bundle, args.rounds, args.n, args.prompt_tokens, lo, hi)

    servers = {}
    try:
        for name, minimum in (("reuse", 64 if not args.smoke else 16), ("no_reuse", 0)):
            port = free_port()
            argv = [sys.executable, "-m", "service.cli", "serve", "--bundle", str(bundle), "--port", str(port),
                    "--intra-op-threads", str(args.threads), "--cache-size", "0",
                    "--prompt-reuse-min-tokens", str(minimum), "--log-level", "warning"]
            servers[name] = Server(name, argv, port, work / f"{name}.log")
            servers[name].wait_ready(600)
        for server in servers.values():  # one untimed request each: first-call allocations
            post_rank(server.url, {"prompt": rounds[0]["prompt"], "responses": rounds[0]["responses"][:2]})
        cells = {name: [] for name in servers}
        answers = {name: [] for name in servers}
        for r, body in enumerate(rounds):
            order = list(servers) if r % 2 == 0 else list(servers)[::-1]
            for name in order:
                elapsed, answer = post_rank(servers[name].url, body)
                cells[name].append(elapsed)
                answers[name].append(answer)
            log(f"round {r}: reuse {cells['reuse'][-1]:.2f} s, no reuse {cells['no_reuse'][-1]:.2f} s")
        import httpx

        metrics = httpx.get(servers["reuse"].url + "/metrics").text
        runtime = httpx.get(servers["reuse"].url + "/v1/models").json()["data"][0]["runtime"]
    finally:
        for server in servers.values():
            server.stop()

    ratios = [b / a for a, b in zip(cells["reuse"], cells["no_reuse"])]
    diffs = [abs(x["raw"] - y["raw"]) for a, b in zip(answers["reuse"], answers["no_reuse"])
             for x, y in zip(a["results"], b["results"])]
    same_ranking = sum(a["ranking"] == b["ranking"] for a, b in zip(answers["reuse"], answers["no_reuse"]))
    tokens = [statistics.mean(r["n_tokens"] for r in a["results"]) for a in answers["reuse"]]
    saved = next((float(line.split()[-1]) for line in metrics.splitlines()
                  if line.startswith("rewardserve_prompt_reuse_tokens_total ")), 0.0)
    report = {
        "model": {"size": size, "parameters": params, "runtime": runtime},
        "workload": {"rounds": args.rounds, "candidates": args.n, "prompt_tokens": args.prompt_tokens,
                     "candidate_tokens": [lo, hi], "mean_item_tokens": statistics.mean(tokens)},
        "latency_s": cells, "median_s": {k: statistics.median(v) for k, v in cells.items()},
        "speedup": {"median_of_round_ratios": statistics.median(ratios), "min": min(ratios), "max": max(ratios),
                    "ratio_of_medians": statistics.median(cells["no_reuse"]) / statistics.median(cells["reuse"])},
        "max_abs_diff": max(diffs), "same_ranking_rounds": same_ranking, "prompt_tokens_reused": saved,
        "machine": {"cpus": os.cpu_count(), "threads_per_server": args.threads, "python": sys.version.split()[0]},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"{size} decoder ({params / 1e6:.1f} M parameters), best-of-{args.n}, prompt {args.prompt_tokens} tokens, "
          f"candidates {lo}-{hi} tokens, {args.rounds} rounds, {runtime['device']} {runtime['precision']}")
    print(f"/v1/rank median latency: reuse {report['median_s']['reuse']:.2f} s, no reuse "
          f"{report['median_s']['no_reuse']:.2f} s; speedup {report['speedup']['median_of_round_ratios']:.2f}x "
          f"(rounds {min(ratios):.2f}-{max(ratios):.2f}x)")
    print(f"max |score difference| {max(diffs):.2e}; same ranking in {same_ranking}/{args.rounds} rounds; "
          f"prompt tokens not recomputed: {saved:.0f}")
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
