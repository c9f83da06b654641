"""Runtime choice for decoder reward models, measured side by side on CPU (docs/benchmarks.md §10).

One random-init Qwen2-shaped bf16 `Qwen2ForSequenceClassification` (bench/gpu_check.py's `build_checkpoint`,
default size "100m": 102 M parameters, 204 MB bf16) imported as a `model_format: "transformers"` bundle
(export.importer.import_checkpoint), and the same fixed right-padded batch (default 8 demo items of 128-256
tokens, TextEncoder.pad) run by each candidate:

  eager_sdpa          what the service runs: service.runtime.load_runtime(bundle, provider="cpu") →
                      TransformersRuntime: eager transformers + SDPA, bf16 weights upcast per module (fp32 math)
  eager_fp32_copy     the same model loaded in fp32 (an fp32 copy), plain forward: the cost of upcasting
  eager_bf16          the model as loaded (bf16), plain forward in bf16 math: what the GPU path computes in
  jit_trace_fp32      torch.jit.trace of the model (fp32 copy) on (input_ids, attention_mask)
  jit_trace_bf16      the same from the bf16 model as loaded (bf16 math)
  torch_export_fp32   torch.export.export (fp32 copy), dynamic batch and sequence dims, run as .module()
  onnx_dynamo_fp32    torch.onnx.export(dynamo=True) from an fp32 copy, run by onnxruntime CPUExecutionProvider
  onnx_dynamo_bf16    the same from the bf16 model
  onnx_legacy_bf16    torch.onnx.export(dynamo=False), the TorchScript-based exporter, from the bf16 model
  onnx_legacy_fp32    the same from an fp32 copy

Every traced/exported program sees the model through the same two-input wrapper (`Scores`: input_ids,
attention_mask → logits[:, 0], use_cache=False), as export/exporter.py does for encoders. ONNX files are
written with external data, the form a > 2 GB model needs. Each variant runs in its own child process, in a
try/except: a failure (or a crash, or --variant-timeout) is recorded as one line, never fatal. Per variant:
  ready s       from loading the bundle to a runnable program (model load, trace/export, ORT session);
                for a failure, the time until it failed
  peak MB       peak RSS over the child's baseline (taken after importing torch, transformers, onnxruntime)
                until the variant's warm-up runs are done (before the side-by-side eager_sdpa is loaded):
                weights, any fp32 copy, the export itself, the session, activations
  latency       of the batch: --warmup runs, then --reps timed runs: median, mean, min-max
  x eager       the variant's latency over the served runtime's (eager_sdpa), both loaded in the same child
                and timed alternately (ABBA), run for run: the median and range of those --reps ratios; a
                shared machine drifts by more than the differences measured here between one child and the
                next, so the ratio is taken side by side (--no-control: medians of different children)
  max|diff|     largest |score difference| against the transformers fp32 forward of each item alone
                (unpadded: the model's own scores), and the same on a second batch of another shape (3
                shorter items), to catch a program specialised to the shape it was traced/exported with

The dynamo ONNX exporter needs onnxscript (not a project dependency); without it those variants record the
ImportError. `pip install --no-deps --target DIR onnxscript onnx_ir` and PYTHONPATH=DIR make it available.

CPU only: it measures what runs, what it costs in memory and how fast on this CPU (2 threads), not the GPU
ranking (no CUDA kernels, no fp16/bf16 ORT CUDA).

  python bench/decoder_runtimes.py [--size 100m] [--items 8] [--reps 5] [--out runs/decoder_runtimes.json]
  python bench/decoder_runtimes.py --size tiny --out /tmp/decoder_runtimes.json     (about 1.5 minutes)
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.gpu_check import SIZES, build_checkpoint, log, make_items  # noqa: E402 - after the sys.path line
from bench.machine import environment  # noqa: E402

# variants that trace/export an fp32 copy of the model (2x the bf16 checkpoint's memory at LLM sizes)
NEEDS_FP32_COPY = {"eager_sdpa": False, "eager_fp32_copy": True, "eager_bf16": False,
                   "jit_trace_fp32": True, "jit_trace_bf16": False, "torch_export_fp32": True,
                   "onnx_dynamo_fp32": True, "onnx_dynamo_bf16": False,
                   "onnx_legacy_bf16": False, "onnx_legacy_fp32": True}
VARIANTS = ("eager_sdpa", "eager_fp32_copy", "eager_bf16", "jit_trace_fp32", "jit_trace_bf16", "torch_export_fp32",
            "onnx_dynamo_fp32", "onnx_dynamo_bf16", "onnx_legacy_bf16", "onnx_legacy_fp32")


# ---------------------------------------------------------------- memory

def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux ≥ 4.0: clear_refs 5); False where not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def one_line(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return (lines[0] if lines else type(exc).__name__)[:400]


# ---------------------------------------------------------------- models

def load_model(bundle: Path, dtype: str):
    import torch
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(
        bundle, dtype=getattr(torch, dtype), attn_implementation="sdpa", local_files_only=True,
        use_safetensors=True)
    return model.eval()


def scores_module(model):
    """(input_ids, attention_mask) → one fp32 score per row: the model's own head, no cache."""
    import torch

    class Scores(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask):
            out = self.inner(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
            return out.logits[:, 0].float()

    return Scores(model).eval()


def reference_scores(bundle: Path, batches: list[dict]) -> tuple[list, int]:
    """The transformers fp32 forward of each item alone (unpadded): the scores every variant is held to."""
    import numpy as np
    import torch

    model = load_model(bundle, "float32")
    params = sum(p.numel() for p in model.parameters())
    out = []
    with torch.inference_mode():
        for batch in batches:
            ids, mask = batch["input_ids"], batch["attention_mask"]
            row = []
            for i in range(len(ids)):
                n = int(mask[i].sum())
                row.append(float(model(input_ids=torch.from_numpy(ids[i: i + 1, :n])).logits[0, 0]))
            out.append(np.asarray(row, dtype=np.float32))
    del model
    gc.collect()
    return out, params


# ---------------------------------------------------------------- variants: each returns (run, info)

def torch_runner(fn):
    import numpy as np
    import torch

    def run(batch):
        with torch.inference_mode():
            y = fn(torch.from_numpy(batch["input_ids"]), torch.from_numpy(batch["attention_mask"]))
        return y.float().numpy().astype(np.float32).reshape(-1)
    return run


def make_eager(bundle, manifest, example, work, threads, stage):
    from service.runtime import load_runtime

    runtime = load_runtime(bundle, manifest, provider="cpu", intra_op_threads=threads)
    d = runtime.describe()
    return runtime.run, {"compute": d["dtype"], "weights": d["weights_dtype"],
                         "attention": d["attention"]}


def make_plain(dtype):
    def make(bundle, manifest, example, work, threads, stage):
        return torch_runner(scores_module(load_model(bundle, dtype))), {"compute": dtype}
    return make


def make_jit(dtype):
    def make(bundle, manifest, example, work, threads, stage):
        import torch

        wrapped = scores_module(load_model(bundle, dtype))
        with torch.no_grad():
            traced = torch.jit.trace(wrapped, (torch.from_numpy(example["input_ids"]),
                                               torch.from_numpy(example["attention_mask"])),
                                     check_trace=False, strict=False)
        return torch_runner(traced), {"compute": dtype}
    return make


def make_torch_export(bundle, manifest, example, work, threads, stage):
    import torch

    wrapped = scores_module(load_model(bundle, "float32"))
    batch, seq = torch.export.Dim("batch", min=1, max=1024), torch.export.Dim("seq", min=2, max=32768)
    dyn = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}}
    program = torch.export.export(wrapped, (torch.from_numpy(example["input_ids"]),
                                            torch.from_numpy(example["attention_mask"])), dynamic_shapes=dyn)
    module = program.module()
    return torch_runner(module), {"compute": "float32"}


