"""The GPU paths (issue 25), exercised on CPU: the same logic with the CPU device or a planted condition.

No GPU runs here. What a GPU would change is reproduced where it matters to the code under test:
  * a bf16 decoder served in bf16 (what CUDA runs) is a real TransformersRuntime computing bf16 on CPU
    (`compute="bf16"`), so the engine's startup check against the fp32 reference really runs;
  * device failures (out of memory, a sticky CUDA error) are raised by a wrapper around the real runtime with
    the exception type and message torch raises: the batcher and the server are under test, not the runtime.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import threading

import httpx
import numpy as np
import pytest
import torch

from service.batcher import Batcher, ModelError
from service.model_run import device_error, out_of_memory
from service.bundle import open_bundle, read_manifest, write_manifest
from service.data import demo_data_path, read_pairs
from service.parity import (PARITY_FILE, REFERENCE_FILE, check_against_recorded, needs_precision_check,
                            parity_report, reduced_precision_tolerance)
from service.runtime import CPU_BATCH_HINT, GPU_BATCH_HINT, load_runtime
from service.torch_runtime import TransformersRuntime
from tests.helpers import InProcessServer
from tests.test_decoder_import import qwen_rm


@pytest.fixture(scope="module")
def bf16_bundle(tmp_path_factory):
    """A bf16 Qwen2 RM imported on CPU with the importer's default 16 reference pairs: manifest bf16, recorded
    scores fp32 (`reference_precision`), exactly what a GPU server would check its bf16 run against."""
    from export.importer import import_checkpoint

    root = tmp_path_factory.mktemp("gpu-paths")
    bundle = import_checkpoint(qwen_rm(root / "ckpt"), root / "bundle")
    assert json.loads((bundle / PARITY_FILE).read_text())["reference_precision"] == "fp32"
    assert read_manifest(bundle).precision == "bf16"
    return bundle


def computing(bundle, precision: str) -> TransformersRuntime:
    """The bundle's real runtime, loaded and computing in `precision` on CPU."""
    m = read_manifest(bundle)
    return TransformersRuntime(bundle, m.input_names, m.precision, m.text.pad_token_id, m.text.max_length,
                               CPU_BATCH_HINT, GPU_BATCH_HINT, device="cpu", threads=1, compute=precision)


def items_of(bundle, n: int):
    _, encoder = open_bundle(bundle)
    pairs, _ = read_pairs(demo_data_path())
    return encoder, encoder.encode([p.prompt for p in pairs[:n]], [p.chosen for p in pairs[:n]])


# ---------------------------------------------------------------- 1. the bf16 startup check runs

def test_a_bf16_bundle_with_an_fp32_reference_served_in_bf16_is_checked_and_reported(bf16_bundle):
    """The manifest says bf16 and the runtime computes bf16, but the recorded scores are fp32: the startup
    check must run (it used to be skipped: precision_check null) and /v1/models must report it."""
    manifest = read_manifest(bf16_bundle)
    assert needs_precision_check(bf16_bundle, manifest, "bf16")  # bf16 run vs fp32 reference
    assert needs_precision_check(bf16_bundle, manifest, "fp32")  # fp32 run vs bf16 manifest (CPU serving)
    with InProcessServer(bf16_bundle, wrap=lambda _: computing(bf16_bundle, "bf16")) as server:
        info = httpx.get(server.url + "/v1/models", timeout=10).json()["data"][0]
        assert info["precision"] == "bf16" and info["runtime"]["precision"] == "bf16"
        assert info["runtime"]["dtype"] == "bfloat16"  # really computing bf16, not fp32 labelled bf16
        check = info["precision_check"]
        assert check is not None and check["precision"] == "bf16" and check["reference_pairs"] == 16
        assert check["threshold"] == 0.95 and check["pairwise_agreement"] >= 0.95
        assert 0 < check["max_abs_diff"] < 0.2  # bf16 rounding: not zero (a real bf16 run), not garbage


