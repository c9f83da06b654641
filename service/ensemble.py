"""Ensembles: several served models scoring the same text, their z-scores combined, their disagreement
reported as uncertainty (issue 26; docs/api.md, Ensembles).

Why z units: members trained separately have unrelated raw scales (a raw 2.0 may be high for one and low
for another); each member's z-score against its own reference set puts them on one scale before they are
combined. The aggregates (z: the members' z-scores of one response, in `spec.members` order):

    mean      mean(z)
    min       min(z)                         worst case (Coste et al., ICLR 2024)
    uwo       mean(z) − λ·var(z)             uncertainty-weighted, population variance
    weighted  Σ wᵢ zᵢ / Σ wᵢ                 members trained for different objectives
    gate      z_gate if z_gate < below else z_else     the Llama 2 safety gate

`uncertainty` = the population standard deviation of the members' z. At start the ensemble scores the
reference pairs stored in its members' bundles through the members themselves: the 99th percentile of the
uncertainty there is the `high_uncertainty` threshold, and the aggregate's distribution there is what
`percentile` (and the calibration flags) of an ensemble answer are measured against.

Members with different tokenizers (a BERT and a decoder) work: each member tokenizes the text itself and
only scores are combined; `n_tokens` of an ensemble answer is the largest of the members', `truncated` is
whether any member cut the text.

This module holds no model and owns no queue: the members are ServedModels owned by the registry, and an
ensemble request is one request to each member's batcher, all at once.
"""

from __future__ import annotations

import asyncio
import math
from pathlib import Path
from typing import Sequence

import numpy as np

from service.admission import Overloaded
from service.data import read_pairs
from service.metrics import Metrics
from service.parity import REFERENCE_FILE
from service.protocol import EnsembleInfo, ScoreResult
from service.repository import EnsembleSpec
from service.served_model import Call, Item, NotReady, ServedModel, TooLong, sigmoid

MAX_REFERENCE_PAIRS = 256       # per member bundle (the startup precision check reads as many)
REFERENCE_CHUNK = 64            # items per internal request while scoring the reference set
REFERENCE_DEADLINE_S = 600.0    # the internal requests' deadline: generous, a load is not a client
REFERENCE_CLIENT = "ensemble-reference"  # the drift metrics' client label of the reference scoring
CALIBRATION_FLAGS = ("above_calibration_p99", "below_calibration_p1")
HIGH_UNCERTAINTY = "high_uncertainty"


# ---- the aggregation math (pure, vectorised: arrays of shape (members, items))

def aggregate(values: np.ndarray, spec: EnsembleSpec, z: np.ndarray | None = None) -> np.ndarray:
    """The ensemble's value per item from the members' `values` (rows in spec.members order). `z` (default:
    `values`) are the members' z-scores, which decide the gate: the raw aggregate of a gate ensemble is the
    raw reward of the member the z rule chose, so `raw` and `score` always come from the same member."""
    values = np.asarray(values, dtype=np.float64)
    z = values if z is None else np.asarray(z, dtype=np.float64)
    kind = spec.aggregate
    if kind == "mean":
        return values.mean(axis=0)
    if kind == "min":
        return values.min(axis=0)
    if kind == "uwo":
        return values.mean(axis=0) - spec.lam * values.var(axis=0)
    if kind == "weighted":
        w = np.array([spec.weights[m] for m in spec.members], dtype=np.float64)
        return (w[:, None] * values).sum(axis=0) / w.sum()
    if kind == "gate":
        g, o = spec.members.index(spec.gate), spec.members.index(spec.otherwise)
        return np.where(z[g] < spec.below, values[g], values[o])
    raise ValueError(f"unknown aggregate {kind!r}")


def uncertainty(z: np.ndarray) -> np.ndarray:
    """Population standard deviation of the members' z-scores, per item."""
    return np.asarray(z, dtype=np.float64).std(axis=0)


def percentile_rank(values: np.ndarray | float, reference: np.ndarray) -> np.ndarray | float:
    """Percentile rank (0..100) within a distribution given by its 101 percentiles (as Normalization does)."""
    return np.interp(values, reference, np.arange(len(reference), dtype=np.float64))


def member_probability(raw_a: np.ndarray, raw_b: np.ndarray, temperatures: np.ndarray) -> float:
    """P(a preferred over b) of an ensemble: the mean over members of each member's own Bradley-Terry
    probability σ((raw_a − raw_b) / T) (T its fitted temperature). Averaging calibrated probabilities keeps
    the answer a probability each member stands behind, and is 0.5 when the members cancel out."""
    diff = (np.asarray(raw_a, dtype=np.float64) - np.asarray(raw_b, dtype=np.float64)) / temperatures
    return float(np.mean([sigmoid(float(d)) for d in diff]))


