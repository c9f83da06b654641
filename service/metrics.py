"""Prometheus metrics on a registry of their own (one per app, so tests can build many apps).

The names are a contract: the Helm HPA scales on `rewardserve_queue_depth`.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
TOKEN_BUCKETS = (64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536)
RATIO_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)
SCORE_BUCKETS = (-10, -5, -3, -2, -1, -0.5, 0, 0.5, 1, 2, 3, 5, 10)


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
        self.cache_entries = Gauge("rewardserve_cache_entries", "entries held by the score cache", registry=r)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