def test_a_bundle_imported_and_served_at_the_same_precision_is_not_rechecked(bf16_bundle, tmp_path):
    """The rule's other side: a reference recorded in bf16 (imported on a GPU) served in bf16 needs no check."""
    bundle = tmp_path / "bf16-ref"
    shutil.copytree(bf16_bundle, bundle)
    parity = json.loads((bundle / PARITY_FILE).read_text())
    (bundle / PARITY_FILE).write_text(json.dumps({**parity, "reference_precision": "bf16"}))
    manifest = read_manifest(bundle)
    assert not needs_precision_check(bundle, manifest, "bf16")
    assert needs_precision_check(bundle, manifest, "fp32")


# ---------------------------------------------------------------- 2. one flipped low-margin pair

def flip_one_low_margin_pair(bundle, tmp_path, bf16_scores: np.ndarray, margin: float):
    """A copy of the bundle whose recorded scores order one pair against the bf16 run, by `margin` (a pair
    that close may flip under bf16 rounding), the other pairs as recorded; checksums rewritten."""
    out = tmp_path / f"flipped-{margin:g}"
    shutil.copytree(bundle, out)
    parity = json.loads((out / PARITY_FILE).read_text())
    recorded = np.array(parity["torch_scores"])
    n = len(recorded) // 2
    k = 0
    middle = (bf16_scores[k] + bf16_scores[n + k]) / 2
    side = 1.0 if bf16_scores[k] > bf16_scores[n + k] else -1.0
    recorded[k], recorded[n + k] = middle - side * margin / 2, middle + side * margin / 2  # the other way round
    parity["torch_scores"] = recorded.tolist()
    (out / PARITY_FILE).write_text(json.dumps(parity))
    write_manifest(out, read_manifest(out))
    return out


def test_one_flipped_low_margin_pair_does_not_refuse_a_bf16_start(bf16_bundle, tmp_path):
    bf16 = computing(bf16_bundle, "bf16")
    encoder = open_bundle(bf16_bundle)[1]
    from service.parity import reference_items
    from service.scorer import score_with_runtime

    items, n = reference_items(bf16_bundle, encoder)
    assert n == 16
    scores = score_with_runtime(bf16, encoder, items)
    flipped = flip_one_low_margin_pair(bf16_bundle, tmp_path, scores, margin=2e-3)
    report = check_against_recorded(flipped, encoder, bf16, "bf16")
    assert report.passed, report  # 15/16 = 0.9375 of plain agreement used to refuse it
    with InProcessServer(flipped, wrap=lambda _: bf16) as server:  # and the server starts on it
        check = httpx.get(server.url + "/v1/models", timeout=10).json()["data"][0]["precision_check"]
        assert check["precision"] == "bf16" and check["pairwise_agreement"] >= check["threshold"]
    # a decisive pair (margin far beyond the rounding) ordered the other way is still a failure
    decisive = flip_one_low_margin_pair(bf16_bundle, tmp_path, scores,
                                        margin=8 * reduced_precision_tolerance(scores))
    report = check_against_recorded(decisive, encoder, bf16, "bf16")
    assert not report.passed and report.pairwise_agreement == 15 / 16


def test_the_agreement_rule_counts_pairs_within_the_rounding_as_agreeing():
    """parity_report on numbers: 16 pairs, margins 1.0 except pair 0 (0.01); bf16 scores that flip pair 0."""
    reference = np.concatenate([np.full(16, 1.0), np.zeros(16)])
    reference[16] = 0.99  # pair 0: margin 0.01, within 2 x 5e-2
    run = reference + 0.02
    run[16] = 1.03  # pair 0 flipped by rounding-sized moves
    assert parity_report(reference, run, 16, "bf16").passed
    assert parity_report(reference, run, 16, "fp32-of-bf16").passed
    run[1] = -0.5  # pair 1 (margin 1.0) flipped: a real disagreement
    report = parity_report(reference, run, 16, "bf16")
    assert not report.passed and report.pairwise_agreement == 15 / 16
    # int8 keeps its plain agreement (its thresholds were measured that way)
    assert parity_report(reference, reference + 0.0, 16, "int8-static").passed


# ---------------------------------------------------------------- 3. no KV cache in a plain forward

