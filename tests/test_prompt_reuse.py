"""Best-of-N prompt reuse on a causal decoder (docs/decoders.md): /v1/rank runs the shared prompt once and
scores every candidate on its cached keys/values; the scores equal the unshared computation."""

from __future__ import annotations

import re

import httpx
import numpy as np
import pytest

from tests.helpers import skip_or_fail_in_ci, tiny_decoder

try:
    import torch
except ImportError:  # the decoder runtime needs torch (the train/decoder extra; make test installs it)
    skip_or_fail_in_ci("torch is not installed: the decoder runtime cannot be tested", module_level=True)

from service.encoding import Templated, shared_prefix  # noqa: E402

# cached prompt vs full forward: max |diff| measured 6.3e-7 (HTTP 3.3e-7); neighbouring candidates' scores
# differ by 1.4e-3, so 1e-4 would have let a wrong-but-close score through
TOL = 2e-6
SEP = 102  # the WordPiece tokenizer's [SEP], appended to every input
PROMPT = ("Summarise the following report for a busy reader, keeping every number and the names of the "
          "people involved. " + "The committee met on Tuesday and reviewed the budget, the hiring plan and "
          "the schedule for the new building, and asked for a revised estimate. " * 4)
# "[SEP]" as a template would write it (a plain str is content: its control-token text is read as characters)
RESPONSES = ["The committee reviewed the budget.", "They met.", "A revised estimate of the building was "
             "requested after the budget, hiring and schedule were reviewed on Tuesday.", "No.",
             "Budget, hiring, building: reviewed; a new estimate is due.", Templated("[SEP]"), "The meeting was long.",
             "Tuesday's meeting asked for a revised estimate."]


@pytest.fixture(scope="module")
def decoder_bundle(tmp_path_factory):
    """A tiny Qwen2 reward model saved in bf16 as save_pretrained writes it, imported as it is; its pad token is
    its end token ([SEP] of the WordPiece tokenizer, which closes every input), as in many RLHF checkpoints."""
    import transformers as tf

    from export.importer import import_checkpoint

    root = tmp_path_factory.mktemp("reuse")
    ckpt = tiny_decoder(root / "ckpt", "qwen2", classifier=True, seed=3)
    model = tf.AutoModelForSequenceClassification.from_pretrained(ckpt)
    model.config.pad_token_id = SEP
    model.to(torch.bfloat16).save_pretrained(ckpt)
    return import_checkpoint(ckpt, root / "bundle", reference_pairs=4)


@pytest.fixture(scope="module")
def runtime_and_encoder(decoder_bundle):
    from service.bundle import open_bundle
    from service.runtime import load_runtime

    manifest, encoder = open_bundle(decoder_bundle)
    return load_runtime(decoder_bundle, manifest, provider="cpu"), encoder


def test_the_shared_prompt_stops_before_each_candidates_reward_token(runtime_and_encoder):
    """The prefix is the common leading tokens, but never the token a candidate's reward is read from (the
    rightmost one that is not the pad id): for the candidate "[SEP]", followed by the closing [SEP], that
    is the prompt's last token."""
    _, encoder = runtime_and_encoder
    items = encoder.encode_shared_prompt(PROMPT, RESPONSES)
    pad = encoder.fmt.pad_token_id
    common = next(i for i in range(len(items[0].ids)) if len({e.ids[i] for e in items}) > 1)
    group = shared_prefix(items, 16, pad)
    assert group is not None and len(group.items) == len(RESPONSES)
    pad_item = items[RESPONSES.index("[SEP]")]
    assert pad == SEP and pad_item.ids[-2:] == [SEP, SEP]  # the candidate is only the pad token
    assert group.prefix == len(pad_item.ids) - 3 < common  # its reward token, the prompt's last, stays out
    assert group.n_tokens == group.prefix + sum(e.n_tokens - group.prefix for e in items)
    assert shared_prefix(items, group.prefix + 1, pad) is None  # below the minimum: no group
    assert shared_prefix(items[:1], 1, pad) is None  # one candidate: nothing to share
    others = [e for e in items if e is not pad_item]
    assert shared_prefix(others, 16, pad).prefix == common


@pytest.mark.parametrize("budget", [4096, 64])
def test_scores_on_the_cached_prompt_equal_the_full_forward(runtime_and_encoder, budget):
    """budget 64: one candidate per run on the cached prompt (the CPU case of a long prompt)."""
    runtime, encoder = runtime_and_encoder
    assert runtime.reuses_prefix and runtime.describe()["prompt_reuse"] is True
    items = encoder.encode_shared_prompt(PROMPT, RESPONSES)
    group = shared_prefix(items, 16, encoder.fmt.pad_token_id)
    want = runtime.run(encoder.pad(items))
    got = runtime.run_shared(encoder.pad(items), group.prefix, budget)
    assert np.std(want) > 1e-3
    np.testing.assert_allclose(got, want, atol=TOL, rtol=0)
    assert list(np.argsort(-got, kind="stable")) == list(np.argsort(-want, kind="stable"))


