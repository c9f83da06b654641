"""Ecosystem routes against a real server, driven the way each client really calls them.

  * OpenRLHF: `request_api_wrapper` (OpenRLHF/OpenRLHF openrlhf/utils/remote_rm_utils.py, read at commit
    07c34b303e86fcdffa755e9e25c28cca5b44c675; the file was removed in v0.9.1, its successors keep the call) POSTs {"query", "prompts",
    "labels"} with a JSON content type and a 180 s timeout, retrying 5 times; `update_samples_with_rewards`
    then torch.cat's rewards, scores and every extra_logs entry per sample. Reproduced here with httpx
    (requests is not installed; the bytes on the wire are the same JSON POST).
  * verl: the reward loop's `compute_score_disrm` POSTs {"model", "input", "activation": False} to
    /classify with aiohttp and reads output["data"][-1]["probs"][-1].
  * TEI: POST /predict {"inputs", "raw_scores"?, "truncate"?}.

Every number is checked against /v1/score for the same (prompt, response).
"""

from __future__ import annotations

import asyncio
import math
import time

import httpx
import pytest

from service.data import demo_data_path, read_pairs
from tests.helpers import v1_scores

TOL = 1e-5


@pytest.fixture(scope="module")
def pairs():
    pairs, _ = read_pairs(demo_data_path())
    return [(p.prompt, p.chosen) for p in pairs[:4]] + [(p.prompt, p.rejected) for p in pairs[:4]]


@pytest.fixture(scope="module")
def reference(server, pairs):
    """/v1/score bodies for the same pairs."""
    return v1_scores(server.url, pairs)


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


# ---------------------------------------------------------------- OpenRLHF

def request_api_wrapper(url, data, try_max_times=5):
    """OpenRLHF's remote RM call, with httpx standing in for requests."""
    headers = {"Content-Type": "application/json"}
    for _ in range(try_max_times):
        try:
            response = httpx.post(url=url, json=data, headers=headers, timeout=180)
            response.raise_for_status()
            return response.json()
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise Exception(f"Request error for {try_max_times} times")


def openrlhf_consume(rewards_info: list[dict], samples_len: list[int]) -> dict:
    """What OpenRLHF's update_samples_with_rewards does with the answers (it must not raise)."""
    import torch

    rewards = torch.cat([torch.as_tensor(info["rewards"]) for info in rewards_info], dim=0).split(samples_len)
    scores = torch.cat([torch.as_tensor(info["scores"]) for info in rewards_info], dim=0).split(samples_len)
    logs = {key: torch.cat([torch.as_tensor(info["extra_logs"][key]) for info in rewards_info], dim=0)
            .split(samples_len) for key in rewards_info[0]["extra_logs"]}
    return {"rewards": rewards, "scores": scores, "logs": logs}


def test_openrlhf_remote_rm_with_prompts_matches_v1_score(server, pairs, reference):
    queries = [p + " " + r for p, r in pairs]  # OpenRLHF decodes prompt + response as one text
    prompts = [p for p, _ in pairs]
    labels = [""] * len(pairs)
    info = request_api_wrapper(server.url + "/get_reward", {"query": queries, "prompts": prompts, "labels": labels})
    assert set(info) == {"rewards", "scores", "extra_logs"}, info
    for i, ref in enumerate(reference):
        assert abs(info["rewards"][i] - ref["score"]) <= TOL  # z-score: OpenRLHF's normalize_reward semantics
        assert abs(info["extra_logs"]["raw_reward"][i] - ref["raw"]) <= TOL
        assert abs(info["scores"][i] - ref["percentile"] / 100) <= 1e-6
        assert 0.0 <= info["scores"][i] <= 1.0
        assert info["extra_logs"]["n_tokens"][i] == ref["n_tokens"]
    assert len({round(x, 6) for x in info["rewards"]}) > 1  # the comparison is not vacuous
    # OpenRLHF's side: one request per remote server, split back into its sample groups
    consumed = openrlhf_consume([info], [3, 5])
    assert [len(x) for x in consumed["rewards"]] == [3, 5]
    assert set(consumed["logs"]) >= {"raw_reward", "truncated", "n_warnings"}


