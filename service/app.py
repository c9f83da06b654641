"""The FastAPI app: bundle → runtime → warm-up → ready; endpoints; one error shape; graceful drain.

Request path: validate (pydantic, service/protocol.py) → admit into the batcher (refuse cheaply when
overloaded) → tokenize in a thread pool → queue items and await the batcher → normalize and answer.
The whole path runs under the request deadline and is cancelled if the client disconnects, which
cancels the queued items so the batcher drops them before compute.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import math
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Iterable

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.data import ASSISTANT_MARK, render_messages
from service.batcher import CANCEL_DEADLINE, Batcher, DeadlineExceeded, Draining, ModelError, Overloaded
from service.bundle import BundleError, Manifest, open_bundle
from service.cache import ScoreCache, model_key
from service.chat import ChatFormat, ChatTemplateError
from service.encoding import Encoded, TextEncoder
from service.metrics import Metrics
from service.protocol import (BatchScoreRequest, BatchScoreResponse, CompareRequest, CompareResponse, ErrorResponse,
                              FieldError, ModelInfo, ModelList, NormalizationInfo, RankRequest, RankResponse,
                              PrecisionCheck, ScoreRequest, ScoreResult, Status)
from service.parity import check_against_recorded
from service.runtime import Runtime, load_runtime
from service.settings import Settings

log = logging.getLogger("rewardserve.app")

TIMEOUT_HEADER = "x-request-timeout"
PRECISION_CHECK_PAIRS = 256  # reference pairs scored at startup when the runtime changes precision
CLIENT_CLOSED = 499  # nginx's code for "client closed request"; nobody reads it, the metrics do


class ApiError(Exception):
    """An error answered as {"error": {"type", "message", "field"?}} with the given status."""

    def __init__(self, status: int, type_: str, message: str, field: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.type, self.message, self.field, self.headers = status, type_, message, field, headers


def error_body(type_: str, message: str, field: str | None = None, error_id: str | None = None) -> dict:
    error: dict[str, Any] = {"type": type_, "message": message}
    if field is not None:
        error["field"] = field
    if error_id is not None:
        error["id"] = error_id
    return {"error": error}


def error_response(status: int, type_: str, message: str, field: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(type_, message, field), status_code=status, headers=headers)


def internal_error(message: str) -> JSONResponse:
    """500 with an error id (body `id` and `X-Error-Id`); the caller logs the cause under the same id."""
    error_id = uuid.uuid4().hex[:16]
    return JSONResponse(error_body("internal_error", f"{message} (error id {error_id})", error_id=error_id),
                        status_code=500, headers={"X-Error-Id": error_id})


def describe_validation_errors(errors: list[dict], prefix: str = "") -> tuple[str | None, str]:
    """pydantic errors → (dotted path of the first bad field, one readable message naming every problem)."""
    parts, first_field = [], None
    for err in errors:
        loc = [str(p) for p in err.get("loc", ())]
        if loc and loc[0] == "body":
            loc = loc[1:]
        cause = (err.get("ctx") or {}).get("error")
        if isinstance(cause, FieldError):
            loc.append(cause.field)
        field = ".".join(([prefix] if prefix else []) + loc) or None
        kind, msg = err.get("type", ""), str(err.get("msg", "invalid"))
        msg = msg.removeprefix("Value error, ")
        if kind == "missing":
            msg = "field required" if field else "request body is required (a JSON object)"
        elif kind == "extra_forbidden":
            msg = "unknown field"
        elif kind in ("model_attributes_type", "dict_type", "model_type") and not loc:
            msg = "must be a JSON object" if field else "request body must be a JSON object"
        parts.append(f"{field}: {msg}" if field else msg)
        first_field = first_field or field
    return first_field, "; ".join(parts[:5]) + (f" (and {len(parts) - 5} more)" if len(parts) > 5 else "")


@dataclass
class TooLong:
    """An item that needed truncation while the client asked for none; `part` says which text to shorten."""

    part: str  # "prompt" or "response"


class Service:
    """What the endpoints share. Built empty by create_app, filled by the lifespan."""

    def __init__(self, settings: Settings, runtime_wrapper: Callable[[Runtime], Runtime] | None = None):
        self.settings = settings
        self.runtime_wrapper = runtime_wrapper
        self.precision_check: PrecisionCheck | None = None  # a precision change (fp16), see check_precision
        self.metrics = Metrics()
        self.manifest: Manifest | None = None
        self.encoder: TextEncoder | None = None
        self.runtime: Runtime | None = None
        self.batcher: Batcher | None = None
        self.chat: ChatFormat | None = None  # chat template + special-token checks (service/chat.py)
        self.cache: ScoreCache | None = None  # raw scores by (model, token ids) (service/cache.py)
        self.tokenizer_pool = ThreadPoolExecutor(settings.tokenizer_threads, thread_name_prefix="tokenize")
        self.ready = False
        self.draining = False  # set from the SIGTERM handler (begin_drain): plain attribute writes only
        self.drain_deadline: float | None = None  # time.monotonic() by which the drain must be over
        self._abandoned = False  # the queue was failed at the drain deadline; stop() has nothing left to wait for
        self.pending = 0  # requests let through the admission gate and not yet admitted by the batcher
        self.api_keys: list[ApiKey] | None = None  # None: no authentication

    # ---- startup and shutdown

    async def start(self) -> None:
        s = self.settings
        if s.api_keys_file is not None or s.api_keys is not None:
            self.api_keys = load_api_keys(s)
        try:
            self.manifest, self.encoder = open_bundle(s.bundle)
        except BundleError as exc:
            log.error("refusing to start: %s", exc)
            raise
        self.runtime = load_runtime(s.bundle, self.manifest, provider=s.provider,
                                    intra_op_threads=s.intra_op_threads, spinning=s.ort_spinning,
                                    fp16=s.fp16, io_binding=s.ort_io_binding)
        if self.runtime.precision != self.manifest.precision:
            await self.check_precision()
        if self.runtime_wrapper is not None:  # tests: fault injection and compute accounting
            self.runtime = self.runtime_wrapper(self.runtime)
        if s.max_client_batch > s.max_queue:
            log.warning("max_client_batch %d > max_queue %d: the largest requests can never be admitted",
                        s.max_client_batch, s.max_queue)
        if s.max_batch_tokens < self.manifest.text.max_length:
            log.warning("max_batch_tokens %d < model max_length %d: the longest inputs will run alone",
                        s.max_batch_tokens, self.manifest.text.max_length)
        self.chat = ChatFormat.from_bundle(s.bundle, self.manifest.text, self.encoder)
        self.cache = ScoreCache(s.cache_size, model_key(self.manifest.model_dump_json()), self.metrics)
        self.batcher = Batcher(self.runtime, self.encoder.pad, max_batch_size=s.max_batch_size,
                               max_batch_tokens=s.max_batch_tokens, max_wait_ms=s.max_wait_ms,
                               max_queue=s.max_queue, metrics=self.metrics,
                               efficient_batch_tokens=s.efficient_batch_tokens,
                               min_padding_efficiency=s.min_padding_efficiency)
        self.batcher.start()
        await self.warm_up()
        self.ready = True
        log.info("ready: model %s on %s", self.manifest.name, self.runtime.describe())

    async def check_precision(self) -> None:
        """The runtime computes at another precision than the bundle was exported and checked at (fp16 on a
        GPU): score the bundle's reference pairs and compare with the PyTorch scores recorded at export.
        Refuse to start on failure; otherwise report it in /v1/models."""
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

    def begin_drain(self) -> None:
        """Refuse new work from now on (readyz 503, scoring 503); signal-handler safe: attribute writes only."""
        self.draining = True
        if self.drain_deadline is None:
            self.drain_deadline = time.monotonic() + self.settings.drain_timeout_s

    @property
    def queue_depth(self) -> int:
        return self.batcher.depth if self.batcher is not None else 0

    async def abandon_queue(self) -> None:
        """At the drain deadline: answer every queued item 503 draining now, instead of cutting it at exit."""
        if self.batcher is not None and not self._abandoned:
            self._abandoned = True
            await self.batcher.drain(0)

    async def stop(self) -> None:
        self.ready = False
        self.begin_drain()
        if self.batcher is not None and not self._abandoned:
            await self.batcher.drain(max(0.0, self.drain_deadline - time.monotonic()))
        self.tokenizer_pool.shutdown(wait=False)
        log.info("stopped")

    # ---- the scoring path

    def _tokenize(self, prompts: list[str], responses: list[str], strict: list[bool],
                  shared_prompt: bool) -> list[Encoded | TooLong]:
        """Runs in the tokenizer pool. Items that would need truncation under truncate=false become TooLong."""
        enc = self.encoder
        encoded = (enc.encode_shared_prompt(prompts[0], responses) if shared_prompt
                   else enc.encode(prompts, responses))
        out: list[Encoded | TooLong] = []
        for i, (e, response, no_cut) in enumerate(zip(encoded, responses, strict)):
            if e.truncated and no_cut:
                self.metrics.rejected.labels("too_long").inc()
                tail = response[-enc.char_limit:]
                alone = len(enc.tokenizer.encode(tail, add_special_tokens=False).ids)
                out.append(TooLong("response" if alone > enc.budget else "prompt"))
            else:
                out.append(self.chat.annotate(e, prompts[0 if shared_prompt else i], response))
        return out

    def too_long_message(self, part: str) -> str:
        return (f"input is longer than the model's max_length of {self.manifest.text.max_length} tokens; "
                f"shorten the {part} or send \"truncate\": true to cut it (the response end is kept)")

    async def score(self, request: Request, prompts: list[str], responses: list[str], strict: list[bool],
                    shared_prompt: bool = False) -> list[ScoreResult | TooLong]:
        """Admit, tokenize, batch, normalize; under the request deadline and the client's presence."""
        if self.draining or not self.ready:
            raise Draining("server is shutting down" if self.draining else "server is not ready")
        loop = asyncio.get_running_loop()
        timeout = self.settings.request_timeout_s
        asked = request.headers.get(TIMEOUT_HEADER)
        if asked is not None:
            try:
                value = float(asked)
                if not (value > 0 and math.isfinite(value)):
                    raise ValueError
            except ValueError:
                raise ApiError(400, "invalid_request", f"header {TIMEOUT_HEADER} must be a positive number of "
                               "seconds", field=TIMEOUT_HEADER) from None
            timeout = min(timeout, value)
        deadline = loop.time() + timeout

        async def pipeline() -> list[ScoreResult | TooLong]:
            # Admission first: an overloaded server refuses before spending CPU on tokenization. The gate's
            # provisional slot turns into the real item count in the same step (no await in between).
            gate = request.scope.get(GATE)
            if gate is not None:
                gate.release()
            with self.batcher.admit(len(responses)) as ticket:
                items = await loop.run_in_executor(self.tokenizer_pool, self._tokenize, prompts, responses,
                                                   strict, shared_prompt)
                ok = [e for e in items if isinstance(e, Encoded)]
                raw = iter(await self.cache.score(ok, lambda todo: self.batcher.score(ticket, todo, deadline)))
            return [item if isinstance(item, TooLong) else self.result(next(raw), item) for item in items]

        return await guarded(request, pipeline(), deadline)

    def result(self, raw: np.float32, encoded: Encoded) -> ScoreResult:
        norm = self.manifest.normalization
        raw = float(raw)
        return ScoreResult(score=float(norm.z_score(raw)), raw=raw, percentile=float(norm.percentile(raw)),
                           n_tokens=encoded.n_tokens, truncated=encoded.truncated, model=self.manifest.name,
                           warnings=list(encoded.warnings) or None)


