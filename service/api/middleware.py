"""ASGI middlewares: what must happen before a body is read, and what every answer carries.

Order (outermost first): RequestMetrics → Access (auth, then the admission gate) → BodyLimit → app.
Which routes need a key and which are gated is not written here: `route_policies` reads it from the
routes' own declarations (a `require_scope` dependency; a dependency on the scoring `Call`), so a new
route gets auth and admission by being declared like the others, never by its path.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from fastapi import FastAPI
from fastapi.routing import APIRoute

from service.api.auth import KeyRing
from service.api.errors import error_of, error_response
from service.batcher import Draining, Overloaded
from service.engine import Engine
from service.metrics import Metrics

GATE = "rewardserve.gate"  # ASGI scope key of a request's GatePass (read by the scoring Call dependency)
CALL = "rewardserve.call"  # ASGI scope key of a scoring request's Call (its `model` once the engine resolved it)


@dataclass(frozen=True)
class RoutePolicy:
    scope: str | None  # bearer scope the route requires (None: open)
    gated: frozenset[str]  # methods refused at the door when the server is full, draining or not ready


def route_policies(app: FastAPI, gated_dependency) -> dict[str, RoutePolicy]:
    """Path → policy, from each route's dependencies (recursively)."""

    def calls(dependant):
        for dep in dependant.dependencies:
            yield dep.call
            yield from calls(dep)

    out = {}
    for route in app.routes:
        if isinstance(route, APIRoute):
            deps = list(calls(route.dependant))
            scope = next((getattr(c, "required_scope") for c in deps if hasattr(c, "required_scope")), None)
            gated = frozenset(route.methods) if gated_dependency in deps else frozenset()
            out[route.path] = RoutePolicy(scope, gated)
    return out


class AccessMiddleware:
    """Before any body is read: the caller's key (401/403), then the admission gate (503/429 + Retry-After,
    or 503 draining / not_ready). In a burst only as many requests as the queue can take are parsed; the
    others are answered at once. A request let through holds one provisional queue slot (its item count is
    unknown until its body is parsed) until the engine admits its real items."""

    def __init__(self, app, engine: Engine, keyring: KeyRing, policies: dict[str, RoutePolicy]):
        self.app, self.engine, self.keyring, self.policies = app, engine, keyring, policies

    async def __call__(self, scope, receive, send):
        policy = self.policies.get(scope.get("path", "")) if scope["type"] == "http" else None
        if policy is None:
            return await self.app(scope, receive, send)
        if policy.scope is not None:
            refusal = self.keyring.refusal(dict(scope["headers"]).get(b"authorization"), policy.scope, scope["path"])
            if refusal is not None:
                return await error_of(refusal, self.engine.settings)(scope, receive, send)
        if scope["method"] not in policy.gated:
            return await self.app(scope, receive, send)
        try:
            gate = scope[GATE] = self.engine.gate()
        except (Draining, Overloaded) as exc:
            return await error_of(exc, self.engine.settings)(scope, receive, send)
        try:
            await self.app(scope, receive, send)
        finally:
            gate.release()


class _BodyTooLarge(Exception):
    pass


class BodyLimitMiddleware:
    """413 before parsing: refuse a declared Content-Length over the limit, and count streamed bytes. The
    limit is max_bytes, or the route's own in `route_limits` (the compat routes take RLHF batches)."""

    def __init__(self, app, max_bytes: int, metrics: Metrics, route_limits: dict[str, int] | None = None):
        self.app = app
        self.max_bytes = max_bytes
        self.metrics = metrics
        self.route_limits = route_limits or {}

    def limit_for(self, scope) -> int:
        return self.route_limits.get(scope.get("path", ""), self.max_bytes)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.limit_for(scope)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:
            if not length.isdigit():
                return await error_response(400, "invalid_request", "content-length: invalid Content-Length header; "
                                            "it must be one decimal number of bytes", "content-length")(
                    scope, receive, send)
            if int(length) > limit:
                return await self._too_large(scope, receive, send, limit)
        received = 0
        state = {"over": False, "started": False}

        async def counting_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
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
            await self._too_large(scope, receive, send, limit)

    async def _too_large(self, scope, receive, send, limit: int):
        self.metrics.rejected.labels("too_large").inc()
        await error_response(413, "payload_too_large", f"request body exceeds {limit} bytes")(
            scope, receive, send)


class RequestMetricsMiddleware:
    """Counts and times every answer; adds `Server-Timing: app;dur=<ms>` (time spent inside the server),
    and `Connection: close` while draining so that keep-alive clients reconnect elsewhere."""

    def __init__(self, app, engine: Engine, routes: set[str]):
        self.app = app
        self.engine = engine
        self.routes = routes

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
                if self.engine.draining:
                    headers.append((b"connection", b"close"))
                message = {**message, "headers": headers}
            await send(message)

        metrics = self.engine.metrics
        try:
            await self.app(scope, receive, recording_send)
        finally:
            route = scope["path"] if scope["path"] in self.routes else "other"
            metrics.requests.labels(route, str(status["code"])).inc()
            # per model (a repository): the model that served it; "none" for a request no model served
            # (refused at the door, an unknown model, a probe): a name only once resolved, so bounded
            call = scope.get(CALL)
            model = (getattr(call, "model", None) or "none",) if metrics.per_model else ()
            metrics.request_seconds.labels(route, *model).observe(time.perf_counter() - started)
