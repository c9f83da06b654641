"""Prefix sharing across requests and the prefix cache (issue 21, docs/decoders.md): GRPO samples sent one
request each share their prompt's computation, inside a batch (the batcher groups them) and across batches
(the prefix cache), and every reward equals the unshared computation.

The model is a tiny random-initialised Llama reward model saved in bf16 and imported as a transformers
bundle, made Llama-like on the tokenizer side as in tests/test_chat_template.py: the post-processor adds a
BOS ([CLS]), the chat template writes `{{ bos_token }}` itself and ends each turn with the EOS ([SEP]).
The pad id is [PAD] (0), which a text can also spell, so left- and right-padded texts are real inputs.
"""

from __future__ import annotations

import asyncio
import threading

import httpx
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from service.batcher import Batcher  # noqa: E402
from service.encoding import Templated, group_prefix, shareable  # noqa: E402
from service.metrics import Metrics  # noqa: E402
from service.prefix_cache import PrefixCache  # noqa: E402
from tests.helpers import BOS_TEMPLATE, bos_chat_decoder, metric  # noqa: E402

TOL = 1e-5  # fp32 compute on CPU: the bound is 1e-4; observed here at most 5e-7, so tighter
K = 16  # prompt_reuse_min_tokens in these tests
MAX_LENGTH = 128
TEMPLATE = BOS_TEMPLATE
SYSTEM = "You are a careful assistant. Answer the question about the report, keep every number and name."
QUESTIONS = ["What did the committee decide about the budget for the new library building in March?",
             "Who asked for a revised estimate of the hiring plan, and when is it due?",
             "Summarise the schedule of the bridge repairs and the two delays it has had so far.",
             "Which of the three proposals for the park did the council prefer, and why?"]
ANSWERS = ["They approved it.", "The committee approved the budget after a long debate about costs.",
           "No decision was made.", "It was postponed to April, pending a revised estimate from the architect."]


def render(question: str, answer: str, system: str = SYSTEM) -> str:
    """The chat template, rendered as OpenRLHF and verl send it (with the BOS text)."""
    return (f"[CLS]<|system|>\n{system}[SEP]<|user|>\n{question}[SEP]<|assistant|>\n{answer}[SEP]")


def prompt_of(question: str, system: str = SYSTEM) -> str:
    return f"[CLS]<|system|>\n{system}[SEP]<|user|>\n{question}[SEP]<|assistant|>\n"


@pytest.fixture(scope="module")
def decoder_bundle(tmp_path_factory):
    import transformers as tf
    from export.importer import import_checkpoint

    root = tmp_path_factory.mktemp("sharing")
    ckpt = bos_chat_decoder(root / "ckpt", seed=7)
    model = tf.AutoModelForSequenceClassification.from_pretrained(ckpt)
    model.to(torch.bfloat16).save_pretrained(ckpt)
    return import_checkpoint(ckpt, root / "bundle", reference_pairs=4, max_length=MAX_LENGTH)


@pytest.fixture(scope="module")
def loaded(decoder_bundle):
    from service.bundle import open_bundle
    from service.runtime import load_runtime

    manifest, encoder = open_bundle(decoder_bundle)
    runtime = load_runtime(decoder_bundle, manifest, provider="cpu", intra_op_threads=1)
    assert runtime.reuses_prefix and manifest.text.pad_token_id == 0
    return runtime, encoder


def alone(runtime, encoder, items) -> np.ndarray:
    """The unshared reference: each item in a forward of its own."""
    return np.array([runtime.run(encoder.pad([e]))[0] for e in items], dtype=np.float32)


