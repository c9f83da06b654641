"""A rollout batch on /get_reward or /classify is one unit of admission (issue 21, item 3).

Before: the batch was scored in consecutive chunks of max_client_batch, each admitted only when the
previous one had returned, so a refusal of a later chunk threw away the chunks already computed, and the
model never saw two chunks in one run. Now the whole batch is admitted or refused before any compute and
all its chunks are queued at once. Checked against real servers on 127.0.0.1 (a `rewardserve serve`
process, or an in-process uvicorn whose real runtime is wrapped to record and slow its runs).
"""

from __future__ import annotations

import httpx
import pytest

from service.data import demo_data_path, read_pairs
from tests.helpers import InProcessServer, RecordingRuntime, metric, v1_scores

TOL = 1e-4
CHUNK = 4  # max_client_batch of these servers: a 12-item batch is three chunks


@pytest.fixture(scope="module")
def pairs():
    """12 (prompt, response) pairs of the demo set; the prompts end in "\\n\\nAssistant:", where /get_reward
    and /classify split a whole text back into the pair."""
    data, _ = read_pairs(demo_data_path())
    return [(p.prompt, p.chosen) for p in data[:6]] + [(p.prompt, p.rejected) for p in data[:6]]


def _runs(url: str) -> tuple[float, float]:
    """(model runs so far, of them runs of at most CHUNK items), from the batcher's batch-size histogram."""
    text = httpx.get(url + "/metrics").text
    return (metric(text, "rewardserve_batch_size_count"),
            metric(text, "rewardserve_batch_size_bucket", le=f"{float(CHUNK)}"))


def test_a_batch_larger_than_max_client_batch_is_queued_at_once_and_scored_like_v1_score(start_server, pairs):
    """All three chunks reach the queue together: a model run holds items of more than one chunk (before,
    no run could hold more than CHUNK items); every reward equals the item's own /v1/score."""
    server = start_server(max_client_batch=CHUNK, cache_size=0, efficient_batch_tokens=0,
                          min_padding_efficiency=0)
    texts = [p + " " + r for p, r in pairs]
    before, small_before = _runs(server.url)
    r = httpx.post(server.url + "/get_reward", json={"query": texts}, timeout=60)
    assert r.status_code == 200, r.text
    rewards = r.json()
    r = httpx.post(server.url + "/classify", json={"input": texts, "activation": False}, timeout=60)
    assert r.status_code == 200, r.text
    probs = [d["probs"][0] for d in sorted(r.json()["data"], key=lambda d: d["index"])]
    runs, small = _runs(server.url)
    assert runs - before >= 1
    assert (runs - before) - (small - small_before) >= 1, "no model run held items of two chunks"

    reference = v1_scores(server.url, pairs)  # cache off: computed again, one item per request
    assert len(rewards["rewards"]) == len(probs) == len(pairs)
    for i, ref in enumerate(reference):
        assert abs(rewards["rewards"][i] - ref["score"]) <= TOL
        assert abs(rewards["extra_logs"]["raw_reward"][i] - ref["raw"]) <= TOL
        assert abs(probs[i] - ref["raw"]) <= TOL
    assert len({round(x["raw"], 5) for x in reference}) > 1  # the comparison is not vacuous


def test_a_batch_that_can_never_fit_the_queue_is_refused_whole_before_any_compute(start_server, pairs):
    """12 items against max_queue 8: each chunk of 4 would fit, the batch never can. Refused 413 (not
    retryable) before a single model run; before, its chunks were computed one after the other."""
    server = start_server(max_client_batch=CHUNK, max_queue=8, cache_size=0)
    texts = [p + " " + r for p, r in pairs]
    before = _runs(server.url)
    r = httpx.post(server.url + "/get_reward", json={"query": texts}, timeout=60)
    assert r.status_code == 413, r.text
    assert r.json()["error"]["type"] == "payload_too_large" and "max_queue" in r.json()["error"]["message"]
    assert "retry-after" not in r.headers
    assert _runs(server.url) == before, "the refused batch reached the model"
    r = httpx.post(server.url + "/classify", json={"input": texts[:8], "activation": False}, timeout=60)
    assert r.status_code == 200 and len(r.json()["data"]) == 8, r.text


def test_a_too_long_item_with_truncate_false_refuses_the_batch_before_any_compute(start_server, pairs):
    """/classify with "truncate": false and an over-long last item: 422 naming that item, and no run of the
    items before it (before, the first chunks were computed and then thrown away)."""
    server = start_server(max_client_batch=CHUNK, cache_size=0)
    texts = [f"Human: question {i}?\n\nAssistant: answer {i}." for i in range(12)]  # short: all fit
    texts.append("Human: one more?\n\nAssistant: " + "far too long " * 200)
    before = _runs(server.url)
    r = httpx.post(server.url + "/classify", json={"input": texts, "truncate": False}, timeout=60)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["field"] == f"input.{len(texts) - 1}"
    assert _runs(server.url) == before, "items of the refused batch reached the model"


def test_an_overloaded_server_refuses_the_whole_batch_with_retry_after_before_any_compute(bundle, pairs):
    """Every model run takes 0.2 s (the real runtime, slowed), at most CHUNK items per run. A 48-item
    batch whose client allows 1 s needs about 12 runs (2.4 s): refused 503 + Retry-After at once, none of
    its rows computed. Before, its first chunks (0.2 s each, within the deadline) were computed and then
    lost when a later chunk was refused. The same batch with time enough is scored in full."""
    texts = [f"{p} {r} (sample {k})" for k in range(4) for p, r in pairs]  # 48 distinct texts
    with InProcessServer(bundle, wrap=lambda rt: RecordingRuntime(rt, delay_s=0.2), max_client_batch=CHUNK,
                         max_batch_size=CHUNK, cache_size=0, retry_after_s=1) as srv:
        for k in range(3):  # a few measured runs: the batcher's throughput estimate
            r = httpx.post(srv.url + "/get_reward", json={"query": texts[k * CHUNK:(k + 1) * CHUNK]}, timeout=60)
            assert r.status_code == 200, r.text
        runs_before = len(srv.runtime.runs)
        before = _runs(srv.url)
        r = httpx.post(srv.url + "/get_reward", json={"query": texts}, headers={"X-Request-Timeout": "1"},
                       timeout=60)
        assert r.status_code == 503, r.text
        assert r.json()["error"]["type"] == "overloaded" and "retry-after" in r.headers
        assert len(srv.runtime.runs) == runs_before, "the refused batch reached the model"
        assert _runs(srv.url) == before
        r = httpx.post(srv.url + "/get_reward", json={"query": texts}, timeout=60)
        assert r.status_code == 200 and len(r.json()["rewards"]) == len(texts), r.text
        rows = {row for _, batch, _ in srv.runtime.runs[runs_before:] for row in batch}
        assert len(rows) == len(texts)  # every item computed once
