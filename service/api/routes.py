"""The /v1 routes and the operations routes: parse the request, call the engine, shape the answer.

Routes see only the engine facade (service/engine.py) and the wire models (service/protocol.py). A route
that scores declares `call: Call = Depends(scoring_call)`: that declaration is also what gates it at the
door (service/api/middleware.py).
"""

from __future__ import annotations

import asyncio
import math
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import PlainTextResponse, Response
from pydantic import ValidationError

from service.api.errors import TIMEOUT_HEADER, ApiError, describe_validation_errors, error_body, error_of
from service.api.middleware import CALL, GATE
from service.api.openapi import RETRY_AFTER, error_doc
from service.batcher import Draining
from service.chat import ChatTemplateError
from service.engine import Call, Engine, Item, NotReady, TooLong, first_too_long
from service.protocol import (BatchScoreRequest, BatchScoreResponse, CompareRequest, CompareResponse, ModelList,
                              RankRequest, RankResponse, ScoreRequest, ScoreResult, Status)
from service.model_texts import ModelTexts


async def _disconnected(request: Request) -> None:
    # After the body is read, the server's receive() only returns once the client has gone.
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def scoring_call(request: Request) -> Call:
    """The request's deadline (server maximum, shortened by X-Request-Timeout), its disconnect watcher and
    the admission pass it got at the door."""
    settings = request.app.state.engine.settings
    timeout = settings.request_timeout_s
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
    deadline = asyncio.get_running_loop().time() + timeout
    header = settings.client_label_header
    client = request.app.state.engine.metrics.client_label(request.headers.get(header) if header else None,
                                                           settings.client_label_max)
    call = request.scope[CALL] = Call(deadline, lambda: _disconnected(request), request.scope.get(GATE), client)
    return call  # (in the scope too: the metrics middleware labels the latency with the model it was served by)


def item_of(req: ScoreRequest, texts: ModelTexts, prefix: str = "") -> Item:
    """A validated ScoreRequest → the engine's Item, with the fields to blame if it is too long; `texts`: the
    requested model's text handling (its chat template renders `messages`)."""
    def named(name: str) -> str:
        return f"{prefix}.{name}" if prefix else name

    if req.messages is None:
        refuse_control_tokens(texts, req.prompt, [req.response], named("prompt"), [named("response")])
        return Item(req.prompt, req.response, req.truncate, named("prompt"), named("response"))
    try:
        pair = texts.messages_to_pair([m.model_dump() for m in req.messages])
    except ChatTemplateError as exc:
        raise ApiError(422, "validation_error", f"{named('messages')}: {exc}", named("messages")) from None
    return Item(pair.prompt, pair.response, req.truncate, named("messages"), named("messages"))


def refuse_control_tokens(texts: ModelTexts, prompt: str, responses: list[str], prompt_field: str,
                          response_fields: list[str]) -> None:
    """special_tokens_in_content=refuse: a /v1 prompt or response holding a control token's text is a 422
    naming that field (by default it is read as plain text and flagged: service/chat.py)."""
    for response, field in zip(responses, response_fields):
        refused = texts.refusal(prompt, response)
        if refused is not None:
            part, why = refused
            name = prompt_field if part == "prompt" else field
            raise ApiError(422, "validation_error", f"{name}: {why}", name)


