"""The OpenAPI contract: what the pydantic models and route declarations cannot know by themselves.

Every error status a route can answer (the fuzz test holds the server to this list), and the limits that
come from the settings. The bearer scheme and each route's `security` come from the routes' own
`require_scope` dependencies (service/api/auth.py), not from here.
"""

from __future__ import annotations

from typing import Any

from service.compat_protocol import TOKEN_ID_DESCRIPTION
from service.protocol import ErrorResponse
from service.settings import Settings

RETRY_AFTER = {"Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "integer",
                                                                                            "minimum": 0}}}


def error_doc(description: str, headers: dict | None = None) -> dict:
    out: dict[str, Any] = {"model": ErrorResponse, "description": description}
    if headers:
        out["headers"] = headers
    return out


def documented_errors(settings: Settings, auth: bool, scoring: bool = False) -> dict[int, dict]:
    """Every error status a route can answer, for `responses=`."""
    out: dict[int, dict] = {}
    if auth:
        out[401] = error_doc("unauthorized: no API key, not a Bearer token, or an unknown key",
                             {"WWW-Authenticate": {"schema": {"type": "string"}}})
        out[403] = error_doc("forbidden: the API key lacks this route's scope")
    if scoring:
        out[400] = error_doc("invalid_json: the body is not valid UTF-8 JSON; invalid_request: a bad Content-Length "
                             "or X-Request-Timeout header")
        out[413] = error_doc("payload_too_large: body over max_body_bytes (max_compat_body_bytes on the compatibility "
                             "routes), refused before it is parsed, or more "
                             "items than the queue can ever hold (max_queue; not retryable)")
        out[404] = error_doc("model_not_found: `model` names no model or ensemble this server serves; the message "
                             "lists those it does (field `model`)")
        out[415] = error_doc("unsupported_media_type: body not sent as application/json")
        out[422] = error_doc("validation_error: a field is missing, of the wrong type, unknown, empty, not valid "
                             "Unicode, or over a limit; `field` names it (`model`: several models are served, "
                             "none is the default, and the request names none)")
        if settings.overload_status == 429:
            out[429] = error_doc("overloaded: the queue is full", RETRY_AFTER)
        out[500] = error_doc("internal_error: the model run failed; `id` (and X-Error-Id) names it in the server log",
                             {"X-Error-Id": {"schema": {"type": "string"}}})
        out[503] = error_doc("overloaded (queue full), draining (shutting down) or not_ready", RETRY_AFTER)
        out[504] = error_doc("timeout: the request deadline passed before its items ran")
    return out


def refine_openapi(schema: dict, settings: Settings, vocab_size: int | None = None) -> dict:
    """Limits that come from the settings and the bundle (token ids below its vocabulary size), and the
    batch items' any-value rule."""
    models = schema["components"]["schemas"]
    items = models["BatchScoreRequest"]["properties"]["items"]
    items.update(minItems=1, maxItems=settings.max_client_batch)
    items["items"] = {"anyOf": [{"$ref": "#/components/schemas/ScoreRequest"},  # (pydantic inlines it)
                                {"description": "any other value: answered by an error object in its slot "
                                 "while the other items are scored"}]}
    models["RankRequest"]["properties"]["responses"]["maxItems"] = settings.max_client_batch
    if vocab_size is not None:
        schema.update(_bound_token_ids({k: schema[k] for k in ("paths", "components") if k in schema},
                                       vocab_size - 1))
    return schema


def _bound_token_ids(node, maximum: int):
    """The token-id schemas (marked by their description) get the bundle's vocabulary as `maximum`."""
    if isinstance(node, dict):
        out = {k: _bound_token_ids(v, maximum) for k, v in node.items()}
        if out.get("description") == TOKEN_ID_DESCRIPTION and out.get("type") == "integer":
            out["maximum"] = maximum
        return out
    if isinstance(node, list):
        return [_bound_token_ids(v, maximum) for v in node]
    return node