def test_a_prefix_past_a_reward_token_falls_back_to_the_full_forward(runtime_and_encoder):
    """Asked to share more than is safe (the "[SEP]" candidate's reward token inside the prefix), the runtime
    runs the rows unshared instead of reading the wrong token."""
    runtime, encoder = runtime_and_encoder
    items = encoder.encode_shared_prompt(PROMPT, RESPONSES)
    inputs = encoder.pad(items)
    unsafe = min(e.n_tokens for e in items) - 1
    np.testing.assert_allclose(runtime.run_shared(inputs, unsafe, 4096), runtime.run(inputs), atol=TOL, rtol=0)


def _reuse_counter(server) -> float:
    text = httpx.get(server.url + "/metrics").text
    return float(re.search(r"^rewardserve_prompt_reuse_tokens_total (\S+)$", text, re.M).group(1))


def test_rank_over_http_with_and_without_reuse_gives_the_same_scores_and_ranking(decoder_bundle, start_server):
    reuse = start_server(decoder_bundle, prompt_reuse_min_tokens=16)
    plain = start_server(decoder_bundle, prompt_reuse_min_tokens=0)
    body = {"prompt": PROMPT, "responses": RESPONSES}
    a = httpx.post(reuse.url + "/v1/rank", json=body, timeout=60)
    b = httpx.post(plain.url + "/v1/rank", json=body, timeout=60)
    assert a.status_code == b.status_code == 200, (a.text, b.text)
    ra, rb = a.json(), b.json()
    np.testing.assert_allclose([r["raw"] for r in ra["results"]], [r["raw"] for r in rb["results"]], atol=TOL, rtol=0)
    assert ra["ranking"] == rb["ranking"] and ra["best_index"] == rb["best_index"]
    assert [r["n_tokens"] for r in ra["results"]] == [r["n_tokens"] for r in rb["results"]]
    assert _reuse_counter(reuse) > 0 and _reuse_counter(plain) == 0
    info = httpx.get(reuse.url + "/v1/models").json()["data"][0]
    assert info["runtime"]["prompt_reuse"] is True
    # /v1/compare is best-of-2 over the same path
    c = httpx.post(reuse.url + "/v1/compare", json={"prompt": PROMPT, "a": RESPONSES[0], "b": RESPONSES[2]}, timeout=60)
    assert c.status_code == 200 and abs(c.json()["a"]["raw"] - ra["results"][0]["raw"]) <= TOL


def test_odd_but_valid_json_on_rank_with_a_decoder_is_a_clear_answer_never_a_500(decoder_bundle, start_server):
    """Control characters score (and share their prompt); an escaped lone surrogate in one candidate, or NaN
    for top_k, is a 422 naming the field."""
    server = start_server(decoder_bundle, prompt_reuse_min_tokens=16)
    odd = PROMPT + "\u0000\u001f\t\u2028 end"
    r = httpx.post(server.url + "/v1/rank", json={"prompt": odd, "responses": RESPONSES[:3] + ["\u0007 bell"]},
                   timeout=60)
    assert r.status_code == 200 and len(r.json()["results"]) == 4, r.text
    assert _reuse_counter(server) > 0
    raw = ('{"prompt": "p", "responses": ["fine", "bad \\ud800 half"]}').encode()
    r = httpx.post(server.url + "/v1/rank", content=raw, headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 422 and r.json()["error"]["field"] == "responses.1", r.text
    raw = b'{"prompt": "p", "responses": ["a", "b"], "top_k": NaN}'
    r = httpx.post(server.url + "/v1/rank", content=raw, headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 422 and "top_k" in r.text, r.text


def test_prompt_reuse_bench_smoke_runs_end_to_end(tmp_path):
    """bench/prompt_reuse.py --smoke: two servers (reuse on / off), the same rankings; the ≈100 M numbers are
    in docs/benchmarks.md."""
    import json
    import subprocess
    import sys

    from tests.helpers import REPO

    out = tmp_path / "reuse.json"
    r = subprocess.run([sys.executable, "bench/prompt_reuse.py", "--smoke", "--threads", "1", "--workdir",
                        str(tmp_path / "work"), "--out", str(out)], cwd=REPO, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["max_abs_diff"] <= TOL and report["same_ranking_rounds"] == report["workload"]["rounds"]
    assert report["prompt_tokens_reused"] > 0 and report["model"]["runtime"]["prompt_reuse"] is True
