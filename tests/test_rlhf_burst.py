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
import numpy as np
import requests
from prometheus_client.parser import text_string_to_metric_families

from service.data import demo_data_path, read_pairs

BURST = 2048  # per-sample requests sent at once: a rollout batch (the issue measured 821 lost at the old defaults)
TRIES, PAUSE_S, CLIENT_TIMEOUT_S = 5, 1.0, 180.0  # OpenRLHF's request_api_wrapper
TOL = 1e-5  # raw reward, batched in the server vs offline


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


def counter_total(text: str, name: str, **labels) -> float:
    """Sum of a counter's samples over every label set that includes `labels` (0 if none)."""
    return sum(s.value for family in text_string_to_metric_families(text) for s in family.samples
               if s.name == name and labels.items() <= s.labels.items())


def test_a_rollout_burst_at_default_settings_loses_no_reward(start_server, slow_bundle):
    """On the slower test bundle (~5 ms per sample on one thread) the burst is ~10 s of model time, longer
    than OpenRLHF's 5 tries 1 s apart: every sample must be admitted at once (admission by deadline), none
    refused even once (a refusal the client's retries hid would still cost a sample a second of its 5),
    every sample computed exactly once, and every reward the one offline scoring gives.

    Every sample is a distinct text, so the score cache answers none of them: with the 382 distinct texts
    of an earlier version, 1,422 of the 2,048 were cache hits and the old defaults (--max-queue 1024
    --request-timeout-s 60) passed."""
    from service.bundle import open_bundle
    from service.evaluate import score_pairs
    from service.runtime import load_runtime

    pairs, _ = read_pairs(demo_data_path())
    prompts = [p.prompt for p in pairs * math.ceil(BURST / len(pairs))][:BURST]
    responses = [(p.chosen if i % 2 else p.rejected) + f" (sample {i})"
                 for i, p in enumerate(pairs * math.ceil(BURST / len(pairs)))][:BURST]
    samples = [(prompt + response, prompt) for prompt, response in zip(prompts, responses)]
    assert len(set(samples)) == BURST
    manifest, encoder = open_bundle(slow_bundle)
    offline = score_pairs(manifest, encoder, load_runtime(slow_bundle, manifest, provider="cpu", intra_op_threads=1),
                          prompts, responses)  # before the server starts: the two do not share the CPU

    server = start_server(bundle_dir=slow_bundle)  # default admission settings (only threads and log level are set by the fixture)
    before = httpx.get(server.url + "/metrics").text
    url = server.url + "/get_reward"
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=BURST) as pool:  # every sample in flight at once
        rewards = list(pool.map(lambda s: openrlhf_reward(url, *s), samples))
    elapsed = time.monotonic() - started
    after = httpx.get(server.url + "/metrics").text

    lost = [i for i, r in enumerate(rewards) if r is None]
    refused = counter_total(after, "rewardserve_rejected_total") - counter_total(before, "rewardserve_rejected_total")
    refusals = " ".join(line for line in after.splitlines() if line.startswith("rewardserve_rejected_total"))
    assert lost == [], f"{len(lost)} of {BURST} rewards lost; {refused:.0f} refusals: {refusals}"
    assert elapsed < CLIENT_TIMEOUT_S
    assert refused == 0, f"{refused:.0f} refusals the client's retries hid: {refusals}"
    answered = {status: counter_total(after, "rewardserve_requests_total", route="/get_reward", status=status)
                for status in ("200", "429", "503", "504")}
    assert answered == {"200": BURST, "429": 0, "503": 0, "504": 0}, answered
    # the model ran exactly the burst's items: each sample once, none from the cache, none twice
    assert counter_total(after, "rewardserve_batch_size_sum") - counter_total(before, "rewardserve_batch_size_sum") == BURST
    assert counter_total(after, "rewardserve_cache_hits_total") == counter_total(before, "rewardserve_cache_hits_total")
    # and the rewards (z-scores) are the offline ones
    norm = manifest.normalization
    np.testing.assert_allclose(np.array(rewards) * norm.std + norm.mean, offline, atol=TOL, rtol=0)
    assert np.std(offline) > 100 * TOL  # the rewards differ: the comparison is not vacuous
