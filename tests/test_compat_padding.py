"""/get_reward with padded queries from a decoder reward model whose pad token is its EOS.

OpenRLHF <= 0.8.2 decodes its rollouts with the padding kept (left-padded prompt, right-padded
response); with `pad_token == eos_token` (the usual setup when a tokenizer has no pad token) the padding
cannot be told from the EOS by text, so prepare_text cannot drop it. OpenRLHF's own serve_rm strips runs of
pad/EOS at both ends and appends one EOS; /get_reward does the same, so the padded query scores what the
unpadded chat scores on /v1/score.

The bundle: a tiny random-init LlamaForSequenceClassification (what TRL's RewardTrainer saves), its
tokenizer made Llama-like (BOS added by the post-processor, a chat template that ends every turn with the
EOS), with pad_token = eos_token = "[SEP]". The model's own pad id stays [PAD], so the model reads its reward
at the true last token: extra trailing EOS change the reward, as do the left pads.
"""

from __future__ import annotations


import httpx
import pytest

from service.data import demo_data_path, read_pairs
from tests.helpers import BOS_TEMPLATE, bos_chat_decoder, write_jsonl

TEMPLATE = BOS_TEMPLATE
CHATS = [
    [{"role": "user", "content": "How do I fix a squeaky door hinge?"},
     {"role": "assistant", "content": "Put a drop of oil on the hinge pin and swing the door a few times."}],
    [{"role": "user", "content": "Say something nice."},
     {"role": "assistant", "content": "You asked kindly, and that is a good start to any day."}],
]
TOL = 1e-5


@pytest.fixture(scope="module")
def pad_is_eos_server(start_server, tmp_path_factory):
    from export.exporter import export_bundle

    root = tmp_path_factory.mktemp("pad-eos")
    ckpt = bos_chat_decoder(root / "ckpt", seed=3, pad_token="[SEP]")
    pairs, _ = read_pairs(demo_data_path())
    write_jsonl(ckpt / "reference_pairs.jsonl",
                [{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected} for p in pairs[:16]])
    bundle = export_bundle(ckpt, root / "tiny-llama-pad-eos")
    return start_server(bundle_dir=bundle)


def post(server, path, body):
    r = httpx.post(server.url + path, json=body, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def rendered(messages, generation_prompt=False) -> str:
    out = "[CLS]" + "".join(f"<|{m['role']}|>\n{m['content']}[SEP]" for m in messages)
    return out + ("<|assistant|>\n" if generation_prompt else "")


def test_padded_queries_score_like_the_unpadded_chat_on_v1(pad_is_eos_server):
    server = pad_is_eos_server
    expected = []
    for messages in CHATS:
        v1 = post(server, "/v1/score", {"messages": messages})
        assert "warnings" not in v1, v1
        expected.append(v1["raw"])
        text = rendered(messages)
        prompt = rendered(messages[:-1], generation_prompt=True)
        padded = "[SEP]" * 3 + text + "[SEP]" * 4  # left pads, the rollout's EOS, right pads: all "[SEP]"
        # scored with the padding kept (vLLM's /classify leaves pad == eos alone), the reward differs: what
        # follows is not vacuous
        as_sent = post(server, "/classify", {"input": padded, "use_activation": False})
        assert abs(as_sent["data"][0]["probs"][0] - v1["raw"]) > 1e-4
        for body in ({"query": [padded]}, {"query": [padded], "prompts": [prompt]}, {"query": [text]},
                     {"query": ["[SEP]" * 2 + text + "[SEP]"], "prompts": ["[SEP]" * 2 + prompt]}):
            info = post(server, "/get_reward?normalize=false", body)
            assert abs(info["rewards"][0] - v1["raw"]) <= TOL, (body, info, v1)
            assert info["extra_logs"]["n_tokens"] == [v1["n_tokens"]]
            assert "warnings" not in info, info
    assert abs(expected[0] - expected[1]) > 1e-3


def test_a_rollout_cut_before_its_eos_gets_none_added(pad_is_eos_server):
    """Only an EOS that was there is kept: a generation cut at max tokens still reads as one (missing_eos)."""
    messages = CHATS[0]
    cut = rendered(messages)[: -len("[SEP]")]
    info = post(pad_is_eos_server, "/get_reward?normalize=false", {"query": ["[SEP][SEP]" + cut]})
    assert [w.split(":")[0] for w in info["warnings"][0]] == ["missing_eos"]
    # the same pair as TEI's [prompt, response] (templated text: its [SEP] turn ends are tokens; /v1/score
    # prompt/response are content since issue 24, their [SEP] text would be read as characters)
    tei = post(pad_is_eos_server, "/predict", {"inputs": [[rendered(messages[:-1], True), messages[-1]["content"]]],
                                               "raw_scores": True})
    assert abs(info["rewards"][0] - tei[0][0]["score"]) <= TOL
