"""The model registry over real HTTP (issue 26): a repository served by one `rewardserve serve --repository`
process, with real bundles (copies of the session's trained tiny bundle, and re-exports of it whose ONNX
graph adds a known constant to the reward, so versions answer differently and provably from their own
model): canary traffic proportions, shadow disagreement metrics, bad entries reported without taking the
others down, the `model` field (required with several models, 404 naming the served ones), the repository
poll, and /admin/reload refused without keys.

Also the helpers the hot-swap tests share (tests/test_hot_swap.py): `shifted_bundle`, `start_repository`.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

from tests.helpers import ServerProcess, launch_serve, metric

READY_TIMEOUT_S = 120.0
SHIFT = 0.75  # what a shifted re-export adds to every raw reward
PROMPT, RESPONSE = "What is the capital of France?", "Paris is the capital of France."


# ---------------------------------------------------------------- helpers (shared with test_hot_swap.py)

def shifted_bundle(bundle: Path, out: Path, shift: float) -> Path:
    """A re-export of `bundle` whose ONNX graph adds `shift` to the reward output (a real, different model:
    same tokenizer, raw' = raw + shift), with the manifest's checksums recomputed as the exporter does."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    from service.bundle import read_manifest, write_manifest

    shutil.copytree(bundle, out)
    manifest = read_manifest(out)
    path = out / manifest.model_file
    model = onnx.load(str(path))
    graph = model.graph
    output = graph.output[0].name
    for node in graph.node:
        node.output[:] = [f"{output}_unshifted" if name == output else name for name in node.output]
    graph.initializer.append(numpy_helper.from_array(np.array(shift, dtype=np.float32), f"{output}_shift"))
    graph.node.append(helper.make_node("Add", [f"{output}_unshifted", f"{output}_shift"], [output]))
    onnx.save(model, str(path))
    write_manifest(out, manifest)
    return out


def copy_version(bundle: Path, target: Path) -> Path:
    shutil.copytree(bundle, target)
    return target


def start_repository(repo: Path, logs: Path, env_extra: dict | None = None, wait_ready: bool = True,
                     **settings) -> ServerProcess:
    """`rewardserve serve --repository repo` on a free 127.0.0.1 port (settings as CLI flags)."""
    options = {"intra_op_threads": 1, "tokenizer_threads": 1, "log_level": "warning", **settings}
    env = {k: v for k, v in os.environ.items() if not k.startswith("REWARDSERVE_")} | (env_extra or {})
    return launch_serve(["--repository", str(repo)], logs, options, env, wait_ready, READY_TIMEOUT_S)


def models_by_id(url: str, headers: dict | None = None) -> dict[str, dict]:
    r = httpx.get(url + "/v1/models", headers=headers, timeout=10)
    assert r.status_code == 200, r.text
    return {m["id"]: m for m in r.json()["data"]}


def versions_of(entry: dict) -> dict[str, dict]:
    return {v["version"]: v for v in entry.get("versions") or []}


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    pytest.fail(f"timed out after {timeout} s waiting for {what}")


# ---------------------------------------------------------------- one repository, one server

CANARY = {"1": 0.7, "2": 0.3}


@pytest.fixture(scope="module")
def repo(bundle, tmp_path_factory) -> Path:
    """canary: v1 and v2 (shifted) split 70/30; shadowed: v2 (shifted) served, v1 scoring in the shadow;
    and the bad entries of the issue, each of which must be reported while the rest serves."""
    root = tmp_path_factory.mktemp("repository")
    shifted = shifted_bundle(bundle, tmp_path_factory.mktemp("shifted") / "b", SHIFT)
    for name in ("canary", "shadowed"):
        copy_version(bundle, root / name / "1")
        copy_version(shifted, root / name / "2")
    (root / "canary" / "config.json").write_text(json.dumps({"traffic": CANARY}))
    (root / "shadowed" / "config.json").write_text(json.dumps({"shadow": "1"}))
    # bad entries
    copy_version(bundle, root / "badsplit" / "1")
    (root / "badsplit" / "config.json").write_text(json.dumps({"traffic": {"1": 0.5}}))
    copy_version(bundle, root / "tampered" / "1")
    manifest = json.loads((root / "tampered" / "1" / "manifest.json").read_text())
    manifest["files"]["tokenizer.json"] = "0" * 64
    (root / "tampered" / "1" / "manifest.json").write_text(json.dumps(manifest))
    (root / "notabundle" / "v2").mkdir(parents=True)
    (root / "lonely").mkdir()
    (root / "ghosts").mkdir()
    (root / "ghosts" / "ensemble.json").write_text(json.dumps({"members": ["canary", "nobody"], "aggregate": "mean"}))
    return root


@pytest.fixture(scope="module")
def served(repo, tmp_path_factory) -> ServerProcess:
    server = start_repository(repo, tmp_path_factory.mktemp("logs"), repository_poll_s=0.5)
    yield server
    server.stop(timeout=20.0)


def score(url: str, model: str | None, prompt: str = PROMPT, response: str = RESPONSE) -> httpx.Response:
    body = {"prompt": prompt, "response": response} | ({"model": model} if model else {})
    return httpx.post(url + "/v1/score", json=body, timeout=30)


def test_every_entry_is_listed_with_its_state_and_the_good_ones_serve(served):
    models = models_by_id(served.url)
    assert models["canary"]["state"] == "ready" and models["canary"]["traffic"] == CANARY
    assert {v: s["state"] for v, s in versions_of(models["canary"]).items()} == {"1": "ready", "2": "ready"}
    assert models["shadowed"]["version"] == "2" and models["shadowed"]["shadow"] == "1"
    assert versions_of(models["shadowed"])["1"]["shadow"] is True
    failed = {name: models[name] for name in ("badsplit", "tampered", "notabundle", "lonely", "ghosts")}
    for name, entry in failed.items():
        assert entry["state"] == "failed", (name, entry)
        assert entry["reason"] and "\n" not in entry["reason"], (name, entry)
    assert "sum to 1" in failed["badsplit"]["reason"]
    assert "tokenizer.json" in failed["tampered"]["reason"] and "sha256" in failed["tampered"]["reason"]
    assert versions_of(failed["tampered"])["1"]["state"] == "failed"
    assert "positive integer" in failed["notabundle"]["reason"]
    assert versions_of(failed["notabundle"])["v2"]["state"] == "failed"
    assert "not a model" in failed["lonely"]["reason"]
    assert "nobody" in failed["ghosts"]["reason"]
    r = score(served.url, "shadowed")
    assert r.status_code == 200 and r.json()["model"] == "shadowed" and r.json()["version"] == "2"


def test_the_model_field_is_required_with_several_models_and_checked(served):
    r = score(served.url, None)
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["field"] == "model" and "canary" in error["message"] and "shadowed" in error["message"]
    r = score(served.url, "nope")
    assert r.status_code == 404, r.text
    error = r.json()["error"]
    assert error["type"] == "model_not_found" and error["field"] == "model"
    assert "'nope'" in error["message"] and "canary, shadowed" in error["message"]
    r = score(served.url, "tampered")  # in the repository, not served: the 404 says why
    assert r.status_code == 404 and "sha256" in r.json()["error"]["message"], r.text


def test_canary_traffic_follows_the_split_and_each_version_answers_from_its_own_model(served):
    n = 400
    answers = [score(served.url, "canary") for _ in range(n)]
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers if a.status_code != 200][:3]
    by_version = Counter(a.json()["version"] for a in answers)
    assert set(by_version) == {"1", "2"}
    p = CANARY["2"]
    tolerance = 4 * math.sqrt(n * p * (1 - p))  # 4 sigma of the binomial count
    assert abs(by_version["2"] - n * p) <= tolerance, by_version
    raw = {a.json()["version"]: a.json()["raw"] for a in answers}
    assert raw["2"] - raw["1"] == pytest.approx(SHIFT, abs=1e-4)  # v2 is the shifted model, never v1's cache
    text = httpx.get(served.url + "/metrics").text
    routed = {v: metric(text, "rewardserve_routed_requests_total", model="canary", version=v) for v in "12"}
    assert routed == {v: float(by_version[v]) for v in "12"}


