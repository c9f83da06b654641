"""The `Runtime` protocol: everything the service asks of a model backend, as LitServe's `LitAPI` does it: a base
class with a few required members and optional hooks that have defaults.

The engine (and the model it serves), the batcher, its model-run thread (service/model_run.py) and the prefix
cache ask a runtime for nothing else than what `Runtime` declares here. `check_runtime` is what the service
calls on a runtime it is handed (`create_app(settings, runtime=...)`): a custom object missing a required
member is refused at startup in one line naming it, and one that does not subclass `Runtime` is seen through
it with the defaults (`_Adapted`).

Why a module of its own (service/runtime.py re-exports everything here): the backends subclass `Runtime`, and
the transformers backend (service/torch_runtime.py) is imported by service/runtime.py's `load_runtime`; were the
base class in service/runtime.py, the two would import each other.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np


@dataclass(frozen=True)
class BatchHint:
    """The batch shapes a runtime runs efficiently; the batcher applies them under its own settings.

    Measured on a 2-core CPU (docs/benchmarks.md, section 2): batching pays for short items (16- to
    64-token items run 1.2-4× faster per item in batches of 4-32: the per-run cost dominates), is
    neutral at 128 tokens × 2-4, and costs items/s beyond (128 tokens × 16-64: 0.5-0.9× the items/s of
    single runs; 256+ tokens: even pairs run at ~0.8-0.9×, and sorted mixed-length batches of 2 / 4 / 8
    at 0.92 / 0.82 / 0.69× of single runs). So runs stay within 512 padded tokens, and since a batch is
    no faster per real token than single runs, padding is waste: a joint run keeps real/padded ≥ 0.9.
    On a GPU large batches are the point and padding is cheap."""

    max_batch_tokens: int | None  # padded tokens per run beyond which items/s drop; None: no such limit
    min_padding_efficiency: float  # real/padded tokens a joint run must keep; 0: pad freely
    max_batch_size: int | None = None  # items per run the model allows (1: a score would depend on its batch)


CPU_BATCH_HINT = BatchHint(max_batch_tokens=512, min_padding_efficiency=0.9)
GPU_BATCH_HINT = BatchHint(max_batch_tokens=None, min_padding_efficiency=0.0)


def hint_for(device_hint: BatchHint, precision: str) -> BatchHint:
    """Dynamic int8 computes activation scales per run, over every item and pad token in it: run alone,
    an item's score depends on nothing else (measured on CPU: 1.17-1.46× fp32 in batches of 8, by variant;
    docs/benchmarks.md 3b)."""
    return replace(device_hint, max_batch_size=1) if precision == "int8-dynamic" else device_hint


REQUIRED = ("run", "describe", "name", "provider")


class RuntimeProtocolError(TypeError):
    """A runtime handed to the service lacks a required member of `Runtime` (one line, naming it)."""


class Runtime:
    """A model backend. Subclass it (or hand the service any object with the required members).

    Required:
      * `run(inputs) -> np.ndarray`: padded int64 arrays (input_ids, attention_mask[, token_type_ids]) →
        float32 rewards, one per row; it runs in the model thread, one run at a time.
      * `describe() -> dict`: what really runs (runtime, provider, precision, ...), for /v1/models and the logs.
      * `name: str` (e.g. "onnxruntime"), `provider: str` (what really computes, e.g. "CPUExecutionProvider").

    Optional, with the defaults below:
      * `batch_hint`: the run shapes it runs efficiently (BatchHint); None: no preference, the settings alone
        bound a run (`max_batch_size`, `max_batch_tokens`).
      * `precision`: what it computes in. Where that differs from the bundle's (or its reference scores'),
        the engine scores the bundle's reference pairs at startup and refuses to serve on disagreement; a
        custom runtime that says nothing is taken to compute fp32.
      * `reuses_prefix` / `run_shared(inputs, prefix_len, max_batch_tokens, cache=None)`: rows sharing their
        first `prefix_len` tokens computed with that prefix once (best-of-N, GRPO groups; a causal decoder).
        `run_shared` is only called where `reuses_prefix` is true, so the default refuses.
      * `slice_kv(state, start, end)`: cuts the keys/values `run_shared` stores in the prefix cache; None: no
        prefix cache (prefix sharing across requests needs it as well as `reuses_prefix`).
      * `reserve_prefix_cache(tokens) -> int`: take the prefix cache's memory out of what the runtime sizes its
        runs from (a GPU token budget); returns the bytes reserved. Default: nothing to reserve, 0.
    """

    name: str
    provider: str
    batch_hint: BatchHint | None = None
    precision: str = "fp32"
    reuses_prefix: bool = False
    slice_kv = None

    def run(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        raise NotImplementedError(f"{type(self).__name__} does not implement run (required by service.runtime.Runtime)")

    def describe(self) -> dict:
        raise NotImplementedError(f"{type(self).__name__} does not implement describe (required by "
                                  "service.runtime.Runtime)")

    def run_shared(self, inputs: dict[str, np.ndarray], prefix_len: int, max_batch_tokens: int,
                   cache=None) -> np.ndarray:
        raise NotImplementedError(f"{type(self).__name__} does not compute shared prefixes (reuses_prefix is "
                                  "false): run_shared is only called on a runtime that says it reuses prefixes")

    def reserve_prefix_cache(self, tokens: int) -> int:
        return 0


def _lacks(obj, member: str) -> bool:
    """A required member `obj` does not have: absent, or (run, describe) not callable, or left to the base
    class's refusal (a subclass that never implemented it)."""
    if member in ("run", "describe"):
        own = getattr(obj, member, None)
        return not callable(own) or getattr(own, "__func__", None) is getattr(Runtime, member)
    return not hasattr(obj, member)