class Recording:
    """The real runtime, held closed by a gate (so that requests pile up in the queue) and recording which
    method ran which rows (token ids without padding); everything it returns is the real runtime's."""

    def __init__(self, inner):
        self.inner = inner
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.calls: list[tuple] = []

    def _rows(self, inputs):
        return [tuple(int(t) for t, m in zip(ids, mask) if m) for ids, mask in zip(inputs["input_ids"],
                                                                                   inputs["attention_mask"])]

    def run(self, inputs):
        self.entered.set()
        assert self.gate.wait(30)
        self.calls.append(("run", None, self._rows(inputs)))
        return self.inner.run(inputs)

    def run_shared(self, inputs, prefix_len, max_batch_tokens, cache=None):
        self.entered.set()
        assert self.gate.wait(30)
        self.calls.append(("shared", prefix_len, self._rows(inputs)))
        return self.inner.run_shared(inputs, prefix_len, max_batch_tokens, cache=cache)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def sharing_batcher(runtime, encoder, budget: int, metrics: Metrics | None = None, **kw):
    """A batcher with prefix sharing on, as the engine builds it (Engine._share_prefixes)."""
    metrics = metrics or Metrics()
    options = dict(max_batch_size=64, max_batch_tokens=4096, efficient_batch_tokens=0, min_padding_efficiency=0.0,
                   max_wait_ms=0, max_queue=1000, metrics=metrics, **kw)
    batcher = Batcher(runtime, encoder.pad, **options)
    cache = PrefixCache(budget, K, b"test-model", metrics, runtime.inner.slice_kv if isinstance(runtime, Recording)
                        else runtime.slice_kv)
    batcher.share_prefixes(cache, encoder.fmt.pad_token_id)
    return batcher, cache


async def submit(batcher: Batcher, encoded) -> float:
    """One request of one item (one sample, as OpenRLHF and verl send them)."""
    loop = asyncio.get_running_loop()
    with batcher.admit(1) as ticket:
        return float((await batcher.score(ticket, [encoded], loop.time() + 60))[0])


def sample(metrics: Metrics, name: str) -> float:
    return metrics.registry.get_sample_value(name) or 0.0


def common_prompt_tokens(items) -> int:
    return min(len(np.flatnonzero(np.asarray(a.ids[:len(b.ids)]) == np.asarray(b.ids[:len(a.ids)])))
               for a in items for b in items)


# ---------------------------------------------------------------- in the batcher and the runtime

@pytest.mark.parametrize("budget", [0, 4096])
def test_two_interleaved_clients_samples_are_grouped_by_prompt(loaded, budget):
    """Client A sends group 1's samples, client B group 2's, one request per sample, interleaved, while a run
    is in flight: each group runs as one shared run of its 4 rows (not merged on the system prompt they
    both start with), and every reward equals the unshared forward. With the cache on, group 2 also reuses
    the system prompt group 1 left there."""
    runtime, encoder = loaded
    g1 = encoder.encode([prompt_of(QUESTIONS[0])] * 4, [a + "[SEP]" for a in ANSWERS])
    g2 = encoder.encode([prompt_of(QUESTIONS[1])] * 4, [a + "[SEP]" for a in ANSWERS[::-1]])
    blocker = encoder.encode(["hi"], ["there"])[0]
    assert not shareable(blocker, K) and all(shareable(e, K) for e in g1 + g2)

    async def main():
        rec = Recording(runtime)
        metrics = Metrics()
        batcher, cache = sharing_batcher(rec, encoder, budget, metrics)
        batcher.start()
        rec.gate.clear()
        held = asyncio.ensure_future(submit(batcher, blocker))
        assert await asyncio.to_thread(rec.entered.wait, 10)
        tasks = [asyncio.ensure_future(submit(batcher, e)) for pair in zip(g1, g2) for e in pair]  # A, B, A, B…
        for _ in range(20):
            await asyncio.sleep(0)
        rec.gate.set()
        got = await asyncio.gather(*tasks)
        await held
        await batcher.drain(10)
        return rec.calls, np.array(got, dtype=np.float32), metrics

    calls, got, metrics = asyncio.run(main())
    want = alone(runtime, encoder, [e for pair in zip(g1, g2) for e in pair])
    np.testing.assert_allclose(got, want, atol=TOL, rtol=0)
    assert np.std(want) > 1e-3  # the rewards differ: a mix-up would show
    assert calls[0][0] == "run"  # the blocker: too short to share
    assert [(c[0], sorted(c[2])) for c in calls[1:]] == [("shared", sorted(tuple(e.ids) for e in g1)),
                                                         ("shared", sorted(tuple(e.ids) for e in g2))]
    for (_, prefix, _), group in zip(calls[1:], (g1, g2)):
        assert prefix == group_prefix(group, 0) >= len(encoder.encode([prompt_of(QUESTIONS[0])], [""])[0].ids) - 2
    reused = sample(metrics, "rewardserve_prefix_tokens_reused_total")
    in_batch = sum(3 * group_prefix(g, 0) for g in (g1, g2))
    assert reused == sample(metrics, "rewardserve_prompt_reuse_tokens_total")
    if budget:
        system = group_prefix([g1[0], g2[0]], 0)
        assert system >= K and reused == in_batch + system  # group 2 found the system prompt in the cache
        assert sample(metrics, "rewardserve_prefix_cache_hits_total") == 1
    else:
        assert reused == in_batch and sample(metrics, "rewardserve_prefix_cache_hits_total") == 0


