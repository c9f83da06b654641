"""Hot swap over real HTTP (issue 26): `POST /admin/reload` loads a new version beside the serving one,
verifies it, and swaps it in under load with no request lost; a version that fails verification is
reported and never served while the old one keeps serving; the admin scope guards the route.

One server (`rewardserve serve --repository`, keys configured) for the module; the versions are real
bundles: a copy of the session's trained tiny bundle (v1) and a re-export that adds a known constant to
every reward (v2), so an answer proves which model computed it (and that no cache answered from v1).
"""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from tests.helpers import ServerProcess, metric
from tests.test_registry import SHIFT, copy_version, models_by_id, shifted_bundle, start_repository, versions_of

ADMIN, SCORER, PLAIN = "admin-secret", "scorer-secret", "plain-secret"
AUTH = {"Authorization": f"Bearer {ADMIN}"}
CONCURRENCY = 8
MIN_REQUESTS, MAX_REQUESTS, MAX_SECONDS = 300, 4000, 120.0
ITEMS = 16  # items per request: each request spends a while admitted (tokenizing, queued), so a swap meets
            # requests in flight on the old version


@pytest.fixture(scope="module")
def repo(bundle, tmp_path_factory):
    root = tmp_path_factory.mktemp("repository")
    copy_version(bundle, root / "rm" / "1")
    return root


@pytest.fixture(scope="module")
def server(repo, tmp_path_factory) -> ServerProcess:
    keys = f"{ADMIN} api admin metrics,{SCORER} api,{PLAIN}"  # PLAIN: no scopes listed = api and metrics
    server = start_repository(repo, tmp_path_factory.mktemp("logs"), env_extra={"REWARDSERVE_API_KEYS": keys})
    yield server
    server.stop(timeout=20.0)


def reload(url: str, headers=AUTH) -> httpx.Response:
    return httpx.post(url + "/admin/reload", headers=headers, timeout=120)


