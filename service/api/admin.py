"""Operator routes: `POST /admin/reload` rescans the model repository and hot-swaps what changed
(service/registry.py Registry.reload; docs/deploy.md "model repository").

Access: a bearer key with the `admin` scope. A key listed without scopes does not get it (it gets the
default scopes, api and metrics), so an existing key file grants no new power. Without any configured key
the route answers 403 `forbidden`, saying that an admin key must be configured: an open reload would let
anyone who can reach the port make the server load whatever sits in the repository directory, and a 403
tells the operator why instead of a 404 that looks like an old build.
"""

from __future__ import annotations

from fastapi import FastAPI

from service.api.auth import KeyRing, require_scope
from service.api.errors import ApiError
from service.engine import Engine, ReloadUnavailable


def add_admin_routes(app: FastAPI, engine: Engine, keyring: KeyRing, auth: bool) -> None:
    """/admin/reload, under the `admin` scope when keys are configured, refused (403) when none are."""
    dependencies = [require_scope(keyring, "admin")] if auth else []

    @app.post("/admin/reload", dependencies=dependencies, responses={
        200: {"description": "the rescan's outcome: models (name -> version serving), loaded, unloaded "
                             "(versions swapped out, stopped once their requests finish), failed (name -> why)"},
        401: {"description": "unauthorized: no or unknown bearer key"},
        403: {"description": "forbidden: the key lacks the admin scope, or no keys are configured"},
        409: {"description": "conflict: a custom runtime (create_app(runtime=...)) cannot be reloaded"}})
    async def reload() -> dict:
        if not auth:
            raise ApiError(403, "forbidden", "/admin/reload needs a bearer key with the 'admin' scope and this "
                           "server has no API keys configured (REWARDSERVE_API_KEYS or api_keys_file, e.g. "
                           "'KEY admin'); or reload by polling: repository_poll_s")
        try:
            return await engine.reload()
        except ReloadUnavailable as exc:
            raise ApiError(409, "conflict", str(exc)) from None