def check_runtime(obj) -> Runtime:
    """The runtime the service will call: `obj` itself when it subclasses `Runtime`, else `obj` seen through
    `_Adapted` (its own members where it has them, the defaults for the optional ones it lacks). Raises
    RuntimeProtocolError, one line naming what is missing, when a required member is absent, so a custom
    backend fails at startup instead of on its first request (or, as before, on the first optional member
    the engine happened to read)."""
    missing = [member for member in REQUIRED if _lacks(obj, member)]
    if missing:
        raise RuntimeProtocolError(
            f"runtime {type(obj).__name__} lacks {', '.join(missing)}: a runtime implements run, describe, name "
            "and provider (service.runtime.Runtime; docs/architecture.md)")
    return obj if isinstance(obj, Runtime) else _Adapted(obj)


class _Adapted(Runtime):
    """A runtime that does not subclass `Runtime`, with the defaults for what it lacks.

    Wrapped, not filled in (setattr of the defaults on it): the object is the caller's (it may be shared,
    slotted or frozen, and a test may keep reading its own attributes), and every member is read from it
    when asked, so one it sets later (a batch hint re-sized by reserve_prefix_cache) is seen. Anything else
    asked of the wrapper is the object's own (`__getattr__`)."""

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, member):  # only reached for what the class does not define
        if member == "inner":  # not set yet (copy / pickle): never recurse
            raise AttributeError(member)
        return getattr(self.inner, member)

    def __repr__(self) -> str:
        return f"_Adapted({self.inner!r})"

    name = property(lambda self: self.inner.name)
    provider = property(lambda self: self.inner.provider)
    batch_hint = property(lambda self: getattr(self.inner, "batch_hint", Runtime.batch_hint))
    precision = property(lambda self: getattr(self.inner, "precision", Runtime.precision))
    reuses_prefix = property(lambda self: getattr(self.inner, "reuses_prefix", Runtime.reuses_prefix))
    slice_kv = property(lambda self: getattr(self.inner, "slice_kv", Runtime.slice_kv))

    def run(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        return self.inner.run(inputs)

    def describe(self) -> dict:
        return self.inner.describe()

    def run_shared(self, inputs: dict[str, np.ndarray], prefix_len: int, max_batch_tokens: int, **cache) -> np.ndarray:
        own = getattr(self.inner, "run_shared", None)
        if own is None:
            return Runtime.run_shared(self, inputs, prefix_len, max_batch_tokens, **cache)
        return own(inputs, prefix_len, max_batch_tokens, **cache)  # `cache` only where the caller gave one

    def reserve_prefix_cache(self, tokens: int) -> int:
        own = getattr(self.inner, "reserve_prefix_cache", None)
        return 0 if own is None else own(tokens)