def test_admin_scope_guards_reload(server):
    assert reload(server.url, headers={}).status_code == 401
    for key in (SCORER, PLAIN):  # admin is never implied: a key without scopes has api and metrics only
        r = reload(server.url, headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 403 and "'admin' scope" in r.json()["error"]["message"], r.text
    assert httpx.get(server.url + "/v1/models", headers={"Authorization": f"Bearer {PLAIN}"}).status_code == 200
    r = reload(server.url)
    assert r.status_code == 200, r.text
    assert r.json()["models"] == {"rm": "1"} and r.json()["loaded"] == [] and r.json()["unloaded"] == []


async def load_during_reload(url: str, prompts: list[str]) -> tuple[list, float, float]:
    """CONCURRENCY workers send /v1/score/batch requests (ITEMS items, the first one a known input) back to
    back while, once MIN_REQUESTS // 3 are answered,
    /admin/reload runs. Stops when the reload has returned and MIN_REQUESTS // 3 more requests have started
    after it (bounded by MAX_REQUESTS and MAX_SECONDS). Returns (request start, end, prompt index, status,
    body) per request, and when the reload was sent and when it returned."""
    records: list = []
    marks = {"sent": None, "done": None}
    started_after = 0
    stop_at = time.monotonic() + MAX_SECONDS
    async with httpx.AsyncClient(base_url=url, headers=AUTH, timeout=60,
                                 limits=httpx.Limits(max_connections=CONCURRENCY + 1)) as client:
        async def worker(w: int) -> None:
            nonlocal started_after
            i = w
            while len(records) < MAX_REQUESTS and time.monotonic() < stop_at:
                if marks["done"] is not None and started_after >= MIN_REQUESTS // 3 \
                        and len(records) >= MIN_REQUESTS:
                    return
                k = i % len(prompts)
                start = time.monotonic()
                if marks["done"] is not None:
                    started_after += 1
                try:
                    items = [{"prompt": prompts[k], "response": f"reply {k}"}] + [
                        {"prompt": prompts[(k + j) % len(prompts)], "response": f"another reply {i}.{j} " * 6}
                        for j in range(1, ITEMS)]
                    r = await client.post("/v1/score/batch", json={"items": items})
                    body = r.json()
                    if r.status_code == 200:  # every item answered with a score, all by one version
                        versions = {x.get("version") for x in body["results"]}
                        assert len(versions) == 1, body
                        body = body["results"][0]
                    records.append((start, time.monotonic(), k, r.status_code, body))
                except httpx.HTTPError as exc:
                    records.append((start, time.monotonic(), k, None, repr(exc)))
                i += CONCURRENCY

        async def swapper() -> httpx.Response:
            while len(records) < MIN_REQUESTS // 3:
                await asyncio.sleep(0.01)
            marks["sent"] = time.monotonic()
            r = await client.post("/admin/reload", timeout=120)
            marks["done"] = time.monotonic()
            return r

        *_, swap = await asyncio.gather(*(worker(w) for w in range(CONCURRENCY)), swapper())
    assert swap.status_code == 200, swap.text
    assert swap.json()["loaded"] == ["rm@2"] and swap.json()["unloaded"] == ["rm@1"], swap.json()
    return records, marks["sent"], marks["done"]


def test_swap_under_load_loses_nothing_and_switches_to_the_new_version(server, repo, bundle, tmp_path):
    prompts = [f"question {i}: what do you think?" for i in range(40)]
    v1 = {}
    for k, prompt in enumerate(prompts[:5]):  # v1's own raw rewards for a few inputs
        v1[k] = httpx.post(server.url + "/v1/score", headers=AUTH, json={"prompt": prompt, "response": f"reply {k}"},
                           timeout=30).json()["raw"]
    shifted_bundle(bundle, repo / "rm" / "2", SHIFT)  # a new version appears

    records, sent, done = asyncio.run(load_during_reload(server.url, prompts))
    errors = [(status, body) for _, _, _, status, body in records if status != 200]
    assert not errors, errors[:5]
    assert len(records) >= MIN_REQUESTS
    before = [r for r in records if r[1] < sent]  # answered before the reload was sent
    after = [r for r in records if r[0] > done]  # sent after the swap
    assert before and after, (len(before), len(after))
    assert {r[4]["version"] for r in before} == {"1"}
    assert {r[4]["version"] for r in after} == {"2"}  # atomically swapped: every new request on v2
    for _, _, k, _, body in records:  # each answer is its version's model: v2 = v1 + SHIFT, never v1's cache
        if k in v1:
            expected = v1[k] + (SHIFT if body["version"] == "2" else 0.0)
            assert body["raw"] == pytest.approx(expected, abs=1e-4), body
    models = models_by_id(server.url, AUTH)
    assert models["rm"]["version"] == "2"
    assert versions_of(models["rm"])["1"]["state"] in ("draining", "available")
    text = httpx.get(server.url + "/metrics", headers=AUTH).text
    assert metric(text, "rewardserve_model_loads_total", model="rm", outcome="loaded") == 2


def test_a_version_failing_verification_is_reported_and_the_old_one_keeps_serving(server, repo, bundle):
    bad = copy_version(bundle, repo / "rm" / "3")
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["files"][manifest["model_file"]] = "f" * 64  # a checksum that the model file does not match
    (bad / "manifest.json").write_text(json.dumps(manifest))
    r = reload(server.url)
    assert r.status_code == 200, r.text
    assert r.json()["models"] == {"rm": "2"} and r.json()["loaded"] == []
    assert "version 3" in r.json()["failed"]["rm"] and "sha256 mismatch" in r.json()["failed"]["rm"]
    answer = httpx.post(server.url + "/v1/score", headers=AUTH, json={"prompt": "hi", "response": "hello"})
    assert answer.status_code == 200 and answer.json()["version"] == "2"
    entry = models_by_id(server.url, AUTH)["rm"]
    assert entry["state"] == "ready" and entry["version"] == "2"
    v3 = versions_of(entry)["3"]
    assert v3["state"] == "failed" and "sha256 mismatch" in v3["reason"] and manifest["model_file"] in v3["reason"]
    # fixed on disk (the operator copies a good bundle over it): the next reload serves it
    (bad / "manifest.json").write_text((repo / "rm" / "1" / "manifest.json").read_text())
    r = reload(server.url)
    assert r.json()["loaded"] == ["rm@3"] and "rm" not in r.json()["failed"], r.json()
    answer = httpx.post(server.url + "/v1/score", headers=AUTH, json={"prompt": "hi", "response": "hello"})
    assert answer.json()["version"] == "3"


def test_an_ensemble_is_rebuilt_on_its_members_new_version(server, repo, bundle):
    copy_version(bundle, repo / "other" / "1")
    (repo / "duo").mkdir()
    (repo / "duo" / "ensemble.json").write_text(json.dumps({"members": ["rm", "other"], "aggregate": "mean"}))
    r = reload(server.url)
    assert r.status_code == 200 and r.json()["models"]["duo"] == "rm@3,other@1", r.text
    body = {"model": "duo", "prompt": "hi", "response": "hello"}
    before = httpx.post(server.url + "/v1/score", headers=AUTH, json=body).json()
    assert before["version"] == "rm@3,other@1"
    shifted_bundle(bundle, repo / "rm" / "4", SHIFT)
    r = reload(server.url)
    assert r.json()["models"]["duo"] == "rm@4,other@1", r.json()
    assert "duo@rm@3,other@1" in r.json()["unloaded"] and "rm@3" in r.json()["unloaded"], r.json()
    after = httpx.post(server.url + "/v1/score", headers=AUTH, json=body).json()
    assert after["version"] == "rm@4,other@1"
    std = models_by_id(server.url, AUTH)["rm"]["normalization"]["std"]
    assert after["members"]["rm"] - before["members"]["rm"] == pytest.approx(SHIFT / std, rel=1e-3)  # rm@4's z
    assert after["members"]["other"] == pytest.approx(before["members"]["other"], abs=1e-9)
