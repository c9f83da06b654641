"""What `use_cache=False` in the plain forward saves (issue 25, defect 3), measured on CPU.

A decoder's config says `use_cache: true`, and a forward that does not pass `use_cache=False` builds and
returns every layer's keys and values, held until the batch's output is dropped: memory that
service/torch_runtime.py's GPU token budget does not count. TransformersRuntime now passes it; this script
times the served runtime's model on one right-padded batch both ways, alternately (so load on a shared
machine hits both alike), and sums the bytes of the cache the `use_cache=True` forward returns.

  python bench/use_cache_effect.py [--size 100m] [--batch 8] [--tokens 254] [--rounds 5] [--out FILE]

The model is bench/gpu_check.py's random bf16 Qwen2-shaped checkpoint, loaded as the server loads it
(TransformersRuntime on CPU: fp32 compute over the bf16 weights).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="100m")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=254)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import numpy as np
    import torch

    from bench.gpu_check import SIZES, build_checkpoint
    from service.runtime import CPU_BATCH_HINT, GPU_BATCH_HINT
    from service.torch_runtime import TransformersRuntime

    with tempfile.TemporaryDirectory(prefix="use_cache.") as work:
        ckpt = build_checkpoint(Path(work) / "ckpt", args.size, "cpu")
        runtime = TransformersRuntime(ckpt, ["input_ids", "attention_mask"], "bf16", 0, 4096, CPU_BATCH_HINT,
                                      GPU_BATCH_HINT, device="cpu", threads=args.threads)
        rng = np.random.default_rng(0)
        vocab = SIZES[args.size]["vocab_size"]
        ids = torch.from_numpy(rng.integers(1, vocab, size=(args.batch, args.tokens)))
        mask = torch.ones_like(ids)
        for row in range(1, args.batch):  # mixed lengths, right-padded as TextEncoder.pad pads
            cut = args.tokens - row * args.tokens // (2 * args.batch)
            ids[row, cut:], mask[row, cut:] = 0, 0
        times = {"use_cache=True": [], "use_cache=False": []}
        kv_bytes = 0
        with torch.inference_mode():
            runtime.model(input_ids=ids, attention_mask=mask, use_cache=False)  # warm-up
            for _ in range(args.rounds):
                for name in times:
                    t0 = time.perf_counter()
                    out = runtime.model(input_ids=ids, attention_mask=mask, use_cache=name == "use_cache=True")
                    times[name].append(time.perf_counter() - t0)
                    if out.past_key_values is not None:
                        kv_bytes = sum(t.numel() * t.element_size() for layer in out.past_key_values.layers
                                       for t in (layer.keys, layer.values))
                    del out
    median = {k: statistics.median(v) for k, v in times.items()}
    report = {"size": args.size, "batch": args.batch, "tokens": args.tokens, "threads": args.threads,
              "rounds": args.rounds, "seconds": times, "median_s": median,
              "ratio_without_to_with": median["use_cache=False"] / median["use_cache=True"],
              "kv_cache_bytes_with": kv_bytes, "kv_bytes_per_padded_token": kv_bytes / (args.batch * args.tokens),
              "torch": torch.__version__}
    print(json.dumps(report, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
