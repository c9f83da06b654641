"""Does an ensemble of small reward models rank better than its members, and does its uncertainty find the
pairs it gets wrong? (issue 26, point 4; docs/benchmarks.md "Ensembles", docs/bench_ensemble.json)

Input: one or more ensemble training directories (`rewardserve train --ensemble K --out RUN`). Each is
exported with the real exporter into one model repository (export/ensemble.py: REPO/<name>-<i>/1/ and
REPO/<name>/ensemble.json) and every member bundle scores every pair of the evaluation sets through ONNX
Runtime, as the service would (service/evaluate.py's score_pairs); z = the member's own (raw − mean) / std
from its manifest, which is what the service combines. The aggregation is service/ensemble.py's own
(`aggregate`, `uncertainty`), imported, so the numbers are the served ensemble's.

Reported per set:
  * members: each member's accuracy (chosen z > rejected z; a tie is wrong), mean ± SE over members;
  * mean, min, uwo (λ from --lam): the aggregate's accuracy, ± bootstrap SE over pairs (--bootstrap
    resamples), and its paired difference from the average member (same resamples);
  * uncertainty AUROC for predicting that the ensemble (each aggregate) misranks the pair, for three
    signals, higher = more suspicious:
      margin_std  the population std over members of their z margins (z_chosen − z_rejected): how much
                  the members disagree about this comparison (the pair-level definition; primary);
      item_std    the mean of the two responses' `uncertainty` as the service returns it (population std
                  of the members' z of one response), what a client sees per answer;
      low_margin  −|aggregate margin|: the ensemble's own confidence, the baseline any uncertainty must beat;
    0.5 = no information; AUROC = P(signal of a misranked pair > signal of a correct one), ties half.
  * flagged: the share of pairs where either response carries the service's `high_uncertainty` flag (its
    uncertainty above the reference-set p99, computed as EnsembleModel.start does from the members'
    bundles' reference pairs) and the mean aggregate's accuracy on flagged vs other pairs.
With two or more runs (ensembles of different seeds), every number is also given as mean ± SE over runs.

    .venv/bin/python bench/ensemble_eval.py --runs runs/ens_a runs/ens_b --repo runs/ens_repo \
        --json docs/bench_ensemble.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from scipy.stats import rankdata

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.machine import environment  # noqa: E402
from export.ensemble import ENSEMBLE_FILE, export_ensemble  # noqa: E402
from service.bundle import open_bundle  # noqa: E402
from service.data import read_pairs  # noqa: E402
from service.ensemble import MAX_REFERENCE_PAIRS, aggregate, uncertainty  # noqa: E402
from service.evaluate import longer_wins_baseline, score_pairs  # noqa: E402
from service.parity import REFERENCE_FILE  # noqa: E402
from service.repository import EnsembleSpec, scan  # noqa: E402
from service.runtime import load_runtime  # noqa: E402

SETS = ("dev_in_domain", "llmbar", "hhh_alignment", "mtbench_human_llmbar200")
AGGREGATES = ("mean", "min", "uwo")
SIGNALS = ("margin_std", "item_std", "low_margin")


# ---------------------------------------------------------------- scoring

def export_run(run: Path, repo: Path) -> str:
    """Export a training run into the repository once (a rerun reuses it); its ensemble's name."""
    name = run.name.replace("_", "-")
    if not (repo / name / ENSEMBLE_FILE).is_file():
        export_ensemble(run, repo, name=name, aggregate="mean")
    return name


def member_z(repo: Path, spec: EnsembleSpec, texts: list[tuple[str, str]], threads: int) -> np.ndarray:
    """z-scores, shape (members, texts): every member bundle (its served version) scores every text."""
    layout = scan(repo)
    rows = []
    for member in spec.members:
        entry = layout.models[member]
        bundle = entry.versions[entry.latest()].path
        manifest, encoder = open_bundle(bundle)
        runtime = load_runtime(bundle, manifest, provider="cpu", intra_op_threads=threads)
        started = time.time()
        raw = score_pairs(manifest, encoder, runtime, [t[0] for t in texts], [t[1] for t in texts])
        print(f"  {member}: {len(texts)} texts in {time.time() - started:.0f} s", flush=True)
        rows.append(manifest.normalization.z_score(raw.astype(np.float64)))
    return np.array(rows)


