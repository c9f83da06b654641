"""Parity: does a runtime score the bundle's reference pairs like the PyTorch model did at export time?

One torch-free module (so a serving image can run `rewardserve verify`), used in three places: the
exporter's gate (refuse a bundle that disagrees), `rewardserve verify` (re-run it later), and the
service when it serves a bundle at a precision other than the one exported (fp16 on a GPU: checked at startup against the recorded PyTorch scores, so a
precision change never reaches clients unmeasured).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from service.data import read_pairs
from service.bundle import ParityReport, checksum_problems, read_manifest
from service.encoding import Encoded, TextEncoder
from service.runtime import load_runtime
from service.scorer import score_with_runtime

FP32_PARITY_THRESHOLD = 1e-4       # max |exported − PyTorch| over every reference response
REDUCED_AGREEMENT_THRESHOLD = {     # share of reference pairs whose preferred side matches PyTorch fp32
    "int8-static": 0.95, "int8-dynamic": 0.95,
    "fp16": 0.99,                   # fp16 only flips pairs whose margin is within its rounding (~1e-3)
    # bf16 keeps 8 mantissa bits (rounding ~4e-3 per op, vs fp16's ~5e-4): a bf16 decoder RM run in bf16
    # on a GPU, checked against scores recorded in fp32 (the bf16 weights upcast, on CPU at import)
    "bf16": 0.95,
    # the reverse: scores recorded in bf16 (imported on a GPU), the bundle run in fp32 (served on CPU)
    "fp32-of-bf16": 0.95, "fp32-of-fp16": 0.99,
}
PARITY_FILE = "parity_reference.json"
REFERENCE_FILE = "reference_pairs.jsonl"


def _scores_alone(runtime, encoder: TextEncoder, items: list[Encoded]) -> np.ndarray:
    return np.array([runtime.run(encoder.pad([it]))[0] for it in items])


def batch_invariance(runtime, encoder: TextEncoder, items: list[Encoded]) -> float:
    """As served: max |score alone − score among 31 other mixed items, run under the runtime's batch hint|."""
    sample = items[:32]
    return float(np.max(np.abs(score_with_runtime(runtime, encoder, sample) - _scores_alone(runtime, encoder, sample))))


def batch_dependence(runtime, encoder: TextEncoder, items: list[Encoded]) -> float:
    """max |score alone − score inside one padded run of 32 mixed items| (0: independent of neighbours)."""
    sample = items[:32]
    return float(np.max(np.abs(runtime.run(encoder.pad(sample)) - _scores_alone(runtime, encoder, sample))))


def parity_report(reference: np.ndarray, exported: np.ndarray, n_pairs: int, precision: str) -> ParityReport:
    """`reference`/`exported`: the scores of the n chosen responses, then the n rejected ones."""
    diff = float(np.max(np.abs(reference - exported)))
    if not np.all(np.isfinite(exported)):
        diff = float("inf")
    if precision == "fp32":
        return ParityReport(reference_pairs=n_pairs, max_abs_diff=diff, threshold=FP32_PARITY_THRESHOLD,
                            passed=diff <= FP32_PARITY_THRESHOLD)
    threshold = REDUCED_AGREEMENT_THRESHOLD[precision]
    ref_pref = reference[:n_pairs] > reference[n_pairs:]
    exp_pref = exported[:n_pairs] > exported[n_pairs:]
    agreement = float(np.mean(ref_pref == exp_pref))
    return ParityReport(reference_pairs=n_pairs, max_abs_diff=diff, threshold=threshold,
                        passed=agreement >= threshold and np.isfinite(diff), pairwise_agreement=agreement,
                        note=f"{precision}: the threshold applies to pairwise agreement with the fp32 PyTorch model")


def reference_items(bundle: Path, encoder: TextEncoder, max_pairs: int | None = None) -> tuple[list[Encoded], int]:
    """The bundle's reference pairs, encoded as [chosen…, rejected…]; and how many pairs that is."""
    pairs, _ = read_pairs(Path(bundle) / REFERENCE_FILE)
    pairs = pairs[:max_pairs] if max_pairs else pairs
    return encoder.encode([p.prompt for p in pairs] * 2,
                          [p.chosen for p in pairs] + [p.rejected for p in pairs]), len(pairs)


def threshold_key(precision: str, recorded_precision: str) -> str:
    """Which threshold applies to `precision` scores checked against scores computed at `recorded_precision`
    (the parity file's `reference_precision`; fp32 unless a transformers bundle was imported on a GPU)."""
    if recorded_precision == "fp32":
        return precision
    return f"fp32-of-{recorded_precision}" if precision == "fp32" else precision


def check_against_recorded(bundle: Path, encoder: TextEncoder, runtime, precision: str,
                           max_pairs: int | None = None) -> ParityReport:
    """Score the reference pairs with `runtime` and compare with the PyTorch scores stored at export."""
    items, n = reference_items(bundle, encoder, max_pairs)
    parity = json.loads((Path(bundle) / PARITY_FILE).read_text())
    recorded = np.array(parity["torch_scores"], dtype=np.float64)
    total = len(recorded) // 2
    recorded = np.concatenate([recorded[:n], recorded[total:total + n]])
    scores = score_with_runtime(runtime, encoder, items)
    report = parity_report(recorded, scores, n, threshold_key(precision, parity.get("reference_precision", "fp32")))
    if report.pairwise_agreement is None:  # an exact check: report the agreement too (startup logs it)
        report.pairwise_agreement = float(np.mean((recorded[:n] > recorded[n:]) == (scores[:n] > scores[n:])))
    return report


def verify_bundle(bundle: Path, parity: bool = True) -> bool:
    """Re-check every sha256, then re-run the exported model on the stored reference pairs and compare
    with the PyTorch scores recorded at export time. Prints one line per problem."""
    manifest = read_manifest(bundle)
    problems = checksum_problems(bundle, manifest)
    for p in problems:
        print(f"FAIL {p}")
    if problems:
        return False
    print(f"checksums ok ({len(manifest.files)} files)")
    if not parity:
        return True
    encoder = TextEncoder.from_dir(bundle, manifest.text)
    runtime = load_runtime(bundle, manifest, provider="cpu")
    report = check_against_recorded(bundle, encoder, runtime, getattr(runtime, "precision", manifest.precision))
    status = "ok" if report.passed else "FAIL"
    print(f"parity {status}: max abs diff {report.max_abs_diff:.2e} (threshold {report.threshold})"
          + (f", pairwise agreement {report.pairwise_agreement:.4f}" if report.pairwise_agreement is not None else ""))
    return report.passed
