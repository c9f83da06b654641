"""TRL reward functions backed by rewardserve.

`RewardServeReward(url)` is a GRPOTrainer reward function (`reward_funcs=[RewardServeReward(url)]`);
`AsyncRewardServeReward(url)` is the same as an async reward function. Neither imports trl: TRL calls
them as plain callables, so the client needs no trainer installed to build them.
"""

from __future__ import annotations

from typing import Any, Sequence

from rewardserve_client.client import AsyncRewardServeClient, RewardServeClient


def _trl_items(prompts: Sequence[Any], completions: Sequence[Any]) -> list[dict | None]:
    """TRL's (prompt, completion) → /v1/score/batch items; None for an empty completion."""
    items: list[dict | None] = []
    for prompt, completion in zip(prompts, completions, strict=True):
        if isinstance(completion, list):  # conversational: prompt is a message list, completion [assistant msg]
            messages = [{"role": m["role"], "content": m["content"]} for m in list(prompt) + list(completion)]
            text = messages[-1]["content"] if messages else ""
            items.append({"messages": messages} if text.strip() else None)
        else:
            items.append({"prompt": prompt, "response": completion} if completion.strip() else None)
    return items


class _RewardBase:
    def __init__(self, url: str | Sequence[str], *, field: str = "score", empty_reward: float | None = None,
                 name: str = "rewardserve", **client_kwargs):
        if field not in ("score", "raw", "percentile"):
            raise ValueError("field is one of score (z-score, default), raw, percentile")
        self.url = url
        self.field = field
        self.empty_reward = empty_reward
        self.__name__ = name  # TRL names the reward in its logs after __name__
        self.client_kwargs = client_kwargs
        self._client = None

    def __getstate__(self):  # picklable (TRL/accelerate may ship reward functions to other processes)
        state = dict(self.__dict__)
        state["_client"] = None
        return state

    def _rewards(self, items: list[dict | None], results: list[dict], kwargs: dict) -> list[float | None]:
        it = iter(results)
        out: list[float | None] = []
        warned = 0
        for item in items:
            if item is None:
                out.append(self.empty_reward)
                continue
            result = next(it)
            if "error" in result:
                out.append(None)  # TRL turns None into NaN and says so
                continue
            warned += bool(result.get("warnings"))
            out.append(float(result[self.field]))
        log_metric = kwargs.get("log_metric")
        if callable(log_metric) and items:
            log_metric(f"{self.__name__}/warned_fraction", warned / len(items))
        return out


class RewardServeReward(_RewardBase):
    """TRL GRPOTrainer reward function: `reward_funcs=[RewardServeReward("http://rm:8000")]`.

    Called as TRL calls reward functions, `(prompts=..., completions=..., **kwargs) -> list[float]`,
    one reward per completion, for plain-text and conversational datasets alike (conversations go as
    `messages`, rendered by the server with the bundle's chat template). `field`: "score" (z-score
    against the bundle's reference set; default, keeps the reward scale fixed across models), "raw"
    or "percentile". An empty completion gets `empty_reward` (None: TRL records NaN). Several URLs:
    requests spread over the replicas. Extra keyword arguments go to RewardServeClient."""

    def __call__(self, prompts, completions, **kwargs) -> list[float | None]:
        if self._client is None:
            self._client = RewardServeClient(self.url, **self.client_kwargs)
        items = _trl_items(prompts, completions)
        results = self._client.score_batch([i for i in items if i is not None])
        return self._rewards(items, results, kwargs)


class AsyncRewardServeReward(_RewardBase):
    """The same as RewardServeReward with an async __call__: TRL runs async reward functions
    concurrently with the other reward functions, on its own event loop."""

    async def __call__(self, prompts, completions, **kwargs) -> list[float | None]:
        if self._client is None:
            self._client = AsyncRewardServeClient(self.url, **self.client_kwargs)
        items = _trl_items(prompts, completions)
        results = await self._client.score_batch([i for i in items if i is not None])
        return self._rewards(items, results, kwargs)
