"""Prometheus metrics on a registry of their own (one per app, so tests can build many apps).

The names are a contract: the Helm HPA scales on `rewardserve_queue_depth`; the Grafana dashboard and
the alert rules (helm/rewardserve/files/) read the drift signals below (docs/monitoring.md).

Drift signals, observed once per served item (Engine._result), in calibrated units (z against the
bundle's reference set): `rewardserve_served_score` (histogram), `rewardserve_served_length_score`
(sum and count per response-length bucket), `rewardserve_served_out_of_calibration_total` (items above
the reference p99 / below p1) and `rewardserve_served_items_total`. All carry a `client` label: "none"
unless `client_label_header` is set, then the header's value, capped at `client_label_max` values
("other" beyond, "none" when absent or not a plain token).
"""

from __future__ import annotations

import re

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Summary, generate_latest

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
TOKEN_BUCKETS = (64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536)
RATIO_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)
SCORE_BUCKETS = (-10, -5, -3, -2, -1, -0.5, 0, 0.5, 1, 2, 3, 5, 10)
Z_BUCKETS = (-4, -3, -2.5, -2, -1.5, -1, -0.5, 0, 0.5, 1, 1.5, 2, 2.5, 3, 4)
# Response-length buckets (tokens of the response as sent, before any cut): label value, upper bound.
LENGTH_BUCKETS = (("0-63", 64), ("64-255", 256), ("256-1023", 1024), ("1024+", None))
NO_CLIENT, OTHER_CLIENT = "none", "other"
_CLIENT_VALUE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:/-]{0,63}")


def length_bucket(tokens: int) -> str:
    for name, bound in LENGTH_BUCKETS:
        if bound is None or tokens < bound:
            return name
    raise AssertionError("unreachable")


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("rewardserve_requests", "HTTP requests answered", ["route", "status"], registry=r)
        self.request_seconds = Histogram("rewardserve_request_seconds", "HTTP request latency", ["route"],
                                         buckets=LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("rewardserve_queue_depth", "items admitted and waiting for a model run "
                                 "(queued or still being tokenized)", registry=r)
        self.queue_wait = Histogram("rewardserve_queue_wait_seconds", "time an item waited in the queue before "
                                    "its model run started", buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("rewardserve_batch_size", "items per model run", buckets=SIZE_BUCKETS,
                                    registry=r)
        self.batch_tokens = Histogram("rewardserve_batch_tokens", "padded tokens per model run (longest × items)",
                                      buckets=TOKEN_BUCKETS, registry=r)
        self.padding_efficiency = Histogram("rewardserve_padding_efficiency", "real / padded tokens per model run",
                                            buckets=RATIO_BUCKETS, registry=r)
        self.model_run_seconds = Histogram("rewardserve_model_run_seconds", "duration of one model run (pad + "
                                           "forward)", buckets=LATENCY_BUCKETS, registry=r)
        self.rejected = Counter("rewardserve_rejected", "refusals and drops by reason: requests refused at the door "
                                "(queue_full, draining, too_large, would_miss_deadline), items refused or dropped "
                                "before compute (too_long, deadline, disconnected, error)", ["reason"], registry=r)
        self.raw_score = Histogram("rewardserve_raw_score", "raw rewards served", buckets=SCORE_BUCKETS, registry=r)
        self.cache_hits = Counter("rewardserve_cache_hits", "items answered without a model run: from the score "
                                  "cache, or an identical item earlier in the same request", registry=r)
        self.cache_misses = Counter("rewardserve_cache_misses", "distinct items sent to the model", registry=r)
        self.prompt_reuse_tokens = Counter("rewardserve_prompt_reuse_tokens", "prompt tokens not recomputed: "
                                           "best-of-N candidates scored on their shared prompt's cached keys/values "
                                           "(prompt length × (candidates − 1))", registry=r)
        self.cache_entries = Gauge("rewardserve_cache_entries", "entries held by the score cache", registry=r)
        # ---- drift signals (docs/monitoring.md)
        self.served_score = Histogram("rewardserve_served_score", "served scores in calibrated units (z against "
                                      "the bundle's reference set)", ["client"], buckets=Z_BUCKETS, registry=r)
        self.served_length_score = Summary("rewardserve_served_length_score", "served z-scores by response "
                                           "length in tokens (sum / count = the bucket's mean)",
                                           ["length", "client"], registry=r)
        self.out_of_calibration = Counter("rewardserve_served_out_of_calibration", "served items whose raw "
                                          "score lies beyond the reference set's p99 (side=above_p99) or p1 "
                                          "(side=below_p1)", ["side", "client"], registry=r)
        self.served_items = Counter("rewardserve_served_items", "items answered with a score", ["client"],
                                    registry=r)
        self.clients: set[str] = set()
        for child in (self.served_items, self.served_score):  # zero series from the start, not absent ones
            child.labels(NO_CLIENT)
        for name, _ in LENGTH_BUCKETS:
            self.served_length_score.labels(name, NO_CLIENT)
        for side in ("above_p99", "below_p1"):
            self.out_of_calibration.labels(side, NO_CLIENT)

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
                       client: str = NO_CLIENT) -> None:
        self.served_items.labels(client).inc()
        self.served_score.labels(client).observe(z)
        self.served_length_score.labels(length_bucket(response_tokens), client).observe(z)
        if above_p99:
            self.out_of_calibration.labels("above_p99", client).inc()
        if below_p1:
            self.out_of_calibration.labels("below_p1", client).inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
