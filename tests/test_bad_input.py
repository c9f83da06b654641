"""Bad input over real HTTP: every case gets its documented 4xx and the one error shape naming the problem."""

from __future__ import annotations

import json
import socket

import httpx
import pytest

LONG = "and the end of a long answer " * 40  # far over the tiny bundle's 64-token max_length


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=30.0) as c:
        yield c


def assert_error(r: httpx.Response, status: int, type_: str, field: str | None = None) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) <= {"type", "message", "field"}
    assert error["type"] == type_, error
    assert error["message"]
    assert error.get("field") == field, error
    if field:
        assert field in error["message"] or "longer than" in error["message"], error
    return error


@pytest.mark.parametrize("body, field", [
    ({"prompt": "", "response": "fine"}, "prompt"),
    ({"prompt": "hi", "response": "  \n\t "}, "response"),
    ({"prompt": "hi"}, "response"),
    ({"response": "hi"}, "prompt"),
    ({"prompt": 123, "response": "x"}, "prompt"),
    ({"prompt": "x", "response": ["x"]}, "response"),
    ({"prompt": "x", "response": None}, "response"),
    ({"prompt": "x", "response": "y", "truncate": "yes"}, "truncate"),
    ({"prompt": "x", "respones": "y"}, "respones"),  # the typo is what gets named
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "again"}]}, "messages.1.role"),
    ({"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}]}, "messages.0.role"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}]}, "messages.1.content"),
    ({"messages": [{"role": "assistant", "content": "x"}]}, "messages"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}], "prompt": "p"},
     "prompt"),
])
def test_score_rejects_bad_fields(client, body, field):
    assert_error(client.post("/v1/score", json=body), 422, "validation_error", field)


def test_unknown_field_is_named(client):
    error = assert_error(client.post("/v1/score", json={"prompt": "x", "response": "y", "temperature": 1}),
                         422, "validation_error", "temperature")
    assert "unknown field" in error["message"]


def test_invalid_json_and_non_object_bodies(client):
    headers = {"content-type": "application/json"}
    error = assert_error(client.post("/v1/score", content=b'{"prompt": "x", ', headers=headers), 400, "invalid_json")
    assert "not valid JSON" in error["message"]
    assert_error(client.post("/v1/score", content=b'["x", "y"]', headers=headers), 422, "validation_error")
    assert_error(client.post("/v1/score", content=b"", headers=headers), 422, "validation_error")
    error = assert_error(client.post("/v1/score", content=b'{"prompt":"x","response":"y"}',
                                     headers={"content-type": "text/plain"}), 415, "unsupported_media_type")
    assert "application/json" in error["message"]


def test_wrong_route_and_method(client):
    assert_error(client.get("/v1/nothing"), 404, "not_found")
    r = client.get("/v1/score")
    assert_error(r, 405, "method_not_allowed")
    assert r.headers["allow"] == "POST"


def test_over_long_text_is_truncated_and_flagged_by_default(client):
    manifest_max = client.get("/v1/models").json()["data"][0]["max_length"]
    r = client.post("/v1/score", json={"prompt": "hi", "response": LONG})
    assert r.status_code == 200, r.text
    assert r.json()["truncated"] is True and r.json()["n_tokens"] == manifest_max
    huge = client.post("/v1/score", json={"prompt": "hi", "response": "word " * 350_000})  # 1.75 MB
    assert huge.status_code == 200 and huge.json()["truncated"] is True


@pytest.mark.parametrize("route, body, field", [
    ("/v1/score", {"prompt": "hi", "response": LONG, "truncate": False}, "response"),
    ("/v1/score", {"prompt": LONG, "response": "short", "truncate": False}, "prompt"),
    ("/v1/score", {"messages": [{"role": "user", "content": LONG}, {"role": "assistant", "content": "ok"}],
                   "truncate": False}, "messages"),
    ("/v1/rank", {"prompt": "hi", "responses": ["ok", LONG], "truncate": False}, "responses.1"),
    ("/v1/compare", {"prompt": "hi", "a": "ok", "b": LONG, "truncate": False}, "b"),
])
def test_over_long_text_with_truncate_false_is_422(client, route, body, field):
    error = assert_error(client.post(route, json=body), 422, "validation_error", field)
    assert "max_length" in error["message"] and "truncate" in error["message"]


