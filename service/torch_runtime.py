"""`TransformersRuntime`: a `model_format: "transformers"` bundle (a Hugging Face *ForSequenceClassification
checkpoint's own safetensors shards) run eagerly by transformers with PyTorch SDPA attention.

torch and transformers are imported when such a bundle is loaded, never by the ONNX path. This module
imports only the `Runtime` protocol (service/runtime_protocol.py), not service/runtime.py: load_runtime there
hands it the batch hints, so the runtime module and this one do not import each other.

What runs: on CUDA the checkpoint's own dtype (bf16/fp16; `fp16=True` forces fp16, `fp16=False` fp32); on
CPU fp32 compute (CPU bf16 matmuls are slow on most CPUs and the bf16 weights upcast exactly) over weights
kept in the checkpoint's dtype, each upcast only while its module runs (`upcast_at_use`): an fp32 copy of a
bf16 model would double its memory. `precision` says what computes, so the engine's startup check runs
whenever that differs from the bundle's (service/parity.py).

Pooling is the model's own: the HF head reads the rightmost token that is not `pad_token_id`, so the
right-padded batches of TextEncoder.pad (padded with the same id) score like each item alone; under a
causal mask real tokens never attend to the pads behind them, and positions count from 0 either way.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import re
import logging
from pathlib import Path

import numpy as np

from service.runtime_protocol import Runtime

log = logging.getLogger("rewardserve.runtime")

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
GPU_MEMORY_SHARE = 0.5      # of the memory free after loading, what one run's activations may take
GPU_TOKEN_BUDGET_CAP = 65536  # padded tokens per run: beyond this a GPU gains no throughput, only latency


def kv_bytes_per_token(config, dtype_bytes: int) -> int:
    """Keys and values of every layer for one token: what a prompt-reuse run (run_shared) holds for each token
    of its rows (the shared prompt's cache, expanded and extended by each row's own tokens). ≈ 57 KB in bf16
    for a Qwen2.5-7B shape (4 KV heads), ≈ 0.46 MB for a multi-head model such as Gemma-7B."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = getattr(text, "hidden_size", None) or getattr(text, "n_embd", 1024)
    heads = getattr(text, "num_attention_heads", None) or getattr(text, "n_head", 16)
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or hidden // heads
    layers = getattr(text, "num_hidden_layers", None) or getattr(text, "n_layer", 1)
    return 2 * layers * kv_heads * head_dim * dtype_bytes


