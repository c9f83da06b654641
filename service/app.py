"""`create_app`: wiring only. The engine (service/engine.py) does the work; service/api/ speaks HTTP.

Request path: RequestMetrics → Access (auth, admission gate) → BodyLimit → route (service/api/routes.py,
service/api/compat.py) → Engine.score → registry → the model's batcher → runtime; errors become answers in
service/api/errors.py.
"""

from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import FastAPI

from service.api.admin import add_admin_routes
from service.api.auth import KeyRing, auth_configured, require_scope
from service.api.compat import COMPAT_PATHS, add_compat_routes
from service.api.errors import install_handlers
from service.api.middleware import AccessMiddleware, BodyLimitMiddleware, RequestMetricsMiddleware, route_policies
from service.api.openapi import documented_errors, refine_openapi
from service.api.routes import add_ops_routes, add_v1_routes, scoring_call
from service.engine import Engine
from service.runtime import Runtime
from service.settings import Settings

DESCRIPTION = ("Reward-model scoring service. Errors: {\"error\": {\"type\", \"message\", \"field\"?, \"id\"?}}. "
               "Scoring requests may carry `X-Request-Timeout: <seconds>` to shorten their deadline (capped by the "
               "server's request_timeout_s); past it they are answered 504.")


def create_app(settings: Settings, runtime: Runtime | None = None) -> FastAPI:
    """The app; the models load in its lifespan. `runtime`: serve this already-built runtime instead of
    loading the bundle's (a custom backend implementing service.runtime.Runtime; with --bundle only: it
    becomes that one model's runtime, checked by service.runtime.check_runtime at startup)."""
    engine = Engine(settings, runtime)
    keyring = KeyRing(settings)
    auth = auth_configured(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if auth:
            keyring.load()
        await engine.start()
        try:
            yield
        finally:
            await engine.stop()

    app = FastAPI(title="rewardserve", version="0.1.0", lifespan=lifespan, description=DESCRIPTION)
    app.state.engine = engine
    install_handlers(app, settings)

    api_auth = [require_scope(keyring, "api")] if auth else []
    metrics_auth = [require_scope(keyring, "metrics")] if auth and settings.metrics_auth else []
    scoring_errors = documented_errors(settings, auth, scoring=True)
    add_v1_routes(app, engine, scoring_errors, documented_errors(settings, auth), api_auth)
    add_compat_routes(app, engine, scoring_errors, api_auth)
    add_ops_routes(app, engine, documented_errors(settings, bool(metrics_auth)), metrics_auth)
    add_admin_routes(app, engine, keyring, auth)

    # Added last = outermost: metrics see every answer, including the access middleware's and the body limit's.
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes, metrics=engine.metrics,
                       route_limits={path: settings.max_compat_body_bytes for path in COMPAT_PATHS})
    app.add_middleware(AccessMiddleware, engine=engine, keyring=keyring,
                       policies=route_policies(app, scoring_call))
    app.add_middleware(RequestMetricsMiddleware, engine=engine, routes={r.path for r in app.routes})

    base_openapi = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            app.openapi_schema = refine_openapi(base_openapi(), settings, engine.vocab_size())
        return app.openapi_schema

    app.openapi = openapi
    return app
