"""One served model version: one bundle loaded, verified and scoring behind its own batcher (issue 26).

A `ServedModel` is what the engine was for its one bundle before the model repository: the bundle opened
and verified (checksums, parity: service/bundle.open_bundle), its runtime, the startup precision check,
its chat format, its score cache and prefix cache (both keyed by its manifest, so no other model's or
version's entry is ever served), its batcher queue, warm-up, and the scoring pipeline (admit → tokenize in
the tokenizer pool → cache → batcher → normalized results). The registry (service/registry.py) holds one
per served version; the engine (service/engine.py) is the facade the routes see. Every result names the
model and the version that computed it.

Also here: the small vocabulary of a scoring call (`Call`, `Item`, `TooLong`, ...), which the engine
re-exports. `texts()` gives the compatibility routes this model's text handling (service/model_texts.py).
"""

from __future__ import annotations

import asyncio
import logging
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Awaitable, Callable, Sequence

import numpy as np

from service.batcher import Batcher, Draining, GatePass
from service.bundle import BundleError, Manifest, open_bundle
from service.cache import ScoreCache, model_key
from service.chat import ChatFormat
from service.encoding import Encoded, TextEncoder, shared_prefix
from service.metrics import Metrics, ModelMetrics
from service.model_texts import ModelTexts
from service.parity import check_against_recorded, needs_precision_check
from service.prefix_cache import PrefixCache
from service.protocol import ModelInfo, NormalizationInfo, PrecisionCheck, ScoreResult
from service.runtime import Runtime, check_runtime, load_runtime
from service.settings import Settings

log = logging.getLogger("rewardserve.model")

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
    """What a model needs of one HTTP request: its deadline (event-loop clock), an awaitable that
    completes when its client disconnects, and the admission pass it was let in with (if any)."""

    deadline: float
    disconnected: Callable[[], Awaitable[None]]
    gate_pass: GatePass | None = None
    client: str = "none"  # the drift metrics' client label (service/metrics.py client_label)
    model: str | None = None  # the model it was served by, once resolved (the latency metric's model label)


def sigmoid(x: float) -> float:
    """Numerically stable logistic function."""
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    z = math.exp(x)
    return z / (1.0 + z)


