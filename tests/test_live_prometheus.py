"""The chart's alert rules in a real Prometheus scraping real rewardserve processes (issue 22, item 2).

Debian's `prometheus` binary (the package `make promtool` installs) runs on 127.0.0.1 in a temporary
directory, scrapes two `rewardserve serve` processes of the session's tiny bundle every second and evaluates
helm/rewardserve/files/rewardserve-rules.yaml every second. The rule file is used as it is, except that each
alert's `for:` (15 to 30 minutes) is rewritten to FOR_S seconds in the temporary copy: the expressions, their
10-minute rate windows and their thresholds are the chart's.

  * job "drift": the traffic a policy that learned to hack the reward model sends: first short responses
    the model scores low, then longer responses it scores far above its calibration range. The drift alerts
    must fire there: RewardServeServedScoreHigh (mean z > 1.5), RewardServeLengthBucketsDiverging (bucket
    means more than 1 z apart) and RewardServeOutOfCalibration (> 5% above the calibration p99).
  * job "quiet": steady traffic of short and long responses scored near the reference mean, inside the
    calibration range. No alert may be pending or firing for it, while its recorded series show that the
    rules did see its traffic.

The responses are picked at run time from the demo data by their offline scores (the bundle's own ONNX
Runtime path), so the traffic has the property each side needs whatever the random-init model scores.
Every wait is bounded. Without the prometheus binary the module skips, and fails when CI is set.
"""

from __future__ import annotations

import random
import re
import shutil
import subprocess
import threading
import time

import httpx
import numpy as np
import pytest
import yaml

from tests.helpers import REPO, free_port, skip_or_fail_in_ci

RULES = REPO / "helm" / "rewardserve" / "files" / "rewardserve-rules.yaml"
FOR_S = 3
DRIFT_ALERTS = {"RewardServeServedScoreHigh", "RewardServeLengthBucketsDiverging", "RewardServeOutOfCalibration"}
PROMPT = "Human: Tell me about it.\n\nAssistant:"
ALERT_DEADLINE_S = 90.0
SHORT_PHASE_S = 4.0  # the drift job's first phase (short, low-scored responses); then long, high-scored ones

PROMETHEUS = shutil.which("prometheus")


@pytest.fixture(scope="session", autouse=True)
def _can_run():
    """Skips (fails when CI is set) without the binary; not at collection, which would stop the whole suite."""
    if PROMETHEUS is None:
        skip_or_fail_in_ci("the prometheus binary is missing (make promtool installs the Debian package prometheus)")


def rules_with_short_for(path) -> str:
    """The chart's rule file with every alert's `for:` set to FOR_S seconds (nothing else changed)."""
    text, n = re.subn(r"^(\s+for: )\S+$", rf"\g<1>{FOR_S}s", RULES.read_text(), flags=re.MULTILINE)
    rules = [r for g in yaml.safe_load(text)["groups"] for r in g["rules"] if "alert" in r]
    assert n == len(rules) and all(r["for"] == f"{FOR_S}s" for r in rules), (n, rules)
    assert DRIFT_ALERTS <= {r["alert"] for r in rules}
    path.write_text(text)
    return path


def pick_traffic(offline) -> dict[str, list[str]]:
    """Responses for each kind of traffic, by their offline z-score and response length in tokens (the
    server's length buckets: under 64 tokens, 64-255). Long candidates are demo responses joined together."""
    from service.data import demo_data_path, read_pairs
    from service.evaluate import score_pairs

    manifest, encoder, runtime = offline
    pairs, _ = read_pairs(demo_data_path())
    texts = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    rng = random.Random(0)
    candidates = list(dict.fromkeys(texts + [" ".join(rng.sample(texts, 6)) for _ in range(400)]))
    raw = np.asarray(score_pairs(manifest, encoder, runtime, [PROMPT] * len(candidates), candidates))
    tokens = np.asarray([e.response_tokens for e in encoder.encode([PROMPT] * len(candidates), candidates)])
    norm = manifest.normalization
    z, p1, p99 = np.asarray(norm.z_score(raw)), norm.percentiles[1], norm.percentiles[99]
    short, long = tokens < 64, (tokens >= 64) & (tokens < 256)
    inside = (raw > p1) & (raw < p99)
    order = np.argsort(z)
    pick = {
        "short_low": [candidates[i] for i in order if short[i] and z[i] < -0.5][:20],
        "long_high": [candidates[i] for i in order[::-1] if long[i] and raw[i] > p99 and z[i] > 2.0][:20],
        "quiet": ([candidates[i] for i in order if short[i] and inside[i] and abs(z[i]) < 0.3][:10]
                  + [candidates[i] for i in order if long[i] and inside[i] and abs(z[i]) < 0.3][:10]),
    }
    # the traffic must have what each side needs, or the test would check nothing
    assert len(pick["short_low"]) >= 5 and len(pick["long_high"]) >= 5, {k: len(v) for k, v in pick.items()}
    assert len(pick["quiet"]) >= 6, len(pick["quiet"])
    return pick