# What a bearer key may do: "api" = the /v1/* routes, "metrics" = /metrics when metrics_auth is on.
SCOPES = ("api", "metrics")


@dataclass(frozen=True)
class ApiKey:
    digest: bytes  # sha256 of the key: compared in constant time, whatever the length of what was sent
    scopes: frozenset[str]


def parse_api_keys(entries: Iterable[str], source: str) -> list[ApiKey]:
    """Entries 'KEY [SCOPE ...]' ('#' comments and blanks ignored); no scope given = every scope."""
    keys = []
    for n, entry in enumerate(entries, 1):
        entry = entry.strip()
        if not entry or entry.startswith("#"):
            continue
        key, *scopes = entry.split()
        unknown = sorted(set(scopes) - set(SCOPES))
        if unknown:
            raise RuntimeError(f"{source} entry {n}: unknown scope {', '.join(unknown)} (scopes: {', '.join(SCOPES)})")
        keys.append(ApiKey(hashlib.sha256(key.encode()).digest(), frozenset(scopes or SCOPES)))
    return keys


def read_api_keys(path) -> list[ApiKey]:
    """Bearer keys from a file, one 'KEY [SCOPE ...]' per line; refuse to start on none."""
    try:
        lines = open(path, encoding="utf-8").read().splitlines()
    except OSError as exc:
        raise RuntimeError(f"api_keys_file {path}: {exc.strerror}") from None
    keys = parse_api_keys(lines, f"api_keys_file {path}")
    if not keys:
        raise RuntimeError(f"api_keys_file {path} holds no keys")
    return keys


