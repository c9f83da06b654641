"""`rewardserve eval`: accuracy of a bundle on preference JSONL files, through the serving runtime.

It scores with the exported model exactly as the service loads it (open_bundle + load_runtime, ONNX
Runtime, no torch), so its numbers are what production will do. Next to every accuracy it prints the
"longer response wins" baseline: a reward model that does not beat it has mostly learned length.
That baseline is defined once, here (`longer_wins_baseline`); the trainer, the exporter's eval figures
and `rewardserve audit` all report this one number.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from service.data import PreferencePair, read_pairs
from service.bundle import BundleError, Manifest, open_bundle
from service.encoding import TextEncoder
from service.runtime import Runtime, load_runtime
from service.scorer import score_with_runtime


def longer_wins_baseline(pairs: Sequence[PreferencePair]) -> float:
    """Accuracy of "the longer response wins" on `pairs`: the bar a reward model must clear.

    Length is counted in characters of the response text, so the number is a property of the data set
    alone: every model, tokenizer and command (train, eval, audit, the manifest) reports the same value for
    the same pairs. A tie (both responses equally long) is not a win, exactly as a model's tied scores
    count as wrong in its accuracy, so the two numbers printed side by side are counted the same way.
    NaN for no pairs."""
    if not pairs:
        return float("nan")
    return float(np.mean([len(p.chosen) > len(p.rejected) for p in pairs]))


def score_pairs(manifest: Manifest, encoder: TextEncoder, runtime: Runtime, prompts: Sequence[str],
                responses: Sequence[str], batch_size: int = 64) -> np.ndarray:
    """Raw rewards (float32, input order), run as the server runs them: length-sorted, within the runtime's
    batch hint (service/scorer.py)."""
    if len(prompts) != len(responses):
        raise ValueError("prompts and responses differ in length")
    missing = set(manifest.input_names) - set(encoder.pad(encoder.encode(["a"], ["b"])))
    if missing:
        raise ValueError(f"encoder does not produce model inputs {sorted(missing)}")
    encoded = encoder.encode(list(prompts), list(responses))
    return score_with_runtime(runtime, encoder, encoded, batch_size).astype(np.float32)


def evaluate_file(manifest: Manifest, encoder: TextEncoder, runtime: Runtime, path: str,
                  batch_size: int = 64) -> dict:
    pairs, report = read_pairs(path)
    if not pairs:
        return {"path": path, "pairs": 0, "accuracy": None, "length_baseline": None,
                "skipped_lines": len(report.problems)}
    prompts = [p.prompt for p in pairs]
    scores = score_pairs(manifest, encoder, runtime, prompts + prompts,
                         [p.chosen for p in pairs] + [p.rejected for p in pairs], batch_size)
    chosen, rejected = scores[: len(pairs)], scores[len(pairs):]
    return {
        "path": path,
        "pairs": len(pairs),
        "accuracy": float(np.mean(chosen > rejected)),  # ties count as wrong
        "length_baseline": longer_wins_baseline(pairs),
        "mean_margin": float(np.mean(chosen.astype(np.float64) - rejected)),
        "skipped_lines": len(report.problems),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="rewardserve eval", description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--data", nargs="+", required=True, help="preference JSONL file(s)")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    ap.add_argument("--provider", default="cpu", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0 = all cores)")
    ap.add_argument("--batch-size", type=int, default=64)
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        manifest, encoder = open_bundle(args.bundle)
    except BundleError as exc:
        print(f"rewardserve eval: {exc}", file=sys.stderr)
        sys.exit(2)
    runtime = load_runtime(Path(args.bundle), manifest, provider=args.provider, intra_op_threads=args.threads)
    results = [evaluate_file(manifest, encoder, runtime, path, args.batch_size) for path in args.data]
    if args.json:
        print(json.dumps({"model": manifest.name, "runtime": runtime.describe(), "results": results}, indent=2))
        return
    print(f"model {manifest.name} ({manifest.precision}, {runtime.describe()['provider']})")
    print(f"{'file':<48} {'pairs':>7} {'accuracy':>9} {'longer-wins':>12}")
    for r in results:
        acc = "-" if r["accuracy"] is None else f"{r['accuracy']:.4f}"
        base = "-" if r["length_baseline"] is None else f"{r['length_baseline']:.4f}"
        print(f"{Path(r['path']).name:<48} {r['pairs']:>7} {acc:>9} {base:>12}")
