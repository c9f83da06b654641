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
# A float precision change (bf16/fp16 either way) moves every score a little: bf16 differs from fp32 by up to
# 2e-2 on a 100 M decoder (docs/benchmarks.md §10). A pair whose reference margin is within that rounding may
# flip without anything being wrong, and with the importer's 16 pairs one flip (15/16 = 0.9375) would fall
# below every threshold above. So for these precisions agreement is judged on the *decisive* pairs only:
# those whose reference margin exceeds twice the tolerance (each of its two scores may move by the tolerance);
# a pair within it counts as agreeing whichever way it goes. The tolerance is the importer's own gate for
# bf16/fp16 runs (export/importer.py), relative to the largest reference score.
REDUCED_FLOAT_TOLERANCE = 5e-2
FLOAT_PRECISION_KEYS = ("bf16", "fp16", "fp32-of-bf16", "fp32-of-fp16")
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
    agrees = ref_pref == exp_pref
    note = f"{precision}: the threshold applies to pairwise agreement with the fp32 PyTorch model"
    if precision in FLOAT_PRECISION_KEYS:  # pairs within the rounding count as agreeing (see above)
        tolerance = reduced_precision_tolerance(reference)
        undecided = np.abs(reference[:n_pairs] - reference[n_pairs:]) <= 2 * tolerance
        agrees = agrees | undecided
        note = (f"{precision}: pairwise agreement with the recorded scores, a pair whose recorded margin is within "
                f"2 x {tolerance:.3g} (the rounding tolerance) counting as agreeing; {int(undecided.sum())} of "
                f"{n_pairs} pairs were within it")
    agreement = float(np.mean(agrees))
    return ParityReport(reference_pairs=n_pairs, max_abs_diff=diff, threshold=threshold,
                        passed=agreement >= threshold and np.isfinite(diff), pairwise_agreement=agreement, note=note)


def reduced_precision_tolerance(reference: np.ndarray) -> float:
    """How far a bf16/fp16 run may move one score from the reference without anything being wrong:
    REDUCED_FLOAT_TOLERANCE of the largest |score| (at least of 1). The importer gates its bf16/fp16 padded
    batches with the same figure."""
    return REDUCED_FLOAT_TOLERANCE * max(1.0, float(np.max(np.abs(reference))))


def needs_precision_check(bundle: Path, manifest, precision: str) -> bool:
    """Does serving the bundle computing in `precision` need the startup check? Yes unless `precision` is the
    one the bundle's scores are known good at on both counts: the manifest's (what the exporter checked
    against PyTorch) and, where the parity file records one (transformers bundles), `reference_precision`,
    what the recorded scores were computed in. So a bf16 checkpoint imported on CPU (bf16 manifest, fp32
    reference) is checked served bf16 on a GPU (against its fp32 reference) as well as served fp32 on CPU
    (which must reproduce the reference exactly); imported and served on a GPU in bf16, it is not."""
    if precision != manifest.precision:
        return True
    path = Path(bundle) / PARITY_FILE
    recorded = json.loads(path.read_text()).get("reference_precision") if path.is_file() else None
    return recorded is not None and recorded != precision


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
