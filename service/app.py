"""The FastAPI app: bundle → runtime → warm-up → ready; endpoints; one error shape; graceful drain.

Request path: validate (pydantic, service/protocol.py) → admit into the batcher (refuse cheaply when
overloaded) → tokenize in a thread pool → queue items and await the batcher → normalize and answer.
The whole path runs under the request deadline and is cancelled if the client disconnects, which
cancels the queued items so the batcher drops them before compute.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import math
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Awaitable

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from export.data import ASSISTANT_MARK, render_messages
from service.batcher import CANCEL_DEADLINE, Batcher, DeadlineExceeded, Draining, ModelError, Overloaded
from service.bundle import BundleError, Manifest, open_bundle
from service.encoding import Encoded, TextEncoder
from service.metrics import Metrics
from service.protocol import (BatchScoreRequest, BatchScoreResponse, CompareRequest, CompareResponse, ErrorResponse,
                              FieldError, ModelInfo, ModelList, NormalizationInfo, RankRequest, RankResponse,
                              ScoreRequest, ScoreResult, Status)
from service.runtime import Runtime, load_runtime
from service.settings import Settings

log = logging.getLogger("rewardserve.app")

TIMEOUT_HEADER = "x-request-timeout"
CLIENT_CLOSED = 499  # nginx's code for "client closed request"; nobody reads it, the metrics do


class ApiError(Exception):
    """An error answered as {"error": {"type", "message", "field"?}} with the given status."""

    def __init__(self, status: int, type_: str, message: str, field: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.type, self.message, self.field, self.headers = status, type_, message, field, headers


def error_body(type_: str, message: str, field: str | None = None) -> dict:
    error: dict[str, Any] = {"type": type_, "message": message}
    if field is not None:
        error["field"] = field
    return {"error": error}


def error_response(status: int, type_: str, message: str, field: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(type_, message, field), status_code=status, headers=headers)


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

    def __init__(self, settings: Settings):
        self.settings = settings
        self.metrics = Metrics()
        self.manifest: Manifest | None = None
        self.encoder: TextEncoder | None = None
        self.runtime: Runtime | None = None
        self.batcher: Batcher | None = None
        self.tokenizer_pool = ThreadPoolExecutor(settings.tokenizer_threads, thread_name_prefix="tokenize")
        self.ready = False
        self.draining = False  # set from the SIGTERM handler: plain attribute writes only
        self.api_keys: list[bytes] | None = None  # None: no authentication

    # ---- startup and shutdown

    async def start(self) -> None:
        s = self.settings
        if s.api_keys_file is not None:
            self.api_keys = read_api_keys(s.api_keys_file)
        try:
            self.manifest, self.encoder = open_bundle(s.bundle)
        except BundleError as exc:
            log.error("refusing to start: %s", exc)
            raise
        self.runtime = load_runtime(s.bundle, self.manifest, provider=s.provider,
                                    intra_op_threads=s.intra_op_threads, spinning=s.ort_spinning)
        if s.max_client_batch > s.max_queue:
            log.warning("max_client_batch %d > max_queue %d: the largest requests can never be admitted",
                        s.max_client_batch, s.max_queue)
        if s.max_batch_tokens < self.manifest.text.max_length:
            log.warning("max_batch_tokens %d < model max_length %d: the longest inputs will run alone",
                        s.max_batch_tokens, self.manifest.text.max_length)
        self.batcher = Batcher(self.runtime, self.encoder.pad, max_batch_size=s.max_batch_size,
                               max_batch_tokens=s.max_batch_tokens, max_wait_ms=s.max_wait_ms,
                               max_queue=s.max_queue, metrics=self.metrics)
        self.batcher.start()
        await self.warm_up()
        self.ready = True
        log.info("ready: model %s on %s", self.manifest.name, self.runtime.describe())

    async def warm_up(self) -> None:
        """One real batch (two lengths) before readiness: first-run allocations happen now, not on a client."""
        loop = asyncio.get_running_loop()
        encoded = await loop.run_in_executor(self.tokenizer_pool, self.encoder.encode,
                                             ["warm-up prompt", "a longer warm-up prompt " * 8], ["ok", "fine " * 8])
        raw = await self.batcher.run_direct(encoded)
        if not np.all(np.isfinite(raw)):
            raise RuntimeError(f"warm-up produced non-finite scores {raw.tolist()}")

    async def stop(self) -> None:
        self.ready = False
        self.draining = True
        if self.batcher is not None:
            await self.batcher.drain(self.settings.drain_timeout_s)
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
        for e, response, no_cut in zip(encoded, responses, strict):
            if e.truncated and no_cut:
                self.metrics.rejected.labels("too_long").inc()
                tail = response[-enc.char_limit:]
                alone = len(enc.tokenizer.encode(tail, add_special_tokens=False).ids)
                out.append(TooLong("response" if alone > enc.budget else "prompt"))
            else:
                out.append(e)
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
            # Admission first: an overloaded server refuses before spending CPU on tokenization.
            with self.batcher.admit(len(responses)) as ticket:
                items = await loop.run_in_executor(self.tokenizer_pool, self._tokenize, prompts, responses,
                                                   strict, shared_prompt)
                ok = [e for e in items if isinstance(e, Encoded)]
                raw = iter(await self.batcher.score(ticket, ok, deadline))
            return [item if isinstance(item, TooLong) else self.result(next(raw), item) for item in items]

        return await guarded(request, pipeline(), deadline)

    def result(self, raw: np.float32, encoded: Encoded) -> ScoreResult:
        norm = self.manifest.normalization
        raw = float(raw)
        return ScoreResult(score=float(norm.z_score(raw)), raw=raw, percentile=float(norm.percentile(raw)),
                           n_tokens=encoded.n_tokens, truncated=encoded.truncated, model=self.manifest.name)


def read_api_keys(path) -> list[bytes]:
    """Bearer keys, one per line ('#' comments and blank lines ignored); refuse to start on none."""
    try:
        lines = open(path, encoding="utf-8").read().splitlines()
    except OSError as exc:
        raise RuntimeError(f"api_keys_file {path}: {exc.strerror}") from None
    keys = [line.strip().encode() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not keys:
        raise RuntimeError(f"api_keys_file {path} holds no keys")
    return keys


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
        return task.result()
    if watcher in done:
        task.cancel()
        raise ClientGone()
    task.cancel(CANCEL_DEADLINE)  # the batcher counts its dropped items as deadline, not disconnect
    raise DeadlineExceeded("request deadline passed")


def resolve_pair(req: ScoreRequest) -> tuple[str, str, str]:
    """(prompt, response, field to blame when too long) for either request form."""
    if req.messages is None:
        return req.prompt, req.response, ""
    messages = [m.model_dump() for m in req.messages]
    # Same rendering as the trainer's chat-format reader (export/data.py: parse_record).
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


class AuthMiddleware:
    """Bearer-key check on the API routes (/v1/*); probes, metrics and the schema stay open."""

    def __init__(self, app, service: "Service"):
        self.app = app
        self.service = service

    async def __call__(self, scope, receive, send):
        keys = self.service.api_keys
        if scope["type"] == "http" and keys is not None and scope["path"].startswith("/v1/"):
            header = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, token = header.partition(b" ")
            # compare against every key, always, so timing does not tell which prefix matched
            matched = [hmac.compare_digest(token.strip(), key) for key in keys]
            if scheme.lower() != b"bearer" or not any(matched):
                return await error_response(401, "unauthorized", "missing or invalid API key (send "
                                            "'Authorization: Bearer <key>')",
                                            headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)
        await self.app(scope, receive, send)


class RequestMetricsMiddleware:
    def __init__(self, app, metrics: Metrics, routes: set[str]):
        self.app = app
        self.metrics = metrics
        self.routes = routes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        loop = asyncio.get_running_loop()
        started = loop.time()
        status = {"code": 500}

        async def recording_send(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            route = scope["path"] if scope["path"] in self.routes else "other"
            self.metrics.requests.labels(route, str(status["code"])).inc()
            self.metrics.request_seconds.labels(route).observe(loop.time() - started)


# ---- the app

def create_app(settings: Settings) -> FastAPI:
    service = Service(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await service.start()
        try:
            yield
        finally:
            await service.stop()

    app = FastAPI(title="rewardserve", version="0.1.0", lifespan=lifespan,
                  description="Reward-model scoring service. Errors: {\"error\": {\"type\", \"message\", \"field\"?}}.",
                  responses={422: {"model": ErrorResponse}, 503: {"model": ErrorResponse}})
    app.state.service = service
    s = settings
    retry = {"Retry-After": str(s.retry_after_s)}

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
        return error_response(500, "internal_error", "model run failed")

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        bad_json = next((e for e in errors if e.get("type") == "json_invalid"), None)
        if bad_json is not None:
            pos = bad_json["loc"][-1]
            reason = (bad_json.get("ctx") or {}).get("error", "JSON decode error")
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
        kinds = {400: "invalid_request", 404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}
        message = {404: f"no route {request.url.path}",
                   405: f"method {request.method} not allowed on {request.url.path}"}.get(exc.status_code, exc.detail)
        return error_response(exc.status_code, kinds.get(exc.status_code, "http_error"), str(message),
                              headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return error_response(500, "internal_error", "internal server error")

    # ---- scoring endpoints

    @app.post("/v1/score", response_model=ScoreResult)
    async def score(body: ScoreRequest, request: Request):
        prompt, response, messages_field = resolve_pair(body)
        [result] = await service.score(request, [prompt], [response], [not body.truncate])
        if isinstance(result, TooLong):
            raise ApiError(422, "validation_error", service.too_long_message(result.part),
                           _blame(messages_field, result.part))
        return result

    @app.post("/v1/score/batch", response_model=BatchScoreResponse, response_model_exclude_none=True)
    async def score_batch(body: BatchScoreRequest, request: Request):
        if not body.items:
            raise ApiError(422, "validation_error", "items: must hold at least one item", "items")
        if len(body.items) > s.max_client_batch:
            raise ApiError(422, "validation_error", f"items: at most {s.max_client_batch} items per request "
                           f"(got {len(body.items)}); split the batch", "items")
        results: list[Any] = [None] * len(body.items)
        valid: list[tuple[int, ScoreRequest]] = []
        for i, raw_item in enumerate(body.items):  # one bad item fails only itself
            try:
                valid.append((i, ScoreRequest.model_validate(raw_item)))
            except ValidationError as exc:
                field, message = describe_validation_errors(exc.errors(), prefix=f"items.{i}")
                if not isinstance(raw_item, dict):
                    field, message = f"items.{i}", f"items.{i}: must be a JSON object"
                results[i] = error_body("validation_error", message, field)
        if valid:
            pairs = [resolve_pair(req) for _, req in valid]
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

    @app.post("/v1/rank", response_model=RankResponse)
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

    @app.post("/v1/compare", response_model=CompareResponse)
    async def compare(body: CompareRequest, request: Request):
        a, b = await service.score(request, [body.prompt], [body.a, body.b], [not body.truncate] * 2,
                                   shared_prompt=True)
        for name, item in (("a", a), ("b", b)):
            if isinstance(item, TooLong):
                field = "prompt" if item.part == "prompt" else name
                raise ApiError(422, "validation_error", f"{field}: {service.too_long_message(item.part)}", field)
        return CompareResponse(probability=sigmoid(a.raw - b.raw), a=a, b=b)

    # ---- information and operations endpoints

    @app.get("/v1/models", response_model=ModelList)
    async def models():
        m = service.manifest
        return ModelList(data=[ModelInfo(
            id=m.name, base_model=m.base_model, created_at=m.created_at, model_format=m.model_format,
            precision=m.precision, pooling=m.pooling, max_length=m.text.max_length, join=m.text.join,
            normalization=NormalizationInfo(mean=m.normalization.mean, std=m.normalization.std,
                                            n=m.normalization.n, reference=m.normalization.reference),
            eval=m.eval, parity_passed=m.parity.passed, runtime=service.runtime.describe())])

    @app.get("/healthz", response_model=Status)
    async def healthz():
        return Status(status="ok")

    @app.get("/readyz", response_model=Status, responses={503: {"model": ErrorResponse}})
    async def readyz():
        if service.draining:
            return error_response(503, "draining", "server is shutting down", headers=retry)
        if not service.ready:
            return error_response(503, "not_ready", "model is loading", headers=retry)
        return Status(status="ready")

    @app.get("/metrics", include_in_schema=False)
    async def metrics():
        return Response(service.metrics.exposition(), media_type="text/plain; version=0.0.4; charset=utf-8")

    routes = {r.path for r in app.routes}
    # Added last = outermost: metrics see every answer, including the body limit's 413.
    app.add_middleware(BodyLimitMiddleware, max_bytes=s.max_body_bytes, metrics=service.metrics)
    app.add_middleware(AuthMiddleware, service=service)  # before reading any body
    app.add_middleware(RequestMetricsMiddleware, metrics=service.metrics, routes=routes)
    return app


def sigmoid(x: float) -> float:
    """Numerically stable logistic function."""
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    z = math.exp(x)
    return z / (1.0 + z)
