"""Reliability (issue 6): overload, deadlines, the bad-input catalogue's remaining cases, graceful drain,
bundle integrity, injected runtime faults, disconnects, and the 30-second soak.

Two kinds of server, both real HTTP on 127.0.0.1:
  * `start_server` (conftest): the real `rewardserve serve` subprocess, for what needs the real process
    (signals, exit codes, start-up refusal, load);
  * `InProcessServer`: `create_app(settings, runtime=...)` under a real uvicorn in a thread, where a
    test needs to see or break the runtime through the `Runtime` interface (fault injection, counting
    which rows were computed). Everything else in the request path is the production code.
"""

from __future__ import annotations

import ast
import asyncio
import json
import logging
import math
import os
import re
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest
import uvicorn

from service.evaluate import score_pairs
from tests.conftest import REPO, free_port, metric, slow_backlog_responses

TOL = 1e-5


# ---------------------------------------------------------------- helpers

def server_ms(response: httpx.Response) -> float:
    """Time the server spent on the request, from its `Server-Timing: app;dur=<ms>` header."""
    match = re.fullmatch(r"app;dur=([0-9.]+)", response.headers["server-timing"])
    assert match, response.headers["server-timing"]
    return float(match.group(1))


class RecordingRuntime:
    """Wraps the real runtime through the `Runtime` interface: records every row it is asked to compute
    (token ids without padding), and can sleep per run or fail runs that hold a poison token."""

    def __init__(self, inner, delay_s: float = 0.0, poison_id: int | None = None):
        self.inner, self.delay_s, self.poison_id = inner, delay_s, poison_id
        self.name, self.provider = inner.name, inner.provider
        self.runs: list[tuple[float, list[tuple[int, ...]], bool]] = []  # (start, rows, failed)
        self.lock = threading.Lock()

    def run(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        start = time.monotonic()
        rows = [tuple(int(t) for t, m in zip(ids, mask) if m)
                for ids, mask in zip(inputs["input_ids"], inputs["attention_mask"])]
        failed = self.poison_id is not None and any(self.poison_id in row for row in rows)
        with self.lock:
            self.runs.append((start, rows, failed))
        if self.delay_s:
            time.sleep(self.delay_s)
        if failed:
            raise RuntimeError("injected fault: poison token in this batch")
        return self.inner.run(inputs)

    def describe(self) -> dict:
        return {**self.inner.describe(), "wrapped_by": "RecordingRuntime"}

    def __getattr__(self, name):  # anything else the service asks a runtime (e.g. batch hints): the real one's
        return getattr(self.inner, name)

    def computed_rows(self) -> list[tuple[int, ...]]:
        with self.lock:
            return [row for _, rows, _ in self.runs for row in rows]


class InProcessServer:
    """create_app(settings, runtime=...) served by a real uvicorn on 127.0.0.1, in a thread."""

    def __init__(self, bundle: Path, wrap=None, **settings):
        from service.app import create_app
        from service.bundle import read_manifest
        from service.runtime import load_runtime
        from service.settings import Settings

        options = {"intra_op_threads": 1, "tokenizer_threads": 1, "log_level": "warning", **settings}
        s = Settings(bundle=bundle, **options)
        runtime = load_runtime(bundle, read_manifest(bundle), provider=s.provider, intra_op_threads=s.intra_op_threads,
                               fp16=s.fp16, io_binding=s.ort_io_binding)
        self.runtime = wrap(runtime) if wrap else runtime
        self.app = create_app(s, runtime=self.runtime)
        self.service = self.app.state.engine
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=port, log_level="warning",
                                                    lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, name="uvicorn-test", daemon=True)

    def __enter__(self) -> "InProcessServer":
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert self.thread.is_alive(), "in-process server failed to start (see the log)"
            assert time.monotonic() < deadline, "in-process server not started after 60 s"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        assert not self.thread.is_alive(), "in-process server did not stop"

    def encode(self, prompt: str, response: str) -> tuple[int, ...]:
        """The token ids the runtime sees for this pair (what RecordingRuntime records)."""
        return tuple(self.service.encoder.encode([prompt], [response])[0].ids)


