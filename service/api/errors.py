"""One error shape, one table: every exception kind the service raises → (status, error type).

Answers are {"error": {"type", "message", "field"?, "id"?}}. Routes and the engine raise typed errors;
only this module decides what a client sees (cf. text-embeddings-inference's `From<&ErrorType> for
StatusCode`). A 500 carries an id that is also logged with the cause.
"""

from __future__ import annotations

import logging
import math
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.batcher import DeadlineExceeded, Draining, ModelError, Overloaded, TooLarge
from service.engine import ClientGone, NotReady, TooLong, UnknownModel
from service.protocol import FieldError
from service.settings import Settings

log = logging.getLogger("rewardserve.api")

TIMEOUT_HEADER = "x-request-timeout"
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


def error_of(exc: Exception, settings: Settings) -> JSONResponse:
    """The table: an engine/admission exception → its answer. Retryable refusals carry Retry-After."""
    retry = {"Retry-After": str(settings.retry_after_s)}
    if isinstance(exc, ApiError):
        return error_response(exc.status, exc.type, exc.message, exc.field, exc.headers)
    if isinstance(exc, TooLong):
        return error_response(422, "validation_error", exc.message, exc.field)
    if isinstance(exc, UnknownModel):  # `model` names nothing served (404 model_not_found), or is needed: 422
        return error_response(exc.status, exc.type, str(exc), exc.field)
    if isinstance(exc, TooLarge):  # can never be admitted: not retryable, no Retry-After
        return error_response(413, "payload_too_large", str(exc))
    if isinstance(exc, Overloaded):  # Retry-After: the batcher's estimate of the wait where it has one
        if exc.retry_after is not None:
            retry = {"Retry-After": str(max(1, math.ceil(exc.retry_after)))}
        return error_response(settings.overload_status, "overloaded", f"{exc}; retry later", headers=retry)
    if isinstance(exc, NotReady):
        return error_response(503, "not_ready", str(exc), headers=retry)
    if isinstance(exc, Draining):
        return error_response(503, "draining", str(exc), headers=retry)
    if isinstance(exc, DeadlineExceeded):
        return error_response(504, "timeout", f"{exc} (timeout {settings.request_timeout_s:g} s or {TIMEOUT_HEADER})")
    if isinstance(exc, ClientGone):
        return Response(status_code=CLIENT_CLOSED)
    raise TypeError(f"no answer for {type(exc).__name__}")


ENGINE_ERRORS = (ApiError, TooLong, UnknownModel, TooLarge, Overloaded, Draining, DeadlineExceeded, ClientGone)


def install_handlers(app: FastAPI, settings: Settings) -> None:
    """Every exception a request can raise gets the one error shape."""

    async def engine_error(request: Request, exc: Exception):
        return error_of(exc, settings)

    for kind in ENGINE_ERRORS:
        app.add_exception_handler(kind, engine_error)

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