def test_shadow_scores_every_request_in_the_background_and_records_the_disagreement(served):
    before = httpx.get(served.url + "/metrics").text
    count0 = metric(before, "rewardserve_shadow_abs_diff_count", model="shadowed")
    pairs0 = metric(before, "rewardserve_shadow_pairs_total", model="shadowed")
    answers = [score(served.url, "shadowed", response=f"answer number {i}") for i in range(10)]
    compare = httpx.post(served.url + "/v1/compare", json={"model": "shadowed", "prompt": PROMPT, "a": RESPONSE,
                                                            "b": "I don't know."}, timeout=30)
    assert all(a.status_code == 200 and a.json()["version"] == "2" for a in answers + [])
    assert compare.status_code == 200 and compare.json()["a"]["version"] == "2", compare.text

    def recorded():
        text = httpx.get(served.url + "/metrics").text
        return text if metric(text, "rewardserve_shadow_abs_diff_count", model="shadowed") >= count0 + 12 else None

    text = wait_for(recorded, 30, "12 shadowed items in rewardserve_shadow_abs_diff")
    count = metric(text, "rewardserve_shadow_abs_diff_count", model="shadowed") - count0
    assert count == 12
    # v1 (shadow) and v2 (served) differ by exactly SHIFT in raw, so by SHIFT / std in z on every item
    std = models_by_id(served.url)["shadowed"]["normalization"]["std"]
    total = metric(text, "rewardserve_shadow_abs_diff_sum", model="shadowed") - \
        metric(before, "rewardserve_shadow_abs_diff_sum", model="shadowed")
    assert total / count == pytest.approx(SHIFT / std, rel=1e-3)
    assert metric(text, "rewardserve_shadow_pairs_total", model="shadowed") - pairs0 == 1  # the compare's pair
    assert metric(text, "rewardserve_shadow_order_flips_total", model="shadowed") == 0  # a constant shift
    assert "shadow disagreement: model shadowed version 2 vs shadow version 1" in served.output()


def test_a_broken_version_is_not_reloaded_by_every_poll_and_a_new_model_is_picked_up(served, repo, bundle):
    failed = metric(httpx.get(served.url + "/metrics").text, "rewardserve_model_loads_total", model="tampered",
                    outcome="failed")
    assert failed == 1
    copy_version(bundle, repo / ".staging")  # what an operator does: copy aside, then rename into place
    (repo / "late").mkdir()
    (repo / ".staging").rename(repo / "late" / "1")
    wait_for(lambda: models_by_id(served.url).get("late", {}).get("state") == "ready", 60, "model 'late' ready")
    assert score(served.url, "late").json()["version"] == "1"
    text = httpx.get(served.url + "/metrics").text
    assert metric(text, "rewardserve_model_loads_total", model="tampered", outcome="failed") == 1


def test_reload_is_refused_without_configured_keys(served):
    r = httpx.post(served.url + "/admin/reload", timeout=30)
    assert r.status_code == 403, r.text
    assert r.json()["error"]["type"] == "forbidden" and "admin" in r.json()["error"]["message"]