def load_api_keys(settings: Settings) -> list[ApiKey]:
    """The file's keys plus REWARDSERVE_API_KEYS (comma-separated entries); refuse to start on none."""
    keys = read_api_keys(settings.api_keys_file) if settings.api_keys_file is not None else []
    if settings.api_keys is not None:
        keys += parse_api_keys(settings.api_keys.get_secret_value().split(","), "REWARDSERVE_API_KEYS")
    if not keys:
        raise RuntimeError("api keys are configured but none was given (REWARDSERVE_API_KEYS is empty)")
    return keys


def match_key(keys: list[ApiKey], token: bytes) -> ApiKey | None:
    """The key equal to `token`, comparing sha256 digests with every key, always (no early exit)."""
    digest = hashlib.sha256(token).digest()
    found = None
    for key in keys:
        equal = hmac.compare_digest(digest, key.digest)
        found = key if equal else found
    return found


class ClientGone(Exception):
    pass


async def _disconnected(request: Request) -> None:
    # After the body is read, the server's receive() only returns once the client has gone.
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def guarded(request: Request, work: Awaitable, deadline: float):
    """Await `work` until the deadline; cancel it (and so its queued items) on timeout or disconnect."""
    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, timeout=max(0.0, deadline - loop.time()),
                                     return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # this handler itself was cancelled (e.g. the server's shutdown timeout)
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


