"""service/ensemble.py: the aggregation math against formulas written out by hand, and a real ensemble of
three differently seeded tiny bundles (trained and exported here), whose answers must equal the members'
own answers aggregated by hand for every aggregate."""

from __future__ import annotations

import asyncio
import json
import math
import statistics
from pathlib import Path

import numpy as np
import pytest

from service.ensemble import EnsembleModel, aggregate, member_probability, uncertainty
from service.metrics import Metrics
from service.parity import REFERENCE_FILE
from service.data import read_pairs
from service.repository import EnsembleSpec, scan
from service.served_model import Call, Item, ServedModel, TooLong
from service.settings import Settings
from tests.helpers import metric, tiny_bert, train_and_export

MEMBERS = ("a", "b", "c")
SPECS = {  # ensemble.json bodies, one per aggregate
    "mean": {"members": list(MEMBERS), "aggregate": "mean"},
    "min": {"members": list(MEMBERS), "aggregate": "min"},
    "uwo": {"members": list(MEMBERS), "aggregate": "uwo", "lambda": 0.7},
    "weighted": {"members": list(MEMBERS), "aggregate": "weighted", "weights": {"a": 1.0, "b": 0.5, "c": 2.0}},
    "gate": {"members": ["b", "a"], "aggregate": "gate", "gate": "b", "below": 0.0, "else": "a"},
}


def by_hand(spec: EnsembleSpec, values: dict[str, float], z: dict[str, float]) -> float:
    """One response's aggregate, written out from the issue's definitions (plain Python, no numpy)."""
    v = [values[m] for m in spec.members]
    if spec.aggregate == "mean":
        return sum(v) / len(v)
    if spec.aggregate == "min":
        return min(v)
    if spec.aggregate == "uwo":
        return statistics.fmean(v) - spec.lam * statistics.pvariance(v)
    if spec.aggregate == "weighted":
        return sum(spec.weights[m] * values[m] for m in spec.members) / sum(spec.weights.values())
    return values[spec.gate] if z[spec.gate] < spec.below else values[spec.otherwise]


def spec_of(name: str, body: dict, tmp_path: Path) -> EnsembleSpec:
    """An EnsembleSpec as the repository scan parses it from an ensemble.json."""
    root = tmp_path / f"repo-{name}"
    for member in MEMBERS:
        (root / member / "1").mkdir(parents=True)
        (root / member / "1" / "manifest.json").write_text("{}")
    (root / name).mkdir()
    (root / name / "ensemble.json").write_text(json.dumps(body))
    spec = scan(root).ensembles[name]
    assert spec.error is None, spec.error
    return spec


@pytest.mark.parametrize("name", sorted(SPECS))
def test_aggregates_match_the_formulas(name, tmp_path):
    spec = spec_of(name, SPECS[name], tmp_path)
    rng = np.random.default_rng(7)
    z = rng.normal(size=(len(spec.members), 50)) * [[0.5], [1.0], [2.0]][:len(spec.members)]
    raw = rng.normal(size=z.shape) * 3 + 1
    got_z, got_raw = aggregate(z, spec), aggregate(raw, spec, z)
    for j in range(z.shape[1]):
        zj = {m: float(z[i, j]) for i, m in enumerate(spec.members)}
        rj = {m: float(raw[i, j]) for i, m in enumerate(spec.members)}
        assert got_z[j] == pytest.approx(by_hand(spec, zj, zj), abs=1e-12)
        assert got_raw[j] == pytest.approx(by_hand(spec, rj, zj), abs=1e-12)  # gate: the member z chose
        assert uncertainty(z)[j] == pytest.approx(statistics.pstdev(zj.values()), abs=1e-12)
    if name == "gate":  # both branches were taken
        assert 0 < np.sum(z[0] < 0) < z.shape[1]


def test_member_probability_is_the_mean_of_the_members():
    a, b, t = np.array([1.0, -2.0, 0.5]), np.array([0.0, 1.0, 0.5]), np.array([1.0, 2.0, 0.5])
    hand = sum(1 / (1 + math.exp(-(x - y) / s)) for x, y, s in zip(a, b, t)) / 3
    assert member_probability(a, b, t) == pytest.approx(hand, abs=1e-12)


# ---------------------------------------------------------------- real members

