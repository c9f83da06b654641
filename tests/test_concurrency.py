"""Concurrency: many simultaneous requests against a real server process are batched by the dynamic batcher
and every one is scored as offline scoring scores it. (Overload and deadlines: test_admission.py; drain:
test_drain.py; disconnects: test_faults.py.)

Each test starts its own server so that its /metrics counters start from zero.
"""

from __future__ import annotations

import asyncio

import httpx

from tests.helpers import fire, metric


TOL = 1e-5


def test_200_concurrent_requests_are_batched_and_correct(start_server, workload):
    cases, raw = workload
    server = start_server(cache_size=0)  # 3 of the 200 pairs tokenize identically; every one must reach the batcher
    responses = asyncio.run(fire(server.url, cases))
    for response, expected in zip(responses, raw):
        assert isinstance(response, httpx.Response), response
        assert response.status_code == 200, response.text
        assert abs(response.json()["raw"] - expected) <= TOL
    text = httpx.get(server.url + "/metrics").text
    runs = metric(text, "rewardserve_batch_size_count")
    single_item_runs = metric(text, "rewardserve_batch_size_bucket", le="1.0")
    items = metric(text, "rewardserve_batch_size_sum")
    assert items == 200  # the warm-up run is not counted, every request went through the batcher
    assert runs - single_item_runs >= 1, text  # batches of more than one item were formed
    assert runs < 200
    assert metric(text, "rewardserve_requests_total", route="/v1/score", status="200") == 200
    assert metric(text, "rewardserve_queue_depth") == 0
    assert metric(text, "rewardserve_raw_score_count") == 200
