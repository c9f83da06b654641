"""Side by side: this project's trainer vs TRL's RewardTrainer, same base, data, length, epochs, batch.

Both train on train.jsonl (MiniLM-L6 base, max length 128, 1 epoch, 16 pairs per step, lr 5e-5,
fp32, no gradient checkpointing) and are evaluated with the same scoring code on every set, keeping
the end of each response. Prints a markdown table for docs/benchmarks.md.

  python bench/trl_vs_rewardserve.py --data-dir ../shared/data [--device cpu|cuda] [--out runs/trl_vs]

Trainers (one after the other, same threads; `--trainers` picks some, TRAINERS lists them): TRL, and this
trainer on every pair (truncating the prompt from the left) or, with `--drop-long`, on the same kind of
subset TRL keeps, plus variants that switch TRL's other choices on one by one. Results accumulate in
OUT/result.json; `--summarize OUT…` tabulates several seeds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from service.data import read_pairs
from export.model import default_base_path, load_reward_model
from export.train import TrainConfig, evaluate, length_baseline, train
from service.encoding import TextEncoder, TextFormat

SETS = ["dev_in_domain", "llmbar", "hhh_alignment", "mtbench_human_llmbar200"]


TRL_EOS = "[SEP]"  # RewardConfig(eos_token=...): BERT tokenizers have no eos token of their own


def trl_text_format(max_length: int) -> TextFormat:
    """What TRL's RewardTrainer feeds BERT: prompt + response as one text with its eos string appended
    before the tokenizer's own [SEP] (so [CLS] … [SEP] [SEP]), token type 0 throughout."""
    return TextFormat(join="concat", max_length=max_length, append_eos=True, eos_token=TRL_EOS, pad_token_id=0,
                      uses_token_type_ids=True)


