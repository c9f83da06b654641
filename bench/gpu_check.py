"""GPU check of decoder reward models served from `model_format: "transformers"` bundles (docs/decoders.md).

For each size (default ≈1.5 B and ≈7 B, Qwen2.5-shaped, random-init bf16 Qwen2ForSequenceClassification with
a byte-level BPE tokenizer trained on the demo set and Qwen's ChatML template), in ≤ 8 minutes in all:

  1. save the checkpoint sharded (save_pretrained, 5 GB shards) and import it with
     `rewardserve export CKPT --out B --format transformers --reference-device cuda`;
  2. ceiling: the runtime alone, in-process (service.runtime.load_runtime), length-sorted batches of the
     mixed pool at batch sizes 1..64 within the runtime's token budget: the best items/s;
  3. rewardserve over HTTP (`rewardserve serve --provider cuda`, default settings), closed-loop clients at
     concurrency 1 / 8 / 64, prompt+response of 64-2,048 tokens (uniform in log length);
  4. a naive server: FastAPI + the transformers model's own forward per request, unpadded, on the event
     loop (how OpenRLHF's serve_rm serves), the same concurrency and items;
  5. ratios (rewardserve / naive per concurrency, rewardserve at 64 / ceiling), the max |score difference|
     between the two servers on the same items; JSON written to --out;
  6. best-of-16 prompt reuse in the runtime alone (`best_of_n`): a 1,024-token prompt, candidates of 64-128
     tokens, unshared vs run_shared: speedup, max score difference, same ranking (bf16).

`--smoke`: the same end to end on CPU with a tiny model (lengths 16-128, 1 s per cell) in < 1 minute; the
test suite runs it (tests/test_decoder_import.py).

The GPU machine has python 3.12, torch + CUDA, transformers, safetensors, tokenizers (transformers' own
dependency), jinja2, numpy, httpx and uvloop. The service also needs these small wheels, carried along and
installed with `pip install --no-deps`: fastapi, starlette, uvicorn, pydantic, pydantic-core,
pydantic-settings, python-dotenv, annotated-types, typing-inspection, prometheus-client (the script checks
them first and names what is missing). onnxruntime is not needed: the transformers path never imports it.
`bash bench/gpu_wheels.sh` downloads exactly those (the versions of this project's venv, CPython 3.12
x86-64, ~4 MB) into .whl/ and prints the one device command that installs them and runs this script.

  python bench/gpu_check.py [--sizes 1.5b,7b] [--duration 10] [--out runs/gpu_check.json]
  python bench/gpu_check.py --smoke --out /tmp/gpu_check_smoke.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SIZES = {  # Qwen2.5-0.5B, -1.5B and -7B shapes
    "0.5b": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                 intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True),
    "1.5b": dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                 intermediate_size=8960, vocab_size=151936, tie_word_embeddings=True),
    "7b": dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
               intermediate_size=18944, vocab_size=152064, tie_word_embeddings=False),
    "100m": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=4,
                 intermediate_size=2560, vocab_size=16000, tie_word_embeddings=False),  # bench/prompt_reuse.py
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, vocab_size=1024, tie_word_embeddings=False),
}
CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
          "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
              r"\s*[\r\n]+|\s+(?!\S)|\s+")
NEEDED = ("fastapi", "starlette", "uvicorn", "pydantic", "pydantic_settings", "dotenv", "prometheus_client",
          "tokenizers", "jinja2", "httpx", "transformers", "safetensors", "torch")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- model, tokenizer, items

def save_tokenizer(out: Path, vocab: int) -> None:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from service.data import demo_data_path, read_pairs

    pairs, _ = read_pairs(demo_data_path())
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([t for p in pairs for t in (p.prompt, p.chosen, p.rejected)],
                            trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>", "<|im_start|>",
                                                                                  "<|im_end|>"],
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                            chat_template=CHATML).save_pretrained(out)


def build_checkpoint(out: Path, size: str, device: str) -> Path:
    """A random-init bf16 Qwen2ForSequenceClassification (num_labels=1), saved as transformers saves one."""
    import torch
    import transformers as tf

    out.mkdir(parents=True, exist_ok=True)
    save_tokenizer(out, 1000 if size == "tiny" else 4000)
    torch.manual_seed(0)
    config = tf.Qwen2Config(max_position_embeddings=32768, pad_token_id=0, num_labels=1, **SIZES[size])
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # never materialise fp32 weights of a 7 B model
    try:
        with torch.device(device):
            model = tf.Qwen2ForSequenceClassification(config)
            torch.nn.init.normal_(model.score.weight, std=1.0 / math.sqrt(config.hidden_size))
    finally:
        torch.set_default_dtype(previous)
    model.save_pretrained(out, max_shard_size="5GB" if size != "tiny" else "100KB")
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return out


def make_items(bundle: Path, n: int, lo: int, hi: int, seed: int = 0) -> list[dict]:
    """n (prompt, response) pairs of lo..hi tokens (log-uniform), cut from the demo texts repeated."""
    from service.bundle import open_bundle
    from service.data import demo_data_path, read_pairs

    _, encoder = open_bundle(bundle)
    tok = encoder.tokenizer
    pairs, _ = read_pairs(demo_data_path())
    rng = random.Random(seed)
    items = []
    for i in range(n):
        p = pairs[i % len(pairs)]
        total = int(math.exp(rng.uniform(math.log(lo), math.log(hi))))
        prompt_ids = tok.encode(p.prompt, add_special_tokens=False).ids[: max(8, total // 4)]
        body = tok.encode(" ".join([p.chosen, p.rejected] * (1 + hi // 16)), add_special_tokens=False).ids
        start = rng.randrange(0, 16)
        response_ids = body[start: start + max(4, total - len(prompt_ids))]
        items.append({"prompt": tok.decode(prompt_ids) + f" [{i}]", "response": tok.decode(response_ids)})
    return items


# ---------------------------------------------------------------- in-process ceiling

def ceiling(bundle: Path, items: list[dict], provider: str, seconds: float, threads: int = 0) -> dict:
    import numpy as np

    from service.bundle import open_bundle
    from service.runtime import load_runtime

    manifest, encoder = open_bundle(bundle)
    runtime = load_runtime(bundle, manifest, provider=provider, intra_op_threads=threads)
    encoded = sorted(encoder.encode([i["prompt"] for i in items], [i["response"] for i in items]),
                     key=lambda e: e.n_tokens)
    # what the server's batcher runs within: min(--max-batch-tokens, default 16,384; the runtime's hint)
    budget = min(runtime.batch_hint.max_batch_tokens or 16384, 16384)
    runtime.run(encoder.pad(encoded[:2]))
    results = {}
    for size in (1, 4, 16, 64):
        batches, current = [], []
        for e in encoded:  # length-sorted, each run within the token budget
            if current and (len(current) == size or (len(current) + 1) * e.n_tokens > budget):
                batches.append(current)
                current = []
            current.append(e)
        batches.append(current)
        done, tokens, t0 = 0, 0, time.perf_counter()
        order = list(range(len(batches)))
        random.Random(size).shuffle(order)
        single_ms = []  # batch size 1: each forward's own time, for "p50 at c=1 vs one forward"
        for k in order:
            t_run = time.perf_counter()
            runtime.run(encoder.pad(batches[k]))
            if size == 1:
                _sync()
                single_ms.append(1000 * (time.perf_counter() - t_run))
            done += len(batches[k])
            tokens += sum(e.n_tokens for e in batches[k])
            if time.perf_counter() - t0 > seconds:
                break
        _sync()
        wall = time.perf_counter() - t0
        results[str(size)] = {"items_per_s": done / wall, "tokens_per_s": tokens / wall, "items": done}
        if single_ms:
            results[str(size)]["p50_forward_ms"] = float(np.median(single_ms))
    best = max(results, key=lambda s: results[s]["items_per_s"])
    out = {"by_batch_size": results, "best_batch_size": int(best), **results[best],
           "runtime": runtime.describe(), "token_budget": budget,
           "best_of_n": best_of_n(runtime, encoder, budget, 96 if provider == "cpu" else 1024)}
    del runtime
    _free_gpu()
    return out


def best_of_n(runtime, encoder, budget: int, prompt_tokens: int, n: int = 16, rounds: int = 3) -> dict:
    """Prompt reuse in the runtime alone: one prompt of `prompt_tokens` tokens and n candidates of 1/16 to 1/8
    of it, run unshared (rows within the token budget) and with the prompt's keys/values shared
    (run_shared); the median of `rounds` timings each, the largest score difference, the same ranking?"""
    import numpy as np

    from service.encoding import shared_prefix

    from service.data import demo_data_path, read_pairs

    rng = random.Random(1)
    tok = encoder.tokenizer
    pairs, _ = read_pairs(demo_data_path())
    corpus = tok.encode(" ".join(t for p in pairs for t in (p.prompt, p.chosen, p.rejected)),
                        add_special_tokens=False).ids
    prompt = tok.decode(corpus[:prompt_tokens])
    lo, hi = max(2, prompt_tokens // 16), max(3, prompt_tokens // 8)
    starts = [rng.randrange(prompt_tokens, len(corpus) - hi) for _ in range(n)]
    candidates = [tok.decode(corpus[a: a + rng.randint(lo, hi)]) for a in starts]
    items = encoder.encode_shared_prompt(prompt, candidates)
    group = shared_prefix(items, 1, encoder.fmt.pad_token_id)
    if not getattr(runtime, "reuses_prefix", False) or group is None:
        return {"prompt_reuse": False}
    inputs = encoder.pad(items)
    timings = {"unshared": [], "shared": []}
    for _ in range(rounds):
        for name in timings:
            _sync()
            t0 = time.perf_counter()
            raw = (runtime.run_shared(inputs, group.prefix, budget) if name == "shared"
                   else runtime._run_in_chunks(inputs, budget))
            _sync()
            timings[name].append(time.perf_counter() - t0)
            if name == "shared":
                shared = raw
            else:
                unshared = raw
    median = {k: float(np.median(v)) for k, v in timings.items()}
    return {"prompt_reuse": True, "prompt_tokens": group.prefix, "candidates": n,
            "mean_item_tokens": float(np.mean([e.n_tokens for e in items])), "median_s": median,
            "speedup": median["unshared"] / median["shared"],
            "max_abs_diff": float(np.max(np.abs(shared - unshared))),
            "same_ranking": bool((np.argsort(-shared, kind="stable") == np.argsort(-unshared, kind="stable")).all())}


def _sync() -> None:
    if "torch" in sys.modules and sys.modules["torch"].cuda.is_available():
        sys.modules["torch"].cuda.synchronize()


def _free_gpu() -> None:
    import gc

    gc.collect()
    if "torch" in sys.modules and sys.modules["torch"].cuda.is_available():
        sys.modules["torch"].cuda.empty_cache()


# ---------------------------------------------------------------- the naive server (subprocess mode)

def naive_server(bundle: str, port: int, device: str, threads: int) -> None:
    """FastAPI, the transformers model's own forward per request, unpadded, on the event loop."""
    import torch
    import uvicorn
    from fastapi import Body, FastAPI
    from transformers import AutoModelForSequenceClassification

    from service.bundle import open_bundle

    if threads:
        torch.set_num_threads(threads)
    manifest, encoder = open_bundle(bundle)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    import transformers

    dtype_arg = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    model = AutoModelForSequenceClassification.from_pretrained(bundle, attn_implementation="sdpa", **{dtype_arg: dtype})
    model = model.to(device).eval()
    app = FastAPI()

    @app.post("/score")
    async def score(data: dict = Body(...)):
        ids = encoder.encode([data["prompt"]], [data["response"]])[0].ids
        with torch.inference_mode():
            reward = model(input_ids=torch.tensor([ids], device=device)).logits[0, 0].float().item()
        return {"raw": reward}

    @app.get("/readyz")
    async def ready():
        return {"status": "ok"}

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