def test_a_groups_later_samples_hit_the_cache_across_batches(loaded):
    """Samples arriving one by one (each its own batch): the first computes and stores its prefix, the
    others find the prompt in the cache and compute only their own tokens; rewards exact."""
    runtime, encoder = loaded
    group = encoder.encode([prompt_of(QUESTIONS[2])] * 4, [a + "[SEP]" for a in ANSWERS])

    async def main():
        rec = Recording(runtime)
        metrics = Metrics()
        batcher, cache = sharing_batcher(rec, encoder, 4096, metrics)
        batcher.start()
        got = [await submit(batcher, e) for e in group]
        await batcher.drain(10)
        return rec.calls, np.array(got, dtype=np.float32), metrics, cache

    calls, got, metrics, cache = asyncio.run(main())
    np.testing.assert_allclose(got, alone(runtime, encoder, group), atol=TOL, rtol=0)
    assert [(c[0], len(c[2])) for c in calls] == [("shared", 1)] * 4  # one row each, on the shared path
    prompt = common_prompt_tokens(group)
    assert sample(metrics, "rewardserve_prefix_cache_hits_total") == 3 == cache.hits
    assert sample(metrics, "rewardserve_prefix_cache_misses_total") == 1
    computed = sample(metrics, "rewardserve_prefix_tokens_computed_total")
    reused = sample(metrics, "rewardserve_prefix_tokens_reused_total")
    assert reused >= 3 * prompt and computed <= sum(e.n_tokens for e in group) - 3 * prompt
    # the prompt held once, each sample's own tail beside it
    assert cache.tokens == sum(e.n_tokens - 1 for e in group) - 3 * prompt
    assert sample(metrics, "rewardserve_prefix_cache_bytes") == cache.bytes > 0


def test_eviction_keeps_the_cache_within_its_budget_and_rewards_exact(loaded):
    """A budget of about one prompt: groups evict each other (least recently used first), a group whose
    prompt was evicted computes it again, and every reward stays exact."""
    runtime, encoder = loaded
    groups = [encoder.encode([prompt_of(q, system=f"Report {i}.")] * 2, [a + "[SEP]" for a in ANSWERS[:2]])
              for i, q in enumerate(QUESTIONS[:3])]
    budget = max(e.n_tokens for g in groups for e in g) + 4
    metrics = Metrics()
    cache = PrefixCache(budget, K, b"m", metrics, runtime.slice_kv)
    order = [groups[0][0], groups[1][0], groups[2][0], groups[2][1], groups[0][1]]
    got = []
    for e in order:
        got.append(runtime.run_shared(encoder.pad([e]), group_prefix([e], 0), 4096, cache=cache)[0])
        assert cache.tokens <= budget and sample(metrics, "rewardserve_prefix_cache_tokens") == cache.tokens
        held = sum(t.nelement() * t.element_size() for n in cache._lru.values() for kv in n.state for t in kv)
        assert cache.bytes == held == sample(metrics, "rewardserve_prefix_cache_bytes")
    np.testing.assert_allclose(got, alone(runtime, encoder, order), atol=TOL, rtol=0)
    # group 2's second sample found its prompt; group 0's had been evicted by groups 1 and 2: a miss
    assert cache.misses == 4 and cache.hits == 1


class CollidingCache(PrefixCache):
    """Every prefix hashes the same (a forced collision): only the ids tell prompts apart."""

    def key(self, ids, salt=b""):
        return b"same"


def test_a_forced_hash_collision_never_serves_another_prompts_keys_values(loaded):
    runtime, encoder = loaded
    a = encoder.encode([f"Question one: {QUESTIONS[0]}"] * 2, ANSWERS[:2])
    b = encoder.encode([f"Something else entirely: {QUESTIONS[1]}"] * 2, ANSWERS[:2])
    assert a[0].ids[:K] != b[0].ids[:K]
    cache = CollidingCache(4096, K, b"m", None, runtime.slice_kv)
    order = [a[0], b[0], b[1], a[1]]
    got = [runtime.run_shared(encoder.pad([e]), group_prefix([e], 0), 4096, cache=cache)[0] for e in order]
    np.testing.assert_allclose(got, alone(runtime, encoder, order), atol=TOL, rtol=0)
    assert cache.hits == 2 and cache.misses == 2  # b[0] missed although a's prefix sits under the same hash


