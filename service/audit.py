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
  * calibration: the bundle's normalization (mean, std, percentiles) and this data's z histogram.
The exporter stores the same figures (no picture) in the manifest's `audit` field, shown by /v1/models.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from service.bundle import Normalization, open_bundle
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
                  scores: np.ndarray | None = None, batch_size: int = 64, with_points: bool = False) -> dict:
    """The audit of `pairs` (JSON-ready). `scores`: raw scores of chosen then rejected, if already computed
    (the exporter has them). `with_points`: also the per-response (tokens, z) and per-pair data the
    picture needs, under "_points" (not for the manifest)."""
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
        "calibration": {
            "mean": norm.mean, "std": norm.std, "reference": norm.reference, "n": norm.n,
            "percentiles": {f"p{q}": float(pct[q]) for q in CAL_PERCENTILES if q < len(pct)},
            "share_above_p99": _mean(raw > pct[99]) if len(pct) > 99 else None,
            "share_below_p1": _mean(raw < pct[1]) if len(pct) > 1 else None,
            "z_histogram": {"edges": [float(e) for e in edges], "counts": [int(c) for c in counts]},
        },
    }
    if with_points:
        out["_points"] = {"tokens": tokens, "z": z, "diff": diff, "chosen_wins": chosen_wins}
    return out


def _fmt(value, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def table(model: str, figures: dict) -> str:
    """The short text summary `rewardserve audit` prints."""
    length, probe, cal = figures["length"], figures["perturbation"], figures["calibration"]
    rows = [
        ("pairs", str(figures["pairs"])),
        ("accuracy", _fmt(figures["accuracy"])),
        (f"accuracy, chosen shorter ({figures['pairs_chosen_shorter']})", _fmt(figures["accuracy_chosen_shorter"])),
        (f"accuracy, chosen longer ({figures['pairs_chosen_longer']})", _fmt(figures["accuracy_chosen_longer"])),
        ("longer-wins baseline", _fmt(figures["longer_wins_baseline"])),
        ("slope, z per 100 tokens", _fmt(length["slope_z_per_100_tokens"], "+.3f")),
        ("Spearman(score, length)", _fmt(length["spearman"], "+.3f")),
        ("mean dz, padded with filler", _fmt(probe.get("mean_dz_padded"), "+.3f")),
        ("mean dz, truncated to half", _fmt(probe.get("mean_dz_truncated"), "+.3f")),
        ("share above calibration p99", _fmt(cal["share_above_p99"])),
        ("share below calibration p1", _fmt(cal["share_below_p1"])),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join([f"audit of {model}"] + [f"  {k:<{width}}  {v:>8}" for k, v in rows])


def picture(figures: dict, path: Path, title: str) -> None:
    """audit.png: score vs length with the fitted line; accuracy by length difference; z histogram."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = figures["_points"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), dpi=80)
    ax = axes[0]
    ax.scatter(pts["tokens"], pts["z"], s=4, alpha=0.35)
    if figures["length"]["slope_z_per_100_tokens"] is not None:
        k, b = np.polyfit(pts["tokens"], pts["z"], 1)
        xs = np.array([pts["tokens"].min(), pts["tokens"].max()])
        ax.plot(xs, k * xs + b, color="C3", label=f"{k * 100:+.2f} z / 100 tokens, "
                f"rho {figures['length']['spearman'] or 0:+.2f}")
        ax.legend(loc="best", fontsize=8)
    ax.set(xlabel="response tokens", ylabel="score (z)", title="score vs length")
    ax = axes[1]
    buckets = [b for b in figures["accuracy_by_length_difference"]]
    ax.bar(range(len(buckets)), [b["accuracy"] or 0 for b in buckets], color="C2")
    for i, b in enumerate(buckets):
        ax.text(i, (b["accuracy"] or 0) + 0.02, str(b["pairs"]), ha="center", fontsize=7)
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax.set_xticks(range(len(buckets)), [b["bucket"] for b in buckets], rotation=30, fontsize=7)
    ax.set(ylim=(0, 1.1), xlabel="chosen − rejected tokens", ylabel="accuracy", title="accuracy by length gap")
    ax = axes[2]
    hist = figures["calibration"]["z_histogram"]
    ax.stairs(hist["counts"], hist["edges"], fill=True, alpha=0.6)
    for q in ("p1", "p99"):
        raw = figures["calibration"]["percentiles"].get(q)
        if raw is not None:
            ax.axvline((raw - figures["calibration"]["mean"]) / figures["calibration"]["std"], color="C3", lw=0.8)
    ax.set(xlabel="score (z, clipped to ±4); red: calibration p1/p99", ylabel="responses", title="score histogram")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="rewardserve audit", description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--data", required=True, help="preference JSONL (prompt, chosen, rejected)")
    ap.add_argument("--out", default=None, help="directory for audit.json and audit.png (default: the current one)")
    ap.add_argument("--max-pairs", type=int, default=None)
    ap.add_argument("--no-picture", dest="picture", action="store_false", help="skip audit.png (no matplotlib)")
    ap.add_argument("--provider", default="cpu", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0 = all cores)")
    ap.add_argument("--batch-size", type=int, default=64)
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    manifest, encoder = open_bundle(args.bundle)
    pairs, _ = read_pairs(args.data)
    pairs = pairs[: args.max_pairs] if args.max_pairs else pairs
    if not pairs:
        raise ValueError(f"{args.data}: no preference pairs")
    runtime = load_runtime(Path(args.bundle), manifest, provider=args.provider, intra_op_threads=args.threads)
    figures = audit_figures(runtime, encoder, pairs, manifest.normalization, batch_size=args.batch_size,
                            with_points=True)
    out = Path(args.out or ".")
    out.mkdir(parents=True, exist_ok=True)
    points = figures.pop("_points")
    report = {"model": manifest.name, "data": args.data, **figures}
    (out / "audit.json").write_text(json.dumps(report, indent=2))
    print(table(manifest.name, figures))
    written = [out / "audit.json"]
    if args.picture and not _has_matplotlib():
        print("audit.png skipped: matplotlib is not installed (pip install 'rewardserve[audit]')", file=sys.stderr)
    elif args.picture:
        picture({**figures, "_points": points}, out / "audit.png", f"{manifest.name} on {Path(args.data).name}")
        written.append(out / "audit.png")
    print("written: " + ", ".join(str(p) for p in written))


if __name__ == "__main__":
    main()
