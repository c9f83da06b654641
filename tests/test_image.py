"""The serving image as users run it: built from the unchanged Dockerfile with podman, started as the Helm
chart's rendered pod spec says, and checked against the host-run service (issue 22, item 1).

What runs:
  * `podman build` of the Dockerfile's `cpu` target and of its `bundle` target (a freshly exported bundle
    baked in, as exported: no chmod) on the stand-in bases of deploy/image/standin.sh (`make image-base`:
    the test machines reach no image registry);
  * `helm template` of the chart with its default values and bundle.source=initContainer (the default
    source, a PVC, has no container of its own to run); the rendered Deployment's init container and
    server container are translated into `podman run` flags by `pod_to_podman` below: command, args,
    envFrom/env, ports (published on 127.0.0.1 only), user, read-only root filesystem, dropped
    capabilities, no privilege escalation, CPU/memory limits, fsGroup, emptyDir volumes, the grace period;
  * checks: the probe paths answer as the probes expect; the container runs as the chart's non-root user
    with no capabilities and a read-only root; /v1/score equals the host-run service's score for the same
    bundle; `podman stop` (SIGTERM) while 200 requests are in flight loses none (each gets a 200, or a 503
    draining), and the server exits 0 inside the grace period.

What the translation does not reproduce, and why it does not change what is checked: the preStop sleep
(it only waits for endpoint removal, which has no analogue here), the image pull policy, the seccomp
profile (podman's default profile stands for RuntimeDefault) and emptyDir sizeLimit (not enforced by
podman volumes).

Without podman (run as root), helm or the stand-in bases the module skips, and fails when CI is set.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml

from tests.helpers import (J, REPO, RawAnswer, free_port, http_request, metric, raw_burst, skip_or_fail_in_ci,
                           slow_backlog_responses)

CONF = REPO / "deploy" / "image" / "containers.conf"
PIP_CONF = REPO / "deploy" / "image" / "pip.conf"
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
HELM = REPO / ".tools" / "bin" / "helm"
STANDINS = ("docker.io/library/python:3.11-slim-bookworm", "docker.io/library/busybox:1.37.0")
# The chart's values for this test: defaults, except where the bundle comes from.
HELM_SETS = ["bundle.source=initContainer"]
RELEASE = "rs"
TOL = 1e-5
READY_TIMEOUT_S = 120.0
BUILD_TIMEOUT_S = 600.0


def podman(*args: str, timeout: float = 120.0, check: bool = True) -> subprocess.CompletedProcess:
    """podman with the project's settings (deploy/image/containers.conf: runc, cgroupfs, no default ulimits)."""
    env = {**os.environ, "CONTAINERS_CONF": str(CONF)}
    result = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout, env=env)
    if check and result.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)} exited {result.returncode}:\n{result.stdout[-3000:]}\n"
                             f"{result.stderr[-3000:]}")
    return result


def _preconditions() -> str | None:
    """Why the image test cannot run here, or None."""
    if shutil.which("podman") is None:
        return "podman is not installed (run `make image-test`, which installs it as root)"
    if os.geteuid() != 0:
        return "the image test runs containers as root (rootless podman needs subuid ranges this machine lacks)"
    if not HELM.exists():
        return f"{HELM} is missing (run `make tools`)"
    missing = [image for image in STANDINS if podman("image", "exists", image, check=False).returncode != 0]
    if missing:
        return f"base images {missing} are missing (run `make image-base`, or pull them where a registry is reachable)"
    return None


_WHY_NOT = _preconditions()


@pytest.fixture(scope="session", autouse=True)
def _can_run():
    """Each test skips (fails when CI is set) where the image cannot be built or run; not at collection,
    which would stop the whole suite under CI."""
    if _WHY_NOT:
        skip_or_fail_in_ci(_WHY_NOT)


# ---------------------------------------------------------------- the chart's pod spec, as podman flags

def render_chart() -> tuple[dict, dict]:
    """(Deployment, ConfigMap) as `helm template` renders them."""
    argv = [str(HELM), "template", RELEASE, str(REPO / "helm" / "rewardserve")]
    for value in HELM_SETS:
        argv += ["--set", value]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=True).stdout
    docs = {d["kind"]: d for d in yaml.safe_load_all(out) if d}
    return docs["Deployment"], docs["ConfigMap"]


