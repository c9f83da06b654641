"""Host memory and time of importing and serving a bf16 decoder reward model (docs/benchmarks.md §8).

Target (docs/decoders.md): importing and serving a bf16 checkpoint of S bytes peaks at ≤ 1.5 S + 1 GiB of
host memory, the import of a ≈0.5 B checkpoint takes ≤ 5 minutes on 2 CPU cores, and `/v1/score` equals the
transformers fp32 forward of the same token ids within 1e-4.

Steps, each measured in its own process so that one peak is one step's:
  1. build a random-init Qwen2.5-0.5B-shaped bf16 Qwen2ForSequenceClassification (bench/gpu_check.py's
     `build_checkpoint`), saved as `save_pretrained` saves it: S = the bytes of its safetensors;
  2. `rewardserve export CKPT --out B --format transformers` (16 reference pairs scored on CPU, fp32 compute
     over the bf16 weights): wall time and peak RSS (the child's ru_maxrss, from wait4);
  3. `rewardserve serve --bundle B`: startup (checksums, load, the startup precision check, warm-up), then
     /v1/score on `--items` demo items and one /v1/rank; peak RSS (VmHWM) while serving;
  4. after the server is gone: the transformers fp32 forward of the same token ids, in this process.

  python bench/decoder_memory.py [--size 0.5b] [--items 8] [--out runs/decoder_memory.json]
  python bench/decoder_memory.py --size tiny --out /tmp/m.json     (seconds; the test suite runs it)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.gpu_check import Server, build_checkpoint, free_port, log  # noqa: E402

GiB = 1 << 30
PARITY_TOLERANCE = 1e-4


def run_measured(argv: list[str], log_path: Path) -> tuple[float, int]:
    """(wall seconds, peak RSS bytes) of one child process, which must succeed."""
    t0 = time.perf_counter()
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(argv, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{argv[3:5]} exited {proc.returncode}: {log_path.read_text()[-3000:]}")
    return time.perf_counter() - t0, usage.ru_maxrss * 1024  # Linux: kilobytes


def peak_rss(pid: int) -> int:
    """VmHWM: the process's peak resident set so far."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc status")


def serve_and_score(bundle: Path, work: Path, items: list[dict], threads: int) -> dict:
    import httpx

    port = free_port()
    argv = [sys.executable, "-m", "service.cli", "serve", "--bundle", str(bundle), "--port", str(port),
            "--intra-op-threads", str(threads), "--cache-size", "0"]
    server = Server("rewardserve", argv, port, work / "serve.log")
    try:
        startup = server.wait_ready(900)
        scores = []
        for item in items:
            r = httpx.post(server.url + "/v1/score", json=item, timeout=600)
            r.raise_for_status()
            scores.append(r.json()["raw"])
        rank = httpx.post(server.url + "/v1/rank", timeout=600,
                          json={"prompt": items[0]["prompt"], "responses": [i["response"] for i in items]})
        rank.raise_for_status()
        models = httpx.get(server.url + "/v1/models").json()["data"][0]
        peak = peak_rss(server.proc.pid)
    finally:
        server.stop()
    return {"startup_s": startup, "peak_rss_bytes": peak, "scores": scores, "runtime": models["runtime"],
            "precision_check": models.get("precision_check"), "rank_best_index": rank.json()["best_index"]}


def reference_scores(ckpt_or_bundle: Path, items: list[dict]) -> list[float]:
    """The transformers fp32 forward of the token ids rewardserve scored (this process; after the server)."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from service.bundle import open_bundle

    _, encoder = open_bundle(ckpt_or_bundle)
    model = AutoModelForSequenceClassification.from_pretrained(ckpt_or_bundle, dtype=torch.float32).eval()
    out = []
    with torch.inference_mode():
        for item in items:
            ids = encoder.encode([item["prompt"]], [item["response"]])[0].ids
            out.append(float(model(input_ids=torch.tensor([ids])).logits[0, 0]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="0.5b", help="a bench/gpu_check.py SIZES key (0.5b, tiny)")
    ap.add_argument("--items", type=int, default=8, help="demo items scored over HTTP and compared")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workdir", help="where the checkpoint and bundle go (default: a temporary directory)")
    ap.add_argument("--out", default="runs/decoder_memory.json")
    args = ap.parse_args()
    from service.data import demo_data_path, read_pairs

    work = Path(args.workdir or tempfile.mkdtemp(prefix="decoder-memory-"))
    work.mkdir(parents=True, exist_ok=True)
    ckpt, bundle = work / "ckpt", work / "bundle"
    t0 = time.perf_counter()
    build_checkpoint(ckpt, args.size, "cpu")
    size = sum(p.stat().st_size for p in ckpt.glob("*.safetensors"))
    log(f"checkpoint built in {time.perf_counter() - t0:.0f} s: {size / 1e9:.3f} GB of bf16 safetensors")
    target = 1.5 * size + GiB

    import_s, import_peak = run_measured(
        [sys.executable, "-m", "service.cli", "export", str(ckpt), "--out", str(bundle), "--format", "transformers",
         "--reference-pairs", "16"], work / "import.log")
    log(f"import: {import_s:.1f} s, peak RSS {import_peak / 1e9:.3f} GB (target {target / 1e9:.3f} GB)")

    pairs, _ = read_pairs(demo_data_path())
    items = [{"prompt": p.prompt, "response": p.chosen} for p in pairs[: args.items]]
    served = serve_and_score(bundle, work, items, args.threads)
    log(f"serve: ready in {served['startup_s']:.1f} s, peak RSS {served['peak_rss_bytes'] / 1e9:.3f} GB")
    want = reference_scores(bundle, items)
    diff = max(abs(a - b) for a, b in zip(served["scores"], want))
    report = {
        "size": args.size, "checkpoint_bytes": size, "target_peak_bytes": target,
        "import": {"seconds": import_s, "peak_rss_bytes": import_peak, "within_target": import_peak <= target},
        "serve": {k: served[k] for k in ("startup_s", "peak_rss_bytes", "runtime", "precision_check")}
        | {"within_target": served["peak_rss_bytes"] <= target},
        "parity": {"items": len(items), "max_abs_diff_vs_transformers_fp32": diff, "tolerance": PARITY_TOLERANCE,
                   "passed": diff <= PARITY_TOLERANCE, "served": served["scores"], "transformers_fp32": want},
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"S = {size / 1e9:.3f} GB; target peak 1.5 S + 1 GiB = {target / 1e9:.3f} GB")
    print(f"import: {import_s:.1f} s, peak {import_peak / 1e9:.3f} GB = {import_peak / size:.2f} S "
          f"({'within' if import_peak <= target else 'OVER'} target)")
    print(f"serve:  ready in {served['startup_s']:.1f} s, peak {served['peak_rss_bytes'] / 1e9:.3f} GB = "
          f"{served['peak_rss_bytes'] / size:.2f} S ({'within' if served['peak_rss_bytes'] <= target else 'OVER'} target)")
    print(f"/v1/score vs transformers fp32 forward, {len(items)} items: max |diff| {diff:.2e} "
          f"({'ok' if diff <= PARITY_TOLERANCE else 'FAILED'} at {PARITY_TOLERANCE:g})")
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
