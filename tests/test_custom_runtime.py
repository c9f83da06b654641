"""A custom backend written only against the documented `Runtime` protocol (service/runtime.py,
docs/architecture.md "Custom runtimes"), served by `create_app(settings, runtime=...)` over real HTTP.

The backend is a real computation whose answer the test works out by hand: a linear model over the bag of
token ids, reward = bias + scale · mean of weights[id] over the real (unpadded) tokens, in numpy. It
implements only what the protocol requires (run, describe, name, provider): precision, batch hints and the
prefix hooks are left to the defaults. Before the protocol declared them, such a runtime crashed the startup
on the first member the engine read (`'LinearRuntime' object has no attribute 'precision'`).
"""

from __future__ import annotations

import asyncio

import httpx
import numpy as np
import pytest

from service.bundle import open_bundle
from service.runtime import Runtime, RuntimeProtocolError, check_runtime
from tests.helpers import InProcessServer

PAIRS = [("How do I boil an egg?", "Put it in boiling water for nine minutes, then into cold water."),
         ("How do I boil an egg?", "Eggs."),
         ("Name a prime number.", "Seven is prime: its only divisors are one and itself."),
         ("Translate 'cat' to French.", "Chat.")]
TOL = 1e-5


class LinearModel:
    """The model both runtimes below serve, and the test's hand computation of it (in float64)."""

    def __init__(self, vocab: int, bias: float, scale: float, seed: int = 0):
        self.weights = np.random.default_rng(seed).normal(0.0, 4.0, size=vocab)
        self.bias, self.scale = bias, scale

    def reward(self, ids) -> float:
        return self.bias + self.scale * float(np.mean(self.weights[list(ids)]))


def linear_run(model: LinearModel, inputs: dict[str, np.ndarray]) -> np.ndarray:
    """One padded batch → one float32 reward per row (only the attention mask says which tokens are real)."""
    mask = inputs["attention_mask"].astype(np.float64)
    total = (model.weights[inputs["input_ids"]] * mask).sum(axis=1)
    return (model.bias + model.scale * total / mask.sum(axis=1)).astype(np.float32)


class PlainLinearRuntime:
    """The backend without subclassing anything (duck-typed to the protocol): check_runtime fills in the
    defaults."""

    name = "numpy-linear-plain"
    provider = "numpy"

    def __init__(self, model: LinearModel):
        self.model = model

    def run(self, inputs):
        return linear_run(self.model, inputs)

    def describe(self) -> dict:
        return {"runtime": self.name, "provider": self.provider}


class LinearRuntime(PlainLinearRuntime, Runtime):
    """The same members on the protocol's base: the required ones above, the base's defaults for the rest."""

    name = "numpy-linear"


class NoRun:
    """Everything but the one member that computes."""

    name, provider = "broken", "none"

    def describe(self) -> dict:
        return {"runtime": self.name}


@pytest.fixture(scope="module")
def tokenized(bundle):
    manifest, encoder = open_bundle(bundle)
    norm = manifest.normalization
    # spread over the bundle's reference distribution, so z-scores and percentiles are not all saturated
    model = LinearModel(encoder.tokenizer.get_vocab_size(), bias=norm.mean, scale=norm.std)
    return manifest, encoder, model


def by_hand(tokenized, prompt: str, response: str) -> dict:
    manifest, encoder, model = tokenized
    encoded = encoder.encode([prompt], [response])[0]
    raw = float(np.float32(model.reward(encoded.ids)))
    norm = manifest.normalization
    return {"raw": raw, "score": (raw - norm.mean) / norm.std, "percentile": float(norm.percentile(raw)),
            "n_tokens": len(encoded.ids)}