class Server:
    def __init__(self, name: str, argv: list[str], port: int, log_path: Path):
        self.name, self.url, self.log_path = name, f"http://127.0.0.1:{port}", log_path
        env = {k: v for k, v in os.environ.items() if not k.startswith("REWARDSERVE_")}
        self.proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=open(log_path, "wb"), stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float) -> float:
        import httpx

        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited {self.proc.returncode}: {self.log_path.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return time.monotonic() - t0
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"{self.name} not ready after {timeout} s: {self.log_path.read_text()[-3000:]}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


async def closed_loop(url: str, items: list[dict], concurrency: int, seconds: float, warmup: float) -> dict:
    import httpx

    latencies, done, errors = [], 0, 0
    counter = iter(range(10 ** 9))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=300) as client:
        t0 = time.perf_counter()
        w0, end = t0 + warmup, t0 + warmup + seconds

        async def one_client():
            nonlocal done, errors
            while time.perf_counter() < end:
                k = next(counter)
                item = items[k % len(items)]  # made unique: no server-side score cache hit
                item = {"prompt": f"({k}) " + item["prompt"], "response": item["response"]}
                s = time.perf_counter()
                r = await client.post(url, json=item)
                e = time.perf_counter()
                if r.status_code != 200:
                    errors += 1
                elif s >= w0 and e <= end:
                    done += 1
                    latencies.append((e - s) * 1000)

        await asyncio.gather(*(one_client() for _ in range(concurrency)))
    latencies.sort()
    pick = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))] if latencies else float("nan")  # noqa: E731
    return {"items_per_s": done / seconds, "p50_ms": pick(0.5), "p99_ms": pick(0.99), "errors": errors,
            "measured": done}