def add_v1_routes(app: FastAPI, engine: Engine, scoring_errors: dict, info_errors: dict, dependencies: list) -> None:
    """/v1/score, /v1/score/batch, /v1/rank, /v1/compare and /v1/models (under `dependencies`: auth)."""
    s = engine.settings
    scored = dict(response_model_exclude_none=True, responses=scoring_errors, dependencies=dependencies)

    @app.post("/v1/score", response_model=ScoreResult, **scored)
    async def score(body: ScoreRequest, call: Call = Depends(scoring_call)):
        item = item_of(body, engine.texts(body.model))
        [result] = first_too_long(await engine.score(call, [item], body.model), bare=True)
        return result

    @app.post("/v1/score/batch", response_model=BatchScoreResponse, **scored)
    async def score_batch(body: BatchScoreRequest, call: Call = Depends(scoring_call)):
        if not body.items:
            raise ApiError(422, "validation_error", "items: must hold at least one item", "items")
        if len(body.items) > s.max_client_batch:
            raise ApiError(422, "validation_error", f"items: at most {s.max_client_batch} items per request "
                           f"(got {len(body.items)}); split the batch", "items")
        texts = engine.texts(body.model)  # an unknown model: 404 before any item is looked at
        results: list[Any] = [None] * len(body.items)
        slots: list[int] = []
        items: list[Item] = []
        for i, raw_item in enumerate(body.items):  # one bad item fails only itself
            try:
                item = ScoreRequest.model_validate(raw_item)
                if item.model is not None:
                    raise ApiError(422, "validation_error", f"items.{i}.model: name the model once, in the "
                                   "batch's own `model` field", f"items.{i}.model")
                items.append(item_of(item, texts, f"items.{i}"))
                slots.append(i)
            except ValidationError as exc:
                field, message = describe_validation_errors(exc.errors(), prefix=f"items.{i}")
                if not isinstance(raw_item, dict):
                    field, message = f"items.{i}", f"items.{i}: must be a JSON object"
                results[i] = error_body("validation_error", message, field)
            except ApiError as exc:  # the chat template refused these messages
                results[i] = error_body(exc.type, exc.message, exc.field)
        if items:
            for i, result in zip(slots, await engine.score(call, items, body.model)):
                results[i] = (error_body("validation_error", result.message, result.field)
                              if isinstance(result, TooLong) else result)
        return {"results": results}

    @app.post("/v1/rank", response_model=RankResponse, **scored)
    async def rank(body: RankRequest, call: Call = Depends(scoring_call)):
        n = len(body.responses)
        if n > s.max_client_batch:
            raise ApiError(422, "validation_error", f"responses: at most {s.max_client_batch} per request "
                           f"(got {n})", "responses")
        fields = [f"responses.{i}" for i in range(n)]
        refuse_control_tokens(engine.texts(body.model), body.prompt, body.responses, "prompt", fields)
        items = [Item(body.prompt, r, body.truncate, "prompt", f) for r, f in zip(body.responses, fields)]
        results = first_too_long(await engine.score(call, items, body.model, shared_prompt=True))
        ranking = sorted(range(n), key=lambda i: -results[i].raw)  # stable: ties keep input order
        return RankResponse(results=results, ranking=ranking[: body.top_k] if body.top_k else ranking,
                            best_index=ranking[0])

    @app.post("/v1/compare", response_model=CompareResponse, **scored)
    async def compare(body: CompareRequest, call: Call = Depends(scoring_call)):
        refuse_control_tokens(engine.texts(body.model), body.prompt, [body.a, body.b], "prompt", ["a", "b"])
        return await engine.compare(call, body.model, body.prompt, body.a, body.b, body.truncate)

    @app.get("/v1/models", response_model=ModelList, responses=info_errors, dependencies=dependencies)
    async def models():
        """Every model and ensemble served, with its versions, state and traffic (the registry's view)."""
        return engine.describe()


def add_ops_routes(app: FastAPI, engine: Engine, metrics_errors: dict, metrics_dependencies: list) -> None:
    """Probes and metrics: open, except /metrics under metrics_auth."""

    @app.get("/healthz", response_model=Status)
    async def healthz():
        return Status(status="ok")

    @app.get("/readyz", response_model=Status,
                responses={503: error_doc("not_ready (loading, or the model hit a device error it cannot recover "
                                          "from: restart) or draining (shutting down)", RETRY_AFTER)})
    async def readyz():
        if engine.fatal:
            return error_of(NotReady(f"the model can no longer run ({engine.fatal}); restart the server"),
                            engine.settings)
        if engine.draining:
            return error_of(Draining("server is shutting down"), engine.settings)
        if not engine.ready:
            return error_of(NotReady("model is loading"), engine.settings)
        return Status(status="ready")

    @app.get("/metrics", response_class=PlainTextResponse, dependencies=metrics_dependencies,
                responses={200: {"description": "Prometheus text exposition format 0.0.4",
                                 "content": {"text/plain": {"schema": {"type": "string"}}}}, **metrics_errors})
    async def metrics():
        return Response(engine.metrics.exposition(), media_type="text/plain; version=0.0.4; charset=utf-8")