def resolve_pair(req: ScoreRequest, chat: ChatFormat | None = None) -> tuple[str, str, str]:
    """(prompt, response, field to blame when too long) for either request form."""
    if req.messages is None:
        return req.prompt, req.response, ""
    messages = [m.model_dump() for m in req.messages]
    if chat is not None and chat.fmt.chat_template:  # the bundle's own chat template (service/chat.py)
        try:
            pair = chat.messages_to_pair(messages)
        except ChatTemplateError as exc:
            raise ApiError(422, "validation_error", f"messages: {exc}", "messages") from None
        return pair.prompt, pair.response, "messages"
    # Same rendering as the trainer's chat-format reader (service/data.py: parse_record).
    return render_messages(messages[:-1]) + ASSISTANT_MARK, messages[-1]["content"].strip(), "messages"


def _blame(messages_field: str, part: str, prefix: str = "") -> str:
    name = messages_field or part
    return f"{prefix}.{name}" if prefix else name


# ---- ASGI middlewares

class _BodyTooLarge(Exception):
    pass


class BodyLimitMiddleware:
    """413 before parsing: refuse a declared Content-Length over the limit, and count streamed bytes."""

    def __init__(self, app, max_bytes: int, metrics: Metrics):
        self.app = app
        self.max_bytes = max_bytes
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:
            if not length.isdigit():
                return await error_response(400, "invalid_request", "invalid Content-Length header")(scope, receive,
                                                                                                     send)
            if int(length) > self.max_bytes:
                return await self._too_large(scope, receive, send)
        received = 0
        state = {"over": False, "started": False}

        async def counting_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    state["over"] = True
                    raise _BodyTooLarge()
            return message

        async def guarded_send(message):
            if state["over"]:
                return  # whatever the app makes of the aborted read is replaced by our 413 below
            state["started"] = True
            await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except _BodyTooLarge:
            pass
        if state["over"] and not state["started"]:
            await self._too_large(scope, receive, send)

    async def _too_large(self, scope, receive, send):
        self.metrics.rejected.labels("too_large").inc()
        await error_response(413, "payload_too_large", f"request body exceeds {self.max_bytes} bytes")(
            scope, receive, send)


COMPAT_PATHS = frozenset({"/get_reward", "/classify", "/predict"})  # service/compat.py; they need the api scope


GATE = "rewardserve.gate"  # ASGI scope key of a request's _GatePass


class _GatePass:
    """One provisional queue slot, held from the gate until the batcher admits the request's real items."""

    __slots__ = ("service", "held")

    def __init__(self, service: "Service"):
        self.service, self.held = service, True
        service.pending += 1

    def release(self) -> None:
        if self.held:
            self.held = False
            self.service.pending -= 1


