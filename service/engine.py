"""The inference engine: the one facade every route calls (cf. text-embeddings-inference's `Infer`).

Request path, one way only: route → `Engine.score(call, items, model)` → the registry picks the scorer
for `model` (a served version, or an ensemble; canary and shadow are the registry's) → that model's
pipeline (service/served_model.py: admission on its batcher → tokenize → score cache → batcher → runtime)
→ normalized results naming model and version, back to the route. Routes never touch a tokenizer, chat
format, cache, batcher or runtime: they call the engine's methods (score, compare, texts, describe).

The door (`gate`, before a body is read) is the engine's, process-wide; each model's batcher then admits
the request's real items against its own queue (see `gate` for why).

Lifecycle: `start` loads every model (the registry); `begin_drain` (signal-handler safe) closes
admission; `stop` answers what is queued within the drain deadline.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Awaitable, Sequence

from service.admission import GatePass
from service.batcher import CANCEL_DEADLINE, DeadlineExceeded, Draining, Overloaded
from service.metrics import Metrics
from service.protocol import CompareResponse, ModelList, ScoreResult
from service.runtime import Runtime
from service.model_texts import ModelTexts
from service.served_model import Call, ClientGone, Item, NotReady, ServedModel, TooLong, first_too_long
from service.registry import Registry, UnknownModel
from service.settings import Settings

log = logging.getLogger("rewardserve.engine")

__all__ = ["Call", "ClientGone", "Engine", "Item", "NotReady", "TooLong", "UnknownModel", "first_too_long"]


class _Door:
    """The process-wide count of requests let in at the door whose bodies are not parsed yet (GatePass
    holders); a GatePass returns its slot here when its request's items are admitted by a model."""

    def __init__(self) -> None:
        self._passes = 0


