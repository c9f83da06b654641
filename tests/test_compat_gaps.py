"""Ecosystem routes, the protocol gaps RLHF clients hit ("RLHF clients lose no reward"), against a real server.

  * OpenRLHF v0.11 shards a batch over its reward servers: a server can get `{"query": [], ...}`;
    OpenRLHF v0.7 posts 64 long queries at once (~7 MB), over the /v1 body limit;
  * vLLM: token-id `input`, OpenAI-style content parts, /pooling (a reward model's data is [reward]);
  * SGLang (verl's branch): /v1/embeddings, reward in data[i].embedding[0];
  * TEI: `truncate: null`, /rerank, POST / and /invocations, and huggingface_hub's InferenceClient;
  * an empty response is scored (with an empty_response warning) on every compat route.

Every number is checked against /v1/score for the same (prompt, response).
"""

from __future__ import annotations

import base64
import json
import math
import struct

import httpx
import numpy as np
import pytest

from service.data import demo_data_path, read_pairs
from service.evaluate import score_pairs
from tests.helpers import v1_scores

TOL = 1e-5


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


@pytest.fixture(scope="module")
def pairs():
    pairs, _ = read_pairs(demo_data_path())
    return [(p.prompt, p.chosen) for p in pairs[:3]] + [(p.prompt, p.rejected) for p in pairs[:3]]


@pytest.fixture(scope="module")
def reference(server, pairs):
    out = v1_scores(server.url, pairs)
    assert len({round(r["raw"], 6) for r in out}) > 1  # the comparisons below are not vacuous
    return out


def post(server, path, body, status=200, **kwargs):
    r = httpx.post(server.url + path, json=body, timeout=60, **kwargs)
    assert r.status_code == status, (path, r.status_code, r.text)
    return r.json()


def floats(b64: str) -> list[float]:
    raw = base64.b64decode(b64)
    return list(struct.unpack(f"<{len(raw) // 4}f", raw))


# ---------------------------------------------------------------- OpenRLHF

def test_get_reward_with_empty_lists_answers_empty_lists(server):
    for body in ({"query": [], "prompts": [], "labels": []}, {"query": []}):
        info = post(server, "/get_reward", body)
        assert info["rewards"] == [] and info["scores"] == []
        assert set(info["extra_logs"]) >= {"raw_reward", "n_tokens"}
        assert all(v == [] for v in info["extra_logs"].values())
    # still refused: a count mismatch
    r = httpx.post(server.url + "/get_reward", json={"query": [], "prompts": ["p"]})
    assert r.status_code == 422 and r.json()["error"]["field"] == "prompts"


def test_openrlhf_v07_batch_of_64_long_queries_fits_the_compat_body_limit(server, pairs, offline):
    """64 long queries (~7 MB) are answered, each with the reward offline scoring gives its (prompt,
    response): the queries end differently, since a truncated response keeps its tail."""
    prompt, response = pairs[0]
    queries = [f"{prompt} {response} " + "a long chain of thought " * 4500 + f"(rollout {i}: {i * 7919 % 64} steps)"
               for i in range(64)]
    body = json.dumps({"query": queries, "prompts": [prompt] * 64, "labels": [""] * 64}).encode()
    assert len(body) > 6_500_000  # what OpenRLHF v0.7 posts, over the default max_body_bytes of 2 MB
    r = httpx.post(server.url + "/get_reward", content=body, headers={"Content-Type": "application/json"},
                   timeout=120)
    assert r.status_code == 200, r.text[:300]
    info = r.json()
    manifest, encoder, runtime = offline
    raw = score_pairs(manifest, encoder, runtime, [prompt] * 64, [q[len(prompt) + 1:] for q in queries])
    assert len(info["rewards"]) == 64 and len(set(np.round(raw, 6))) > 1  # distinct: the check is not vacuous
    np.testing.assert_allclose(info["extra_logs"]["raw_reward"], raw, atol=TOL, rtol=0)
    np.testing.assert_allclose(info["rewards"], manifest.normalization.z_score(raw.astype(np.float64)), atol=TOL, rtol=0)
    assert info["extra_logs"]["truncated"] == [1.0] * 64
    # /v1 keeps its own limit
    batch = {"items": [{"prompt": prompt, "response": q} for q in queries]}
    assert httpx.post(server.url + "/v1/score/batch", json=batch, timeout=60).status_code == 413