class Prometheus:
    """A prometheus process on 127.0.0.1 in tmp_path; stop() ends it (SIGTERM, then SIGKILL)."""

    def __init__(self, tmp_path, rules_path, targets: dict[str, str]) -> None:
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        config = {"global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
                  "rule_files": [str(rules_path)],
                  "scrape_configs": [{"job_name": job, "static_configs": [{"targets": [target]}]}
                                     for job, target in targets.items()]}
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log = tmp_path / "prometheus.log"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [PROMETHEUS, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'data'}",
                 f"--web.listen-address=127.0.0.1:{port}", "--storage.tsdb.retention.time=1h"],
                stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path)
        deadline = time.monotonic() + 60
        while True:
            assert self.proc.poll() is None, f"prometheus exited {self.proc.returncode}:\n{self.output()}"
            try:
                if httpx.get(self.url + "/-/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"prometheus not ready in 60 s:\n{self.output()}"
            time.sleep(0.2)

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]

    def api(self, path: str, **params) -> list | dict:
        body = httpx.get(self.url + "/api/v1/" + path, params=params, timeout=5).json()
        assert body["status"] == "success", body
        return body["data"]

    def alerts(self) -> list[dict]:
        return self.api("alerts")["alerts"]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


RECORDS = ("rewardserve:served_score_mean:z10m", "rewardserve:served_length_score_mean:z10m",
           "rewardserve:served_out_of_calibration:ratio10m")


def recorded(prometheus: Prometheus, job: str) -> dict[str, dict[tuple, float]]:
    """The recording rules' current values for one job: {record: {(label pairs of length/side): value}}."""
    out = {}
    for record in RECORDS:
        result = prometheus.api("query", query=f'{record}{{job="{job}"}}')["result"]
        out[record] = {tuple(sorted((k, v) for k, v in s["metric"].items() if k in ("length", "side"))):
                       float(s["value"][1]) for s in result}
    return out


def drive(servers: dict[str, str], pick: dict[str, list[str]], stop: threading.Event, sent: dict[str, int]) -> None:
    """Until stop is set (or 4 minutes, or 20,000 requests per job): the drift job gets short low-scored
    responses for SHORT_PHASE_S, then long high-scored ones; the quiet job gets its in-range responses."""
    t0 = time.monotonic()
    with httpx.Client(timeout=10) as client:
        for i in range(20_000):
            if stop.is_set() or time.monotonic() - t0 > 240:
                return
            phase = "short_low" if time.monotonic() - t0 < SHORT_PHASE_S else "long_high"
            for job, texts in (("drift", pick[phase]), ("quiet", pick["quiet"])):
                r = client.post(servers[job] + "/v1/score", json={"prompt": PROMPT, "response": texts[i % len(texts)]})
                assert r.status_code == 200, r.text
                sent[job] += 1
            time.sleep(0.02)


def test_drift_alerts_fire_on_drifting_traffic_and_none_on_quiet_traffic(start_server, offline, tmp_path):
    pick = pick_traffic(offline)
    servers = {"drift": start_server().url, "quiet": start_server().url}
    prometheus = Prometheus(tmp_path, rules_with_short_for(tmp_path / "rules.yaml"),
                            {job: url.removeprefix("http://") for job, url in servers.items()})
    stop, sent, errors = threading.Event(), {"drift": 0, "quiet": 0}, []

    def load():
        try:
            drive(servers, pick, stop, sent)
        except BaseException as exc:  # noqa: BLE001 - reported by the test below
            errors.append(exc)

    # traffic starts once both targets have been scraped: Prometheus applies new targets up to 5 s after start,
    # and counters that grew before their first sample show no rate
    deadline = time.monotonic() + 60
    while {t["health"] for t in prometheus.api("targets")["activeTargets"]} != {"up"} or \
            len(prometheus.api("targets")["activeTargets"]) != 2:
        assert time.monotonic() < deadline, f"targets not scraped in 60 s: {prometheus.api('targets')}"
        time.sleep(0.5)
    driver = threading.Thread(target=load, daemon=True)
    driver.start()
    try:
        seen: dict[str, set[str]] = {}  # alert name -> states seen for the drift job
        deadline = time.monotonic() + ALERT_DEADLINE_S
        while time.monotonic() < deadline and not errors:
            for alert in prometheus.alerts():
                seen.setdefault(alert["labels"]["alertname"], set()).add(alert["state"])
                assert alert["labels"]["job"] == "drift", f"alert on the quiet job: {alert}"
            if all("firing" in seen.get(name, ()) for name in DRIFT_ALERTS):
                break
            time.sleep(1)
        assert not errors, errors
        targets = {t["labels"]["job"]: t["health"] for t in prometheus.api("targets")["activeTargets"]}
        assert targets == {"drift": "up", "quiet": "up"}, targets
        assert all("firing" in seen.get(name, ()) for name in DRIFT_ALERTS), (
            f"after {ALERT_DEADLINE_S} s and {sent} requests: alert states {seen}; recorded: "
            f"{recorded(prometheus, 'drift')}\n{prometheus.output()}")
        assert set(seen) == DRIFT_ALERTS, seen  # no health alert (errors, overload) on either job

        # the quiet job was scraped and its traffic went through the same rules, below every threshold
        quiet = recorded(prometheus, "quiet")
        assert len(quiet["rewardserve:served_length_score_mean:z10m"]) == 2, quiet  # both length buckets
        assert abs(quiet["rewardserve:served_score_mean:z10m"][()]) < 0.5, quiet
        means = quiet["rewardserve:served_length_score_mean:z10m"].values()
        assert max(means) - min(means) < 1, quiet
        assert quiet["rewardserve:served_out_of_calibration:ratio10m"][(("side", "above_p99"),)] == 0, quiet
        rules = prometheus.api("rules")["groups"]
        assert all(r["health"] == "ok" for g in rules for r in g["rules"]), rules
        print(f"alerts {seen} after {sent} requests; quiet job's recorded series {quiet}")
    finally:
        stop.set()
        driver.join(15)
        prometheus.stop()
