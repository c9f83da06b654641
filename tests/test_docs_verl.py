"""The verl custom reward function, rewardserve_client.verl (issue 22: it was a snippet in docs/integrations.md),
against real servers; and the docs' reward-function file, run as written, hands verl that function.

The snippet used to send empty completions to the first URL only, so with that replica down they raised
ConnectError although the docs promised failover; and it did not pick replicas by prompt (issue 21: a GRPO
group's samples should meet on one replica, by the client's rule: sha256 of the first 256 characters of the
prompt modulo the number of replicas, then the following replicas in order). The packaged function keeps
both fixes."""

from __future__ import annotations

import importlib.util
import re

import httpx
import pytest

import rewardserve_client.verl
from rewardserve_client.retry import replica_index
from tests.helpers import REPO, free_port, metric

DOC = REPO / "docs" / "integrations.md"


def load_snippet(tmp_path):
    """The documented file verl loads (the python block that starts with `# rewardserve_verl.py`), imported
    the way verl imports custom_reward_function.path: from its file."""
    code = re.search(r"```python\n(# rewardserve_verl\.py.*?)```", DOC.read_text(), re.S).group(1)
    path = tmp_path / "rewardserve_verl.py"
    path.write_text(code)
    spec = importlib.util.spec_from_file_location("rewardserve_verl_doc", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def packaged(monkeypatch, urls: list[str]):
    """rewardserve_client.verl with REWARDSERVE_URL set the way the docs say."""
    monkeypatch.setenv("REWARDSERVE_URL", ",".join(urls))
    return rewardserve_client.verl


def question_with_home(home: int, n: int, tag: str) -> str:
    """A question whose home replica (by the client's rule) is `home` of `n`."""
    for i in range(1000):
        question = f"What is {i} plus {tag}?"
        if replica_index(question, n) == home:
            return question
    raise AssertionError("no such question")


def v1_score(url: str, question: str, answer: str) -> dict:
    messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return httpx.post(url + "/v1/score", json={"messages": messages}, timeout=30).json()


def scored_requests(url: str, route: str) -> float:
    return metric(httpx.get(url + "/metrics", timeout=30).text, "rewardserve_requests_total", route=route,
                  status="200")


def test_the_documented_file_gives_verl_the_packaged_function(tmp_path):
    assert load_snippet(tmp_path).compute_score is rewardserve_client.verl.compute_score


def test_replica_order_is_the_clients_rule(monkeypatch):
    urls = [f"http://rm-{i}:8000" for i in range(3)]
    verl = packaged(monkeypatch, urls)
    for text in ["Human: hi\n\nAssistant:", "x" * 300, "y" * 300 + "different tail", "¿Qué tal? 你好", ""]:
        home = replica_index(text, len(urls))
        assert verl.replicas_for(text) == urls[home:] + urls[:home], text
    # only the first 256 characters count: a group's samples share them
    assert verl.replicas_for("p" * 256 + "a") == verl.replicas_for("p" * 256 + "b")


def test_dead_home_replica_fails_over_for_every_completion(start_server, monkeypatch):
    live = start_server()
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    verl = packaged(monkeypatch, [dead, live.url])
    norm = httpx.get(live.url + "/v1/models", timeout=30).json()["data"][0]["normalization"]
    for home in (0, 1):  # 0: the dead replica is the home one and must be skipped
        question = question_with_home(home, 2, "failover")
        got = verl.compute_score("gsm8k", "It is 4.", "4", extra_info={"question": question})
        expected = v1_score(live.url, question, "It is 4.")
        assert got["score"] == pytest.approx(expected["score"], abs=1e-6) and got["raw"] == pytest.approx(
            expected["raw"], abs=1e-6)
        # an empty completion (the policy emitted EOS at once) too: it goes to /classify
        empty = verl.compute_score("gsm8k", "", "4", extra_info={"question": question})
        classify = httpx.post(live.url + "/classify", timeout=30, json={"use_activation": False, "messages": [
            {"role": "user", "content": question}, {"role": "assistant", "content": ""}]}).json()
        raw = classify["data"][0]["probs"][0]
        assert empty["raw"] == pytest.approx(raw, abs=1e-6)
        assert empty["score"] == pytest.approx((raw - norm["mean"]) / norm["std"], abs=1e-6)


def test_samples_of_one_prompt_go_to_its_home_replica(start_server, monkeypatch):
    servers = [start_server(), start_server()]
    urls = [s.url for s in servers]
    verl = packaged(monkeypatch, urls)
    for home in (0, 1):
        question = question_with_home(home, 2, "affinity")
        before = [scored_requests(u, "/v1/score") for u in urls]
        for sample in ("It is 4.", "Four.", "2 + 2 = 4, so the answer is 4."):  # one GRPO group
            verl.compute_score("gsm8k", sample, "4", extra_info={"question": question})
        after = [scored_requests(u, "/v1/score") for u in urls]
        assert after[home] - before[home] == 3 and after[1 - home] == before[1 - home], (home, before, after)
