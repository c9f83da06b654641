"""Side by side: this project's trainer vs TRL's RewardTrainer, same base, data, length, epochs, batch.

Both train on train.jsonl (MiniLM-L6 base, max length 128, 1 epoch, 16 pairs per step, lr 5e-5,
fp32, no gradient checkpointing) and are evaluated with the same scoring code on every set, keeping
the end of each response. Prints a markdown table for docs/benchmarks.md.

  python bench/trl_vs_rewardserve.py --data-dir ../shared/data [--device cpu|cuda] [--out runs/trl_vs]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from export.data import read_pairs
from export.model import RewardModel, default_base_path, load_reward_model
from export.train import TrainConfig, evaluate, length_baseline, train
from service.encoding import TextEncoder, TextFormat

SETS = ["dev_in_domain", "llmbar", "hhh_alignment", "mtbench_human_llmbar200"]


def train_trl(data: Path, base: Path, out: Path, device: str, max_length: int,
              seed: int) -> tuple[float, Path, int, int]:
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    pairs, _ = read_pairs(data / "train.jsonl")
    dataset = Dataset.from_list([{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected} for p in pairs])
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1)
    args = RewardConfig(output_dir=str(out), per_device_train_batch_size=16, num_train_epochs=1,
                        learning_rate=5e-5, max_length=max_length, bf16=False, fp16=False,
                        gradient_checkpointing=False, eos_token="[SEP]", report_to=[], save_strategy="no",
                        logging_steps=50, seed=seed, use_cpu=device == "cpu", dataloader_num_workers=0,
                        disable_tqdm=True)
    trainer = RewardTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    kept = len(trainer.train_dataset)
    print(f"TRL keeps {kept} of {len(pairs)} pairs (it drops pairs over max_length)", flush=True)
    started = time.time()
    trainer.train()
    seconds = time.time() - started
    trainer.save_model(str(out / "model"))
    tokenizer.save_pretrained(str(out / "model"))
    return seconds, out / "model", kept, len(pairs)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-dir", default="../shared/data")
    ap.add_argument("--out", default="runs/trl_vs")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--base", default=None)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch CPU threads, the same for both")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data, out = Path(args.data_dir), Path(args.out)
    base = Path(args.base) if args.base else default_base_path()
    torch.manual_seed(args.seed)

    trl_seconds, trl_dir, trl_pairs, n_pairs = train_trl(data, base, out / "trl", args.device, args.max_length, args.seed)
    best = train(TrainConfig(data=str(data / "train.jsonl"), dev=str(data / "dev_in_domain.jsonl"),
                             out=str(out / "ours"), base=str(base), max_length=args.max_length, epochs=1,
                             batch_size=16, lr=5e-5, seed=args.seed, device=args.device, progress=False,
                             threads=args.threads))
    ours_seconds = json.loads((best / "eval_results.json").read_text())["train_seconds"]

    ours_model, ours_fmt = load_reward_model(best)
    ours_model.to(args.device)
    trl_model, _ = load_reward_model(trl_dir)  # a native *ForSequenceClassification checkpoint
    trl_model.to(args.device)
    # TRL scored "prompt + response" as one text with "[SEP]" appended; evaluate it the same way.
    trl_fmt = TextFormat(join="concat", max_length=args.max_length, append_eos=True, eos_token="[SEP]",
                         pad_token_id=0, uses_token_type_ids=True)
    rows = {}
    for name in SETS:
        pairs, _ = read_pairs(data / f"{name}.jsonl")
        rows[name] = {
            "ours": evaluate(ours_model, TextEncoder.from_dir(best, ours_fmt), pairs, args.device)["accuracy"],
            "trl": evaluate(trl_model, TextEncoder.from_dir(trl_dir, trl_fmt), pairs, args.device)["accuracy"],
            "longer": length_baseline(pairs),
        }
    print(f"\n| trainer | train wall s | " + " | ".join(SETS) + " |")
    print("|---|---|" + "---|" * len(SETS))
    print(f"| rewardserve | {ours_seconds:.0f} | " + " | ".join(f"{rows[s]['ours']:.3f}" for s in SETS) + " |")
    print(f"| TRL RewardTrainer | {trl_seconds:.0f} | " + " | ".join(f"{rows[s]['trl']:.3f}" for s in SETS) + " |")
    print("| longer answer wins | – | " + " | ".join(f"{rows[s]['longer']:.3f}" for s in SETS) + " |")
    print(f"\nwall time ratio rewardserve/TRL = {ours_seconds / trl_seconds:.2f}; TRL trained on "
          f"{trl_pairs} pairs, rewardserve on all {n_pairs} (prompt cut from the left, response end kept)")
    (out / "result.json").write_text(json.dumps({"rows": rows, "ours_seconds": ours_seconds,
                                                 "trl_seconds": trl_seconds, "trl_pairs": trl_pairs,
                                                 "pairs": n_pairs, "device": args.device,
                                                 "threads": args.threads}, indent=2))


if __name__ == "__main__":
    main()