def make_onnx(dtype, dynamo):
    def make(bundle, manifest, example, work, threads, stage):
        import numpy as np
        import onnxruntime as ort
        import torch

        wrapped = scores_module(load_model(bundle, dtype))
        path = work / f"model-{'dynamo' if dynamo else 'legacy'}-{dtype}" / "model.onnx"
        path.parent.mkdir(parents=True, exist_ok=True)
        args = (torch.from_numpy(example["input_ids"]), torch.from_numpy(example["attention_mask"]))
        names = {"input_names": ["input_ids", "attention_mask"], "output_names": ["scores"]}
        with torch.no_grad():
            if dynamo:
                batch, seq = torch.export.Dim("batch", min=1, max=1024), torch.export.Dim("seq", min=2, max=32768)
                dyn = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}}
                program = torch.onnx.export(wrapped, args, dynamo=True, dynamic_shapes=dyn, **names)
                program.save(str(path), external_data=True)
            else:
                axes = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"},
                        "scores": {0: "batch"}}
                torch.onnx.export(wrapped, args, str(path), dynamo=False, dynamic_axes=axes, opset_version=17,
                                  **names)
                import onnx  # re-save with external data (what a > 2 GB model needs)

                proto = onnx.load(str(path))
                onnx.save(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                          location="model.onnx.data")
                del proto
        del wrapped
        gc.collect()
        stage["stage"], stage["export_s"] = "onnxruntime session", time.perf_counter() - stage["t0"]
        size = sum(f.stat().st_size for f in path.parent.iterdir())
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        # no spinning after a run (as the service runs ORT): spinning threads would slow the torch runtime
        # timed alongside it
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        inputs = [i.name for i in session.get_inputs()]

        def run(batch):
            return session.run(None, {k: batch[k] for k in inputs})[0].astype(np.float32).reshape(-1)
        return run, {"compute": dtype, "onnx_bytes": size, "onnx_inputs": inputs}
    return make


