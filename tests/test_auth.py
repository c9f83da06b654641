"""API keys: bearer keys from a file and from the environment, compared in constant
time; 401 (who are you?) vs 403 (you may not); probes always open, /metrics configurable; no CORS.

Most HTTP checks run against `create_app` under a real uvicorn on 127.0.0.1 (tests.helpers.InProcessServer),
because environment-only settings cannot be passed to the conftest's subprocess server; the last tests
run the subprocess server (`start_server`) with a keys file.
"""

from __future__ import annotations

import hashlib
import hmac
import json

import httpx
import pytest
from pydantic import SecretStr

from service.api import auth as app_module
from service.server import build_parser
from service.settings import Settings
from tests.helpers import InProcessServer, send_headers_only

PAIR = {"prompt": "p", "response": "r"}
MISSING = {"error": {"type": "unauthorized", "message": "missing API key (send 'Authorization: Bearer <key>')"}}
INVALID = {"error": {"type": "unauthorized", "message": "invalid API key (send 'Authorization: Bearer <key>')"}}
NOT_BEARER = {"error": {"type": "unauthorized",
                        "message": "API key not sent as a Bearer token (send 'Authorization: Bearer <key>')"}}


def forbidden(path: str, scope: str) -> dict:
    return {"error": {"type": "forbidden", "message": f"this API key may not use {path} (it lacks the '{scope}' "
                                                      "scope)"}}


@pytest.fixture(scope="module")
def secured(bundle, tmp_path_factory):
    """Keys: 'file-key' (every scope), 'scorer-key api', 'scraper-key metrics' from the file; 'env-key'
    from REWARDSERVE_API_KEYS; /metrics needs a key."""
    keys = tmp_path_factory.mktemp("keys") / "keys"
    keys.write_text("# bearer keys\nfile-key\n\nscorer-key api\nscraper-key metrics\n")
    with InProcessServer(bundle, api_keys_file=keys, api_keys=SecretStr("env-key, second-env-key api"),
                         metrics_auth=True) as srv:
        with httpx.Client(base_url=srv.url, timeout=30.0) as client:
            yield client


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.mark.parametrize("headers, expected", [
    ({}, MISSING),
    (bearer("wrong-key"), INVALID),
    (bearer("file-ke"), INVALID),  # a prefix of a real key
    (bearer("file-key-and-more"), INVALID),
    ({"Authorization": "Bearer"}, INVALID),
    ({"Authorization": "file-key"}, NOT_BEARER),
    ({"Authorization": "Basic file-key"}, NOT_BEARER),
])
def test_401_when_the_caller_is_not_identified(secured, headers, expected):
    for method, path, body in (("POST", "/v1/score", PAIR), ("GET", "/v1/models", None), ("GET", "/metrics", None)):
        r = secured.request(method, path, json=body, headers=headers)
        assert (r.status_code, r.json()) == (401, expected), (path, r.text)
        assert r.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize("key", ["file-key", "scorer-key", "env-key", "second-env-key"])
def test_keys_from_the_file_and_the_environment_work(secured, key):
    r = secured.post("/v1/score", json=PAIR, headers=bearer(key))
    assert r.status_code == 200 and "score" in r.json(), r.text
    assert secured.get("/v1/models", headers={"authorization": f"bearer {key}"}).status_code == 200  # scheme: any case


def test_403_when_a_known_key_lacks_the_scope(secured):
    r = secured.post("/v1/score", json=PAIR, headers=bearer("scraper-key"))
    assert (r.status_code, r.json()) == (403, forbidden("/v1/score", "api"))
    assert r.headers["www-authenticate"] == 'Bearer error="insufficient_scope", scope="api"'
    assert secured.get("/metrics", headers=bearer("scraper-key")).status_code == 200
    r = secured.get("/metrics", headers=bearer("scorer-key"))
    assert (r.status_code, r.json()) == (403, forbidden("/metrics", "metrics"))
    assert secured.get("/metrics", headers=bearer("file-key")).status_code == 200


def test_probes_and_schema_stay_open(secured):
    for path in ("/healthz", "/readyz", "/openapi.json"):
        assert secured.get(path).status_code == 200, path
    schema = secured.get("/openapi.json").json()
    assert schema["components"]["securitySchemes"] == {"bearer": {"type": "http", "scheme": "bearer"}}
    assert schema["paths"]["/v1/score"]["post"]["security"] == [{"bearer": []}]
    assert schema["paths"]["/metrics"]["get"]["security"] == [{"bearer": []}]
    assert "security" not in schema["paths"]["/healthz"]["get"]
    assert {"401", "403"} <= set(schema["paths"]["/v1/rank"]["post"]["responses"])