def _cpus(quantity: str) -> str:
    return str(int(quantity[:-1]) / 1000) if quantity.endswith("m") else str(float(quantity))


def _memory(quantity: str) -> str:
    units = {"Ki": 1024, "Mi": 1024 ** 2, "Gi": 1024 ** 3}
    for suffix, factor in units.items():
        if quantity.endswith(suffix):
            return str(int(quantity[: -len(suffix)]) * factor)
    return str(int(quantity))


def pod_to_podman(deployment: dict, configmaps: dict[str, dict], prefix: str, host_port: int) -> dict:
    """Translate a rendered Deployment's pod into podman commands.

    Returns {"volumes": {name: (podman volume, mode)}, "fs_group": gid or None, "init": [argv, ...],
    "server": argv, "server_name": str, "probes": {kind: probe}, "grace_s": int}. Anything in the pod spec
    this translation does not know raises, so that a chart change cannot silently run a different pod."""
    pod = deployment["spec"]["template"]["spec"]
    pod_security = pod.get("securityContext", {})
    fs_group = pod_security.get("fsGroup")
    volumes = {}
    for volume in pod.get("volumes", []):
        if set(volume) != {"name", "emptyDir"} or volume["emptyDir"].get("medium"):
            raise NotImplementedError(f"volume {volume}: only disk-backed emptyDir volumes are translated")
        # kubelet makes an emptyDir 0777, and with fsGroup gives it that group and the setgid bit
        volumes[volume["name"]] = (f"{prefix}-{volume['name']}", 0o2777 if fs_group is not None else 0o777)
    grace_s = int(pod.get("terminationGracePeriodSeconds", 30))

    def run_args(container: dict, name: str, detach: bool) -> list[str]:
        security = {**pod_security, **container.get("securityContext", {})}
        known = {"runAsNonRoot", "runAsUser", "runAsGroup", "fsGroup", "seccompProfile", "allowPrivilegeEscalation",
                 "privileged", "readOnlyRootFilesystem", "capabilities"}
        if set(security) - known:
            raise NotImplementedError(f"securityContext keys {set(security) - known}")
        argv = ["run", "--name", name, "--no-healthcheck"]  # kubelet ignores an image's HEALTHCHECK
        argv += ["--detach"] if detach else ["--rm"]  # an init container runs to completion first
        if "runAsUser" in security:
            user = str(security["runAsUser"]) + (f":{security['runAsGroup']}" if "runAsGroup" in security else "")
            argv += ["--user", user]
        if security.get("runAsNonRoot"):
            assert security.get("runAsUser", 0) != 0, "runAsNonRoot with user 0 would not start on Kubernetes"
        if fs_group is not None:
            argv += ["--group-add", str(fs_group)]
        if security.get("readOnlyRootFilesystem"):
            argv += ["--read-only", "--read-only-tmpfs=false"]  # no writable /tmp, /run unless a volume says so
        if security.get("allowPrivilegeEscalation") is False:
            argv += ["--security-opt", "no-new-privileges"]
        if security.get("privileged"):
            argv += ["--privileged"]
        for cap in security.get("capabilities", {}).get("drop", []):
            argv += ["--cap-drop", cap]
        for cap in security.get("capabilities", {}).get("add", []):
            argv += ["--cap-add", cap]
        limits = container.get("resources", {}).get("limits", {})
        if "cpu" in limits:
            argv += ["--cpus", _cpus(str(limits["cpu"]))]
        if "memory" in limits:
            argv += ["--memory", _memory(str(limits["memory"]))]
        for source in container.get("envFrom", []):
            data = configmaps[source["configMapRef"]["name"]]["data"]
            for key, value in data.items():
                argv += ["--env", f"{key}={value}"]
        for var in container.get("env", []):
            if "value" not in var:
                raise NotImplementedError(f"env {var}: only literal values are translated")
            argv += ["--env", f"{var['name']}={var['value']}"]
        for port in container.get("ports", []):
            assert port.get("protocol", "TCP") == "TCP"
            argv += ["--publish", f"127.0.0.1:{host_port}:{port['containerPort']}/tcp"]
        for mount in container.get("volumeMounts", []):
            if set(mount) - {"name", "mountPath", "readOnly"}:
                raise NotImplementedError(f"volumeMount {mount}")
            target = f"{volumes[mount['name']][0]}:{mount['mountPath']}"
            argv += ["--volume", target + (":ro" if mount.get("readOnly") else "")]
        argv += ["--stop-timeout", str(grace_s)]
        if "command" in container:  # Kubernetes: command replaces ENTRYPOINT, and the image's CMD is dropped
            argv += ["--entrypoint", json.dumps(container["command"])]
        argv.append(container["image"])
        argv += [str(a) for a in container.get("args", [])]
        return argv

    inits = [run_args(c, f"{prefix}-{c['name']}", detach=False) for c in pod.get("initContainers", [])]
    (server,) = pod["containers"]
    return {"volumes": volumes, "fs_group": fs_group, "init": inits,
            "server": run_args(server, f"{prefix}-{server['name']}", detach=True),
            "server_name": f"{prefix}-{server['name']}", "grace_s": grace_s,
            "probes": {kind: server[kind] for kind in ("startupProbe", "readinessProbe", "livenessProbe")
                       if kind in server}}


