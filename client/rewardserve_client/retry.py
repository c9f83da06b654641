"""What the sync and async Python clients share: replicas, group affinity, the retry decision after each
attempt, history.

Group affinity (issue 21): GRPO/RLOO trainers score n samples of one prompt, and a decoder reward model
computes that prompt once only where the n samples meet on one replica (prefix sharing and its prompt
cache are per server). So a call that carries text goes first to the replica `replica_index` picks from
its leading characters, the same rule the verl reward function (rewardserve_client.verl) uses, and on
failure to the next replicas in list order; calls without text (models) keep the round-robin.

Kept apart from rewardserve_client/client.py (the API methods and the two ways of sending) so each file holds
one concept; the public names (RewardServeError, Attempt, parse_retry_after) are re-exported by the package.
"""

from __future__ import annotations

import collections
import email.utils
import hashlib
import itertools
import random
import threading
import time
from dataclasses import dataclass
from typing import Any, Sequence

import httpx

DEFAULT_BATCH = 256  # the server's default max_client_batch, used if /v1/models does not say
AFFINITY_CHARS = 256  # leading characters that pick a text's replica: a chat prompt's start, not the response
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


def replica_index(text: str, n_replicas: int, chars: int = AFFINITY_CHARS) -> int:
    """The replica (index into the URL list) of a text: sha256 of its first `chars` characters (UTF-8), as
    an unsigned big-endian integer, modulo the number of replicas. Stable across processes and machines
    (unlike hash()), so every trainer worker sends a group's samples to the same replica:
    `int(hashlib.sha256(text[:256].encode("utf-8")).hexdigest(), 16) % len(urls)`."""
    digest = hashlib.sha256(text[:chars].encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest, "big") % n_replicas


def affinity_text(item: dict) -> str:
    """The leading text a /v1 item is placed by: its prompt, or for a chat the contents of every message
    before the last (the response), joined in order."""
    if item.get("messages") is not None:
        return "".join(str(m.get("content", "")) for m in item["messages"][:-1] if isinstance(m, dict))
    return str(item.get("prompt") or "")


def in_order(n: int, slots: list[list[int]], parts: list[list | None]) -> list:
    """Per-request lists (part k answers the items at indices slots[k]) → one list in input order; a part
    that is None (a replica gave no warnings) fills its slots with []."""
    out: list = [None] * n
    for indices, part in zip(slots, parts):
        for i, value in zip(indices, part if part is not None else [[]] * len(indices)):
            out[i] = value
    return out


def reassemble(n: int, slots: list[list[int]], answers: list[dict]) -> dict:
    """Per-replica /get_reward answers → one answer in query order (every per-query list put back)."""
    if len(answers) == 1:
        return answers[0]

    def merged(parts: list[list | None]) -> list:
        return in_order(n, slots, parts)

    answer = {key: merged([a[key] for a in answers]) for key in ("rewards", "scores")}
    keys = [k for a in answers for k in a.get("extra_logs", {})]
    answer["extra_logs"] = {k: merged([a.get("extra_logs", {}).get(k) for a in answers]) for k in dict.fromkeys(keys)}
    if any(a.get("warnings") for a in answers):  # one list per query where any replica warned
        answer["warnings"] = merged([a.get("warnings") for a in answers])
    return answer


class _Replicas:
    """Round-robin over base URLs, or from a call's home replica on in list order (group affinity); a
    failed one sits out `cooldown` seconds (unless all have failed)."""

    def __init__(self, urls: Sequence[str], cooldown: float):
        if not urls:
            raise ValueError("give at least one base URL")
        self.urls = [u.rstrip("/") for u in urls]
        self.cooldown = cooldown
        self._down_until = {u: 0.0 for u in self.urls}
        self._counter = itertools.count()
        self._lock = threading.Lock()

    def pick(self, exclude: set[str], home: int | None = None) -> str | None:
        """The next replica not in `exclude`: without a `home`, round-robin over the healthy ones (so the
        load of a dead replica is shared by all the others); with one, the first healthy replica from
        `home` on in list order (a group keeps meeting on one replica, its fail-over replica when its own
        is down). A cooling-down one only when nothing else is left."""
        now = time.monotonic()
        order = self.urls if home is None else self.urls[home:] + self.urls[:home]
        candidates = [u for u in order if u not in exclude]
        healthy = [u for u in candidates if self._down_until[u] <= now]
        pool = healthy or candidates
        if not pool:
            return None
        if home is not None:
            return pool[0]
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
                 max_connections: int = 64, affinity: bool = True):
        """`affinity` (several replicas): a call goes to the replica of its leading text (replica_index),
        a batch is split by replica; False: every call round-robin, as before group affinity."""
        urls = [base_url] if isinstance(base_url, str) else list(base_url)
        self.replicas = _Replicas(urls, replica_cooldown_s)
        self.affinity = affinity
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

    def _home(self, text: str) -> int | None:
        """The replica a text's call goes to first; None (round-robin) with one replica or affinity off."""
        if not self.affinity or len(self.urls) == 1:
            return None
        return replica_index(text, len(self.urls))

    def _by_replica(self, texts: Sequence[str]) -> list[tuple[int | None, list[int]]]:
        """Item indices grouped by home replica (first-seen order), for splitting a batch call."""
        groups: dict[int | None, list[int]] = {}
        for i, text in enumerate(texts):
            groups.setdefault(self._home(text), []).append(i)
        return list(groups.items())

    def _next_attempt(self, state: dict) -> tuple[str, float]:
        """Where the next attempt of a call goes, and when it starts (time.monotonic())."""
        return self.replicas.pick(state["tried"], state.get("home")) or self.urls[0], time.monotonic()

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