def reference_texts(repo: Path, spec: EnsembleSpec) -> list[tuple[str, str]]:
    """The responses EnsembleModel.start scores for its high_uncertainty threshold: each member bundle's first
    MAX_REFERENCE_PAIRS reference pairs, chosen and rejected, each distinct text once."""
    layout = scan(repo)
    seen: dict[tuple[str, str], None] = {}
    for member in spec.members:
        entry = layout.models[member]
        pairs, _ = read_pairs(entry.versions[entry.latest()].path / REFERENCE_FILE)
        for p in pairs[:MAX_REFERENCE_PAIRS]:
            seen.setdefault((p.prompt, p.chosen))
            seen.setdefault((p.prompt, p.rejected))
    return list(seen)


def set_texts(data_dir: Path) -> tuple[list[tuple[str, str]], dict[str, tuple[int, int]]]:
    """Every (prompt, response) of the sets, chosen then rejected per set; spans: set -> (start, pairs)."""
    texts: list[tuple[str, str]] = []
    spans = {}
    for s in SETS:
        pairs, _ = read_pairs(data_dir / f"{s}.jsonl")
        spans[s] = (len(texts), len(pairs))
        texts += [(p.prompt, p.chosen) for p in pairs] + [(p.prompt, p.rejected) for p in pairs]
    return texts, spans


def checkpoint_reference(member: Path, first: int | None = None) -> list[tuple[str, str]]:
    """A member checkpoint's reference pairs (the exporter copies them into its bundle unchanged) as texts,
    chosen then rejected: what the exporter's normalization is computed over."""
    pairs, _ = read_pairs(member / "best" / REFERENCE_FILE)
    pairs = pairs[:first]
    return [(p.prompt, p.chosen) for p in pairs] + [(p.prompt, p.rejected) for p in pairs]


def member_raw(member: Path, texts: list[tuple[str, str]], threads: int, cache_dir: Path) -> np.ndarray:
    """--scorer torch: raw scores of one member checkpoint (member/best) on the texts, in PyTorch (the
    trainer's own forward), cached by member and texts so members can be scored as they finish training
    (`--member DIR`)."""
    import hashlib

    import torch

    from export.model import load_reward_model
    from export.train import score_encoded
    from service.encoding import TextEncoder

    digest = hashlib.sha256("\x00".join(p + "\x01" + r for p, r in texts).encode()).hexdigest()[:16]
    cache = cache_dir / f".raw-{member.resolve().parent.name}-{member.name}-{digest}.npy"
    if cache.is_file():
        return np.load(cache)
    torch.set_num_threads(threads)
    best = member / "best"
    model, fmt = load_reward_model(best)
    encoder = TextEncoder.from_dir(best, fmt)
    started = time.time()
    raw = score_encoded(model, encoder, encoder.encode([t[0] for t in texts], [t[1] for t in texts]), "cpu")
    print(f"  {member}: {len(texts)} texts in {time.time() - started:.0f} s", flush=True)
    cache_dir.mkdir(parents=True, exist_ok=True)
    np.save(cache, raw)
    return raw