def probe_scores(url: str, items: list[dict]) -> list[float]:
    import httpx

    answers = [httpx.post(url, json=i, timeout=300) for i in items]
    bad = [a.text for a in answers if a.status_code != 200]
    if bad:
        raise RuntimeError(f"{url}: {bad[0][:500]}")
    return [a.json()["raw"] for a in answers]


# ---------------------------------------------------------------- one model

def check_model(size: str, work: Path, args) -> dict:
    device = "cpu" if args.smoke else "cuda"
    provider = "cpu" if args.smoke else "cuda"
    lo, hi = (16, 128) if args.smoke else (64, 2048)
    threads = 1 if args.smoke else 0  # one torch thread per process on a small shared CPU (no OMP spin contention)
    t0 = time.perf_counter()
    ckpt = build_checkpoint(work / f"ckpt-{size}", size, device)
    log(f"{size}: checkpoint saved ({sum(p.stat().st_size for p in ckpt.glob('*.safetensors')) / 1e9:.2f} GB)")
    bundle = work / f"bundle-{size}"
    cmd = [sys.executable, "-m", "service.cli", "export", str(ckpt), "--out", str(bundle), "--format", "transformers",
           "--max-length", str(hi + 64), "--reference-device", device, "--reference-pairs", "16"]
    t_import = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, check=True)
    import_s = time.perf_counter() - t_import
    shutil.rmtree(ckpt)  # the bundle holds the same bytes
    items = make_items(bundle, 48 if args.smoke else 256, lo, hi)
    report = {"size": size, "params_config": SIZES[size], "import_s": import_s}
    report["ceiling"] = ceiling(bundle, items, provider, 1.0 if args.smoke else args.duration / 2, threads)
    report["runtime"] = report["ceiling"].pop("runtime")
    log(f"{size}: ceiling {report['ceiling']['items_per_s']:.1f} items/s at batch {report['ceiling']['best_batch_size']}")
    log(f"{size}: best-of-N prompt reuse {report['ceiling']['best_of_n']}")
    probes = items[:8]
    for name in ("rewardserve", "naive"):
        port = free_port()
        if name == "rewardserve":
            argv = [sys.executable, "-m", "service.cli", "serve", "--bundle", str(bundle), "--port", str(port),
                    "--host", "127.0.0.1", "--provider", provider, "--log-level", "warning",
                    "--intra-op-threads", str(threads)]
            path = "/v1/score"
        else:
            argv = [sys.executable, __file__, "--_naive", str(bundle), "--port", str(port), "--device", device,
                    "--threads", str(threads)]
            path = "/score"
        server = Server(name, argv, port, work / f"{name}-{size}.log")
        try:
            startup = server.wait_ready(600)
            cells = {"startup_s": startup}
            for c in args.concurrency:
                cells[str(c)] = asyncio.run(closed_loop(server.url + path, items, c,
                                                        1.0 if args.smoke else args.duration, 0.3 if args.smoke else 2))
                log(f"{size}: {name} c={c}: {cells[str(c)]['items_per_s']:.1f} items/s, p50 {cells[str(c)]['p50_ms']:.0f} ms")
            cells["probe_scores"] = probe_scores(server.url + path, probes)
            if name == "rewardserve":
                import httpx

                cells["models"] = httpx.get(server.url + "/v1/models").json()["data"][0]
        finally:
            server.stop()
        report[name] = cells
    ours, naive = report["rewardserve"], report["naive"]
    report["max_abs_diff_vs_naive"] = max(abs(a - b) for a, b in zip(ours.pop("probe_scores"), naive.pop("probe_scores")))
    report["ratios"] = {f"rewardserve/naive c={c}": (ours[str(c)]["items_per_s"] / naive[str(c)]["items_per_s"]
                                                     if naive[str(c)]["measured"] else None)  # none done in time
                        for c in args.concurrency}
    top = max(args.concurrency)
    report["ratios"][f"rewardserve c={top} / ceiling"] = ours[str(top)]["items_per_s"] / report["ceiling"]["items_per_s"]
    if "1" in ours and "p50_forward_ms" in report["ceiling"]["by_batch_size"]["1"]:  # target: within 10 %
        report["ratios"]["rewardserve p50 c=1 / one forward p50"] = (
            ours["1"]["p50_ms"] / report["ceiling"]["by_batch_size"]["1"]["p50_forward_ms"])
    report["wall_s"] = time.perf_counter() - t0
    shutil.rmtree(bundle)
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny model, < 1 minute")
    ap.add_argument("--sizes", default="1.5b,7b")
    ap.add_argument("--concurrency", default="1,8,64")
    ap.add_argument("--duration", type=float, default=8.0, help="seconds measured per cell (GPU)")
    ap.add_argument("--out", default=str(REPO / "runs" / "gpu_check.json"))
    ap.add_argument("--workdir", default=None, help="where checkpoints and bundles go (default: a temp dir)")
    ap.add_argument("--_naive", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._naive:
        return naive_server(args._naive, args.port, args.device, args.threads)
    missing = []
    for module in NEEDED:
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        sys.exit(f"gpu_check: missing modules {missing}: install the carried wheels (see this script's docstring)")
    import torch

    if not args.smoke and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device; run with --smoke on a CPU machine")
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    sizes = ["tiny"] if args.smoke else args.sizes.split(",")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="gpu_check."))
    work.mkdir(parents=True, exist_ok=True)
    report = {"machine": {"python": sys.version.split()[0], "torch": torch.__version__,
                          "cuda": torch.version.cuda, "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available()
                          else None, "cpus": os.cpu_count()}, "smoke": args.smoke, "models": []}
    t0 = time.perf_counter()
    try:
        for size in sizes:
            report["models"].append(check_model(size, work, args))
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(report, indent=2))  # partial results survive a timeout
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    report["wall_s"] = time.perf_counter() - t0
    Path(args.out).write_text(json.dumps(report, indent=2))
    for m in report["models"]:
        print(f"{m['size']}: ceiling {m['ceiling']['items_per_s']:.1f} items/s (batch {m['ceiling']['best_batch_size']}); "
              + "; ".join(f"{k} " + (f"{v:.2f}x" if v is not None else "n/a") for k, v in m["ratios"].items())
              + f"; max |rewardserve - naive| {m['max_abs_diff_vs_naive']:.2e}")
    print(f"written: {args.out} ({report['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
