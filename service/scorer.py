"""Offline scoring of many encoded items: length-sorted runs within a runtime's batch hint.

Why one module: evaluation (`rewardserve eval`), parity (export gate, `verify`, the startup precision
check), the trainer's evaluation and the benchmark ceiling all score a list of items outside the
server. Sorting by length keeps padding small; cutting runs by the runtime's own batch hint makes the
offline numbers those of the server (an int8-dynamic runtime, whose score would depend on its
neighbours in a batch, runs one item per run here as it does there). The online path does not use this
module: the batcher forms its runs from live traffic under the same hint.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from service.encoding import Encoded, TextEncoder

DEFAULT_RUN_ITEMS = 64


def sorted_runs(lengths: Sequence[int], max_items: int = DEFAULT_RUN_ITEMS,
                max_tokens: int | None = None) -> list[list[int]]:
    """Indices in ascending length, cut into runs of at most `max_items` items and (when given)
    `max_tokens` padded tokens (longest × items); a run always holds at least one item."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    runs: list[list[int]] = []
    current: list[int] = []
    for i in order:  # ascending: the newest item is the run's longest
        over_tokens = max_tokens is not None and (len(current) + 1) * lengths[i] > max_tokens
        if current and (len(current) == max_items or over_tokens):
            runs.append(current)
            current = []
        current.append(i)
    return runs + [current] if current else runs


def score_sorted(items: Sequence[Encoded], run: Callable[[list[Encoded]], np.ndarray],
                 max_items: int = DEFAULT_RUN_ITEMS, max_tokens: int | None = None) -> np.ndarray:
    """Scores (float64, input order) of `items`, `run` called once per length-sorted run."""
    out = np.zeros(len(items), dtype=np.float64)
    for idx in sorted_runs([e.n_tokens for e in items], max_items, max_tokens):
        out[idx] = np.asarray(run([items[i] for i in idx]), dtype=np.float64).reshape(-1)
    return out


def run_limits(runtime, max_items: int = DEFAULT_RUN_ITEMS) -> tuple[int, int | None]:
    """(items, padded tokens) per run that `runtime`'s batch hint allows, capped at `max_items`."""
    hint = getattr(runtime, "batch_hint", None)
    if hint is None:
        return max_items, None
    return min(max_items, hint.max_batch_size or max_items), hint.max_batch_tokens


def score_with_runtime(runtime, encoder: TextEncoder, items: Sequence[Encoded],
                       max_items: int = DEFAULT_RUN_ITEMS) -> np.ndarray:
    """What the server would answer for `items` (raw scores, float64, input order), run as it runs them."""
    limit_items, limit_tokens = run_limits(runtime, max_items)
    return score_sorted(items, lambda batch: runtime.run(encoder.pad(batch)), limit_items, limit_tokens)