def train_trl(data: Path, base: Path, out: Path, device: str, max_length: int, seed: int,
              trainer_cls=None, init_dir: Path | None = None) -> tuple[float, Path, int, int]:
    """TRL's RewardTrainer on train.jsonl (the benchmark's settings); `trainer_cls` may subclass it,
    `init_dir` receives the untrained model (head included) and tokenizer."""
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    pairs, _ = read_pairs(data / "train.jsonl")
    dataset = Dataset.from_list([{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected} for p in pairs])
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1)
    if init_dir is not None:
        model.save_pretrained(init_dir)
        tokenizer.save_pretrained(init_dir)
    args = RewardConfig(output_dir=str(out), per_device_train_batch_size=16, num_train_epochs=1,
                        learning_rate=5e-5, max_length=max_length, bf16=False, fp16=False,
                        gradient_checkpointing=False, eos_token=TRL_EOS, report_to=[], save_strategy="no",
                        logging_steps=50, seed=seed, use_cpu=device == "cpu", dataloader_num_workers=0,
                        disable_tqdm=True)
    trainer = (trainer_cls or RewardTrainer)(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    kept = len(trainer.train_dataset)
    print(f"TRL keeps {kept} of {len(pairs)} pairs (it drops pairs over max_length)", flush=True)
    started = time.time()
    trainer.train()
    seconds = time.time() - started
    trainer.save_model(str(out / "model"))
    tokenizer.save_pretrained(str(out / "model"))
    return seconds, out / "model", kept, len(pairs)


TRL_RECIPE = dict(dropout=False, center_rewards=0.0, warmup_ratio=0.0, schedule="linear", weight_decay=0.0)
# TRL's whole setup in our trainer: its model and head, one text segment ending [SEP][SEP], long pairs dropped,
# a plain shuffle, its recipe
TRL_SETUP = dict(drop_long=True, join="concat", append_eos=TRL_EOS, batching="random", pooling="native", **TRL_RECIPE)
# name -> (what the table says, TrainConfig overrides on top of the common settings); "trl" is TRL itself.
TRAINERS = {
    "rewardserve": ("rewardserve (all pairs; prompt cut from the left, response end kept)", {}),
    "rewardserve-drop-long": ("rewardserve --drop-long (TRL's filter: pairs over max length dropped)",
                              dict(drop_long=True)),
    "rewardserve-trl-recipe": ("rewardserve --drop-long with TRL's defaults (no dropout, centering, warmup or "
                               "weight decay; linear decay)", dict(drop_long=True, **TRL_RECIPE)),
    "rewardserve-drop-long-concat": ("rewardserve --drop-long --join concat (one text segment, as TRL)",
                                     dict(drop_long=True, join="concat")),
    "rewardserve-concat-trl-recipe": ("rewardserve --drop-long --join concat with TRL's defaults",
                                      dict(drop_long=True, join="concat", **TRL_RECIPE)),
    "rewardserve-concat-trl-recipe-random": ("rewardserve --drop-long --join concat --batching random with "
                                             "TRL's defaults", dict(drop_long=True, join="concat", batching="random",
                                                                    **TRL_RECIPE)),
    "rewardserve-concat-trl-recipe-random-chunked": (
        "rewardserve --drop-long --join concat --batching random --chunk-tokens 512 with TRL's defaults",
        dict(drop_long=True, join="concat", batching="random", chunk_tokens=512, **TRL_RECIPE)),
    "rewardserve-trl-head": ("rewardserve --pooling native (TRL's head: BertForSequenceClassification, CLS, "
                             "pooler, linear) --join concat --batching random --drop-long, TRL's defaults",
                             dict(drop_long=True, join="concat", batching="random", chunk_tokens=512, pooling="native",
                                  **TRL_RECIPE)),
    "rewardserve-trl-setup": ("the row above with TRL's trailing [SEP][SEP] (--append-eos [SEP]): TRL's whole setup "
                              "and token sequences, our own shuffle",
                              dict(**TRL_SETUP, chunk_tokens=512)),
    "rewardserve-chunked-head-lr20": (
        "the chunked row above, the head's learning rate 20x (--head-lr-scale 20)",
        dict(drop_long=True, join="concat", batching="random", chunk_tokens=512, **TRL_RECIPE, head_lr_scale=20.0)),
    "rewardserve-chunked-centered": (
        "the chunked row above with reward centering 0.01 (--center-rewards 0.01)",
        dict(drop_long=True, join="concat", batching="random", chunk_tokens=512, **{**TRL_RECIPE, "center_rewards": 0.01})),
    "rewardserve-chunked-lr1e-4": (
        "the chunked row above at lr 1e-4 (TRL's default learning rate)",
        dict(drop_long=True, join="concat", batching="random", chunk_tokens=512, **TRL_RECIPE, lr=1e-4)),
    "trl": ("TRL RewardTrainer (drops pairs over max length)", {}),
}


def train_ours(data: Path, base: Path, out: Path, overrides: dict, *, max_length: int, seed: int, device: str,
               threads: int) -> tuple[float, Path, int]:
    """Our trainer on train.jsonl with the benchmark's common settings (1 epoch, 16 pairs, lr 5e-5) + overrides."""
    common = dict(data=str(data / "train.jsonl"), dev=str(data / "dev_in_domain.jsonl"), out=str(out),
                  base=str(base), max_length=max_length, epochs=1, batch_size=16, lr=5e-5, seed=seed,
                  device=device, progress=False, threads=threads)
    best = train(TrainConfig(**{**common, **overrides}))
    summary = json.loads((best / "eval_results.json").read_text())
    return summary["train_seconds"], best, summary["train_pairs"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-dir", default="../shared/data")
    ap.add_argument("--out", default="runs/trl_vs")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--base", default=None)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch CPU threads, the same for all")
    ap.add_argument("--trainers", nargs="+", default=list(TRAINERS), choices=list(TRAINERS),
                    help="run these (results of others already in OUT/result.json are kept in the table)")
    ap.add_argument("--summarize", nargs="+", metavar="OUT", default=None,
                    help="train nothing: per-seed table of the result.json in these OUT folders (one per seed)")
    args = ap.parse_args()
    if args.summarize:
        return summarize([Path(d) for d in args.summarize])
    torch.set_num_threads(args.threads)
    data, out = Path(args.data_dir), Path(args.out)
    base = Path(args.base) if args.base else default_base_path()
    result_path = out / "result.json"
    result = json.loads(result_path.read_text()) if result_path.exists() else {}
    trainers = result.setdefault("trainers", {})
    eval_sets = {set_name: read_pairs(data / f"{set_name}.jsonl")[0] for set_name in SETS}
    result["longer"] = {set_name: length_baseline(pairs) for set_name, pairs in eval_sets.items()}

    for name in args.trainers:
        torch.manual_seed(args.seed)
        if name == "trl":
            seconds, model_dir, kept, _ = train_trl(data, base, out / "trl", args.device, args.max_length, args.seed)
            fmt = trl_text_format(args.max_length)  # score TRL's model on the sequences it was trained on
        else:
            seconds, model_dir, kept = train_ours(data, base, out / name, TRAINERS[name][1], max_length=args.max_length,
                                                  seed=args.seed, device=args.device, threads=args.threads)
            fmt = None
        model, own_fmt = load_reward_model(model_dir)  # TRL's is a native *ForSequenceClassification checkpoint
        model.to(args.device)
        encoder = TextEncoder.from_dir(model_dir, fmt or own_fmt)
        accuracy = {set_name: evaluate(model, encoder, pairs, args.device)["accuracy"]
                    for set_name, pairs in eval_sets.items()}
        trainers[name] = {"train_seconds": seconds, "train_pairs": kept, "accuracy": accuracy}
        result.update(device=args.device, threads=args.threads, max_length=args.max_length)
        out.mkdir(parents=True, exist_ok=True)
        result_path.write_text(json.dumps(result, indent=2))

    print("\n| trainer | pairs trained | train wall s | pairs/s | " + " | ".join(SETS) + " |")
    print("|---|---|---|---|" + "---|" * len(SETS))
    for name, r in trainers.items():
        print(f"| {TRAINERS[name][0]} | {r['train_pairs']} | {r['train_seconds']:.0f} | "
              f"{r['train_pairs'] / r['train_seconds']:.2f} | "
              + " | ".join(f"{r['accuracy'][s]:.3f}" for s in SETS) + " |")
    print("| longer answer wins | – | – | – | " + " | ".join(f"{result['longer'][s]:.3f}" for s in SETS) + " |")
    if "trl" in trainers:
        for name in trainers.keys() - {"trl"}:
            print(f"{name}: wall time / TRL's = {trainers[name]['train_seconds'] / trainers['trl']['train_seconds']:.2f}")


def summarize(outs: list[Path]) -> None:
    """One row per trainer: its mean over the seeds (folders) that have it, and the difference to TRL's
    mean over those same seeds with its standard error (unpaired: a seed gives each trainer its own data
    order, so the runs are independent)."""
    results = [json.loads((out / "result.json").read_text())["trainers"] for out in outs]
    print(f"seeds = folders: {', '.join(str(o) for o in outs)}\n")
    print("| trainer | seeds | train wall s (median; × TRL's, median per seed) | " + " | ".join(SETS) + " |")
    print("|---|---|---|" + "---|" * len(SETS))
    for name in TRAINERS:
        runs = [r for r in results if name in r]
        if not runs:
            continue
        vs_trl = name != "trl" and all("trl" in r for r in runs)
        wall = f"{statistics.median(r[name]['train_seconds'] for r in runs):.0f}"
        if vs_trl:
            wall += f" ({statistics.median(r[name]['train_seconds'] / r['trl']['train_seconds'] for r in runs):.2f}×)"
        cells = []
        for s in SETS:
            ours = [r[name]["accuracy"][s] for r in runs]
            cell = f"{statistics.mean(ours):.3f}"
            if vs_trl:
                theirs = [r["trl"]["accuracy"][s] for r in runs]
                sem = (((statistics.variance(ours) + statistics.variance(theirs)) / len(runs)) ** 0.5
                       if len(runs) > 1 else float("nan"))
                cell += f" ({statistics.mean(ours) - statistics.mean(theirs):+.3f} ± {sem:.3f})"
            cells.append(cell)
        print(f"| {name} | {len(runs)} | {wall} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
