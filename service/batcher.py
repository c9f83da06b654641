"""Dynamic batcher: the single owner of the queue and of the runtime (one model run at a time).

Why it exists: RLHF trainers send one (prompt, response) per HTTP request, thousands at once; running
them one by one wastes the model's batch parallelism. Requests are tokenized first (so the batcher
knows every item's length), then their items join one queue, and a single dispatcher task forms batches.

Policy (cf. text-embeddings-inference `queue.rs` / `infer.rs`):
  * admission: `admit(n)` reserves room for a request's n items *before* tokenization, so an overloaded
    server refuses cheaply (Overloaded → 503/429 + Retry-After) instead of tokenizing work it will drop;
  * dispatch: whenever the runtime is idle and the queue holds work, a batch is formed at once, so an
    item never waits for company at low load. While a run is in flight, arrivals accumulate, and the
    next batch is formed the moment the runtime frees up. The one exception, bounded by `max_wait_ms`
    (measured from the oldest queued item's arrival): if the batch is not full and more items were
    already admitted and are still being tokenized, the dispatcher lingers for them, since they are
    milliseconds away. A batch is full at `max_batch_size` items or when the queue holds more than fits;
  * grouping: a batch starts with the oldest item (so nothing starves) and is filled with queued
    items while the padded size (longest × items) stays within the token budget and real/padded
    tokens stay at or above `min_padding_efficiency`: the oldest that qualify when there is such a
    floor (it keeps lengths similar; age order keeps the latency tail short), else the nearest in
    length (similar lengths keep padding waste small). An item longer than the budget runs alone. The budget is `max_batch_tokens`,
    lowered to the runtime's `batch_hint` where the runtime runs larger batches slower (CPU: 512
    tokens); the efficiency floor comes from the same hint (CPU: 0.9, where a batch is no faster per
    token than single items, so padding is pure waste; GPU: none). Both can be given explicitly;
  * dropping: items whose request was cancelled (client gone) or whose deadline passed are removed
    before compute;
  * execution: the model runs in a dedicated single-thread executor, never on the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from service.admission import (CANCEL_DEADLINE, DeadlineExceeded, Draining, GatePass, ModelError,  # noqa: F401
                               Overloaded, Ticket, TooLarge, cancel_reason)
from service.encoding import Encoded, SharedPrefix
from service.metrics import Metrics
from service.model_run import device_error, forward
from service.batch_policy import leave_for_groups, select_batch, select_group, share_key
from service.runtime import Runtime, check_runtime

log = logging.getLogger("rewardserve.batcher")

@dataclass(eq=False)
class _Item:
    encoded: Encoded | SharedPrefix  # a SharedPrefix runs alone and resolves to all its items' rewards
    future: asyncio.Future
    deadline: float
    enqueued: float
    drop_reason: str = "disconnected"  # metrics label if its future gets cancelled
    share_key: tuple[int, ...] | None = None  # its first prompt_reuse_min_tokens ids, where it may share them

    @property
    def n_tokens(self) -> int:
        return self.encoded.n_tokens

    @property
    def n_items(self) -> int:
        return len(self.encoded.items) if isinstance(self.encoded, SharedPrefix) else 1


class Batcher:
    """The one owner of the queue state: provisional passes from the door, admitted items being tokenized,
    queued items, and whether admission is closed (draining)."""

    def __init__(self, runtime: Runtime | None, pad: Callable[[list[Encoded]], dict[str, np.ndarray]] | None, *,
                 max_batch_size: int = 64, max_batch_tokens: int = 16384, max_wait_ms: float = 5.0,
                 max_queue: int = 1024, metrics: Metrics | None = None,
                 efficient_batch_tokens: int | None = None, min_padding_efficiency: float | None = None,
                 max_queue_tokens: int | None = None):
        """`efficient_batch_tokens` / `min_padding_efficiency`: None takes them from `runtime.batch_hint`
        (none: no limit / 0); `efficient_batch_tokens=0` means no limit beyond `max_batch_tokens`. The runtime
        may also be given later, to `start` (the engine builds its queue before the model is loaded)."""
        self._limits = dict(max_batch_size=max_batch_size, max_batch_tokens=max_batch_tokens,
                            efficient_batch_tokens=efficient_batch_tokens,
                            min_padding_efficiency=min_padding_efficiency)
        self.runtime, self.pad = None, pad
        if runtime is not None:
            self._attach(runtime)
        self.max_wait = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self.max_queue_tokens = max_queue_tokens  # None: no token bound (unit tests of the grouping rule)
        self.metrics = metrics or Metrics()
        self._queue: list[_Item] = []
        self._queued_tokens = 0  # real tokens of the queued items (what the runtime still has to compute)
        self._queued_items = 0  # a SharedPrefix unit counts its items: depth and max_queue count items
        self.tokens_per_s: float | None = None  # measured real tokens per second of model time (moving average)
        self._passes = 0  # let in at the door, body not parsed yet (GatePass)
        self._incoming = 0  # admitted, still being tokenized
        self._wake = asyncio.Event()
        self.closing = False  # admission closed (draining); a plain attribute so a signal handler may set it
        self._abandoned = False  # the drain deadline passed: the dispatcher is gone, queued items were failed
        self.fatal: str | None = None  # a non-recoverable device error (device_error): why the model cannot run
        self._task: asyncio.Task | None = None
        self.prefix_cache = None  # service/prefix_cache.PrefixCache: prefix sharing across requests (share_prefixes)
        self._pad_token_id = 0
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model-run")

    def _attach(self, runtime: Runtime) -> None:
        """The runtime as the Runtime protocol sees it (check_runtime: a custom object missing a required member
        is refused here in one line; one that does not subclass Runtime gets the defaults)."""
        limits, self.runtime = self._limits, check_runtime(runtime)
        hint = self.runtime.batch_hint
        max_batch_size = limits["max_batch_size"]
        self.max_batch_size = min(max_batch_size, (hint.max_batch_size if hint is not None else None) or max_batch_size)
        efficient = limits["efficient_batch_tokens"]
        if efficient is None:
            efficient = (hint.max_batch_tokens if hint is not None else None) or 0
        floor = limits["min_padding_efficiency"]
        if floor is None:
            floor = hint.min_padding_efficiency if hint is not None else 0.0
        self.max_batch_tokens = min(limits["max_batch_tokens"], efficient) if efficient else limits["max_batch_tokens"]
        self.min_padding_efficiency = floor

    # ---- admission and submission (called by request handlers, on the event loop)

    @property
    def depth(self) -> int:
        return self._queued_items + self._incoming

    def estimated_wait(self, extra_tokens: int = 0) -> float | None:
        """Seconds until the queued tokens (plus `extra_tokens`) are computed, at the measured throughput;
        None before the first measured run."""
        return None if not self.tokens_per_s else (self._queued_tokens + extra_tokens) / self.tokens_per_s

    def gate(self, max_deadline_s: float | None = None) -> GatePass:
        """At the door, before a request's body is read (its item count unknown): one provisional slot, or
        Draining/Overloaded at once. In a burst only as many requests as the queue can take get parsed, and
        none once the work queued ahead would outlast even the longest deadline (`max_deadline_s`)."""
        if self.closing:
            self.metrics.rejected.labels("draining").inc()
            raise Draining("server is shutting down")
        waiting = self.depth + self._passes
        if waiting >= self.max_queue:
            self.metrics.rejected.labels("queue_full").inc()
            raise Overloaded(f"queue full ({waiting} of {self.max_queue} items waiting)")
        wait = self.estimated_wait()
        if max_deadline_s is not None and wait is not None and wait >= max_deadline_s:
            self.metrics.rejected.labels("would_miss_deadline").inc()
            raise Overloaded(f"the queued work takes about {wait:.0f} s, longer than any request may wait "
                             f"({max_deadline_s:g} s)", retry_after=wait - max_deadline_s)
        return GatePass(self)

    def admit(self, n: int, gate_pass: GatePass | None = None) -> Ticket:
        """Reserve room for n items or raise Overloaded/Draining/TooLarge; call before tokenizing. The door's
        provisional slot turns into the real item count in the same step (no await in between)."""
        if gate_pass is not None:
            gate_pass.release()
        if self.closing:
            self.metrics.rejected.labels("draining").inc()
            raise Draining("server is shutting down")
        if n > self.max_queue:
            self.metrics.rejected.labels("too_large").inc()
            raise TooLarge(f"request holds {n} items but the server queues at most {self.max_queue} (max_queue); "
                           "split it into smaller requests")
        if self.depth + n > self.max_queue:
            self.metrics.rejected.labels("queue_full").inc()
            raise Overloaded(f"queue full ({self.depth} of {self.max_queue} items waiting)")
        self._incoming += n
        self._update_depth()
        return Ticket(self, n)

    def share_prefixes(self, cache, pad_token_id: int) -> None:
        """Prefix sharing across requests on (service/batch_policy.py; the engine turns it on for a causal
        decoder), with `cache` (service/prefix_cache.PrefixCache) across batches."""
        self.prefix_cache, self._pad_token_id = cache, pad_token_id

    def _release(self, n: int) -> None:
        self._incoming -= n
        self._update_depth()
        self._wake.set()  # a lingering dispatcher may stop waiting for these items

    async def score(self, ticket: Ticket, encoded: Sequence[Encoded], deadline: float,
                    group: SharedPrefix | None = None) -> np.ndarray:
        """Queue the items of one request and wait for their raw rewards (float32, input order); `group`: the
        same items as one SharedPrefix unit, queued and run as one (its prompt computed once).

        `deadline` is on the event loop's clock. Cancelling the awaiting task (client disconnect)
        cancels the items, and the dispatcher drops them before compute."""
        if len(encoded) > ticket.n:
            raise ValueError(f"{len(encoded)} items but only {ticket.n} admitted")
        if not encoded:
            ticket.release()
            return np.zeros(0, dtype=np.float32)
        if self._abandoned:  # tokenized after the drain deadline: nothing will ever run these items
            ticket.release()
            self.metrics.rejected.labels("draining").inc(len(encoded))
            raise Draining("server shut down before this request ran")
        loop = asyncio.get_running_loop()
        now = loop.time()
        units = [group] if group is not None else encoded
        self._check_room(sum(e.n_tokens for e in units), deadline - now)
        cache = self.prefix_cache  # (an empty PrefixCache is falsy: it has a length)
        key = (lambda e: share_key(e, cache.min_tokens)) if cache is not None else (lambda e: None)
        items = [_Item(e, loop.create_future(), deadline, now, share_key=key(e)) for e in units]
        self._queue.extend(items)
        self._queued_tokens += sum(item.n_tokens for item in items)
        self._queued_items += len(encoded)
        ticket.release()  # now counted in the queue instead
        self._wake.set()
        try:
            raw = await asyncio.gather(*(i.future for i in items))
            return np.asarray(raw[0] if group is not None else raw, dtype=np.float32)
        except BaseException as exc:
            # The request went away (disconnect, deadline) or one of its items failed: drop the rest.
            if isinstance(exc, asyncio.CancelledError):
                reason = cancel_reason(exc)
            else:
                reason = "deadline" if isinstance(exc, DeadlineExceeded) else "error"
            for item in items:  # (gather has already cancelled them if the request was cancelled)
                if item.future.cancelled() or not item.future.done():
                    item.drop_reason = reason
                    item.future.cancel()
            raise

    def _check_room(self, tokens: int, remaining_s: float) -> None:
        """Admission by tokens, once a request is tokenized: its tokens must fit the queue's token bound, and
        the work queued ahead plus its own must be computable before its deadline (at the measured
        throughput). Refusals raise before anything is queued; the ticket's exit releases the items."""
        limit = self.max_queue_tokens
        if limit is not None and tokens > limit:
            self.metrics.rejected.labels("too_large").inc()
            raise TooLarge(f"request holds {tokens} tokens but the server queues at most {limit} "
                           "(max_queue_tokens); split it into smaller requests")
        if limit is not None and self._queued_tokens + tokens > limit:
            self.metrics.rejected.labels("queue_full").inc()
            wait = self.estimated_wait(tokens - limit)  # until enough of the queue has run
            raise Overloaded(f"queue full ({self._queued_tokens} of {limit} tokens waiting)", retry_after=wait)
        wait = self.estimated_wait(tokens)
        if wait is not None and wait > remaining_s:
            self.metrics.rejected.labels("would_miss_deadline").inc()
            raise Overloaded(f"the work queued ahead takes about {wait:.1f} s, longer than this request's "
                             f"deadline allows ({max(remaining_s, 0):.1f} s)", retry_after=wait - remaining_s)

    # ---- lifecycle

    def start(self, runtime: Runtime | None = None,
              pad: Callable[[list[Encoded]], dict[str, np.ndarray]] | None = None) -> None:
        if runtime is not None:
            self._attach(runtime)
        self.pad = pad or self.pad
        log.info("batching: up to %d items and %d padded tokens per run, padding efficiency >= %.2f",
                 self.max_batch_size, self.max_batch_tokens, self.min_padding_efficiency)
        self._task = asyncio.get_running_loop().create_task(self._dispatch_loop(), name="batcher")

    async def run_direct(self, encoded: Sequence[Encoded]) -> np.ndarray:
        """One model run outside the queue, on the same executor (used for warm-up)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._forward, list(encoded))

    async def drain(self, timeout: float) -> None:
        """Stop admitting, answer what is queued or admitted (up to `timeout` s), then stop. Past the timeout
        queued items are answered Draining, and so are items still being tokenized when they arrive."""
        self.closing = True
        self._wake.set()
        if self._abandoned:
            return
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), timeout)
            except asyncio.TimeoutError:
                log.error("drain timeout: %d queued items not answered", len(self._queue))
                self._abandoned = True
                self._task.cancel()
                for item in self._queue:
                    if not item.future.done():
                        item.future.set_exception(Draining("server shut down before this item ran"))
                self._queue.clear()
                self._queued_tokens = self._queued_items = 0
        self._executor.shutdown(wait=False)

    # ---- the dispatcher (the only code that removes items from the queue)

    async def _dispatch_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._drop_dead(loop.time())
            if not self._queue:
                if self.closing and self._incoming == 0:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            picked = self._select_group() if self.prefix_cache is not None else None
            batch, full, prefix = picked if picked is not None else (*self._select(), None)
            if not full and self._incoming and self.max_wait > 0:
                linger = self._queue[0].enqueued + self.max_wait - loop.time()
                if linger > 0:
                    self._wake.clear()
                    try:
                        await asyncio.wait_for(self._wake.wait(), linger)
                    except asyncio.TimeoutError:
                        pass
                    continue  # re-select with whatever arrived
            chosen = set(batch)
            self._queue = [item for item in self._queue if item not in chosen]
            self._queued_tokens -= sum(item.n_tokens for item in batch)
            self._queued_items -= sum(item.n_items for item in batch)
            self._update_depth()
            await self._execute(batch, prefix)

    def _select(self) -> tuple[list[_Item], bool]:
        """A plain batch (service/batch_policy.select_batch), leaving items that will run shared for their group."""
        return select_batch(self._queue, self.max_batch_size, self.max_batch_tokens, self.min_padding_efficiency,
                            leave_for_groups(self._queue, self.prefix_cache))  # leave: None unless sharing is on

    def _select_group(self) -> tuple[list[_Item], bool, int | None] | None:
        """(batch, full, shared prefix or None) when the oldest item may share its prompt, else None."""
        cache = self.prefix_cache
        picked = select_group(self._queue, cache.min_tokens, self._pad_token_id, self.max_batch_size,
                              self.max_batch_tokens)
        if picked is None:
            return None
        group, prefix = picked
        if len(group) > 1 or cache.covers(group[0].encoded.ids):
            return group, len(group) == self.max_batch_size or len(group) < len(self._queue), prefix
        if cache.budget_tokens == 0:
            return None
        batch, full = self._select()  # alone anyway: the shared path, which keeps its prompt in the cache
        return batch, full, (prefix if len(batch) == 1 else None)

    def _drop_dead(self, now: float) -> None:
        alive = []
        for item in self._queue:
            if item.future.cancelled():
                self.metrics.rejected.labels(item.drop_reason).inc()
            elif item.future.done():
                pass
            elif now >= item.deadline:
                item.future.set_exception(DeadlineExceeded("deadline passed while queued"))
                self.metrics.rejected.labels("deadline").inc()
            else:
                alive.append(item)
        if len(alive) != len(self._queue):
            self._queue = alive
            self._queued_tokens = sum(item.n_tokens for item in alive)
            self._queued_items = sum(item.n_items for item in alive)
            self._update_depth()

    async def _execute(self, batch: list[_Item], prefix: int | None = None) -> None:
        """`prefix`: the batch is a group of items of several requests that share their first `prefix` tokens
        (_select_group), run as one SharedPrefix (the runtime computes the prefix once)."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        m = self.metrics
        lengths = [item.n_tokens for item in batch]
        padded = max(lengths) * len(batch)
        for item in batch:
            m.queue_wait.observe(started - item.enqueued)
        m.batch_size.observe(len(batch))
        m.batch_tokens.observe(padded)
        m.padding_efficiency.observe(sum(lengths) / padded)
        t0 = time.perf_counter()
        try:
            work = ([SharedPrefix(tuple(item.encoded for item in batch), prefix)] if prefix is not None
                    else [item.encoded for item in batch])
            raw = await loop.run_in_executor(self._executor, self._forward, work)
        except asyncio.CancelledError:
            for item in batch:
                item.future.cancel()
            raise
        except Exception as exc:
            log.exception("model run failed for a batch of %d", len(batch))
            if device_error(exc) and self.fatal is None:
                self.fatal = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]}"
                log.critical("non-recoverable device error, not ready from now on: %s", self.fatal)
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(ModelError(f"model run failed: {exc}"))
            return
        finally:
            elapsed = time.perf_counter() - t0
            m.model_run_seconds.observe(elapsed)
        if elapsed > 0:  # what the wait estimate divides by: real tokens per second of model time
            rate = sum(lengths) / elapsed
            self.tokens_per_s = rate if self.tokens_per_s is None else 0.8 * self.tokens_per_s + 0.2 * rate
        group = isinstance(batch[0].encoded, SharedPrefix)
        if group and self.prefix_cache is None:  # else the runtime counts what it really reused (cache.record)
            m.prompt_reuse_tokens.inc(batch[0].encoded.prefix * (len(batch[0].encoded.items) - 1))
        for item, value in zip(batch, [raw] if group else raw):
            if not item.future.done():
                item.future.set_result(value if group else float(value))
                for v in np.atleast_1d(value):
                    m.raw_score.observe(float(v))

    def _forward(self, encoded: list[Encoded | SharedPrefix]) -> np.ndarray:
        """Pad and run, in the model thread (service/model_run.py: the OOM split, the shape check)."""
        return forward(self.runtime, self.pad, encoded, self.max_batch_tokens, self.prefix_cache)

    def _update_depth(self) -> None:
        self.metrics.queue_depth.set(self.depth)
