"""GPU check of decoder reward models served from `model_format: "transformers"` bundles (docs/decoders.md).

For each size (default ≈1.5 B and ≈7 B, Qwen2.5-shaped, random-init bf16 Qwen2ForSequenceClassification with
a byte-level BPE tokenizer trained on the demo set and Qwen's ChatML template), in ≤ 8 minutes in all, as named
phases (PHASES: checkpoint, import, ceiling, rewardserve, naive, ratios, bf16_check, grpo):

  1. check the free disk, save the checkpoint sharded (save_pretrained, 5 GB shards) and import it in-process
     (export.importer.import_checkpoint, what `rewardserve export CKPT --out B --format transformers
     --reference-device cuda` runs) with the weights hard-linked: written once, hashed once (write_manifest;
     the later phases read the manifest instead of re-verifying 15 GB, only the served engine verifies);
  2. ceiling: the runtime alone, in-process (service.runtime.load_runtime), length-sorted batches of the
     mixed pool at batch sizes 1..64 within the runtime's token budget: the best items/s;
  3. rewardserve over HTTP (`rewardserve serve --provider cuda`, default settings), closed-loop clients at
     concurrency 1 / 8 / 64, prompt+response of 64-2,048 tokens (uniform in log length);
  4. a naive server: FastAPI + the transformers model's own forward per request, unpadded, on the event
     loop (how OpenRLHF's serve_rm serves), the same concurrency and items;
  5. ratios (rewardserve / naive per concurrency, rewardserve at 64 / ceiling), the max |score difference|
     between the two servers on the same items; JSON written to --out;
  6. best-of-16 prompt reuse in the runtime alone (`best_of_n`): a 1,024-token prompt, candidates of 64-128
     tokens, unshared vs run_shared: speedup, max score difference, same ranking (bf16);
  7. `bf16_check`: the reference pairs scored in fp32 (an fp32 copy loaded on the device) and in bf16 as the
     server runs them, judged by the server's startup rule (service/parity.py): what a bundle imported on CPU
     (fp32 reference) meets when it is served bf16 on this GPU. It loads the fp32 copy;
  8. `grpo`: issue 21's GRPO scenario (bench/grpo_burst.run_scenario) in bf16: 24 prompts x 8 samples, one
     request per sample, all at once and 16 in flight round-robin, prefix sharing on vs off: throughput ratio,
     rewards lost, and the same pairwise order within every group.

Every phase's outcome is recorded under the size's "phases" and the JSON is rewritten after every phase and
every HTTP cell, so a timeout or a crash keeps what was measured. A failing phase (the import's parity gate
included) fails that size only: the phases that need it are skipped ("skipped"), the others run, the next size
runs, and the script exits 1 at the end. `--fail-phase NAME` plants a failure in one phase (tested).

`--quick`: only what the three target ratios need, on the 1.5 B shape: concurrency 1 and 64, the naive server
at 64 only, ceiling batch sizes 1/16/64, no best-of-N nor bf16_check, 4 s per cell: < 4 minutes of a GPU window.
`--smoke`: the same end to end on CPU with a tiny model (lengths 16-128, 1 s per cell) in < 1 minute; the
test suite runs it (tests/test_decoder_import.py, tests/test_gpu_paths.py with --quick and --fail-phase).

The GPU machine has python 3.12, torch + CUDA, transformers, safetensors, tokenizers (transformers' own
dependency), jinja2, numpy, httpx and uvloop. The service also needs these small wheels, carried along and
installed with `pip install --no-deps`: fastapi, starlette, uvicorn, pydantic, pydantic-core,
pydantic-settings, python-dotenv, annotated-types, typing-inspection, httptools (the script imports each
module it needs first and prints, and writes to --out, the exception of each that fails). onnxruntime is not
needed: the transformers path never imports it. `bash bench/gpu_wheels.sh` downloads those (the versions of
this project's venv, CPython 3.12 x86-64, ~4 MB) into .whl/, and on the device installs only the ones the
device lacks (its own anyio, idna, click, h11, typing-extensions stay in charge); its header holds the command.

  python bench/gpu_check.py [--quick] [--sizes 1.5b,7b] [--duration 10] [--out runs/gpu_check.json]
  python bench/gpu_check.py --smoke [--quick] [--fail-phase naive] --out /tmp/gpu_check_smoke.json
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
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

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


def written_bundle(bundle: Path):
    """(manifest, encoder) of a bundle this run wrote a moment ago, without re-hashing it: write_manifest has
    just computed its checksums, and re-verifying a 15 GB bundle in every phase cost minutes of the GPU
    window. The server under test still verifies it, as it always does."""
    from service.bundle import read_manifest
    from service.encoding import TextEncoder

    manifest = read_manifest(bundle)
    return manifest, TextEncoder.from_dir(bundle, manifest.text)


def make_items(bundle: Path, n: int, lo: int, hi: int, seed: int = 0) -> list[dict]:
    """n (prompt, response) pairs of lo..hi tokens (log-uniform), cut from the demo texts repeated."""
    from service.data import demo_data_path, read_pairs

    _, encoder = written_bundle(bundle)
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

def ceiling(bundle: Path, items: list[dict], provider: str, seconds: float, threads: int = 0,
            quick: bool = False) -> dict:
    """The runtime alone at batch sizes 1/4/16/64 (quick: 1/16/64), and best-of-N prompt reuse (not quick)."""
    import numpy as np

    from service.runtime import load_runtime

    manifest, encoder = written_bundle(bundle)
    runtime = load_runtime(bundle, manifest, provider=provider, intra_op_threads=threads)
    encoded = sorted(encoder.encode([i["prompt"] for i in items], [i["response"] for i in items]),
                     key=lambda e: e.n_tokens)
    # what the server's batcher runs within: min(--max-batch-tokens, default 16,384; the runtime's hint)
    budget = min(runtime.batch_hint.max_batch_tokens or 16384, 16384)
    runtime.run(encoder.pad(encoded[:2]))
    results = {}
    for size in (1, 16, 64) if quick else (1, 4, 16, 64):
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
           "runtime": runtime.describe(), "token_budget": budget}
    if not quick:
        try:  # measured after the ceiling, which it must not take down with it
            out["best_of_n"] = best_of_n(runtime, encoder, budget, 96 if provider == "cpu" else 1024)
        except Exception as exc:  # noqa: BLE001
            out["best_of_n"] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
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

    if threads:
        torch.set_num_threads(threads)
    manifest, encoder = written_bundle(Path(bundle))
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


# ---------------------------------------------------------------- one model, phase by phase

@dataclass
class Phase:
    """One named step of a size's check: it runs when the phases it `needs` succeeded, writes what it
    measured into the size's report, and a failure in it is recorded (the size's JSON keeps everything
    measured before). A new measurement is one more entry in PHASES."""

    name: str
    run: Callable[["SizeRun"], None]
    needs: tuple[str, ...] = ()
    full_only: bool = False  # skipped by --quick


@dataclass
class SizeRun:
    """What the phases of one size share: settings, paths, the items, and the report they fill."""

    size: str
    work: Path
    args: argparse.Namespace
    report: dict
    save: Callable[[], None]
    items: list = field(default_factory=list)

    @property
    def device(self) -> str:
        return "cpu" if self.args.smoke else "cuda"

    @property
    def lengths(self) -> tuple[int, int]:
        return (16, 128) if self.args.smoke else (64, 2048)

    @property
    def threads(self) -> int:
        return 1 if self.args.smoke else 0  # one torch thread per process on a small shared CPU

    @property
    def ckpt(self) -> Path:
        return self.work / f"ckpt-{self.size}"

    @property
    def bundle(self) -> Path:
        return self.work / f"bundle-{self.size}"

    def seconds(self, share: float = 1.0) -> float:
        """Seconds measured per cell: --duration (default 8; --quick 4) times `share`; 1 s in --smoke."""
        return 1.0 if self.args.smoke else share * (self.args.duration or 8.0)


def checkpoint_bytes(size: str) -> int:
    """The bf16 checkpoint's size, from the parameter count of the model built on the meta device."""
    import torch
    import transformers as tf

    config = tf.Qwen2Config(max_position_embeddings=32768, pad_token_id=0, num_labels=1, **SIZES[size])
    with torch.device("meta"):
        model = tf.Qwen2ForSequenceClassification(config)
    return 2 * sum(p.numel() for p in model.parameters())


