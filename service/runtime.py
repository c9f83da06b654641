"""Runtimes: the backends behind the one small interface the service calls (load → run a padded batch →
describe), and `load_runtime`, which picks the bundle's.

`OnnxRuntime` is the default and imports no torch. `TorchScriptRuntime` imports torch lazily, only
when a TorchScript bundle is served; `TransformersRuntime` (service/torch_runtime.py) likewise. A new backend
only has to implement `Runtime`: its required members and whichever optional hooks it needs (the protocol,
with its defaults and `check_runtime`, lives in service/runtime_protocol.py and is importable from here).
"""

from __future__ import annotations

import ctypes
import logging
from dataclasses import asdict
from pathlib import Path

import numpy as np

from service.runtime_protocol import (CPU_BATCH_HINT, GPU_BATCH_HINT, REQUIRED, BatchHint, Runtime,
                                      RuntimeProtocolError, check_runtime, hint_for)

__all__ = ["BatchHint", "CPU_BATCH_HINT", "GPU_BATCH_HINT", "REQUIRED", "Runtime", "RuntimeProtocolError",
           "check_runtime", "hint_for", "OnnxRuntime", "TorchScriptRuntime", "load_runtime"]

log = logging.getLogger("rewardserve.runtime")


class OnnxRuntime(Runtime):
    """ONNX Runtime session. On CUDA it defaults to fp16 (the fp32 graph converted at load, with fp32
    inputs and outputs kept) and IO binding (inputs copied to the device once, explicitly; the output
    bound on the device and copied back after the run). Both also run on the CPU provider, which is
    how they are tested where no GPU is."""

    name = "onnxruntime"

    def __init__(self, model_path: Path, input_names: list[str], provider: str = "auto",
                 intra_op_threads: int = 0, inter_op_threads: int = 1, spinning: bool = False,
                 cuda_device: int = 0, fp16: bool | None = None, io_binding: bool | None = None,
                 precision: str = "fp32"):
        import onnxruntime as ort

        self.ort = ort
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
        on_cuda = providers[0] != "CPUExecutionProvider"
        self.fp16 = (on_cuda and precision == "fp32") if fp16 is None else fp16
        if self.fp16 and precision != "fp32":
            raise RuntimeError(f"fp16 applies to fp32 bundles; this one is {precision}")
        model = fp16_model_bytes(model_path) if self.fp16 else str(model_path)
        share_cpu_arena(ort, options)
        self.session = ort.InferenceSession(model, sess_options=options, providers=providers)
        release_freed_memory()
        # onnxruntime-gpu silently falls back to CPU when CUDA cannot start: report what really runs.
        self.provider = self.session.get_providers()[0]
        if provider == "cuda" and self.provider != "CUDAExecutionProvider":
            raise RuntimeError(f"CUDA requested but the session runs on {self.provider}")
        self.device = ("cuda", cuda_device) if self.provider == "CUDAExecutionProvider" else ("cpu", 0)
        self.io_binding = (self.device[0] == "cuda") if io_binding is None else io_binding
        self.input_names = [i.name for i in self.session.get_inputs()]
        missing = set(self.input_names) - set(input_names)
        if missing:
            raise RuntimeError(f"model expects inputs {sorted(missing)} the manifest does not provide")
        self.output_name = self.session.get_outputs()[0].name
        self.threads = intra_op_threads
        self.precision = "fp16" if self.fp16 else precision
        self.batch_hint = hint_for(GPU_BATCH_HINT if self.device[0] == "cuda" else CPU_BATCH_HINT, precision)
        log.info("onnxruntime session on %s (available: %s), %s, io binding %s", self.provider, available,
                 self.precision, self.io_binding)

    def run(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        if not self.io_binding:
            feed = {name: inputs[name] for name in self.input_names}
            return self.session.run([self.output_name], feed)[0].astype(np.float32).reshape(-1)
        kind, index = self.device
        binding = self.session.io_binding()
        for name in self.input_names:
            array = np.ascontiguousarray(inputs[name])
            binding.bind_ortvalue_input(name, self.ort.OrtValue.ortvalue_from_numpy(array, kind, index))
        binding.bind_output(self.output_name, kind, index)
        self.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[0].astype(np.float32).reshape(-1)

    def describe(self) -> dict:
        return {"runtime": self.name, "provider": self.provider, "precision": self.precision,
                "io_binding": self.io_binding, "intra_op_threads": self.threads,
                "batch_hint": asdict(self.batch_hint)}


_cpu_arena_registered = False


def share_cpu_arena(ort, options) -> None:
    """Every session of the process takes its CPU memory from one arena (ONNX Runtime's environment
    allocator). Each session's own arena keeps the peak of its largest run for good, so with several models
    in one process (a model repository, an ensemble) memory grew by one activation peak per model; one shared
    arena holds one peak (docs/benchmarks.md §13: 3 MiniLM models in one process)."""
    global _cpu_arena_registered
    if not _cpu_arena_registered:
        info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
        ort.create_and_register_allocator(info, None)
        _cpu_arena_registered = True
    options.add_session_config_entry("session.use_env_allocators", "1")


def release_freed_memory() -> None:
    """Hand the heap freed after a model load (the parsed protobuf, graph-optimisation copies) back to the
    OS: glibc keeps it otherwise, ~25 MiB per MiniLM session that a process loading several models pays for
    each. A no-op off glibc."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def fp16_model_bytes(model_path: Path) -> bytes:
    """The fp32 graph with fp16 weights and compute, fp32 inputs/outputs kept (ORT's own converter).
    Needs the `onnx` package (the [gpu] extra installs it); the sha256-verified fp32 file stays the
    source of truth, and the service checks the result against the bundle's recorded scores."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    return convert_float_to_float16(onnx.load(str(model_path)), keep_io_types=True).SerializeToString()


TORCHSCRIPT_CPU_ONLY = ("TorchScript bundles run on CPU in fp32 only (traced on CPU and frozen: fp16 would not "
                        "apply and the traced mask constants stay on the CPU); for a GPU export ONNX "
                        "(`rewardserve export CKPT --format onnx`) or serve a transformers bundle")


class TorchScriptRuntime(Runtime):
    """A TorchScript bundle, on CPU. The exporter traces it on CPU and freezes it: `.half()` is a no-op on a
    frozen module (it would report fp16 while computing fp32), and tensors created inside forward during
    tracing (the mask's aranges) keep device=cpu, so a CUDA run fails with mixed devices. Rather than serve
    a wrong precision label or fail at warm-up on the GPU, CUDA and fp16 are refused in one line; "auto"
    means CPU here."""

    name = "torchscript"

    def __init__(self, model_path: Path, input_names: list[str], device: str = "auto", fp16: bool | None = None,
                 threads: int = 0):
        import torch

        from service.torch_runtime import torch_device

        if device == "cuda" or fp16:
            raise RuntimeError(TORCHSCRIPT_CPU_ONLY)
        self.torch = torch
        self.device = torch_device("cpu", threads)
        self.fp16 = False
        # Only ever called on a bundle whose sha256 manifest was verified first (service.bundle.open_bundle).
        self.module = torch.jit.load(str(model_path), map_location=self.device).eval()
        self.input_names = input_names
        self.precision = "fp32"
        self.provider = "torch-cpu"
        self.batch_hint = CPU_BATCH_HINT

    def run(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        torch = self.torch
        with torch.inference_mode():
            args = [torch.from_numpy(inputs[name]).to(self.device) for name in self.input_names]
            return self.module(*args).float().cpu().numpy().astype(np.float32).reshape(-1)

    def describe(self) -> dict:
        return {"runtime": self.name, "provider": self.provider, "precision": self.precision,
                "batch_hint": asdict(self.batch_hint)}


def load_runtime(bundle: Path, manifest, provider: str = "auto", intra_op_threads: int = 0,
                 spinning: bool = False, fp16: bool | None = None, io_binding: bool | None = None) -> Runtime:
    """`fp16` / `io_binding`: None = on where they pay (CUDA), off on CPU."""
    path = Path(bundle) / manifest.model_file
    precision = getattr(manifest, "precision", "fp32")
    if manifest.model_format == "onnx":
        return OnnxRuntime(path, manifest.input_names, provider=provider, intra_op_threads=intra_op_threads,
                           spinning=spinning, fp16=fp16, io_binding=io_binding, precision=precision)
    device = {"cuda": "cuda", "cpu": "cpu"}.get(provider, "auto")
    if manifest.model_format == "transformers":  # torch + transformers, imported only here (docs/decoders.md)
        from service.torch_runtime import TransformersRuntime

        return TransformersRuntime(Path(bundle), manifest.input_names, precision, manifest.text.pad_token_id,
                                   manifest.text.max_length, CPU_BATCH_HINT, GPU_BATCH_HINT, device=device,
                                   fp16=fp16, threads=intra_op_threads,
                                   pooling=getattr(manifest, "pooling", "native"))
    return TorchScriptRuntime(path, manifest.input_names, device=device, fp16=fp16, threads=intra_op_threads)
