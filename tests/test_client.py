"""service/client.py against real server processes: retries honour Retry-After, replicas share the load
and a dead one is skipped, chunking, compare, TRL's GRPOTrainer calling the reward function (sync and
async), and the score cache; and the `client` extra declaring what service/client.py imports.
"""

from __future__ import annotations

import ast
import asyncio
import math
import re
import sys
import threading
import time

import httpx
import pytest

from service.data import demo_data_path, read_pairs
from service.client import (AsyncRewardServeClient, AsyncRewardServeReward, RewardServeClient, RewardServeError,
                            RewardServeReward, parse_retry_after)
from tests.helpers import REPO, metric, skip_or_fail_in_ci

TOL = 1e-5


@pytest.fixture(scope="module")
def cases():
    pairs, _ = read_pairs(demo_data_path())
    return [(p.prompt, p.chosen) for p in pairs[:12]] + [(p.prompt, p.rejected) for p in pairs[:12]]


@pytest.fixture(scope="module")
def expected(server, cases):
    """Raw scores of `cases` from the shared server, one /v1/score call each."""
    return [httpx.post(server.url + "/v1/score", json={"prompt": p, "response": r}).json()["raw"] for p, r in cases]


def test_parse_retry_after():
    assert parse_retry_after("3") == 3.0 and parse_retry_after(None) is None and parse_retry_after("soon") is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0) == pytest.approx(10.0)


def _distribution(requirement: str) -> str:
    """The normalized project name of a PEP 508 requirement ("uvicorn[standard]>=0.30" -> "uvicorn")."""
    name = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement).group(1)
    return re.sub(r"[-_.]+", "-", name).lower()


def _module_level_imports(tree: ast.Module) -> set[str]:
    """Top-level names of the modules a file imports when it is imported (function bodies left out)."""
    found: set[str] = set()

    class Imports(ast.NodeVisitor):
        def visit_Import(self, node):
            found.update(alias.name.split(".")[0] for alias in node.names)

        def visit_ImportFrom(self, node):
            if node.level == 0:  # relative imports are the package itself
                found.add(node.module.split(".")[0])

        def visit_FunctionDef(self, node):  # runs only when called
            pass

        visit_AsyncFunctionDef = visit_FunctionDef

    Imports().visit(tree)
    return found


def test_client_extra_declares_every_third_party_import_of_the_client():
    """`pip install rewardserve[client]` is enough to import service.client: each third-party module it
    imports is provided by a base dependency or by the `client` extra."""
    try:
        import tomllib  # Python >= 3.11
    except ImportError:  # Python 3.10 (requires-python allows it): tomli, in the test extra there
        try:
            import tomli as tomllib
        except ImportError:
            skip_or_fail_in_ci("neither tomllib (Python >= 3.11) nor tomli (the test extra on 3.10) is importable")
    from importlib.metadata import packages_distributions

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    client_extra = project.get("optional-dependencies", {}).get("client", [])
    declared = {_distribution(r) for r in project["dependencies"] + client_extra}
    imported = _module_level_imports(ast.parse((REPO / "service" / "client.py").read_text()))
    third_party = {m for m in imported if m not in sys.stdlib_module_names and m not in ("__future__", "service", "rewardserve_client")}
    assert "httpx" in third_party, imported  # the scan sees the client's imports
    provided_by = packages_distributions()  # import name -> installed distributions
    undeclared = {m: provided_by.get(m, [m]) for m in sorted(third_party)
                  if not {_distribution(d) for d in provided_by.get(m, [m])} & declared}
    assert not undeclared, f"imported by service/client.py, in neither dependencies nor the client extra: {undeclared}"
    assert client_extra, "pyproject.toml has no [project.optional-dependencies] client extra"


def hold_queue_full(url: str, n: int, min_depth: int) -> threading.Thread:
    """A /v1/rank of n long candidates, one item per model run: the queue stays non-empty for a while.
    Returns once at least min_depth items are queued."""
    candidates = [f"candidate {i}: " + "a long and careful answer " * 8 for i in range(n)]
    thread = threading.Thread(target=httpx.post, args=(url + "/v1/rank",),
                              kwargs={"json": {"prompt": f"p{time.monotonic()}", "responses": candidates},
                                      "timeout": 60})
    thread.start()
    deadline = time.monotonic() + 30
    while metric(httpx.get(url + "/metrics").text, "rewardserve_queue_depth") < min_depth:
        assert time.monotonic() < deadline, "the queue never filled"
    return thread