def test_batch_item_errors_do_not_fail_the_request(client):
    items = [{"prompt": "a", "response": "fine"},
             {"prompt": "a"},
             "not an object",
             {"prompt": "a", "response": "   "},
             {"prompt": "a", "response": LONG, "truncate": False},
             {"prompt": "a", "response": LONG},
             {"prompt": "a", "response": "fine", "extra": 1}]
    r = client.post("/v1/score/batch", json={"items": items})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert len(results) == len(items)
    assert "score" in results[0] and results[5]["truncated"] is True
    expected_fields = {1: "items.1.response", 2: "items.2", 3: "items.3.response", 4: "items.4.response",
                       6: "items.6.extra"}
    for i, field in expected_fields.items():
        assert set(results[i]) == {"error"}, results[i]
        assert results[i]["error"]["type"] == "validation_error"
        assert results[i]["error"]["field"] == field
        assert field in results[i]["error"]["message"]
    single = client.post("/v1/score", json=items[0]).json()
    assert results[0] == single


def test_batch_limits(client):
    too_many = [{"prompt": "a", "response": "b"}] * 257  # default max_client_batch is 256
    error = assert_error(client.post("/v1/score/batch", json={"items": too_many}), 422, "validation_error", "items")
    assert "256" in error["message"]
    assert_error(client.post("/v1/score/batch", json={"items": []}), 422, "validation_error", "items")
    assert_error(client.post("/v1/score/batch", json={"items": {"prompt": "a"}}), 422, "validation_error", "items")
    assert_error(client.post("/v1/score/batch", json={}), 422, "validation_error", "items")


@pytest.mark.parametrize("body, field", [
    ({"prompt": "p", "responses": []}, "responses"),
    ({"prompt": "p", "responses": ["x"] * 257}, "responses"),
    ({"prompt": "p", "responses": ["x", ""]}, "responses.1"),
    ({"prompt": " ", "responses": ["x"]}, "prompt"),
    ({"prompt": "p", "responses": "x"}, "responses"),
    ({"prompt": "p", "responses": ["x"], "top_k": 0}, "top_k"),
    ({"prompt": "p", "responses": ["x"], "top_k": "2"}, "top_k"),
])
def test_rank_rejects(client, body, field):
    assert_error(client.post("/v1/rank", json=body), 422, "validation_error", field)


@pytest.mark.parametrize("body, field", [
    ({"prompt": "p", "a": "x"}, "b"),
    ({"prompt": "p", "a": "", "b": "y"}, "a"),
    ({"a": "x", "b": "y"}, "prompt"),
])
def test_compare_rejects(client, body, field):
    assert_error(client.post("/v1/compare", json=body), 422, "validation_error", field)


def test_oversize_body_is_refused_before_parsing(client):
    body = json.dumps({"prompt": "x", "response": "y" * 2_100_000}).encode()  # default limit 2,000,000 bytes
    r = client.post("/v1/score", content=body, headers={"content-type": "application/json"})
    assert_error(r, 413, "payload_too_large")

    def chunks():  # no Content-Length: the server has to count streamed bytes
        for start in range(0, len(body), 65536):
            yield body[start:start + 65536]

    try:
        r = httpx.post(client.base_url.join("/v1/score"), content=chunks(),
                       headers={"content-type": "application/json"}, timeout=30)
        assert_error(r, 413, "payload_too_large")
    except httpx.WriteError:
        pass  # the server may close the socket before the client finished sending; it did refuse
    assert client.get("/readyz").status_code == 200
    assert client.post("/v1/score", json={"prompt": "x", "response": "y"}).status_code == 200


def test_bad_timeout_header(client):
    r = client.post("/v1/score", json={"prompt": "x", "response": "y"}, headers={"x-request-timeout": "soon"})
    assert_error(r, 400, "invalid_request", "x-request-timeout")


# ---------------------------------------------------------------- what the HTTP parser refuses

def raw_exchange(url: str, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send `request` bytes as they are on a new connection; (status, lower-cased headers, body) of the answer,
    read until the server closes the connection."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    return int(status_line.split()[1]), headers, body


SCORE_BODY = b'{"prompt": "x", "response": "y"}'


@pytest.mark.parametrize("length", [b"abc", b"-5", b"1" * 23, b"1, 2", b""])
def test_malformed_content_length_is_a_json_400_naming_the_header(server, length):
    """uvicorn's HTTP parser refuses these before the app runs; it used to answer a plain-text
    'Invalid HTTP request received.' (service/api/http_protocol.py)."""
    request = (b"POST /v1/score HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
               b"Content-Length: " + length + b"\r\n\r\n" + SCORE_BODY)
    status, headers, body = raw_exchange(server.url, request)
    assert status == 400, body
    assert headers["content-type"] == "application/json" and headers.get("connection") == "close"
    assert int(headers["content-length"]) == len(body)
    error = json.loads(body)["error"]
    assert error["type"] == "invalid_request" and error["field"] == "content-length", error
    assert "content-length" in error["message"].lower(), error
    # the server goes on serving
    assert httpx.post(server.url + "/v1/score", content=SCORE_BODY, timeout=30,
                      headers={"content-type": "application/json"}).status_code == 200


@pytest.mark.parametrize("protocol", ["JsonErrorH11Protocol", "JsonErrorHttpToolsProtocol"])
def test_both_uvicorn_parsers_answer_json(bundle, protocol):
    """`rewardserve serve` uses httptools when installed, else h11 (as uvicorn's "auto"): both answer JSON."""
    import threading
    import time

    import uvicorn

    from service.api import http_protocol
    from service.app import create_app
    from service.settings import Settings
    from tests.helpers import free_port

    port = free_port()
    app = create_app(Settings(bundle=bundle, intra_op_threads=1, tokenizer_threads=1, log_level="warning"))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on",
                                           http=getattr(http_protocol, protocol)))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
            time.sleep(0.05)
        for length in (b"abc", b"1, 2"):
            status, headers, body = raw_exchange(f"http://127.0.0.1:{port}", b"POST /v1/score HTTP/1.1\r\nHost: t"
                                                 b"\r\nContent-Length: " + length + b"\r\n\r\n" + SCORE_BODY)
            assert status == 400 and headers["content-type"] == "application/json", body
            assert json.loads(body)["error"]["field"] == "content-length"
    finally:
        server.should_exit = True
        thread.join(30)