def test_left_and_right_padded_texts_share_exactly(loaded):
    """Pad tokens inside an item are real input (the server pads right, after the item, and masks only
    that): a left-padded text (pads before the BOS'd prompt, as a left-padded rollout decoded with its
    specials) shares with samples padded the same way, and a right-padded response (pads after the EOS, or
    a response that is only pads) keeps its reward token out of the shared prefix."""
    runtime, encoder = loaded
    # templated text (its [PAD]/[SEP] are tokens), not content (issue 24: content reads them as characters)
    left = encoder.encode([Templated("[PAD] [PAD] [PAD] " + prompt_of(QUESTIONS[3]))] * 3,
                          [Templated(ANSWERS[0] + "[SEP]"), Templated(ANSWERS[1] + "[SEP]"), Templated(ANSWERS[2] + "[SEP]")])
    right = encoder.encode([Templated(prompt_of(QUESTIONS[3]))] * 3, [Templated(ANSWERS[0] + "[SEP][PAD][PAD]"),
                           Templated(ANSWERS[3] + "[SEP][PAD]"), Templated("[PAD][PAD]")])
    assert left[0].ids[1:4] == [0, 0, 0] and right[2].ids[-2:] == [0, 0]
    assert group_prefix(right, 0) == max(i for i, t in enumerate(right[2].ids) if t != 0)  # before its reward token
    items = left + right

    async def main():
        rec = Recording(runtime)
        metrics = Metrics()
        batcher, _ = sharing_batcher(rec, encoder, 4096, metrics)
        batcher.start()
        got = await asyncio.gather(*(submit(batcher, e) for e in items))
        await batcher.drain(10)
        return rec.calls, np.array(got, dtype=np.float32), metrics

    calls, got, metrics = asyncio.run(main())
    np.testing.assert_allclose(got, alone(runtime, encoder, items), atol=TOL, rtol=0)
    assert all(c[0] == "shared" for c in calls) and sample(metrics, "rewardserve_prefix_tokens_reused_total") > 0


def test_truncated_items_are_scored_unshared_and_exact(loaded):
    """Items cut to max_length lost their start (keep_response_end): they run as plain items, although these
    three were cut at the same place and so start with the same ids, while the untruncated group queued
    with them still shares."""
    runtime, encoder = loaded
    long_prompt = prompt_of(" ".join(QUESTIONS * 3))
    cut = encoder.encode([long_prompt] * 3, ["The answer is yes.", "The answer is no.", "The answer is maybe."])
    whole = encoder.encode([prompt_of(QUESTIONS[0])] * 3, ANSWERS[:3])
    assert all(e.truncated and e.n_tokens == MAX_LENGTH for e in cut) and not any(e.truncated for e in whole)
    assert group_prefix(cut, 0) > 100  # only the truncation keeps them from sharing
    items = [e for pair in zip(cut, whole) for e in pair]

    async def main():
        rec = Recording(runtime)
        rec.gate.clear()
        batcher, _ = sharing_batcher(rec, encoder, 4096)
        batcher.start()
        blocker = asyncio.ensure_future(submit(batcher, encoder.encode(["a"], ["b"])[0]))
        assert await asyncio.to_thread(rec.entered.wait, 10)
        tasks = [asyncio.ensure_future(submit(batcher, e)) for e in items]
        for _ in range(20):
            await asyncio.sleep(0)
        rec.gate.set()
        got = await asyncio.gather(*tasks)
        await blocker
        await batcher.drain(10)
        return rec.calls, np.array(got, dtype=np.float32)

    calls, got = asyncio.run(main())
    np.testing.assert_allclose(got, alone(runtime, encoder, items), atol=TOL, rtol=0)
    shared = [c for c in calls if c[0] == "shared"]
    assert len(shared) == 1 and sorted(shared[0][2]) == sorted(tuple(e.ids) for e in whole)
    plain_rows = {row for c in calls if c[0] == "run" for row in c[2]}
    assert {tuple(e.ids) for e in cut} <= plain_rows


