"""Prometheus metrics on a registry of their own (one per app, so tests can build many apps).

The names are a contract: the Helm HPA scales on `rewardserve_queue_depth`; the Grafana dashboard and
the alert rules (helm/rewardserve/files/) read the drift signals below (docs/monitoring.md).

Drift signals, observed once per served item (Engine._result), in calibrated units (z against the
bundle's reference set): `rewardserve_served_score` (histogram), `rewardserve_served_length_score`
(sum and count per response-length bucket), `rewardserve_served_out_of_calibration_total` (items above
the reference p99 / below p1) and `rewardserve_served_items_total`; per served response text,
`rewardserve_served_courtesy_closing_total` (observe_response: responses ending in "I hope this helps!"
and kin, the served side of the audit's courtesy probe). All carry a `client` label: "none"
unless `client_label_header` is set, then the header's value, capped at `client_label_max` values
("other" beyond, "none" when absent or not a plain token).

Sums of values that may be negative (z-scores, raw rewards) are exposed as two counters each,
`<name>_positive_sum_total` and `<name>_negative_sum_total` (SignedSum): the histograms' own `_sum` is
never exposed (prometheus_client drops it when the lowest bucket is negative), and a `_sum` that goes
down is misread by PromQL's rate() as a restart. Mean z over a window = (rate(positive) − rate(negative))
/ rate(`_count`).
"""

from __future__ import annotations

import re
from typing import Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Summary, generate_latest

from service.probes import ends_with_courtesy_closing

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
TOKEN_BUCKETS = (64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536)
RATIO_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)
SCORE_BUCKETS = (-10, -5, -3, -2, -1, -0.5, 0, 0.5, 1, 2, 3, 5, 10)
SHADOW_DIFF_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0)  # |dz| primary vs shadow
Z_BUCKETS = (-4, -3, -2.5, -2, -1.5, -1, -0.5, 0, 0.5, 1, 1.5, 2, 2.5, 3, 4)
UNCERTAINTY_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0)  # std of members' z, >= 0
# Response-length buckets (tokens of the response as sent, before any cut): label value, upper bound.
LENGTH_BUCKETS = (("0-63", 64), ("64-255", 256), ("256-1023", 1024), ("1024+", None))
NO_CLIENT, OTHER_CLIENT = "none", "other"
_CLIENT_VALUE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:/-]{0,63}")


class SignedSum:
    """The running sum of a value that may be negative, as two counters that only grow:
    `<name>_positive_sum_total` adds the positive values, `<name>_negative_sum_total` adds minus the
    negative ones, and the sum is their difference.

    Why not a histogram's or summary's own `_sum`: prometheus_client (Histogram._child_samples) leaves
    `_sum` out of a histogram whose lowest bucket is negative (OpenMetrics allows no `_sum` where
    observations can be negative), so `rewardserve_served_score_sum` never existed and the mean-score
    alert could not fire; and where a `_sum` is exposed but goes down (a summary of z-scores), PromQL's
    rate() takes every decrease for a process restart and adds the whole sum back. Counters that only
    grow rate() correctly, across restarts too, and rate(positive) − rate(negative) is the rate of the sum."""

    def __init__(self, name: str, what: str, labelnames: tuple[str, ...], registry: CollectorRegistry) -> None:
        self.positive = Counter(name + "_positive_sum", f"sum of the positive {what} (minus the negative sum: "
                                "the sum of all)", labelnames, registry=registry)
        self.negative = Counter(name + "_negative_sum", f"sum of minus the negative {what}, so never negative "
                                "(positive sum minus this: the sum of all)", labelnames, registry=registry)

    def add(self, value: float, *labelvalues: str) -> None:
        """Adds value to one counter and 0 to the other, so both series exist once anything was added."""
        positive, negative = ((self.positive.labels(*labelvalues), self.negative.labels(*labelvalues))
                              if labelvalues else (self.positive, self.negative))
        positive.inc(max(value, 0.0))
        negative.inc(max(-value, 0.0))


class SignedHistogram:
    """A histogram of values that may be negative, with their sum as a SignedSum under the same name
    (see SignedSum for why the histogram's `_sum` cannot carry it). `observe(value, *labelvalues)`."""

    def __init__(self, name: str, documentation: str, labelnames: tuple[str, ...], buckets: tuple[float, ...],
                 registry: CollectorRegistry, what: str) -> None:
        self.histogram = Histogram(name, documentation, labelnames, buckets=buckets, registry=registry)
        self.sum = SignedSum(name, what, labelnames, registry)

    def observe(self, value: float, *labelvalues: str) -> None:
        (self.histogram.labels(*labelvalues) if labelvalues else self.histogram).observe(value)
        self.sum.add(value, *labelvalues)


