"""Replay TRL's RewardTrainer run with this project's trainer: same initial weights, same batches.

The side-by-side benchmark (trl_vs_rewardserve.py) compares the trainers over seeds, where each seed
gives each trainer its own data order. This script removes that difference to answer: given TRL's exact
starting point and batch order, does our trainer compute the same run, and how does our own head do on
the same order (a paired comparison, free of the order-to-order spread)? It

  1. builds TRL's model (`BertForSequenceClassification`, num_labels=1) with the seed, saves it untrained
     as OUT/init, trains it with TRL (the benchmark's settings) and records every step's batch and loss
     (OUT/trl_steps.json; `--reuse` skips this step);
  2. trains each variant with our trainer given TRL's whole setup (OUT/init's native head, one text
     segment ending in [SEP][SEP], pairs over max length dropped, no dropout / centering / warmup /
     weight decay, linear decay) and TRL's recorded batch order, which replaces `random_batches` (the
     only change); the variants are VARIANTS;
  3. writes OUT/replay.json: per-step loss difference to TRL, wall time, accuracy on every set (all
     models scored by the same code).

  python bench/trl_replay.py --data-dir ../shared/data --out runs/trl_replay_s0 --seed 0 --threads 2 \
      --variants trl-setup trl-setup-chunked mean-chunked
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

import export.train as trainer_module
from service.data import read_pairs
from export.model import default_base_path, load_reward_model
from export.train import encode_pairs, evaluate, pairs_that_fit
from service.encoding import TextEncoder
from trl_vs_rewardserve import SETS, TRL_SETUP, train_ours, train_trl, trl_text_format  # bench/ is on sys.path


def run_trl(data: Path, out: Path, max_length: int, seed: int) -> tuple[float, list[dict]]:
    """TRL's run (untrained model saved to OUT/init), recording each step's loss and its pairs as
    (chosen token ids, rejected token ids)."""
    from trl import RewardTrainer

    steps: list[dict] = []

    class RecordingRewardTrainer(RewardTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            if model.training:
                loss = result[0] if return_outputs else result
                half = inputs["input_ids"].shape[0] // 2
                rows = [ids[mask.bool()].tolist() for ids, mask in zip(inputs["input_ids"], inputs["attention_mask"])]
                steps.append({"loss": loss.item(), "pairs": list(zip(map(tuple, rows[:half]), map(tuple, rows[half:])))})
            return result

    torch.manual_seed(seed)
    seconds, _, _, _ = train_trl(data, default_base_path(), out / "trl", "cpu", max_length, seed,
                                 trainer_cls=RecordingRewardTrainer, init_dir=out / "init")
    return seconds, steps


def replay_order(steps: list[dict], encoder: TextEncoder, pairs) -> list[list[int]]:
    """TRL's batches as indices into the pairs our trainer keeps (its --drop-long filter, in file order)."""
    chosen, rejected = encode_pairs(encoder, pairs)
    kept = pairs_that_fit(chosen, rejected)
    where: dict[tuple, list[int]] = {}
    for position, i in enumerate(kept):
        where.setdefault((tuple(chosen[i].ids), tuple(rejected[i].ids)), []).append(position)
    batches, missing = [], 0
    for step in steps:
        batch = []
        for key in step["pairs"]:
            if where.get(key):
                batch.append(where[key].pop())
            else:
                missing += 1
        batches.append(batch)
    print(f"replay: {len(batches)} batches, {sum(map(len, batches))} of our {len(kept)} kept pairs; "
          f"{missing} of TRL's pairs tokenized differently by us", flush=True)
    return batches


