"""The sync and async clients of rewardserve: pooled, chunking, retrying, replica-aware.

    from rewardserve_client import RewardServeClient
    with RewardServeClient("http://127.0.0.1:8000") as rs:
        rs.score("Human: 2+2?\\n\\nAssistant:", "4")["score"]
        rs.score_batch([("Human: 2+2?\\n\\nAssistant:", "4"), ...])   # any length: chunked

    RewardServeClient(["http://rm-0:8000", "http://rm-1:8000"])      # several replicas: group affinity

    async with AsyncRewardServeClient("http://127.0.0.1:8000") as rs:  # the same methods, as coroutines
        await rs.compare("Human: 2+2?\\n\\nAssistant:", "4", "5")          # {"probability", "a", "b"}

Methods (both clients): score, score_batch, rewards, rank, compare, get_reward, models, max_batch. Each is written
once (`_Api`: the requests it makes and how it reads the answers, no I/O); RewardServeClient runs it
with httpx.Client (and threads for concurrent chunks), AsyncRewardServeClient with httpx.AsyncClient.
Install: `pip install ./client` from a checkout (the distribution `rewardserve-client`; httpx is its only
dependency, docs/dependencies.md).

Behaviour:
  * connection pooling: one httpx client (keep-alive) per RewardServeClient, shared by every replica;
  * group affinity (several replicas): a call goes to replica_index(leading text) (sha256 of its first 256
    characters mod the replica count; the text: the prompt, a chat's messages before the last, a whole
    /get_reward query), so a GRPO group's samples meet where their prompt is computed; batch calls are split
    by replica, answers put back in order; on failure the next replicas in list order (`affinity=False`:
    round-robin);
  * chunking: score_batch splits into /v1/score/batch calls of at most the server's max_client_batch
    (read once from /v1/models; `batch_size=` overrides), sent `concurrency` at a time;
  * retries (at most `max_retries` per call): 503/429 overloaded → another replica at once if one has
    not been tried this round, else sleep for the Retry-After header (seconds or HTTP date), capped at
    `max_backoff_s`; connection errors, timeouts and other 5xx → the replica is skipped for
    `replica_cooldown_s` and the call goes to the next one (exponential backoff with jitter when no
    other is left); other 4xx are not retried (RewardServeError names the field);
  * timeouts: `timeout` per HTTP attempt, also sent as X-Request-Timeout so the server drops the work
    once this client has given up on it.

TRL reward functions: rewardserve_client.trl; the verl custom reward function: rewardserve_client.verl.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Concatenate, Generator, Iterable, ParamSpec, Sequence, TypeVar

import httpx

from rewardserve_client.retry import DEFAULT_BATCH, RewardServeError, _Base, affinity_text, in_order, reassemble


def _as_item(item: Any, truncate: bool) -> dict:
    if isinstance(item, dict):
        return {"truncate": truncate, **item}
    prompt, response = item
    return {"prompt": prompt, "response": response, "truncate": truncate}


# ---- the API, written once, without I/O

@dataclass(frozen=True)
class _Request:
    """One API call as data: the client that runs it sends it with retries and gives back its JSON answer."""

    method: str
    path: str
    body: Any = None
    home: int | None = None  # the replica tried first (group affinity); None: round-robin


T = TypeVar("T")
P = ParamSpec("P")
# An operation is a generator: it yields a _Request and is sent its JSON answer, or yields a list of
# _Requests (sent concurrently, `concurrency` at a time) and is sent their answers in order; a refusal is
# raised at the yield. Its return value is the method's result.
_Operation = Generator[_Request | list[_Request], Any, T]


class _Api:
    """The methods of both clients as operations: the requests they make and how they read the answers.
    RewardServeClient runs each one blocking, AsyncRewardServeClient as a coroutine. `self` is the client."""

    def models(self) -> _Operation[dict]:
        return (yield _Request("GET", "/v1/models"))

    def max_batch(self) -> _Operation[int]:
        if self.batch_size is None:
            try:
                models = yield _Request("GET", "/v1/models")
                self.batch_size = int(models["data"][0].get("max_client_batch") or DEFAULT_BATCH)
            except (RewardServeError, KeyError, IndexError, TypeError, ValueError):
                self.batch_size = DEFAULT_BATCH
        return self.batch_size

    def score(self, prompt: str | None = None, response: str | None = None, *,
              messages: list[dict] | None = None, truncate: bool = True) -> _Operation[dict]:
        body = {"messages": messages} if messages is not None else {"prompt": prompt, "response": response}
        return (yield _Request("POST", "/v1/score", {**body, "truncate": truncate}, self._home(affinity_text(body))))

    def score_batch(self, items: Iterable[dict | tuple[str, str]], *,
                    truncate: bool = True) -> _Operation[list[dict]]:
        """Score any number of items ({prompt, response} / {messages} dicts or (prompt, response) tuples).
        Results are in input order; an item the server refused is its error object ({"error": {...}})."""
        bodies = [_as_item(item, truncate) for item in items]
        if not bodies:
            return []
        size = yield from _Api.max_batch(self)
        requests, slots = [], []
        for home, indices in self._by_replica([affinity_text(b) for b in bodies]):
            for chunk in self._chunks(indices, size):
                requests.append(_Request("POST", "/v1/score/batch", {"items": [bodies[i] for i in chunk]}, home))
                slots.append(chunk)
        answers = yield requests
        return in_order(len(bodies), slots, [answer["results"] for answer in answers])

    def rewards(self, prompts: Sequence[str], responses: Sequence[str], *, field: str = "score",
                truncate: bool = True) -> _Operation[list[float]]:
        """One number per (prompt, response); raises on the first item the server refused."""
        results = yield from _Api.score_batch(self, list(zip(prompts, responses)), truncate=truncate)
        return [_field(r, field, i) for i, r in enumerate(results)]

    def rank(self, prompt: str, responses: Sequence[str], *, top_k: int | None = None,
             truncate: bool = True) -> _Operation[dict]:
        body = {"prompt": prompt, "responses": list(responses), "truncate": truncate}
        if top_k is not None:
            body["top_k"] = top_k
        return (yield _Request("POST", "/v1/rank", body, self._home(prompt)))

    def compare(self, prompt: str, a: str, b: str, *, truncate: bool = True) -> _Operation[dict]:
        """{"probability": P(a preferred over b), "a": score object, "b": score object}."""
        return (yield _Request("POST", "/v1/compare", {"prompt": prompt, "a": a, "b": b, "truncate": truncate},
                               self._home(prompt)))

    def get_reward(self, queries: Sequence[str], *, prompts: Sequence[str] | None = None,
                   normalize: bool = True) -> _Operation[dict]:
        """OpenRLHF's `POST /get_reward` ({"query": [whole texts]}), answered as one server answers, in query
        order; each query goes to the replica of its leading characters (a group's shared prompt)."""
        queries = list(queries)
        if prompts is not None and len(prompts) != len(queries):
            raise ValueError(f"{len(prompts)} prompts for {len(queries)} queries; give one per query (or none)")
        path = "/get_reward" if normalize else "/get_reward?normalize=false"
        groups = self._by_replica(queries) if queries else [(None, [])]
        requests = [_Request("POST", path, {"query": [queries[i] for i in indices],
                                            **({"prompts": [prompts[i] for i in indices]} if prompts else {})},
                             home) for home, indices in groups]
        answers = yield requests
        return reassemble(len(queries), [indices for _, indices in groups], answers)


def _as_method(method: Callable, op: Callable) -> Callable:
    """`method` (a client's runner of `op`) named, documented and signed like `op`, returning what `op` returns."""
    functools.update_wrapper(method, op)
    returns = op.__annotations__.get("return", "")
    if isinstance(returns, str) and returns.startswith("_Operation[") and returns.endswith("]"):
        returns = returns[len("_Operation["):-1]
    method.__annotations__ = {**op.__annotations__, "return": returns}
    method.__signature__ = inspect.signature(op).replace(return_annotation=returns)
    return method


def _blocking(op: Callable[Concatenate[Any, P], _Operation[T]]) -> Callable[Concatenate[Any, P], T]:
    """An operation as a RewardServeClient method: returns its result."""

    def method(self, *args: P.args, **kwargs: P.kwargs) -> T:
        return self._run(op(self, *args, **kwargs))

    return _as_method(method, op)


def _awaitable(op: Callable[Concatenate[Any, P], _Operation[T]]) -> Callable[Concatenate[Any, P], Awaitable[T]]:
    """An operation as an AsyncRewardServeClient method: a coroutine function."""

    async def method(self, *args: P.args, **kwargs: P.kwargs) -> T:
        return await self._run(op(self, *args, **kwargs))

    return _as_method(method, op)


# ---- the two clients: how they send

class RewardServeClient(_Base):
    """Synchronous client; thread-safe (chunks of one score_batch go out on `concurrency` threads)."""

    def __init__(self, base_url: str | Sequence[str], **kwargs):
        super().__init__(base_url, **kwargs)
        self._http = httpx.Client(timeout=self._http_timeout, limits=self.limits, headers=self.headers)
        self._pool: ThreadPoolExecutor | None = None

    def close(self) -> None:
        self._http.close()
        if self._pool is not None:
            self._pool.shutdown(wait=False)

    def __enter__(self) -> "RewardServeClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def request(self, method: str, path: str, body: Any = None, home: int | None = None) -> Any:
        state = {"tried": set(), "attempts": 0, "failures": 0, "home": home}
        while True:
            url, started = self._next_attempt(state)
            response, error = None, None
            try:
                response = self._http.request(method, url + path, json=body)
            except httpx.TransportError as exc:  # connect refused/reset, timeouts, protocol errors
                error = exc
            outcome, value = self._plan(state, url, path, started, response, error)
            if outcome == "done":
                return value
            if value:
                time.sleep(value)

    def _send(self, step: _Request | list[_Request]) -> Any:
        if isinstance(step, _Request):
            return self.request(step.method, step.path, step.body, step.home)
        if len(step) == 1 or self.concurrency == 1:
            return [self._send(request) for request in step]
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="rewardserve")
        return list(self._pool.map(self._send, step))

    def _run(self, op: _Operation[T]) -> T:
        answer, failure = None, None
        while True:
            try:
                step = op.send(answer) if failure is None else op.throw(failure)
            except StopIteration as done:
                return done.value
            try:
                answer, failure = self._send(step), None
            except BaseException as exc:  # raised inside the operation, where it made the request
                answer, failure = None, exc

    models = _blocking(_Api.models)
    max_batch = _blocking(_Api.max_batch)
    score = _blocking(_Api.score)
    score_batch = _blocking(_Api.score_batch)
    rewards = _blocking(_Api.rewards)
    rank = _blocking(_Api.rank)
    compare = _blocking(_Api.compare)
    get_reward = _blocking(_Api.get_reward)


