"""One model run, in the model thread: pad the items, run them (shared-prompt units through `run_shared`),
check the answer's shape, and split a run that found no device memory. Also what a failed run means:
`out_of_memory` (retry smaller) or `device_error` (the device is broken: stop saying ready).

Why apart from service/batcher.py: the batcher owns the queue state and decides *what* runs; this module
is *how* one run executes and fails, with no queue state, so each stays small enough to read whole.
"""

from __future__ import annotations

import logging
from typing import Callable

import numpy as np

from service.admission import ModelError
from service.encoding import Encoded, SharedPrefix
from service.runtime import Runtime

log = logging.getLogger("rewardserve.batcher")

# What device errors say (torch, CUDA, onnxruntime's CUDA provider), read by message: this module imports no torch.
OUT_OF_MEMORY = ("out of memory", "failed to allocate memory")
DEVICE_ERRORS = ("cuda error", "device-side assert", "illegal memory access", "cublas_status", "cudnn_status",
                 "misaligned address", "unspecified launch failure")


def out_of_memory(exc: BaseException) -> bool:
    """A run that found no device memory (torch.cuda.OutOfMemoryError or its message): the device is fine,
    a smaller run fits."""
    return type(exc).__name__ == "OutOfMemoryError" or any(s in str(exc).lower() for s in OUT_OF_MEMORY)


def device_error(exc: BaseException) -> bool:
    """A non-recoverable device error: after a device-side assert or an illegal memory access the CUDA
    context is broken and every later run fails the same way, so the server must be restarted."""
    return not out_of_memory(exc) and any(s in str(exc).lower() for s in DEVICE_ERRORS)


def forward(runtime: Runtime, pad: Callable[[list[Encoded]], dict[str, np.ndarray]],
            encoded: list[Encoded | SharedPrefix], max_batch_tokens: int, prefix_cache=None) -> np.ndarray:
    """Pad and run. A run that finds no device memory (out_of_memory) is split: its items run again in two
    halves, each split again if it fails the same way, down to one item (whose error is then the batch's).
    The token budget is an estimate, and a batch that does not fit should cost a retry, not its requests.
    A shared-prompt unit that does not fit runs its items unshared."""
    try:
        return _forward_once(runtime, pad, encoded, max_batch_tokens, prefix_cache)
    except Exception as exc:
        items = list(encoded[0].items) if isinstance(encoded[0], SharedPrefix) else list(encoded)
        if not out_of_memory(exc) or (len(items) < 2 and not isinstance(encoded[0], SharedPrefix)):
            raise
        half = max(1, len(items) // 2)
        log.warning("out of device memory on %d items (%s): retrying them in halves", len(items), exc)
        parts = [items[:half], items[half:]] if len(items) > 1 else [items]
        return np.concatenate([forward(runtime, pad, part, max_batch_tokens, prefix_cache)
                               for part in parts]).astype(np.float32)


def _forward_once(runtime: Runtime, pad, encoded: list[Encoded | SharedPrefix], max_batch_tokens: int,
                  prefix_cache) -> np.ndarray:
    if isinstance(encoded[0], SharedPrefix):
        unit = encoded[0]
        encoded = list(unit.items)
        cache = {} if prefix_cache is None else {"cache": prefix_cache}
        raw = runtime.run_shared(pad(encoded), unit.prefix, max_batch_tokens, **cache)
    else:
        raw = runtime.run(pad(encoded))
    raw = np.asarray(raw, dtype=np.float32).reshape(-1)
    if raw.shape[0] != len(encoded):
        raise ModelError(f"runtime returned {raw.shape[0]} scores for {len(encoded)} inputs")
    return raw