def torch_z(run: Path, texts: list[tuple[str, str]], threads: int, cache_dir: Path) -> tuple[list[str], np.ndarray]:
    """--scorer torch: z of every member checkpoint (OUT/member-<i>/best) on the texts, with the
    normalization the exporter would store (export.exporter.normalization over the raw scores of the
    member's reference pairs, chosen and rejected, which must be among `texts`), so z matches the served z
    to parity precision (checked: 4e-6 against the exported bundles of a tiny ensemble) without writing K
    bundles, which is most of the time on a loaded CPU."""
    from export.ensemble import member_dirs
    from export.exporter import normalization

    index = {t: i for i, t in enumerate(texts)}
    names, rows = [], []
    for d in member_dirs(run):
        raw = member_raw(d, texts, threads, cache_dir)
        ref_raw = raw[[index[t] for t in checkpoint_reference(d)]]
        names.append(d.name)
        rows.append(normalization(ref_raw.astype(np.float32), REFERENCE_FILE).z_score(raw))
    return names, np.array(rows)


def reference_texts_of_run(run: Path, first: int | None = MAX_REFERENCE_PAIRS) -> list[tuple[str, str]]:
    """reference_texts for --scorer torch, read from the members' checkpoints; first=None: every pair."""
    from export.ensemble import member_dirs

    seen: dict[tuple[str, str], None] = {}
    for d in member_dirs(run):
        for t in checkpoint_reference(d, first):
            seen.setdefault(t)
    return list(seen)


def score_run(run: Path, repo: Path, data_dir: Path, threads: int, scorer: str = "onnx"
              ) -> tuple[EnsembleSpec, dict, float]:
    """Per set: z of chosen and rejected, shape (members, pairs) each; and the uncertainty p99 of the
    reference set. Cached next to the repository (a dot file: the repository scan ignores it)."""
    if scorer == "onnx":
        name = export_run(run, repo)
        spec_json = json.loads((repo / name / ENSEMBLE_FILE).read_text())
        spec = EnsembleSpec(name=name, members=spec_json["members"], aggregate="mean")
    else:
        name = run.name.replace("_", "-")
        spec = EnsembleSpec(name=name, members=[], aggregate="mean")
    cache = repo / f".scores-{name}-{scorer}.npz"
    if cache.is_file():
        stored = np.load(cache)
        sets = {s: (stored[f"{s}/chosen"], stored[f"{s}/rejected"]) for s in SETS}
        spec.members = [str(m) for m in stored["members"]]
        return spec, sets, float(stored["reference_p99"])
    texts, spans = set_texts(data_dir)
    reference = reference_texts(repo, spec) if scorer == "onnx" else reference_texts_of_run(run)
    every_reference = reference if scorer == "onnx" else reference_texts_of_run(run, None)
    index = {t: i for i, t in enumerate(texts)}
    extra = [t for t in every_reference if t not in index]  # outside the sets (none when dev is the reference)
    print(f"{name}: scoring {len(texts) + len(extra)} texts ({scorer})", flush=True)
    if scorer == "onnx":
        z = member_z(repo, spec, texts + extra, threads)
    else:
        spec.members, z = torch_z(run, texts + extra, threads, repo)
    index.update({t: len(texts) + i for i, t in enumerate(extra)})
    reference_p99 = float(np.percentile(uncertainty(z[:, [index[t] for t in reference]]), 99))
    sets = {s: (z[:, a:a + n], z[:, a + n:a + 2 * n]) for s, (a, n) in spans.items()}
    np.savez(cache, reference_p99=reference_p99, members=np.array(spec.members),
             **{f"{s}/{side}": arr for s, pair in sets.items() for side, arr in zip(("chosen", "rejected"), pair)})
    return spec, sets, reference_p99


# ---------------------------------------------------------------- statistics

def auroc(signal: np.ndarray, positive: np.ndarray) -> float:
    """P(signal of a positive > signal of a negative), ties counted half (Mann-Whitney U / n+n-); NaN when
    one class is empty."""
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(signal)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def pair_figures(spec: EnsembleSpec, zc: np.ndarray, zr: np.ndarray, lam: float, p99: float) -> dict:
    """Every figure of one set, from the members' z of chosen (zc) and rejected (zr), shape (members, pairs)."""
    member_correct = zc > zr
    out = {"member_correct": member_correct, "aggregates": {}}
    margins = zc - zr
    signals_common = {"margin_std": margins.std(axis=0),
                      "item_std": (uncertainty(zc) + uncertainty(zr)) / 2}
    for kind in AGGREGATES:
        agg = EnsembleSpec(name=spec.name, members=spec.members, aggregate=kind, lam=lam)
        ac, ar = aggregate(zc, agg), aggregate(zr, agg)
        out["aggregates"][kind] = {"correct": ac > ar,
                                   "signals": {**signals_common, "low_margin": -np.abs(ac - ar)}}
    out["flagged"] = (uncertainty(zc) > p99) | (uncertainty(zr) > p99)
    return out


