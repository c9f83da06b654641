"""The inference engine: the one facade every route calls (cf. text-embeddings-inference's `Infer`).

Request path, one way only: route → `Engine.score` → admission (the batcher's queue state) → tokenize
(thread pool) → score cache → batcher → runtime → normalized results back to the route. Routes never
touch the tokenizer, the cache, the batcher or the runtime; the engine never sees HTTP beyond a `Call`
(the request's deadline, a way to learn that its client left, and the admission pass it got at the door).

Lifecycle: `start` loads and verifies the bundle, builds the runtime, checks a changed precision
against the recorded scores, warms up and turns ready; `begin_drain` (signal-handler safe) closes
admission; `stop` answers what is queued within the drain deadline.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Awaitable, Callable, Sequence

import numpy as np

from service.batcher import CANCEL_DEADLINE, Batcher, DeadlineExceeded, Draining, GatePass
from service.bundle import BundleError, Manifest, open_bundle
from service.cache import ScoreCache, model_key
from service.chat import ChatFormat
from service.encoding import Encoded, TextEncoder, shared_prefix
from service.metrics import Metrics
from service.parity import check_against_recorded, needs_precision_check
from service.prefix_cache import PrefixCache
from service.protocol import PrecisionCheck, ScoreResult
from service.runtime import Runtime, load_runtime
from service.settings import Settings

log = logging.getLogger("rewardserve.engine")

PRECISION_CHECK_PAIRS = 256  # reference pairs scored at startup when the runtime changes precision


class NotReady(Draining):
    """The model is still loading; the client should retry later."""


class ClientGone(Exception):
    """The client hung up before its answer was ready; nothing is sent."""


@dataclass(frozen=True)
class Item:
    """One (prompt, response) to score, with the request fields to blame when it does not fit."""

    prompt: str
    response: str
    truncate: bool = True
    prompt_field: str = "prompt"
    response_field: str = "response"


class TooLong(ValueError):
    """An item that needed truncation while its client asked for none (a 422 naming the field to shorten)."""

    def __init__(self, field: str, max_length: int, part: str):
        self.field, self.part = field, part
        self.reason = (f"input is longer than the model's max_length of {max_length} tokens; shorten the {part} "
                       "or send \"truncate\": true to cut it (the response end is kept)")
        self.message = f"{field}: {self.reason}"
        super().__init__(self.message)


def first_too_long(results: Sequence[ScoreResult | TooLong], bare: bool = False) -> list[ScoreResult]:
    """The results of an all-or-nothing request, or its first TooLong raised (`bare`: the message without
    the field name, as /v1/score has always answered)."""
    for item in results:
        if isinstance(item, TooLong):
            if bare:
                item.message = item.reason
            raise item
    return list(results)


@dataclass
class Call:
    """What the engine needs of one HTTP request: its deadline (event-loop clock), an awaitable that
    completes when its client disconnects, and the admission pass it was let in with (if any)."""

    deadline: float
    disconnected: Callable[[], Awaitable[None]]
    gate_pass: GatePass | None = None
    client: str = "none"  # the drift metrics' client label (service/metrics.py client_label)


class Engine:
    """Built empty by create_app, filled by `start` (the app's lifespan)."""

    def __init__(self, settings: Settings, runtime: Runtime | None = None):
        """`runtime`: an already-built runtime to serve instead of loading the bundle's (a custom backend
        implementing service.runtime.Runtime, or one wrapped to observe it)."""
        s = self.settings = settings
        self.metrics = Metrics()
        self.runtime = runtime
        self.batcher = Batcher(None, None, max_batch_size=s.max_batch_size, max_batch_tokens=s.max_batch_tokens,
                               max_wait_ms=s.max_wait_ms, max_queue=s.max_queue, metrics=self.metrics,
                               efficient_batch_tokens=s.efficient_batch_tokens,
                               min_padding_efficiency=s.min_padding_efficiency, max_queue_tokens=s.max_queue_tokens)
        self.tokenizer_pool = ThreadPoolExecutor(s.tokenizer_threads, thread_name_prefix="tokenize")
        self.manifest: Manifest | None = None
        self.encoder: TextEncoder | None = None
        self.chat: ChatFormat | None = None
        self.cache: ScoreCache | None = None
        self.precision_check: PrecisionCheck | None = None  # a precision change (fp16), see check_precision
        self.ready = False
        self.drain_deadline: float | None = None  # time.monotonic() by which the drain must be over

    # ---- lifecycle

    async def start(self) -> None:
        s = self.settings
        try:
            self.manifest, self.encoder = open_bundle(s.bundle)
        except BundleError as exc:
            log.error("refusing to start: %s", exc)
            raise
        if self.runtime is None:
            self.runtime = load_runtime(s.bundle, self.manifest, provider=s.provider,
                                        intra_op_threads=s.intra_op_threads, spinning=s.ort_spinning,
                                        fp16=s.fp16, io_binding=s.ort_io_binding)
        if needs_precision_check(s.bundle, self.manifest, self.runtime.precision):
            await self.check_precision()
        if s.max_client_batch > s.max_queue:
            log.warning("max_client_batch %d > max_queue %d: the largest requests can never be admitted",
                        s.max_client_batch, s.max_queue)
        if s.max_batch_tokens < self.manifest.text.max_length:
            log.warning("max_batch_tokens %d < model max_length %d: the longest inputs will run alone",
                        s.max_batch_tokens, self.manifest.text.max_length)
        self.chat = ChatFormat.from_bundle(s.bundle, self.manifest.text, self.encoder)
        key = model_key(self.manifest.model_dump_json())  # both caches: no other model's entry is ever served
        self.cache = ScoreCache(s.cache_size, key, self.metrics)
        self._share_prefixes(key)
        self.batcher.start(self.runtime, self.encoder.pad)
        await self.warm_up()
        self.ready = True
        log.info("ready: model %s on %s", self.manifest.name, self.runtime.describe())

    def _share_prefixes(self, key: bytes) -> None:
        """Prefix sharing across requests and the prefix cache (issue 21, docs/decoders.md), on a runtime that
        reuses prefixes (a causal decoder) with prompt_reuse_min_tokens > 0: a new cache per loaded model,
        keyed by its manifest too, so no other model's prefix is ever served; on a GPU its memory comes out of
        the batch token budget (reserve_prefix_cache) before the batcher reads the hint."""
        s = self.settings
        slice_kv = getattr(self.runtime, "slice_kv", None)  # how the cache splits the runtime's keys/values
        if not s.prompt_reuse_min_tokens or not getattr(self.runtime, "reuses_prefix", False) or slice_kv is None:
            return
        reserve = getattr(self.runtime, "reserve_prefix_cache", None)
        if reserve is not None and s.prefix_cache_tokens:
            reserve(s.prefix_cache_tokens)
        cache = PrefixCache(s.prefix_cache_tokens, s.prompt_reuse_min_tokens, key, self.metrics, slice_kv)
        self.batcher.share_prefixes(cache, self.manifest.text.pad_token_id)

    async def check_precision(self) -> None:
        """The runtime computes at another precision than the bundle was exported at or its reference scores
        were computed in (fp16 on a GPU; a bf16 decoder served bf16 against its fp32 reference; service.parity
        needs_precision_check): score the bundle's reference pairs and compare with the scores recorded at
        export. Refuse to start on failure; otherwise report it in /v1/models."""
        loop = asyncio.get_running_loop()
        report = await loop.run_in_executor(None, check_against_recorded, self.settings.bundle, self.encoder,
                                            self.runtime, self.runtime.precision, PRECISION_CHECK_PAIRS)
        self.precision_check = PrecisionCheck(
            precision=self.runtime.precision, reference_pairs=report.reference_pairs,
            pairwise_agreement=report.pairwise_agreement, max_abs_diff=report.max_abs_diff, threshold=report.threshold)
        if not report.passed:
            raise BundleError(f"{self.runtime.precision} disagrees with the bundle's recorded scores: "
                              f"{report.model_dump_json()}")
        log.info("%s checked on %d reference pairs: agreement %.4f, max abs diff %.2e", self.runtime.precision,
                 report.reference_pairs, report.pairwise_agreement, report.max_abs_diff)

    async def warm_up(self) -> None:
        """One real batch (two lengths) before readiness: first-run allocations happen now, not on a client."""
        loop = asyncio.get_running_loop()
        encoded = await loop.run_in_executor(self.tokenizer_pool, self.encoder.encode,
                                             ["warm-up prompt", "a longer warm-up prompt " * 8], ["ok", "fine " * 8])
        raw = await self.batcher.run_direct(encoded)
        if not np.all(np.isfinite(raw)):
            raise RuntimeError(f"warm-up produced non-finite scores {raw.tolist()}")

    @property
    def draining(self) -> bool:
        return self.batcher.closing

    @property
    def queue_depth(self) -> int:
        return self.batcher.depth

    @property
    def fatal(self) -> str | None:
        """Why the model can no longer run (a non-recoverable device error the batcher saw), else None. A
        sticky CUDA error fails every later batch, so /readyz answers 503 (the orchestrator restarts the pod),
        scoring is refused at the door, and /v1/models says why."""
        return self.batcher.fatal

    def _refuse_if_fatal(self) -> None:
        if self.fatal:
            self.metrics.rejected.labels("draining").inc()
            raise NotReady(f"the model can no longer run ({self.fatal}); the server must be restarted")

    def begin_drain(self) -> None:
        """Refuse new work from now on (readyz 503, scoring 503); signal-handler safe: attribute writes only."""
        self.batcher.closing = True
        if self.drain_deadline is None:
            self.drain_deadline = time.monotonic() + self.settings.drain_timeout_s

    async def abandon_queue(self) -> None:
        """At the drain deadline: answer every queued item 503 draining now, instead of cutting it at exit."""
        await self.batcher.drain(0)

    async def stop(self) -> None:
        self.ready = False
        self.begin_drain()
        await self.batcher.drain(max(0.0, self.drain_deadline - time.monotonic()))
        self.tokenizer_pool.shutdown(wait=False)
        log.info("stopped")

    # ---- admission at the door

    def gate(self) -> GatePass:
        """Before a scoring request's body is read: refuse at once when not ready, draining or full."""
        self._refuse_if_fatal()
        if not self.ready and not self.draining:
            self.metrics.rejected.labels("draining").inc()
            raise NotReady("server is not ready")
        return self.batcher.gate(self.settings.request_timeout_s)

    # ---- the scoring path

    async def score(self, call: Call, items: Sequence[Item], shared_prompt: bool = False,
                    whole: bool = False) -> list[ScoreResult | TooLong]:
        """Admit, tokenize, batch, normalize; under the request deadline and the client's presence. An item
        that would need truncation while its client asked for none comes back as a TooLong in its slot.

        All items are one unit of admission: admitted (by count) at once, tokenized in concurrent chunks,
        checked (by tokens and deadline) and queued at once, so a refusal comes before any compute and never
        throws away finished work. `whole` (a rollout batch on the compatibility routes, all or nothing):
        the first TooLong is raised before anything is queued instead of being returned in its slot."""
        self._refuse_if_fatal()
        if not self.ready and not self.draining:
            raise NotReady("server is not ready")

        async def pipeline() -> list[ScoreResult | TooLong]:
            # Admission first: an overloaded server refuses before spending CPU on tokenization.
            with self.batcher.admit(len(items), call.gate_pass) as ticket:
                encoded = await self._tokenize_chunks(items, shared_prompt)
                if whole:
                    first_too_long(encoded)
                ok = [e for e in encoded if isinstance(e, Encoded)]
                raw = iter(await self.cache.score(ok, lambda todo: self.batcher.score(
                    ticket, todo, call.deadline, self._prompt_group(todo) if shared_prompt else None)))
            return [e if isinstance(e, TooLong) else self._result(next(raw), e, call.client) for e in encoded]

        return await _guarded(pipeline(), call)

    def _prompt_group(self, encoded: Sequence[Encoded]):
        """Best-of-N on a runtime that can compute a shared prompt once (a causal decoder: run_shared): the
        items as one SharedPrefix unit when they share at least prompt_reuse_min_tokens leading tokens."""
        minimum = self.settings.prompt_reuse_min_tokens
        if not minimum or not getattr(self.runtime, "reuses_prefix", False):
            return None
        return shared_prefix(encoded, minimum, self.manifest.text.pad_token_id)

    async def _tokenize_chunks(self, items: Sequence[Item], shared_prompt: bool) -> list[Encoded | TooLong]:
        """The items tokenized in chunks of max_client_batch, all chunks at once in the tokenizer pool: a
        rollout batch of thousands keeps every tokenizer thread busy instead of one."""
        loop = asyncio.get_running_loop()
        step = self.settings.max_client_batch
        if shared_prompt or len(items) <= step:  # best-of-N tokenizes its one prompt once
            return await loop.run_in_executor(self.tokenizer_pool, self._tokenize, items, shared_prompt)
        parts = await asyncio.gather(*(loop.run_in_executor(self.tokenizer_pool, self._tokenize,
                                                            items[i:i + step], False)
                                       for i in range(0, len(items), step)))
        return [e for part in parts for e in part]

    def _tokenize(self, items: Sequence[Item], shared_prompt: bool) -> list[Encoded | TooLong]:
        """Runs in the tokenizer pool."""
        enc = self.encoder
        responses = [it.response for it in items]
        encoded = (enc.encode_shared_prompt(items[0].prompt, responses) if shared_prompt
                   else enc.encode([it.prompt for it in items], responses))
        out: list[Encoded | TooLong] = []
        for e, item in zip(encoded, items):
            if e.truncated and not item.truncate:
                self.metrics.rejected.labels("too_long").inc()
                part = "response" if e.response_tokens > enc.budget else "prompt"
                field = item.response_field if part == "response" else item.prompt_field
                out.append(TooLong(field, enc.fmt.max_length, part))
            else:
                out.append(self.chat.annotate(e, item.response))
        return out

    def _result(self, raw: np.float32, encoded: Encoded, client: str = "none") -> ScoreResult:
        """The normalized result; also the drift metrics (score in z, by response length, beyond the
        calibration range) and its out-of-range flags."""
        norm = self.manifest.normalization
        raw = float(raw)
        z = float(norm.z_score(raw))
        p = norm.percentiles  # 0..100 (a bundle with fewer percentiles gets no flags)
        above, below = len(p) == 101 and raw > p[99], len(p) == 101 and raw < p[1]
        self.metrics.observe_served(z, encoded.response_tokens, above, below, client)
        flags = ["above_calibration_p99"] if above else ["below_calibration_p1"] if below else None
        return ScoreResult(score=z, raw=raw, percentile=float(norm.percentile(raw)),
                           n_tokens=encoded.n_tokens, truncated=encoded.truncated, model=self.manifest.name,
                           warnings=list(encoded.warnings) or None, flags=flags)


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
