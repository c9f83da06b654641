"""Drift telemetry end to end: the service's /metrics, the Prometheus rules and the chart's monitoring.

- a live server (real HTTP, a pure-length ONNX bundle from tests/test_audit.py) scored with responses
  whose length rises phase by phase: the length-bucket metrics, the out-of-calibration counters, the
  capped client label and the per-item flags move as they must;
- `promtool check rules` and `promtool test rules` on deploy/prometheus/ (skip without promtool unless
  CI is set: `make promtool` installs it);
- the Grafana dashboard: valid JSON, schemaVersion, every panel queries metrics the service exposes
  (as do the rules);
- the chart with the dashboard and the PrometheusRule on and off: `helm lint --strict`, rendering, the
  rendered rules are the rules file, the PrometheusRule is valid against the prometheus-operator schema.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.test_audit import PROMPT, synthetic_bundle, synthetic_pairs
from tests.test_deploy import CHART, NAMESPACE, RELEASE, RENDER_KUBE_VERSION, run, to_docs, tool

REPO = Path(__file__).resolve().parents[1]
RULES = REPO / "deploy" / "prometheus" / "rewardserve-rules.yaml"
RULES_TEST = REPO / "deploy" / "prometheus" / "rewardserve-rules.test.yaml"
DASHBOARD = CHART / "files" / "grafana-dashboard.json"
ON = ["--set", "monitoring.grafanaDashboard.enabled=true", "--set", "monitoring.prometheusRule.enabled=true"]
METRIC_NAME = re.compile(r"\brewardserve_[a-z0-9_]+")


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def promtool() -> str:
    found = shutil.which("promtool")
    if found:
        return found
    message = "promtool is missing: run `make promtool` (Debian package prometheus)"
    if _in_ci():
        pytest.fail(message + "; CI is set, so a missing tool is an error")
    pytest.skip(message)


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    """(sample name, labels) -> value, parsed by prometheus_client's own parser."""
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(parsed: dict, name: str, **labels) -> float:
    return parsed.get((name, frozenset(labels.items())), 0.0)


def exposed_names(text: str) -> set[str]:
    """Every series name a PromQL query may use against this exposition (a labelled metric with no
    child yet still declares its series through its TYPE line)."""
    names = {name for name, _ in samples(text)}
    suffixes = {"counter": ("", "_total"), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count"),
                "summary": ("_sum", "_count")}
    for name, kind in re.findall(r"(?m)^# TYPE (\S+) (\S+)$", text):  # a counter's TYPE may end in _total
        names.update(name.removesuffix("_total") + s if kind == "counter" else name + s
                     for s in suffixes.get(kind, ("",)))
    return names


# ---------------------------------------------------------------- the live server


@pytest.fixture(scope="module")
def length_server(start_server, tmp_path_factory):
    bundle = synthetic_bundle(tmp_path_factory.mktemp("length-bundle"), "length", synthetic_pairs(seed=1))
    return start_server(bundle_dir=bundle, client_label_header="X-Client", client_label_max=2)


def _words(n: int, salt: int) -> str:
    return " ".join(["fine"] + ["the cat sat on a mat".split()[(i + salt) % 6] for i in range(n - 1)])


def test_drift_metrics_follow_rising_response_length(length_server):
    """Four phases of 12 responses each, ~1, ~150, ~600 and ~1500 tokens long (the model's reward is the
    token count; the reference responses have 3-181 words)."""
    url = length_server.url
    parsed = samples(httpx.get(url + "/metrics").text)
    assert value(parsed, "rewardserve_served_items_total", client="none") == 0
    phases = [("0-63", 1), ("64-255", 150), ("256-1023", 600), ("1024+", 1500)]
    means, flags_seen = [], []
    for bucket, n_words in phases:
        items = [{"prompt": PROMPT, "response": _words(n_words, i) + f" {i}" * (n_words > 1)} for i in range(12)]
        r = httpx.post(url + "/v1/score/batch", json={"items": items}, timeout=60)
        assert r.status_code == 200, r.text
        results = r.json()["results"]
        flags_seen.append({tuple(x.get("flags", ())) for x in results})
        before, parsed = parsed, samples(httpx.get(url + "/metrics").text)
        count = value(parsed, "rewardserve_served_length_score_count", length=bucket, client="none")
        assert count - value(before, "rewardserve_served_length_score_count", length=bucket, client="none") == 12
        for other, _ in phases:
            if other != bucket:  # nothing else moved
                assert (value(parsed, "rewardserve_served_length_score_count", length=other, client="none")
                        == value(before, "rewardserve_served_length_score_count", length=other, client="none"))
        total = value(parsed, "rewardserve_served_length_score_sum", length=bucket, client="none")
        means.append(total / count)
        assert total == pytest.approx(sum(x["score"] for x in results), abs=1e-6)

    assert means == sorted(means) and means[-1] - means[0] > 2, means  # longer responses, higher mean z
    assert flags_seen[0] == {("below_calibration_p1",)}   # one-word answers: under the reference p1
    assert flags_seen[1] == {()}                          # inside the reference range: no flags
    assert flags_seen[2] == flags_seen[3] == {("above_calibration_p99",)}
    assert value(parsed, "rewardserve_served_out_of_calibration_total", side="below_p1", client="none") == 12
    assert value(parsed, "rewardserve_served_out_of_calibration_total", side="above_p99", client="none") == 24
    assert value(parsed, "rewardserve_served_items_total", client="none") == 48
    assert value(parsed, "rewardserve_served_score_count", client="none") == 48
    # Share beyond calibration moved from 1/4 (after phase 1) to 3/4.
    out = sum(value(parsed, "rewardserve_served_out_of_calibration_total", side=s, client="none")
              for s in ("above_p99", "below_p1"))
    assert out / value(parsed, "rewardserve_served_items_total", client="none") == 0.75


