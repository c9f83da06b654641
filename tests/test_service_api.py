"""Every endpoint over real HTTP against a real server process, checked against offline scoring.

Offline reference: service.evaluate.score_pairs (what `rewardserve eval` uses) on the same bundle,
in-process, unbatched by the service's batcher. fp32, so the two must agree to 1e-5.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import httpx
import numpy as np
import pytest

from service.data import demo_data_path, read_pairs
from service.evaluate import score_pairs

TOL = 1e-5


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=30.0) as c:
        yield c


@pytest.fixture(scope="module")
def pairs():
    pairs, _ = read_pairs(demo_data_path())
    return pairs[:12]


@pytest.fixture(scope="module")
def cases(pairs):
    """(prompt, response) cases: chosen and rejected answers plus one that must be truncated."""
    out = [(p.prompt, p.chosen) for p in pairs[:6]] + [(p.prompt, p.rejected) for p in pairs[:6]]
    out.append((pairs[0].prompt * 10, "and the end of a long answer " * 20))
    return out


def offline_raw(offline, cases):
    manifest, encoder, runtime = offline
    return score_pairs(manifest, encoder, runtime, [p for p, _ in cases], [r for _, r in cases])


def test_score_matches_offline_eval(client, offline, cases):
    manifest, encoder, _ = offline
    expected = offline_raw(offline, cases)
    encoded = encoder.encode([p for p, _ in cases], [r for _, r in cases])
    norm = manifest.normalization
    for (prompt, response), raw, enc in zip(cases, expected, encoded):
        r = client.post("/v1/score", json={"prompt": prompt, "response": response})
        assert r.status_code == 200, r.text
        body = r.json()
        keys = {"score", "raw", "percentile", "n_tokens", "truncated", "model", "version"}  # --bundle: version "1"
        if (prompt, response) == cases[-1]:  # the response itself was cut: flagged (service/chat.py)
            keys.add("warnings")
            assert [w.split(":")[0] for w in body.get("warnings", [])] == ["response_truncated"], body
        assert set(body) == keys
        assert abs(body["raw"] - raw) <= TOL
        assert body["score"] == pytest.approx((body["raw"] - norm.mean) / norm.std, abs=1e-9)
        assert body["percentile"] == pytest.approx(float(np.interp(body["raw"], norm.percentiles,
                                                                    np.arange(101))), abs=1e-9)
        assert 0.0 <= body["percentile"] <= 100.0
        assert body["n_tokens"] == enc.n_tokens
        assert body["truncated"] == enc.truncated
        assert body["model"] == manifest.name
    assert encoded[-1].truncated and encoded[-1].n_tokens == manifest.text.max_length


def test_percentile_is_monotonic_in_raw(client, cases):
    bodies = [client.post("/v1/score", json={"prompt": p, "response": r}).json() for p, r in cases]
    bodies.sort(key=lambda b: b["raw"])
    assert [b["percentile"] for b in bodies] == sorted(b["percentile"] for b in bodies)
    assert [b["score"] for b in bodies] == sorted(b["score"] for b in bodies)


def test_batch_matches_single_and_offline(client, offline, cases):
    expected = offline_raw(offline, cases)
    r = client.post("/v1/score/batch", json={"items": [{"prompt": p, "response": x} for p, x in cases]})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert len(results) == len(cases)
    singles = [client.post("/v1/score", json={"prompt": p, "response": x}).json() for p, x in cases]
    for got, single, raw in zip(results, singles, expected):
        assert abs(got["raw"] - raw) <= TOL
        assert abs(got["raw"] - single["raw"]) <= TOL
        assert got["truncated"] == single["truncated"] and got["n_tokens"] == single["n_tokens"]


def test_messages_form_equals_rendered_prompt(client):
    messages = [{"role": "user", "content": "How do I boil an egg?"},
                {"role": "assistant", "content": "Put it in boiling water for nine minutes."}]
    via_messages = client.post("/v1/score", json={"messages": messages})
    assert via_messages.status_code == 200, via_messages.text
    # service/data.py renders chats as HH-RLHF text; the demo data's prompts look exactly like this
    via_text = client.post("/v1/score", json={"prompt": "Human: How do I boil an egg?\n\nAssistant:",
                                              "response": "Put it in boiling water for nine minutes."})
    assert via_messages.json() == via_text.json()


def test_rank_orders_by_raw_and_matches_offline(client, offline, pairs):
    prompt = pairs[3].prompt
    responses = [p.chosen for p in pairs[:5]] + [p.rejected for p in pairs[:5]]
    expected = offline_raw(offline, [(prompt, x) for x in responses])
    r = client.post("/v1/rank", json={"prompt": prompt, "responses": responses})
    assert r.status_code == 200, r.text
    body = r.json()
    raws = [x["raw"] for x in body["results"]]
    assert np.max(np.abs(np.array(raws) - expected)) <= TOL
    assert body["ranking"] == sorted(range(len(responses)), key=lambda i: -raws[i])
    assert sorted(body["ranking"]) == list(range(len(responses)))
    assert body["best_index"] == body["ranking"][0] == int(np.argmax(raws))
    top = client.post("/v1/rank", json={"prompt": prompt, "responses": responses, "top_k": 3}).json()
    assert top["ranking"] == body["ranking"][:3]
    assert len(top["results"]) == len(responses)


def test_compare_is_consistent_with_two_score_calls(client, pairs, offline):
    p = pairs[1]
    calibration = offline[0].calibration  # /v1/compare divides the margin by the fitted temperature (issue 24)
    temperature = calibration.temperature if calibration is not None else 1.0
    body = client.post("/v1/compare", json={"prompt": p.prompt, "a": p.chosen, "b": p.rejected}).json()
    a = client.post("/v1/score", json={"prompt": p.prompt, "response": p.chosen}).json()
    b = client.post("/v1/score", json={"prompt": p.prompt, "response": p.rejected}).json()
    assert abs(body["a"]["raw"] - a["raw"]) <= TOL and abs(body["b"]["raw"] - b["raw"]) <= TOL
    assert body["probability"] == pytest.approx(1.0 / (1.0 + math.exp(-(a["raw"] - b["raw"]) / temperature)),
                                                abs=1e-5)
    swapped = client.post("/v1/compare", json={"prompt": p.prompt, "a": p.rejected, "b": p.chosen}).json()
    assert body["probability"] + swapped["probability"] == pytest.approx(1.0, abs=1e-6)


def test_models_describes_bundle_and_runtime(client, offline):
    manifest, _, _ = offline
    r = client.get("/v1/models")
    assert r.status_code == 200
    [info] = r.json()["data"]
    assert info["id"] == manifest.name
    assert info["precision"] == "fp32" and info["model_format"] == "onnx"
    assert info["max_length"] == manifest.text.max_length
    assert info["normalization"]["mean"] == manifest.normalization.mean
    assert info["normalization"]["std"] == manifest.normalization.std
    assert info["eval"] == manifest.eval
    assert info["runtime"]["runtime"] == "onnxruntime"
    assert info["runtime"]["provider"] == "CPUExecutionProvider"


def test_health_ready_metrics_and_openapi(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"status": "ready"}
    r = client.get("/metrics", follow_redirects=False)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    for name in ("rewardserve_requests_total", "rewardserve_request_seconds", "rewardserve_queue_depth",
                 "rewardserve_queue_wait_seconds", "rewardserve_batch_size", "rewardserve_batch_tokens",
                 "rewardserve_padding_efficiency", "rewardserve_model_run_seconds", "rewardserve_raw_score"):
        assert f"\n{name}" in r.text, name
    assert 'rewardserve_requests_total{route="/v1/score",status="200"}' in r.text
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/v1/score", "/v1/score/batch", "/v1/rank", "/v1/compare", "/v1/models"} <= set(paths)


def test_eval_cli_matches_score_pairs(bundle, offline, tmp_path):
    data = tmp_path / "pairs.jsonl"
    pairs, _ = read_pairs(demo_data_path())
    pairs = pairs[:40]
    data.write_text("".join(json.dumps({"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected}) + "\n"
                            for p in pairs))
    out = subprocess.run([sys.executable, "-m", "service.cli", "eval", "--bundle", str(bundle), "--data", str(data),
                          "--json", "--threads", "1"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    [result] = json.loads(out.stdout)["results"]
    manifest, encoder, runtime = offline
    prompts = [p.prompt for p in pairs]
    chosen = score_pairs(manifest, encoder, runtime, prompts, [p.chosen for p in pairs])
    rejected = score_pairs(manifest, encoder, runtime, prompts, [p.rejected for p in pairs])
    assert result["pairs"] == 40
    assert result["accuracy"] == pytest.approx(float(np.mean(chosen > rejected)))
    assert result["length_baseline"] == pytest.approx(float(np.mean([len(p.chosen) > len(p.rejected)
                                                                      for p in pairs])))


def test_serving_modules_do_not_import_torch():
    code = ("import sys, service.app, service.server, service.evaluate; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_verify_runs_checksums_and_parity_without_torch(bundle):
    """`rewardserve verify` in a serving image: torch and transformers made unimportable."""
    code = ("import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None; "
            "from service.cli import main; main(['verify', sys.argv[1]])")
    out = subprocess.run([sys.executable, "-c", code, str(bundle)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "checksums ok" in out.stdout and "parity ok" in out.stdout


def test_settings_come_from_env_and_flags_win(monkeypatch, bundle):
    from service.server import load_settings

    monkeypatch.setenv("REWARDSERVE_MAX_QUEUE", "7")
    monkeypatch.setenv("REWARDSERVE_OVERLOAD_STATUS", "429")
    monkeypatch.setenv("REWARDSERVE_PORT", "9000")
    monkeypatch.setenv("REWARDSERVE_LOG_LEVEL", "WARNING")
    s = load_settings(["--bundle", str(bundle), "--port", "9100", "--ort-spinning", "--max-wait-ms", "2.5"])
    assert (s.max_queue, s.overload_status, s.port, s.ort_spinning, s.max_wait_ms) == (7, 429, 9100, True, 2.5)
    assert s.log_level == "warning" and s.bundle == bundle
    with pytest.raises(SystemExit):
        load_settings(["--bundle", str(bundle), "--overload-status", "500"])
    with pytest.raises(SystemExit):
        load_settings(["--bundle", str(bundle), "--max-batch-size", "0"])
