"""int8 (static, and dynamic served one item per run) vs fp32, in-process on CPU: batch invariance,
pairwise agreement, throughput.

Both bundles come from the same checkpoint (`rewardserve export CKPT --out FP32` and
`rewardserve export CKPT --quantize int8 --out INT8`) and run through service.runtime with the same
session options and threads. Measured:

  * batch invariance: max |score alone − score inside a batch of 32 mixed-length items| (≤ 1e-4);
  * pairwise agreement with fp32 on a preference set (default ../shared/data/dev_in_domain.jsonl):
    share of pairs whose preferred side (chosen vs rejected) is the same under int8 and fp32 (≥ 0.98);
    also each model's own accuracy on the set;
  * throughput: items/s of pad + run on the set's real items (sorted by length, batches of 8; 1 for
    dynamic int8, as its runtime hint serves it) and on 128-token items (same batches), models
    alternated for `--rounds` rounds (≥ 1.8× fp32).

  python bench/int8_bench.py --fp32 runs/full_bundle --int8 runs/full_bundle_int8 \
      [--data ../shared/data/dev_in_domain.jsonl] [--out docs/bench_int8.json]

`--variants NAME ...` (no names: all of VARIANTS) quantizes the fp32 bundle's model.onnx itself,
calibrated on `--calibration` pairs (default: the bundle's reference pairs, as the exporter does),
and reports the same numbers for each. Variant `exporter` is exactly export.exporter's
quantize_int8_static, so int8 can be measured even when the exporter's parity gate (agreement ≥ 0.95
on the reference pairs) refuses to write the bundle:

  python bench/int8_bench.py --fp32 runs/bench_full_bundle --variants exporter all-matmul --rounds 3
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from service.data import read_pairs  # noqa: E402
from service.bundle import open_bundle  # noqa: E402
from service.parity import batch_invariance  # noqa: E402
from service.scorer import score_sorted, score_with_runtime, sorted_runs  # noqa: E402
from service.runtime import OnnxRuntime, load_runtime  # noqa: E402
from bench.machine import cpu_model  # noqa: E402


def served_batch(runtime, batch_size: int) -> int:
    """Dynamic int8 runs one item per run (its hint); everything else at `batch_size`."""
    return min(batch_size, runtime.batch_hint.max_batch_size or batch_size)


def throughput(runtime, encoder, items, batch_size: int = 8) -> float:
    """items/s of runtime.run alone (padding not timed) over the scorer's length-sorted runs."""
    batch_size = served_batch(runtime, batch_size)
    times: list[float] = []

    def run(batch):
        feed = encoder.pad(batch)
        t0 = time.perf_counter()
        scores = runtime.run(feed)
        times.append(time.perf_counter() - t0)
        return scores

    run([items[i] for i in sorted_runs([e.n_tokens for e in items], batch_size)[0]])  # allocate
    times.clear()
    score_sorted(items, run, max_items=batch_size)
    return len(items) / sum(times)