def phase_checkpoint(run: SizeRun) -> None:
    """Free disk first (the checkpoint, and its copy if hard links fail), then the random bf16 checkpoint."""
    need = checkpoint_bytes(run.size)
    free = shutil.disk_usage(run.work).free
    run.report["checkpoint_bytes"], run.report["disk_free_bytes"] = need, free
    if free < 2.1 * need:
        raise RuntimeError(f"{run.size}: needs about {2.1 * need / 1e9:.1f} GB free in {run.work} (checkpoint "
                           f"{need / 1e9:.1f} GB and, if hard links fail there, its copy); {free / 1e9:.1f} GB free")
    build_checkpoint(run.ckpt, run.size, run.device)
    log(f"{run.size}: checkpoint saved ({sum(p.stat().st_size for p in run.ckpt.glob('*.safetensors')) / 1e9:.2f} GB)")


def phase_import(run: SizeRun) -> None:
    """The importer, in-process (`rewardserve export --format transformers --reference-device DEVICE` is this
    call): the weights hard-linked (written once), hashed once by write_manifest. Its parity gate failing
    fails this size, not the run."""
    from export.importer import import_checkpoint

    t0 = time.perf_counter()
    try:
        import_checkpoint(run.ckpt, run.bundle, reference_pairs=16, max_length=run.lengths[1] + 64,
                          device=run.device, link=True)
    finally:
        _free_gpu()
    run.report["import_s"] = time.perf_counter() - t0
    shutil.rmtree(run.ckpt)  # the bundle holds the same files
    lo, hi = run.lengths
    run.items[:] = make_items(run.bundle, 48 if run.args.smoke else (128 if run.args.quick else 256), lo, hi)


