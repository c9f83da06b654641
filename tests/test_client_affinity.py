"""Group affinity of the Python client across replicas (issue 21, item 4), against real servers on 127.0.0.1.

With several base URLs a call goes first to the replica `replica_index` picks from its leading text (the
prompt; the whole query of /get_reward), so the n samples of a GRPO group meet on one replica, where
their shared prompt can be computed once; a batch call is split by replica and put back in order; a dead
replica's calls go to the next replicas in list order. Where each request landed is read from each
server's own request counter (rewardserve_requests_total by route).
"""

from __future__ import annotations

import asyncio
import hashlib
import random

import httpx
import pytest

from service.client import AsyncRewardServeClient, RewardServeClient, replica_index
from tests.helpers import free_port, metric

TOL = 1e-5
N_SAMPLES = 3


def _prompt(group: int) -> str:
    """A prompt longer than the 256 characters the replica is picked by, so that a /get_reward query
    (prompt + response as one text) is placed by its prompt alone, as a long chat prompt would be."""
    return (f"Human: Question {group}: explain, with examples and the usual caveats, how topic {group} "
            "works in practice. " + "Please be thorough and precise. " * 8 + "\n\nAssistant:")


GROUPS = {g: [(_prompt(g), f"Answer {k} to question {g}: it works like this.") for k in range(N_SAMPLES)]
          for g in range(8)}


def _served(url: str, route: str) -> float:
    return metric(httpx.get(url + "/metrics").text, "rewardserve_requests_total", route=route, status="200")


def _reference(url: str, pairs) -> list[float]:
    return [httpx.post(url + "/v1/score", json={"prompt": p, "response": r}, timeout=30).json()["raw"]
            for p, r in pairs]


@pytest.fixture(scope="module")
def replicas(start_server):
    return [start_server(), start_server()]


def test_replica_index_is_the_documented_sha256_rule():
    text = "<|im_start|>user\n" + "é" * 300
    for n in (1, 2, 3, 7):
        expected = int(hashlib.sha256(text[:256].encode("utf-8")).hexdigest(), 16) % n
        assert replica_index(text, n) == expected
    assert replica_index(text, 3) == replica_index(text[:256] + "another response", 3)  # only the lead counts
    assert {replica_index(_prompt(g), 2) for g in GROUPS} == {0, 1}  # the groups below use both replicas


def test_each_groups_samples_land_on_one_replica_per_sample_and_in_batches(replicas):
    urls = [s.url for s in replicas]
    homes = {g: replica_index(_prompt(g), len(urls)) for g in GROUPS}
    with RewardServeClient(urls) as client:
        for g, samples in GROUPS.items():  # one request per sample, as GRPO reward functions send them
            before = [_served(u, "/v1/score") for u in urls]
            got = [client.score(p, r)["raw"] for p, r in samples]
            moved = [_served(u, "/v1/score") - b for u, b in zip(urls, before)]
            assert moved[homes[g]] == N_SAMPLES and sum(moved) == N_SAMPLES, (g, moved)
            assert max(abs(a - b) for a, b in zip(got, _reference(urls[1 - homes[g]], samples))) <= TOL

            before = [_served(u, "/get_reward") for u in urls]
            for p, r in samples:
                client.get_reward([p + " " + r])
            moved = [_served(u, "/get_reward") - b for u, b in zip(urls, before)]
            assert moved[homes[g]] == N_SAMPLES and sum(moved) == N_SAMPLES, (g, moved)


def test_a_batch_of_interleaved_groups_is_split_by_replica_and_answered_in_order(replicas):
    urls = [s.url for s in replicas]
    pairs = [pair for samples in GROUPS.values() for pair in samples]
    random.Random(0).shuffle(pairs)  # groups interleaved, as a rollout batch arrives
    reference = _reference(urls[0], pairs)
    homes = [replica_index(p, len(urls)) for p, _ in pairs]
    for route in ("/v1/score/batch", "/get_reward"):
        before = [_served(u, route) for u in urls]
        with RewardServeClient(urls) as client:
            if route == "/v1/score/batch":
                got = [r["raw"] for r in client.score_batch(pairs)]
            else:
                answer = client.get_reward([p + " " + r for p, r in pairs], normalize=False)
                got = answer["rewards"]
                assert answer["extra_logs"]["raw_reward"] == pytest.approx(got)
        assert [_served(u, route) - b for u, b in zip(urls, before)] == [1, 1]  # one request per replica
        assert max(abs(a - b) for a, b in zip(got, reference)) <= TOL  # in input order
    assert len({round(x, 5) for x in reference}) > 1 and set(homes) == {0, 1}

    async def both():
        async with AsyncRewardServeClient(urls) as client:
            return await client.score_batch(pairs), await client.get_reward([p + " " + r for p, r in pairs])

    batch, answer = asyncio.run(both())
    assert max(abs(r["raw"] - b) for r, b in zip(batch, reference)) <= TOL
    assert max(abs(a - b) for a, b in zip(answer["extra_logs"]["raw_reward"], reference)) <= TOL


def test_a_dead_replica_fails_over_to_the_next_in_order_and_every_answer_comes_back(replicas):
    """urls = [dead, A, B]: groups placed on the dead replica (0) are answered by A (the next in order),
    never by B; groups placed on A or B stay there; a batch of all groups comes back whole and in order."""
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there: connection refused
    urls = [dead] + [s.url for s in replicas]
    homes = {g: replica_index(_prompt(g), 3) for g in GROUPS}
    assert 0 in homes.values() and len(set(homes.values())) > 1
    pairs = [pair for samples in GROUPS.values() for pair in samples]
    reference = _reference(urls[1], pairs)
    by_pair = dict(zip(pairs, reference))
    with RewardServeClient(urls, replica_cooldown_s=60) as client:
        for g, samples in GROUPS.items():
            before = [_served(u, "/v1/score") for u in urls[1:]]
            got = [client.score(p, r)["raw"] for p, r in samples]
            moved = [_served(u, "/v1/score") - b for u, b in zip(urls[1:], before)]
            lands = 1 if homes[g] in (0, 1) else 2
            assert moved[lands - 1] == N_SAMPLES and sum(moved) == N_SAMPLES, (g, homes[g], moved)
            assert max(abs(a - by_pair[pair]) for a, pair in zip(got, samples)) <= TOL
        batch = client.score_batch(pairs)
        answer = client.get_reward([p + " " + r for p, r in pairs], normalize=False)
    assert [a.url for a in client.history if a.status is None] == [dead]  # tried once, then skipped
    assert max(abs(r["raw"] - b) for r, b in zip(batch, reference)) <= TOL
    assert max(abs(a - b) for a, b in zip(answer["rewards"], reference)) <= TOL