def fixed_items(encoder, pairs, n_tokens: int, count: int):
    """Real texts cut to exactly n_tokens (prompt head + response head)."""
    tok = encoder.tokenizer
    out = []
    for p in pairs:
        po = tok.encode(p.prompt, add_special_tokens=False).offsets
        ro = tok.encode(p.chosen, add_special_tokens=False).offsets
        body = n_tokens - encoder.n_special
        r = min(len(ro), body // 2)
        k = body - r
        if k > len(po) or r < 1 or k < 1:
            continue
        e = encoder.encode([p.prompt[: po[k - 1][1]]], [p.chosen[: ro[r - 1][1]]])[0]
        if e.n_tokens == n_tokens:
            out.append(e)
        if len(out) == count:
            break
    return out


def evaluate(named_runtimes: dict, encoder, data: Path, rounds: int, fp32_name: str, tp_items: int = 0) -> dict:
    pairs, _ = read_pairs(data)
    chosen = encoder.encode([p.prompt for p in pairs], [p.chosen for p in pairs])
    rejected = encoder.encode([p.prompt for p in pairs], [p.rejected for p in pairs])
    items = chosen + rejected
    mixed = [items[i] for i in np.random.default_rng(0).permutation(len(items))]
    fixed = fixed_items(encoder, pairs, min(128, encoder.fmt.max_length), 128)
    result = {"pairs": len(pairs), "mean_tokens": float(np.mean([e.n_tokens for e in items])), "models": {}}
    prefs = {}
    for name, rt in named_runtimes.items():
        s = score_with_runtime(rt, encoder, items)
        prefs[name] = s[: len(pairs)] > s[len(pairs):]
        result["models"][name] = {"accuracy": float(np.mean(prefs[name])), "batch": served_batch(rt, 8),
                                  "batch_invariance_max_diff": batch_invariance(rt, encoder, mixed),
                                  "raw_scores": s.tolist()}
    for name in named_runtimes:
        result["models"][name]["agreement_with_fp32"] = float(np.mean(prefs[name] == prefs[fp32_name]))
        diff = np.abs(np.array(result["models"][name]["raw_scores"]) - np.array(result["models"][fp32_name]["raw_scores"]))
        result["models"][name]["max_abs_diff_vs_fp32"] = float(diff.max())
    tp = {name: {"set": [], "fixed128": []} for name in named_runtimes}
    tp_set = mixed[:tp_items] if tp_items else items
    names = list(named_runtimes)
    for rnd in range(rounds):
        for name in names[rnd % len(names):] + names[: rnd % len(names)]:
            tp[name]["set"].append(throughput(named_runtimes[name], encoder, tp_set))
            tp[name]["fixed128"].append(throughput(named_runtimes[name], encoder, fixed))
    for name in names:
        m = result["models"][name]
        m["items_per_s_set"] = float(np.median(tp[name]["set"]))
        m["items_per_s_fixed128"] = float(np.median(tp[name]["fixed128"]))
        m["rounds"] = tp[name]
        ratios_set = [a / b for a, b in zip(tp[name]["set"], tp[fp32_name]["set"])]
        ratios_fixed = [a / b for a, b in zip(tp[name]["fixed128"], tp[fp32_name]["fixed128"])]
        m["speedup_set"] = float(np.median(ratios_set))
        m["speedup_fixed128"] = float(np.median(ratios_fixed))
    return result


def environment() -> dict:
    import onnxruntime as ort

    return {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "cpu": cpu_model(),
            "cores": os.cpu_count(), "python": platform.python_version(), "onnxruntime": ort.__version__,
            "loadavg": os.getloadavg(), "command": " ".join(sys.argv)}


HEAD_FFN = {"weights_only": True, "skip_head": True, "skip_ffn_out": True}
VARIANTS = {
    # exactly what `rewardserve export --quantize int8` writes (export.exporter.quantize_int8_static)
    "exporter": {"exporter": True},
    # the exporter's original choice: every MatMul/Gemm, QDQ, per-channel weights, MinMax, U8 activations
    "all-matmul": {},
    # only MatMuls with a weight: attention's activation × activation MatMuls (Q·Kᵀ, P·V) stay fp32
    "weights-only": {"weights_only": True},
    "weights-only, reward head fp32": {"weights_only": True, "skip_head": True},
    # ... and the FFN output projections (their input, the GELU output, holds MiniLM's outliers) fp32
    "head + FFN-out fp32": HEAD_FFN,
    "head + FFN-out fp32, S8 symmetric": {**HEAD_FFN, "act": "S8", "act_sym": True},
    "head + FFN-out fp32, per-tensor": {**HEAD_FFN, "per_channel": False},
    "head + FFN-out fp32, reduce_range": {**HEAD_FFN, "reduce_range": True},
    "head + FFN-out fp32, moving-average calib": {**HEAD_FFN, "moving_average": True},
    "head + FFN-out fp32, QOperator": {**HEAD_FFN, "format": "QOperator"},
    "attention projections only": {**HEAD_FFN, "skip_ffn_in": True},
    # dynamic int8 (activation scales per run; served one item per run, so batch-invariant):
    # exactly what `rewardserve export --quantize int8-dynamic` writes, then with the static variant's exclusions
    "dynamic (exporter)": {"dynamic": True, "exporter": True},
    "dynamic, head + FFN-out fp32": {**HEAD_FFN, "dynamic": True},
    "dynamic, head fp32": {"weights_only": True, "skip_head": True, "dynamic": True},
}
# (Percentile and Entropy calibration fail here: their histogram collector needs every calibration
# batch to have the same shape, and batches padded to their own longest item do not.)


def nodes_to_exclude(model_path: Path, v: dict) -> list[str]:
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False).graph
    weights = {i.name for i in graph.initializer}
    # constants folded into Constant nodes count as weights too
    weights |= {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    mms = [n for n in graph.node if n.op_type in ("MatMul", "Gemm")]
    out = []
    for n in mms:
        if v.get("weights_only") and not any(i in weights for i in n.input[:2]):
            out.append(n.name)
        elif v.get("skip_ffn_out") and "/output/dense" in n.name and "/attention/" not in n.name:
            out.append(n.name)
        elif v.get("skip_ffn_in") and "/intermediate/dense" in n.name:
            out.append(n.name)
    if v.get("skip_head"):
        out.append(mms[-1].name)
    return out


def quantize_variant(fp32_path: Path, out_path: Path, encoder, prompts, responses, v: dict) -> list[str] | None:
    if v.get("dynamic"):
        from onnxruntime.quantization import QuantType, quantize_dynamic

        from export.exporter import quantize_int8_dynamic

        if v.get("exporter"):
            quantize_int8_dynamic(fp32_path, out_path)
            return None
        exclude = nodes_to_exclude(fp32_path, v)
        quantize_dynamic(str(fp32_path), str(out_path), weight_type=QuantType.QInt8, nodes_to_exclude=exclude,
                         op_types_to_quantize=["MatMul", "Gemm"])
        return exclude
    if v.get("exporter"):
        from export.exporter import quantize_int8_static

        quantize_int8_static(fp32_path, out_path, encoder, prompts, responses)
        return None

    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    from export.exporter import calibration_reader
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        extra = {"ActivationSymmetric": v.get("act_sym", False), "WeightSymmetric": True}
        exclude = nodes_to_exclude(prepared, v)
        if v.get("moving_average"):
            extra["CalibMovingAverage"] = True
        quantize_static(str(prepared), str(out_path), calibration_reader(encoder, prompts, responses),
                        quant_format=QuantFormat.QOperator if v.get("format") == "QOperator" else QuantFormat.QDQ,
                        per_channel=v.get("per_channel", True), reduce_range=v.get("reduce_range", False),
                        activation_type=QuantType.QInt8 if v.get("act") == "S8" else QuantType.QUInt8,
                        weight_type=QuantType.QInt8, op_types_to_quantize=v.get("ops", ["MatMul", "Gemm"]),
                        calibrate_method=CalibrationMethod.MinMax,
                        nodes_to_exclude=exclude, extra_options=extra)
    return exclude


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fp32", type=Path, required=True, help="fp32 ONNX bundle")
    ap.add_argument("--int8", type=Path, default=None, help="static int8 bundle of the same checkpoint")
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared/data/dev_in_domain.jsonl")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--variants", nargs="*", default=None, help="quantization variants to try (no names: all)")
    ap.add_argument("--calibration", type=Path, default=None, help="JSONL pairs for --variants calibration "
                    "(default: the fp32 bundle's reference_pairs.jsonl, as the exporter uses)")
    ap.add_argument("--calibration-pairs", type=int, default=512, help="the exporter uses up to 512")
    ap.add_argument("--throughput-items", type=int, default=0, help="random items of the set for the set "
                    "throughput (0: all)")
    ap.add_argument("--out", type=Path, default=REPO / "docs/bench_int8.json")
    args = ap.parse_args()

    manifest, encoder = open_bundle(args.fp32)
    runtimes = {"fp32": load_runtime(args.fp32, manifest, provider="cpu", intra_op_threads=args.threads)}
    precision = {"fp32": "fp32"}
    tmp = None
    if args.int8 is not None:
        m8, _ = open_bundle(args.int8)
        runtimes["int8 (bundle)"] = load_runtime(args.int8, m8, provider="cpu", intra_op_threads=args.threads)
        precision["int8 (bundle)"] = m8.precision
    if args.variants is not None:
        tmp = Path(tempfile.mkdtemp(prefix="int8_variants."))
        cal, _ = read_pairs(args.calibration or args.fp32 / "reference_pairs.jsonl")
        cal = cal[: args.calibration_pairs]
        prompts = [p.prompt for p in cal] * 2
        responses = [p.chosen for p in cal] + [p.rejected for p in cal]
        for name in (args.variants or list(VARIANTS)):
            path = tmp / f"v{len(runtimes)}.onnx"
            t0 = time.perf_counter()
            excluded = quantize_variant(args.fp32 / manifest.model_file, path, encoder, prompts, responses,
                                        VARIANTS[name])
            kept = "exporter's choice" if excluded is None else f"{len(excluded)} MatMul/Gemm kept fp32"
            print(f"quantized '{name}' in {time.perf_counter() - t0:.0f} s ({kept})", flush=True)
            precision[name] = "int8-dynamic" if VARIANTS[name].get("dynamic") else "int8-static"
            runtimes[name] = OnnxRuntime(path, manifest.input_names, provider="cpu", intra_op_threads=args.threads,
                                         precision=precision[name])
    env = environment()
    result = evaluate(runtimes, encoder, args.data, args.rounds, "fp32", args.throughput_items)
    result["environment"] = env
    result["environment"]["loadavg_end"] = os.getloadavg()
    result["precision"] = precision
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))

    print(f"\n## int8 vs fp32 — {env['cpu']}, {env['cores']} cores, ORT {env['onnxruntime']}, {env['date']}, "
          f"load {env['loadavg'][0]:.2f} → {os.getloadavg()[0]:.2f}")
    print(f"set: {args.data.name}, {result['pairs']} pairs, mean {result['mean_tokens']:.0f} tokens/item; "
          f"throughput median of {args.rounds} alternated rounds, threads {args.threads or 'all'}\n")
    print("| model | accuracy | agreement with fp32 | max abs diff vs fp32 | batch invariance max diff | batch | "
          "items/s (set) | × fp32 | items/s (128 tok) | × fp32 |\n|---|---|---|---|---|---|---|---|---|---|")
    for name, m in result["models"].items():
        print(f"| {name} | {m['accuracy']:.3f} | {m['agreement_with_fp32']:.3f} | {m['max_abs_diff_vs_fp32']:.3f} | "
              f"{m['batch_invariance_max_diff']:.1e} | {m['batch']} | {m['items_per_s_set']:.1f} | {m['speedup_set']:.2f} | "
              f"{m['items_per_s_fixed128']:.1f} | {m['speedup_fixed128']:.2f} |")
    for name, m in result["models"].items():
        if name == "fp32":
            continue
        checks = [("batch invariance ≤ 1e-4", m["batch_invariance_max_diff"] <= 1e-4),
                  ("agreement ≥ 0.98", m["agreement_with_fp32"] >= 0.98),
                  ("throughput ≥ 1.8× fp32 (set)", m["speedup_set"] >= 1.8)]
        print(f"{name}: " + "; ".join(f"{c}: {'met' if ok else 'MISSED'}" for c, ok in checks))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