def summarize(fig: dict, boot: np.ndarray) -> dict:
    """Point figures and bootstrap SEs over pairs (`boot`: resampled pair indices, shape (B, pairs))."""
    mc = fig["member_correct"]
    member_acc = mc.mean(axis=1)
    avg_member = mc.mean(axis=0)  # per pair: the share of members right, so its mean is the average member
    res = {"pairs": int(mc.shape[1]),
           "members": {"accuracy": [round(float(a), 4) for a in member_acc], "mean": float(member_acc.mean()),
                       "se": float(member_acc.std(ddof=1) / np.sqrt(len(member_acc)))},
           "aggregates": {}}
    for kind, agg in fig["aggregates"].items():
        correct = agg["correct"]
        wrong = ~correct
        entry = {"accuracy": float(correct.mean()), "bootstrap_se": float(correct[boot].mean(axis=1).std(ddof=1)),
                 "minus_average_member": float(correct.mean() - avg_member.mean()),
                 "minus_average_member_se": float((correct[boot].mean(axis=1) - avg_member[boot].mean(axis=1))
                                                  .std(ddof=1)),
                 "auroc": {}}
        for name, signal in agg["signals"].items():
            boots = [auroc(signal[b], wrong[b]) for b in boot]
            entry["auroc"][name] = {"auroc": auroc(signal, wrong), "bootstrap_se": float(np.nanstd(boots, ddof=1))}
        res["aggregates"][kind] = entry
    flagged, correct = fig["flagged"], fig["aggregates"]["mean"]["correct"]
    res["flagged"] = {"share": float(flagged.mean()), "pairs": int(flagged.sum()),
                      "accuracy_flagged": float(correct[flagged].mean()) if flagged.any() else None,
                      "accuracy_other": float(correct[~flagged].mean()) if (~flagged).any() else None}
    return res


def over_runs(values: list[float]) -> dict:
    v = np.array([x for x in values if x is not None and np.isfinite(x)], dtype=np.float64)
    if len(v) == 0:
        return {"mean": None, "se": None, "n": 0}
    return {"mean": float(v.mean()), "se": float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else None,
            "n": int(len(v))}


def combine_runs(runs: list[dict]) -> dict:
    """Mean ± SE over ensembles (runs) of each set's headline numbers; members pooled over all runs."""
    out = {}
    for s in SETS:
        per = [r["sets"][s] for r in runs]
        members = [a for p in per for a in p["members"]["accuracy"]]
        entry = {"members": {"mean": float(np.mean(members)),
                             "se": float(np.std(members, ddof=1) / np.sqrt(len(members))), "n": len(members)}}
        for kind in AGGREGATES:
            entry[kind] = {"accuracy": over_runs([p["aggregates"][kind]["accuracy"] for p in per]),
                           "auroc": {sig: over_runs([p["aggregates"][kind]["auroc"][sig]["auroc"] for p in per])
                                     for sig in SIGNALS}}
        out[s] = entry
    return out


# ---------------------------------------------------------------- report