def test_the_plain_forward_holds_no_kv_cache_and_prompt_reuse_still_does(bf16_bundle):
    runtime = load_runtime(bf16_bundle, read_manifest(bf16_bundle), provider="cpu", intra_op_threads=1)
    assert runtime.model.config.use_cache  # the checkpoint's config asks for a cache
    seen = []
    handle = runtime.model.register_forward_hook(lambda _m, _i, out: seen.append(out.past_key_values))
    try:
        encoder, items = items_of(bf16_bundle, 6)
        runtime.run(encoder.pad(items))
        assert seen == [None]  # the output holds no keys/values
        # the shared-prompt path still builds the one cache it uses (the prompt's)
        rows = encoder.encode_shared_prompt("a shared prompt about cats " * 6, ["yes", "no, never", "maybe so"])
        inputs = encoder.pad(rows)
        shared = runtime.run_shared(inputs, 24, 4096)
        np.testing.assert_allclose(shared, runtime.run(inputs), atol=1e-4)
        assert any(cache is not None for cache in seen[1:])
    finally:
        handle.remove()


def test_the_gpu_token_budget_counts_prompt_reuse_keys_and_values():
    from transformers import Qwen2Config

    from service.torch_runtime import gpu_token_budget, kv_bytes_per_token

    qwen7b = Qwen2Config(hidden_size=3584, intermediate_size=18944, num_attention_heads=28, num_key_value_heads=4,
                         num_hidden_layers=28)
    assert kv_bytes_per_token(qwen7b, 2) == 2 * 28 * 4 * 128 * 2  # 57,344 B: the issue's ≈ 57 KB per token
    per_token = 2 * (4 * 3584 + 3 * 18944 + 28 * 2112)
    free = 20 * 2**30  # below the 65,536-token cap either way
    assert gpu_token_budget(free, qwen7b, 2, 2112) == int(0.5 * free // per_token)
    assert gpu_token_budget(free, qwen7b, 2, 2112, prompt_reuse=True) == int(0.5 * free // (per_token + 57344))


# ---------------------------------------------------------------- 4. TorchScript on CUDA refused in one line

def test_torchscript_is_refused_on_cuda_and_in_fp16_and_runs_fp32_on_cpu(tmp_path):
    from service.runtime import TorchScriptRuntime

    class Tiny(torch.nn.Module):
        def forward(self, input_ids, attention_mask):
            return (input_ids * attention_mask).float().sum(dim=1, keepdim=True)

    path = tmp_path / "model.pt"
    ids = torch.ones(2, 3, dtype=torch.long)
    torch.jit.freeze(torch.jit.trace(Tiny().eval(), (ids, ids))).save(str(path))
    names = ["input_ids", "attention_mask"]
    for kwargs in ({"device": "cuda"}, {"device": "cpu", "fp16": True}):
        with pytest.raises(RuntimeError) as refused:
            TorchScriptRuntime(path, names, **kwargs)
        message = str(refused.value)
        assert "CPU" in message and "onnx" in message and "transformers" in message and "\n" not in message
    runtime = TorchScriptRuntime(path, names, device="auto", threads=1)
    assert (runtime.precision, runtime.provider) == ("fp32", "torch-cpu")
    got = runtime.run({"input_ids": np.array([[1, 2, 3]]), "attention_mask": np.array([[1, 1, 0]])})
    assert got.tolist() == [3.0]


# ---------------------------------------------------------------- 5. device errors: OOM split, sticky error

class DeviceFaults:
    """The real runtime behind the Runtime interface, failing the way a GPU does when told to: torch's own
    OutOfMemoryError for runs of more than `max_rows` rows, or a sticky CUDA error once `broken` is set.
    Records the rows of every run it is asked for."""

    def __init__(self, inner, max_rows: int | None = None):
        self.inner, self.max_rows, self.broken = inner, max_rows, False
        self.name, self.provider, self.batch_hint = inner.name, inner.provider, inner.batch_hint
        self.rows: list[int] = []
        self.lock = threading.Lock()

    def run(self, inputs):
        n = len(inputs["input_ids"])
        with self.lock:
            self.rows.append(n)
        if self.broken:
            raise RuntimeError("CUDA error: an illegal memory access was encountered\nCUDA kernel errors might "
                               "be asynchronously reported at some other API call")
        if self.max_rows is not None and n > self.max_rows:
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory. Tried to allocate 2.00 GiB ({n} rows)")
        return self.inner.run(inputs)

    def describe(self):
        return self.inner.describe()

    def __getattr__(self, name):  # anything else the service asks a runtime (precision, prompt reuse): the real one's
        return getattr(self.inner, name)


def test_error_kinds_are_told_apart():
    assert out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB"))
    assert out_of_memory(RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Failed to allocate memory"))
    assert not device_error(torch.cuda.OutOfMemoryError("CUDA error: out of memory"))
    assert device_error(RuntimeError("CUDA error: device-side assert triggered"))
    assert not device_error(ValueError("input_ids: bad shape")) and not out_of_memory(ValueError("x"))


def test_an_out_of_memory_batch_of_8_is_retried_as_two_halves_with_the_unsplit_scores(bf16_bundle):
    inner = load_runtime(bf16_bundle, read_manifest(bf16_bundle), provider="cpu", intra_op_threads=1)
    encoder, items = items_of(bf16_bundle, 8)
    want = inner.run(encoder.pad(items))  # the batch of 8, unsplit
    faulty = DeviceFaults(inner, max_rows=4)

    async def through_the_queue():
        batcher = Batcher(faulty, encoder.pad, max_batch_size=8, max_batch_tokens=1 << 16, max_wait_ms=0,
                          efficient_batch_tokens=0, min_padding_efficiency=0.0)
        batcher.start()
        ticket = batcher.admit(len(items))
        got = await batcher.score(ticket, items, asyncio.get_running_loop().time() + 60)
        await batcher.drain(10)
        return got, batcher.fatal

    got, fatal = asyncio.run(through_the_queue())
    assert faulty.rows == [8, 4, 4]  # one batch of 8 failed, then its two halves ran
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    assert fatal is None  # out of memory is not a broken device

    faulty.rows.clear()
    faulty.max_rows = 2  # halves of halves: 8 → 4 → 2
    got = asyncio.run(Batcher(faulty, encoder.pad).run_direct(items))
    assert faulty.rows == [8, 4, 2, 2, 4, 2, 2]
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)

    faulty.max_rows = 0  # not even one item fits: the error is the batch's
    with pytest.raises(torch.cuda.OutOfMemoryError):
        asyncio.run(Batcher(faulty, encoder.pad).run_direct(items[:2]))


def test_a_device_error_turns_readyz_to_503_and_v1_models_says_why(bf16_bundle):
    holder = {}

    def wrap(runtime):
        holder["faults"] = DeviceFaults(runtime, max_rows=1 << 20)
        return holder["faults"]

    body = {"prompt": "What is the capital of France?", "response": "Paris."}
    with InProcessServer(bf16_bundle, wrap=wrap) as server:
        assert httpx.get(server.url + "/readyz", timeout=10).status_code == 200
        assert httpx.post(server.url + "/v1/score", json=body, timeout=30).status_code == 200
        holder["faults"].max_rows = 0  # an out-of-memory failure: this request fails, the server stays ready
        failed = httpx.post(server.url + "/v1/score", json={**body, "response": "Lyon?"}, timeout=30)
        assert failed.status_code >= 500
        assert httpx.get(server.url + "/readyz", timeout=10).status_code == 200
        holder["faults"].max_rows, holder["faults"].broken = 1 << 20, True  # a sticky CUDA error
        failed = httpx.post(server.url + "/v1/score", json={**body, "response": "Marseille."}, timeout=30)
        assert failed.status_code >= 500
        ready = httpx.get(server.url + "/readyz", timeout=10)
        assert ready.status_code == 503 and "Retry-After" in ready.headers
        assert ready.json()["error"]["type"] == "not_ready"
        assert "illegal memory access" in ready.json()["error"]["message"]
        runtime = httpx.get(server.url + "/v1/models", timeout=10).json()["data"][0]["runtime"]
        assert "illegal memory access" in runtime["fatal_error"]
        holder["faults"].broken = False  # even if a run would now succeed, the context is not trusted again
        runs = len(holder["faults"].rows)
        refused = httpx.post(server.url + "/v1/score", json={**body, "response": "Nice."}, timeout=30)
        assert refused.status_code == 503 and refused.json()["error"]["type"] == "not_ready"
        assert len(holder["faults"].rows) == runs  # refused at the door, nothing ran
        assert httpx.get(server.url + "/readyz", timeout=10).status_code == 503


# ---------------------------------------------------------------- 6. bench/gpu_check.py: quick, and phase failures

def run_gpu_check(tmp_path, *flags: str):
    import subprocess
    import sys

    from tests.helpers import REPO

    out = tmp_path / "gpu_check.json"
    r = subprocess.run([sys.executable, "bench/gpu_check.py", "--smoke", *flags, "--out", str(out),
                        "--workdir", str(tmp_path / "work")], cwd=REPO, capture_output=True, text=True, timeout=600)
    return r, json.loads(out.read_text())


def test_gpu_check_quick_smoke_measures_the_three_target_ratios(tmp_path):
    r, report = run_gpu_check(tmp_path, "--quick")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    [model] = report["models"]
    assert report["quick"] and all(p["ok"] for p in model["phases"].values())
    assert list(model["phases"]) == ["checkpoint", "import", "ceiling", "rewardserve", "naive", "ratios"]
    assert set(model["ratios"]) == {"rewardserve/naive c=64", "rewardserve c=64 / ceiling",
                                    "rewardserve p50 c=1 / one forward p50"}
    assert "best_of_n" not in model["ceiling"] and set(model["ceiling"]["by_batch_size"]) == {"1", "16", "64"}
    assert set(model["naive"]) >= {"64", "startup_s"} and "1" not in model["naive"]  # naive at 64 only
    assert model["rewardserve"]["1"]["items_per_s"] > 0 and model["max_abs_diff_vs_naive"] <= 1e-3
    assert not [p for p in (tmp_path / "work").iterdir() if p.is_dir()]  # checkpoint and bundle removed (logs kept)


def test_a_failure_planted_in_one_phase_keeps_the_json_of_the_others(tmp_path):
    """rewardserve's phase fails (planted): what came before it is in the JSON, the naive server (which does
    not need it) is still measured, the ratios (which do) are skipped, and the run exits 1."""
    r, report = run_gpu_check(tmp_path, "--quick", "--fail-phase", "rewardserve")
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]
    [model] = report["models"]
    phases = model["phases"]
    assert all(phases[p]["ok"] for p in ("checkpoint", "import", "ceiling", "naive"))
    assert phases["rewardserve"] == {"ok": False, "s": phases["rewardserve"]["s"],
                                     "error": "RuntimeError: planted failure in phase rewardserve (--fail-phase)"}
    assert phases["ratios"] == {"ok": False, "skipped": "needs rewardserve"}
    assert model["failed_phases"] == ["rewardserve"] and report["planted_failure"] == "rewardserve"
    assert model["ceiling"]["items_per_s"] > 0 and model["import_s"] > 0 and model["naive"]["64"]["measured"] >= 0
    assert "ratios" not in model and "phase rewardserve failed" in r.stdout


def test_the_import_can_hard_link_the_weights_and_the_bundle_still_verifies(tmp_path):
    import os

    from export.importer import import_checkpoint
    from service.bundle import checksum_problems

    ckpt = qwen_rm(tmp_path / "ckpt")
    bundle = import_checkpoint(ckpt, tmp_path / "bundle", reference_pairs=2, link=True)
    shards = sorted(p.name for p in ckpt.glob("*.safetensors"))
    assert shards and all(os.path.samefile(ckpt / s, bundle / s) for s in shards)  # written once
    assert not os.path.samefile(ckpt / "config.json", bundle / "config.json")  # the rest copied
    assert checksum_problems(bundle, read_manifest(bundle)) == []


def test_gpu_check_bf16_check_phase_judges_a_bf16_run_against_fp32_by_the_servers_rule(bf16_bundle, tmp_path):
    """The phase that measures, on the GPU, what the fixed startup check decides (bf16 served vs an fp32
    reference), run here on CPU with real fp32 and bf16 runs of the bundle."""
    import argparse

    from bench.gpu_check import SizeRun, phase_bf16_check

    work = tmp_path / "work"
    shutil.copytree(bf16_bundle, work / "bundle-tiny")
    args = argparse.Namespace(smoke=True, quick=False, duration=None)
    run = SizeRun("tiny", work, args, report={}, save=lambda: None)
    phase_bf16_check(run)
    check = run.report["bf16_check"]
    assert check["reference_pairs"] == 16 and check["threshold"] == 0.95 and check["passed"]
    assert 0 < check["max_abs_diff"] < 0.2 and "within" in check["note"]  # a real bf16 run, judged by margins