class Engine:
    """Built empty by create_app, filled by `start` (the app's lifespan)."""

    def __init__(self, settings: Settings, runtime: Runtime | None = None):
        """`runtime`: an already-built runtime to serve instead of loading the bundle's (a custom backend
        implementing service.runtime.Runtime); only with --bundle (one model)."""
        self.settings = settings
        self.metrics = Metrics(per_model=settings.repository is not None)  # a `model` label (docs/monitoring.md)
        self.registry = Registry(settings, self.metrics, runtime)
        self.started = False
        self.closing = False  # admission closed (draining); a plain attribute so a signal handler may set it
        self.drain_deadline: float | None = None  # time.monotonic() by which the drain must be over
        self._door = _Door()

    # ---- lifecycle

    async def start(self) -> None:
        s = self.settings
        if s.max_client_batch > s.max_queue:
            log.warning("max_client_batch %d > max_queue %d: the largest requests can never be admitted",
                        s.max_client_batch, s.max_queue)
        await self.registry.start()
        self.started = True

    @property
    def ready(self) -> bool:
        return self.started and self.registry.ready

    @property
    def draining(self) -> bool:
        return self.closing

    @property
    def queue_depth(self) -> int:
        """Items admitted and not yet computed, over every loaded model."""
        return self.registry.queue_depth

    @property
    def fatal(self) -> str | None:
        """Why a model can no longer run (a non-recoverable device error its batcher saw), else None. A
        sticky CUDA error fails every later batch of the process, so /readyz answers 503 (the orchestrator
        restarts the pod), scoring is refused at the door, and /v1/models says why."""
        return self.registry.fatal

    def _refuse_if_fatal(self) -> None:
        if self.fatal:
            self.metrics.rejected.labels("draining").inc()
            raise NotReady(f"the model can no longer run ({self.fatal}); the server must be restarted")

    def begin_drain(self) -> None:
        """Refuse new work from now on (readyz 503, scoring 503); signal-handler safe: attribute writes only."""
        self.closing = True
        self.registry.begin_drain()
        if self.drain_deadline is None:
            self.drain_deadline = time.monotonic() + self.settings.drain_timeout_s

    async def abandon_queue(self) -> None:
        """At the drain deadline: answer every queued item 503 draining now, instead of cutting it at exit."""
        await self.registry.abandon_queue()

    async def stop(self) -> None:
        self.started = False
        self.begin_drain()
        await self.registry.stop(max(0.0, self.drain_deadline - time.monotonic()))

    # ---- admission at the door

    def gate(self) -> GatePass:
        """Before a scoring request's body is read: refuse at once when not ready, draining or full.

        The door cannot know which model a request names (that is in the body it has not read), so it
        judges the process: it refuses when the items queued for every model together, plus the requests
        already let in and not yet parsed, reach max_queue; and (by deadline) only when the queue of every
        model would outlast the longest deadline. So in a burst only as many bodies are parsed as the
        process can queue, the answer is still the fast 503/429 + Retry-After, and the door never refuses
        a request that some model could admit by time. Each model's batcher then admits the request's real
        items against its own queue (max_queue, max_queue_tokens, its deadline estimate): a request for a
        full model is refused there, after its body is parsed but before any compute. With one model this
        is exactly the one batcher's gate."""
        self._refuse_if_fatal()
        if self.closing:
            self.metrics.rejected.labels("draining").inc()
            raise Draining("server is shutting down")
        if not self.ready:
            self.metrics.rejected.labels("draining").inc()
            raise NotReady("server is not ready")
        max_queue = self.settings.max_queue
        waiting = self.registry.queue_depth + self._door._passes
        if waiting >= max_queue:
            self.metrics.rejected.labels("queue_full").inc()
            raise Overloaded(f"queue full ({waiting} of {max_queue} items waiting)")
        waits = [m.batcher.estimated_wait() for m in self.registry.served_models()]
        wait = None if None in waits or not waits else min(waits)
        longest = self.settings.request_timeout_s
        if wait is not None and wait >= longest:
            self.metrics.rejected.labels("would_miss_deadline").inc()
            raise Overloaded(f"the queued work takes about {wait:.0f} s, longer than any request may wait "
                             f"({longest:g} s)", retry_after=wait - longest)
        return GatePass(self._door)

    # ---- the scoring path

    async def score(self, call: Call, items: Sequence[Item], model: str | None = None, shared_prompt: bool = False,
                    whole: bool = False) -> list[ScoreResult | TooLong]:
        """Score on `model` (None: the default) under the request deadline and the client's presence. An
        unknown model raises UnknownModel (404) before anything is admitted. See ServedModel.score for
        admission, TooLong slots and `whole`."""
        self._refuse_if_fatal()
        if not self.ready and not self.draining:
            raise NotReady("server is not ready")
        call.model = self.registry.resolve(model)
        return await _guarded(self.registry.score(model, call, items, shared_prompt, whole), call)

    async def compare(self, call: Call, model: str | None, prompt: str, a: str, b: str,
                      truncate: bool = True) -> CompareResponse:
        """Both responses scored (one prompt), and P(a preferred) from the model that scored them: its
        `probability` (σ of the raw margin over its fitted temperature; an ensemble's own rule)."""
        items = [Item(prompt, a, truncate, "prompt", "a"), Item(prompt, b, truncate, "prompt", "b")]
        ra, rb = first_too_long(await self.score(call, items, model, shared_prompt=True))
        return CompareResponse(probability=self._scorer_of(model, ra).probability(ra, rb), a=ra, b=rb)

    def _scorer_of(self, model: str | None, result: ScoreResult):
        """The version that computed `result` (a canary split may have routed to any of a model's versions,
        each with its own temperature); an ensemble: what `model` is served by."""
        for served in self.registry.served_models():
            if (served.name, served.version) == (result.model, result.version):
                return served
        return self.registry.scorer(model)

    def model_name(self, model: str | None) -> str:
        """The canonical name a request for `model` is served under (UnknownModel when none)."""
        return self.registry.resolve(model)

    def compat_model(self, model: str | None) -> str | None:
        """The model a compatibility route's own `model` field selects: a served name, or a path whose last
        part is one ("/models/rm-a" → "rm-a"); anything else is the default model, as before the repository:
        RLHF stacks send their own config's model path (verl: "/home/.../Skywork-Reward-V2"), not ours."""
        for candidate in (model, (model or "").rstrip("/").rsplit("/", 1)[-1]):
            if candidate:
                try:
                    return self.registry.resolve(candidate)
                except UnknownModel:
                    pass
        return None

    def vocab_size(self) -> int | None:
        """The token-id bound the OpenAPI schema states: the vocabulary of the one model served (None while
        loading, or when several are served: their vocabularies differ; each route checks its model's)."""
        if not self.ready or len(self.registry.describe()) != 1:
            return None
        return self.texts(None).vocab_size

    def texts(self, model: str | None) -> ModelTexts:
        """The text handling of `model` for the compatibility routes (templated text → pairs, token ids →
        text). An ensemble's members each tokenize the pair themselves; its pair is found with its first
        member's chat format (members of one ensemble share a chat format in practice; say so in the docs)."""
        scorer = self.registry.scorer(model)
        while not isinstance(scorer, ServedModel):  # an ensemble: its first member
            members = scorer.members
            scorer = next(iter(members.values() if isinstance(members, dict) else members))
        return scorer.texts()

    def describe(self) -> ModelList:
        return ModelList(data=self.registry.describe())

    async def reload(self) -> dict:
        """POST /admin/reload: rescan the repository and swap in what changed (Registry.reload). A custom
        runtime (create_app(runtime=...)) was built by the caller, not from the repository: nothing to reload."""
        if self.registry.runtime is not None:
            raise ReloadUnavailable("reload is not available with a custom runtime (create_app(runtime=...))")
        return await self.registry.reload()


class ReloadUnavailable(RuntimeError):
    """This server cannot reload its models (a 409: retrying will not help)."""


async def _guarded(work: Awaitable, call: Call):
    """Await `work` until the deadline; cancel it (and so its queued items) on timeout or disconnect."""
    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(call.disconnected())
    try:
        done, _ = await asyncio.wait({task, watcher}, timeout=max(0.0, call.deadline - loop.time()),
                                     return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # the handler itself was cancelled (e.g. the server's shutdown timeout)
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task in done:
        if task.cancelled():  # its queued items were cancelled under it: the drain deadline passed
            raise Draining("server shut down before this request ran")
        return task.result()
    if watcher in done:
        task.cancel()
        raise ClientGone()
    task.cancel(CANCEL_DEADLINE)  # the batcher counts its dropped items as deadline, not disconnect
    raise DeadlineExceeded("request deadline passed")