class AdmissionGateMiddleware:
    """Refuse scoring requests (POST /v1/*, compat routes) before reading their body when the queue is full or the
    server is draining: in a burst, only as many requests as the queue can take are parsed and
    validated, and the others are answered at once (503/429 + Retry-After, or 503 draining).

    A request let through holds one provisional slot (its item count is unknown until its body is
    parsed) until `Service.score` asks the batcher to admit its real items; the batcher's own check
    stays exact for large batches."""

    def __init__(self, app, service: "Service"):
        self.app = app
        self.service = service

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "")
        if scope["type"] != "http" or scope["method"] != "POST" or not (path.startswith("/v1/")
                                                                       or path in COMPAT_PATHS):
            return await self.app(scope, receive, send)
        service, s = self.service, self.service.settings
        retry = {"Retry-After": str(s.retry_after_s)}
        if service.draining or not service.ready:
            service.metrics.rejected.labels("draining").inc()
            message = "server is shutting down" if service.draining else "server is not ready"
            return await error_response(503, "draining" if service.draining else "not_ready", message,
                                        headers=retry)(scope, receive, send)
        waiting = service.queue_depth + service.pending
        if waiting >= s.max_queue:
            service.metrics.rejected.labels("queue_full").inc()
            return await error_response(s.overload_status, "overloaded", f"queue full ({waiting} of {s.max_queue} "
                                        "items waiting); retry later", headers=retry)(scope, receive, send)
        gate = scope[GATE] = _GatePass(service)
        try:
            await self.app(scope, receive, send)
        finally:
            gate.release()


class AuthMiddleware:
    """Bearer keys on the API routes (/v1/*), and on /metrics if metrics_auth; probes and the schema stay open.

    401 `unauthorized`: no key, not the Bearer scheme, or an unknown key (who are you?).
    403 `forbidden`: a known key without the route's scope (you may not do this)."""

    def __init__(self, app, service: "Service"):
        self.app = app
        self.service = service

    def scope_needed(self, path: str) -> str | None:
        if path.startswith("/v1/") or path in COMPAT_PATHS:
            return "api"
        if path == "/metrics" and self.service.settings.metrics_auth:
            return "metrics"
        return None

    async def __call__(self, scope, receive, send):
        keys = self.service.api_keys
        needed = self.scope_needed(scope["path"]) if scope["type"] == "http" and keys is not None else None
        if needed is None:
            return await self.app(scope, receive, send)
        header = dict(scope["headers"]).get(b"authorization")
        scheme, _, token = (header or b"").partition(b" ")
        key = match_key(keys, token.strip()) if scheme.lower() == b"bearer" and token.strip() else None
        if key is None:
            reason = ("missing API key" if header is None else
                      "invalid API key" if scheme.lower() == b"bearer" else "API key not sent as a Bearer token")
            response = error_response(401, "unauthorized", f"{reason} (send 'Authorization: Bearer <key>')",
                                      headers={"WWW-Authenticate": "Bearer"})
        elif needed not in key.scopes:
            response = error_response(403, "forbidden", f"this API key may not use {scope['path']} (it lacks "
                                      f"the '{needed}' scope)",
                                      headers={"WWW-Authenticate": f'Bearer error="insufficient_scope", '
                                                                   f'scope="{needed}"'})
        else:
            return await self.app(scope, receive, send)
        await response(scope, receive, send)


class RequestMetricsMiddleware:
    """Counts and times every answer; adds `Server-Timing: app;dur=<ms>` (time spent inside the server),
    and `Connection: close` while draining so that keep-alive clients reconnect elsewhere."""

    def __init__(self, app, metrics: Metrics, routes: set[str], service: "Service"):
        self.app = app
        self.metrics = metrics
        self.routes = routes
        self.service = service

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()  # (uvloop's loop.time() ticks in whole milliseconds)
        status = {"code": 500}

        async def recording_send(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                headers = list(message.get("headers", []))
                elapsed_ms = (time.perf_counter() - started) * 1000
                headers.append((b"server-timing", f"app;dur={elapsed_ms:.2f}".encode()))
                if self.service.draining:
                    headers.append((b"connection", b"close"))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            route = scope["path"] if scope["path"] in self.routes else "other"
            self.metrics.requests.labels(route, str(status["code"])).inc()
            self.metrics.request_seconds.labels(route).observe(time.perf_counter() - started)


# ---- the OpenAPI contract: what the pydantic models cannot know

RETRY_AFTER = {"Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "integer",
                                                                                            "minimum": 0}}}


