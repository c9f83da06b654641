"""Admission control over real HTTP: the bounded queue (503, or 429 if configured, with Retry-After, decided
before the body is read), and request deadlines (X-Request-Timeout capped by the server maximum, 504,
expired items never computed).

Each test starts its own server (`start_server`, a `rewardserve serve` subprocess) so that its /metrics
counters start from zero, or an `InProcessServer` with a `RecordingRuntime` where a test must slow the
model down or see which rows were computed.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import threading
import time

import httpx
import numpy as np

from tests.helpers import (InProcessServer, RawAnswer, RecordingRuntime, established_connections, fire, http_request,
                           metric, raw_burst, send_headers_only)


TOL = 1e-5


BURST_CAPACITY = 16  # max_queue of the burst server: items admitted and not yet computed


def test_burst_of_10x_capacity_is_answered_fast_and_correctly(start_server, workload):
    """160 requests at once against a queue of 16: every answer is a correct score or a 503 with
    Retry-After within 50 ms; admitted requests meet their 5 s deadline; no connection hangs; the
    process stays ready throughout."""
    cases, raw = workload
    n = 10 * BURST_CAPACITY
    server = start_server(max_queue=BURST_CAPACITY, max_batch_size=1, retry_after_s=1)
    port = int(server.url.rsplit(":", 1)[1])
    requests = [http_request(server.url, "POST", "/v1/score", json.dumps({"prompt": p, "response": r}).encode(),
                             {"Content-Type": "application/json", "X-Request-Timeout": "5"}) for p, r in cases[:n]]
    ready: list[int] = []
    stop = threading.Event()

    def watch_readiness():
        with httpx.Client(base_url=server.url, timeout=5.0) as client:
            while not stop.is_set():
                ready.append(client.get("/readyz").status_code)
                time.sleep(0.02)

    watcher = threading.Thread(target=watch_readiness)
    watcher.start()
    try:
        time.sleep(0.1)
        answers = raw_burst(server.url, requests, timeout=30.0)
        time.sleep(0.1)
    finally:
        stop.set()
        watcher.join(10)
    ok = refused = 0
    refusal_ms, refusal_server_ms = [], []
    for i, r in enumerate(answers):
        assert isinstance(r, RawAnswer), f"request {i}: {r}"  # zero hung or dropped connections
        if r.status == 200:
            ok += 1
            assert abs(r.json()["raw"] - raw[i]) <= TOL
            assert r.seconds < 5.0, f"an admitted request missed its 5 s deadline: {r.seconds:.2f} s"
        else:
            refused += 1
            assert r.status == 503, r.body
            assert r.headers["retry-after"] == "1"
            body = r.json()
            assert set(body) == {"error"} and set(body["error"]) == {"type", "message"}, body
            assert body["error"]["type"] == "overloaded"
            assert re.fullmatch(r"queue full \(\d+ of 16 items waiting\); retry later", body["error"]["message"])
            refusal_ms.append(r.seconds * 1000)
            refusal_server_ms.append(float(r.headers["server-timing"].removeprefix("app;dur=")))
    print(f"\nburst of {n}: {ok} scored, {refused} refused; refusal ms p50 {np.median(refusal_ms):.1f} "
          f"p90 {np.percentile(refusal_ms, 90):.1f} max {max(refusal_ms):.1f} (in the server: max "
          f"{max(refusal_server_ms):.2f}, p50 {np.median(refusal_server_ms):.2f}); load average {os.getloadavg()[0]:.2f}")
    assert ok >= BURST_CAPACITY and refused >= n // 2, (ok, refused)
    # Inside the server (Server-Timing), every refusal is decided and written within 50 ms: it is refused
    # before its body is read, never after waiting for compute. Seen from the client, the time also
    # covers one event loop accepting and parsing the other 159 requests of the burst on a shared
    # 2-core machine (tens of ms, more under load; see docs/reliability.md): it is printed, and bounded
    # well below the 5 s a request waiting for compute could take.
    assert max(refusal_server_ms) < 50, f"slowest refusals in the server (ms): {sorted(refusal_server_ms)[-5:]}"
    assert max(refusal_ms) < 1000, f"slowest refusals (ms): {sorted(refusal_ms)[-5:]}"
    assert ready and set(ready) == {200}, ready  # the process stayed ready throughout
    text = httpx.get(server.url + "/metrics").text
    assert metric(text, "rewardserve_rejected_total", reason="queue_full") == refused
    assert metric(text, "rewardserve_queue_depth") == 0
    deadline = time.monotonic() + 5
    while established_connections(server.proc.pid, port) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert established_connections(server.proc.pid, port) == 0, "connections left open after the burst"
    again = httpx.post(server.url + "/v1/score", json={"prompt": cases[0][0], "response": cases[0][1]})
    assert again.status_code == 200 and abs(again.json()["raw"] - raw[0]) <= TOL


def test_overload_answers_503_with_retry_after_and_recovers(start_server, workload):
    cases, raw = workload
    # one item per run makes the queue build up, so the limit of 8 is really hit
    server = start_server(max_queue=8, max_batch_size=1, retry_after_s=2)
    t0 = time.monotonic()
    responses = asyncio.run(fire(server.url, cases[:100], timeout=30.0))
    assert time.monotonic() - t0 < 30.0
    statuses = []
    for response, expected in zip(responses, raw[:100]):
        assert isinstance(response, httpx.Response), f"request failed instead of being answered: {response!r}"
        statuses.append(response.status_code)
        if response.status_code == 200:
            assert abs(response.json()["raw"] - expected) <= TOL
        else:
            assert response.status_code == 503, response.text
            assert response.headers["retry-after"] == "2"
            assert response.json()["error"]["type"] == "overloaded"
    assert statuses.count(503) > 0 and statuses.count(200) >= 8, statuses
    text = httpx.get(server.url + "/metrics").text
    assert metric(text, "rewardserve_rejected_total", reason="queue_full") == statuses.count(503)
    assert metric(text, "rewardserve_queue_depth") == 0
    assert httpx.get(server.url + "/readyz").status_code == 200
    again = httpx.post(server.url + "/v1/score", json={"prompt": cases[0][0], "response": cases[0][1]})
    assert again.status_code == 200 and abs(again.json()["raw"] - raw[0]) <= TOL


def test_overload_status_429_is_configurable(start_server, workload):
    """The same overload answer as the 503 test, with status 429: every refusal is the overloaded error with
    Retry-After and counted, every admitted request is scored as offline."""
    cases, raw = workload
    server = start_server(max_queue=1, max_batch_size=1, overload_status=429, retry_after_s=3)
    responses = asyncio.run(fire(server.url, cases[:60], timeout=30.0))
    statuses = []
    for response, expected in zip(responses, raw[:60]):
        assert isinstance(response, httpx.Response), f"request failed instead of being answered: {response!r}"
        statuses.append(response.status_code)
        if response.status_code == 200:
            assert abs(response.json()["raw"] - expected) <= TOL, response.text
        else:
            assert response.status_code == 429, response.text
            assert response.headers["retry-after"] == "3"
            assert response.json()["error"]["type"] == "overloaded"
    assert statuses.count(429) > 0 and statuses.count(200) >= 1, statuses
    text = httpx.get(server.url + "/metrics").text
    assert metric(text, "rewardserve_rejected_total", reason="queue_full") == statuses.count(429)
    assert metric(text, "rewardserve_requests_total", route="/v1/score", status="429") == statuses.count(429)


def test_full_queue_and_draining_refuse_before_reading_the_body(bundle):
    """With the queue full (or the server draining), a scoring request is refused from its headers alone:
    the body is never waited for, parsed or validated, which is what keeps refusals fast in a burst."""
    with InProcessServer(bundle, wrap=lambda rt: RecordingRuntime(rt, delay_s=2.0), max_batch_size=1,
                         max_queue=2, retry_after_s=2) as srv:
        busy = [threading.Thread(target=httpx.post, args=(srv.url + "/v1/score",),
                                 kwargs={"json": {"prompt": "p", "response": f"busy {i}"}, "timeout": 30})
                for i in range(3)]
        # One at a time: the first until it runs (it leaves the queue), then each until it is queued. Sent
        # all at once, the third could meet the first two still holding their door slots and be refused,
        # and the queue would never fill.
        deadline = time.monotonic() + 10
        runs = len(srv.runtime.runs)
        busy[0].start()
        while len(srv.runtime.runs) == runs and time.monotonic() < deadline:
            time.sleep(0.005)
        for t in busy[1:]:
            depth = srv.service.queue_depth
            t.start()
            while srv.service.queue_depth == depth and time.monotonic() < deadline:
                time.sleep(0.005)
        assert srv.service.queue_depth == 2, "the queue never filled"
        elapsed, answer = send_headers_only(srv.url, "/v1/score", 1000)
        assert answer is not None, "no answer without the body: the request waited for it"
        status, headers, body = answer
        assert (status, json.loads(body)["error"]["type"], headers["retry-after"]) == (503, "overloaded", "2")
        assert elapsed < 0.5
        for t in busy:
            t.join(30)
        srv.service.begin_drain()
        elapsed, answer = send_headers_only(srv.url, "/v1/rank", 1000)
        assert answer is not None, "no answer without the body: the request waited for it"
        assert (answer[0], json.loads(answer[2])) == (503, {"error": {"type": "draining",
                                                                      "message": "server is shutting down"}})
        assert answer[1]["connection"] == "close" and elapsed < 0.5


def test_request_deadline_gives_504(server):
    r = httpx.post(server.url + "/v1/score", json={"prompt": "a", "response": "b"},
                   headers={"x-request-timeout": "0.000001"}, timeout=30)
    assert r.status_code == 504 and r.json()["error"]["type"] == "timeout"
    assert httpx.post(server.url + "/v1/score", json={"prompt": "a", "response": "b"}).status_code == 200


def test_deadline_is_capped_by_the_server_maximum_and_expired_items_never_run(bundle):
    """X-Request-Timeout: 100 on a server whose maximum is 1 s: the 1 s wins. With one 0.3 s model run at
    a time, later requests expire while queued: they get 504 at their deadline and never reach the model."""
    with InProcessServer(bundle, wrap=lambda rt: RecordingRuntime(rt, delay_s=0.3), max_batch_size=1,
                         request_timeout_s=1.0) as srv:
        srv.runtime.runs.clear()  # forget the warm-up run
        pairs = [(f"question {i}", f"answer number {i}") for i in range(8)]
        sent: dict[int, float] = {}

        async def main():
            limits = httpx.Limits(max_connections=16, max_keepalive_connections=0)
            async with httpx.AsyncClient(base_url=srv.url, timeout=30.0, limits=limits) as client:
                async def one(i):
                    sent[i] = time.monotonic()
                    r = await client.post("/v1/score", json={"prompt": pairs[i][0], "response": pairs[i][1]},
                                          headers={"x-request-timeout": "100"})
                    return r, time.monotonic() - sent[i]

                return await asyncio.gather(*(one(i) for i in range(len(pairs))))

        answers = asyncio.run(main())
        deadline = time.monotonic() + 10  # the batcher counts its drops when it next looks at the queue
        while srv.service.queue_depth and time.monotonic() < deadline:
            time.sleep(0.01)
        text = httpx.get(srv.url + "/metrics").text
        statuses = [r.status_code for r, _ in answers]
        assert set(statuses) <= {200, 504} and 200 in statuses and 504 in statuses, statuses
        for r, elapsed in answers:
            if r.status_code == 504:
                body = r.json()
                assert set(body) == {"error"} and set(body["error"]) == {"type", "message"}, body
                assert body["error"]["type"] == "timeout"
                assert re.fullmatch(r"(request deadline passed|deadline passed while queued) \(timeout 1 s or "
                                    r"x-request-timeout\)", body["error"]["message"]), body
                assert 0.95 <= elapsed < 1.6, f"504 after {elapsed:.2f} s: the 1 s server maximum was not applied"
            else:
                assert elapsed < 1.1
        # No model run started after the deadline of a request it computed (send time + 1 s, + slack for
        # the request to reach the server), and requests that expired while queued never ran.
        rows = {srv.encode(*pairs[i]): i for i in range(len(pairs))}
        for start, run_rows, _ in srv.runtime.runs:
            for row in run_rows:
                assert start <= sent[rows[row]] + 1.0 + 0.1, "compute started for an expired request"
        computed = len(srv.runtime.computed_rows())
        assert computed < len(pairs), "every request was computed: nothing was dropped at its deadline"
        assert metric(text, "rewardserve_rejected_total", reason="deadline") == len(pairs) - computed