# ---- the served ensemble

class EnsembleModel:
    """The same scoring surface as ServedModel (score, probability, info, ready, in_flight, ...), so the
    registry and the engine treat both alike."""

    def __init__(self, spec: EnsembleSpec, members: dict[str, ServedModel], metrics: Metrics):
        if spec.error is not None:
            raise ValueError(f"ensemble {spec.name}: {spec.error}")
        missing = [m for m in spec.members if m not in members]
        if missing:
            raise ValueError(f"ensemble {spec.name}: no served model for member {', '.join(missing)}")
        self.spec, self.metrics, self.name = spec, metrics, spec.name
        self.members = [members[m] for m in spec.members]  # in spec order: the rows of every array here
        self.version = ",".join(f"{m}@{members[m].version}" for m in spec.members)
        self.reference: np.ndarray | None = None  # the aggregate's 101 percentiles on the reference set
        self.uncertainty_p99: float | None = None
        self.reference_responses = 0
        self.ready = False
        self.closing = False
        self.in_flight = 0

    def __repr__(self) -> str:
        return f"EnsembleModel({self.name}: {self.version})"

    # ---- lifecycle

    async def start(self) -> None:
        """Score the members' bundles' reference pairs through the members (started already): the
        uncertainty p99 and the aggregate's reference distribution. Raises when that cannot be done."""
        items = await asyncio.to_thread(self._reference_items)
        if not items:
            raise ValueError(f"ensemble {self.name}: no member bundle holds reference pairs ({REFERENCE_FILE})")
        loop = asyncio.get_running_loop()
        call = Call(deadline=loop.time() + REFERENCE_DEADLINE_S, disconnected=_never, client=REFERENCE_CLIENT)
        rows = await asyncio.gather(*(self._score_reference(m, items, call) for m in self.members))
        z = np.array([[r.score for r in row] for row in rows])
        self.reference = np.percentile(aggregate(z, self.spec), np.arange(101))
        self.uncertainty_p99 = float(np.percentile(uncertainty(z), 99))
        self.reference_responses = len(items)
        self.ready = True

    def _reference_items(self) -> list[Item]:
        """Every member bundle's first MAX_REFERENCE_PAIRS reference pairs, chosen and rejected, each distinct
        (prompt, response) once (members trained on the same data share their reference set)."""
        seen: dict[tuple[str, str], None] = {}
        for member in self.members:
            path = Path(member.bundle) / REFERENCE_FILE
            if not path.is_file():
                continue
            pairs, _ = read_pairs(path)
            for p in pairs[:MAX_REFERENCE_PAIRS]:
                seen.setdefault((p.prompt, p.chosen))
                seen.setdefault((p.prompt, p.rejected))
        return [Item(prompt, response) for prompt, response in seen]

    async def _score_reference(self, member: ServedModel, items: list[Item], call: Call) -> list[ScoreResult]:
        """One member on the whole reference set, in chunks its queue admits; a full queue (the member is
        serving traffic during a reload) is waited out until the deadline."""
        loop = asyncio.get_running_loop()
        out: list[ScoreResult] = []
        step = min(REFERENCE_CHUNK, member.settings.max_queue)
        for i in range(0, len(items), step):
            while True:
                try:
                    out += await member.score(call, items[i:i + step])
                    break
                except Overloaded:
                    if loop.time() > call.deadline:
                        raise
                    await asyncio.sleep(0.05)
        return out

    @property
    def queue_depth(self) -> int:
        return sum(m.queue_depth for m in self.members)

    @property
    def fatal(self) -> str | None:
        """A member that can no longer run makes the ensemble unable to run too."""
        return next((f"member {m.name}: {m.fatal}" for m in self.members if m.fatal), None)

    def begin_drain(self) -> None:
        """Refuse new requests; the members (owned by the registry) drain themselves."""
        self.closing = True

    async def stop(self, timeout: float) -> None:
        """Nothing to free: the members are stopped by whoever owns them (the registry)."""
        self.ready = False
        self.begin_drain()

    # ---- scoring

    async def score(self, call: Call, items: Sequence[Item], shared_prompt: bool = False,
                    whole: bool = False) -> list[ScoreResult | TooLong]:
        """Every member scores the items, all members at once; an item too long for any member (with
        truncation off) is that member's TooLong in its slot (`whole`: raised, as a member raises it)."""
        if self.fatal:
            raise NotReady(f"ensemble {self.name} can no longer run ({self.fatal})")
        if not self.ready or self.closing:
            raise NotReady(f"ensemble {self.name} is not ready")
        self.in_flight += 1
        try:
            rows = await _all(m.score(call, items, shared_prompt, whole) for m in self.members)
        finally:
            self.in_flight -= 1
        return self.combine(rows)

    def combine(self, rows: list[list[ScoreResult | TooLong]]) -> list[ScoreResult | TooLong]:
        """The members' results (one row per member, spec order) → the ensemble's, per item."""
        n = len(rows[0])
        ok = [j for j in range(n) if not any(isinstance(row[j], TooLong) for row in rows)]
        out: list[ScoreResult | TooLong] = [next((row[j] for row in rows if isinstance(row[j], TooLong)), None)
                                            for j in range(n)]
        if not ok:
            return out
        z = np.array([[row[j].score for j in ok] for row in rows])
        raw = np.array([[row[j].raw for j in ok] for row in rows])
        score, combined_raw, spread = aggregate(z, self.spec), aggregate(raw, self.spec, z), uncertainty(z)
        percentile = percentile_rank(score, self.reference)
        names = self.spec.members
        for k, j in enumerate(ok):
            parts = [row[j] for row in rows]
            out[j] = result = ScoreResult(
                score=float(score[k]), raw=float(combined_raw[k]), percentile=float(percentile[k]),
                n_tokens=max(p.n_tokens for p in parts), truncated=any(p.truncated for p in parts),
                model=self.name, version=self.version, warnings=_union(p.warnings for p in parts),
                flags=self._flags(float(score[k]), float(spread[k]), parts),
                members={m: float(z[i, k]) for i, m in enumerate(names)}, uncertainty=float(spread[k]))
            result._member_raw = {m: float(raw[i, k]) for i, m in enumerate(names)}
            self.metrics.ensemble_uncertainty.labels(self.name).observe(float(spread[k]))
        return out

    def _flags(self, score: float, spread: float, parts: list[ScoreResult]) -> list[str] | None:
        """Calibration flags against the ensemble's own reference distribution (a member's own are about
        that member's scale), high_uncertainty above the reference p99, and the members' other flags."""
        flags = ["above_calibration_p99"] if score > self.reference[99] else \
            ["below_calibration_p1"] if score < self.reference[1] else []
        if spread > self.uncertainty_p99:
            flags.append(HIGH_UNCERTAINTY)
        others = _union([f for f in (p.flags or []) if f not in CALIBRATION_FLAGS] for p in parts) or []
        return flags + others or None

    def probability(self, a: ScoreResult, b: ScoreResult) -> float:
        """P(a preferred over b): the mean over members of σ((raw_a − raw_b) / T_member) (member_probability).
        Both results must come from this ensemble's score() (they carry the members' raw rewards)."""
        if a._member_raw is None or b._member_raw is None:
            raise ValueError(f"ensemble {self.name}: probability() needs results scored by this ensemble")
        names = self.spec.members
        return member_probability(np.array([a._member_raw[m] for m in names]),
                                  np.array([b._member_raw[m] for m in names]),
                                  np.array([m.temperature for m in self.members], dtype=np.float64))

    # ---- what the routes may know

    def texts(self):
        """Text handling for the compatibility routes: the first member's. A templated text is split into its
        (prompt, response) by that member's chat format; each member then renders the pair its own way."""
        return self.members[0].texts()

    def info(self) -> EnsembleInfo:
        s = self.spec
        parameters = {"uwo": {"lambda": s.lam}, "weighted": {"weights": s.weights},
                      "gate": {"gate": s.gate, "below": s.below, "else": s.otherwise}}.get(s.aggregate, {})
        p99 = self.uncertainty_p99
        return EnsembleInfo(id=self.name, version=self.version, members={m.name: m.version for m in self.members},
                            aggregate=s.aggregate, parameters=parameters, reference_responses=self.reference_responses,
                            uncertainty_p99=p99 if p99 is not None and math.isfinite(p99) else 0.0)


async def _never() -> None:
    """The internal reference call's client never leaves."""
    await asyncio.Event().wait()


async def _all(coroutines) -> list:
    """Await all at once; on the first failure cancel the rest (a refused member must not leave the others'
    items queued for an answer nobody reads) and raise it."""
    tasks = [asyncio.ensure_future(c) for c in coroutines]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


def _union(lists) -> list[str] | None:
    """The distinct strings of several optional lists, in first-seen order (None when there are none)."""
    seen: dict[str, None] = {}
    for items in lists:
        for item in items or ():
            seen.setdefault(item)
    return list(seen) or None
