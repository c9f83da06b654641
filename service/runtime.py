"""Runtimes: the one small interface the batcher calls (load → run a padded batch → describe).

`OnnxRuntime` is the default and imports no torch. `TorchScriptRuntime` imports torch lazily, only
when a TorchScript bundle is served. A new backend only has to implement `Runtime`.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

log = logging.getLogger("rewardserve.runtime")


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


CPU_BATCH_HINT = BatchHint(max_batch_tokens=512, min_padding_efficiency=0.9)
GPU_BATCH_HINT = BatchHint(max_batch_tokens=None, min_padding_efficiency=0.0)


class Runtime(Protocol):
    name: str
    provider: str
    batch_hint: BatchHint

    def run(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        """Padded int64 arrays (input_ids, attention_mask[, token_type_ids]) → float32 rewards [batch]."""

    def describe(self) -> dict:
        """What really runs (runtime, provider, threads), for /v1/models and the logs."""


class OnnxRuntime:
    name = "onnxruntime"

    def __init__(self, model_path: Path, input_names: list[str], provider: str = "auto",
                 intra_op_threads: int = 0, inter_op_threads: int = 1, spinning: bool = False,
                 cuda_device: int = 0):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = inter_op_threads
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        # Spinning threads burn the cores the HTTP side needs between batches; the batcher keeps the
        # runtime busy on its own, so spinning buys nothing here.
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "1" if spinning else "0")
        available = ort.get_available_providers()
        if provider == "cuda" and "CUDAExecutionProvider" not in available:
            raise RuntimeError(f"provider 'cuda' requested but onnxruntime offers only {available}")
        providers: list = ["CPUExecutionProvider"]
        if provider in ("cuda", "auto") and "CUDAExecutionProvider" in available:
            providers = [("CUDAExecutionProvider", {"device_id": cuda_device}), "CPUExecutionProvider"]
        self.session = ort.InferenceSession(str(model_path), sess_options=options, providers=providers)
        # onnxruntime-gpu silently falls back to CPU when CUDA cannot start: report what really runs.
        self.provider = self.session.get_providers()[0]
        if provider == "cuda" and self.provider != "CUDAExecutionProvider":
            raise RuntimeError(f"CUDA requested but the session runs on {self.provider}")
        self.input_names = [i.name for i in self.session.get_inputs()]
        missing = set(self.input_names) - set(input_names)
        if missing:
            raise RuntimeError(f"model expects inputs {sorted(missing)} the manifest does not provide")
        self.output_name = self.session.get_outputs()[0].name
        self.threads = intra_op_threads
        self.batch_hint = GPU_BATCH_HINT if self.provider == "CUDAExecutionProvider" else CPU_BATCH_HINT
        log.info("onnxruntime session on %s (available: %s)", self.provider, available)

    def run(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        feed = {name: inputs[name] for name in self.input_names}
        return self.session.run([self.output_name], feed)[0].astype(np.float32).reshape(-1)

    def describe(self) -> dict:
        return {"runtime": self.name, "provider": self.provider, "intra_op_threads": self.threads,
                "batch_hint": asdict(self.batch_hint)}


class TorchScriptRuntime:
    name = "torchscript"

    def __init__(self, model_path: Path, input_names: list[str], device: str = "auto", fp16: bool | None = None,
                 threads: int = 0):
        import torch

        if threads:
            torch.set_num_threads(threads)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("device 'cuda' requested but torch sees no GPU")
        self.torch = torch
        self.device = torch.device(device)
        self.fp16 = (device == "cuda") if fp16 is None else fp16
        # Only ever called on a bundle whose sha256 manifest was verified first (service.bundle.open_bundle).
        self.module = torch.jit.load(str(model_path), map_location=self.device).eval()
        if self.fp16:
            self.module = self.module.half()
        self.input_names = input_names
        self.provider = f"torch-{self.device.type}" + ("-fp16" if self.fp16 else "")
        self.batch_hint = GPU_BATCH_HINT if self.device.type == "cuda" else CPU_BATCH_HINT

    def run(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        torch = self.torch
        with torch.inference_mode():
            args = [torch.from_numpy(inputs[name]).to(self.device) for name in self.input_names]
            return self.module(*args).float().cpu().numpy().astype(np.float32).reshape(-1)

    def describe(self) -> dict:
        return {"runtime": self.name, "provider": self.provider, "fp16": self.fp16,
                "batch_hint": asdict(self.batch_hint)}


def load_runtime(bundle: Path, manifest, provider: str = "auto", intra_op_threads: int = 0,
                 spinning: bool = False) -> Runtime:
    path = Path(bundle) / manifest.model_file
    if manifest.model_format == "onnx":
        return OnnxRuntime(path, manifest.input_names, provider=provider, intra_op_threads=intra_op_threads,
                           spinning=spinning)
    device = {"cuda": "cuda", "cpu": "cpu"}.get(provider, "auto")
    return TorchScriptRuntime(path, manifest.input_names, device=device, threads=intra_op_threads)
