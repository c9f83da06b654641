"""Training-step cost of the batch orders and of length-sorted chunks, on the real data.

Times forward + backward of the same training batches (MiniLM base, prompt and response as one segment,
pairs over max length dropped, as in the TRL side-by-side) for each setting, round-robin so machine
noise hits every setting alike, and prints the median seconds per step and the ratio to random batches
run whole (what TRL does).

  python bench/train_step_bench.py --data ../shared/data/train.jsonl [--steps 12] [--max-length 128]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from service.data import read_pairs
from export.model import default_base_path, load_reward_model
from export.train import (encode_pairs, forward_sorted, length_grouped_batches, pairs_that_fit, random_batches,
                          sorted_chunks)
from service.encoding import TextEncoder


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="../shared/data/train.jsonl")
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--chunks", type=int, nargs="+", default=[0, 512, 1024, 2048])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    base = default_base_path()
    model, fmt = load_reward_model(base, max_length=args.max_length)
    fmt = fmt.model_copy(update={"join": "concat"})
    encoder = TextEncoder.from_dir(base, fmt)
    for module in model.modules():  # dropout off, so every setting computes the same function
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    model.train()
    pairs, _ = read_pairs(args.data)
    chosen, rejected = encode_pairs(encoder, pairs)
    keep = pairs_that_fit(chosen, rejected)
    chosen, rejected = [chosen[i] for i in keep], [rejected[i] for i in keep]
    lengths = [max(c.n_tokens, r.n_tokens) for c, r in zip(chosen, rejected)]
    orders = {"random": random_batches(len(keep), args.batch_size, seed=0)[: args.steps],
              "length": length_grouped_batches(lengths, args.batch_size, seed=0)[: args.steps]}
    settings = [(order, chunk) for order in orders for chunk in args.chunks]
    times: dict[tuple[str, int], list[float]] = {s: [] for s in settings}
    padded: dict[tuple[str, int], int] = {s: 0 for s in settings}
    real = {order: 0 for order in orders}
    for step in range(args.steps):
        for order, chunk in settings:
            idx = orders[order][step]
            items = [chosen[i] for i in idx] + [rejected[i] for i in idx]
            t0 = time.perf_counter()
            rewards = forward_sorted(model, encoder, items, "cpu", chunk)
            rewards.sum().backward()
            model.zero_grad(set_to_none=True)
            times[(order, chunk)].append(time.perf_counter() - t0)
            if chunk == args.chunks[0]:
                real[order] += sum(e.n_tokens for e in items)
            padded[(order, chunk)] += padded_tokens(items, chunk)
    reference = statistics.median(times[("random", 0)])
    print(f"{len(keep)} pairs fit {args.max_length} tokens; {args.steps} steps of {args.batch_size} pairs, "
          f"{args.threads} threads")
    print("| batches | chunk tokens | padding efficiency | median s/step | vs random, whole batch |")
    print("|---|---|---|---|---|")
    for order, chunk in settings:
        med = statistics.median(times[(order, chunk)])
        print(f"| {order} | {chunk or 'whole'} | {real[order] / padded[(order, chunk)]:.2f} | {med:.3f} | "
              f"{med / reference:.2f} |")


def padded_tokens(items, chunk_tokens: int) -> int:
    """Padded tokens of the forward passes forward_sorted makes."""
    lengths = [e.n_tokens for e in items]
    return sum(max(lengths[i] for i in chunk) * len(chunk) for chunk in sorted_chunks(lengths, chunk_tokens))


if __name__ == "__main__":
    main()
