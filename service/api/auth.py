"""Bearer API keys: parsed once at startup, compared in constant time, required per route as a dependency.

A route needs a key when it declares `Security(RequireScope(keys, scope))` (the scoring and model
routers do when keys are configured; /metrics does with metrics_auth). That declaration is the only
source of truth: it puts the bearer scheme in OpenAPI, it checks the key inside the route, and the
access middleware (service/api/middleware.py) reads it from the route table to refuse an unknown caller
before its body is read.

401 `unauthorized`: no key, not the Bearer scheme, or an unknown key (who are you?).
403 `forbidden`: a known key without the route's scope (you may not do this).
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import Iterable

from fastapi import Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.api.errors import ApiError
from service.settings import Settings

# What a bearer key may do: "api" = the scoring and model routes, "metrics" = /metrics when metrics_auth is on,
# "admin" = /admin/reload (service/api/admin.py). A key listed without scopes gets DEFAULT_SCOPES: admin must be
# named, so an existing key file grants no new power.
SCOPES = ("api", "metrics", "admin")
DEFAULT_SCOPES = ("api", "metrics")


@dataclass(frozen=True)
class ApiKey:
    digest: bytes  # sha256 of the key: compared in constant time, whatever the length of what was sent
    scopes: frozenset[str]


def parse_api_keys(entries: Iterable[str], source: str) -> list[ApiKey]:
    """Entries 'KEY [SCOPE ...]' ('#' comments and blanks ignored); no scope given = DEFAULT_SCOPES."""
    keys = []
    for n, entry in enumerate(entries, 1):
        entry = entry.strip()
        if not entry or entry.startswith("#"):
            continue
        key, *scopes = entry.split()
        unknown = sorted(set(scopes) - set(SCOPES))
        if unknown:
            raise RuntimeError(f"{source} entry {n}: unknown scope {', '.join(unknown)} (scopes: {', '.join(SCOPES)})")
        keys.append(ApiKey(hashlib.sha256(key.encode()).digest(), frozenset(scopes or DEFAULT_SCOPES)))
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


def auth_configured(settings: Settings) -> bool:
    return settings.api_keys_file is not None or settings.api_keys is not None


def match_key(keys: list[ApiKey], token: bytes) -> ApiKey | None:
    """The key equal to `token`, comparing sha256 digests with every key, always (no early exit)."""
    digest = hashlib.sha256(token).digest()
    found = None
    for key in keys:
        equal = hmac.compare_digest(digest, key.digest)
        found = key if equal else found
    return found


class KeyRing:
    """The configured keys, read at startup (the app's lifespan), so a bad keys file stops the start."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.keys: list[ApiKey] = []

    def load(self) -> None:
        self.keys = load_api_keys(self.settings)

    def refusal(self, authorization: bytes | None, needed: str, path: str) -> ApiError | None:
        """The 401/403 for this Authorization header on a route needing `needed`, or None to let it pass."""
        scheme, _, token = (authorization or b"").partition(b" ")
        key = match_key(self.keys, token.strip()) if scheme.lower() == b"bearer" and token.strip() else None
        if key is None:
            reason = ("missing API key" if authorization is None else
                      "invalid API key" if scheme.lower() == b"bearer" else "API key not sent as a Bearer token")
            return ApiError(401, "unauthorized", f"{reason} (send 'Authorization: Bearer <key>')",
                            headers={"WWW-Authenticate": "Bearer"})
        if needed not in key.scopes:
            return ApiError(403, "forbidden", f"this API key may not use {path} (it lacks the '{needed}' scope)",
                            headers={"WWW-Authenticate": f'Bearer error="insufficient_scope", scope="{needed}"'})
        return None


_BEARER = HTTPBearer(scheme_name="bearer", auto_error=False)  # the OpenAPI security scheme


def require_scope(keyring: KeyRing, scope: str):
    """A route dependency: the caller's bearer key must hold `scope`. `required_scope` on it is what the
    access middleware reads from the route table to refuse before the body is read."""

    async def dependency(request: Request,
                         _credentials: HTTPAuthorizationCredentials | None = Security(_BEARER)) -> None:
        header = request.headers.get("authorization")
        refusal = keyring.refusal(header.encode("latin-1") if header is not None else None, scope,
                                  request.url.path)
        if refusal is not None:
            raise refusal

    dependency.required_scope = scope
    return Security(dependency)
