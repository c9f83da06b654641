"""Scoring properties, tested with hypothesis, over real HTTP against a real server process:
the same input always gets the same score, a batched score equals the single one within 1e-5, and
every number served is finite, for arbitrary Unicode text (control characters, NUL, combining marks,
emoji, right-to-left scripts, very long words).

The server runs with the score cache off (cache_size=0), so that a repeated or re-batched input is
computed again by the model instead of being answered from memory.
"""

from __future__ import annotations

import math

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

TOL = 1e-5
EXAMPLES = 75
PROPERTY = settings(max_examples=EXAMPLES, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

# Any Unicode text a JSON client can send (no lone surrogates), not blank. Short texts and texts far over
# the tiny model's 64-token max_length (truncated) both occur.
text = st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=400).filter(lambda t: t.strip())
pair = st.tuples(text, text)


@pytest.fixture(scope="module")
def client(start_server):
    server = start_server(cache_size=0)
    with httpx.Client(base_url=server.url, timeout=30.0) as c:
        c.max_length = c.get("/v1/models").json()["data"][0]["max_length"]
        yield c


def check_result(result: dict, max_length: int) -> None:
    for name in ("score", "raw", "percentile"):
        assert isinstance(result[name], float) and math.isfinite(result[name]), result
    assert 0.0 <= result["percentile"] <= 100.0
    assert 1 <= result["n_tokens"] <= max_length
    assert isinstance(result["truncated"], bool)


def score(client, prompt: str, response: str) -> dict:
    r = client.post("/v1/score", json={"prompt": prompt, "response": response})
    assert r.status_code == 200, r.text
    check_result(r.json(), client.max_length)
    return r.json()


@PROPERTY
@given(pair)
def test_same_input_same_score(client, p):
    first, second = score(client, *p), score(client, *p)
    assert first == second  # every field, bit for bit


@PROPERTY
@given(st.lists(pair, min_size=1, max_size=8))
def test_batched_score_equals_single_score(client, pairs):
    r = client.post("/v1/score/batch", json={"items": [{"prompt": p, "response": x} for p, x in pairs]})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert len(results) == len(pairs)
    for (prompt, response), batched in zip(pairs, results):
        check_result(batched, client.max_length)
        single = score(client, prompt, response)
        assert abs(batched["raw"] - single["raw"]) <= TOL
        assert (batched["n_tokens"], batched["truncated"]) == (single["n_tokens"], single["truncated"])


@PROPERTY
@given(text, st.lists(text, min_size=1, max_size=6))
def test_rank_and_compare_agree_with_single_scores(client, prompt, responses):
    r = client.post("/v1/rank", json={"prompt": prompt, "responses": responses})
    assert r.status_code == 200, r.text
    ranked = r.json()
    singles = [score(client, prompt, x) for x in responses]
    for result, single in zip(ranked["results"], singles):
        check_result(result, client.max_length)
        assert abs(result["raw"] - single["raw"]) <= TOL
    assert sorted(ranked["ranking"]) == list(range(len(responses)))
    raws = [res["raw"] for res in ranked["results"]]
    assert raws[ranked["best_index"]] == max(raws)
    c = client.post("/v1/compare", json={"prompt": prompt, "a": responses[0], "b": responses[-1]})
    assert c.status_code == 200, c.text
    probability = c.json()["probability"]
    assert math.isfinite(probability) and 0.0 <= probability <= 1.0
    expected = 1.0 / (1.0 + math.exp(-(singles[0]["raw"] - singles[-1]["raw"])))
    assert abs(probability - expected) <= 1e-5
