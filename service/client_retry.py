"""What the sync and async Python clients share: replicas, the retry decision after each attempt, history.

Kept apart from service/client.py (the API methods and the two ways of sending) so each file holds one
concept; the public names (RewardServeError, Attempt, parse_retry_after) are imported by service.client.
"""

from __future__ import annotations

import collections
import email.utils
import itertools
import random
import threading
import time
from dataclasses import dataclass
from typing import Any, Sequence

import httpx

DEFAULT_BATCH = 256  # the server's default max_client_batch, used if /v1/models does not say
RETRYABLE_OVERLOAD = (429, 503)


class RewardServeError(Exception):
    """A refusal the client does not retry (or the last one after retries ran out)."""

    def __init__(self, status: int | None, type_: str, message: str, field: str | None = None,
                 url: str | None = None):
        super().__init__(f"{status or 'no answer'} {type_}: {message}" + (f" ({url})" if url else ""))
        self.status, self.type, self.message, self.field, self.url = status, type_, message, field, url


@dataclass
class Attempt:
    """One HTTP attempt, kept in `client.history` (the last 1000) for logs and tests."""

    url: str
    path: str
    status: int | None  # None: no HTTP answer (connection error, timeout)
    error: str | None
    started: float  # time.monotonic()
    slept_after: float = 0.0  # seconds slept before the next attempt


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Retry-After as seconds: delta-seconds or an HTTP date; None if absent or unreadable."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def _error_of(response: httpx.Response) -> tuple[str, str, str | None]:
    try:
        error = response.json()["error"]
        return error.get("type", "http_error"), error.get("message", response.text), error.get("field")
    except (ValueError, KeyError, TypeError):
        return "http_error", response.text[:500], None


class _Replicas:
    """Round-robin over base URLs; a failed one sits out `cooldown` seconds (unless all have failed)."""

    def __init__(self, urls: Sequence[str], cooldown: float):
        if not urls:
            raise ValueError("give at least one base URL")
        self.urls = [u.rstrip("/") for u in urls]
        self.cooldown = cooldown
        self._down_until = {u: 0.0 for u in self.urls}
        self._counter = itertools.count()
        self._lock = threading.Lock()

    def pick(self, exclude: set[str]) -> str | None:
        """The next replica not in `exclude`, round-robin over the healthy ones (so the load of a dead
        replica is shared by all the others); a cooling-down one only when nothing else is left."""
        now = time.monotonic()
        candidates = [u for u in self.urls if u not in exclude]
        healthy = [u for u in candidates if self._down_until[u] <= now]
        pool = healthy or candidates
        if not pool:
            return None
        with self._lock:
            return pool[next(self._counter) % len(pool)]

    def untried(self, exclude: set[str]) -> bool:
        return any(u not in exclude for u in self.urls)

    def mark_down(self, url: str) -> None:
        self._down_until[url] = time.monotonic() + self.cooldown

    def mark_up(self, url: str) -> None:
        self._down_until[url] = 0.0


class _Base:
    """What both clients share: settings, replicas, history, and what to do after each HTTP attempt."""

    def __init__(self, base_url: str | Sequence[str], *, api_key: str | None = None, timeout: float = 60.0,
                 max_retries: int = 5, backoff_s: float = 0.5, max_backoff_s: float = 30.0,
                 replica_cooldown_s: float = 5.0, batch_size: int | None = None, concurrency: int = 4,
                 max_connections: int = 64):
        urls = [base_url] if isinstance(base_url, str) else list(base_url)
        self.replicas = _Replicas(urls, replica_cooldown_s)
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.batch_size = batch_size
        self.concurrency = max(1, concurrency)
        self.headers = {"X-Request-Timeout": f"{timeout:g}"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        self.limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
        self._http_timeout = httpx.Timeout(self.timeout, connect=min(10.0, self.timeout))
        self.history: collections.deque[Attempt] = collections.deque(maxlen=1000)
        self.answered: collections.Counter[str] = collections.Counter()  # 2xx answers per replica

    @property
    def urls(self) -> list[str]:
        return self.replicas.urls

    def _backoff(self, failures: int) -> float:
        return min(self.max_backoff_s, self.backoff_s * 2 ** max(0, failures - 1)) * random.uniform(0.5, 1.0)

    def _next_attempt(self, state: dict) -> tuple[str, float]:
        """Where the next attempt of a call goes, and when it starts (time.monotonic())."""
        return self.replicas.pick(state["tried"]) or self.urls[0], time.monotonic()

    def _plan(self, state: dict, url: str, path: str, started: float, response: httpx.Response | None,
              exc: Exception | None) -> tuple[str, Any]:
        """One attempt's outcome → ("done", json) | ("retry", seconds to sleep) | raise RewardServeError."""
        attempt = Attempt(url, path, response.status_code if response is not None else None,
                          f"{type(exc).__name__}: {exc}" if exc is not None else None, started)
        self.history.append(attempt)
        if response is not None and response.status_code < 300:
            self.replicas.mark_up(url)
            self.answered[url] += 1
            return "done", response.json()
        state["tried"].add(url)
        status = response.status_code if response is not None else None
        if response is not None:
            type_, message, field = _error_of(response)
        else:
            type_, message, field = "connection_error", str(exc) or type(exc).__name__, None
        overloaded = status in RETRYABLE_OVERLOAD and type_ in ("overloaded", "http_error")
        if status is not None and status < 500 and not overloaded:
            raise RewardServeError(status, type_, message, field, url)  # the request itself is wrong
        if not overloaded:  # no answer, 5xx, draining / not_ready: this replica is unwell, try another
            self.replicas.mark_down(url)
        state["attempts"] += 1
        if state["attempts"] > self.max_retries:
            raise RewardServeError(status, type_, f"{message} (gave up after {state['attempts']} attempts)",
                                   field, url)
        if self.replicas.untried(state["tried"]):
            return "retry", 0.0  # another replica has not been tried this round: go there now
        # every replica tried: wait as the server asked, or back off, then start a new round
        state["tried"] = set()
        asked = parse_retry_after(response.headers.get("retry-after")) if response is not None else None
        state["failures"] += 1
        delay = min(asked, self.max_backoff_s) if asked is not None else self._backoff(state["failures"])
        attempt.slept_after = delay
        return "retry", delay

    def _chunks(self, items: list[dict], size: int) -> list[list[dict]]:
        return [items[i:i + size] for i in range(0, len(items), size)]