def table(report: dict) -> str:
    lines = ["| set | pairs | longer wins | members (mean ± SE) | mean | min | uwo | AUROC margin_std (mean agg) "
             "| AUROC item_std | AUROC low margin | flagged (acc flagged / other) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for run in report["runs"]:
        for s in SETS:
            r = run["sets"][s]
            agg = r["aggregates"]
            au = agg["mean"]["auroc"]
            f = r["flagged"]
            acc = lambda k: f"{agg[k]['accuracy']:.3f} ± {agg[k]['bootstrap_se']:.3f}"  # noqa: E731
            flagged = (f"{f['share']:.1%} ({f['accuracy_flagged']:.2f} / {f['accuracy_other']:.2f})"
                       if f["accuracy_flagged"] is not None else f"{f['share']:.1%}")
            lines.append(f"| {run['name']}: {s} | {r['pairs']} | {r['longer_wins']:.3f} | "
                         f"{r['members']['mean']:.3f} ± {r['members']['se']:.3f} | {acc('mean')} | {acc('min')} | "
                         f"{acc('uwo')} | {au['margin_std']['auroc']:.3f} ± {au['margin_std']['bootstrap_se']:.3f} | "
                         f"{au['item_std']['auroc']:.3f} | {au['low_margin']['auroc']:.3f} | {flagged} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", nargs="+", required=True, help="ensemble training directories (train --ensemble K)")
    ap.add_argument("--repo", default="runs/ens_repo", help="the model repository to export them into")
    ap.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    ap.add_argument("--lam", type=float, default=1.0, help="uwo's lambda")
    ap.add_argument("--bootstrap", type=int, default=1000, help="resamples of the pairs for the SEs")
    ap.add_argument("--threads", type=int, default=2, help="ONNX Runtime (torch) intra-op threads")
    ap.add_argument("--scorer", default="onnx", choices=["onnx", "torch"],
                    help="onnx: export the members and score the bundles as served; torch: score the checkpoints "
                    "(same z to parity precision, no export: for a loaded machine)")
    ap.add_argument("--json", default=None, help="write the report here")
    ap.add_argument("--member", default=None, help="--scorer torch: only score this member directory "
                    "(OUT/member-<i>) into the cache, e.g. while the other members still train; then exit")
    args = ap.parse_args(argv)
    repo, data_dir = Path(args.repo), Path(args.data_dir)
    repo.mkdir(parents=True, exist_ok=True)
    if args.member:
        texts, _ = set_texts(data_dir)
        known = set(texts)
        texts += [t for t in dict.fromkeys(checkpoint_reference(Path(args.member))) if t not in known]
        member_raw(Path(args.member), texts, args.threads, repo)
        return
    report = {"machine": environment(), "scorer": args.scorer, "lambda": args.lam, "bootstrap_resamples": args.bootstrap, "runs": []}
    for run in map(Path, args.runs):
        spec, sets, p99 = score_run(run, repo, data_dir, args.threads, args.scorer)
        training = json.loads((run / "ensemble_training.json").read_text())
        recipe = json.loads((run / "member-0" / "best" / "reward_config.json").read_text()).get("trainer_config", {})
        entry = {"name": spec.name, "run": str(run), "seeds": training["seeds"], "bootstrap": training["bootstrap"],
                 "recipe": {k: recipe.get(k) for k in ("data", "dev", "max_pairs", "epochs", "max_length", "lr",
                                                       "batch_size", "pooling", "head_lr_scale", "threads")},
                 "members": spec.members, "reference_uncertainty_p99": p99, "sets": {}}
        for s, (zc, zr) in sets.items():
            pairs, _ = read_pairs(data_dir / f"{s}.jsonl")
            boot = np.random.default_rng(0).integers(0, zc.shape[1], size=(args.bootstrap, zc.shape[1]))
            entry["sets"][s] = {"longer_wins": longer_wins_baseline(pairs),
                                **summarize(pair_figures(spec, zc, zr, args.lam, p99), boot)}
        report["runs"].append(entry)
    if len(report["runs"]) > 1:
        report["over_runs"] = combine_runs(report["runs"])
    print(table(report))
    if len(report["runs"]) > 1:
        print(json.dumps(report["over_runs"], indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        print(f"written: {args.json}")


if __name__ == "__main__":
    main()