@dataclass
class RawAnswer:
    status: int
    headers: dict[str, str]
    body: bytes
    seconds: float  # from the request's first byte sent to the answer's last byte received

    def json(self):
        return json.loads(self.body)


def http_request(url: str, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None) -> bytes:
    host = url.removeprefix("http://")
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}", f"Content-Length: {len(body)}",
             *(f"{k}: {v}" for k, v in (headers or {}).items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def send_scores_and_hold(url: str, pairs: list[tuple[str, str]]) -> list[socket.socket]:
    """POST /v1/score for each (prompt, response) on its own socket and return the open sockets unread,
    so a test can hang up on them (close) at the moment it chooses."""
    host, port = url.removeprefix("http://").split(":")
    socks = []
    for prompt, response in pairs:
        sock = socket.create_connection((host, int(port)), timeout=10)
        sock.sendall(http_request(url, "POST", "/v1/score",
                                  json.dumps({"prompt": prompt, "response": response}).encode(), J))
        socks.append(sock)
    return socks


def raw_burst(url: str, requests: list[bytes], timeout: float) -> list[RawAnswer | str]:
    """Send every request at once, each on its own pre-opened connection, and time each answer.

    A minimal HTTP/1.1 client on plain sockets, so that what is timed is the server, not a client library:
    connections are opened first, then all requests are written back to back, then answers are read
    as they come. Returns an answer, or a string saying why there was none, per request."""
    host, port = url.removeprefix("http://").split(":")
    socks = [socket.create_connection((host, int(port)), timeout=timeout) for _ in requests]
    selector = selectors.DefaultSelector()
    buffers, started, results = {}, {}, [None] * len(requests)
    for i, (sock, data) in enumerate(zip(socks, requests)):
        started[i] = time.perf_counter()
        sock.sendall(data)
        sock.setblocking(False)
        buffers[i] = b""
        selector.register(sock, selectors.EVENT_READ, i)
    deadline = time.monotonic() + timeout
    open_count = len(socks)
    while open_count and time.monotonic() < deadline:
        for key, _ in selector.select(timeout=0.05):
            i, sock = key.data, key.fileobj
            try:
                chunk = sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError as exc:
                chunk, results[i] = b"", f"connection error: {exc!r}"
            buffers[i] += chunk
            answer = _parse_answer(buffers[i])
            if answer is not None:
                status, headers, body = answer
                results[i] = RawAnswer(status, headers, body, time.perf_counter() - started[i])
            if answer is not None or not chunk:
                if results[i] is None:
                    results[i] = f"connection closed without a complete answer ({len(buffers[i])} bytes)"
                selector.unregister(sock)
                sock.close()
                open_count -= 1
    for i, sock in enumerate(socks):
        if results[i] is None:
            results[i] = f"no answer within {timeout} s"
            sock.close()
    return results


def _parse_answer(data: bytes):
    head, sep, rest = data.partition(b"\r\n\r\n")
    if not sep:
        return None
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", 0))
    if len(rest) < length:
        return None
    return int(status_line.split()[1]), headers, rest[:length]


def established_connections(pid: int, port: int) -> int:
    return sum(1 for c in psutil.Process(pid).net_connections(kind="tcp")
               if c.status == psutil.CONN_ESTABLISHED and c.laddr.port == port)


# ---------------------------------------------------------------- 1. overload and deadlines

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


def send_headers_only(url: str, path: str, length: int) -> tuple[float, tuple | None]:
    """POST with Content-Length but no body; (seconds to the answer, parsed answer or None if none came)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=3) as sock:
        t0 = time.monotonic()
        sock.sendall(http_request(url, "POST", path, b"", J).replace(b"Content-Length: 0",
                                                                     f"Content-Length: {length}".encode()))
        data = b""
        try:
            while _parse_answer(data) is None:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
        except socket.timeout:
            pass
        return time.monotonic() - t0, _parse_answer(data)


def test_full_queue_and_draining_refuse_before_reading_the_body(bundle):
    """With the queue full (or the server draining), a scoring request is refused from its headers alone:
    the body is never waited for, parsed or validated, which is what keeps refusals fast in a burst."""
    with InProcessServer(bundle, wrap=lambda rt: RecordingRuntime(rt, delay_s=0.5), max_batch_size=1,
                         max_queue=2, retry_after_s=2) as srv:
        busy = [threading.Thread(target=httpx.post, args=(srv.url + "/v1/score",),
                                 kwargs={"json": {"prompt": "p", "response": f"busy {i}"}, "timeout": 30})
                for i in range(3)]
        for t in busy:
            t.start()
        deadline = time.monotonic() + 10
        while srv.service.queue_depth < 2 and time.monotonic() < deadline:
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


# ---------------------------------------------------------------- 2. the bad-input catalogue, exact bodies
# tests/test_bad_input.py covers field naming for many shapes; these pin the exact status and body of
# every catalogue entry, including the ones it does not reach (bytes, NaN, huge sizes, routes).

def v422(field: str, message: str) -> dict:
    return {"error": {"type": "validation_error", "message": f"{field}: {message}", "field": field}}


def bad_json(message: str) -> dict:
    return {"error": {"type": "invalid_json", "message": f"request body is not valid JSON: {message}"}}


BAD_TIMEOUT = {"error": {"type": "invalid_request", "message": "header x-request-timeout must be a positive number "
                         "of seconds", "field": "x-request-timeout"}}
BLANK = "must not be empty or whitespace-only"
J = {"Content-Type": "application/json"}

CATALOGUE = [
    # (id, method, path, body bytes, headers, status, exact body)
    ("empty-prompt", "POST", "/v1/score", b'{"prompt": "", "response": "fine"}', J, 422, v422("prompt", BLANK)),
    ("empty-response", "POST", "/v1/score", b'{"prompt": "hi", "response": ""}', J, 422, v422("response", BLANK)),
    ("whitespace-only", "POST", "/v1/score", b'{"prompt": "hi", "response": " \\n\\t\\u3000"}', J, 422,
     v422("response", BLANK)),
    ("missing-field", "POST", "/v1/score", b'{"prompt": "hi"}', J, 422,
     v422("response", "field required (or give 'messages')")),
    ("extra-field", "POST", "/v1/score", b'{"prompt": "x", "response": "y", "temperature": 1}', J, 422,
     v422("temperature", "unknown field")),
    ("wrong-type-number", "POST", "/v1/score", b'{"prompt": 123, "response": "x"}', J, 422,
     v422("prompt", "Input should be a valid string")),
    ("wrong-type-bool", "POST", "/v1/score", b'{"prompt": "x", "response": "y", "truncate": "yes"}', J, 422,
     v422("truncate", "Input should be a valid boolean")),
    ("body-not-object", "POST", "/v1/score", b'["x", "y"]', J, 422,
     {"error": {"type": "validation_error", "message": "request body must be a JSON object"}}),
    ("body-empty", "POST", "/v1/score", b"", J, 422,
     {"error": {"type": "validation_error", "message": "request body is required (a JSON object)"}}),
    ("not-json-content-type", "POST", "/v1/score", b'{"prompt": "x", "response": "y"}', {"Content-Type": "text/plain"},
     415, {"error": {"type": "unsupported_media_type", "message": "send the body as JSON with Content-Type: "
                     "application/json (got text/plain)"}}),
    ("invalid-json", "POST", "/v1/score", b'{"prompt": "x", ', J, 400,
     bad_json("Expecting property name enclosed in double quotes at position 16")),
    ("invalid-utf8", "POST", "/v1/score", b'{"prompt": "\xff\xfe", "response": "x"}', J, 400,
     bad_json("not UTF-8 (byte 0xff at position 12)")),
    ("raw-nul-in-string", "POST", "/v1/score", b'{"prompt": "a\x00b", "response": "x"}', J, 400,
     bad_json("Invalid control character at position 13")),
    ("raw-control-in-string", "POST", "/v1/score", b'{"prompt": "a\x1bb", "response": "x"}', J, 400,
     bad_json("Invalid control character at position 13")),
    ("nan-top-k", "POST", "/v1/rank", b'{"prompt": "p", "responses": ["a"], "top_k": NaN}', J, 422,
     v422("top_k", "Input should be a valid integer")),
    ("inf-top-k", "POST", "/v1/rank", b'{"prompt": "p", "responses": ["a"], "top_k": Infinity}', J, 422,
     v422("top_k", "Input should be a valid integer")),
    ("overflow-top-k", "POST", "/v1/rank", b'{"prompt": "p", "responses": ["a"], "top_k": 1e999}', J, 422,
     v422("top_k", "Input should be a valid integer")),
    ("nan-as-text", "POST", "/v1/score", b'{"prompt": NaN, "response": "x"}', J, 422,
     v422("prompt", "Input should be a valid string")),
    ("minus-inf-as-bool", "POST", "/v1/compare", b'{"prompt": "p", "a": "x", "b": "y", "truncate": -Infinity}', J,
     422, v422("truncate", "Input should be a valid boolean")),
    ("timeout-nan", "POST", "/v1/score", b'{"prompt": "x", "response": "y"}', {**J, "X-Request-Timeout": "nan"},
     400, BAD_TIMEOUT),
    ("timeout-inf", "POST", "/v1/score", b'{"prompt": "x", "response": "y"}', {**J, "X-Request-Timeout": "inf"},
     400, BAD_TIMEOUT),
    ("timeout-zero", "POST", "/v1/score", b'{"prompt": "x", "response": "y"}', {**J, "X-Request-Timeout": "0"},
     400, BAD_TIMEOUT),
    ("timeout-negative", "POST", "/v1/score", b'{"prompt": "x", "response": "y"}', {**J, "X-Request-Timeout": "-1"},
     400, BAD_TIMEOUT),
    ("batch-too-many-items", "POST", "/v1/score/batch",
     json.dumps({"items": [{"prompt": "a", "response": "b"}] * 257}).encode(), J, 422,
     v422("items", "at most 256 items per request (got 257); split the batch")),
    ("batch-no-items", "POST", "/v1/score/batch", b'{"items": []}', J, 422,
     v422("items", "must hold at least one item")),
    ("rank-zero-candidates", "POST", "/v1/rank", b'{"prompt": "p", "responses": []}', J, 422,
     v422("responses", "List should have at least 1 item after validation, not 0")),
    ("rank-10000-candidates", "POST", "/v1/rank", json.dumps({"prompt": "p", "responses": ["x"] * 10_000}).encode(),
     J, 422, v422("responses", "at most 256 per request (got 10000)")),
    ("unknown-route", "GET", "/v2/score", b"", {}, 404,
     {"error": {"type": "not_found", "message": "no route /v2/score"}}),
    ("unknown-route-post", "POST", "/v1/scores", b'{"prompt": "x", "response": "y"}', J, 404,
     {"error": {"type": "not_found", "message": "no route /v1/scores"}}),
    ("wrong-method-delete", "DELETE", "/v1/score", b"", {}, 405,
     {"error": {"type": "method_not_allowed", "message": "method DELETE not allowed on /v1/score"}}),
    ("wrong-method-put", "PUT", "/healthz", b"", {}, 405,
     {"error": {"type": "method_not_allowed", "message": "method PUT not allowed on /healthz"}}),
    ("cors-preflight", "OPTIONS", "/v1/score", b"",
     {"Origin": "https://example.com", "Access-Control-Request-Method": "POST"}, 405,
     {"error": {"type": "method_not_allowed", "message": "method OPTIONS not allowed on /v1/score"}}),
]


@pytest.mark.parametrize("case", CATALOGUE, ids=[c[0] for c in CATALOGUE])
def test_bad_input_catalogue(server, case):
    _, method, path, body, headers, status, expected = case
    [r] = raw_burst(server.url, [http_request(server.url, method, path, body, headers)], timeout=30.0)
    assert isinstance(r, RawAnswer), r
    assert (r.status, r.json()) == (status, expected), r.body
    assert r.headers["content-type"] == "application/json"
    if status == 405:
        assert r.headers["allow"] == ("GET" if path == "/healthz" else "POST")
    assert "access-control-allow-origin" not in r.headers  # CORS is off


def test_escaped_nul_and_control_characters_are_text(server):
    """JSON-escaped NUL and control characters are valid text: scored as the tokenizer normalizes them
    (BERT drops control characters), never a 5xx."""
    with httpx.Client(base_url=server.url, timeout=30.0) as c:
        dirty = c.post("/v1/score", json={"prompt": "a\u0000b\u0007\u001b", "response": "fine\u0001"})
        clean = c.post("/v1/score", json={"prompt": "ab", "response": "fine"})
        assert dirty.status_code == 200 and clean.status_code == 200, dirty.text
        assert dirty.json()["raw"] == clean.json()["raw"] and dirty.json()["n_tokens"] == clean.json()["n_tokens"]
        assert math.isfinite(dirty.json()["score"])
        assert c.get("/v1/score", headers={"Origin": "https://example.com"}).headers.get(
            "access-control-allow-origin") is None


def test_10_mb_body_is_refused_before_it_is_read(server):
    """Content-Length: 10 MB, and only the first 64 KB sent: the 413 comes back at once, so the server
    neither waited for nor parsed the body."""
    host, port = server.url.removeprefix("http://").split(":")
    size = 10 * 1024 * 1024
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        t0 = time.monotonic()
        sock.sendall(http_request(server.url, "POST", "/v1/score", b"", J).replace(
            b"Content-Length: 0", f"Content-Length: {size}".encode()) + b'{"prompt": "' + b"x" * 65536)
        data = b""
        while _parse_answer(data) is None:
            chunk = sock.recv(65536)
            assert chunk, f"connection closed without an answer: {data!r}"
            data += chunk
        elapsed = time.monotonic() - t0
    status, headers, body = _parse_answer(data)
    assert (status, json.loads(body)) == (413, {"error": {"type": "payload_too_large",
                                                          "message": "request body exceeds 2000000 bytes"}})
    assert elapsed < 2.0
    assert httpx.get(server.url + "/readyz").status_code == 200


def test_1m_character_text_is_truncated_or_422_with_bounded_tokenization(server):
    text = "word " * 200_000  # 1,000,000 characters
    with httpx.Client(base_url=server.url, timeout=30.0) as c:
        max_length = c.get("/v1/models").json()["data"][0]["max_length"]
        r = c.post("/v1/score", json={"prompt": "hi", "response": text})
        assert r.status_code == 200, r.text
        assert r.json()["truncated"] is True and r.json()["n_tokens"] == max_length
        # Tokenizing all 1 M characters takes ~0.7 s on this machine; the encoder cuts the text to
        # max_length × 32 characters first, so the whole request stays far below that.
        assert server_ms(r) < 300, f"{server_ms(r):.0f} ms: tokenization of a 1 M-character text is not bounded"
        r = c.post("/v1/score", json={"prompt": "hi", "response": text, "truncate": False})
        assert (r.status_code, r.json()) == (422, {"error": {
            "type": "validation_error", "field": "response",
            "message": f"input is longer than the model's max_length of {max_length} tokens; shorten the response "
                       "or send \"truncate\": true to cut it (the response end is kept)"}}), r.text
        assert server_ms(r) < 300


# ---------------------------------------------------------------- 4. graceful drain

def test_sigterm_during_200_request_load_answers_every_request(start_server, workload):
    """SIGTERM while 200 requests are queued or in flight: readiness turns 503 at once, new requests get
    503 draining + Retry-After (the server keeps listening), every one of the 200 is answered (scored
    correctly), and the process exits 0 once the queue is empty."""
    cases, raw = workload
    server = start_server(max_batch_size=1, drain_timeout_s=30, log_level="info")
    requests = [http_request(server.url, "POST", "/v1/score", json.dumps({"prompt": p, "response": r}).encode(), J)
                for p, r in cases]
    result: dict[str, list] = {}
    load = threading.Thread(target=lambda: result.setdefault("answers", raw_burst(server.url, requests, 60.0)))
    load.start()
    queued, deadline = 0.0, time.monotonic() + 30
    with httpx.Client(base_url=server.url, timeout=10.0) as c:
        while queued < 20 and time.monotonic() < deadline and load.is_alive():
            queued = metric(c.get("/metrics").text, "rewardserve_queue_depth")
    assert queued >= 20, "never saw queued work; the test cannot check draining"
    t_signal = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    time.sleep(0.05)
    late = [http_request(server.url, "GET", "/readyz")] + [
        http_request(server.url, "POST", "/v1/score", json.dumps({"prompt": "late", "response": f"r{i}"}).encode(), J)
        for i in range(10)]
    late_answers = raw_burst(server.url, late, timeout=10.0)
    load.join(60)
    code = server.proc.wait(timeout=40)
    exit_s = time.monotonic() - t_signal

    draining = {"error": {"type": "draining", "message": "server is shutting down"}}
    for r in late_answers:  # after SIGTERM: refused, not dropped
        assert isinstance(r, RawAnswer), r
        assert (r.status, r.json()) == (503, draining) and r.headers["retry-after"] == "1", r.body
        assert r.headers["connection"] == "close"
    answers = result["answers"]
    for i, r in enumerate(answers):
        assert isinstance(r, RawAnswer), f"request {i} dropped without an answer: {r}"
        assert r.status == 200, r.body  # all 200 were admitted before the signal: all are scored
        assert abs(r.json()["raw"] - raw[i]) <= TOL
    assert code == 0, server.output()[-2000:]
    assert exit_s < 30, exit_s
    log = server.output()
    assert "draining: refusing new work" in log and "drained: nothing in flight" in log, log[-2000:]
    assert "Application shutdown complete" in log


def test_drain_timeout_bounds_the_exit_and_answers_what_was_left(start_server, slow_bundle):
    """More queued work than drain_timeout_s allows: at the deadline the rest is answered 503 draining,
    and the process exits within the grace period (+ 1 s to write the answers, + process teardown).

    The backlog is made of ~210-token items of a 4-layer, 256-wide BERT run one at a time: about as many
    milliseconds each as the tiny model's items take tens of microseconds, so 200 queued items are
    seconds of work, far beyond the 0.2 s timeout on any CPU."""
    server = start_server(bundle_dir=slow_bundle, max_batch_size=1, max_queue=4096, drain_timeout_s=0.2,
                          log_level="info")
    candidates = slow_backlog_responses(64)
    bodies = [json.dumps({"prompt": f"p{k}", "responses": candidates}).encode() for k in range(4)]
    requests = [http_request(server.url, "POST", "/v1/rank", b, J) for b in bodies]
    result: dict[str, list] = {}
    load = threading.Thread(target=lambda: result.setdefault("answers", raw_burst(server.url, requests, 60.0)))
    load.start()
    queued, deadline = 0.0, time.monotonic() + 30
    with httpx.Client(base_url=server.url, timeout=10.0) as c:
        while queued < 200 and time.monotonic() < deadline and load.is_alive():
            queued = metric(c.get("/metrics").text, "rewardserve_queue_depth")
    assert queued >= 200, "never saw queued work; the test cannot check the drain timeout"
    t_signal = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    code = server.proc.wait(timeout=30)
    exit_s = time.monotonic() - t_signal
    load.join(30)
    statuses = []
    for r in result["answers"]:
        assert isinstance(r, RawAnswer), f"dropped without an answer: {r}"
        statuses.append(r.status)
        if r.status != 200:
            body = r.json()
            assert r.status == 503 and body["error"]["type"] == "draining", r.body
            assert body["error"]["message"] in ("server shut down before this item ran",
                                                "server shut down before this request ran")
    assert 503 in statuses, (statuses, server.output()[-2000:])
    assert code == 0, server.output()[-2000:]
    assert exit_s < 0.2 + 1.0 + 2.5, f"exit {exit_s:.2f} s after SIGTERM with drain_timeout_s=0.2"
    assert "drain timeout" in server.output()


# ---------------------------------------------------------------- 5. integrity and safe loading

def copy_bundle(bundle: Path, tmp_path: Path) -> Path:
    target = tmp_path / "bundle"
    shutil.copytree(bundle, target)
    return target


def test_truncated_model_file_refuses_to_start_and_names_it(start_server, bundle, tmp_path):
    broken = copy_bundle(bundle, tmp_path)
    model = broken / "model.onnx"
    model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])
    server = start_server(bundle_dir=broken, wait_ready=False)
    assert server.proc.wait(timeout=60) == 3
    assert "model.onnx: sha256 mismatch" in server.output()


def test_swapped_model_file_and_unlisted_pickle_are_refused(bundle, tmp_path):
    """A different, valid ONNX model in place of the exported one, or a pickle file dropped into the
    bundle: the sha256 manifest catches both before anything is loaded, naming the file."""
    import onnx
    from onnx import TensorProto, helper

    from service.bundle import BundleError, open_bundle

    swapped = copy_bundle(bundle, tmp_path)
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "other",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    onnx.save(helper.make_model(graph), str(swapped / "model.onnx"))
    with pytest.raises(BundleError, match=r"model\.onnx: sha256 mismatch"):
        open_bundle(swapped)
    planted = tmp_path / "planted"
    shutil.copytree(bundle, planted)
    (planted / "pytorch_model.bin").write_bytes(b"\x80\x04K\x01.")  # pickle.dumps(1)
    with pytest.raises(BundleError, match=r"pytorch_model\.bin: not listed in manifest"):
        open_bundle(planted)


# Deserializers that can run code from a file. Serving and exporting read safetensors, ONNX and JSON only.
UNSAFE_MODULES = {"pickle", "cPickle", "dill", "joblib", "cloudpickle", "shelve", "marshal"}
UNSAFE_CALLS = {"torch.load", "pickle.load", "pickle.loads", "pd.read_pickle", "pandas.read_pickle"}


def test_no_code_path_deserializes_pickle():
    """Static check over service/ and export/: no pickle-family import, no torch.load, no np.load with
    allow_pickle, and torch.jit.load only in the TorchScript runtime (reached only after open_bundle)."""
    problems, jit_loads = [], []
    for path in sorted([*(REPO / "service").rglob("*.py"), *(REPO / "export").rglob("*.py")]):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            where = f"{path.relative_to(REPO)}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, ast.Import):
                problems += [f"{where} imports {a.name}" for a in node.names if a.name.split(".")[0] in UNSAFE_MODULES]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in UNSAFE_MODULES:
                problems.append(f"{where} imports from {node.module}")
            elif isinstance(node, ast.Call):
                name = ast.unparse(node.func)
                if name in UNSAFE_CALLS:
                    problems.append(f"{where} calls {name}")
                if name.endswith("jit.load"):
                    jit_loads.append(where)
                if name in ("np.load", "numpy.load") and any(k.arg == "allow_pickle" for k in node.keywords):
                    problems.append(f"{where} calls {name} with allow_pickle")
    assert not problems, problems
    assert [w.split(":")[0] for w in jit_loads] == ["service/runtime.py"], jit_loads
    source = (REPO / "service" / "engine.py").read_text()
    assert source.index("open_bundle(s.bundle)") < source.index("load_runtime(s.bundle")


# ---------------------------------------------------------------- 7. faults

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
        srv.service.tokenizer_pool.submit(hold.wait, 30)  # the pool's one thread is taken until released
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


# ---------------------------------------------------------------- 8. soak (the CI version)

def test_soak_30_seconds_at_70_percent_of_capacity(bundle, tmp_path):
    """loadtests/soak.py for 30 s (the documented soak runs 10 min): locust's mixed scenario at 70 % of the
    capacity it measures first; zero failed requests, zero refusals or drops, RSS growth < 5 %."""
    out = tmp_path / "soak"
    run = subprocess.run([sys.executable, str(REPO / "loadtests" / "soak.py"), "--bundle", str(bundle),
                          "--duration", "30", "--probe", "5", "--out", str(out)],
                         capture_output=True, text=True, timeout=240, cwd=REPO)
    assert (out / "soak.json").exists(), run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads((out / "soak.json").read_text())
    print("\n" + run.stdout.strip().splitlines()[-1])
    assert result["requests"] >= 0.5 * result["target_rps"] * 30, result  # the load really ran
    assert result["failures"] == 0 and result["server_5xx"] == 0, result["failure_examples"]
    assert not result["server_refusals_and_drops"], result
    assert result["rss_growth"] < 0.05, result
    assert result["server_ready_after"]
    assert {"/v1/score", "/v1/score/batch", "/v1/rank"} <= set(result["by_route"])
    assert (out / "mixed_stats.csv").exists() and (out / "rss.csv").exists()
    assert run.returncode == 0, run.stdout[-3000:]