def _error(description: str, headers: dict | None = None) -> dict:
    out: dict[str, Any] = {"model": ErrorResponse, "description": description}
    if headers:
        out["headers"] = headers
    return out


def documented_errors(settings: Settings, auth: bool, scoring: bool = False) -> dict[int, dict]:
    """Every error status a route can answer, for `responses=` (the fuzz test holds the server to it)."""
    out: dict[int, dict] = {}
    if auth:
        out[401] = _error("unauthorized: no API key, not a Bearer token, or an unknown key",
                          {"WWW-Authenticate": {"schema": {"type": "string"}}})
        out[403] = _error("forbidden: the API key lacks this route's scope")
    if scoring:
        out[400] = _error("invalid_json: the body is not valid UTF-8 JSON; invalid_request: a bad Content-Length "
                          "or X-Request-Timeout header")
        out[413] = _error("payload_too_large: body over max_body_bytes, refused before it is parsed")
        out[415] = _error("unsupported_media_type: body not sent as application/json")
        out[422] = _error("validation_error: a field is missing, of the wrong type, unknown, empty, or over a "
                          "limit; `field` names it")
        if settings.overload_status == 429:
            out[429] = _error("overloaded: the queue is full", RETRY_AFTER)
        out[500] = _error("internal_error: the model run failed; `id` (and X-Error-Id) names it in the server log",
                          {"X-Error-Id": {"schema": {"type": "string"}}})
        out[503] = _error("overloaded (queue full), draining (shutting down) or not_ready", RETRY_AFTER)
        out[504] = _error("timeout: the request deadline passed before its items ran")
    return out