def gpu_token_budget(free_bytes: int, config, dtype_bytes: int, max_length: int, prompt_reuse: bool = False) -> int:
    """Padded tokens per run that fit in GPU_MEMORY_SHARE of the free memory (measured after loading).

    One forward in inference mode keeps the residual stream and one layer's transients alive at a time;
    per token that is ~4·hidden (residual, normed input, attention output, Q/K/V) + 3·intermediate (gate, up,
    their product) elements, plus one row of attention scores, heads·max_length, when SDPA falls back to its
    math kernel (a padding mask rules out the flash kernel). So
        budget = GPU_MEMORY_SHARE · free / (dtype_bytes · (4·hidden + 3·intermediate + heads·max_length)),
    clamped to [max_length, GPU_TOKEN_BUDGET_CAP] (one longest item must always fit a run). A plain forward
    keeps no keys/values (use_cache=False); where prompt reuse runs (`prompt_reuse`: a causal decoder) the
    same budget bounds its runs, which hold every layer's keys/values per token: kv_bytes_per_token is added."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = getattr(text, "hidden_size", None) or getattr(text, "n_embd", 1024)
    inter = getattr(text, "intermediate_size", None) or getattr(text, "n_inner", None) or 4 * hidden
    heads = getattr(text, "num_attention_heads", None) or getattr(text, "n_head", 16)
    per_token = dtype_bytes * (4 * hidden + 3 * inter + heads * max_length)
    if prompt_reuse:
        per_token += kv_bytes_per_token(config, dtype_bytes)
    budget = int(GPU_MEMORY_SHARE * free_bytes // per_token)
    return max(max_length, min(GPU_TOKEN_BUDGET_CAP, budget))


def upcast_at_use(model, torch) -> None:
    """fp32 compute over bf16/fp16 weights without an fp32 copy of the model: every low-precision parameter
    is read through a parametrization that returns it as fp32 (freed after its module's forward), and an
    embedding table is looked up in its own dtype with the rows upcast. bf16 → fp32 is exact, so the scores
    equal those of the model loaded in fp32 (tested), at the memory of the checkpoint plus one layer."""
    from torch.nn.utils import parametrize

    class Upcast(torch.nn.Module):
        def forward(self, weight):
            return weight.float()

        def right_inverse(self, weight):
            return weight

    low = (torch.bfloat16, torch.float16)
    for module in list(model.modules()):
        if type(module) is torch.nn.Embedding and module.weight.dtype in low:
            # a plain lookup: upcasting its rows is exact and skips an fp32 copy of the (large) table;
            # subclasses (Gemma's scaled embedding) compute on the rows, so they get the parametrization
            module.register_forward_hook(lambda _m, _inputs, output: output.float())
            continue
        for name, param in list(module.named_parameters(recurse=False)):
            if param.dtype in low:
                parametrize.register_parametrization(module, name, Upcast(), unsafe=True)
        for name, buffer in list(module.named_buffers(recurse=False)):
            if buffer.dtype in low:  # made in the load dtype: Gemma's embed_scale √hidden rounded to bf16
                exact = getattr(module, f"scalar_{name}", None)  # where the module keeps the exact value
                setattr(module, name, torch.tensor(exact, dtype=torch.float32, device=buffer.device)
                        if isinstance(exact, float) else buffer.float())


def torch_device(device: str, threads: int = 0):
    """The torch device a runtime runs on ("auto": CUDA where torch sees a GPU), with torch's CPU threads
    set; shared by the TorchScript and transformers runtimes."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but torch sees no GPU")
    return torch.device(device)