def test_openrlhf_query_without_prompts_is_split_at_the_last_assistant_turn(server, pairs, reference):
    queries = [p + " " + r for p, r in pairs]
    info = request_api_wrapper(server.url + "/get_reward", {"query": queries})
    raws = info["extra_logs"]["raw_reward"]
    assert max(abs(a - ref["raw"]) for a, ref in zip(raws, reference)) <= TOL
    # the split matters (pair join: [CLS] prompt [SEP] response [SEP]): without any marker the whole
    # query is the response, a different model input and a different reward
    bare = request_api_wrapper(server.url + "/get_reward", {"query": [queries[0].replace("Assistant:", "AI:")]})
    assert bare["extra_logs"]["raw_reward"][0] != pytest.approx(raws[0], abs=1e-4)


def test_openrlhf_special_tokens_kept_and_raw_rewards(server, pairs, reference):
    # OpenRLHF decodes with special tokens kept: the [CLS] this tokenizer adds itself, and [PAD]s
    prompt, response = pairs[1]
    query = "[CLS]" + prompt + " " + response + "[PAD][PAD]"
    info = request_api_wrapper(server.url + "/get_reward?normalize=false",
                               {"query": [query], "prompts": ["[CLS]" + prompt], "labels": [None]})
    assert abs(info["rewards"][0] - reference[1]["raw"]) <= TOL  # raw on request, and the same model input
    assert "warnings" not in info
    # the same [CLS] sent to /v1/score is content (issue 24): read as the characters "[", "cl", "##s", "]",
    # never as the BOS token, and flagged
    content = httpx.post(server.url + "/v1/score", json={"prompt": "[CLS]" + prompt, "response": response}).json()
    assert [w.split(":")[0] for w in content["warnings"]] == ["special_token_in_content"]
    max_length = httpx.get(server.url + "/v1/models").json()["data"][0]["max_length"]
    assert content["n_tokens"] == min(reference[1]["n_tokens"] + 4, max_length)  # "[", "cl", "##s", "]", then cut
    assert abs(content["raw"] - reference[1]["raw"]) > 1e-6


def test_openrlhf_large_batches_are_scored_in_chunks(start_server, pairs, reference):
    # 8 queries > max_client_batch: three chunks, admitted as one unit, so max_queue must hold all 8
    # (a batch over max_queue is a 413 as a whole: tests/test_rollout_admission.py)
    server = start_server(max_client_batch=3, max_queue=8)
    queries = [p + " " + r for p, r in pairs]
    info = request_api_wrapper(server.url + "/get_reward", {"query": queries, "prompts": [p for p, _ in pairs]})
    assert max(abs(a - ref["raw"]) for a, ref in zip(info["extra_logs"]["raw_reward"], reference)) <= TOL


def test_compat_input_errors_name_the_field(server, pairs):
    r = httpx.post(server.url + "/get_reward", json={"query": ["a", " "]})
    assert r.status_code == 422 and r.json()["error"]["field"] == "query.1"
    r = httpx.post(server.url + "/get_reward", json={"query": ["a", "b"], "prompts": ["a"]})
    assert r.status_code == 422 and r.json()["error"]["field"] == "prompts"
    r = httpx.post(server.url + "/classify", json={"model": "m"})
    assert r.status_code == 422 and r.json()["error"]["field"] == "input"
    r = httpx.post(server.url + "/predict", json={"inputs": ["a", "b", "c"]})
    assert r.status_code == 422 and r.json()["error"]["field"] == "inputs"


# ---------------------------------------------------------------- verl → vLLM /classify

async def verl_post(address: str, payload: dict, endpoint: str) -> dict:
    """verl RewardLoopWorker._post_request, with httpx.AsyncClient standing in for aiohttp."""
    async with httpx.AsyncClient(timeout=None) as session:
        resp = await session.post(f"http://{address}/{endpoint}", json=payload)
        resp.raise_for_status()
        return resp.json()


