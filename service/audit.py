"""`rewardserve audit`: how much of a bundle's reward is response length, and how its calibration looks.

Torch-free like `rewardserve eval`: the bundle is opened and scored through the serving runtime
(open_bundle + load_runtime + service/scorer.py), so the figures are what production will serve.

Figures (docs/monitoring.md reads them):
  * accuracy overall, on pairs whose chosen response is shorter / longer (in tokens), and the
    "longer response wins" baseline (service.evaluate.longer_wins_baseline: characters, a tie no win,
    the number train and eval report for the same pairs); accuracy by length-difference bucket;
  * length sensitivity: slope (z per 100 tokens) and Spearman rank correlation of the score against the
    response's length in tokens; a perturbation probe: the mean score change when each reference
    response is padded with neutral filler, or cut to its first half (scored by the runtime);
  * calibration: the bundle's normalization (mean, std, percentiles) and this data's z histogram;
  * preference calibration (service/calibration.py): σ(r_chosen − r_rejected) read as the probability of
    ranking the pair right: accuracy, mean confidence, ECE and reliability bins, at T = 1 and at the
    bundle's fitted temperature (manifest `calibration.temperature`);
  * with several --data sets, one row per set (`set_row`: accuracy with its 95 % Wilson interval,
    longer-wins baseline, ECE, length correlation) side by side, so distribution shift shows;
  * the hack probes of service/probes.py (courtesy closing, flattering opening, ...) when it is there.
It writes audit.json, audit.png and audit_examples.md (service/audit_report.py renders them).
The exporter stores the figures (no picture) in the manifest's `audit` field and the set rows with the
fitted temperature in its `calibration` field (`export_calibration`), both shown by /v1/models.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from service import calibration as cal
from service.audit_report import examples_markdown, picture, probes_table, sets_table, table
from service.bundle import Calibration, Normalization, open_bundle
from service.chat import ChatFormat
from service.data import PreferencePair, read_pairs
from service.encoding import TextEncoder
from service.evaluate import longer_wins_baseline
from service.runtime import load_runtime
from service.scorer import score_with_runtime

# Content-free text appended by the padding probe: a model that pays for it rewards verbosity.
FILLER = " To summarize, the answer is as stated above."
PROBE_ITEMS = 256  # reference responses the perturbation probe scores (3 runtime passes each)
DIFF_BUCKETS = ((-10**9, -65, "<=-65"), (-64, -17, "-64..-17"), (-16, -1, "-16..-1"), (0, 0, "0"),
                (1, 16, "1..16"), (17, 64, "17..64"), (65, 10**9, ">=65"))
HIST_BINS = np.arange(-4.0, 4.01, 0.5)
CAL_PERCENTILES = (0, 1, 5, 25, 50, 75, 95, 99, 100)


def rank(values: np.ndarray) -> np.ndarray:
    """Ranks with ties averaged (what Spearman's rho needs), without scipy."""
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = np.arange(len(values), dtype=np.float64)
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return sums[inverse] / counts[inverse]


def spearman(x: np.ndarray, y: np.ndarray) -> float | None:
    """Spearman's rank correlation; None when either side is constant."""
    rx, ry = rank(np.asarray(x, dtype=np.float64)), rank(np.asarray(y, dtype=np.float64))
    if len(rx) < 2 or rx.std() == 0 or ry.std() == 0:
        return None
    return float(np.corrcoef(rx, ry)[0, 1])


def _mean(values) -> float | None:
    values = np.asarray(values, dtype=np.float64)
    return float(values.mean()) if values.size else None


def padded(response: str, tokens: int) -> str:
    """The response plus neutral filler worth about half its length (at least one sentence)."""
    return response + FILLER * max(1, round(tokens / 2 / 10))  # FILLER is ~10 tokens


def truncated(response: str) -> str:
    """The first half of the response's words (at least one)."""
    words = response.split()
    return " ".join(words[: max(1, len(words) // 2)])


def audit_figures(runtime, encoder: TextEncoder, pairs: Sequence[PreferencePair], norm: Normalization,
                  scores: np.ndarray | None = None, batch_size: int = 64, with_points: bool = False,
                  temperature: float = 1.0, bins: int = cal.DEFAULT_BINS) -> dict:
    """The audit of `pairs` (JSON-ready). `scores`: raw scores of chosen then rejected, if already computed
    (the exporter has them). `temperature`: the bundle's (preference calibration is shown at T = 1 and at
    it). `with_points`: also the per-response (tokens, z, raw) and per-pair data the picture and the
    examples need, under "_points" (not for the manifest)."""
    n = len(pairs)
    prompts = [p.prompt for p in pairs] * 2
    responses = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    encoded = encoder.encode(prompts, responses)
    if scores is None:
        scores = score_with_runtime(runtime, encoder, encoded, batch_size)
    raw = np.asarray(scores, dtype=np.float64).reshape(-1)
    z = np.asarray(norm.z_score(raw), dtype=np.float64)
    tokens = np.array([e.response_tokens for e in encoded], dtype=np.int64)
    chosen_wins = raw[:n] > raw[n:]  # ties count as wrong, as in `rewardserve eval`
    diff = tokens[:n] - tokens[n:]  # chosen minus rejected

    by_diff = []
    for low, high, name in DIFF_BUCKETS:
        mask = (diff >= low) & (diff <= high)
        by_diff.append({"bucket": name, "pairs": int(mask.sum()), "accuracy": _mean(chosen_wins[mask])})
    slope = float(np.polyfit(tokens, z, 1)[0]) * 100 if len(set(tokens.tolist())) > 1 else None

    probe_idx = np.linspace(0, 2 * n - 1, num=min(PROBE_ITEMS, 2 * n), dtype=np.int64) if n else np.array([], int)
    probe = {"items": int(len(probe_idx)), "filler": FILLER.strip()}
    if len(probe_idx):
        p_prompts = [prompts[i] for i in probe_idx]
        variants = [[padded(responses[i], int(tokens[i])) for i in probe_idx],
                    [truncated(responses[i]) for i in probe_idx]]
        for name, texts in zip(("padded", "truncated"), variants):
            moved = norm.z_score(score_with_runtime(runtime, encoder, encoder.encode(p_prompts, texts), batch_size))
            delta = np.asarray(moved, dtype=np.float64) - z[probe_idx]
            probe[f"mean_dz_{name}"] = float(delta.mean())
            probe[f"share_up_{name}"] = float(np.mean(delta > 0))

    counts, edges = np.histogram(np.clip(z, HIST_BINS[0], HIST_BINS[-1]), bins=HIST_BINS)
    pct = np.asarray(norm.percentiles, dtype=np.float64)
    out = {
        "pairs": n,
        "accuracy": _mean(chosen_wins),
        "accuracy_chosen_shorter": _mean(chosen_wins[diff < 0]),
        "accuracy_chosen_longer": _mean(chosen_wins[diff > 0]),
        "pairs_chosen_shorter": int((diff < 0).sum()),
        "pairs_chosen_longer": int((diff > 0).sum()),
        "longer_wins_baseline": longer_wins_baseline(pairs) if n else None,
        "accuracy_by_length_difference": by_diff,
        "length": {"slope_z_per_100_tokens": slope, "spearman": spearman(tokens, z),
                   "mean_response_tokens": _mean(tokens)},
        "perturbation": probe,
        "preference_calibration": cal.summary(raw[:n] - raw[n:], temperature, bins),
        "calibration": {
            "mean": norm.mean, "std": norm.std, "reference": norm.reference, "n": norm.n,
            "percentiles": {f"p{q}": float(pct[q]) for q in CAL_PERCENTILES if q < len(pct)},
            "share_above_p99": _mean(raw > pct[99]) if len(pct) > 99 else None,
            "share_below_p1": _mean(raw < pct[1]) if len(pct) > 1 else None,
            "z_histogram": {"edges": [float(e) for e in edges], "counts": [int(c) for c in counts]},
        },
    }
    if with_points:
        out["_points"] = {"tokens": tokens, "z": z, "raw": raw, "diff": diff, "chosen_wins": chosen_wins}
    return out


def set_row(name: str, pairs: Sequence[PreferencePair], raw: np.ndarray, tokens: np.ndarray,
            temperature: float = 1.0, bins: int = cal.DEFAULT_BINS) -> dict:
    """One evaluation set's row (audit --data A B ..., the manifest's calibration.sets): pairs, accuracy
    with its 95 % Wilson interval, the longer-wins baseline, mean confidence and ECE of σ(margin) at
    T = 1 and at `temperature`, Spearman of score vs response tokens. `raw`: chosen then rejected."""
    raw = np.asarray(raw, dtype=np.float64).reshape(-1)
    n = len(pairs)
    margins = raw[:n] - raw[n:]
    correct, conf = cal.predictions(margins)
    ci = cal.wilson(int(correct.sum()), n)
    return {"set": name, "pairs": n, "accuracy": _mean(correct), "accuracy_ci95": list(ci) if ci else None,
            "longer_wins_baseline": longer_wins_baseline(pairs) if n else None, "mean_confidence": _mean(conf),
            "ece": cal.ece(margins, 1.0, bins), "temperature": float(temperature),
            "ece_at_temperature": cal.ece(margins, temperature, bins), "length_spearman": spearman(tokens, raw)}


def _scores_and_tokens(runtime, encoder: TextEncoder, pairs: Sequence[PreferencePair], batch_size: int = 64,
                       scores: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    encoded = encoder.encode([p.prompt for p in pairs] * 2, [p.chosen for p in pairs] + [p.rejected for p in pairs])
    if scores is None:
        scores = score_with_runtime(runtime, encoder, encoded, batch_size)
    return (np.asarray(scores, dtype=np.float64).reshape(-1),
            np.array([e.response_tokens for e in encoded], dtype=np.int64))


def export_calibration(runtime, encoder: TextEncoder, dev: tuple[str, Sequence[PreferencePair], np.ndarray],
                       others: dict[str, Sequence[PreferencePair]], fit: bool, bins: int = cal.DEFAULT_BINS,
                       batch_size: int = 64) -> Calibration:
    """The manifest's `calibration`: T fitted on the dev pairs (`dev`: name, pairs, their raw scores, chosen
    then rejected) when `fit`, else 1.0; ECE before/after and one set_row for dev and for every other set
    the exporter knows (`others`, scored here by the exported runtime)."""
    name, pairs, scores = dev
    raw, tokens = _scores_and_tokens(runtime, encoder, pairs, scores=scores)
    n = len(pairs)
    temperature = cal.fit_temperature(raw[:n] - raw[n:]) if fit else 1.0
    rows = [set_row(name, pairs, raw, tokens, temperature, bins)]
    for other, other_pairs in others.items():
        o_raw, o_tokens = _scores_and_tokens(runtime, encoder, other_pairs, batch_size)
        rows.append(set_row(other, other_pairs, o_raw, o_tokens, temperature, bins))
    return Calibration(temperature=temperature, fitted=fit, fitted_on=name if fit else "", bins=bins,
                       ece_definition=ECE_DEFINITION, ece_before={r["set"]: r["ece"] for r in rows},
                       ece_after={r["set"]: r["ece_at_temperature"] for r in rows}, sets=rows)


ECE_DEFINITION = ("sum over equal-width bins of the predicted side's confidence sigma(|r_chosen - r_rejected| / T) "
                  "in [0.5, 1] of (pairs in bin / pairs) * |accuracy - mean confidence|; a tie is wrong")


def _set_names(paths: Sequence[str]) -> list[str]:
    """Each file's stem, made unique with its position where two sets share one."""
    stems = [Path(p).stem for p in paths]
    return [s if stems.count(s) == 1 else f"{s}#{i + 1}" for i, s in enumerate(stems)]


def _run_probes(runtime, encoder: TextEncoder, norm: Normalization, pairs: Sequence[PreferencePair],
                raw: np.ndarray, batch_size: int, chat: ChatFormat) -> dict:
    """The hack probes of service/probes.py on `pairs` (raw: their scores, chosen then rejected), scored by
    the same runtime; the turn forgery written in the bundle's own turn markers (`chat`)."""
    from service.probes import run_probes, runtime_score_fn, turn_forgery_text

    return run_probes(runtime_score_fn(runtime, encoder, batch_size), pairs, norm, scores=raw,
                      forgery=turn_forgery_text(chat))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="rewardserve audit", description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--data", required=True, nargs="+", help="preference JSONL file(s) (prompt, chosen, rejected); "
                    "several give one row per set")
    ap.add_argument("--out", default=None, help="directory for audit.json, audit.png and audit_examples.md "
                    "(default: the current one)")
    ap.add_argument("--max-pairs", type=int, default=None, help="use only the first N pairs of each set")
    ap.add_argument("--bins", type=int, default=cal.DEFAULT_BINS, help="ECE bins over confidence [0.5, 1]")
    ap.add_argument("--no-picture", dest="picture", action="store_false", help="skip audit.png (no matplotlib)")
    ap.add_argument("--no-probes", dest="probes", action="store_false", help="skip the hack probes (service/probes.py)")
    ap.add_argument("--provider", default="cpu", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0 = all cores)")
    ap.add_argument("--batch-size", type=int, default=64)
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    manifest, encoder = open_bundle(args.bundle)
    sets: dict[str, list[PreferencePair]] = {}
    for name, path in zip(_set_names(args.data), args.data):
        pairs, _ = read_pairs(path)
        sets[name] = pairs[: args.max_pairs] if args.max_pairs else pairs
        if not sets[name]:
            raise ValueError(f"{path}: no preference pairs")
    temperature = manifest.calibration.temperature if manifest.calibration else 1.0
    runtime = load_runtime(Path(args.bundle), manifest, provider=args.provider, intra_op_threads=args.threads)
    by_set, rows = {}, []
    for name, pairs in sets.items():
        by_set[name] = audit_figures(runtime, encoder, pairs, manifest.normalization, batch_size=args.batch_size,
                                     with_points=True, temperature=temperature, bins=args.bins)
        pts = by_set[name]["_points"]
        rows.append(set_row(name, pairs, pts["raw"], pts["tokens"], temperature, args.bins))
    first = next(iter(sets))
    chat = ChatFormat.from_bundle(args.bundle, manifest.text, encoder)
    probes = (_run_probes(runtime, encoder, manifest.normalization, sets[first], by_set[first]["_points"]["raw"],
                          args.batch_size, chat) if args.probes else None)
    out = Path(args.out or ".")
    out.mkdir(parents=True, exist_ok=True)
    points = {name: figures.pop("_points") for name, figures in by_set.items()}
    # The first set's figures stay at the top level (the single --data report, unchanged); every set's
    # figures are under "by_set", their rows under "sets".
    report = {"model": manifest.name, "data": args.data[0], "temperature": temperature, **by_set[first],
              "sets": rows, "by_set": by_set, "probes": probes, "probes_set": first if probes else None}
    (out / "audit.json").write_text(json.dumps(report, indent=2))
    (out / "audit_examples.md").write_text(examples_markdown(
        manifest.name, {name: (sets[name], points[name]["raw"], points[name]["z"]) for name in sets}, temperature))
    print(table(manifest.name, by_set[first]))
    print(f"\nper set (T = {temperature:.3g}" + (f", fitted on {manifest.calibration.fitted_on}"
                                               if manifest.calibration and manifest.calibration.fitted else "") + ")")
    print(sets_table(rows))
    if probes:
        print(f"\nhack probes on {first}")
        print(probes_table(probes))
    written = [out / "audit.json", out / "audit_examples.md"]
    if args.picture and not _has_matplotlib():
        print("audit.png skipped: matplotlib is not installed (pip install 'rewardserve[audit]')", file=sys.stderr)
    elif args.picture:
        title = f"{manifest.name} on " + ", ".join(Path(p).name for p in args.data)
        picture({name: {**by_set[name], "_points": points[name]} for name in by_set}, rows, probes,
                out / "audit.png", title)
        written.insert(1, out / "audit.png")
    print("written: " + ", ".join(str(p) for p in written))


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


if __name__ == "__main__":
    main()
