"""Faults in the request path: a model run that raises fails only the requests of its batch (500 with an
error id), and clients that hang up while queued or while being tokenized cost no compute and are counted.

`InProcessServer` + `RecordingRuntime` inject the fault and record which rows the model computed; the rest
of the request path is the production code, over real HTTP.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import time

import httpx

from service.evaluate import score_pairs
from tests.helpers import (InProcessServer, RecordingRuntime, metric, raw_request, send_scores_and_hold,
                           slow_backlog_responses)


TOL = 1e-5


def test_a_failing_batch_fails_only_its_requests_with_500_and_an_error_id(bundle, offline, caplog):
    """A runtime that raises on every batch holding the token 'zebra': exactly the requests computed in
    a failed batch get 500 internal_error with an error id (body, X-Error-Id, server log); every other
    request is scored correctly, and the service keeps serving."""
    from service.bundle import open_bundle

    caplog.set_level(logging.ERROR, logger="rewardserve.app")
    _, encoder = open_bundle(bundle)
    poison = encoder.tokenizer.token_to_id("zebra")
    assert poison is not None
    with InProcessServer(bundle, wrap=lambda rt: RecordingRuntime(rt, poison_id=poison), max_batch_size=4,
                         max_wait_ms=20) as srv:
        pairs = [(f"question {i}", f"the zebra answer {i}" if i % 4 == 0 else f"a fine answer {i}")
                 for i in range(16)]
        expected = score_pairs(*offline, [p for p, _ in pairs], [r for _, r in pairs])

        async def main():
            limits = httpx.Limits(max_connections=20, max_keepalive_connections=0)
            async with httpx.AsyncClient(base_url=srv.url, timeout=30.0, limits=limits) as client:
                return await asyncio.gather(*(client.post("/v1/score", json={"prompt": p, "response": r})
                                              for p, r in pairs))

        answers = asyncio.run(main())
        failed_rows = {row for _, rows, failed in srv.runtime.runs if failed for row in rows}
        ok_rows = {row for _, rows, failed in srv.runtime.runs if not failed for row in rows}
        assert failed_rows and ok_rows
        error_ids = []
        for (prompt, response), r, raw in zip(pairs, answers, expected):
            row = srv.encode(prompt, response)
            if row in failed_rows:
                assert r.status_code == 500, r.text
                error_id = r.headers["x-error-id"]
                assert re.fullmatch(r"[0-9a-f]{16}", error_id)
                assert r.json() == {"error": {"type": "internal_error", "id": error_id,
                                              "message": f"model run failed (error id {error_id})"}}
                error_ids.append(error_id)
            else:
                assert row in ok_rows
                assert r.status_code == 200 and abs(r.json()["raw"] - raw) <= TOL, r.text
        assert len(set(error_ids)) == len(error_ids) >= 4  # one id per failed request
        logged = "\n".join(rec.getMessage() for rec in caplog.records)
        for error_id in error_ids:
            assert f"error id {error_id}: POST /v1/score: model run failed: injected fault" in logged
        with httpx.Client(base_url=srv.url, timeout=30.0) as c:
            assert c.get("/readyz").status_code == 200
            batch = c.post("/v1/score/batch", json={"items": [{"prompt": "a", "response": "fine"},
                                                              {"prompt": "a", "response": "zebra"}]})
            assert batch.status_code == 500 and batch.json()["error"]["type"] == "internal_error"
            fresh = ("a new question", "a new answer, never scored before")  # (not a score-cache hit)
            after = c.post("/v1/score", json={"prompt": fresh[0], "response": fresh[1]})
            assert after.status_code == 200, after.text
            assert abs(after.json()["raw"] - score_pairs(*offline, [fresh[0]], [fresh[1]])[0]) <= TOL
            assert srv.encode(*fresh) in srv.runtime.computed_rows()


def test_a_client_that_disconnects_while_queued_costs_no_compute(bundle):
    """Ten clients queue behind a slow rank request and hang up: their items are dropped before compute
    (the runtime never sees their token ids) and counted as disconnected."""
    with InProcessServer(bundle, wrap=lambda rt: RecordingRuntime(rt, delay_s=0.15), max_batch_size=1) as srv:
        rank = {"prompt": "p", "responses": [f"candidate {i}" for i in range(6)]}
        result: dict[str, httpx.Response] = {}
        blocker = threading.Thread(target=lambda: result.setdefault(
            "rank", httpx.post(srv.url + "/v1/rank", json=rank, timeout=30.0)))
        blocker.start()
        deadline = time.monotonic() + 10
        while srv.service.queue_depth < 2 and time.monotonic() < deadline:
            time.sleep(0.005)
        gone = [(f"prompt {i}", f"never computed {i}") for i in range(10)]
        socks = send_scores_and_hold(srv.url, gone)
        while srv.service.queue_depth < 12 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert srv.service.queue_depth >= 12, "the ten requests never queued"
        for sock in socks:
            sock.close()
        blocker.join(30)
        while srv.service.queue_depth and time.monotonic() < deadline + 10:
            time.sleep(0.01)
        assert result["rank"].status_code == 200
        computed = set(srv.runtime.computed_rows())
        assert not computed & {srv.encode(p, r) for p, r in gone}, "a disconnected client's item was computed"
        text = httpx.get(srv.url + "/metrics").text
        assert metric(text, "rewardserve_rejected_total", reason="disconnected") == len(gone)
        assert httpx.get(srv.url + "/readyz").status_code == 200


def test_a_client_that_disconnects_while_its_request_is_tokenized_is_counted(bundle):
    """The tokenizer pool is held busy, so ten admitted requests wait for tokenization (not yet queued) when
    their clients hang up: nothing of theirs is computed, and all ten items are still counted as dropped
    for disconnect (before, items lost at this stage were counted nowhere)."""
    with InProcessServer(bundle, wrap=RecordingRuntime) as srv:
        hold = threading.Event()
        # the (one) model's tokenizer pool: its one thread is taken until released
        srv.service.registry.scorer(None).tokenizer_pool.submit(hold.wait, 30)
        gone = [(f"prompt {i}", f"tokenized too late {i}") for i in range(10)]
        try:
            socks = send_scores_and_hold(srv.url, gone)
            deadline = time.monotonic() + 10
            while srv.service.queue_depth < 10 and time.monotonic() < deadline:
                time.sleep(0.005)
            assert srv.service.queue_depth == 10, "the ten requests were never admitted"
            for sock in socks:
                sock.close()
            while srv.service.queue_depth and time.monotonic() < deadline:
                time.sleep(0.01)
        finally:
            hold.set()
        assert srv.service.queue_depth == 0, "admitted items were not released after the clients left"
        text = httpx.get(srv.url + "/metrics").text
        assert metric(text, "rewardserve_rejected_total", reason="disconnected") == len(gone)
        assert not set(srv.runtime.computed_rows()) & {srv.encode(p, r) for p, r in gone}
        ok = httpx.post(srv.url + "/v1/score", json={"prompt": "p", "response": "after"}, timeout=30)
        assert ok.status_code == 200, ok.text


N_RANKS, N_CANDIDATES = 4, 128
QUEUE_WAIT_S = 120.0  # bound of each wait below (the backlog is ~5 s of compute on 2 shared CPU cores)


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
            deadline = time.monotonic() + QUEUE_WAIT_S  # a server that never queues them fails, not hangs
            while (depth := metric((await client.get("/metrics")).text, "rewardserve_queue_depth")) < 450:
                assert time.monotonic() < deadline, f"queue depth {depth} < 450 after {QUEUE_WAIT_S} s"
                await asyncio.sleep(0.001)
            socks = [raw_request(server.url, "/v1/score", {"prompt": "p", "response": f"r{i}"}) for i in range(20)]
            await asyncio.sleep(0.3)  # admitted and queued behind the ranks
            for sock in socks:
                sock.close()  # the clients go away
            done = await asyncio.wait_for(asyncio.gather(*ranks), QUEUE_WAIT_S)
            return done, (await client.get("/metrics")).text

    ranks, text = asyncio.run(main())
    assert [r.status_code for r in ranks] == [200] * N_RANKS
    # every one of the 20 was admitted and still queued when its client left (as the in-process twins check)
    dropped = metric(text, "rewardserve_rejected_total", reason="disconnected")
    assert dropped == 20, text
    assert metric(text, "rewardserve_batch_size_sum") == N_RANKS * N_CANDIDATES  # the dropped 20 never ran
    assert metric(text, "rewardserve_requests_total", route="/v1/score", status="499") == 20
    assert metric(text, "rewardserve_queue_depth") == 0
    assert httpx.get(server.url + "/readyz").status_code == 200