# ---------------------------------------------------------------- over HTTP: OpenRLHF and verl replayed

def _groups() -> list[list[str]]:
    return [[render(q, ANSWERS[(g + s) % 4] + f" (sample {s})") for s in range(4)] for g, q in enumerate(QUESTIONS)]


async def _replay(url: str) -> dict[tuple[int, int], float]:
    """4 groups × 4 samples, one request per sample, all at once with groups interleaved: even samples as
    OpenRLHF sends them (POST /get_reward {"query": [text]}), odd ones as verl's reward loop (POST /classify
    with input = the chat-templated string without its BOS text, reading data[-1].probs[-1])."""
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        async def one(g: int, s: int, text: str):
            if s % 2 == 0:
                r = await client.post("/get_reward", json={"query": [text]})
                assert r.status_code == 200, r.text
                return (g, s), r.json()["extra_logs"]["raw_reward"][0]
            r = await client.post("/classify", json={"model": "rm", "input": text[len("[CLS]"):]})
            assert r.status_code == 200, r.text
            return (g, s), r.json()["data"][-1]["probs"][-1]

        order = [(g, s, texts[s]) for s in range(4) for g, texts in enumerate(_groups())]
        return dict(await asyncio.gather(*(one(*case) for case in order)))


def test_openrlhf_and_verl_per_sample_requests_equal_the_unshared_server(decoder_bundle, start_server):
    """The chat-templated texts carry the BOS text (OpenRLHF) or not (verl strips it): both tokenize to one
    BOS, so a group's samples share across the two routes. The metrics show the prompts were really reused,
    so this fails if sharing silently turns off."""
    shared = start_server(decoder_bundle, prompt_reuse_min_tokens=K)
    plain = start_server(decoder_bundle, prompt_reuse_min_tokens=0)
    got, want = asyncio.run(_replay(shared.url)), asyncio.run(_replay(plain.url))
    assert got.keys() == want.keys() and len(got) == 16
    diff = max(abs(got[k] - want[k]) for k in got)
    assert diff <= TOL, diff
    assert np.std([want[k] for k in want if k[1] % 2 == 0]) > 1e-3
    text = httpx.get(shared.url + "/metrics").text
    reused = metric(text, "rewardserve_prefix_tokens_reused_total")
    assert reused >= 3 * 4 * K, text  # the prompts were really reused (3 later samples of 4 groups, ≥ K each)
    assert metric(text, "rewardserve_prompt_reuse_tokens_total") == reused
    assert metric(text, "rewardserve_prefix_cache_bytes") > 0
    off = httpx.get(plain.url + "/metrics").text
    assert metric(off, "rewardserve_prefix_tokens_reused_total") == 0
    assert metric(off, "rewardserve_prompt_reuse_tokens_total") == 0


def test_openrlhf_last_attended_pooling_with_pad_equal_to_eos_shares_exactly(tmp_path):
    """An OpenRLHF reward model (reward at the last attended token, pad = EOS ending every response): samples
    sent one per batch reuse their prompt from the cache, and the shared prefix stops before the token the
    pad id hides, so the reward still comes from the EOS."""
    from export.importer import import_checkpoint
    from service.bundle import open_bundle
    from service.runtime import load_runtime
    from tests.test_openrlhf_import import EOS, openrlhf_rm

    _, pad_id = openrlhf_rm(tmp_path / "ckpt", normalize=False)
    bundle = import_checkpoint(tmp_path / "ckpt", tmp_path / "bundle", reference_pairs=2)
    manifest, encoder = open_bundle(bundle)
    runtime = load_runtime(bundle, manifest, provider="cpu", intra_op_threads=1)
    assert runtime.pooling == "last_attended" and runtime.reuses_prefix
    prompt = "Summarise the committee report for a busy reader, keeping every number. " * 3
    items = encoder.encode([prompt] * 4, [Templated(a + " " + EOS) for a in ANSWERS])  # the EOS token, not text
    assert all(e.ids[-1] == pad_id for e in items)
    cache = PrefixCache(4096, K, b"m", None, runtime.slice_kv)
    got = [runtime.run_shared(encoder.pad([e]), group_prefix([e], pad_id), 4096, cache=cache)[0] for e in items]
    np.testing.assert_allclose(got, alone(runtime, encoder, items), atol=TOL, rtol=0)
    assert cache.hits == 3 and np.std(got) > 1e-3
