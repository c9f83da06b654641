"""Drift telemetry end to end: the service's /metrics, the Prometheus rules and the chart's monitoring.

- a live server (real HTTP, a pure-length ONNX bundle from tests/test_audit.py) scored with responses
  whose length rises phase by phase: the length-bucket metrics, the out-of-calibration counters, the
  capped client label and the per-item flags move as they must;
- `promtool check rules` and `promtool test rules` on deploy/prometheus/ (skip without promtool unless
  CI is set: `make promtool` installs it);
- the Grafana dashboard: valid JSON, schemaVersion; every series the dashboard and the rules query,
  and every input series of the promtool unit tests, is printed by a live server's /metrics after
  traffic (read from the exposition as served, nothing derived from metric types);
- the sums of z (and of raw rewards) as their two counters (service/metrics.py SignedSum) equal the sums
  of the scores the responses returned;
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
import yaml
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


SAMPLE_LINE = re.compile(r"(?m)^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{[^\n]*\})?[ \t]+\S+")
SELECTOR = re.compile(r"\b(rewardserve_[a-z0-9_]+)\s*(?:\{([^}]*)\})?")
MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")
TARGET_LABELS = {"job", "instance"}  # added by Prometheus at scrape time, not by the server


def exposed_series(text: str) -> dict[str, set[frozenset[str]]]:
    """Series name -> the label-name sets it has, for exactly the sample lines the server printed. Nothing
    is derived from `# TYPE` lines or from what a metric type would usually have: a `_sum` the client
    library leaves out is missing here, as it is for Prometheus."""
    printed = set(SAMPLE_LINE.findall(text))
    series: dict[str, set[frozenset[str]]] = {}
    for name, labels in samples(text):
        series.setdefault(name, set()).add(frozenset(k for k, _ in labels))
    assert set(series) == printed, f"parser and sample lines disagree: {sorted(set(series) ^ printed)}"
    return series


def rules_queries(rules_text: str) -> list[str]:
    """Every rule's PromQL, with the names of the rules file's own recording rules cut out."""
    rules = [r for g in yaml.safe_load(rules_text)["groups"] for r in g["rules"]]
    recorded = sorted((r["record"] for r in rules if "record" in r), key=len, reverse=True)
    queries = []
    for rule in rules:
        query = rule["expr"]
        for name in recorded:
            query = query.replace(name, " ")
        queries.append(query)
    return queries


def selectors(queries: list[str]) -> list[tuple[str, set[str]]]:
    """(series name, label names its matchers use) for every rewardserve_* selector in the queries."""
    return [(name, set(MATCHER.findall(matchers))) for q in queries for name, matchers in SELECTOR.findall(q)]


def scrape_after_traffic(url: str) -> str:
    """/metrics after a single score, a batch, a too-long refusal and a scrape: every route the rules
    and the dashboard watch has answered at least once."""
    assert httpx.post(url + "/v1/score", json={"prompt": PROMPT, "response": "fine"}).status_code == 200
    items = [{"prompt": PROMPT, "response": _words(n, 3)} for n in (2, 90, 400)]
    assert httpx.post(url + "/v1/score/batch", json={"items": items}, timeout=60).status_code == 200
    too_long = httpx.post(url + "/v1/score", json={"prompt": PROMPT, "response": _words(3000, 1), "truncate": False},
                          timeout=60)
    assert too_long.status_code == 422, too_long.text
    httpx.get(url + "/metrics")
    return httpx.get(url + "/metrics").text


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
        signed = (value(parsed, "rewardserve_served_length_score_positive_sum_total", length=bucket, client="none")
                  - value(parsed, "rewardserve_served_length_score_negative_sum_total", length=bucket, client="none"))
        assert signed == pytest.approx(total, abs=1e-6)  # the counters the rules read carry the same sum

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


def _dashboard_queries_and_variables() -> list[str]:
    variables = [v["definition"] for v in json.loads(DASHBOARD.read_text())["templating"]["list"] if "definition" in v]
    return _dashboard_queries() + variables


def _check_selectors(used: list[tuple[str, set[str]]], exposed: dict[str, set[frozenset[str]]], where: str) -> None:
    missing = sorted({name for name, _ in used if name not in exposed})
    assert not missing, f"{where} query series /metrics does not expose: {missing}"
    for name, matched in used:
        labels = set().union(*exposed[name])
        assert matched - TARGET_LABELS <= labels, f"{where}: {name} has no label {sorted(matched - labels)}"


def test_dashboard_and_rules_query_series_the_service_exposes(length_server):
    """Every series the rules and the dashboard read is printed by the live server after traffic (the
    drift alert's sum of z among them), and every label a query matches on is one that series has."""
    exposed = exposed_series(scrape_after_traffic(length_server.url))
    in_dashboard = selectors(_dashboard_queries_and_variables())
    in_rules = selectors(rules_queries(RULES.read_text()))
    names = {name for name, _ in in_dashboard + in_rules}
    for drift in ("rewardserve_served_score_positive_sum_total", "rewardserve_served_score_negative_sum_total",
                  "rewardserve_served_score_count", "rewardserve_served_length_score_positive_sum_total",
                  "rewardserve_served_length_score_count", "rewardserve_served_out_of_calibration_total",
                  "rewardserve_served_items_total", "rewardserve_requests_total", "rewardserve_rejected_total"):
        assert drift in names, drift
    assert {name for name, _ in in_rules} >= {"rewardserve_served_score_positive_sum_total",
                                               "rewardserve_served_length_score_negative_sum_total"}
    _check_selectors(in_dashboard, exposed, "the dashboard")
    _check_selectors(in_rules, exposed, "the rules")


def test_promtool_input_series_are_series_the_service_exposes(length_server):
    """The promtool unit tests feed only series a live server prints, with its label names (plus job)
    and, for the fixed-valued labels (length, side), values it uses."""
    text = scrape_after_traffic(length_server.url)
    exposed = exposed_series(text)
    known: dict[tuple[str, str], set[str]] = {}
    for name, labels in samples(text):
        for key, label_value in labels:
            known.setdefault((name, key), set()).add(label_value)
    inputs = [s["series"] for t in yaml.safe_load(RULES_TEST.read_text())["tests"] for s in t["input_series"]]
    assert len(inputs) > 20
    for series in inputs:
        name, labels = re.fullmatch(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\{(.*)\}", series).groups()
        pairs = dict(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="([^"]*)"', labels))
        assert name in exposed, f"promtool input {series}: /metrics has no series {name}"
        assert frozenset(pairs.keys() - TARGET_LABELS) in exposed[name], \
            f"promtool input {series}: /metrics has {name} with labels {sorted(map(sorted, exposed[name]))}"
        for key in ("length", "side"):
            if key in pairs:
                assert pairs[key] in known[(name, key)], f"promtool input {series}: no {key}={pairs[key]}"


def test_signed_sums_equal_the_served_scores(length_server):
    """The sum-of-z counters against an independent reference: the scores the responses returned.
    Short answers score below the reference mean and long ones above, so both counters move; the raw
    rewards' counters likewise (new items only, so each one is a model run, none a cache hit)."""
    url = length_server.url
    headers = {"X-Client": "rl-run-a"}
    before = samples(httpx.get(url + "/metrics").text)
    items = [{"prompt": PROMPT, "response": _words(n, i) + f" zsum{i}"} for i, n in enumerate((1, 2, 5, 60, 150, 900))]
    r = httpx.post(url + "/v1/score/batch", json={"items": items}, headers=headers, timeout=60)
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    single = httpx.post(url + "/v1/score", json={"prompt": PROMPT, "response": _words(300, 2) + " zsum-single"},
                        headers=headers)
    assert single.status_code == 200, single.text
    results.append(single.json())
    scores, raws = [x["score"] for x in results], [x["raw"] for x in results]
    assert min(scores) < -0.5 and max(scores) > 0.5, scores
    after = samples(httpx.get(url + "/metrics").text)

    def moved(name: str, **labels) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    client = "rl-run-a"  # one of the first two clients in this module: its own label (cap of 2)
    positive = moved("rewardserve_served_score_positive_sum_total", client=client)
    negative = moved("rewardserve_served_score_negative_sum_total", client=client)
    assert positive == pytest.approx(sum(s for s in scores if s > 0), abs=1e-6)
    assert negative == pytest.approx(-sum(s for s in scores if s < 0), abs=1e-6)
    assert positive - negative == pytest.approx(sum(scores), abs=1e-6)
    assert moved("rewardserve_served_score_count", client=client) == len(scores)
    raw_sum = (moved("rewardserve_raw_score_positive_sum_total") - moved("rewardserve_raw_score_negative_sum_total"))
    assert raw_sum == pytest.approx(sum(raws), abs=1e-4)
    assert moved("rewardserve_raw_score_count") == len(raws)


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