class AsyncRewardServeClient(_Base):
    """asyncio client; chunks of one score_batch run concurrently (`concurrency` at a time)."""

    def __init__(self, base_url: str | Sequence[str], **kwargs):
        super().__init__(base_url, **kwargs)
        self._http = httpx.AsyncClient(timeout=self._http_timeout, limits=self.limits, headers=self.headers)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> "AsyncRewardServeClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    async def request(self, method: str, path: str, body: Any = None, home: int | None = None) -> Any:
        state = {"tried": set(), "attempts": 0, "failures": 0, "home": home}
        while True:
            url, started = self._next_attempt(state)
            response, error = None, None
            try:
                response = await self._http.request(method, url + path, json=body)
            except httpx.TransportError as exc:
                error = exc
            outcome, value = self._plan(state, url, path, started, response, error)
            if outcome == "done":
                return value
            if value:
                await asyncio.sleep(value)

    async def _send(self, step: _Request | list[_Request]) -> Any:
        if isinstance(step, _Request):
            return await self.request(step.method, step.path, step.body, step.home)
        gate = asyncio.Semaphore(self.concurrency)

        async def gated(request: _Request) -> Any:
            async with gate:
                return await self.request(request.method, request.path, request.body, request.home)

        return list(await asyncio.gather(*(gated(request) for request in step)))

    async def _run(self, op: _Operation[T]) -> T:
        answer, failure = None, None
        while True:
            try:
                step = op.send(answer) if failure is None else op.throw(failure)
            except StopIteration as done:
                return done.value
            try:
                answer, failure = await self._send(step), None
            except BaseException as exc:  # raised inside the operation, where it made the request
                answer, failure = None, exc

    models = _awaitable(_Api.models)
    max_batch = _awaitable(_Api.max_batch)
    score = _awaitable(_Api.score)
    score_batch = _awaitable(_Api.score_batch)
    rewards = _awaitable(_Api.rewards)
    rank = _awaitable(_Api.rank)
    compare = _awaitable(_Api.compare)
    get_reward = _awaitable(_Api.get_reward)


def _field(result: dict, field: str, index: int) -> float:
    if "error" in result:
        e = result["error"]
        raise RewardServeError(422, e.get("type", "validation_error"), e.get("message", ""), e.get("field"))
    return float(result[field])