def phase_ceiling(run: SizeRun) -> None:
    report = run.report
    report["ceiling"] = ceiling(run.bundle, run.items, run.device, run.seconds(0.5),
                                run.threads, quick=run.args.quick)
    report["runtime"] = report["ceiling"].pop("runtime")
    log(f"{run.size}: ceiling {report['ceiling']['items_per_s']:.1f} items/s at batch "
        f"{report['ceiling']['best_batch_size']}")
    if "best_of_n" in report["ceiling"]:
        log(f"{run.size}: best-of-N prompt reuse {report['ceiling']['best_of_n']}")


def serve_and_measure(run: SizeRun, name: str, concurrency: list[int]) -> None:
    """One server (rewardserve or the naive one) over HTTP: start-up time, then a closed loop per concurrency
    (each cell written as soon as it is measured), the probe scores, /v1/models."""
    port = free_port()
    if name == "rewardserve":
        argv = [sys.executable, "-m", "service.cli", "serve", "--bundle", str(run.bundle), "--port", str(port),
                "--host", "127.0.0.1", "--provider", run.device, "--log-level", "warning",
                "--intra-op-threads", str(run.threads)]
        path = "/v1/score"
    else:
        argv = [sys.executable, __file__, "--_naive", str(run.bundle), "--port", str(port), "--device", run.device,
                "--threads", str(run.threads)]
        path = "/score"
    cells = run.report[name] = {}
    server = Server(name, argv, port, run.work / f"{name}-{run.size}.log")
    try:
        cells["startup_s"] = server.wait_ready(600)
        for c in concurrency:
            cells[str(c)] = asyncio.run(closed_loop(server.url + path, run.items, c, run.seconds(),
                                                    0.3 if run.args.smoke else 2))
            log(f"{run.size}: {name} c={c}: {cells[str(c)]['items_per_s']:.1f} items/s, "
                f"p50 {cells[str(c)]['p50_ms']:.0f} ms")
            run.save()
        cells["probe_scores"] = probe_scores(server.url + path, run.items[:8])
        if name == "rewardserve":
            import httpx

            cells["models"] = httpx.get(server.url + "/v1/models").json()["data"][0]
    except Exception:
        cells["log_tail"] = server.log_path.read_text(errors="replace")[-3000:] if server.log_path.exists() else ""
        raise
    finally:
        server.stop()


