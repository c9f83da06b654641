"""`TransformersRuntime`: a `model_format: "transformers"` bundle (a Hugging Face *ForSequenceClassification
checkpoint's own safetensors shards) run eagerly by transformers with PyTorch SDPA attention.

torch and transformers are imported when such a bundle is loaded, never by the ONNX path. This module
imports nothing from the service: load_runtime (service/runtime.py) hands it the batch hints, so the
runtime module and this one do not import each other.

What runs: on CUDA the checkpoint's own dtype (bf16/fp16; `fp16=True` forces fp16, `fp16=False` fp32); on
CPU fp32 (CPU bf16 matmuls are slow on most CPUs and the bf16 weights upcast exactly). `precision` says
which, so the engine's startup check runs whenever that differs from the bundle's (service/parity.py).

Pooling is the model's own: the HF head reads the rightmost token that is not `pad_token_id`, so the
right-padded batches of TextEncoder.pad (padded with the same id) score like each item alone; under a
causal mask real tokens never attend to the pads behind them, and positions count from 0 either way.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np

log = logging.getLogger("rewardserve.runtime")

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
GPU_MEMORY_SHARE = 0.5      # of the memory free after loading, what one run's activations may take
GPU_TOKEN_BUDGET_CAP = 65536  # padded tokens per run: beyond this a GPU gains no throughput, only latency


def gpu_token_budget(free_bytes: int, config, dtype_bytes: int, max_length: int) -> int:
    """Padded tokens per run that fit in GPU_MEMORY_SHARE of the free memory (measured after loading).

    One forward in inference mode keeps the residual stream and one layer's transients alive at a time;
    per token that is ~4·hidden (residual, normed input, attention output, Q/K/V) + 3·intermediate (gate, up,
    their product) elements, plus one row of attention scores, heads·max_length, when SDPA falls back to its
    math kernel (a padding mask rules out the flash kernel). So
        budget = GPU_MEMORY_SHARE · free / (dtype_bytes · (4·hidden + 3·intermediate + heads·max_length)),
    clamped to [max_length, GPU_TOKEN_BUDGET_CAP] (one longest item must always fit a run)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = getattr(text, "hidden_size", None) or getattr(text, "n_embd", 1024)
    inter = getattr(text, "intermediate_size", None) or getattr(text, "n_inner", None) or 4 * hidden
    heads = getattr(text, "num_attention_heads", None) or getattr(text, "n_head", 16)
    per_token = dtype_bytes * (4 * hidden + 3 * inter + heads * max_length)
    budget = int(GPU_MEMORY_SHARE * free_bytes // per_token)
    return max(max_length, min(GPU_TOKEN_BUDGET_CAP, budget))


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


class TransformersRuntime:
    name = "transformers"

    def __init__(self, bundle: Path, input_names: list[str], bundle_precision: str, pad_token_id: int,
                 max_length: int, cpu_hint, gpu_hint, device: str = "auto", fp16: bool | None = None,
                 threads: int = 0):
        try:
            import torch
            import transformers
            from transformers import AutoModelForSequenceClassification
        except ImportError as exc:
            raise RuntimeError(f"a transformers bundle needs torch and transformers ({exc}): install them "
                               "(pip install 'rewardserve[train]'); the ONNX serving images hold neither") from None

        self.torch = torch
        self.device = torch_device(device, threads)
        if self.device.type == "cuda":
            self.precision = {None: bundle_precision if bundle_precision in DTYPES else "fp32",
                              True: "fp16", False: "fp32"}[fp16]
        else:
            self.precision = "fp32"
        dtype = getattr(torch, DTYPES[self.precision])
        dtype_arg = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
        common = dict(local_files_only=True, use_safetensors=True, trust_remote_code=False, **{dtype_arg: dtype})
        try:
            model = AutoModelForSequenceClassification.from_pretrained(bundle, attn_implementation="sdpa", **common)
        except (ValueError, ImportError) as exc:  # an architecture without SDPA support
            log.warning("SDPA attention unavailable for this architecture (%s); using eager attention", exc)
            model = AutoModelForSequenceClassification.from_pretrained(bundle, attn_implementation="eager", **common)
        if model.config.get_text_config().pad_token_id is None:
            # the importer refuses a decoder without any pad token; the bundle's id is what TextEncoder pads with
            model.config.get_text_config().pad_token_id = pad_token_id
            model.config.pad_token_id = pad_token_id
        self.model = model.to(self.device).eval()
        self.input_names = list(input_names)
        self.attention = getattr(model.config, "_attn_implementation", None) or "unknown"
        self.dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        self.provider = f"torch-{self.device.type}"
        self.gpu_name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else None
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            budget = gpu_token_budget(free, model.config, dtype.itemsize, max_length)
            self.batch_hint = dataclasses.replace(gpu_hint, max_batch_tokens=budget)
        else:
            self.batch_hint = cpu_hint
        log.info("transformers %s on %s (%s, attention %s), batch hint %s", type(model).__name__, self.device,
                 self.dtype, self.attention, self.batch_hint)

    def run(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        torch = self.torch
        with torch.inference_mode():
            feed = {name: torch.from_numpy(np.ascontiguousarray(inputs[name])).to(self.device, non_blocking=True)
                    for name in self.input_names}
            logits = self.model(**feed).logits
            return logits[:, 0].float().cpu().numpy().astype(np.float32).reshape(-1)

    def describe(self) -> dict:
        return {"runtime": self.name, "provider": self.provider, "device": str(self.device),
                "gpu": self.gpu_name, "precision": self.precision, "dtype": self.dtype,
                "attention": self.attention, "architecture": type(self.model).__name__,
                "intra_op_threads": self.torch.get_num_threads(),
                "batch_hint": dataclasses.asdict(self.batch_hint)}