def test_other_parser_refusals_are_json_400s_too(server):
    status, headers, body = raw_exchange(server.url, b"POST /v1/score HTTP/1.1\r\nHo st: x\r\n\r\n")
    assert status == 400 and headers["content-type"] == "application/json", body
    error = json.loads(body)["error"]
    assert error["type"] == "invalid_request" and "field" not in error and "invalid HTTP request" in error["message"]


# ---------------------------------------------------------------- text that is valid JSON but not valid Unicode

SURROGATE = "\\ud800"  # a JSON escape of a lone surrogate: valid JSON, no valid Unicode string, no UTF-8
BAD = "SURROGATE-HERE"


@pytest.mark.parametrize("route, body, field", [
    ("/v1/score", {"prompt": BAD, "response": "r"}, "prompt"),
    ("/v1/score", {"prompt": "p", "response": "x" + BAD}, "response"),
    ("/v1/score", {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": BAD}]},
     "messages.1.content"),
    ("/v1/rank", {"prompt": BAD, "responses": ["a"]}, "prompt"),
    ("/v1/rank", {"prompt": "p", "responses": ["a", BAD]}, "responses.1"),
    ("/v1/compare", {"prompt": "p", "a": "x", "b": BAD}, "b"),
    ("/get_reward", {"query": ["fine", BAD]}, "query.1"),
    ("/get_reward", {"query": ["fine"], "prompts": [BAD]}, "prompts.0"),
    ("/classify", {"input": [BAD]}, "input.0"),
    ("/classify", {"messages": [{"role": "user", "content": BAD}, {"role": "assistant", "content": "a"}]},
     "messages.0.content"),
    ("/predict", {"inputs": BAD}, "inputs"),
    ("/predict", {"inputs": [["p", BAD]]}, "inputs.0.1"),
])
def test_escaped_lone_surrogates_are_a_422_naming_the_field_on_every_route(client, route, body, field):
    raw = json.dumps(body).replace(BAD, SURROGATE).encode()
    assert SURROGATE.encode() in raw
    error = assert_error(client.post(route, content=raw, headers={"content-type": "application/json"}), 422,
                         "validation_error", field)
    assert "Unicode" in error["message"], error
    assert client.post("/v1/score", json={"prompt": "p", "response": "still serving"}).status_code == 200


def test_an_escaped_lone_surrogate_fails_only_its_batch_item(client):
    items = [{"prompt": "p", "response": "fine"}, {"prompt": "p", "response": BAD}]
    raw = json.dumps({"items": items}).replace(BAD, SURROGATE).encode()
    r = client.post("/v1/score/batch", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 200, r.text
    first, second = r.json()["results"]
    assert "score" in first
    assert second["error"]["field"] == "items.1.response" and "Unicode" in second["error"]["message"]


def test_more_items_than_the_queue_holds_is_a_non_retryable_413(start_server):
    """A request that can never be admitted (more items than max_queue) is not told to retry."""
    server = start_server(max_queue=4, max_client_batch=8)
    items = [{"prompt": "p", "response": f"answer {i}"} for i in range(6)]
    r = httpx.post(server.url + "/v1/score/batch", json={"items": items}, timeout=30)
    error = assert_error(r, 413, "payload_too_large")
    assert "max_queue" in error["message"] and "4" in error["message"]
    assert "retry-after" not in r.headers
    r = httpx.post(server.url + "/v1/score/batch", json={"items": items[:4]}, timeout=30)
    assert r.status_code == 200, r.text