def test_compat_body_limit_is_its_own_setting(start_server, pairs):
    server = start_server(max_body_bytes=20_000, max_compat_body_bytes=200_000)
    prompt, response = pairs[0]
    query = prompt + " " + response + " padding words" * 400  # ~6 KB
    fits = {"query": [query] * 10}  # ~60 KB: over max_body_bytes, under max_compat_body_bytes
    assert post(server, "/get_reward", fits)["rewards"]
    for path, body in (("/classify", {"input": [query] * 10}), ("/predict", {"inputs": [[query]] * 10, "truncate": True})):
        post(server, path, body)
    assert httpx.post(server.url + "/v1/score/batch",
                      json={"items": [{"prompt": prompt, "response": query}] * 10}).status_code == 413
    too_big = httpx.post(server.url + "/get_reward", json={"query": [query] * 40})  # ~240 KB
    assert too_big.status_code == 413
    assert too_big.json()["error"]["message"] == "request body exceeds 200000 bytes"


# ---------------------------------------------------------------- vLLM /classify, /pooling; SGLang /v1/embeddings

def test_classify_takes_token_ids_decoded_with_the_bundle_tokenizer(server, offline, pairs):
    _, encoder, _ = offline
    tok = encoder.tokenizer
    texts = [p + " " + r for p, r in pairs[:2]]
    ids = [tok.encode(t, add_special_tokens=False).ids for t in texts]
    decoded = [tok.decode(x, skip_special_tokens=False) for x in ids]
    as_text = post(server, "/classify", {"input": decoded, "use_activation": False})
    one = post(server, "/classify", {"model": "m", "input": ids[0], "use_activation": False})
    many = post(server, "/classify", {"input": ids, "use_activation": False})
    assert abs(one["data"][0]["probs"][0] - as_text["data"][0]["probs"][0]) <= TOL
    assert [d["index"] for d in many["data"]] == [0, 1]
    for got, want in zip(many["data"], as_text["data"]):
        assert abs(got["probs"][0] - want["probs"][0]) <= TOL
    assert one["usage"]["prompt_tokens"] == len(ids[0]) + 3  # [CLS] [SEP] ids [SEP]: the ids, read as one text
    assert abs(many["data"][0]["probs"][0] - many["data"][1]["probs"][0]) > 1e-6
    # the id range is the bundle's vocabulary, and the schema says so
    vocab = tok.get_vocab_size(with_added_tokens=True)
    r = httpx.post(server.url + "/classify", json={"input": [101, vocab]})
    assert r.status_code == 422 and r.json()["error"]["field"] == "input"
    r = httpx.post(server.url + "/classify", json={"input": [[101, 7592], [5, -1]]})
    assert r.status_code == 422 and r.json()["error"]["field"] == "input.1.1"
    schema = httpx.get(server.url + "/openapi.json").json()
    text = json.dumps(schema["components"]["schemas"]["ClassifyRequest"])
    assert f'"maximum": {vocab - 1}' in text


def test_classify_messages_take_openai_content_parts(server):
    plain = [{"role": "user", "content": "How do I boil an egg?\nQuickly."},
             {"role": "assistant", "content": "Put it in boiling water for nine minutes."}]
    parts = [{"role": "user", "content": [{"type": "text", "text": "How do I boil an egg?"},
                                          {"type": "text", "text": "Quickly."}]},
             {"role": "assistant", "content": [{"type": "text", "text": "Put it in boiling water for nine minutes."}]}]
    a = post(server, "/classify", {"messages": plain, "use_activation": False})
    b = post(server, "/classify", {"messages": parts, "use_activation": False})
    assert abs(a["data"][0]["probs"][0] - b["data"][0]["probs"][0]) <= TOL
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}, plain[1]]
    r = httpx.post(server.url + "/classify", json={"messages": image})
    assert r.status_code == 422 and r.json()["error"]["field"] == "messages.0.content.0.type", r.text