def phase_rewardserve(run: SizeRun) -> None:
    serve_and_measure(run, "rewardserve", run.args.concurrency)


def phase_naive(run: SizeRun) -> None:
    """The naive server; --quick measures it only where a target ratio reads it (the top concurrency)."""
    serve_and_measure(run, "naive", run.args.concurrency[-1:] if run.args.quick else run.args.concurrency)


def phase_ratios(run: SizeRun) -> None:
    """The three GPU targets (docs/decoders.md): rewardserve c=top / ceiling, rewardserve / naive per
    concurrency, rewardserve's p50 at c=1 / the median single forward; and max |rewardserve − naive|."""
    report = run.report
    ours, naive = report["rewardserve"], report["naive"]
    report["max_abs_diff_vs_naive"] = max(abs(a - b) for a, b in zip(ours.pop("probe_scores"),
                                                                     naive.pop("probe_scores")))
    ratios = report["ratios"] = {}
    for c in run.args.concurrency:
        if str(c) in naive:
            ratios[f"rewardserve/naive c={c}"] = (ours[str(c)]["items_per_s"] / naive[str(c)]["items_per_s"]
                                                  if naive[str(c)]["measured"] else None)  # none done in time
    top = max(run.args.concurrency)
    ratios[f"rewardserve c={top} / ceiling"] = ours[str(top)]["items_per_s"] / report["ceiling"]["items_per_s"]
    if "1" in ours and "p50_forward_ms" in report["ceiling"]["by_batch_size"]["1"]:  # target: within 10 %
        ratios["rewardserve p50 c=1 / one forward p50"] = (
            ours["1"]["p50_ms"] / report["ceiling"]["by_batch_size"]["1"]["p50_forward_ms"])


def phase_bf16_check(run: SizeRun) -> None:
    """What the server's startup check decides for this checkpoint served bf16 against an fp32 reference (a
    bundle imported on CPU): the reference pairs scored alone in fp32 (the model loaded fp32 on the device) and
    as the server runs them in bf16, compared by service.parity's rule. The import above records a bf16
    reference on a GPU (no check at serving), so this is the one place the GPU run measures that rule."""
    import numpy as np

    from service.parity import parity_report, reference_items, threshold_key
    from service.runtime import CPU_BATCH_HINT, GPU_BATCH_HINT
    from service.scorer import score_with_runtime
    from service.torch_runtime import TransformersRuntime

    manifest, encoder = written_bundle(run.bundle)
    items, n = reference_items(run.bundle, encoder)
    scores = {}
    for precision in ("fp32", "bf16"):
        runtime = TransformersRuntime(run.bundle, manifest.input_names, manifest.precision,
                                      manifest.text.pad_token_id, manifest.text.max_length, CPU_BATCH_HINT,
                                      GPU_BATCH_HINT, device=run.device, threads=run.threads, compute=precision)
        scores[precision] = (np.array([runtime.run(encoder.pad([it]))[0] for it in items], dtype=np.float64)
                             if precision == "fp32" else score_with_runtime(runtime, encoder, items))
        del runtime
        _free_gpu()
    report = parity_report(scores["fp32"], scores["bf16"], n, threshold_key("bf16", "fp32"))
    run.report["bf16_check"] = report.model_dump()
    log(f"{run.size}: bf16 vs fp32 reference: agreement {report.pairwise_agreement:.4f}, max |diff| "
        f"{report.max_abs_diff:.2e}, {'passes' if report.passed else 'FAILS'}")


