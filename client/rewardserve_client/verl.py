"""verl custom reward function backed by rewardserve.

verl loads a custom reward function from a file (`custom_reward_function.path=...`,
`custom_reward_function.name=compute_score`), so the file can be one line:

    # rewardserve_verl.py
    from rewardserve_client.verl import compute_score  # noqa: F401

Replicas: REWARDSERVE_URL, comma-separated (every reward worker must list them in the same order), read at
each call. Each call goes to its prompt's home replica, `replica_index(prompt)` (sha256 of the prompt's first
256 characters modulo the number of replicas: RewardServeClient's rule), so the samples of one GRPO group
meet on the replica that can reuse their computed prompt; when it is down or overloaded, the following
replicas in list order take the call (RewardServeClient's failover and Retry-After handling), empty
completions included: they cannot go to /v1/score (which refuses an empty response), so they are scored on
/classify and normalised with the bundle's mean and std from /v1/models, as the compatibility routes do.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

from rewardserve_client.client import RewardServeClient
from rewardserve_client.retry import replica_index

DEFAULT_URL = "http://127.0.0.1:8000"


class VerlReward:
    """`compute_score` for a fixed list of replicas. One pooled client per process: verl runs reward
    functions in worker processes, and a client (open connections) is not carried across a fork."""

    def __init__(self, urls: Sequence[str], **client_kwargs):
        self.urls = [u.rstrip("/") for u in urls]
        self.client_kwargs = client_kwargs
        self._client: RewardServeClient | None = None
        self._pid: int | None = None
        self._normalization: dict | None = None

    def replicas_for(self, prompt: str) -> list[str]:
        """The prompt's home replica first, then the following ones in list order (the failover order)."""
        home = replica_index(prompt, len(self.urls))
        return self.urls[home:] + self.urls[:home]

    def request(self, prompt: str, method: str, path: str, body: Any = None) -> Any:
        """One call, to the prompt's replicas in turn, with the client's retries (RewardServeError when none
        answered, or at once for a 4xx: the request itself is wrong)."""
        if self._client is None or self._pid != os.getpid():
            self._client = RewardServeClient(self.urls, **self.client_kwargs)
            self._pid = os.getpid()
        home = replica_index(prompt, len(self.urls)) if len(self.urls) > 1 else None
        return self._client.request(method, path, body, home)

    def __call__(self, data_source, solution_str, ground_truth, extra_info=None, **kwargs) -> dict:
        """verl's signature; the prompt comes from extra_info["question"] (put it there in data preprocessing).
        Returns verl's dict: `score` is the reward (the z-score, as on /get_reward), the rest is logged."""
        question = extra_info["question"]
        messages = [{"role": "user", "content": question}, {"role": "assistant", "content": solution_str}]
        if not solution_str.strip():  # /v1 refuses an empty response; score it as the compat routes do
            if self._normalization is None:
                self._normalization = self.request(question, "GET", "/v1/models")["data"][0]["normalization"]
            out = self.request(question, "POST", "/classify", {"messages": messages, "use_activation": False})
            raw = out["data"][0]["probs"][0]
            norm = self._normalization
            return {"score": (raw - norm["mean"]) / norm["std"], "raw": raw, "truncated": 0.0}
        result = self.request(question, "POST", "/v1/score", {"messages": messages})
        return {"score": result["score"], "raw": result["raw"], "truncated": float(result["truncated"])}


_rewards: dict[tuple[str, ...], VerlReward] = {}


def _for_env() -> VerlReward:
    """The VerlReward of the replicas REWARDSERVE_URL names now (one per distinct list, kept for its pool)."""
    urls = tuple(u.strip() for u in os.environ.get("REWARDSERVE_URL", DEFAULT_URL).split(",") if u.strip())
    if urls not in _rewards:
        _rewards[urls] = VerlReward(urls)
    return _rewards[urls]


def replicas_for(prompt: str) -> list[str]:
    """The replicas of REWARDSERVE_URL in the order a call for `prompt` tries them."""
    return _for_env().replicas_for(prompt)


def compute_score(data_source, solution_str, ground_truth, extra_info=None, **kwargs) -> dict:
    """verl custom reward function: `custom_reward_function.name=compute_score`."""
    return _for_env()(data_source, solution_str, ground_truth, extra_info, **kwargs)
