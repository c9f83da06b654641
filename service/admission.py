"""The admission vocabulary shared by the batcher, the engine and the error table: why a request or an
item is refused or dropped (each maps to one answer in service/api/errors.py), and the two reservations
a request holds on the batcher's queue state (a GatePass from the door, a Ticket once its items are
admitted). The batcher (service/batcher.py) owns the counts; these only hold and return them.
"""

from __future__ import annotations

import asyncio

class Overloaded(RuntimeError):
    """The queue is full, or what is queued ahead would outlast this request's deadline; the client should
    retry later: after `retry_after` seconds when the batcher can estimate it."""

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class TooLarge(ValueError):
    """A request with more items than the whole queue holds: it can never be admitted, so retrying is futile."""


class Draining(RuntimeError):
    """The server is shutting down and admits no new work."""


class DeadlineExceeded(RuntimeError):
    """The item's deadline passed before a model run could start."""


class ModelError(RuntimeError):
    """The model run failed; every item of that batch gets this error."""


# The message a request task is cancelled with when its deadline passes (anything else: client gone).
CANCEL_DEADLINE = "deadline"


def cancel_reason(exc: BaseException | None) -> str:
    """Metrics label for items dropped because their request was cancelled."""
    return "deadline" if exc is not None and exc.args == (CANCEL_DEADLINE,) else "disconnected"


class GatePass:
    """One provisional queue slot, held from the door (before the body is read) until the request's real
    items are admitted; released when the request ends either way."""

    __slots__ = ("_batcher", "held")

    def __init__(self, batcher):  # service.batcher.Batcher
        self._batcher, self.held = batcher, True
        batcher._passes += 1

    def release(self) -> None:
        if self.held:
            self.held = False
            self._batcher._passes -= 1


class Ticket:
    """Room for n items reserved at admission; released when they are queued, or when the request ends."""

    def __init__(self, batcher, n: int):  # service.batcher.Batcher
        self._batcher = batcher
        self.n = n

    def release(self) -> None:
        if self.n:
            self._batcher._release(self.n)
            self.n = 0

    def __enter__(self) -> "Ticket":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        # Items still held here never reached the queue: a request cancelled while tokenizing is counted
        # as dropped just as the dispatcher counts queued ones, so the metric sees every lost item.
        if self.n and exc_type is not None and issubclass(exc_type, asyncio.CancelledError):
            self._batcher.metrics.rejected.labels(cancel_reason(exc)).inc(self.n)
        self.release()