def phase_grpo(run: SizeRun) -> None:
    """Issue 21's GRPO scenario (bench/grpo_burst.py) on this size in bf16: 24 prompts x 8 samples sent one
    request per sample (half /get_reward, half /classify), all at once and 16 in flight round-robin, prefix
    sharing on vs off, one server at a time on the GPU. Targets: the throughput ratio, 0 rewards lost, and
    the same pairwise order within every group (bf16 rounds the shared and unshared paths differently)."""
    from bench.grpo_burst import run_scenario

    smoke = run.args.smoke
    report = run_scenario(run.bundle, run.device, prompts=4 if smoke else 24, n=4 if smoke else 8,
                          prompt_tokens=(64, 96) if smoke else (384, 1024),
                          response_tokens=(8, 16) if smoke else (32, 256), rounds=1 if smoke else 2,
                          in_flight=3 if smoke else 16, threads=run.threads, reuse_min=16 if smoke else 64,
                          workdir=run.work / "grpo")
    run.report["grpo"] = report
    for order, cell in report["orders"].items():
        log(f"{run.size}: GRPO {order}: sharing on/off {cell['ratio_median']:.2f}x, lost {cell['rewards_lost']}, "
            f"order same {cell['pairwise_order_same']}/{cell['pairwise_order_pairs']}, "
            f"max diff {cell['max_reward_diff']}")


PHASES = [
    Phase("checkpoint", phase_checkpoint),
    Phase("import", phase_import, needs=("checkpoint",)),
    Phase("ceiling", phase_ceiling, needs=("import",)),
    Phase("rewardserve", phase_rewardserve, needs=("import",)),
    Phase("naive", phase_naive, needs=("import",)),
    Phase("ratios", phase_ratios, needs=("ceiling", "rewardserve", "naive")),
    Phase("bf16_check", phase_bf16_check, needs=("import",), full_only=True),
    Phase("grpo", phase_grpo, needs=("import",), full_only=True),
]


def check_model(size: str, work: Path, args, report: dict, save: Callable[[], None]) -> None:
    """Every phase of one size, in order, into `report` (already part of the written JSON): each phase's
    outcome and seconds under report["phases"], the JSON written after each; a failed phase is recorded with
    its error and the phases that need it are skipped. `--fail-phase NAME` plants a failure there."""
    run = SizeRun(size, work, args, report, save)
    report.update({"size": size, "params_config": SIZES[size], "phases": {}})
    t0 = time.perf_counter()
    try:
        for phase in PHASES:
            done = report["phases"]
            if phase.full_only and args.quick:
                continue
            missing = [n for n in phase.needs if not done.get(n, {}).get("ok")]
            if missing:
                done[phase.name] = {"ok": False, "skipped": f"needs {', '.join(missing)}"}
                continue
            t_phase = time.perf_counter()
            try:
                if args.fail_phase == phase.name:
                    raise RuntimeError(f"planted failure in phase {phase.name} (--fail-phase)")
                phase.run(run)
                done[phase.name] = {"ok": True, "s": round(time.perf_counter() - t_phase, 2)}
            except Exception as exc:  # recorded; the phases that do not need this one still run
                done[phase.name] = {"ok": False, "s": round(time.perf_counter() - t_phase, 2),
                                    "error": f"{type(exc).__name__}: {exc}"[:4000]}
                report.setdefault("failed_phases", []).append(phase.name)
                log(f"{size}: phase {phase.name} FAILED:\n{traceback.format_exc()}")
            report["wall_s"] = time.perf_counter() - t0
            save()
    finally:
        shutil.rmtree(run.ckpt, ignore_errors=True)
        shutil.rmtree(run.bundle, ignore_errors=True)
        _free_gpu()


