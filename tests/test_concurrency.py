"""Concurrency, overload, deadlines and graceful shutdown against real server processes.

Each test starts its own server so that its /metrics counters start from zero.
"""

from __future__ import annotations

import asyncio
import json
import socket
import signal
import time

import httpx

from tests.conftest import metric, slow_backlog_responses


TOL = 1e-5


async def fire(url: str, cases, timeout: float = 60.0, headers=None) -> list:
    """All requests at once, each on its own connection; returns responses or the exception raised."""
    limits = httpx.Limits(max_connections=len(cases), max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as client:
        async def one(prompt, response):
            try:
                return await client.post("/v1/score", json={"prompt": prompt, "response": response}, headers=headers)
            except httpx.HTTPError as exc:
                return exc

        return await asyncio.gather(*(one(p, r) for p, r in cases))


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
    cases, _ = workload
    server = start_server(max_queue=1, max_batch_size=1, overload_status=429)
    responses = asyncio.run(fire(server.url, cases[:60], timeout=30.0))
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 429} and 429 in statuses
    assert all("retry-after" in r.headers for r in responses if r.status_code == 429)


def test_request_deadline_gives_504(server):
    r = httpx.post(server.url + "/v1/score", json={"prompt": "a", "response": "b"},
                   headers={"x-request-timeout": "0.000001"}, timeout=30)
    assert r.status_code == 504 and r.json()["error"]["type"] == "timeout"
    assert httpx.post(server.url + "/v1/score", json={"prompt": "a", "response": "b"}).status_code == 200


def test_sigterm_drains_queued_work_then_exits(start_server, workload):
    cases, raw = workload
    server = start_server(max_batch_size=1, drain_timeout_s=30, log_level="info")  # 1 item per run: a queue builds

    async def main():
        task = asyncio.ensure_future(fire(server.url, cases[:150], timeout=60.0))
        queued, deadline = 0.0, time.monotonic() + 30
        while queued < 10 and time.monotonic() < deadline and not task.done():
            text = (await asyncio.to_thread(httpx.get, server.url + "/metrics")).text
            queued = metric(text, "rewardserve_queue_depth")
        server.proc.send_signal(signal.SIGTERM)
        return queued, await task

    queued, responses = asyncio.run(main())
    assert queued >= 10, "never saw queued work; the test cannot check draining"
    assert server.proc.wait(timeout=40) in (0, -signal.SIGTERM)  # uvicorn re-raises SIGTERM after a clean exit
    ok = 0
    for response, expected in zip(responses, raw):
        if isinstance(response, httpx.Response):
            if response.status_code == 200:
                assert abs(response.json()["raw"] - expected) <= TOL
                ok += 1
            else:  # arrived after SIGTERM, not admitted
                assert response.status_code == 503 and response.json()["error"]["type"] == "draining", response.text
                assert "retry-after" in response.headers
        # else: the connection was refused or closed before its request was read (not admitted either)
    assert ok >= queued  # everything queued at SIGTERM was answered
    assert "Application shutdown complete" in server.output()


def raw_request(url: str, path: str, body: dict) -> socket.socket:
    """Send one complete HTTP request on a plain socket and leave the connection open (no reading)."""
    host, port = url.removeprefix("http://").split(":")
    data = json.dumps(body).encode()
    sock = socket.create_connection((host, int(port)), timeout=10)
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


N_RANKS, N_CANDIDATES = 4, 128


def test_disconnected_clients_are_dropped_before_compute(start_server, slow_bundle):
    server = start_server(bundle_dir=slow_bundle, max_batch_size=1, max_queue=4096)  # one item per run
    candidates = slow_backlog_responses(N_CANDIDATES)

    async def main():
        async with httpx.AsyncClient(base_url=server.url, timeout=120.0) as client:
            # 512 one-item runs of the slow model are ~5 s of compute here (≥ 1 s on a machine 5× faster),
            # so the requests sent once 450 are queued are surely admitted and still queued behind them
            # when their clients go away 0.3 s later
            ranks = [asyncio.ensure_future(client.post("/v1/rank", json={"prompt": f"p{k}", "responses": candidates}))
                     for k in range(N_RANKS)]
            while metric((await client.get("/metrics")).text, "rewardserve_queue_depth") < 450:
                await asyncio.sleep(0.001)
            socks = [raw_request(server.url, "/v1/score", {"prompt": "p", "response": f"r{i}"}) for i in range(20)]
            await asyncio.sleep(0.3)  # admitted and queued behind the ranks
            for sock in socks:
                sock.close()  # the clients go away
            done = await asyncio.gather(*ranks)
            return done, (await client.get("/metrics")).text

    ranks, text = asyncio.run(main())
    assert [r.status_code for r in ranks] == [200] * N_RANKS
    dropped = metric(text, "rewardserve_rejected_total", reason="disconnected")
    assert dropped >= 1, text
    assert metric(text, "rewardserve_batch_size_sum") == N_RANKS * N_CANDIDATES + 20 - dropped  # dropped never ran
    assert metric(text, "rewardserve_requests_total", route="/v1/score", status="499") >= dropped
    assert metric(text, "rewardserve_queue_depth") == 0
    assert httpx.get(server.url + "/readyz").status_code == 200