def test_verl_classify_reads_the_raw_reward(server, pairs, reference):
    address = server.url.removeprefix("http://")

    async def main():
        outs = []
        for prompt, response in pairs:  # verl sends one templated text per request, concurrently
            payload = {"model": "/home/tiger/models/Skywork-Reward-V2", "input": prompt + " " + response,
                       "activation": False}
            outs.append(verl_post(address, payload, "classify"))
        return await asyncio.gather(*outs)

    outputs = asyncio.run(main())
    for output, ref in zip(outputs, reference):
        rm_score = output["data"][-1]["probs"][-1]  # exactly what verl reads
        assert abs(rm_score - ref["raw"]) <= TOL
        assert output["object"] == "list" and output["model"] == ref["model"]
        assert output["id"].startswith("classify-") and isinstance(output["created"], int)
        assert output["data"][0]["num_classes"] == 1 and output["data"][0]["label"] == "LABEL_0"
        assert output["usage"]["prompt_tokens"] == output["usage"]["total_tokens"] == ref["n_tokens"]


def test_classify_activation_batch_and_messages(server, pairs, reference):
    texts = [p + " " + r for p, r in pairs[:3]]
    default = httpx.post(server.url + "/classify", json={"model": "x", "input": texts}).json()
    new_name = httpx.post(server.url + "/classify", json={"input": texts, "use_activation": False}).json()
    for i in range(3):
        assert default["data"][i]["index"] == i
        assert abs(default["data"][i]["probs"][0] - sigmoid(reference[i]["raw"])) <= TOL  # vLLM's 1-label default
        assert abs(new_name["data"][i]["probs"][0] - reference[i]["raw"]) <= TOL
    assert default["usage"]["prompt_tokens"] == sum(reference[i]["n_tokens"] for i in range(3))
    messages = [{"role": "user", "content": "How do I boil an egg?"},
                {"role": "assistant", "content": "Put it in boiling water for nine minutes."}]
    chat = httpx.post(server.url + "/classify", json={"messages": messages, "use_activation": False}).json()
    v1 = httpx.post(server.url + "/v1/score", json={"messages": messages}).json()
    assert abs(chat["data"][0]["probs"][0] - v1["raw"]) <= TOL


# ---------------------------------------------------------------- TEI /predict

def test_tei_predict_shapes_raw_scores_and_truncate(server, pairs, reference):
    prompt, response = pairs[2]
    single = httpx.post(server.url + "/predict", json={"inputs": prompt + " " + response}).json()
    assert single == [{"score": pytest.approx(sigmoid(reference[2]["raw"]), abs=TOL), "label": "LABEL_0"}]
    pair = httpx.post(server.url + "/predict", json={"inputs": [prompt, response], "raw_scores": True}).json()
    assert abs(pair[0]["score"] - reference[2]["raw"]) <= TOL
    batch = httpx.post(server.url + "/predict", json={"inputs": [[p, r] for p, r in pairs[:3]] + [[prompt + " " +
                                                                                                response]],
                                                      "raw_scores": True}).json()
    assert [len(x) for x in batch] == [1, 1, 1, 1]
    expected = [ref["raw"] for ref in reference[:3]] + [reference[2]["raw"]]
    assert max(abs(b[0]["score"] - e) for b, e in zip(batch, expected)) <= TOL
    # TEI refuses over-long input unless truncate is true; truncation keeps the response end, like /v1/score
    long_prompt = prompt * 20
    refused = httpx.post(server.url + "/predict", json={"inputs": [long_prompt, response]})
    assert refused.status_code == 422 and refused.json()["error"]["field"] == "inputs"
    cut = httpx.post(server.url + "/predict", json={"inputs": [long_prompt, response], "truncate": True,
                                                    "raw_scores": True}).json()
    v1 = httpx.post(server.url + "/v1/score", json={"prompt": long_prompt, "response": response}).json()
    assert v1["truncated"] and abs(cut[0]["score"] - v1["raw"]) <= TOL


def test_compat_routes_need_the_api_key_when_keys_are_set(start_server, tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("s3cret\n")
    server = start_server(api_keys_file=keys)
    for path, body in (("/get_reward", {"query": ["a b"]}), ("/classify", {"input": "a b"}),
                       ("/predict", {"inputs": "a b"})):
        assert httpx.post(server.url + path, json=body).status_code == 401, path
        ok = httpx.post(server.url + path, json=body, headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200, (path, ok.text)