def import_problems() -> dict[str, str]:
    """Each needed module that does not import, with the exception it raised (a carried wheel that needs a
    package the device lacks shows up here by name, not as a bare 'missing')."""
    problems = {}
    for module in NEEDED:
        try:
            __import__(module)
        except Exception as exc:  # noqa: BLE001 - any import-time failure is what must be shown
            problems[module] = f"{type(exc).__name__}: {exc}"
    return problems


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny model, < 1 minute")
    ap.add_argument("--quick", action="store_true", help="only the three target ratios, on the 1.5 B shape "
                    "(concurrency 1 and 64, naive at 64 only, no best-of-N nor bf16_check), < 4 minutes on a GPU")
    ap.add_argument("--sizes", default=None, help="comma-separated sizes (default 1.5b,7b; --quick: 1.5b)")
    ap.add_argument("--concurrency", default=None, help="default 1,8,64 (--quick: 1,64)")
    ap.add_argument("--duration", type=float, default=None,
                    help="seconds measured per cell on a GPU (default 8; ceiling cells half; --quick: 4)")
    ap.add_argument("--out", default=str(REPO / "runs" / "gpu_check.json"))
    ap.add_argument("--workdir", default=None, help="where checkpoints and bundles go (default: a temp dir)")
    ap.add_argument("--fail-phase", default=None, choices=[p.name for p in PHASES],
                    help="plant a failure in this phase of every size (to test that what came before survives)")
    ap.add_argument("--_naive", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._naive:
        return naive_server(args._naive, args.port, args.device, args.threads)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    problems = import_problems()
    if problems:
        out.write_text(json.dumps({"error": "modules do not import", "modules": problems}, indent=2))
        sys.exit("gpu_check: these modules do not import (install the carried wheels, see this script's "
                 "docstring):\n" + "\n".join(f"  {m}: {e}" for m, e in problems.items()))
    import torch

    if not args.smoke and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device; run with --smoke on a CPU machine")
    if args.duration is None and args.quick:
        args.duration = 4.0
    args.concurrency = [int(c) for c in (args.concurrency or ("1,64" if args.quick else "1,8,64")).split(",")]
    sizes = ["tiny"] if args.smoke else (args.sizes or ("1.5b" if args.quick else "1.5b,7b")).split(",")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="gpu_check."))
    work.mkdir(parents=True, exist_ok=True)
    report = {"machine": {"python": sys.version.split()[0], "torch": torch.__version__,
                          "cuda": torch.version.cuda, "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available()
                          else None, "cpus": os.cpu_count()}, "smoke": args.smoke, "quick": args.quick,
              "planted_failure": args.fail_phase, "models": []}
    t0 = time.perf_counter()

    def save() -> None:  # after every phase and cell: what was measured survives a timeout or a crash
        report["wall_s"] = time.perf_counter() - t0
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(report, indent=2))
        tmp.replace(out)

    try:
        for size in sizes:
            report["models"].append({"size": size})
            check_model(size, work, args, report["models"][-1], save)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
        save()
    for m in report["models"]:
        if "ratios" in m:
            print(f"{m['size']}: ceiling {m['ceiling']['items_per_s']:.1f} items/s (batch "
                  f"{m['ceiling']['best_batch_size']}); " + "; ".join(
                      f"{k} " + (f"{v:.2f}x" if v is not None else "n/a") for k, v in m["ratios"].items())
                  + f"; max |rewardserve - naive| {m['max_abs_diff_vs_naive']:.2e}")
        for name in m.get("failed_phases", []):
            print(f"{m['size']}: phase {name} failed: {m['phases'][name]['error'][:500]}")
    print(f"written: {out} ({report['wall_s']:.0f} s)")
    if any(m.get("failed_phases") for m in report["models"]):
        sys.exit(1)


if __name__ == "__main__":
    main()