def test_auth_comes_before_the_body_and_cors_stays_off(secured):
    # An unauthenticated client cannot make the server read (or refuse by size) its body: only the headers
    # are sent (a 3 MB Content-Length, over max_body_bytes), so a server that waited for the body before
    # checking the key would give no answer at all, and one that checked the size first would give a 413.
    elapsed, answer = send_headers_only(str(secured.base_url).rstrip("/"), "/v1/score", 3_000_000)
    assert answer is not None, f"no answer in {elapsed:.1f} s without the body: the server waited for it"
    status, _, body = answer
    assert (status, json.loads(body)) == (401, MISSING)
    r = secured.options("/v1/score", headers={"Origin": "https://example.com", "Access-Control-Request-Method":
                                              "POST", **bearer("file-key")})
    assert r.status_code == 405 and "access-control-allow-origin" not in r.headers
    r = secured.post("/v1/score", json=PAIR, headers={"Origin": "https://example.com", **bearer("file-key")})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


def test_metrics_stay_open_by_default_with_keys(bundle):
    with InProcessServer(bundle, api_keys=SecretStr("only-key")) as srv:
        assert httpx.get(srv.url + "/metrics").status_code == 200
        assert httpx.post(srv.url + "/v1/score", json=PAIR).status_code == 401
        assert httpx.post(srv.url + "/v1/score", json=PAIR, headers=bearer("only-key")).status_code == 200


def test_keys_are_compared_in_constant_time(monkeypatch):
    """Every configured key is compared, always, on fixed-length sha256 digests: the time taken does not
    depend on which key matched, how long the sent token is, or how much of a key it shares."""
    keys = app_module.parse_api_keys(["alpha", "bravo api", "charlie metrics", "delta"], "test")
    calls: list[tuple[int, int]] = []
    real = hmac.compare_digest

    def counting(a, b):
        calls.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(app_module.hmac, "compare_digest", counting)
    for token, expected in ((b"alpha", keys[0]), (b"delta", keys[3]), (b"alph", None), (b"x" * 5000, None)):
        calls.clear()
        assert app_module.match_key(keys, token) is expected
        assert calls == [(32, 32)] * len(keys), calls
    assert keys[0].digest == hashlib.sha256(b"alpha").digest()  # the key itself is not kept
    assert [sorted(k.scopes) for k in keys] == [["api", "metrics"], ["api"], ["metrics"], ["api", "metrics"]]


def test_bad_key_configuration_refuses_to_start(tmp_path):
    with pytest.raises(RuntimeError, match="entry 2: unknown scope root"):
        app_module.parse_api_keys(["good", "bad root"], "api_keys_file k")
    empty = tmp_path / "keys"
    empty.write_text("# nothing\n")
    with pytest.raises(RuntimeError, match="holds no keys"):
        app_module.load_api_keys(Settings(bundle=tmp_path, api_keys_file=empty))
    with pytest.raises(RuntimeError, match="none was given"):
        app_module.load_api_keys(Settings(bundle=tmp_path, api_keys=SecretStr(" , ")))


def test_api_keys_come_from_the_environment_only(monkeypatch, tmp_path):
    monkeypatch.setenv("REWARDSERVE_API_KEYS", "from-env")
    settings = Settings(bundle=tmp_path)
    assert settings.api_keys.get_secret_value() == "from-env"
    assert "from-env" not in repr(settings)  # SecretStr: never printed with the settings
    flags = {a for action in build_parser()._actions for a in action.option_strings}
    assert "--api-keys" not in flags and "--api-keys-file" in flags and "--metrics-auth" in flags


def test_api_keys_protect_the_v1_routes(start_server, tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("# one bearer key per line\nfirst-key\n\nsecond-key\n")
    server = start_server(api_keys_file=keys)
    pair = {"prompt": "p", "response": "r"}
    for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "second-key"},
                    {"authorization": "Basic second-key"}):
        r = httpx.post(server.url + "/v1/score", json=pair, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["type"] == "unauthorized", headers
        assert r.headers["www-authenticate"] == "Bearer"
    assert httpx.get(server.url + "/v1/models").status_code == 401
    assert httpx.post(server.url + "/v1/score", json=pair,
                      headers={"authorization": "Bearer second-key"}).status_code == 200
    for path in ("/healthz", "/readyz", "/metrics"):  # probes and scraping need no key
        assert httpx.get(server.url + path).status_code == 200


def test_empty_api_keys_file_refuses_to_start(start_server, tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("# nothing here\n")
    server = start_server(api_keys_file=keys, wait_ready=False)
    assert server.proc.wait(timeout=60) != 0
    assert "holds no keys" in server.output()