class ServedModel:
    """One bundle version. Built empty, filled by `start`; the registry decides when it takes requests."""

    def __init__(self, name: str, version: str, bundle: Path, settings: Settings, metrics: Metrics,
                 runtime: Runtime | None = None):
        """`runtime`: an already-built runtime to serve instead of loading the bundle's (a custom backend
        implementing service.runtime.Runtime, or one wrapped to observe it)."""
        s = self.settings = settings
        self.name, self.version, self.bundle = name, str(version), Path(bundle)
        self.metrics = metrics.for_model(name, self.version)  # its series labelled by model in a repository
        self.runtime = runtime
        self.batcher = Batcher(None, None, max_batch_size=s.max_batch_size, max_batch_tokens=s.max_batch_tokens,
                               max_wait_ms=s.max_wait_ms, max_queue=s.max_queue, metrics=self.metrics,
                               efficient_batch_tokens=s.efficient_batch_tokens,
                               min_padding_efficiency=s.min_padding_efficiency, max_queue_tokens=s.max_queue_tokens)
        self.tokenizer_pool = ThreadPoolExecutor(s.tokenizer_threads, thread_name_prefix=f"tokenize-{name}")
        self.manifest: Manifest | None = None
        self.encoder: TextEncoder | None = None
        self.chat: ChatFormat | None = None
        self.cache: ScoreCache | None = None
        self.precision_check: PrecisionCheck | None = None  # a precision change (fp16), see check_precision
        self.temperature = 1.0  # the manifest's fitted preference temperature, if it has one
        self.ready = False
        self.in_flight = 0  # requests inside score(): the registry unloads an old version only at 0

    def __repr__(self) -> str:
        return f"ServedModel({self.name}@{self.version})"

    # ---- lifecycle

    async def start(self) -> None:
        """Load, verify (checksums and parity in open_bundle; the precision check), warm up, turn ready.
        Raises (BundleError or any other error) when this version must not serve."""
        s = self.settings
        self.manifest, self.encoder = open_bundle(self.bundle)
        if self.runtime is None:
            self.runtime = load_runtime(self.bundle, self.manifest, provider=s.provider,
                                        intra_op_threads=s.intra_op_threads, spinning=s.ort_spinning,
                                        fp16=s.fp16, io_binding=s.ort_io_binding)
        # A handed-in runtime is checked against the protocol (one line naming a missing member) and seen with
        # the protocol's defaults for the optional members it lacks (service/runtime_protocol.py).
        self.runtime = check_runtime(self.runtime)
        if self.manifest.calibration is not None:  # the preference temperature fitted at export (issue 24)
            self.temperature = float(self.manifest.calibration.temperature)
        if needs_precision_check(self.bundle, self.manifest, self.runtime.precision):
            await self.check_precision()
        if s.max_batch_tokens < self.manifest.text.max_length:
            log.warning("%s: max_batch_tokens %d < model max_length %d: the longest inputs will run alone", self,
                        s.max_batch_tokens, self.manifest.text.max_length)
        self.chat = ChatFormat.from_bundle(self.bundle, self.manifest.text, self.encoder,
                                           s.special_tokens_in_content)
        key = model_key(self.manifest.model_dump_json())  # both caches: no other model's entry is ever served
        self.cache = ScoreCache(s.cache_size, key, self.metrics)
        self._share_prefixes(key)
        self.batcher.start(self.runtime, self.encoder.pad)
        await self.warm_up()
        self.ready = True
        log.info("ready: model %s version %s (%s) on %s", self.name, self.version, self.manifest.name,
                 self.runtime.describe())

    def _share_prefixes(self, key: bytes) -> None:
        """Prefix sharing across requests and the prefix cache (issue 21, docs/decoders.md), on a runtime that
        reuses prefixes (a causal decoder) with prompt_reuse_min_tokens > 0: a new cache per loaded model,
        keyed by its manifest too, so no other model's prefix is ever served; on a GPU its memory comes out of
        the batch token budget (reserve_prefix_cache) before the batcher reads the hint."""
        s, runtime = self.settings, self.runtime
        if not s.prompt_reuse_min_tokens or not runtime.reuses_prefix or runtime.slice_kv is None:
            return
        if s.prefix_cache_tokens:
            runtime.reserve_prefix_cache(s.prefix_cache_tokens)
        cache = PrefixCache(s.prefix_cache_tokens, s.prompt_reuse_min_tokens, key, self.metrics, runtime.slice_kv)
        self.batcher.share_prefixes(cache, self.manifest.text.pad_token_id)

    async def check_precision(self) -> None:
        """The runtime computes at another precision than the bundle was exported at or its reference scores
        were computed in (fp16 on a GPU; a bf16 decoder served bf16 against its fp32 reference; service.parity
        needs_precision_check): score the bundle's reference pairs and compare with the scores recorded at
        export. Refuse to start on failure; otherwise report it in /v1/models."""
        loop = asyncio.get_running_loop()
        report = await loop.run_in_executor(None, check_against_recorded, self.bundle, self.encoder,
                                            self.runtime, self.runtime.precision, PRECISION_CHECK_PAIRS)
        self.precision_check = PrecisionCheck(
            precision=self.runtime.precision, reference_pairs=report.reference_pairs,
            pairwise_agreement=report.pairwise_agreement, max_abs_diff=report.max_abs_diff, threshold=report.threshold)
        if not report.passed:
            raise BundleError(f"{self.runtime.precision} disagrees with the bundle's recorded scores: "
                              f"{report.model_dump_json()}")
        log.info("%s: %s checked on %d reference pairs: agreement %.4f, max abs diff %.2e", self,
                 self.runtime.precision, report.reference_pairs, report.pairwise_agreement, report.max_abs_diff)

    async def warm_up(self) -> None:
        """One real batch (two lengths) before readiness: first-run allocations happen now, not on a client."""
        loop = asyncio.get_running_loop()
        encoded = await loop.run_in_executor(self.tokenizer_pool, self.encoder.encode,
                                             ["warm-up prompt", "a longer warm-up prompt " * 8], ["ok", "fine " * 8])
        raw = await self.batcher.run_direct(encoded)
        if not np.all(np.isfinite(raw)):
            raise RuntimeError(f"warm-up produced non-finite scores {raw.tolist()}")

    @property
    def queue_depth(self) -> int:
        return self.batcher.depth

    @property
    def fatal(self) -> str | None:
        """Why the model can no longer run (a non-recoverable device error its batcher saw), else None."""
        return self.batcher.fatal

    def begin_drain(self) -> None:
        """Close admission (signal-handler safe: an attribute write); what is queued is still answered."""
        self.batcher.closing = True

    async def abandon_queue(self) -> None:
        """At the drain deadline: answer every queued item 503 draining now."""
        await self.batcher.drain(0)

    async def stop(self, timeout: float) -> None:
        """Close admission, answer what is queued within `timeout` seconds, free the threads."""
        self.ready = False
        self.begin_drain()
        await self.batcher.drain(max(0.0, timeout))
        self.tokenizer_pool.shutdown(wait=False)
        if isinstance(self.metrics, ModelMetrics):
            self.metrics.close()  # this version's gauges leave /metrics
        log.info("stopped %s", self)

    # ---- scoring

    async def score(self, call: Call, items: Sequence[Item], shared_prompt: bool = False,
                    whole: bool = False) -> list[ScoreResult | TooLong]:
        """Admit, tokenize, batch, normalize. An item that would need truncation while its client asked for
        none comes back as a TooLong in its slot. (The deadline and the client's presence are watched by
        the caller, service/engine.py, around the whole request: cancelling this cancels its queued items.)

        All items are one unit of admission: admitted (by count) at once, tokenized in concurrent chunks,
        checked (by tokens and deadline) and queued at once, so a refusal comes before any compute and never
        throws away finished work. `whole` (a rollout batch on the compatibility routes, all or nothing):
        the first TooLong is raised before anything is queued instead of being returned in its slot."""
        if self.fatal:
            self.metrics.rejected.labels("draining").inc()
            raise NotReady(f"the model can no longer run ({self.fatal}); the server must be restarted")
        if not self.ready and not self.batcher.closing:
            raise NotReady(f"model {self.name} version {self.version} is not ready")
        self.in_flight += 1
        try:
            # Admission first: an overloaded model refuses before spending CPU on tokenization.
            with self.batcher.admit(len(items), call.gate_pass) as ticket:
                encoded = await self._tokenize_chunks(items, shared_prompt)
                if whole:
                    first_too_long(encoded)
                ok = [e for e in encoded if isinstance(e, Encoded)]
                raw = iter(await self.cache.score(ok, lambda todo: self.batcher.score(
                    ticket, todo, call.deadline, self._prompt_group(todo) if shared_prompt else None)))
            return [e if isinstance(e, TooLong) else self._result(next(raw), e, item, call.client)
                    for e, item in zip(encoded, items)]
        finally:
            self.in_flight -= 1

    def probability(self, a: ScoreResult, b: ScoreResult) -> float:
        """P(a preferred over b) = σ((raw_a − raw_b) / T), T the bundle's fitted temperature (1 when it has
        none: the Bradley-Terry probability the model was trained on)."""
        return sigmoid((a.raw - b.raw) / self.temperature)

    def _prompt_group(self, encoded: Sequence[Encoded]):
        """Best-of-N on a runtime that can compute a shared prompt once (a causal decoder: run_shared): the
        items as one SharedPrefix unit when they share at least prompt_reuse_min_tokens leading tokens."""
        minimum = self.settings.prompt_reuse_min_tokens
        if not minimum or not self.runtime.reuses_prefix:
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

    def _result(self, raw: np.float32, encoded: Encoded, item: Item, client: str = "none") -> ScoreResult:
        """The normalized result, naming this model and version; also the drift metrics (score in z, by
        response length, beyond the calibration range), its out-of-range flags and the encoder's flags (e.g.
        special_token_in_content, forged_turn: service/chat.py)."""
        norm = self.manifest.normalization
        raw = float(raw)
        z = float(norm.z_score(raw))
        p = norm.percentiles  # 0..100 (a bundle with fewer percentiles gets no flags)
        above, below = len(p) == 101 and raw > p[99], len(p) == 101 and raw < p[1]
        self.metrics.observe_served(z, encoded.response_tokens, above, below, client, flags=encoded.flags)
        self.metrics.observe_response(item.response, client)  # the courtesy-closing counter (issue 24)
        flags = ["above_calibration_p99"] if above else ["below_calibration_p1"] if below else []
        flags += encoded.flags
        return ScoreResult(score=z, raw=raw, percentile=float(norm.percentile(raw)),
                           n_tokens=encoded.n_tokens, truncated=encoded.truncated, model=self.name,
                           version=self.version, warnings=list(encoded.warnings) or None, flags=flags or None)

    # ---- what the routes may know

    def texts(self) -> ModelTexts:
        return ModelTexts(self.chat, self.encoder)

    def info(self) -> ModelInfo:
        """This version's /v1/models entry."""
        m = self.manifest
        fatal = {"fatal_error": self.fatal} if self.fatal else {}  # said where the runtime is described
        return ModelInfo(
            id=self.name, version=self.version, base_model=m.base_model, created_at=m.created_at,
            model_format=m.model_format, precision=m.precision, pooling=m.pooling, max_length=m.text.max_length,
            join=m.text.join, normalization=NormalizationInfo(mean=m.normalization.mean, std=m.normalization.std,
                                                              n=m.normalization.n, reference=m.normalization.reference),
            eval=m.eval, parity_passed=m.parity.passed, runtime={**self.runtime.describe(), **fatal},
            max_client_batch=self.settings.max_client_batch, chat_template=self.chat.has_template,
            precision_check=self.precision_check, audit=m.audit,
            calibration=m.calibration.model_dump() if m.calibration is not None else None)
