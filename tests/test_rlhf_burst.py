"""RLHF clients lose no reward in a rollout burst, at the server's default settings.

OpenRLHF (v0.9+ `request_api_wrapper`, called per sample by its v0.11 agent executor) posts one request
per sample, a whole rollout batch at once, with a 180 s timeout, and retries any failure 5 times, 1 s
apart, before giving up silently (the sample then trains without a reward). The client below is written
here from that behaviour (OpenRLHF/OpenRLHF, openrlhf/utils/remote_rm_utils.py `request_api_wrapper`, read
at commit 07c34b303e86fcdffa755e9e25c28cca5b44c675, and the v0.11 executor's per-sample fetch): real HTTP
with `requests`, one thread and connection per in-flight sample.
"""

from __future__ import annotations

import math
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import requests

from service.data import demo_data_path, read_pairs
from tests.helpers import metric

BURST = 2048  # per-sample requests sent at once: a rollout batch (the issue measured 821 lost at the old defaults)
TRIES, PAUSE_S, CLIENT_TIMEOUT_S = 5, 1.0, 180.0  # OpenRLHF's request_api_wrapper


def openrlhf_reward(url: str, query: str, prompt: str) -> float | None:
    """One sample's reward as OpenRLHF fetches it; None when it gives up (a lost reward)."""
    for _ in range(TRIES):
        try:
            response = requests.post(url, json={"query": [query], "prompts": [prompt], "labels": [""]},
                                     headers={"Content-Type": "application/json"}, timeout=CLIENT_TIMEOUT_S)
            response.raise_for_status()
            return response.json()["rewards"][0]
        except Exception:  # OpenRLHF logs and retries every failure alike
            pass
        time.sleep(PAUSE_S)
    return None


def test_a_rollout_burst_at_default_settings_loses_no_reward(start_server, slow_bundle):
    """On the slower test bundle (~5 ms per sample on one thread) the burst is ~10 s of model time, longer
    than OpenRLHF's 5 tries 1 s apart: every sample must be queued (admission by deadline), none refused
    for good."""
    server = start_server(bundle_dir=slow_bundle)  # default admission settings (only threads and log level are set by the fixture)
    pairs, _ = read_pairs(demo_data_path())
    samples = [(p.prompt + (p.chosen if i % 2 else p.rejected), p.prompt)
               for i, p in enumerate(pairs * math.ceil(BURST / len(pairs)))][:BURST]
    url = server.url + "/get_reward"
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=BURST) as pool:  # every sample in flight at once
        rewards = list(pool.map(lambda s: openrlhf_reward(url, *s), samples))
    elapsed = time.monotonic() - started
    lost = [i for i, r in enumerate(rewards) if r is None]
    assert lost == [], f"{len(lost)} of {BURST} rewards lost"
    assert elapsed < CLIENT_TIMEOUT_S
    # The rewards are the ones a lone request gets (same sample, same answer).
    for i in (0, 1, BURST // 2, BURST - 1):
        alone = httpx.post(url, json={"query": [samples[i][0]], "prompts": [samples[i][1]]}, timeout=30).json()
        assert abs(alone["rewards"][0] - rewards[i]) <= 1e-5
    text = httpx.get(server.url + "/metrics").text
    assert metric(text, "rewardserve_requests_total", route="/get_reward", status="200") >= BURST
