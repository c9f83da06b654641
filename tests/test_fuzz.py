"""Fuzzing the HTTP API: `schemathesis run URL/openapi.json --checks all` against the live server,
and the metrics exposition checked by `promtool check metrics`.

Schemathesis generates requests for every operation of /openapi.json (positive and negative data,
coverage and fuzzing phases) and checks every answer: no 5xx, status codes, content types, headers and
bodies as documented, schema-valid requests accepted, schema-invalid ones rejected, unsupported methods
answered 405 with Allow, and requests without the API key refused (the server runs with keys, the fuzzer
sends one). FUZZ_EXAMPLES (default 150) bounds the examples per operation; the run must still generate at
least FUZZ_MIN_CASES (default 1000) cases in all. FUZZ_SEED reproduces a run (its seed is printed).

Three rules of the API cannot be written in JSON Schema, so schema-valid requests breaking them get a
documented 422: the last chat message must be the assistant's non-empty response, and with
"truncate": false the input must fit the model's max_length in tokens (and /get_reward's prompts, when
given, must be as many as its queries). When this module is loaded as
schemathesis' hooks module (SCHEMATHESIS_HOOKS=tests.test_fuzz), its `filter_failure` hook drops exactly
those "schema-valid request rejected" findings (422 with one of these messages) and logs each one; every
other finding fails the test.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

EXEMPT_422 = (
    re.compile(r"messages\.\d+\.role: the last message must be the assistant's response"),
    re.compile(r"messages\.\d+\.content: must not be empty or whitespace-only"),
    re.compile(r"input is longer than the model's max_length of \d+ tokens"),
    re.compile(r"prompts: \d+ prompts for \d+ queries; give one per query"),  # /get_reward: equal lengths
)

HOOKS_MODULE = "tests.test_fuzz"

if os.environ.get("SCHEMATHESIS_HOOKS") == HOOKS_MODULE:  # loaded by the schemathesis CLI, not by pytest
    import schemathesis

    @schemathesis.hook
    def filter_failure(context, failure, case, response) -> bool:
        if type(failure).__name__ != "RejectedPositiveData" or response.status_code != 422:
            return True
        try:
            message = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            return True
        if not any(rule.search(message) for rule in EXEMPT_422):
            return True
        with open(os.environ["FUZZ_DROPPED_LOG"], "a") as log:
            log.write(json.dumps({"operation": case.operation.label, "message": message}) + "\n")
        return False

else:
    import httpx
    import pytest

    from tests.helpers import REPO

    def in_ci() -> bool:
        return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")

    def require_tool(name: str) -> str:
        path = shutil.which(name) or (str(Path(sys.executable).parent / name)
                                      if (Path(sys.executable).parent / name).exists() else None)
        if path is None:
            message = f"{name} not found (make test installs it: see the Makefile)"
            if in_ci():
                pytest.fail(message + "; CI is set, so a missing tool is an error")
            pytest.skip(message)
        return path

    @pytest.fixture(scope="module")
    def fuzzed(start_server, tmp_path_factory):
        """Run schemathesis once over every operation of a server with an API key.

        Returns (server, completed process, dropped findings, {operation: [failure text]})."""
        schemathesis = require_tool("schemathesis")
        work = tmp_path_factory.mktemp("fuzz")
        keys = work / "keys"
        keys.write_text("fuzz-key\n")
        server = start_server(api_keys_file=keys)
        dropped = work / "dropped.ndjson"
        junit = work / "junit.xml"
        examples = int(os.environ.get("FUZZ_EXAMPLES", "150"))
        seed = os.environ.get("FUZZ_SEED") or str(int.from_bytes(os.urandom(8), "big"))
        argv = [schemathesis, "run", server.url + "/openapi.json", "--checks", "all", "--max-examples",
                str(examples), "--seed", seed, "--workers", "1", "--generation-database", "none",
                "--header", "Authorization: Bearer fuzz-key", "--request-timeout", "30", "--no-color",
                "--report", "junit", "--report-junit-path", str(junit)]
        env = {**os.environ, "SCHEMATHESIS_HOOKS": HOOKS_MODULE, "PYTHONPATH": str(REPO),
               "FUZZ_DROPPED_LOG": str(dropped)}
        out = subprocess.run(argv, capture_output=True, text=True, timeout=540, cwd=work, env=env)
        print(f"\nschemathesis seed {seed} (FUZZ_SEED), {examples} examples per operation (FUZZ_EXAMPLES):\n"
              + out.stdout[-1200:])
        records = [json.loads(line) for line in dropped.read_text().splitlines()] if dropped.exists() else []
        assert junit.exists(), out.stdout[-5000:] + out.stderr[-3000:]
        failures = {case.get("name"): [f"[{f.get('message')}] {f.text or ''}" for f in case
                                       if f.tag in ("failure", "error")]
                    for case in ET.parse(junit).getroot().iter("testcase")}
        return server, out, records, failures

    def core(operation: str) -> bool:
        path = operation.split(" ", 1)[1]
        return path.startswith("/v1/") or path in ("/healthz", "/readyz", "/metrics")

    def test_fuzzing_generates_over_1000_cases_over_every_route(fuzzed):
        server, out, dropped, failures = fuzzed
        generated = re.search(r"(\d+) generated", out.stdout)
        assert generated, out.stdout[-3000:] + out.stderr[-2000:]
        minimum = int(os.environ.get("FUZZ_MIN_CASES", "1000"))
        assert int(generated.group(1)) >= minimum, f"only {generated.group(1)} cases generated"
        schema = httpx.get(server.url + "/openapi.json").json()
        operations = {f"{method.upper()} {path}" for path, ops in schema["paths"].items() for method in ops}
        assert set(failures) == operations  # every operation was fuzzed
        for record in dropped:  # (the hook drops only these; listed for the record)
            assert any(rule.search(record["message"]) for rule in EXEMPT_422), record
        assert server.proc.poll() is None, "the server died while being fuzzed"
        assert httpx.get(server.url + "/readyz").status_code == 200

    def test_fuzzing_the_core_api_finds_nothing(fuzzed):
        """/v1/*, probes and /metrics: no 5xx, every answer as documented, the schema exact."""
        _, out, _, failures = fuzzed
        found = {op: texts for op, texts in failures.items() if core(op) and texts}
        assert not found, "\n\n".join(f"{op}:\n" + "\n".join(texts) for op, texts in found.items())

    def test_fuzzing_the_compatibility_routes_finds_nothing(fuzzed):
        """/get_reward, /classify, /predict (service/compat.py) held to the same checks."""
        _, out, _, failures = fuzzed
        found = {op: texts for op, texts in failures.items() if not core(op) and texts}
        assert not found, "\n\n".join(f"{op}:\n" + "\n".join(texts) for op, texts in found.items())

    def test_openapi_documents_every_route_and_metrics_as_text(fuzzed):
        server, _, _, _ = fuzzed
        schema = httpx.get(server.url + "/openapi.json").json()
        assert set(schema["paths"]) >= {"/v1/score", "/v1/score/batch", "/v1/rank", "/v1/compare", "/v1/models",
                                        "/healthz", "/readyz", "/metrics"}
        assert set(schema["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == {"text/plain"}
        responses = schema["paths"]["/v1/score"]["post"]["responses"]
        assert {"200", "400", "401", "403", "413", "415", "422", "500", "503", "504"} <= set(responses)
        assert "Retry-After" in responses["503"]["headers"] and "X-Error-Id" in responses["500"]["headers"]
        assert schema["components"]["schemas"]["BatchScoreRequest"]["properties"]["items"]["maxItems"] == 256

    def test_metrics_exposition_passes_promtool(fuzzed):
        """After the fuzz run every metric family has samples (errors, refusals, batches): the text
        exposition must pass `promtool check metrics` (format and naming lint) with no complaint."""
        promtool = require_tool("promtool")
        server, _, _, _ = fuzzed
        text = httpx.get(server.url + "/metrics").text
        assert 'rewardserve_requests_total{route="/v1/score",status="422"}' in text
        out = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and not out.stdout.strip() and not out.stderr.strip(), out.stdout + out.stderr
        # promtool itself must be able to fail: a malformed exposition is refused
        bad = subprocess.run([promtool, "check", "metrics"], input="rewardserve_bad{le=} x\n", capture_output=True,
                             text=True, timeout=60)
        assert bad.returncode != 0