def refine_openapi(schema: dict, settings: Settings, auth: bool) -> dict:
    """Limits that come from the settings, the batch items' any-value rule, and the bearer scheme."""
    models = schema["components"]["schemas"]
    items = models["BatchScoreRequest"]["properties"]["items"]
    items.update(minItems=1, maxItems=settings.max_client_batch)
    items["items"] = {"anyOf": [{"$ref": "#/components/schemas/ScoreRequest"},  # (pydantic inlines it)
                                {"description": "any other value: answered by an error object in its slot "
                                 "while the other items are scored"}]}
    models["RankRequest"]["properties"]["responses"]["maxItems"] = settings.max_client_batch
    if auth:
        schema["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        for path, operations in schema["paths"].items():
            if path.startswith("/v1/") or path in COMPAT_PATHS or (path == "/metrics" and settings.metrics_auth):
                for operation in operations.values():
                    operation["security"] = [{"bearer": []}]
    return schema


# ---- the app

def create_app(settings: Settings, runtime_wrapper: Callable[[Runtime], Runtime] | None = None) -> FastAPI:
    """The app; the model loads in its lifespan. `runtime_wrapper` wraps the loaded runtime (tests inject
    faults and count compute through it)."""
    service = Service(settings, runtime_wrapper)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await service.start()
        try:
            yield
        finally:
            await service.stop()

    app = FastAPI(title="rewardserve", version="0.1.0", lifespan=lifespan,
                  description="Reward-model scoring service. Errors: {\"error\": {\"type\", \"message\", "
                  "\"field\"?, \"id\"?}}. Scoring requests may carry `X-Request-Timeout: <seconds>` to shorten "
                  "their deadline (capped by the server's request_timeout_s); past it they are answered 504.")
    app.state.service = service
    s = settings
    retry = {"Retry-After": str(s.retry_after_s)}
    auth = s.api_keys_file is not None or s.api_keys is not None
    scoring_errors = documented_errors(s, auth, scoring=True)

    # ---- errors: one shape everywhere

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return error_response(exc.status, exc.type, exc.message, exc.field, exc.headers)

    @app.exception_handler(Overloaded)
    async def _overloaded(request: Request, exc: Overloaded):
        return error_response(s.overload_status, "overloaded", f"{exc}; retry later", headers=retry)

    @app.exception_handler(Draining)
    async def _draining(request: Request, exc: Draining):
        return error_response(503, "draining" if service.draining else "not_ready", str(exc), headers=retry)

    @app.exception_handler(DeadlineExceeded)
    async def _deadline(request: Request, exc: DeadlineExceeded):
        return error_response(504, "timeout", f"{exc} (timeout {s.request_timeout_s:g} s or {TIMEOUT_HEADER})")

    @app.exception_handler(ClientGone)
    async def _gone(request: Request, exc: ClientGone):
        return Response(status_code=CLIENT_CLOSED)

    @app.exception_handler(ModelError)
    async def _model_error(request: Request, exc: ModelError):
        response = internal_error("model run failed")
        log.error("error id %s: %s %s: %s", response.headers["x-error-id"], request.method, request.url.path, exc)
        return response

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        bad_json = next((e for e in errors if e.get("type") == "json_invalid"), None)
        if bad_json is not None:
            pos = bad_json["loc"][-1]
            reason = str((bad_json.get("ctx") or {}).get("error", "JSON decode error")).removesuffix(" at")
            return error_response(400, "invalid_json", f"request body is not valid JSON: {reason} at position {pos}")
        field, message = describe_validation_errors(errors)
        content_type = request.headers.get("content-type", "")
        if field is None and errors and errors[0].get("type") == "model_attributes_type" \
                and "json" not in content_type.lower():
            return error_response(415, "unsupported_media_type", f"send the body as JSON with Content-Type: "
                                  f"application/json (got {content_type or 'no Content-Type'})")
        return error_response(422, "validation_error", message, field)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 400 and isinstance(exc.__cause__, UnicodeDecodeError):  # FastAPI's body parse
            bad = exc.__cause__
            return error_response(400, "invalid_json", f"request body is not valid JSON: not UTF-8 (byte "
                                  f"0x{bad.object[bad.start]:02x} at position {bad.start})")
        kinds = {400: "invalid_request", 404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}
        message = {404: f"no route {request.url.path}",
                   405: f"method {request.method} not allowed on {request.url.path}"}.get(exc.status_code, exc.detail)
        return error_response(exc.status_code, kinds.get(exc.status_code, "http_error"), str(message),
                              headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception):
        response = internal_error("internal server error")
        log.error("error id %s: unhandled error on %s %s", response.headers["x-error-id"], request.method,
                  request.url.path, exc_info=exc)
        return response

    # ---- scoring endpoints

    @app.post("/v1/score", response_model=ScoreResult, response_model_exclude_none=True, responses=scoring_errors)
    async def score(body: ScoreRequest, request: Request):
        prompt, response, messages_field = resolve_pair(body, service.chat)
        [result] = await service.score(request, [prompt], [response], [not body.truncate])
        if isinstance(result, TooLong):
            raise ApiError(422, "validation_error", service.too_long_message(result.part),
                           _blame(messages_field, result.part))
        return result

    @app.post("/v1/score/batch", response_model=BatchScoreResponse, response_model_exclude_none=True,
              responses=scoring_errors)
    async def score_batch(body: BatchScoreRequest, request: Request):
        if not body.items:
            raise ApiError(422, "validation_error", "items: must hold at least one item", "items")
        if len(body.items) > s.max_client_batch:
            raise ApiError(422, "validation_error", f"items: at most {s.max_client_batch} items per request "
                           f"(got {len(body.items)}); split the batch", "items")
        results: list[Any] = [None] * len(body.items)
        valid: list[tuple[int, ScoreRequest]] = []
        pairs: list[tuple[str, str, str]] = []
        for i, raw_item in enumerate(body.items):  # one bad item fails only itself
            try:
                req = ScoreRequest.model_validate(raw_item)
                pair = resolve_pair(req, service.chat)
                valid.append((i, req))
                pairs.append(pair)
            except ValidationError as exc:
                field, message = describe_validation_errors(exc.errors(), prefix=f"items.{i}")
                if not isinstance(raw_item, dict):
                    field, message = f"items.{i}", f"items.{i}: must be a JSON object"
                results[i] = error_body("validation_error", message, field)
            except ApiError as exc:  # the chat template refused these messages
                results[i] = error_body(exc.type, f"items.{i}.{exc.message}", f"items.{i}.{exc.field}")
        if valid:
            scored = await service.score(request, [p for p, _, _ in pairs], [r for _, r, _ in pairs],
                                         [not req.truncate for _, req in valid])
            for (i, _), (_, _, messages_field), item in zip(valid, pairs, scored):
                if isinstance(item, TooLong):
                    field = _blame(messages_field, item.part, f"items.{i}")
                    results[i] = error_body("validation_error", f"{field}: {service.too_long_message(item.part)}",
                                            field)
                else:
                    results[i] = item
        return {"results": results}

    @app.post("/v1/rank", response_model=RankResponse, response_model_exclude_none=True, responses=scoring_errors)
    async def rank(body: RankRequest, request: Request):
        n = len(body.responses)
        if n > s.max_client_batch:
            raise ApiError(422, "validation_error", f"responses: at most {s.max_client_batch} per request "
                           f"(got {n})", "responses")
        scored = await service.score(request, [body.prompt], body.responses, [not body.truncate] * n,
                                     shared_prompt=True)
        for i, item in enumerate(scored):
            if isinstance(item, TooLong):
                field = "prompt" if item.part == "prompt" else f"responses.{i}"
                raise ApiError(422, "validation_error", f"{field}: {service.too_long_message(item.part)}", field)
        ranking = sorted(range(n), key=lambda i: -scored[i].raw)  # stable: ties keep input order
        return RankResponse(results=scored, ranking=ranking[: body.top_k] if body.top_k else ranking,
                            best_index=ranking[0])

    @app.post("/v1/compare", response_model=CompareResponse, response_model_exclude_none=True,
              responses=scoring_errors)
    async def compare(body: CompareRequest, request: Request):
        a, b = await service.score(request, [body.prompt], [body.a, body.b], [not body.truncate] * 2,
                                   shared_prompt=True)
        for name, item in (("a", a), ("b", b)):
            if isinstance(item, TooLong):
                field = "prompt" if item.part == "prompt" else name
                raise ApiError(422, "validation_error", f"{field}: {service.too_long_message(item.part)}", field)
        return CompareResponse(probability=sigmoid(a.raw - b.raw), a=a, b=b)

    # ---- information and operations endpoints

    @app.get("/v1/models", response_model=ModelList, responses=documented_errors(s, auth))
    async def models():
        m = service.manifest
        return ModelList(data=[ModelInfo(
            id=m.name, base_model=m.base_model, created_at=m.created_at, model_format=m.model_format,
            precision=m.precision, pooling=m.pooling, max_length=m.text.max_length, join=m.text.join,
            normalization=NormalizationInfo(mean=m.normalization.mean, std=m.normalization.std,
                                            n=m.normalization.n, reference=m.normalization.reference),
            eval=m.eval, parity_passed=m.parity.passed, runtime=service.runtime.describe(),
            max_client_batch=s.max_client_batch, chat_template=service.chat.has_template,
            precision_check=service.precision_check)])

    @app.get("/healthz", response_model=Status)
    async def healthz():
        return Status(status="ok")

    @app.get("/readyz", response_model=Status,
             responses={503: _error("not_ready (loading) or draining (shutting down)", RETRY_AFTER)})
    async def readyz():
        if service.draining:
            return error_response(503, "draining", "server is shutting down", headers=retry)
        if not service.ready:
            return error_response(503, "not_ready", "model is loading", headers=retry)
        return Status(status="ready")

    @app.get("/metrics", response_class=PlainTextResponse,
             responses={200: {"description": "Prometheus text exposition format 0.0.4",
                              "content": {"text/plain": {"schema": {"type": "string"}}}},
                        **documented_errors(s, auth and s.metrics_auth)})
    async def metrics():
        return Response(service.metrics.exposition(), media_type="text/plain; version=0.0.4; charset=utf-8")

    from service.compat import register as register_compat  # ecosystem routes: /get_reward, /classify, /predict

    register_compat(app, service, scoring_errors)
    routes = {r.path for r in app.routes}
    # Added last = outermost: metrics see every answer, including the body limit's 413.
    app.add_middleware(BodyLimitMiddleware, max_bytes=s.max_body_bytes, metrics=service.metrics)
    app.add_middleware(AdmissionGateMiddleware, service=service)  # refuses before any body is read
    app.add_middleware(AuthMiddleware, service=service)  # before reading any body
    app.add_middleware(RequestMetricsMiddleware, metrics=service.metrics, routes=routes, service=service)

    base_openapi = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            app.openapi_schema = refine_openapi(base_openapi(), s, auth)
        return app.openapi_schema

    app.openapi = openapi
    return app


def sigmoid(x: float) -> float:
    """Numerically stable logistic function."""
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    z = math.exp(x)
    return z / (1.0 + z)