# ---------------------------------------------------------------- images and the running pod

def build(target: str, tag: str, *build_args: str) -> float:
    """podman build of one Dockerfile target; returns the seconds it took."""
    argv = ["build", "--format", "docker", "--pull=never", "--network", "host", "--target", target, "--tag", tag]
    if CA_BUNDLE.exists():  # the machine's CA bundle for pip, for the RUN steps only (deploy/image/pip.conf)
        argv += ["--volume", f"{CA_BUNDLE}:{CA_BUNDLE}:ro", "--volume", f"{PIP_CONF}:/etc/pip.conf:ro"]
    for arg in build_args:
        argv += ["--build-arg", arg]
    t0 = time.monotonic()
    podman(*argv, str(REPO), timeout=BUILD_TIMEOUT_S)
    return time.monotonic() - t0


def logs(container: str) -> str:
    result = podman("logs", container, check=False)
    return result.stdout + result.stderr


def image_size(image: str) -> int:
    return int(podman("image", "inspect", "--format", "{{.Size}}", image).stdout.strip())


@pytest.fixture(scope="module")
def chart():
    return render_chart()


def report(request, line: str) -> None:
    """A line on pytest's terminal even under output capture (the image size belongs in CI's log)."""
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if capture is not None and reporter is not None:
        with capture.global_and_fixture_disabled():
            reporter.write_line("\ntest_image: " + line)
    else:
        print(line)


@pytest.fixture(scope="module")
def images(request, chart, slow_bundle):
    """Build the cpu and bundle targets under the image names the rendered Deployment uses.

    The bundle is the session's freshly exported slow_bundle (a 4-layer BERT with the MiniLM tokenizer,
    whose ~210-token items take milliseconds each, so that 200 requests are still in flight when the stop
    comes), copied into the build context as exported: the bundle target's RUN reads it from there."""
    deployment, _ = chart
    pod = deployment["spec"]["template"]["spec"]
    server_image = pod["containers"][0]["image"]
    bundle_image = pod["initContainers"][0]["image"]
    # Named by the bundle's content: podman's layer cache keys the bundle stage's RUN by its text (the BUNDLE
    # path), not by the files it reads, so a reused name could bring back an older bundle.
    digest = hashlib.sha256((slow_bundle / "manifest.json").read_bytes()).hexdigest()[:16]
    context_dir = REPO / "models" / f"image-test-{digest}"
    shutil.rmtree(context_dir, ignore_errors=True)
    shutil.copytree(slow_bundle, context_dir / "bundle")
    try:
        bundle_arg = f"BUNDLE={context_dir.relative_to(REPO)}/bundle"
        seconds = build("cpu", server_image), build("bundle", bundle_image, bundle_arg)
    finally:
        shutil.rmtree(context_dir, ignore_errors=True)
    # Every run leaves untagged images (the previous bundle image, build stages): a CI machine keeps podman's
    # store, so those older than a day go; younger ones are the layer cache of the next build.
    podman("image", "prune", "--force", "--filter", "until=24h", check=False)
    size, base = image_size(server_image), image_size(STANDINS[0])
    report(request, f"image {server_image}: {size / 1e6:.0f} MB ({base / 1e6:.0f} MB stand-in base + "
                    f"{(size - base) / 1e6:.0f} MB of rewardserve's layers), built in {seconds[0]:.0f} s; "
                    f"{bundle_image}: {image_size(bundle_image) / 1e6:.1f} MB, built in {seconds[1]:.0f} s")
    return server_image, bundle_image


