"""The GPU path's two pieces, exercised on the CPU provider (same code, other device): IO binding and
fp16 with its startup check against the bundle's recorded PyTorch scores."""

from __future__ import annotations

import json
import shutil

import httpx
import numpy as np
import pytest

from service.bundle import open_bundle, read_manifest, write_manifest
from service.parity import check_against_recorded, reference_items
from service.scorer import score_with_runtime
from service.runtime import OnnxRuntime, load_runtime

# fp16 vs fp32 on the tiny bundle's 60 reference items: max |diff| measured 6.4e-4 (scores within ±0.58);
# a few times that, so a real error (a wrong op, a lost input) fails instead of hiding under 0.02.
FP16_TOL = 3e-3


@pytest.fixture(scope="module")
def reference(bundle):
    manifest, encoder = open_bundle(bundle)
    items, n = reference_items(bundle, encoder)
    fp32 = load_runtime(bundle, manifest, provider="cpu", intra_op_threads=1)
    return manifest, encoder, items, score_with_runtime(fp32, encoder, items)


def test_defaults_on_cpu_are_fp32_without_io_binding(bundle, reference):
    manifest, _, _, _ = reference
    runtime = load_runtime(bundle, manifest, provider="cpu", intra_op_threads=1)
    described = runtime.describe()
    assert (described["provider"], described["precision"], described["io_binding"]) == (
        "CPUExecutionProvider", "fp32", False)


def test_io_binding_gives_the_same_scores_as_session_run(bundle, reference):
    manifest, encoder, items, fp32 = reference
    bound = load_runtime(bundle, manifest, provider="cpu", intra_op_threads=1, io_binding=True)
    assert bound.describe()["io_binding"] is True
    assert np.max(np.abs(score_with_runtime(bound, encoder, items) - fp32)) <= 1e-6


def test_fp16_scores_stay_close_to_fp32_and_pass_the_recorded_check(bundle, reference):
    manifest, encoder, items, fp32 = reference
    half = load_runtime(bundle, manifest, provider="cpu", intra_op_threads=1, fp16=True)
    assert half.describe()["precision"] == "fp16"
    scores = score_with_runtime(half, encoder, items)
    diff = np.max(np.abs(scores - fp32))
    assert 0 < diff <= FP16_TOL * max(1.0, float(np.max(np.abs(fp32)))), diff  # really fp16 (not fp32), and close
    report = check_against_recorded(bundle, encoder, half, "fp16")
    assert report.passed and report.pairwise_agreement >= 0.99 and report.reference_pairs == len(items) // 2


def test_fp16_is_refused_for_an_already_quantized_bundle(bundle):
    manifest = read_manifest(bundle)
    with pytest.raises(RuntimeError, match="fp16 applies to fp32 bundles"):
        OnnxRuntime(bundle / manifest.model_file, manifest.input_names, provider="cpu", fp16=True,
                    precision="int8-static")


def test_server_in_fp16_reports_its_startup_check(start_server, bundle, reference):
    server = start_server(fp16=True, ort_io_binding=True)
    info = httpx.get(server.url + "/v1/models", timeout=10).json()["data"][0]
    assert info["precision"] == "fp32"  # the bundle's
    assert info["runtime"]["precision"] == "fp16" and info["runtime"]["io_binding"] is True
    check = info["precision_check"]
    assert check["precision"] == "fp16" and check["pairwise_agreement"] >= check["threshold"] == 0.99
    assert 0 < check["max_abs_diff"] <= FP16_TOL, check
    default = httpx.get(start_server().url + "/v1/models", timeout=10).json()["data"][0]
    assert default["precision_check"] is None and default["runtime"]["precision"] == "fp32"


def test_server_refuses_fp16_when_it_disagrees_with_the_recorded_scores(start_server, bundle, tmp_path):
    """Recorded PyTorch scores with chosen and rejected swapped (re-hashed, so the checksums pass):
    fp16 ordering disagrees on most pairs and the service must not start; fp32 needs no check."""
    broken = tmp_path / "swapped"
    shutil.copytree(bundle, broken)
    recorded = json.loads((broken / "parity_reference.json").read_text())
    n = len(recorded["torch_scores"]) // 2
    recorded["torch_scores"] = recorded["torch_scores"][n:] + recorded["torch_scores"][:n]
    (broken / "parity_reference.json").write_text(json.dumps(recorded))
    write_manifest(broken, read_manifest(broken))
    server = start_server(bundle_dir=broken, wait_ready=False, fp16=True)
    assert server.proc.wait(60) != 0
    assert "fp16 disagrees with the bundle's recorded scores" in server.output()