def test_client_label_is_allow_listed_and_capped(length_server):
    url = length_server.url
    item = {"prompt": PROMPT, "response": _words(20, 0)}
    for client in ("rl-run-a", "rl-run-b", "rl-run-c", "rl-run-d", "rl-run-a", "bad value!"):
        assert httpx.post(url + "/v1/score", json=item, headers={"X-Client": client}).status_code == 200
    parsed = samples(httpx.get(url + "/metrics").text)
    clients = {dict(labels).get("client") for name, labels in parsed if name == "rewardserve_served_items_total"}
    assert clients <= {"none", "rl-run-a", "rl-run-b", "other"} and {"rl-run-a", "rl-run-b", "other"} <= clients
    assert value(parsed, "rewardserve_served_items_total", client="rl-run-a") == 2
    assert value(parsed, "rewardserve_served_items_total", client="other") == 2  # c and d: over the cap of 2
    assert value(parsed, "rewardserve_served_length_score_count", length="0-63", client="rl-run-b") == 1


def test_models_shows_the_bundle_audit(server, bundle):
    from service.bundle import read_manifest

    body = httpx.get(server.url + "/v1/models").json()
    assert body["data"][0]["audit"] == read_manifest(bundle).audit and body["data"][0]["audit"]["pairs"] > 0


# ---------------------------------------------------------------- rules and dashboard


def test_promtool_checks_and_unit_tests_the_rules():
    tool_path = promtool()
    check = subprocess.run([tool_path, "check", "rules", str(RULES)], capture_output=True, text=True)
    assert check.returncode == 0 and "SUCCESS" in check.stdout, check.stdout + check.stderr
    test = subprocess.run([tool_path, "test", "rules", str(RULES_TEST)], capture_output=True, text=True,
                          cwd=RULES_TEST.parent)
    assert test.returncode == 0 and "SUCCESS" in test.stdout, test.stdout + test.stderr


def test_promtool_unit_tests_can_fail(tmp_path):
    """The unit tests really check the thresholds: a rules file whose served-score alert never fires
    fails them."""
    tool_path = promtool()
    (tmp_path / RULES.name).write_text(RULES.read_text().replace(
        "expr: rewardserve:served_score_mean:z10m > 1.5", "expr: rewardserve:served_score_mean:z10m > 15"))
    shutil.copyfile(RULES_TEST, tmp_path / RULES_TEST.name)
    test = subprocess.run([tool_path, "test", "rules", RULES_TEST.name], capture_output=True, text=True, cwd=tmp_path)
    assert test.returncode != 0 and "RewardServeServedScoreHigh" in test.stdout + test.stderr


def _dashboard_queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    assert isinstance(dashboard.get("schemaVersion"), int) and dashboard["schemaVersion"] >= 30
    assert dashboard["uid"] and dashboard["title"]
    queries = []
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["targets"], panel["title"]
        ids = [p["id"] for p in dashboard["panels"]]
        assert len(ids) == len(set(ids))
        queries += [t["expr"] for t in panel["targets"]]
    return queries


