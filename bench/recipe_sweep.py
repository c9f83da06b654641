"""Try several training recipes on the same data and print one accuracy table.

Used to choose the default recipe (docs/benchmarks.md records the result). Each config is a JSON
object of TrainConfig overrides; every run evaluates its best checkpoint on the dev and
out-of-domain sets.

  python bench/recipe_sweep.py --data-dir ../shared/data --device cuda --out runs/sweep \
      '{"lr": 5e-5, "epochs": 1, "max_length": 128}' '{"lr": 1e-4, "epochs": 2}'
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from export.train import TrainConfig, train

OOD = ["llmbar.jsonl", "hhh_alignment.jsonl", "mtbench_human_llmbar200.jsonl"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("configs", nargs="+", help="JSON objects of TrainConfig overrides")
    ap.add_argument("--data-dir", default="../shared/data")
    ap.add_argument("--out", default="runs/sweep")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--base", default=None)
    args = ap.parse_args()
    data = Path(args.data_dir)
    rows = []
    for i, overrides in enumerate(args.configs):
        cfg = TrainConfig(data=str(data / "train.jsonl"), dev=str(data / "dev_in_domain.jsonl"),
                          eval=[str(data / f) for f in OOD], out=f"{args.out}/run{i}", device=args.device,
                          base=args.base, progress=False)
        for k, v in json.loads(overrides).items():
            setattr(cfg, k, v)
        started = time.time()
        best = train(cfg)
        summary = json.loads((best / "eval_results.json").read_text())
        row = {"config": overrides, "seconds": round(time.time() - started, 1),
               **{k: round(v["accuracy"], 4) for k, v in summary["results"].items()}}
        rows.append(row)
        print("RESULT", json.dumps(row), flush=True)
    print("\nconfig | seconds | dev | llmbar | hhh | mtbench")
    for r in rows:
        print(f"{r['config']} | {r['seconds']} | {r['dev']} | {r['llmbar']} | {r['hhh_alignment']} | "
              f"{r['mtbench_human_llmbar200']}")


if __name__ == "__main__":
    main()
