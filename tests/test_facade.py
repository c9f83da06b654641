"""The engine as a facade over several models (issue 26), over real HTTP on 127.0.0.1.

One model repository with two really different models (two trained tiny BERTs): `alpha` (versions 1 and
3: 3 is served) and `beta` (version 2). Every /v1 route and the compatibility routes route by their
`model` field to the named model (its raw reward equals the offline score of that model's bundle, and
differs from the other's); every answer names model and version; an unknown model is a 404 naming the
field and the models served; /v1/models lists both.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from tests.helpers import REPO, free_port, http_request, send_headers_only, tiny_bert, train_and_export

TOL = 1e-4
PAIRS = [("What is the capital of France?", "Paris is the capital of France."),
         ("Say something kind.", "You are doing great, keep going!"),
         ("Explain gravity briefly.", "Masses attract each other.")]


@pytest.fixture(scope="module")
def beta_bundle(tmp_path_factory) -> Path:
    """A second, differently initialised and trained model (a real bundle, not a copy of `bundle`)."""
    base = tiny_bert(tmp_path_factory.mktemp("beta") / "tiny-bert", seed=7, max_position_embeddings=128)
    return train_and_export(base, "beta-rm", max_length=64, batch_size=16, max_pairs=32, seed=3)


def offline_raw(bundle: Path, pairs) -> list[float]:
    from service.bundle import open_bundle
    from service.evaluate import score_pairs
    from service.runtime import load_runtime

    manifest, encoder = open_bundle(bundle)
    runtime = load_runtime(bundle, manifest, provider="cpu", intra_op_threads=1)
    return [float(x) for x in score_pairs(manifest, encoder, runtime, [p for p, _ in pairs], [r for _, r in pairs])]


@pytest.fixture(scope="module")
def repository(tmp_path_factory, bundle, beta_bundle) -> Path:
    root = tmp_path_factory.mktemp("repository")
    shutil.copytree(bundle, root / "alpha" / "1")
    shutil.copytree(bundle, root / "alpha" / "3")
    shutil.copytree(beta_bundle, root / "beta" / "2")
    return root


@pytest.fixture(scope="module")
def raw(bundle, beta_bundle) -> dict[str, list[float]]:
    out = {"alpha": offline_raw(bundle, PAIRS), "beta": offline_raw(beta_bundle, PAIRS)}
    assert all(abs(a - b) > 100 * TOL for a, b in zip(out["alpha"], out["beta"])), out  # the models differ
    return out


@contextmanager
def serve_repository(repository: Path, **options):
    """create_app(Settings(repository=..., default_model="alpha", ...)) under a real uvicorn on 127.0.0.1."""
    import uvicorn

    from service.app import create_app
    from service.settings import Settings

    settings = Settings(repository=repository, default_model="alpha", intra_op_threads=1, tokenizer_threads=1,
                        log_level="warning", **options)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning",
                                           lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 90
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "repository server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


@pytest.fixture(scope="module")
def url(repository):
    with serve_repository(repository) as address:
        yield address


def post(url: str, path: str, body: dict) -> httpx.Response:
    return httpx.post(url + path, json=body, timeout=60)


def named(result: dict, model: str, version: str) -> None:
    assert (result["model"], result["version"]) == (model, version), result


@pytest.mark.parametrize("model,version", [("alpha", "3"), ("beta", "2"), (None, "3")])
def test_v1_routes_score_on_the_named_model(url, raw, model, version):
    name = model or "alpha"  # no model: the default
    extra = {} if model is None else {"model": model}
    expected = raw[name]
    for (prompt, response), want in zip(PAIRS, expected):
        r = post(url, "/v1/score", {"prompt": prompt, "response": response, **extra})
        assert r.status_code == 200, r.text
        named(r.json(), name, version)
        assert abs(r.json()["raw"] - want) <= TOL
    items = [{"prompt": p, "response": x} for p, x in PAIRS]
    batch = post(url, "/v1/score/batch", {"items": items, **extra}).json()["results"]
    for result, want in zip(batch, expected):
        named(result, name, version)
        assert abs(result["raw"] - want) <= TOL
    prompt = PAIRS[0][0]
    rank = post(url, "/v1/rank", {"prompt": prompt, "responses": ["Paris.", "Lyon, I think."], **extra}).json()
    for result in rank["results"]:
        named(result, name, version)
    compare = post(url, "/v1/compare", {"prompt": prompt, "a": "Paris.", "b": "Lyon, I think.", **extra}).json()
    named(compare["a"], name, version)
    named(compare["b"], name, version)
    assert [r["raw"] for r in rank["results"]] == pytest.approx([compare["a"]["raw"], compare["b"]["raw"]], abs=TOL)


def test_compat_routes_use_their_model_field(url, raw):
    text = PAIRS[0][0] + " " + PAIRS[0][1]
    answers = {}
    for model in ("alpha", "beta", "/models/beta", "someone-elses-model-path"):
        r = post(url, "/classify", {"model": model, "input": [text], "use_activation": False})
        assert r.status_code == 200, r.text
        answers[model] = r.json()
    assert answers["beta"]["model"] == answers["/models/beta"]["model"] == "beta"
    assert answers["alpha"]["model"] == answers["someone-elses-model-path"]["model"] == "alpha"  # default
    assert answers["beta"]["data"][0]["probs"] == answers["/models/beta"]["data"][0]["probs"]
    assert answers["alpha"]["data"][0]["probs"] == answers["someone-elses-model-path"]["data"][0]["probs"]
    assert abs(answers["alpha"]["data"][0]["probs"][0] - answers["beta"]["data"][0]["probs"][0]) > 100 * TOL
    emb = post(url, "/v1/embeddings", {"model": "beta", "input": [text]}).json()
    assert emb["model"] == "beta" and emb["data"][0]["embedding"] == answers["beta"]["data"][0]["probs"]
    # OpenRLHF and TEI name no model: the default
    reward = post(url, "/get_reward", {"query": [text]}).json()
    assert reward["extra_logs"]["raw_reward"] == answers["alpha"]["data"][0]["probs"]


@pytest.mark.parametrize("path,body", [
    ("/v1/score", {"prompt": "p", "response": "r"}),
    ("/v1/score/batch", {"items": [{"prompt": "p", "response": "r"}]}),
    ("/v1/rank", {"prompt": "p", "responses": ["a", "b"]}),
    ("/v1/compare", {"prompt": "p", "a": "a", "b": "b"}),
])
def test_unknown_model_is_404_naming_the_field_and_the_models(url, path, body):
    r = post(url, path, {**body, "model": "gamma"})
    assert r.status_code == 404, r.text
    error = r.json()["error"]
    assert error["type"] == "model_not_found" and error["field"] == "model", error
    assert "'gamma'" in error["message"] and "alpha" in error["message"] and "beta" in error["message"], error
    assert "retry-after" not in r.headers  # not retryable


def test_batch_item_naming_a_model_fails_only_itself(url, raw):
    items = [{"prompt": PAIRS[0][0], "response": PAIRS[0][1]},
             {"prompt": PAIRS[1][0], "response": PAIRS[1][1], "model": "alpha"}]
    results = post(url, "/v1/score/batch", {"items": items, "model": "beta"}).json()["results"]
    named(results[0], "beta", "2")
    assert abs(results[0]["raw"] - raw["beta"][0]) <= TOL
    assert results[1]["error"]["field"] == "items.1.model", results[1]


def test_models_lists_every_model_with_its_version(url):
    data = httpx.get(url + "/v1/models").json()["data"]
    served = {d["id"]: d["version"] for d in data}
    assert served == {"alpha": "3", "beta": "2"}, data


@pytest.mark.parametrize("flags,message", [
    ([], "give exactly one of bundle"),
    (["--bundle", "b", "--repository", "r"], "give bundle or repository, not both"),
])
def test_serve_needs_exactly_one_of_bundle_or_repository(flags, message):
    proc = subprocess.run([sys.executable, "-m", "service.cli", "serve", *flags], cwd=REPO, capture_output=True,
                          text=True, timeout=60, env={k: v for k, v in os.environ.items()
                                                      if not k.startswith("REWARDSERVE_")})
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_metrics_carry_the_model_that_served(url):
    """A repository's per-model series: the served items and the request latency of the model that served
    them, and one queue gauge per loaded version (docs/monitoring.md)."""
    from tests.helpers import metric

    def read() -> str:
        return httpx.get(url + "/metrics").text

    before = read()
    for prompt, response in PAIRS[:2]:
        assert post(url, "/v1/score", {"prompt": prompt, "response": response + " (metrics)", "model": "beta"}
                    ).status_code == 200
    assert post(url, "/v1/score", {"prompt": "p", "response": "r", "model": "gamma"}).status_code == 404
    after = read()

    def moved(name: str, **labels) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert moved("rewardserve_served_items_total", model="beta", client="none") == 2
    assert moved("rewardserve_served_items_total", model="alpha", client="none") == 0
    assert moved("rewardserve_request_seconds_count", route="/v1/score", model="beta") == 2
    assert moved("rewardserve_request_seconds_count", route="/v1/score", model="none") == 1  # the 404
    assert moved("rewardserve_raw_score_count", model="beta") == 2
    for model, version in (("alpha", "3"), ("beta", "2")):
        assert f'rewardserve_queue_depth{{model="{model}",version="{version}"}} 0.0' in after


def test_the_door_counts_every_models_requests_before_their_bodies_are_read(repository):
    """max_queue 2 with two models: two requests let in whose bodies have not arrived hold the process's two
    door slots, so a third is refused 503 + Retry-After before its body is read, whichever model it will
    name; once they go, a request for the other model is admitted (Engine.gate)."""
    with serve_repository(repository, max_queue=2) as address:
        host, port = address.removeprefix("http://").split(":")
        held = []
        for _ in range(2):  # headers announce a body that never comes: each holds a door slot
            sock = socket.create_connection((host, int(port)), timeout=10)
            sock.sendall(http_request(address, "POST", "/v1/score", b"", {"Content-Type": "application/json"})
                         .replace(b"Content-Length: 0", b"Content-Length: 1000"))
            held.append(sock)
        deadline = time.monotonic() + 30
        while True:  # the held requests reach the door in their own time
            _, answer = send_headers_only(address, "/v1/score", 1000)
            if answer is not None and answer[0] == 503 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert answer is not None, "no answer at the door"
        status, headers, body = answer
        assert status == 503 and json.loads(body)["error"]["type"] == "overloaded" and "retry-after" in headers, answer
        for sock in held:
            sock.close()
        deadline = time.monotonic() + 30
        while (r := post(address, "/v1/score", {"prompt": "p", "response": "r", "model": "beta"})).status_code != 200:
            assert r.status_code == 503 and time.monotonic() < deadline, r.text  # the closed ones leave the door
            time.sleep(0.05)
        named(r.json(), "beta", "2")