@pytest.mark.parametrize("kind", [LinearRuntime, PlainLinearRuntime])
def test_a_custom_runtime_serves_score_and_rank_as_computed_by_hand(bundle, tokenized, kind):
    runtime = kind(tokenized[2])
    with InProcessServer(bundle, wrap=lambda _: runtime) as srv:
        info = httpx.get(srv.url + "/v1/models", timeout=10).json()["data"][0]
        assert info["runtime"]["runtime"] == runtime.name
        for prompt, response in PAIRS:
            got = httpx.post(srv.url + "/v1/score", json={"prompt": prompt, "response": response}, timeout=30)
            assert got.status_code == 200, got.text
            want, body = by_hand(tokenized, prompt, response), got.json()
            assert body["n_tokens"] == want["n_tokens"]
            for key in ("raw", "score", "percentile"):
                assert abs(body[key] - want[key]) <= TOL * max(1.0, abs(want[key])), (key, body, want)
        prompt = PAIRS[0][0]
        responses = [r for _, r in PAIRS]
        got = httpx.post(srv.url + "/v1/rank", json={"prompt": prompt, "responses": responses}, timeout=30)
        assert got.status_code == 200, got.text
        raws = [by_hand(tokenized, prompt, r)["raw"] for r in responses]
        body = got.json()
        assert [abs(r["raw"] - w) <= TOL * max(1.0, abs(w)) for r, w in zip(body["results"], raws)] == [True] * 4
        assert body["ranking"] == sorted(range(4), key=lambda i: -raws[i])
        assert body["best_index"] == int(np.argmax(raws))
        assert len(set(body["ranking"])) == 4 and len({round(w, 4) for w in raws}) == 4  # a real order to check


def test_a_runtime_without_run_fails_at_startup_in_one_line(bundle):
    from service.app import create_app
    from service.settings import Settings

    async def start(app):
        async with app.router.lifespan_context(app):
            pass

    settings = Settings(bundle=bundle, intra_op_threads=1, tokenizer_threads=1, log_level="warning")
    with pytest.raises(Exception) as caught:  # create_app or the startup (lifespan) refuses it
        asyncio.run(start(create_app(settings, runtime=NoRun())))
    message = str(caught.value)
    assert "runtime NoRun lacks run: a runtime implements run, describe, name and provider" in message, message
    assert "\n" not in message


def test_check_runtime_names_every_missing_member_and_fills_the_defaults():
    with pytest.raises(RuntimeProtocolError, match=r"^runtime object lacks run, describe, name, provider: "):
        check_runtime(object())

    class Half(Runtime):  # subclassed, but never implemented describe nor named its provider
        name = "half"

        def run(self, inputs):
            return np.zeros(len(inputs["input_ids"]), dtype=np.float32)

    with pytest.raises(RuntimeProtocolError, match=r"^runtime Half lacks describe, provider: "):
        check_runtime(Half())
    model = LinearModel(8, bias=1.0, scale=2.0)
    plain = PlainLinearRuntime(model)
    seen = check_runtime(plain)
    assert isinstance(seen, Runtime) and check_runtime(seen) is seen
    assert (seen.precision, seen.reuses_prefix, seen.slice_kv, seen.batch_hint) == ("fp32", False, None, None)
    assert seen.reserve_prefix_cache(1024) == 0 and seen.model is model  # anything else: the object's own
    inputs = {"input_ids": np.array([[1, 2, 3], [4, 5, 0]]), "attention_mask": np.array([[1, 1, 1], [1, 1, 0]])}
    np.testing.assert_allclose(seen.run(inputs), [model.reward([1, 2, 3]), model.reward([4, 5])], rtol=1e-6)
    with pytest.raises(NotImplementedError, match="run_shared is only called on a runtime that says it reuses"):
        seen.run_shared(inputs, 2, 4096)
    plain.precision = "bf16"  # read from the object when asked, never copied
    assert seen.precision == "bf16"


def test_a_custom_runtime_cannot_be_reloaded(bundle, tokenized):
    """POST /admin/reload rebuilds models from bundles; a runtime the caller built is not one: a 409 (retrying
    will not help), not a reload that would drop the caller's runtime."""
    with InProcessServer(bundle, wrap=lambda _: LinearRuntime(tokenized[2]), api_keys="key-a api admin") as srv:
        got = httpx.post(srv.url + "/admin/reload", headers={"Authorization": "Bearer key-a"}, timeout=30)
        assert got.status_code == 409, got.text
        assert got.json()["error"]["type"] == "conflict" and "custom runtime" in got.json()["error"]["message"]