def own_vocabulary(base: Path) -> None:
    """Give a checkpoint a tokenizer of its own: a 600-piece WordPiece vocabulary trained here on the demo
    set (not MiniLM's 30,522), so the same text becomes other ids and another number of tokens."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    from service.data import demo_data_path

    pairs, _ = read_pairs(demo_data_path())
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok.train_from_iterator([t for p in pairs for t in (p.prompt, p.chosen, p.rejected)],
                            trainers.WordPieceTrainer(vocab_size=600, special_tokens=special))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                                       special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    tok.save(str(base / "tokenizer.json"))
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    (base / "vocab.txt").write_text("".join(piece + "\n" for piece, _ in vocab))


@pytest.fixture(scope="module")
def member_bundles(tmp_path_factory) -> dict[str, Path]:
    """Three tiny BERT reward models from differently seeded initialisations (so they disagree); "c" has a
    tokenizer of its own (members with different tokenizers are allowed: each tokenizes the text itself)."""
    out = {}
    for seed, name in enumerate(MEMBERS):
        base = tiny_bert(tmp_path_factory.mktemp(f"member-{name}") / "base", seed=seed + 1,
                         max_position_embeddings=128)
        if name == "c":
            own_vocabulary(base)
        out[name] = train_and_export(base, f"member-{name}", max_length=64, batch_size=16, max_pairs=48,
                                     seed=seed + 1)
    return out


def run(coro):
    return asyncio.new_event_loop().run_until_complete(coro)


async def started_members(bundles: dict[str, Path], metrics: Metrics) -> dict[str, ServedModel]:
    settings = Settings(bundle=bundles["a"], intra_op_threads=1, tokenizer_threads=1)
    members = {name: ServedModel(name, "1", path, settings, metrics) for name, path in bundles.items()}
    await asyncio.gather(*(m.start() for m in members.values()))
    return members


def call(loop_time: float) -> Call:
    async def never():
        await asyncio.Event().wait()
    return Call(deadline=loop_time + 60.0, disconnected=never)


PAIRS = [("What is the capital of France?", "Paris is the capital of France."),
         ("What is the capital of France?", "I don't know, maybe Berlin?"),
         ("Write a haiku about rain.", "Soft rain on the roof / the garden drinks in silence / puddles hold the sky"),
         ("Write a haiku about rain.", "no"),
         ("Explain recursion.", "Recursion is when a function calls itself on a smaller input until a base case."),
         ("Explain recursion.", "see: recursion " * 40)]


def test_ensemble_scores_equal_the_members_aggregated_by_hand(member_bundles, tmp_path):
    async def scenario():
        metrics = Metrics()
        members = await started_members(member_bundles, metrics)
        loop = asyncio.get_running_loop()
        items = [Item(p, r) for p, r in PAIRS]
        own = {name: await m.score(call(loop.time()), items) for name, m in members.items()}
        ensembles = {}
        for name, body in SPECS.items():
            ensembles[name] = EnsembleModel(spec_of(name, body, tmp_path), members, metrics)
            await ensembles[name].start()
        answers = {name: await e.score(call(loop.time()), items) for name, e in ensembles.items()}
        reference = [Item(p, r) for path in member_bundles.values()
                     for q in read_pairs(path / REFERENCE_FILE)[0][:256] for p, r in ((q.prompt, q.chosen),
                                                                                  (q.prompt, q.rejected))]
        reference = list(dict.fromkeys(reference))
        ref_own = {name: await m.score(call(loop.time()), reference) for name, m in members.items()}
        ref_answers = {name: await e.score(call(loop.time()), reference) for name, e in ensembles.items()}
        exposition = metrics.exposition().decode()
        # what each member's own /v1/compare would answer for items 0 and 1 (its fitted temperature included)
        member_p = [m.probability(own[name][0], own[name][1]) for name, m in members.items()]
        for m in members.values():
            await m.stop(1.0)
        return own, ensembles, answers, ref_own, ref_answers, exposition, member_p

    own, ensembles, answers, ref_own, ref_answers, exposition, member_p = run(scenario())
    spreads = [statistics.pstdev([own[m][j].score for m in MEMBERS]) for j in range(len(PAIRS))]
    # "c" tokenizes with its own vocabulary: other token counts than "a" for the same texts
    assert [own["c"][j].n_tokens for j in range(len(PAIRS))] != [own["a"][j].n_tokens for j in range(len(PAIRS))]
    assert max(spreads) > 1e-3  # the members really disagree (different seeds), so every check below bites
    for name, ensemble in ensembles.items():
        spec = ensemble.spec
        assert ensemble.version == ",".join(f"{m}@1" for m in spec.members)
        # the high_uncertainty threshold and the percentile scale, from the reference set scored by hand
        ref_spread = [statistics.pstdev([ref_own[m][j].score for m in spec.members]) for j in range(len(ref_own["a"]))]
        p99 = float(np.percentile(ref_spread, 99))
        assert ensemble.uncertainty_p99 == pytest.approx(p99, abs=1e-9)
        ref_scores = [by_hand(spec, *(({m: ref_own[m][j].score for m in spec.members},) * 2))
                      for j in range(len(ref_own["a"]))]
        for j, result in enumerate(answers[name]):
            z = {m: own[m][j].score for m in spec.members}
            raw = {m: own[m][j].raw for m in spec.members}
            assert result.model == name and result.version == ensemble.version
            assert result.members == pytest.approx(z, abs=1e-9)
            assert result.score == pytest.approx(by_hand(spec, z, z), abs=1e-9)
            assert result.raw == pytest.approx(by_hand(spec, raw, z), abs=1e-9)
            assert result.uncertainty == pytest.approx(statistics.pstdev(z.values()), abs=1e-9)
            share_below = sum(s <= result.score for s in ref_scores) / len(ref_scores) * 100
            assert abs(result.percentile - share_below) <= 100 / len(ref_scores) + 1.0
            assert (result.flags is not None and "high_uncertainty" in result.flags) == (result.uncertainty > p99)
            assert result.n_tokens == max(own[m][j].n_tokens for m in spec.members)
        # on the reference set itself: the top ~1 % by spread is flagged, as is the top ~1 % by score
        flagged = [j for j, r in enumerate(ref_answers[name]) if "high_uncertainty" in (r.flags or [])]
        assert flagged == [j for j, u in enumerate(ref_spread) if u > p99] and flagged
        above = [j for j, r in enumerate(ref_answers[name]) if "above_calibration_p99" in (r.flags or [])]
        assert above == [j for j, x in enumerate(ref_scores) if x > np.percentile(ref_scores, 99)] and above
    # the probability: each member's own (calibrated) probability, averaged, for every aggregate
    assert len(set(member_p)) == 3  # the members disagree here too
    for name, ensemble in ensembles.items():
        a, b = answers[name][0], answers[name][1]
        own_p = [p for m, p in zip(MEMBERS, member_p) if m in ensemble.spec.members]
        assert ensemble.probability(a, b) == pytest.approx(statistics.fmean(own_p), abs=1e-12)
    assert "_member_raw" not in a.model_dump() and "members" in a.model_dump()
    # every ensemble answer observed its uncertainty, under the ensemble's name
    for name in SPECS:
        assert metric(exposition, "rewardserve_ensemble_uncertainty_count", model=name) == len(PAIRS) + len(ref_own["a"])


def test_a_member_too_long_is_too_long_in_that_slot(member_bundles, tmp_path):
    async def scenario():
        metrics = Metrics()
        members = await started_members(member_bundles, metrics)
        ensemble = EnsembleModel(spec_of("mean", SPECS["mean"], tmp_path), members, metrics)
        await ensemble.start()
        loop = asyncio.get_running_loop()
        items = [Item("short prompt", "short answer", truncate=False),
                 Item("short prompt", "far too long " * 100, truncate=False, response_field="items.1.response"),
                 Item("short prompt", "far too long " * 100, truncate=True)]
        results = await ensemble.score(call(loop.time()), items)
        for m in members.values():
            await m.stop(1.0)
        return results

    ok, too_long, cut = run(scenario())
    assert ok.members is not None and not ok.truncated
    assert isinstance(too_long, TooLong) and too_long.field == "items.1.response"
    assert cut.truncated and cut.uncertainty is not None


# ---------------------------------------------------------------- over HTTP

def test_ensembles_over_http_equal_the_members_own_answers_aggregated(member_bundles, tmp_path):
    """`serve --repository` with the three members and one ensemble per aggregate: an ensemble's /v1/score
    answer equals the members' own /v1/score answers (model=<member>) aggregated by hand."""
    import shutil

    import httpx

    from tests.test_registry import start_repository

    root = tmp_path / "repo"
    for name, path in member_bundles.items():
        shutil.copytree(path, root / name / "1")
    for name, body in SPECS.items():
        (root / f"ens-{name}").mkdir()
        (root / f"ens-{name}" / "ensemble.json").write_text(json.dumps(body))
    (root / "ens-bad").mkdir()  # one bad ensemble: listed as failed with its one line, the rest serve
    (root / "ens-bad" / "ensemble.json").write_text(json.dumps(
        {"members": ["a", "b"], "aggregate": "weighted", "weights": {"a": 1.0, "b": 1.0, "zz": 1.0}}))
    specs = scan(root).ensembles
    (tmp_path / "logs").mkdir()
    server = start_repository(root, tmp_path / "logs")
    try:
        post = lambda path, body: httpx.post(server.url + path, json=body, timeout=30)  # noqa: E731
        for prompt, response in PAIRS[:3]:
            own = {}
            for m in MEMBERS:
                r = post("/v1/score", {"prompt": prompt, "response": response, "model": m})
                assert r.status_code == 200, r.text
                own[m] = r.json()
                assert "members" not in own[m] and "uncertainty" not in own[m]  # a model's answer is unchanged
            for name in SPECS:
                spec = specs[f"ens-{name}"]
                r = post("/v1/score", {"prompt": prompt, "response": response, "model": f"ens-{name}"})
                assert r.status_code == 200, r.text
                got = r.json()
                z = {m: own[m]["score"] for m in spec.members}
                raw = {m: own[m]["raw"] for m in spec.members}
                assert got["model"] == f"ens-{name}" and got["version"] == ",".join(f"{m}@1" for m in spec.members)
                assert got["members"] == pytest.approx(z, abs=1e-9)
                assert got["score"] == pytest.approx(by_hand(spec, z, z), abs=1e-9)
                assert got["raw"] == pytest.approx(by_hand(spec, raw, z), abs=1e-9)
                assert got["uncertainty"] == pytest.approx(statistics.pstdev(z.values()), abs=1e-9)
        # /v1/compare on an ensemble: the mean of the members' own /v1/compare probabilities
        body = {"prompt": PAIRS[0][0], "a": PAIRS[0][1], "b": PAIRS[1][1]}
        own_p = {m: post("/v1/compare", {**body, "model": m}).json()["probability"] for m in MEMBERS}
        r = post("/v1/compare", {**body, "model": "ens-mean"})
        assert r.status_code == 200, r.text
        assert r.json()["probability"] == pytest.approx(statistics.fmean(own_p.values()), abs=1e-9)
        models = httpx.get(server.url + "/v1/models", timeout=10).json()["data"]
        info = {m["id"]: m for m in models}["ens-gate"]
        assert info["kind"] == "ensemble" and info["members"] == {"b": "1", "a": "1"}
        assert info["parameters"] == {"gate": "b", "below": 0.0, "else": "a"} and info["uncertainty_p99"] > 0
        bad = {m["id"]: m for m in models}["ens-bad"]
        assert bad["state"] == "failed" and "weights name zz, not members (a, b)" in bad["reason"]
        r = post("/v1/score", {"prompt": PAIRS[0][0], "response": PAIRS[0][1], "model": "ens-bad"})
        assert r.status_code == 404 and r.json()["error"]["field"] == "model", r.text
        exposition = httpx.get(server.url + "/metrics", timeout=10).text
        assert metric(exposition, "rewardserve_ensemble_uncertainty_count", model="ens-uwo") == 3
    finally:
        server.stop()