@pytest.fixture(scope="module")
def pod(chart, images):
    """The rendered pod, running: volumes made as kubelet makes emptyDirs, the init container run to
    completion, then the server started and waited for on its startup probe's path."""
    deployment, configmap = chart
    prefix = f"rs-image-test-{os.getpid()}"
    port = free_port()
    spec = pod_to_podman(deployment, {configmap["metadata"]["name"]: configmap}, prefix, port)
    for name, _ in spec["volumes"].values():
        podman("volume", "rm", "--force", name, check=False)
    podman("rm", "--force", spec["server_name"], check=False)
    try:
        for name, mode in spec["volumes"].values():
            podman("volume", "create", name)
            mountpoint = Path(podman("volume", "inspect", "--format", "{{.Mountpoint}}", name).stdout.strip())
            os.chown(mountpoint, 0, spec["fs_group"] if spec["fs_group"] is not None else 0)
            os.chmod(mountpoint, mode)
        for argv in spec["init"]:
            result = podman(*argv, check=False)
            assert result.returncode == 0, (
                f"init container failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
        podman(*spec["server"])
        url = f"http://127.0.0.1:{port}"
        path = spec["probes"]["startupProbe"]["httpGet"]["path"]
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            state = podman("inspect", "--format", "{{.State.Status}}", spec["server_name"]).stdout.strip()
            assert state == "running", f"server container {state}:\n{logs(spec['server_name'])}"
            try:
                if httpx.get(url + path, timeout=2.0).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"not ready after {READY_TIMEOUT_S} s:\n{logs(spec['server_name'])}"
            time.sleep(0.2)
        yield {**spec, "url": url}
    finally:
        podman("rm", "--force", "--time", "0", spec["server_name"], check=False)
        for name, _ in spec["volumes"].values():
            podman("volume", "rm", "--force", name, check=False)


# ---------------------------------------------------------------- checks

def test_probe_paths_answer_as_the_probes_expect(pod):
    """An httpGet probe succeeds on 200-399: startup and readiness (/readyz) and liveness (/healthz), on the
    port the chart names `http`, reached through the published port."""
    assert set(pod["probes"]) == {"startupProbe", "readinessProbe", "livenessProbe"}
    for kind, probe in pod["probes"].items():
        assert probe["httpGet"]["port"] == "http", (kind, probe)
        r = httpx.get(pod["url"] + probe["httpGet"]["path"], timeout=probe.get("timeoutSeconds", 1))
        assert 200 <= r.status_code < 400, (kind, r.status_code, r.text)
    assert httpx.get(pod["url"] + "/readyz").json() == {"status": "ready"}


def test_server_runs_as_the_pod_spec_says(pod, chart):
    """Inside the container: the server (pid 1) has the chart's uid/gid, no capabilities at all, no new
    privileges, and the root filesystem refuses writes while /tmp (the emptyDir) takes them."""
    security = chart[0]["spec"]["template"]["spec"]["containers"][0]["securityContext"]
    status = podman("exec", pod["server_name"], "cat", "/proc/1/status").stdout
    fields = {line.split(":", 1)[0]: line.split(":", 1)[1].split() for line in status.splitlines() if ":" in line}
    assert fields["Uid"][:2] == [str(security["runAsUser"])] * 2, fields["Uid"]
    assert fields["Gid"][:2] == [str(security["runAsGroup"])] * 2, fields["Gid"]
    for cap in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(fields[cap][0], 16) == 0, (cap, fields[cap])
    assert fields["NoNewPrivs"] == ["1"]
    probe = ("import pathlib, sys\n"
             "for p in sys.argv[1:]:\n"
             "    try:\n        pathlib.Path(p).write_text('x'); print(p, 'written')\n"
             "    except OSError as e:\n        print(p, e.strerror)\n")
    out = podman("exec", pod["server_name"], "python", "-c", probe, "/opt/venv/x", "/home/rewardserve/x",
                 "/models/bundle/x", "/tmp/x").stdout.splitlines()
    assert out == ["/opt/venv/x Read-only file system", "/home/rewardserve/x Read-only file system",
                   "/models/bundle/x Read-only file system", "/tmp/x written"], out


def test_score_equals_the_host_run_service(pod, chart, start_server, slow_bundle):
    """The same bundle, the same requests: the container answers what the host-run server answers."""
    host = start_server(bundle_dir=slow_bundle)
    pairs = [("Human: What is the capital of France?\n\nAssistant:", "Paris."),
             ("Human: Say hi.\n\nAssistant:", "Hi!"),
             ("Human: Explain rain.\n\nAssistant:", "Water vapour condenses into drops that fall. " * 12)]
    pairs += [(f"Human: question {i}\n\nAssistant:", text) for i, text in enumerate(slow_backlog_responses(3))]
    for prompt, response in pairs:
        body = {"prompt": prompt, "response": response}
        got = httpx.post(pod["url"] + "/v1/score", json=body, timeout=30)
        want = httpx.post(host.url + "/v1/score", json=body, timeout=30)
        assert got.status_code == want.status_code == 200, (got.text, want.text)
        g, w = got.json(), want.json()
        assert abs(g["raw"] - w["raw"]) <= TOL and abs(g["score"] - w["score"]) <= TOL, (g, w)
        assert (g["model"], g["n_tokens"], g["truncated"]) == (w["model"], w["n_tokens"], w["truncated"]), (g, w)
    (got,), (want,) = (httpx.get(url + "/v1/models").json()["data"] for url in (pod["url"], host.url))
    # the runtime differs only by the threads: the chart's INTRA_OP_THREADS (from its ConfigMap) vs the host's 1
    threads = int(chart[1]["data"]["REWARDSERVE_INTRA_OP_THREADS"])
    assert got.pop("runtime") == {**want.pop("runtime"), "intra_op_threads": threads}
    assert got == want


def test_podman_stop_during_200_requests_loses_none(pod):
    """`podman stop` (SIGTERM, then SIGKILL after the pod's grace period) while 200 requests are queued or in
    flight: every request gets an answer, a 200 with a score or a 503 draining with Retry-After, none is
    dropped at the connection, and the server exits 0 inside the grace period. Runs last: it stops the pod."""
    responses = slow_backlog_responses(200)
    requests = [http_request(pod["url"], "POST", "/v1/score",
                             json.dumps({"prompt": f"Human: q{i}\n\nAssistant:", "response": r}).encode(), J)
                for i, r in enumerate(responses)]
    result: dict[str, list] = {}
    load = threading.Thread(target=lambda: result.setdefault("answers", raw_burst(pod["url"], requests, 120.0)))
    load.start()
    queued, deadline = 0.0, time.monotonic() + 30
    with httpx.Client(base_url=pod["url"], timeout=10.0) as c:
        while queued < 20 and time.monotonic() < deadline and load.is_alive():
            queued = metric(c.get("/metrics").text, "rewardserve_queue_depth")
    assert queued >= 20, "never saw queued work; the test cannot check the stop"
    t0 = time.monotonic()
    podman("stop", pod["server_name"], timeout=pod["grace_s"] + 30)
    stop_s = time.monotonic() - t0
    load.join(120)
    assert not load.is_alive()
    ok, refused = 0, 0
    for i, answer in enumerate(result["answers"]):
        assert isinstance(answer, RawAnswer), f"request {i} lost: {answer}"
        if answer.status == 200:
            assert set(answer.json()) >= {"score", "raw"}, answer.body
            ok += 1
        else:
            assert answer.status == 503 and answer.json()["error"]["type"] == "draining", answer.body
            assert answer.headers["retry-after"]
            refused += 1
    assert ok + refused == 200 and ok >= queued, (ok, refused, queued)
    code = int(podman("inspect", "--format", "{{.State.ExitCode}}", pod["server_name"]).stdout.strip())
    log = logs(pod["server_name"])
    assert code == 0 and stop_s < pod["grace_s"], (code, stop_s, log[-2000:])
    assert "draining: refusing new work" in log and "Application shutdown complete" in log, log[-2000:]
    print(f"podman stop with {queued:.0f} queued: {ok} answered 200, {refused} refused 503, exit 0 after "
          f"{stop_s:.1f} s")