def test_retry_honours_retry_after_against_an_overloaded_server(start_server, cases, expected):
    # max_batch_size=1: the queue drains one item per run (about a second for N items); a request of
    # N = max_queue items is admitted only once the queue is empty
    n = 2048
    server = start_server(max_queue=n, max_client_batch=n, max_batch_size=1, retry_after_s=1)
    items = (cases * 100)[:n]
    with RewardServeClient(server.url, max_retries=0, batch_size=n) as impatient:
        holder = hold_queue_full(server.url, n, min_depth=n // 2)
        with pytest.raises(RewardServeError) as refused:
            impatient.score_batch(items)
        holder.join()
    assert refused.value.status == 503 and refused.value.type == "overloaded"

    with RewardServeClient(server.url, max_retries=5, batch_size=n) as client:
        holder = hold_queue_full(server.url, n, min_depth=n // 2)
        results = client.score_batch(items)
        holder.join()
    attempts = list(client.history)
    assert [a.status for a in attempts[:1]] == [503], attempts  # refused while the queue was full ...
    assert attempts[-1].status == 200  # ... and answered once it had drained
    for before, after in zip(attempts, attempts[1:]):
        assert before.status == 503 and before.slept_after == 1.0  # exactly the server's Retry-After
        assert after.started - before.started >= 1.0
    assert max(abs(r["raw"] - e) for r, e in zip(results, (expected * 100)[:n])) <= TOL


def test_chunking_to_the_servers_max_client_batch(start_server, cases, expected):
    server = start_server(max_client_batch=5)
    with RewardServeClient(server.url) as client:  # learns max_client_batch=5 from /v1/models
        results = client.score_batch(cases)
        assert client.batch_size == 5
        assert [a.path for a in client.history].count("/v1/score/batch") == 5  # 24 items → 5 calls
        assert client.rewards([p for p, _ in cases[:3]], [r for _, r in cases[:3]], field="raw") == \
            pytest.approx(expected[:3], abs=TOL)
        with pytest.raises(RewardServeError) as bad:
            client.score("", "x")
    assert bad.value.status == 422 and bad.value.field == "prompt"
    assert max(abs(r["raw"] - e) for r, e in zip(results, expected)) <= TOL

    async def run():
        async with AsyncRewardServeClient(server.url, batch_size=4, concurrency=3) as aclient:
            return await aclient.score_batch(cases), list(aclient.history)

    async_results, history = asyncio.run(run())
    assert len(history) == 6 and all(a.status == 200 for a in history)
    assert max(abs(r["raw"] - e) for r, e in zip(async_results, expected)) <= TOL


def test_compare_sync_and_async(server, cases):
    """POST /v1/compare through both clients: the same answer as the server's own /v1/score numbers, and
    refusals raised as RewardServeError naming the field."""
    (prompt, a), (_, b) = cases[0], cases[12]  # the chosen and the rejected response of one demo pair
    ref_a, ref_b = (httpx.post(server.url + "/v1/score", json={"prompt": prompt, "response": r}).json() for r in (a, b))
    with RewardServeClient(server.url) as client:
        blocking = client.compare(prompt, a, b)

    async def run():
        async with AsyncRewardServeClient(server.url) as aclient:
            answer = await aclient.compare(prompt, a, b)
            flipped = await aclient.compare(prompt, b, a, truncate=True)
            with pytest.raises(RewardServeError) as empty:
                await aclient.compare(prompt, a, "   ")
            with pytest.raises(RewardServeError) as too_long:
                await aclient.compare(prompt, "a very long answer " * 100, b, truncate=False)
            return answer, flipped, empty.value, too_long.value, list(aclient.history)

    answer, flipped, empty, too_long, history = asyncio.run(run())
    assert set(answer) == {"probability", "a", "b"} and answer == blocking
    for side, ref in (("a", ref_a), ("b", ref_b)):
        assert abs(answer[side]["raw"] - ref["raw"]) <= TOL and abs(answer[side]["score"] - ref["score"]) <= TOL
        assert answer[side]["n_tokens"] == ref["n_tokens"] and answer[side]["model"] == ref["model"]
    assert answer["probability"] == pytest.approx(1 / (1 + math.exp(ref_b["raw"] - ref_a["raw"])), abs=1e-6)
    assert flipped["a"] == answer["b"] and flipped["probability"] == pytest.approx(1 - answer["probability"], abs=1e-6)
    assert (empty.status, empty.type, empty.field) == (422, "validation_error", "b")
    assert (too_long.status, too_long.type, too_long.field) == (422, "validation_error", "a")
    assert [(h.path, h.status) for h in history] == [("/v1/compare", 200)] * 2 + [("/v1/compare", 422)] * 2


def test_replicas_share_the_load_and_a_killed_one_is_skipped(start_server, cases, expected):
    servers = [start_server() for _ in range(3)]
    urls = [s.url for s in servers]
    chunks = [cases[i:i + 4] for i in range(0, len(cases), 4)]  # 6 requests of 4 items
    # affinity=False: round-robin, what this test counts (group affinity: tests/test_client_affinity.py)
    with RewardServeClient(urls, batch_size=4, concurrency=1, replica_cooldown_s=60, affinity=False) as client:
        first = [client.score_batch(chunk) for chunk in chunks]
        assert dict(client.answered) == {u: 2 for u in urls}  # round-robin: an even split
        servers[1].proc.kill()  # a replica dies between calls
        servers[1].proc.wait()
        second = [client.score_batch(chunk) for chunk in chunks * 2]
    failures = [a for a in client.history if a.status is None]
    assert [a.url for a in failures] == [urls[1]]  # tried once, then skipped for the cooldown
    assert client.answered[urls[1]] == 2
    assert client.answered[urls[0]] + client.answered[urls[2]] == 4 + 12
    assert abs(client.answered[urls[0]] - client.answered[urls[2]]) <= 2  # the retried call lands on one of them
    flat = [r["raw"] for batch in first + second for r in batch]
    assert max(abs(got - want) for got, want in zip(flat, expected * 3)) <= TOL


class RecordingReward(RewardServeReward):
    """The real reward function, remembering what TRL passed and what it returned."""

    calls: list = []

    def __call__(self, prompts, completions, **kwargs):
        out = super().__call__(prompts, completions, **kwargs)
        RecordingReward.calls.append((list(prompts), list(completions), set(kwargs), out))
        return out


class AsyncRecordingReward(AsyncRewardServeReward):
    """The real async reward function, remembering what TRL passed and what it returned."""

    async def __call__(self, prompts, completions, **kwargs):
        out = await super().__call__(prompts, completions, **kwargs)
        RecordingReward.calls.append((list(prompts), list(completions), set(kwargs), out))
        return out


@pytest.mark.parametrize("reward_class", [RecordingReward, AsyncRecordingReward], ids=["sync", "async"])
def test_trl_grpo_trainer_calls_the_reward_function(server, tmp_path, reward_class):
    import torch
    import transformers as tf
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from tests.helpers import copy_tokenizer

    policy = tmp_path / "policy"
    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=30522, hidden_size=32, num_attention_heads=2, intermediate_size=64,
                            num_hidden_layers=2, num_key_value_heads=1, max_position_embeddings=256,
                            pad_token_id=0, bos_token_id=101, eos_token_id=102)
    tf.LlamaForCausalLM(config).save_pretrained(policy)
    copy_tokenizer(policy)
    tokenizer = tf.AutoTokenizer.from_pretrained(policy)
    tokenizer.eos_token, tokenizer.bos_token = "[SEP]", "[CLS]"
    dataset = Dataset.from_list([{"prompt": f"Human: what is {i} plus {i}?\n\nAssistant:"} for i in range(4)])
    args = GRPOConfig(output_dir=str(tmp_path / "run"), per_device_train_batch_size=4, num_generations=4,
                      max_completion_length=8, max_steps=1, report_to=[], use_cpu=True, logging_steps=1,
                      bf16=False, save_strategy="no", dataloader_num_workers=0)
    reward = reward_class(server.url, field="raw", empty_reward=-1.0)
    RecordingReward.calls.clear()
    trainer = GRPOTrainer(model=str(policy), reward_funcs=[reward], args=args, train_dataset=dataset,
                          processing_class=tokenizer)
    trainer.train()
    assert RecordingReward.calls, "TRL never called the reward function"
    prompts, completions, kwargs, rewards = RecordingReward.calls[0]
    assert len(rewards) == len(completions) == 4 and all(isinstance(r, float) for r in rewards)
    assert {"completion_ids", "trainer_state"} <= kwargs
    for prompt, completion, got in zip(prompts, completions, rewards):
        if completion.strip():
            ref = httpx.post(server.url + "/v1/score", json={"prompt": prompt, "response": completion}).json()
            assert abs(got - ref["raw"]) <= TOL
    logged = trainer.state.log_history[0]["rewards/rewardserve/mean"]
    assert logged == pytest.approx(sum(rewards) / len(rewards), abs=1e-4)


def test_trl_reward_function_conversational_and_empty_completions(server):
    reward = RewardServeReward(server.url, empty_reward=-9.0)
    assert reward.__name__ == "rewardserve"
    prompts = [[{"role": "user", "content": "How do I boil an egg?"}]] * 3
    completions = [[{"role": "assistant", "content": "Nine minutes in boiling water."}],
                   [{"role": "assistant", "content": "   "}],
                   [{"role": "assistant", "content": "I don't know."}]]
    rewards = reward(prompts=prompts, completions=completions, completion_ids=[[1]] * 3)
    assert len(rewards) == 3 and rewards[1] == -9.0
    v1 = httpx.post(server.url + "/v1/score", json={"messages": prompts[0] + completions[0]}).json()
    assert abs(rewards[0] - v1["score"]) <= TOL  # field "score": the z-score
    text = reward(prompts=["Human: hi\n\nAssistant:", "Human: hi\n\nAssistant:"], completions=["Hello!", ""])
    assert isinstance(text[0], float) and text[1] == -9.0
    import pickle

    assert pickle.loads(pickle.dumps(reward))(prompts=prompts[:1], completions=completions[:1]) == rewards[:1]


def test_async_trl_reward_function_on_trls_event_loop(server):
    """AsyncRewardServeReward dispatched the way GRPOTrainer dispatches async reward functions (its own
    is_async_callable and daemon event loop, `await fn(prompts=..., completions=..., completion_ids=...,
    log_metric=...)`, one loop for every step): the same floats as RewardServeReward."""
    from trl.trainer.utils import is_async_callable, shutdown_event_loop_in_daemon, start_event_loop_in_daemon

    steps = [  # plain text with an empty completion, then a conversational step
        (["Human: what is 2 plus 2?\n\nAssistant:"] * 3 + ["Human: hi\n\nAssistant:"],
         ["4", " It is 4.", "", "Hello! How can I help?"]),
        ([[{"role": "user", "content": "How do I boil an egg?"}]] * 3,
         [[{"role": "assistant", "content": "Nine minutes in boiling water."}],
          [{"role": "assistant", "content": "   "}],
          [{"role": "assistant", "content": "I don't know."}]]),
    ]
    sync_reward = RewardServeReward(server.url, field="raw", empty_reward=-9.0)
    async_reward = AsyncRewardServeReward(server.url, field="raw", empty_reward=-9.0)
    assert is_async_callable(async_reward) and not is_async_callable(sync_reward)
    assert async_reward.__name__ == "rewardserve"
    logged, answers = {"sync": [], "async": []}, []
    thread, loop, ready = start_event_loop_in_daemon(name="trl-reward-loop")
    ready.wait()
    try:
        for prompts, completions in steps:
            want = sync_reward(prompts=prompts, completions=completions, completion_ids=[[1]] * len(prompts),
                               log_metric=lambda name, value: logged["sync"].append((name, value)))

            async def dispatch():
                outputs = await asyncio.gather(async_reward(
                    prompts=prompts, completions=completions, completion_ids=[[1]] * len(prompts),
                    log_metric=lambda name, value: logged["async"].append((name, value))))
                return outputs[0]

            got = asyncio.run_coroutine_threadsafe(dispatch(), loop).result(timeout=60)
            assert isinstance(got, list) and all(isinstance(r, float) for r in got)
            assert got == want and -9.0 in got
            answers.append(got)
    finally:
        shutdown_event_loop_in_daemon(thread, loop)
    assert logged["async"] == logged["sync"] and [n for n, _ in logged["async"]] == ["rewardserve/warned_fraction"] * 2
    v1 = httpx.post(server.url + "/v1/score", json={"prompt": steps[0][0][0], "response": steps[0][1][0]}).json()
    assert abs(answers[0][0] - v1["raw"]) <= TOL  # the server's own number, not just the sync class's


def test_cache_hits_and_misses_are_counted(start_server, cases):
    server = start_server()
    (p0, r0), (p1, r1) = cases[0], cases[1]

    def counts():
        text = httpx.get(server.url + "/metrics").text
        return (metric(text, "rewardserve_cache_hits_total"), metric(text, "rewardserve_cache_misses_total"),
                metric(text, "rewardserve_batch_size_sum"))

    first = httpx.post(server.url + "/v1/score", json={"prompt": p0, "response": r0}).json()
    assert counts() == (0, 1, 1)
    again = httpx.post(server.url + "/v1/score", json={"prompt": p0, "response": r0}).json()
    assert counts() == (1, 1, 1) and again == first  # answered from the cache: no model run
    batch = httpx.post(server.url + "/v1/score/batch", json={"items": [
        {"prompt": p1, "response": r1}, {"prompt": p1, "response": r1}, {"prompt": p0, "response": r0}]}).json()
    assert counts() == (3, 2, 2)  # the duplicate and the cached item: one model run for three items
    assert batch["results"][0] == batch["results"][1] and batch["results"][2] == first
    assert metric(httpx.get(server.url + "/metrics").text, "rewardserve_cache_entries") == 2

    off = start_server(cache_size=0)
    for _ in range(2):
        httpx.post(off.url + "/v1/score", json={"prompt": p0, "response": r0})
    text = httpx.get(off.url + "/metrics").text
    assert metric(text, "rewardserve_cache_misses_total") == 2 and metric(text, "rewardserve_batch_size_sum") == 2
    dup = httpx.post(off.url + "/v1/score/batch", json={"items": [{"prompt": p0, "response": r0}] * 2}).json()
    assert dup["results"][0] == dup["results"][1]
    assert metric(httpx.get(off.url + "/metrics").text, "rewardserve_batch_size_sum") == 3  # still scored once
