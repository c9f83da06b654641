"""Locust scenarios for rewardserve: RLHF bulk scoring, best-of-N reranking, and the two mixed.

    locust -f loadtests/locustfile.py --headless -u 8 -r 8 -t 60s --host http://127.0.0.1:8000 \
        --csv runs/load/mixed RLHFScoring BestOfN          # mixed (3:1 users)
    ... RLHFScoring                                         # RLHF bulk scoring only
    ... BestOfN                                             # best-of-N reranking only

`loadtests/soak.py` drives these headless (capacity probe, then a constant-rate soak with RSS
sampling). Environment:
  LOCUST_RATE_PER_USER  requests/s per user (constant throughput); unset or 0: no wait (closed loop,
                        used to find capacity)
  LOCUST_API_KEY        sent as 'Authorization: Bearer <key>' when set

Every request carries a fresh nonce in its response text, so the server's score cache never answers
it (RLHF rollouts are unique too) and each request costs real tokenization and compute. A request
fails (and counts as an error) on any non-200 answer or a body without finite scores.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import random
import sys
from pathlib import Path

from locust import FastHttpUser, constant, constant_throughput, task

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from service.data import demo_data_path, read_pairs  # noqa: E402

PAIRS, _ = read_pairs(demo_data_path())
PROMPTS = [p.prompt for p in PAIRS]
RESPONSES = [r for p in PAIRS for r in (p.chosen, p.rejected)]
_nonce = itertools.count()

RATE = float(os.environ.get("LOCUST_RATE_PER_USER", "0") or 0)
HEADERS = {"Content-Type": "application/json"}
if os.environ.get("LOCUST_API_KEY"):
    HEADERS["Authorization"] = f"Bearer {os.environ['LOCUST_API_KEY']}"


def response_text() -> str:
    return f"{random.choice(RESPONSES)} (sample {next(_nonce)})"


def finite(*values) -> bool:
    return all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)


class _Base(FastHttpUser):
    abstract = True
    wait_time = constant_throughput(RATE) if RATE > 0 else constant(0)

    def post(self, path: str, body: dict, check) -> None:
        with self.client.post(path, data=json.dumps(body), headers=HEADERS, catch_response=True,
                              name=path) as r:
            if r.status_code != 200:
                r.failure(f"HTTP {r.status_code}: {r.text[:200]}")
                return
            try:
                ok = check(r.json())
            except (ValueError, KeyError, TypeError) as exc:
                ok = False
                r.failure(f"bad body: {exc!r}")
                return
            if not ok:
                r.failure(f"bad body: {r.text[:200]}")


class RLHFScoring(_Base):
    """A PPO/GRPO trainer scoring rollouts: mostly one pair per request, sometimes a batch of 16."""

    weight = 3

    @task(3)
    def score_one(self) -> None:
        self.post("/v1/score", {"prompt": random.choice(PROMPTS), "response": response_text()},
                  lambda b: finite(b["score"], b["raw"], b["percentile"]))

    @task(1)
    def score_batch(self) -> None:
        items = [{"prompt": random.choice(PROMPTS), "response": response_text()} for _ in range(16)]
        self.post("/v1/score/batch", {"items": items},
                  lambda b: len(b["results"]) == 16 and all(finite(x["raw"]) for x in b["results"]))


class BestOfN(_Base):
    """Best-of-N sampling: one prompt, 8 candidates, keep the best."""

    weight = 1

    @task
    def rank(self) -> None:
        candidates = [response_text() for _ in range(8)]
        self.post("/v1/rank", {"prompt": random.choice(PROMPTS), "responses": candidates, "top_k": 1},
                  lambda b: len(b["results"]) == 8 and 0 <= b["best_index"] < 8
                  and all(finite(x["raw"]) for x in b["results"]))