def length_bucket(tokens: int) -> str:
    for name, bound in LENGTH_BUCKETS:
        if bound is None or tokens < bound:
            return name
    raise AssertionError("unreachable")


class Metrics:
    def __init__(self, per_model: bool = False) -> None:
        """`per_model` (a model repository, service/registry.py): the series that differ by model carry a
        `model` label (the gauges also `version`: two versions of a canary each hold their own queue), and
        each model sees them through its ModelMetrics (for_model). Without it (one --bundle) every series
        keeps exactly the labels it had before the repository, so dashboards, rules and recorded series of
        one-bundle deployments are unchanged."""
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.per_model = per_model
        M = ["model"] if per_model else []  # noqa: N806 - the per-model label, prepended where it matters
        MV = ["model", "version"] if per_model else []  # noqa: N806 - gauges: one value per loaded version
        self.requests = Counter("rewardserve_requests", "HTTP requests answered", ["route", "status"], registry=r)
        self.request_seconds = Histogram("rewardserve_request_seconds", "HTTP request latency", ["route", *M],
                                         buckets=LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("rewardserve_queue_depth", "items admitted and waiting for a model run "
                                 "(queued or still being tokenized)", MV, registry=r)
        self.queue_wait = Histogram("rewardserve_queue_wait_seconds", "time an item waited in the queue before "
                                    "its model run started", M, buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("rewardserve_batch_size", "items per model run", M, buckets=SIZE_BUCKETS,
                                    registry=r)
        self.batch_tokens = Histogram("rewardserve_batch_tokens", "padded tokens per model run (longest × items)",
                                      M, buckets=TOKEN_BUCKETS, registry=r)
        self.padding_efficiency = Histogram("rewardserve_padding_efficiency", "real / padded tokens per model run",
                                            M, buckets=RATIO_BUCKETS, registry=r)
        self.model_run_seconds = Histogram("rewardserve_model_run_seconds", "duration of one model run (pad + "
                                           "forward)", M, buckets=LATENCY_BUCKETS, registry=r)
        self.rejected = Counter("rewardserve_rejected", "refusals and drops by reason: requests refused at the door "
                                "(queue_full, draining, too_large, would_miss_deadline), items refused or dropped "
                                "before compute (too_long, deadline, disconnected, error)", ["reason"], registry=r)
        # The batcher calls raw_score.observe(v): the histogram and its SignedSum, rewardserve_raw_score_*_sum_total.
        self.raw_score = SignedHistogram("rewardserve_raw_score", "raw rewards served", tuple(M), SCORE_BUCKETS, r,
                                         "raw rewards computed")
        self.cache_hits = Counter("rewardserve_cache_hits", "items answered without a model run: from the score "
                                  "cache, or an identical item earlier in the same request", M, registry=r)
        self.cache_misses = Counter("rewardserve_cache_misses", "distinct items sent to the model", M, registry=r)
        self.prompt_reuse_tokens = Counter("rewardserve_prompt_reuse_tokens", "prompt tokens not recomputed: "
                                           "best-of-N candidates scored on their shared prompt's cached keys/values "
                                           "(prompt length × (candidates − 1))", M, registry=r)
        self.cache_entries = Gauge("rewardserve_cache_entries", "entries held by the score cache", MV, registry=r)
        # ---- prefix sharing across requests and the prefix cache (service/prefix_cache.py, issue 21)
        self.prefix_tokens_computed = Counter("rewardserve_prefix_tokens_computed", "shared-prefix tokens run "
                                              "through the model (once per group, minus what the prefix cache "
                                              "held)", M, registry=r)
        self.prefix_tokens_reused = Counter("rewardserve_prefix_tokens_reused", "shared-prefix tokens not "
                                            "recomputed: from a batch-mate of the same group or from the prefix "
                                            "cache", M, registry=r)
        self.prefix_cache_hits = Counter("rewardserve_prefix_cache_hits", "shared-prefix runs that found "
                                         "keys/values in the prefix cache (confirmed on the token ids)", M, registry=r)
        self.prefix_cache_misses = Counter("rewardserve_prefix_cache_misses", "shared-prefix runs that found "
                                           "nothing in the prefix cache", M, registry=r)
        self.prefix_cache_bytes = Gauge("rewardserve_prefix_cache_bytes", "bytes of keys/values held by the "
                                        "prefix cache", MV, registry=r)
        self.prefix_cache_tokens = Gauge("rewardserve_prefix_cache_tokens", "tokens held by the prefix cache "
                                         "(bounded by prefix_cache_tokens)", MV, registry=r)
        # ---- ensembles (service/ensemble.py): the members' disagreement per served item, by ensemble name
        self.ensemble_uncertainty = Histogram("rewardserve_ensemble_uncertainty", "served ensemble items' "
                                              "uncertainty: the population std of the members' z-scores",
                                              ["model"], buckets=UNCERTAINTY_BUCKETS, registry=r)
        # ---- the model repository (service/registry.py, service/shadow.py; docs/deploy.md "model repository")
        self.model_loads = Counter("rewardserve_model_loads", "model versions loaded at start or by a reload "
                                   "(outcome loaded) or refused by verification and never served (outcome "
                                   "failed)", ["model", "outcome"], registry=r)
        self.routed = Counter("rewardserve_routed_requests", "scoring requests routed to a model version (the "
                              "canary split as served)", ["model", "version"], registry=r)
        self.shadow_abs_diff = Histogram("rewardserve_shadow_abs_diff", "|z_primary - z_shadow| per item scored "
                                         "on a model's shadow version (config.json shadow)", ["model"],
                                         buckets=SHADOW_DIFF_BUCKETS, registry=r)
        self.shadow_pairs = Counter("rewardserve_shadow_pairs", "pairs of items within one shadowed request "
                                    "(several items: rank, compare, batches)", ["model"], registry=r)
        self.shadow_flips = Counter("rewardserve_shadow_order_flips", "pairs of items within one shadowed "
                                    "request that the shadow version orders the other way", ["model"], registry=r)
        self.shadow_errors = Counter("rewardserve_shadow_errors", "shadow requests not compared: busy (too many "
                                     "in flight) or the exception's name", ["model", "reason"], registry=r)
        # ---- drift signals (docs/monitoring.md)
        self.served_score = SignedHistogram("rewardserve_served_score", "served scores in calibrated units (z "
                                            "against the bundle's reference set)", (*M, "client"), Z_BUCKETS, r,
                                            "served scores (z)")
        self.served_length_score = Summary("rewardserve_served_length_score", "served z-scores by response "
                                           "length in tokens (sum / count = the bucket's mean)",
                                           [*M, "length", "client"], registry=r)
        # The summary's _sum goes down with every negative z (rate() reads that as a restart): rules and
        # dashboards take the bucket's sum from these two counters instead (SignedSum).
        self.served_length_score_sum = SignedSum("rewardserve_served_length_score", "served scores (z) in this "
                                                 "response-length bucket", (*M, "length", "client"), r)
        self.out_of_calibration = Counter("rewardserve_served_out_of_calibration", "served items whose raw "
                                          "score lies beyond the reference set's p99 (side=above_p99) or p1 "
                                          "(side=below_p1)", [*M, "side", "client"], registry=r)
        self.served_items = Counter("rewardserve_served_items", "items answered with a score", [*M, "client"],
                                    registry=r)
        # The served counterpart of the audit's courtesy probe (service/probes.py): share of served responses
        # ending in a courtesy closing = this / rewardserve_served_items_total, by client (docs/monitoring.md).
        self.served_courtesy_closing = Counter("rewardserve_served_courtesy_closing", "served responses that "
                                               "end in a known courtesy closing (\"I hope this helps!\"; "
                                               "service/probes.py COURTESY_CLOSINGS)", ["client"], registry=r)
        self.served_courtesy_closing.labels(NO_CLIENT)
        # Turn forgery through control tokens (service/chat.py, issue 24): items whose content held a control
        # token's text (encoded as plain text) and templated texts whose response opened a new chat turn.
        self.special_token_in_content = Counter("rewardserve_special_token_in_content", "served items whose "
                                                "content (messages, /v1 prompt/response) held the text of a "
                                                "tokenizer control token, encoded as plain text", ["client"],
                                                registry=r)
        self.forged_turn = Counter("rewardserve_forged_turn", "served templated texts (compatibility routes) "
                                   "whose response opens a new chat turn with the template's control tokens",
                                   ["client"], registry=r)
        self.flag_counters = {"special_token_in_content": self.special_token_in_content,
                              "forged_turn": self.forged_turn}
        for counter in self.flag_counters.values():
            counter.labels(NO_CLIENT)
        self.clients: set[str] = set()
        if not per_model:  # (per model: when the model is loaded, ModelMetrics)
            self.zero_drift_series()

    def zero_drift_series(self, *model: str) -> None:
        """The drift series at zero from the start, not absent (`model`: its label value, when per_model)."""
        for child in (self.served_items, self.served_score.histogram):
            child.labels(*model, NO_CLIENT)
        self.served_score.sum.add(0.0, *model, NO_CLIENT)
        for name, _ in LENGTH_BUCKETS:
            self.served_length_score.labels(*model, name, NO_CLIENT)
            self.served_length_score_sum.add(0.0, *model, name, NO_CLIENT)
        for side in ("above_p99", "below_p1"):
            self.out_of_calibration.labels(*model, side, NO_CLIENT)

    def for_model(self, model: str, version: str) -> "Metrics | ModelMetrics":
        """What one loaded model version records into: itself without per_model, else a ModelMetrics."""
        return ModelMetrics(self, model, version) if self.per_model else self

    def client_label(self, value: str | None, max_clients: int) -> str:
        """The `client` label for a request's header value: the first `max_clients` distinct values get
        their own label, later ones "other"; absent or not a plain token (letters, digits, _.:/-, at most
        64 characters): "none"."""
        if value is None or not _CLIENT_VALUE.fullmatch(value.strip()):
            return NO_CLIENT
        value = value.strip()
        if value in self.clients:
            return value
        if value in (NO_CLIENT, OTHER_CLIENT) or len(self.clients) >= max_clients:
            return OTHER_CLIENT
        self.clients.add(value)
        return value

    def observe_served(self, z: float, response_tokens: int, above_p99: bool, below_p1: bool,
                       client: str = NO_CLIENT, *, flags: Sequence[str] = (), model: str | None = None) -> None:
        """`flags`: the result's flags; "special_token_in_content" and "forged_turn" are counted by client.
        `model`: the served model's name (the label value when per_model; ModelMetrics passes it)."""
        m = (model,) if self.per_model else ()
        self.served_items.labels(*m, client).inc()
        self.served_score.observe(z, *m, client)
        self.served_length_score.labels(*m, length_bucket(response_tokens), client).observe(z)
        self.served_length_score_sum.add(z, *m, length_bucket(response_tokens), client)
        if above_p99:
            self.out_of_calibration.labels(*m, "above_p99", client).inc()
        if below_p1:
            self.out_of_calibration.labels(*m, "below_p1", client).inc()
        for flag in flags:
            counter = self.flag_counters.get(flag)
            if counter is not None:
                counter.labels(client).inc()

    def observe_response(self, text: str, client: str = NO_CLIENT) -> None:
        """Counts a served response that ends in a courtesy closing (service.probes.ends_with_courtesy_closing,
        which reads only the text's last 200 characters). Called once per served item, next to observe_served."""
        if ends_with_courtesy_closing(text):
            self.served_courtesy_closing.labels(client).inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class ModelMetrics:
    """One model version's view of per-model metrics (a repository): the series that carry `model` (gauges:
    `model` and `version`) bound to it, so its batcher, caches and results record as they always did
    (metrics.queue_depth.set(n), metrics.raw_score.observe(v), ...); every other metric is the process's."""

    BY_MODEL = ("queue_wait", "batch_size", "batch_tokens", "padding_efficiency", "model_run_seconds", "cache_hits",
                "cache_misses", "prompt_reuse_tokens", "prefix_tokens_computed", "prefix_tokens_reused",
                "prefix_cache_hits", "prefix_cache_misses")
    BY_VERSION = ("queue_depth", "cache_entries", "prefix_cache_bytes", "prefix_cache_tokens")

    def __init__(self, metrics: Metrics, model: str, version: str):
        self._metrics, self.model, self.version = metrics, model, version
        for name in self.BY_MODEL:
            setattr(self, name, getattr(metrics, name).labels(model))
        for name in self.BY_VERSION:
            setattr(self, name, getattr(metrics, name).labels(model, version))
        self.raw_score = _BoundSigned(metrics.raw_score, model)
        metrics.zero_drift_series(model)

    def observe_served(self, *args, **kwargs) -> None:
        self._metrics.observe_served(*args, model=self.model, **kwargs)

    def close(self) -> None:
        """The version is unloaded: its gauges leave the exposition (a stale value would be summed)."""
        for name in self.BY_VERSION:
            getattr(self._metrics, name).remove(self.model, self.version)

    def __getattr__(self, name: str):
        return getattr(self._metrics, name)


class _BoundSigned:
    def __init__(self, histogram: SignedHistogram, model: str):
        self.histogram, self.model = histogram, model

    def observe(self, value: float) -> None:
        self.histogram.observe(value, self.model)