def test_dashboard_and_rules_query_metrics_the_service_exposes(length_server):
    httpx.post(length_server.url + "/v1/score", json={"prompt": PROMPT, "response": "fine"})
    exposed = exposed_names(httpx.get(length_server.url + "/metrics").text)
    queries = _dashboard_queries()
    used = {name for q in queries for name in METRIC_NAME.findall(q)}
    for drift in ("rewardserve_served_score_sum", "rewardserve_served_length_score_count",
                  "rewardserve_served_out_of_calibration_total", "rewardserve_served_items_total"):
        assert drift in used, drift
    assert not used - exposed, f"dashboard queries unknown metrics: {sorted(used - exposed)}"
    in_rules = set(METRIC_NAME.findall(RULES.read_text()))
    assert in_rules and not in_rules - exposed, f"rules use unknown metrics: {sorted(in_rules - exposed)}"


def test_rules_file_is_the_one_the_chart_ships():
    assert RULES.resolve() == (CHART / "files" / "rewardserve-rules.yaml").resolve()


# ---------------------------------------------------------------- the chart


@pytest.fixture(scope="module")
def helm_home(tmp_path_factory) -> dict[str, str]:
    home = tmp_path_factory.mktemp("helm-home")
    return {**os.environ, "HELM_CACHE_HOME": str(home / "cache"), "HELM_CONFIG_HOME": str(home / "config"),
            "HELM_DATA_HOME": str(home / "data")}


def _render(helm_home, *overrides: str) -> list[dict]:
    proc = run([tool("helm"), "template", RELEASE, str(CHART), "--namespace", NAMESPACE,
                "--kube-version", RENDER_KUBE_VERSION, *overrides], env=helm_home)
    assert proc.returncode == 0, proc.stderr
    return to_docs(proc.stdout)


@pytest.mark.parametrize("overrides", [[], ON, [*ON, "--set", "config.CLIENT_LABEL_HEADER=X-Client",
                                                 "--set", "monitoring.prometheusRule.labels.release=kps"]])
def test_helm_lint_strict_with_monitoring(overrides, helm_home):
    proc = run([tool("helm"), "lint", "--strict", str(CHART), "--namespace", NAMESPACE,
                "--kube-version", RENDER_KUBE_VERSION, *overrides], env=helm_home)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "[WARNING]" not in output and "[ERROR]" not in output, output


def test_monitoring_is_off_by_default(helm_home):
    docs = _render(helm_home)
    assert "PrometheusRule" not in {d["kind"] for d in docs}
    assert [d for d in docs if d["kind"] == "ConfigMap" and "grafana_dashboard" in d["metadata"]["labels"]] == []


def test_monitoring_renders_dashboard_and_rules(helm_home, tmp_path):
    docs = _render(helm_home, *ON, "--set", "monitoring.prometheusRule.labels.release=kps",
                   "--set", "monitoring.grafanaDashboard.annotations.grafana_folder=RLHF")
    dashboards = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["labels"].get("grafana_dashboard")]
    assert len(dashboards) == 1
    cm = dashboards[0]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1" and cm["metadata"]["namespace"] == NAMESPACE
    assert cm["metadata"]["annotations"] == {"grafana_folder": "RLHF"}
    assert json.loads(cm["data"]["rewardserve-dashboard.json"]) == json.loads(DASHBOARD.read_text())

    [rule] = [d for d in docs if d["kind"] == "PrometheusRule"]
    assert rule["apiVersion"] == "monitoring.coreos.com/v1" and rule["metadata"]["labels"]["release"] == "kps"
    assert rule["spec"] == to_docs(RULES.read_text())[0]
    alerts = {r["alert"] for g in rule["spec"]["groups"] for r in g["rules"] if "alert" in r}
    assert alerts == {"RewardServeServedScoreHigh", "RewardServeLengthBucketsDiverging",
                      "RewardServeOutOfCalibration", "RewardServeErrorRate", "RewardServeOverloaded"}

    # The PrometheusRule against the prometheus-operator schema, strictly (cloudcoil, as validate_crds.py).
    path = tmp_path / "rule.json"
    path.write_text(json.dumps(rule))
    code = ("import json, sys\nimport cloudcoil.pydantic as cc\ncc.BaseModel.model_config['extra'] = 'forbid'\n"
            "from cloudcoil.models.prometheus_operator import v1\n"
            "v1.PrometheusRule.model_validate(json.load(open(sys.argv[1])))\n"
            "bad = json.load(open(sys.argv[1])); bad['spec']['groups'][0]['rulez'] = []\n"
            "try:\n    v1.PrometheusRule.model_validate(bad)\nexcept Exception:\n    print('strict ok')\n")
    proc = run([tool("python"), "-c", code, str(path)])
    assert proc.returncode == 0 and "strict ok" in proc.stdout, proc.stdout + proc.stderr