# name -> TrainConfig overrides on top of TRL_SETUP (native head from OUT/init, [SEP][SEP], drop long, TRL recipe)
VARIANTS = {
    "trl-setup": {},  # the exact replay: whole batches, so each step computes what TRL's does
    "trl-setup-chunked": dict(chunk_tokens=512),  # the same gradient in length-sorted chunks (less padding)
    "mean-chunked": dict(pooling="mean", chunk_tokens=512),  # our default head (mean pooling + new linear) instead
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-dir", default="../shared/data")
    ap.add_argument("--out", default="runs/trl_replay")
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--variants", nargs="+", default=["trl-setup"], choices=list(VARIANTS))
    ap.add_argument("--reuse", action="store_true", help="reuse OUT's TRL run (model and recorded steps)")
    ap.add_argument("--summarize", nargs="+", metavar="OUT", default=None,
                    help="train nothing: one table of the replay.json in these OUT folders (one per seed)")
    args = ap.parse_args()
    if args.summarize:
        return summarize([Path(d) for d in args.summarize])
    torch.set_num_threads(args.threads)
    data, out = Path(args.data_dir), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report_path = out / "replay.json"
    report = json.loads(report_path.read_text()) if report_path.exists() else {"seed": args.seed, "variants": {}}
    steps_path = out / "trl_steps.json"
    if args.reuse and steps_path.exists():
        steps = json.loads(steps_path.read_text())
    else:
        seconds, steps = run_trl(data, out, args.max_length, args.seed)
        steps_path.write_text(json.dumps(steps))
        report = {"seed": args.seed, "trl_train_seconds": seconds, "variants": {}}
    for step in steps:  # JSON lists back to the hashable tuples replay_order matches on
        step["pairs"] = [tuple(tuple(ids) for ids in pair) for pair in step["pairs"]]

    fmt = trl_text_format(args.max_length)  # the sequences TRL trained on, and what every model is scored on
    batches = replay_order(steps, TextEncoder.from_dir(out / "init", fmt), read_pairs(data / "train.jsonl")[0])
    trainer_module.random_batches = lambda n, batch_size, seed: batches  # the one change: TRL's batch order
    eval_sets = {name: read_pairs(data / f"{name}.jsonl")[0] for name in SETS}

    def accuracy(model_dir: Path) -> dict:
        model, _ = load_reward_model(model_dir)
        encoder = TextEncoder.from_dir(model_dir, fmt)
        return {s: evaluate(model, encoder, pairs, "cpu")["accuracy"] for s, pairs in eval_sets.items()}

    if "trl" not in report.get("accuracy", {}):
        report["accuracy"] = {"trl": accuracy(out / "trl" / "model")}
    trl_loss = [s["loss"] for s in steps]
    for name in args.variants:
        overrides = VARIANTS[name]
        base = out / "init" if overrides.get("pooling", "native") == "native" else default_base_path()
        _, best, _ = train_ours(data, base, out / name, {**TRL_SETUP, **overrides}, max_length=args.max_length,
                                seed=args.seed, device="cpu", threads=args.threads)
        ours = json.loads((best / "eval_results.json").read_text())
        diffs = [abs(a - b) for a, b in zip(trl_loss, ours["loss_curve"])]
        report["variants"][name] = {
            "train_seconds": ours["train_seconds"], "steps": len(ours["loss_curve"]),
            "mean_loss": [statistics.mean(trl_loss), statistics.mean(ours["loss_curve"])],
            "loss_abs_diff_vs_trl": {"first": diffs[0], "median": statistics.median(diffs), "max": max(diffs)},
            "accuracy": accuracy(best)}
        report_path.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


def summarize(outs: list[Path]) -> None:
    """Per seed and variant: wall time (and its ratio to TRL's), accuracy on every set and its difference
    to TRL's on the same order; then the mean difference per variant over the seeds."""
    reports = [json.loads((out / "replay.json").read_text()) for out in outs]
    print("| seed | trainer | train wall s (× TRL) | max per-step loss diff | " + " | ".join(SETS) + " |")
    print("|---|---|---|---|" + "---|" * len(SETS))
    diffs: dict[str, list[list[float]]] = {}
    for r in reports:
        trl = r["accuracy"]["trl"]
        print(f"| {r['seed']} | TRL | {r['trl_train_seconds']:.0f} | – | " + " | ".join(f"{trl[s]:.3f}" for s in SETS) + " |")
        for name, v in r["variants"].items():
            d = [v["accuracy"][s] - trl[s] for s in SETS]
            diffs.setdefault(name, []).append(d)
            print(f"| {r['seed']} | {name} | {v['train_seconds']:.0f} ({v['train_seconds'] / r['trl_train_seconds']:.2f}×) | "
                  f"{v['loss_abs_diff_vs_trl']['max']:.1e} | "
                  + " | ".join(f"{v['accuracy'][s]:.3f} ({x:+.3f})" for s, x in zip(SETS, d)) + " |")
    for name, rows in diffs.items():
        means = [statistics.mean(col) for col in zip(*rows)]
        print(f"{name}: mean difference to TRL over {len(rows)} seeds: "
              + ", ".join(f"{s} {m:+.3f}" for s, m in zip(SETS, means)))


if __name__ == "__main__":
    main()