MAKERS = {"eager_sdpa": make_eager, "eager_fp32_copy": make_plain("float32"), "eager_bf16": make_plain("bfloat16"),
          "jit_trace_fp32": make_jit("float32"), "jit_trace_bf16": make_jit("bfloat16"),
          "torch_export_fp32": make_torch_export,
          "onnx_dynamo_fp32": make_onnx("float32", True), "onnx_dynamo_bf16": make_onnx("bfloat16", True),
          "onnx_legacy_bf16": make_onnx("bfloat16", False), "onnx_legacy_fp32": make_onnx("float32", False)}


# ---------------------------------------------------------------- measurement

def measure(name: str, bundle: Path, batches: list[dict], refs: list, work: Path, args) -> dict:
    """One variant, in this (fresh) process: peak RSS is counted from a baseline taken after the libraries
    are imported, so it is what the variant itself holds (weights, any fp32 copy, export, session)."""
    import numpy as np
    import onnxruntime  # noqa: F401 - imported before the baseline, like torch and transformers
    import torch
    import transformers
    import transformers.models.qwen2.modeling_qwen2  # noqa: F401 - the model code every variant runs
    from transformers import AutoModelForSequenceClassification  # noqa: F401

    from service.bundle import read_manifest
    from service.runtime import load_runtime  # noqa: F401

    try:
        import onnxscript  # noqa: F401
    except ImportError:
        pass
    torch.set_num_threads(args.threads)
    manifest = read_manifest(bundle)
    gc.collect()
    tracked = reset_peak()
    base = _status("VmRSS")
    result: dict = {"variant": name, "ok": False, "needs_fp32_copy": NEEDS_FP32_COPY[name],
                    "baseline_rss_mb": base / 2**20}

    def peak():
        if tracked:
            result["peak_extra_rss_mb"] = (_status("VmHWM") - base) / 2**20

    stage = {"stage": "export", "t0": time.perf_counter()}
    try:
        run, info = MAKERS[name](bundle, manifest, batches[0], work, args.threads, stage)
    except Exception as exc:  # noqa: BLE001 - recorded, not fatal
        result.update(stage=stage["stage"], error=one_line(exc),
                      export_s=stage.get("export_s", time.perf_counter() - stage["t0"]),
                      trace=traceback.format_exc(limit=-3)[-1500:])
        peak()
        log(f"{name}: {result['stage']} failed: {result['error']}")
        return result
    result.update(info, export_s=stage.get("export_s", time.perf_counter() - stage["t0"]),
                  ready_s=time.perf_counter() - stage["t0"])
    try:
        for _ in range(args.warmup):
            scores = run(batches[0])
        other = run(batches[1])
    except Exception as exc:  # noqa: BLE001
        peak()
        result.update(stage="run", error=one_line(exc), trace=traceback.format_exc(limit=-3)[-1500:])
        log(f"{name}: run failed: {result['error']}")
        return result
    peak()  # the variant's own memory, before any control runtime is loaded
    control = None
    if args.control and name != "eager_sdpa":
        # the served runtime in the same process, timed alternately with the variant (ABBA order), so that
        # the ratio is immune to the drift of a shared machine between one child and the next
        try:
            control, _ = make_eager(bundle, manifest, batches[0], work, args.threads, {})
            for _ in range(args.warmup):
                control(batches[0])
        except Exception as exc:  # noqa: BLE001 - the variant is still timed, alone
            control, result["control_error"] = None, one_line(exc)
    times, control_times = [], []
    try:
        for i in range(args.reps):
            for fn in ((run, control) if i % 2 == 0 else (control, run)):
                if fn is None:
                    continue
                t = time.perf_counter()
                out = fn(batches[0])
                (times if fn is run else control_times).append(time.perf_counter() - t)
                if fn is run:
                    scores = out
    except Exception as exc:  # noqa: BLE001
        result.update(stage="run", error=one_line(exc), trace=traceback.format_exc(limit=-3)[-1500:])
        log(f"{name}: run failed: {result['error']}")
        return result
    diff = float(np.max(np.abs(scores - refs[0]))) if scores.shape == refs[0].shape else None
    other_diff = float(np.max(np.abs(other - refs[1]))) if other.shape == refs[1].shape else None
    result.update(ok=True, latency_s=summary(times), max_abs_diff=diff, other_shape_max_abs_diff=other_diff,
                  finite=bool(np.all(np.isfinite(scores)) and np.all(np.isfinite(other))))
    if control_times:
        result["eager_sdpa_interleaved_latency_s"] = summary(control_times)
        result["vs_eager"] = summary([a / b for a, b in zip(times, control_times)])
    elif name == "eager_sdpa":
        result["vs_eager"] = summary([1.0] * len(times))
    ratio = result.get("vs_eager", {}).get("median", float("nan"))
    log(f"{name}: ready in {result['ready_s']:.1f} s, median {result['latency_s']['median'] * 1000:.0f} ms "
        f"({ratio:.2f}x eager_sdpa alongside), max |diff| {diff:.1e}, other shape {other_diff:.1e}, "
        f"peak +{result.get('peak_extra_rss_mb', 0):.0f} MB")
    return result


def summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "mean": statistics.fmean(values), "min": min(values),
            "max": max(values), "runs": values}


def save_inputs(work: Path, batches: list[dict], refs: list) -> None:
    import numpy as np

    np.savez(work / "inputs.npz", **{f"{k}{i}": b[k] for i, b in enumerate(batches) for k in b},
             **{f"ref{i}": r for i, r in enumerate(refs)})


def child(name: str, work: Path, args) -> None:
    import numpy as np

    data = np.load(work / "inputs.npz")
    batches = [{k: data[f"{k}{i}"] for k in ("input_ids", "attention_mask")} for i in range(2)]
    refs = [data["ref0"], data["ref1"]]
    result = measure(name, work / "bundle", batches, refs, work / name, args)
    (work / f"{name}.json").write_text(json.dumps(result))


def spawn(name: str, work: Path, args) -> dict:
    """Run one variant in a child process (its own memory peak; a crash or hang is recorded, not fatal)."""
    argv = [sys.executable, __file__, "--_child", name, "--_work", str(work), "--threads", str(args.threads),
            "--reps", str(args.reps), "--warmup", str(args.warmup)] + ([] if args.control else ["--no-control"])
    log_path = work / f"{name}.log"
    out = work / f"{name}.json"
    t0 = time.perf_counter()
    try:
        with open(log_path, "wb") as logf:
            rc = subprocess.run(argv, check=False, cwd=REPO, stdout=logf, stderr=subprocess.STDOUT,
                                timeout=args.variant_timeout).returncode
    except subprocess.TimeoutExpired:
        rc = "timeout"
    if out.is_file():
        result = json.loads(out.read_text())
    else:
        tail = [ln for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()][-3:]
        result = {"variant": name, "ok": False, "needs_fp32_copy": NEEDS_FP32_COPY[name], "stage": "process",
                  "error": f"child exited {rc} after {time.perf_counter() - t0:.0f} s: " + " | ".join(tail)[-300:]}
        log(f"{name}: {result['error']}")
    result["process_s"] = time.perf_counter() - t0
    for line in log_path.read_text(errors="replace").splitlines():  # the child's own progress line
        if line.startswith("[") and f"] {name}:" in line:
            print(line, flush=True)
    return result


def _sci(v) -> str:
    return "n/a" if v is None else f"{v:.1e}"


