"""The house rules of the code base, read from the source: one-way imports, small modules, a serving
image and a serving process without the offline side."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import httpx

from tests.helpers import REPO, free_port

PACKAGES = ("service", "export")
OFFLINE_DISPATCH = {"service.cli", "service.up"}  # may start `rewardserve train`/`export` (lazily)


def project_modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports_of(path: Path, modules: dict[str, Path]) -> set[str]:
    """Project modules `path` imports, anywhere in the file (lazy imports inside functions included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imports_of(path, modules) - {name} for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 on the stack, 2 done

    def visit(node: str, stack: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt, stack + [nxt])
                if cycle:
                    return cycle
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            cycle = visit(start, [start])
            if cycle:
                return cycle
    return None


def test_find_cycle_sees_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_between_project_modules():
    graph = import_graph()
    assert len(graph) > 20, sorted(graph)
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


def test_service_never_imports_export_outside_the_offline_dispatch():
    offenders = {name: sorted(m for m in deps if m.split(".")[0] == "export")
                 for name, deps in import_graph().items()
                 if name.split(".")[0] == "service" and name not in OFFLINE_DISPATCH}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_app_is_wiring_and_no_service_module_is_large():
    assert len((REPO / "service/app.py").read_text().splitlines()) <= 150
    sizes = {p.relative_to(REPO).as_posix(): len(p.read_text().splitlines()) for p in (REPO / "service").rglob("*.py")}
    assert {p: n for p, n in sizes.items() if n > 400} == {}


def test_no_test_hook_in_production_code():
    for path in project_modules().values():
        assert "runtime_wrapper" not in path.read_text(), path


def test_serving_images_copy_no_trainer_code():
    text = (REPO / "Dockerfile").read_text()
    copied = re.findall(r"(?m)^COPY (?!--from)(\S+) ", text)
    assert "service" in copied and "export" not in copied, copied
    assert text.count("the trainer must not be in the serving image") == 3  # cpu, gpu and gpu-decoder builds


def test_the_service_serves_with_export_and_torch_unimportable(bundle, tmp_path):
    """What the serving image holds: the service package alone. `export` and `torch` are made unimportable
    in the server process (sys.modules[name] = None), which then loads the bundle and scores."""
    port = free_port()
    code = ("import sys; sys.modules['export'] = None; sys.modules['torch'] = None; "
            "from service.server import main; main(sys.argv[1:])")
    proc = subprocess.Popen([sys.executable, "-c", code, "--bundle", str(bundle), "--port", str(port),
                             "--intra-op-threads", "1", "--log-level", "warning"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(600):
            try:
                if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, proc.stdout.read().decode()
            subprocess.run(["sleep", "0.1"])
        r = httpx.post(url + "/v1/score", json={"prompt": "Hi", "response": "Hello."}, timeout=10)
        assert r.status_code == 200 and json.loads(r.text)["model"], r.text
    finally:
        proc.terminate()
        proc.wait(30)