def test_pooling_answers_the_reward_as_vllm_does(server, pairs, reference):
    texts = [p + " " + r for p, r in pairs[:3]]
    out = post(server, "/pooling", {"model": "/models/rm", "input": texts})
    assert out["object"] == "list" and out["id"].startswith("pool-") and isinstance(out["created"], int)
    assert out["model"] == reference[0]["model"]
    for i, d in enumerate(out["data"]):
        assert d["index"] == i and d["object"] == "pooling"
        assert len(d["data"]) == 1 and abs(d["data"][0] - reference[i]["raw"]) <= TOL  # raw: no activation
    assert out["usage"]["prompt_tokens"] == sum(r["n_tokens"] for r in reference[:3])
    b64 = post(server, "/pooling", {"input": texts[0], "encoding_format": "base64"})
    assert abs(floats(b64["data"][0]["data"])[0] - reference[0]["raw"]) <= 1e-5
    messages = [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello there."}]
    chat = post(server, "/pooling", {"messages": messages})
    assert abs(chat["data"][0]["data"][0] - post(server, "/v1/score", {"messages": messages})["raw"]) <= TOL


def test_v1_embeddings_carries_the_reward_in_embedding_0(server, pairs, reference):
    """verl's SGLang reward branch posts {"model", "input"} and reads data[i]["embedding"][0]."""
    texts = [p + " " + r for p, r in pairs]
    out = post(server, "/v1/embeddings", {"model": "rm", "input": texts})
    assert out["object"] == "list"
    for i, (d, ref) in enumerate(zip(out["data"], reference)):
        assert d["object"] == "embedding" and d["index"] == i
        assert abs(d["embedding"][0] - ref["raw"]) <= TOL
    # the openai Python client asks for base64 unless told otherwise
    b64 = post(server, "/v1/embeddings", {"model": "rm", "input": texts[1], "encoding_format": "base64"})
    assert abs(floats(b64["data"][0]["embedding"])[0] - reference[1]["raw"]) <= 1e-5
    r = httpx.post(server.url + "/v1/embeddings", json={"input": texts[0], "dimensions": 8})
    assert r.status_code == 422 and r.json()["error"]["field"] == "dimensions"


# ---------------------------------------------------------------- TEI

def test_tei_predict_takes_truncate_null(server, pairs, reference):
    prompt, response = pairs[0]
    out = post(server, "/predict", {"inputs": [prompt, response], "truncate": None, "raw_scores": True})
    assert abs(out[0]["score"] - reference[0]["raw"]) <= TOL


def test_tei_rerank_sorts_by_score(server, pairs, reference):
    prompt = pairs[0][0]
    texts = [pairs[0][1], pairs[3][1]]  # chosen and rejected of the same prompt
    refs = [reference[0]["raw"], reference[3]["raw"]]
    ranks = post(server, "/rerank", {"query": prompt, "texts": texts, "raw_scores": True, "truncate": None})
    assert sorted(r["index"] for r in ranks) == [0, 1]
    assert [r["score"] for r in ranks] == sorted((r["score"] for r in ranks), reverse=True)
    for r in ranks:
        assert abs(r["score"] - refs[r["index"]]) <= TOL and "text" not in r
    ranks = post(server, "/rerank", {"query": prompt, "texts": texts, "return_text": True})
    for r in ranks:
        assert abs(r["score"] - sigmoid(refs[r["index"]])) <= TOL and r["text"] == texts[r["index"]]


def test_tei_root_and_invocations_dispatch_by_body(server, pairs, reference):
    prompt, response = pairs[1]
    for path in ("/", "/invocations"):
        single = post(server, path, {"inputs": prompt + " " + response})
        assert single == [{"score": pytest.approx(sigmoid(reference[1]["raw"]), abs=TOL), "label": "LABEL_0"}]
        ranks = post(server, path, {"query": prompt, "texts": [response], "raw_scores": True})
        assert ranks[0]["index"] == 0 and abs(ranks[0]["score"] - reference[1]["raw"]) <= TOL
        r = httpx.post(server.url + path, json={"model": "x"})
        assert r.status_code == 422 and r.json()["error"]["field"] == "inputs"
        r = httpx.post(server.url + path, json={"query": "q"})
        assert r.status_code == 422 and r.json()["error"]["field"] == "texts"
        r = httpx.post(server.url + path, json={"inputs": ["a", "b", "c"]})
        assert r.status_code == 422 and r.json()["error"]["field"] == "inputs"


def test_huggingface_hub_inference_client_text_classification(server, pairs, reference):
    """The real huggingface_hub client, pointed at the server's base URL (it posts {"inputs", "parameters"} to /)."""
    from huggingface_hub import InferenceClient

    prompt, response = pairs[2]
    client = InferenceClient(model=server.url)
    out = client.text_classification(prompt + " " + response)
    top = out[0] if isinstance(out, list) else out  # (TEI's single-input answer: the client returns its first)
    assert top.label == "LABEL_0"
    assert abs(top.score - sigmoid(reference[2]["raw"])) <= TOL


# ---------------------------------------------------------------- empty responses, bad input

def test_an_empty_response_is_scored_with_a_warning_on_every_compat_route(server, pairs):
    prompt = pairs[0][0]  # ends with "\n\nAssistant:"
    v1 = httpx.post(server.url + "/v1/score", json={"prompt": prompt, "response": ""})
    assert v1.status_code == 422  # /v1 is unchanged: a contract
    info = post(server, "/get_reward?normalize=false", {"query": [prompt], "prompts": [prompt]})
    assert info["warnings"][0][-1].startswith("empty_response:") and info["extra_logs"]["n_warnings"] == [1.0]
    raw = info["rewards"][0]
    cls = post(server, "/classify", {"input": prompt, "use_activation": False})
    assert abs(cls["data"][0]["probs"][0] - raw) <= TOL and cls["data"][0]["warnings"][-1].startswith("empty_")
    pred = post(server, "/predict", {"inputs": [prompt, ""], "raw_scores": True})
    assert abs(pred[0]["score"] - raw) <= TOL
    ranks = post(server, "/rerank", {"query": prompt, "texts": ["", "It is nine minutes."], "raw_scores": True})
    assert any(r["index"] == 0 and abs(r["score"] - raw) <= TOL for r in ranks)
    emb = post(server, "/v1/embeddings", {"input": prompt})
    assert abs(emb["data"][0]["embedding"][0] - raw) <= TOL and emb["data"][0]["warnings"]
    pool = post(server, "/pooling", {"input": [prompt]})
    assert abs(pool["data"][0]["data"][0] - raw) <= TOL


@pytest.mark.parametrize("path,body,field", [
    ("/pooling", {"input": []}, "input"),
    ("/pooling", {"model": "m"}, "input"),
    ("/pooling", {"input": "a", "encoding_format": "binary"}, "encoding_format"),
    ("/v1/embeddings", {"input": [1, -1]}, "input.1"),
    ("/v1/embeddings", {"input": ["a", 3]}, "input.1"),
    ("/v1/embeddings", {}, "input"),
    ("/rerank", {"query": "q", "texts": []}, "texts"),
    ("/rerank", {"query": " ", "texts": ["a"]}, "query"),
    ("/rerank", {"query": "q", "texts": ["a", 1]}, "texts.1"),
    ("/predict", {"inputs": "a", "truncate": "yes"}, "truncate"),
])
def test_bad_input_on_the_new_routes_is_a_422_naming_the_field(server, path, body, field):
    r = httpx.post(server.url + path, json=body)
    assert r.status_code == 422, (path, r.text)
    error = r.json()["error"]
    assert error["type"] == "validation_error" and error["field"] == field, error


def test_new_compat_routes_need_the_api_key_when_keys_are_set(start_server, tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("s3cret\n")
    server = start_server(api_keys_file=keys)
    for path, body in (("/pooling", {"input": "a b"}), ("/v1/embeddings", {"input": "a b"}),
                       ("/rerank", {"query": "a", "texts": ["b"]}), ("/", {"inputs": "a b"}),
                       ("/invocations", {"inputs": "a b"})):
        assert httpx.post(server.url + path, json=body).status_code == 401, path
        ok = httpx.post(server.url + path, json=body, headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200, (path, ok.text)