def test_members_are_scored_concurrently(member_bundles, tmp_path):
    """Each member's runtime is slowed to 1 s a run once everything is loaded: one ensemble request starts
    all three members' runs before the first of them ends (no timing is asserted, only the overlap)."""
    from service.bundle import read_manifest
    from service.runtime import load_runtime
    from tests.helpers import RecordingRuntime

    async def scenario():
        metrics = Metrics()
        settings = Settings(bundle=member_bundles["a"], intra_op_threads=1, tokenizer_threads=1)
        runtimes = {name: RecordingRuntime(load_runtime(path, read_manifest(path), provider="cpu", intra_op_threads=1))
                    for name, path in member_bundles.items()}
        members = {name: ServedModel(name, "1", path, settings, metrics, runtime=runtimes[name])
                   for name, path in member_bundles.items()}
        await asyncio.gather(*(m.start() for m in members.values()))
        ensemble = EnsembleModel(spec_of("mean", SPECS["mean"], tmp_path), members, metrics)
        await ensemble.start()
        for runtime in runtimes.values():
            runtime.delay_s, runtime.runs[:] = 1.0, []
        [result] = await ensemble.score(call(asyncio.get_running_loop().time()), [Item(*PAIRS[0])])
        for m in members.values():
            await m.stop(1.0)
        return result, {name: [start for start, _, _ in r.runs] for name, r in runtimes.items()}

    result, starts = run(scenario())
    assert result.members is not None and all(len(s) == 1 for s in starts.values()), starts
    first = [s[0] for s in starts.values()]
    assert max(first) < min(first) + 1.0, f"a member's run started after another's had ended: {starts}"