class TransformersRuntime(Runtime):
    name = "transformers"

    def __init__(self, bundle: Path, input_names: list[str], bundle_precision: str, pad_token_id: int,
                 max_length: int, cpu_hint, gpu_hint, device: str = "auto", fp16: bool | None = None,
                 threads: int = 0, pooling: str = "native", compute: str | None = None):
        """`pooling`: "native", the model's own head (the rightmost token that is not the pad id), or
        "last_attended", each row's last token under the attention mask (OpenRLHF's reward models).
        `compute` ("bf16", "fp16", "fp32"): what to load and compute in, instead of the device's default;
        the tests use it to run on CPU the bf16 a GPU runs, so the engine's checks of it run here too."""
        try:
            import torch
            import transformers
            from transformers import AutoModelForSequenceClassification
        except ImportError as exc:
            raise RuntimeError(f"a transformers bundle needs torch and transformers ({exc}): install them "
                               "(pip install 'rewardserve[train]'); the ONNX serving images hold neither") from None

        self.torch = torch
        self.device = torch_device(device, threads)
        stored = bundle_precision if bundle_precision in DTYPES else "fp32"
        if compute is not None:  # loaded and run in that dtype on any device (tests run a GPU's bf16 on CPU)
            self.precision = load_as = compute
        elif self.device.type == "cuda":
            self.precision = {None: stored, True: "fp16", False: "fp32"}[fp16]
            load_as = self.precision
        else:  # fp32 compute over the stored weights (upcast_at_use)
            self.precision, load_as = "fp32", stored
        dtype_arg = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
        common = dict(local_files_only=True, use_safetensors=True, trust_remote_code=False,
                      **{dtype_arg: getattr(torch, DTYPES[load_as])})
        config = json.loads((Path(bundle) / "config.json").read_text())
        head = config.get("value_head_prefix", "score")
        if head != "score":  # a value head saved under another name (OpenRLHF's older "value_head")
            common["key_mapping"] = {rf"^{re.escape(head)}\.": "score."}
        try:
            model = AutoModelForSequenceClassification.from_pretrained(bundle, attn_implementation="sdpa", **common)
        except (ValueError, ImportError) as exc:  # an architecture without SDPA support
            log.warning("SDPA attention unavailable for this architecture (%s); using eager attention", exc)
            model = AutoModelForSequenceClassification.from_pretrained(bundle, attn_implementation="eager", **common)
        if model.config.get_text_config().pad_token_id is None:
            # the importer refuses a decoder without any pad token; the bundle's id is what TextEncoder pads with
            model.config.get_text_config().pad_token_id = pad_token_id
            model.config.pad_token_id = pad_token_id
        self.weights_dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        if load_as != self.precision:
            upcast_at_use(model, torch)
        self.model = model.to(self.device).eval()
        self.input_names = list(input_names)
        self.attention = getattr(model.config, "_attn_implementation", None) or "unknown"
        self.dtype = DTYPES[self.precision]  # what computes; weights_dtype: what is held in memory
        self.provider = f"torch-{self.device.type}"
        self.gpu_name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else None
        self._max_length = max_length  # the GPU token budget is sized with it (_size_batch_hint)
        self.batch_hint = self._size_batch_hint(gpu_hint if self.device.type == "cuda" else cpu_hint)
        self.pad_token_id = model.config.get_text_config().pad_token_id
        self.pooling = pooling
        # (r - mean) / std where the checkpoint was trained to be read that way (OpenRLHF's normalize_reward)
        self.normalize = (float(config.get("mean", 0.0)), float(config.get("std", 1.0))) \
            if config.get("normalize_reward") else None
        self._forward = model.base_model if pooling == "last_attended" else model
        self._cache_arg = ("cache" if "cache" in inspect.signature(self._forward.forward).parameters
                           else "past_key_values")
        self._window = getattr(model.config.get_text_config(), "sliding_window", None)
        self._sliding = False  # set by the first shared run: a layer keeps only a window of keys/values
        self.reuses_prefix = self._causal() and self._prefix_reuse_matches()
        log.info("transformers %s on %s (%s, attention %s), batch hint %s, prompt reuse %s", type(model).__name__,
                 self.device, self.dtype, self.attention, self.batch_hint, self.reuses_prefix)

    def run(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        torch = self.torch
        with torch.inference_mode():
            feed = {name: torch.from_numpy(np.ascontiguousarray(inputs[name])).to(self.device, non_blocking=True)
                    for name in self.input_names}
            return self._rewards(feed)

    def _rewards(self, feed: dict, past=None) -> np.ndarray:
        """One forward (on a cached prefix when `past` is given) → a float32 reward per row."""
        torch = self.torch
        # a plain forward keeps no keys/values: with the config's use_cache=True every layer's would stay
        # alive for the whole batch, memory the token budget does not leave room for
        extra = {self._cache_arg: past, "use_cache": True} if past is not None else {"use_cache": False}
        if self.pooling == "last_attended":
            hidden = self._forward(**feed, **extra).last_hidden_state
            own = feed["attention_mask"][:, -hidden.shape[1]:]  # the rows' own tokens, after any cached prefix
            last = own.sum(dim=1) - 1
            reward = self.model.score(hidden[torch.arange(hidden.shape[0], device=hidden.device), last])[:, 0]
        else:
            reward = self._forward(**feed, **extra).logits[:, 0]
        reward = reward.float()
        if self.normalize is not None:
            reward = (reward - self.normalize[0]) / self.normalize[1]
        return reward.cpu().numpy().astype(np.float32).reshape(-1)

    # ---- best-of-N: the shared prompt computed once

    def run_shared(self, inputs: dict[str, np.ndarray], prefix_len: int, max_batch_tokens: int,
                   cache=None) -> np.ndarray:
        """Rewards of right-padded rows whose first `prefix_len` tokens are the same (one prompt, N responses):
        the prefix runs once, and each row's rest runs on its cached keys/values, in chunks of rows within
        `max_batch_tokens`. Equal to `run` up to float rounding, because under the causal mask the prefix's
        keys/values do not depend on what follows and positions continue from the prefix. Where that does
        not hold the rows run unshared: an encoder, a row whose pooled token (the rightmost non-pad one) lies
        inside the prefix, rows that differ inside it, a sliding-window layer shorter than the rows.

        `cache` (service/prefix_cache.PrefixCache, None: none): the prefix's keys/values are looked up there
        first (matched on the ids) and only the tokens past the hit are computed, on the hit's keys/values cut
        to its shared length (exact for the same causal reason); the prefix's keys/values are then stored
        there, so a later batch holding another sample of the same group (one row, prefix = everything
        before its reward token) skips them. The tokens computed and reused are counted there."""
        torch = self.torch
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        lengths = mask.sum(axis=1)
        prefix = min(prefix_len, int(lengths.min()) - 1)
        pooled = (lengths - 1 if self.pooling == "last_attended"
                  else ids.shape[1] - 1 - np.argmax(np.fliplr(ids != self.pad_token_id), axis=1))
        if (not self.reuses_prefix or prefix < 1 or (pooled < prefix).any()
                or not (ids[:, :prefix] == ids[:1, :prefix]).all()
                or (self._sliding and (self._window or 0) < ids.shape[1])):
            return self._run_in_chunks(inputs, max_batch_tokens)
        tensor = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(self.device)  # noqa: E731
        with torch.inference_mode():
            hit = cache.lookup(ids[0, :prefix].tolist(), prefix) if cache is not None else None
            done = hit.length if hit is not None else 0  # prefix tokens whose keys/values the cache holds
            kv = self._join_kv(hit.segments) if hit is not None else None
            if done < prefix:
                extra = {}
                if kv is not None:  # on the hit: its keys/values, and a mask over them and the new tokens
                    extra = {self._cache_arg: self._dynamic_cache(kv),
                             "attention_mask": tensor(np.ones((1, prefix), dtype=np.int64))}
                out = self._forward(input_ids=tensor(ids[:1, done:prefix]), use_cache=True, **extra)
                computed = getattr(out, "cache", None) or out.past_key_values  # transformers ≥ 5.2x: `cache`
                self._sliding = any(getattr(layer, "is_sliding", False) for layer in computed.layers)
                if self._sliding and (self._window or 0) < ids.shape[1]:
                    return self._run_in_chunks(inputs, max_batch_tokens)
                kv = [(layer.keys, layer.values) for layer in computed.layers]
                if cache is not None:  # the new tokens' keys/values (after a hit: copied out of the joined run)
                    new = kv if done == 0 else self.slice_kv(kv, done, prefix)
                    nbytes = sum(t.nelement() * t.element_size() for pair in new for t in pair)
                    cache.store(ids[0, :prefix].tolist(), new, nbytes, start=done)
            rows = max(1, max_batch_tokens // int(lengths.max()))
            scores = []
            for start in range(0, len(ids), rows):
                chunk = slice(start, start + rows)
                n, width = len(ids[chunk]), int(lengths[chunk].max())
                past = self._dynamic_cache([(k.expand(n, -1, -1, -1), v.expand(n, -1, -1, -1)) for k, v in kv])
                scores.append(self._rewards({"input_ids": tensor(ids[chunk, prefix:width]),
                                             "attention_mask": tensor(mask[chunk, :width])}, past))
        if cache is not None:
            cache.record(computed=prefix - done, reused=done + prefix * (len(ids) - 1))
        return np.concatenate(scores).astype(np.float32)

    @staticmethod
    def slice_kv(kv, start: int, end: int):
        """Positions start..end of per-layer (keys, values), as tensors of their own (the prefix cache's
        `slice_state`: a view would keep the whole tensor it was cut from alive)."""
        return [(k[:, :, start:end].clone(), v[:, :, start:end].clone()) for k, v in kv]

    def _join_kv(self, segments):
        """The keys/values of a prefix cache hit: its nodes' (state, tokens used), root first, joined along
        the positions."""
        torch = self.torch
        parts = [[(k[:, :, :used], v[:, :, :used]) for k, v in state] for state, used in segments]
        if len(parts) == 1:
            return parts[0]
        return [(torch.cat([p[i][0] for p in parts], dim=2), torch.cat([p[i][1] for p in parts], dim=2))
                for i in range(len(parts[0]))]

    def reserve_prefix_cache(self, tokens: int) -> int:
        """Take the prefix cache's memory (`tokens` × kv_bytes_per_token) out of what the GPU token budget is
        sized from, so the cache and the largest run fit together; returns the bytes reserved. On CPU the
        batch hint is fixed and only the bytes are returned (for the log)."""
        reserved = tokens * kv_bytes_per_token(self.model.config, self._dtype_bytes())
        self.batch_hint = self._size_batch_hint(self.batch_hint, reserved)
        log.info("prefix cache: %d tokens, up to %.3f GB of keys/values; batch hint %s", tokens, reserved / 1e9,
                 self.batch_hint)
        return reserved

    def _size_batch_hint(self, hint, reserved: int = 0):
        """`hint` with, on CUDA, its token budget sized from the device memory free now, less `reserved` bytes
        (the prefix cache's), by gpu_token_budget; on CPU `hint` as it is (fixed shapes). The one place the
        budget is sized: at load (nothing reserved) and again by reserve_prefix_cache."""
        if self.device.type != "cuda":
            return hint
        free, _ = self.torch.cuda.mem_get_info(self.device)
        budget = gpu_token_budget(max(0, free - reserved), self.model.config, self._dtype_bytes(), self._max_length,
                                  prompt_reuse=self._causal())
        return dataclasses.replace(hint, max_batch_tokens=budget)

    def _dtype_bytes(self) -> int:
        return getattr(self.torch, DTYPES[self.precision]).itemsize

    def _run_in_chunks(self, inputs: dict[str, np.ndarray], max_batch_tokens: int) -> np.ndarray:
        rows = max(1, max_batch_tokens // inputs["input_ids"].shape[1])
        n = len(inputs["input_ids"])
        return np.concatenate([self.run({k: v[s: s + rows] for k, v in inputs.items()}) for s in range(0, n, rows)])

    def _dynamic_cache(self, layers):
        from transformers import DynamicCache

        return DynamicCache(ddp_cache_data=layers)

    def _causal(self) -> bool:
        from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                            MODEL_FOR_MASKED_LM_MAPPING_NAMES)

        kind = self.model.config.model_type
        return (kind in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and kind not in MODEL_FOR_MASKED_LM_MAPPING_NAMES
                and self.input_names == ["input_ids", "attention_mask"])

    def _prefix_reuse_matches(self) -> bool:
        """Checked once at load, on random ids: prompt reuse scores like `run` (else it stays off)."""
        vocab = self.model.config.get_text_config().vocab_size
        rng = np.random.default_rng(0)
        ids = rng.integers(0, vocab, size=(3, 24))
        ids[ids == self.pad_token_id] = (self.pad_token_id + 1) % vocab
        ids[1:, :16] = ids[0, :16]
        mask = np.ones_like(ids)
        ids[2, 19:], mask[2, 19:] = self.pad_token_id, 0
        inputs = {"input_ids": ids, "attention_mask": mask}
        try:
            want = self.run(inputs)
            self.reuses_prefix = True
            got = self.run_shared(inputs, 16, 1 << 20)
        except Exception as exc:  # an architecture whose forward takes no cache this way
            log.warning("prompt reuse off: the model did not run on a cached prompt (%s)", exc)
            return False
        finally:
            self.reuses_prefix = False
        tolerance = (1e-4 if self.precision == "fp32" else 5e-2) * max(1.0, float(np.max(np.abs(want))))
        if not np.all(np.isfinite(got)) or float(np.max(np.abs(got - want))) > tolerance:
            log.warning("prompt reuse off: scores on a cached prompt differ from the full forward (%s vs %s)",
                        got.tolist(), want.tolist())
            return False
        return True

    def describe(self) -> dict:
        return {"runtime": self.name, "provider": self.provider, "device": str(self.device),
                "gpu": self.gpu_name, "precision": self.precision, "dtype": self.dtype,
                "weights_dtype": self.weights_dtype,
                "attention": self.attention, "architecture": type(self.model).__name__,
                "prompt_reuse": self.reuses_prefix,
                "intra_op_threads": self.torch.get_num_threads(),
                "batch_hint": dataclasses.asdict(self.batch_hint)}
