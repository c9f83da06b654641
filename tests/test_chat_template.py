"""Chat templates and special tokens: a decoder reward model whose tokenizer carries a chat template.

The checkpoint is a tiny random-init LlamaForSequenceClassification (what TRL's RewardTrainer saves),
made Llama-like on the tokenizer side: the post-processor adds a BOS ([CLS] here) and nothing else, and
the chat template writes `{{ bos_token }}` itself and ends every turn with the EOS ([SEP]), as Llama 3's
does. That is exactly the setup where tokenizing the rendered template with special tokens on doubles
the BOS. The reference is the transformers model itself on apply_chat_template(tokenize=True) ids.
"""

from __future__ import annotations

import json

import httpx
import pytest
import torch

from tests.helpers import BOS_TEMPLATE, CHATS, bos_chat_decoder, hf_reward_model, with_demo_reference

TEMPLATE = BOS_TEMPLATE
TOL = 1e-4  # fp32 ONNX vs PyTorch


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    ckpt = bos_chat_decoder(tmp_path_factory.mktemp("chat") / "ckpt")
    return with_demo_reference(ckpt)


@pytest.fixture(scope="module")
def hf(checkpoint):
    return hf_reward_model(checkpoint)


def chat_ids(tokenizer, messages) -> list[int]:
    out = tokenizer.apply_chat_template(messages, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def hf_reward(model, ids: list[int]) -> float:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0, 0].item()


@pytest.fixture(scope="module")
def chat_server(checkpoint, start_server, tmp_path_factory):
    from export.exporter import export_bundle

    bundle = export_bundle(checkpoint, tmp_path_factory.mktemp("chat-bundle") / "tiny-llama-rm")
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["text"]["chat_template"] == TEMPLATE and manifest["text"]["join"] == "concat"
    return start_server(bundle_dir=bundle)


def post(server, path, body):
    r = httpx.post(server.url + path, json=body, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def test_messages_score_equals_the_transformers_model_on_the_chat_template(chat_server, hf):
    tokenizer, model = hf
    expected = []
    for messages in CHATS:
        ids = chat_ids(tokenizer, messages)
        assert ids[0] == tokenizer.bos_token_id and ids[1] != tokenizer.bos_token_id  # one BOS
        body = post(chat_server, "/v1/score", {"messages": messages})
        reference = hf_reward(model, ids)
        expected.append(reference)
        assert abs(body["raw"] - reference) <= TOL, (body, reference)
        assert body["n_tokens"] == len(ids)
        assert "warnings" not in body, body
    assert max(expected) - min(expected) > 1e-3  # distinct rewards: the comparison is not vacuous
    batch = post(chat_server, "/v1/score/batch", {"items": [{"messages": m} for m in CHATS]})
    assert max(abs(r["raw"] - e) for r, e in zip(batch["results"], expected)) <= TOL
    info = httpx.get(chat_server.url + "/v1/models").json()
    assert info["data"][0]["chat_template"] is True


def test_a_doubled_bos_is_flagged_and_is_what_the_model_saw(chat_server, hf):
    """The classic mistake: render the template to text, then tokenize it with special tokens on (here: sent
    as templated text, whose control tokens are tokens: OpenRLHF's /get_reward)."""
    tokenizer, model = hf
    messages = CHATS[0]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    doubled_ids = list(tokenizer(text)["input_ids"])
    assert doubled_ids[:2] == [tokenizer.bos_token_id] * 2
    sent = tokenizer.bos_token + text  # "[CLS][CLS]<|user|>...": one leading BOS is dropped (the tokenizer adds it)
    info = post(chat_server, "/get_reward?normalize=false", {"query": [sent]})
    assert [w.split(":")[0] for w in info["warnings"][0]] == ["doubled_bos"], info
    assert abs(info["rewards"][0] - hf_reward(model, doubled_ids)) <= TOL  # the warning describes what was scored
    single = hf_reward(model, chat_ids(tokenizer, messages))
    assert abs(info["rewards"][0] - single) > 1e-4  # and it matters


def test_v1_prompt_and_response_are_content_so_their_control_tokens_are_text(chat_server, hf):
    """/v1/score prompt/response are content (issue 24, turn forgery): the BOS/EOS text in a templated prompt
    is read as its characters, flagged special_token_in_content, never doubled_bos."""
    tokenizer, model = hf
    messages = CHATS[0]
    head = tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    response = messages[1]["content"]
    body = post(chat_server, "/v1/score", {"prompt": head, "response": response})
    plain = [list(tokenizer(t, add_special_tokens=False, split_special_tokens=True)["input_ids"])
             for t in (head, response)]
    expected = [tokenizer.bos_token_id] + plain[0] + plain[1]
    assert body["n_tokens"] == len(expected) and abs(body["raw"] - hf_reward(model, expected)) <= TOL, body
    assert "special_token_in_content" in [w.split(":")[0] for w in body["warnings"]], body
    assert "doubled_bos" not in [w.split(":")[0] for w in body["warnings"]], body


def test_ecosystem_routes_take_templated_text_with_its_bos(chat_server, hf):
    tokenizer, model = hf
    for messages in CHATS[:2]:
        reference = hf_reward(model, chat_ids(tokenizer, messages))
        text = tokenizer.apply_chat_template(messages, tokenize=False)  # starts with the BOS text
        prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
        # OpenRLHF: special tokens kept, prompts given
        info = post(chat_server, "/get_reward?normalize=false", {"query": [text], "prompts": [prompt]})
        assert abs(info["rewards"][0] - reference) <= TOL and "warnings" not in info
        # OpenRLHF without prompts: split at the template's last assistant opener
        info = post(chat_server, "/get_reward?normalize=false", {"query": [text]})
        assert abs(info["rewards"][0] - reference) <= TOL
        # verl: strips the BOS itself before calling vLLM /classify
        verl_input = text[len(tokenizer.bos_token):]
        out = post(chat_server, "/classify", {"model": "rm", "input": verl_input, "activation": False})
        assert abs(out["data"][-1]["probs"][-1] - reference) <= TOL
        # vLLM chat form
        out = post(chat_server, "/classify", {"model": "rm", "messages": messages, "use_activation": False})
        assert abs(out["data"][0]["probs"][0] - reference) <= TOL
        # TEI: the templated text as one input
        out = post(chat_server, "/predict", {"inputs": text, "raw_scores": True})
        assert abs(out[0]["score"] - reference) <= TOL


def test_missing_eos_and_truncated_response_are_flagged(chat_server, hf):
    tokenizer, _ = hf
    messages = CHATS[0]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    cut_generation = text.removesuffix(tokenizer.eos_token)  # a rollout stopped by max tokens: no EOS
    info = post(chat_server, "/get_reward", {"query": [text, cut_generation]})
    assert "warnings" in info and info["warnings"][0] == []
    assert [w.split(":")[0] for w in info["warnings"][1]] == ["missing_eos"]
    assert info["extra_logs"]["n_warnings"] == [0.0, 1.0]
    # a response longer than max_length: its beginning is cut, and that is said
    long = [messages[0], {"role": "assistant", "content": "oil the hinge pin well. " * 80}]
    body = post(chat_server, "/v1/score", {"messages": long})
    assert body["truncated"] and [w.split(":")[0] for w in body["warnings"]] == ["response_truncated"]
    # a long prompt alone is cut silently (the flag `truncated` says it), the response is whole
    long_prompt = [{"role": "user", "content": "please help me. " * 100}, messages[1]]
    body = post(chat_server, "/v1/score", {"messages": long_prompt})
    assert body["truncated"] and "warnings" not in body