def table(results: list[dict], batch_shape, other_shape) -> str:
    eager = next((r for r in results if r["variant"] == "eager_sdpa" and r["ok"]), None)
    lines = [f"batch {batch_shape[0]}x{batch_shape[1]} padded; other-shape check {other_shape[0]}x{other_shape[1]}",
             (f"{'variant':<19} {'ok':<4} {'fp32 copy':<9} {'ready s':>8} {'peak MB':>8} {'median ms':>10} "
              f"{'mean ms':>8} {'min-max ms':>15} {'x eager (range)':>17} {'max|diff|':>10} {'other|diff|':>11}")]
    for r in results:
        if not r["ok"]:
            lines.append(f"{r['variant']:<19} {'no':<4} {'yes' if r['needs_fp32_copy'] else 'no':<9} "
                         f"{r.get('export_s', 0):>8.1f} "
                         f"{r.get('peak_extra_rss_mb', float('nan')):>8.0f}  {r['stage']} failed: {r['error'][:110]}")
            continue
        lat = r["latency_s"]
        vs = r.get("vs_eager")
        ratio = (f"{vs['median']:.2f} ({vs['min']:.2f}-{vs['max']:.2f})" if vs else
                 f"{lat['median'] / eager['latency_s']['median']:.2f}" if eager else "n/a")
        span = f"{lat['min'] * 1000:.0f}-{lat['max'] * 1000:.0f}"
        lines.append(f"{r['variant']:<19} {'yes':<4} {'yes' if r['needs_fp32_copy'] else 'no':<9} "
                     f"{r['ready_s']:>8.1f} {r.get('peak_extra_rss_mb', float('nan')):>8.0f} "
                     f"{lat['median'] * 1000:>10.0f} {lat['mean'] * 1000:>8.0f} "
                     f"{span:>15} {ratio:>17} "
                     f"{_sci(r['max_abs_diff']):>10} {_sci(r['other_shape_max_abs_diff']):>11}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="100m", choices=sorted(SIZES))
    parser.add_argument("--items", type=int, default=8, help="rows of the timed batch")
    parser.add_argument("--min-tokens", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--no-control", dest="control", action="store_false",
                        help="skip timing eager_sdpa alongside each variant (the x eager ratio then compares "
                             "medians taken minutes apart)")
    parser.add_argument("--variant-timeout", type=float, default=600, help="seconds per variant's process")
    parser.add_argument("--out", default="runs/decoder_runtimes.json")
    parser.add_argument("--_child", help=argparse.SUPPRESS)
    parser.add_argument("--_work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._child:
        child(args._child, Path(args._work), args)
        return

    import torch

    from export.importer import import_checkpoint
    from service.bundle import open_bundle

    torch.set_num_threads(args.threads)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; known: {', '.join(VARIANTS)}")
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="decoder-runtimes-") as tmp:
        work = Path(tmp)
        ckpt = build_checkpoint(work / "ckpt", args.size, "cpu")
        ckpt_bytes = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
        bundle = work / "bundle"
        t = time.perf_counter()
        import_checkpoint(ckpt, bundle, reference_pairs=4)
        import_s = time.perf_counter() - t
        _, encoder = open_bundle(bundle)
        items = make_items(bundle, args.items, args.min_tokens, args.max_tokens)
        others = make_items(bundle, 3, max(8, args.min_tokens // 4), max(16, args.max_tokens // 4), seed=1)
        main_items = encoder.encode([i["prompt"] for i in items], [i["response"] for i in items])
        other_items = encoder.encode([i["prompt"] for i in others], [i["response"] for i in others])
        batches = [encoder.pad(main_items), encoder.pad(other_items)]
        log(f"{args.size}: checkpoint {ckpt_bytes / 1e6:.0f} MB bf16, imported in {import_s:.1f} s; batch "
            f"{batches[0]['input_ids'].shape}, other {batches[1]['input_ids'].shape}")
        refs, n_params = reference_scores(bundle, batches)
        save_inputs(work, batches, refs)
        results = [spawn(name, work, args) for name in variants]
    text = table(results, batches[0]["input_ids"].shape, batches[1]["input_ids"].shape)
    print(text, flush=True)
    eager = next((r for r in results if r["variant"] == "eager_sdpa" and r["ok"]), None)
    report = {
        "environment": environment(("torch", "transformers", "onnxruntime", "onnx", "onnxscript", "numpy")),
        "size": args.size, "config": SIZES[args.size], "checkpoint_bytes": ckpt_bytes, "params": n_params,
        "threads": args.threads, "reps": args.reps, "warmup": args.warmup, "import_s": import_s,
        "batch_shape": list(batches[0]["input_ids"].shape), "item_tokens": [e.n_tokens for e in main_items],
        "other_shape": list(batches[1]["input_ids"].shape),
        "reference": "transformers fp32 forward of each item alone (unpadded), SDPA",
        "reference_scores": refs[0].tolist(),
        "results": results,
        "latency_vs_eager": {r["variant"]: (r["vs_eager"]["median"] if "vs_eager" in r
                                             else r["latency_s"]["median"] / eager["latency_s"]["median"])
                             for r in results if r["ok"] and (eager or "vs_eager" in r)},
        "needs_fp32_copy": {r["variant"]: r.get("needs_fp32_copy") for r in results},
        "wall_s": time.perf_counter() - t_start, "table": text,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    log(f"wrote {out} ({report['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
