"""bench/grpo_burst.py --smoke end to end: a tiny bf16 Qwen2-shaped decoder bundle built and imported by the
script, two real servers (prefix sharing on / off), per-sample /get_reward and /classify requests in both
arrival orders. The ≈15 M numbers are in docs/benchmarks.md; here only what must hold at any size: every
reward comes back, sharing changes no reward, and the "on" server really shared prefixes."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.helpers import REPO

TOL = 1e-4


def test_grpo_burst_bench_smoke_runs_end_to_end(tmp_path):
    out = tmp_path / "grpo.json"
    r = subprocess.run([sys.executable, "bench/grpo_burst.py", "--smoke", "--threads", "1", "--workdir",
                        str(tmp_path / "work"), "--out", str(out)], cwd=REPO, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    report = json.loads(out.read_text())
    workload = report["workload"]
    samples = workload["prompts"] * workload["samples_per_prompt"] * workload["rounds"]
    assert set(report["orders"]) == {"burst", "round_robin"}
    for order, o in report["orders"].items():
        assert o["rewards_lost"] == {"on": 0, "off": 0}, order
        assert o["rewards_compared"] == samples, order
        assert o["max_reward_diff"] <= TOL, order
        assert all(x > 0 for x in o["samples_per_s"]["on"] + o["samples_per_s"]["off"])
        assert o["ratio_min"] <= o["ratio_median"] <= o["ratio_max"]
        assert o["sharing_counters_on"]["rewardserve_prefix_tokens_reused_total"] > 0, order
    assert report["runtime"]["device"] == "cpu"
