"""Shadow scoring: a model's `config.json {"shadow": "2"}` scores every request on version 2 as well, never
returns it, and records how far it disagrees with the answer (issue 26, docs/deploy.md "model repository").

Why a separate path: the shadow must never delay or fail the answer. It starts only after the answer is
computed, in a background task with its own deadline (request_timeout_s) and no client to lose; its
failures are counted (`rewardserve_shadow_errors_total{model, reason}`), never raised; at most
SHADOW_MAX_IN_FLIGHT shadow requests run at once (beyond, a request is not shadowed: reason "busy"), so a
burst cannot queue unbounded shadow work in front of real requests. Its drift metrics carry client="shadow"
(they are not served scores).

What is recorded, per model: `rewardserve_shadow_abs_diff` (histogram of |z_primary − z_shadow| per item:
z is comparable across versions, raw is not), and for requests of several items (rank, compare, batches)
`rewardserve_shadow_pairs_total` and `rewardserve_shadow_order_flips_total` (pairs of items the shadow
orders the other way: what a best-of-n pick or a PPO advantage would feel). A request with an item
|Δz| >= DISAGREEMENT_Z or a flipped pair gets one log line, at most one per model per second.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import Sequence

import numpy as np

from service.metrics import Metrics
from service.model_table import Loaded
from service.protocol import ScoreResult

log = logging.getLogger("rewardserve.shadow")

SHADOW_MAX_IN_FLIGHT = 64  # shadow requests running at once per process
DISAGREEMENT_Z = 0.5  # |z_primary − z_shadow| at which a shadowed request is worth a log line
DISAGREEMENT_LOG_EVERY_S = 1.0  # at most one disagreement log line per model per this many seconds


class Shadowing:
    """The shadow requests of one registry: admission (`take`), scoring and recording (`run`)."""

    def __init__(self, metrics: Metrics, timeout_s: float):
        self.metrics, self.timeout_s = metrics, timeout_s
        self.in_flight = 0
        self._last_log: dict[str, float] = {}

    def take(self, name: str, shadow: Loaded | None, serving: Loaded) -> Loaded | None:
        """The shadow to run for a request routed to `serving`, leased now (before any await), or None."""
        if shadow is None or shadow is serving:
            return None
        if self.in_flight >= SHADOW_MAX_IN_FLIGHT:
            self.metrics.shadow_errors.labels(name, "busy").inc()
            return None
        shadow.acquire()
        self.in_flight += 1
        return shadow

    def give_back(self, shadow: Loaded) -> None:
        shadow.release()
        self.in_flight -= 1

    async def run(self, name: str, version: str, shadow: Loaded, call, items: Sequence, shared_prompt: bool,
                  primary: list) -> None:
        """Score the answered items on the shadow version and record the disagreement. Never raises (but
        lets a cancellation through); gives the lease back."""
        try:
            slots = [i for i, r in enumerate(primary) if isinstance(r, ScoreResult)]
            if not slots:
                return
            quiet = dataclasses.replace(call, deadline=asyncio.get_running_loop().time() + self.timeout_s,
                                        disconnected=_never, gate_pass=None, client="shadow")
            shadowed = await asyncio.wait_for(shadow.scorer.score(quiet, [items[i] for i in slots], shared_prompt),
                                              self.timeout_s)
            pairs = [(primary[i], s) for i, s in zip(slots, shadowed) if isinstance(s, ScoreResult)]
            if pairs:
                self.record(name, version, shadow.scorer.version, pairs)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - a shadow failure is counted, never seen by a client
            self.metrics.shadow_errors.labels(name, type(exc).__name__).inc()
        finally:
            self.give_back(shadow)

    def record(self, name: str, version: str, shadow_version: str, pairs: list) -> None:
        z = np.array([[a.score, b.score] for a, b in pairs], dtype=np.float64)
        diff = np.abs(z[:, 0] - z[:, 1])
        for d in diff:
            self.metrics.shadow_abs_diff.labels(name).observe(float(d))
        n, flips = len(pairs), 0
        if n > 1:
            order = [np.sign(z[:, k][:, None] - z[:, k][None, :]) for k in (0, 1)]
            flips = int(np.triu(order[0] * order[1] < 0, 1).sum())
            self.metrics.shadow_pairs.labels(name).inc(n * (n - 1) // 2)
            self.metrics.shadow_flips.labels(name).inc(flips)
        now = time.monotonic()
        if (diff.max() >= DISAGREEMENT_Z or flips) and now - self._last_log.get(name, -1e9) >= DISAGREEMENT_LOG_EVERY_S:
            self._last_log[name] = now
            log.warning("shadow disagreement: model %s version %s vs shadow version %s: max |dz| %.3f over %d "
                        "items, %d of %d pairs ordered the other way", name, version, shadow_version,
                        float(diff.max()), n, flips, n * (n - 1) // 2)


async def _never() -> None:
    """A shadow request has no client to lose: its disconnect watcher never fires."""
    await asyncio.Event().wait()
