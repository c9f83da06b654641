"""Session fixtures: a tiny real bundle (trained + exported in this session) and real server processes.

The bundle comes from the real trainer and exporter, on a random-init 2-layer BERT that uses the
MiniLM tokenizer: seconds instead of minutes, and the same code path as a production bundle.
Servers are real `rewardserve serve` subprocesses on free 127.0.0.1 ports, reached over HTTP.
Only fixtures live here; the helpers they use (and the tests import) are in tests/helpers.py.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.helpers import ServerProcess, launch_serve, tiny_bert, train_and_export

READY_TIMEOUT_S = 90.0  # a training job may be sharing the CPU


@pytest.fixture(scope="session")
def bundle(tmp_path_factory) -> Path:
    """Train (1 epoch, 96 demo pairs) and export an fp32 ONNX bundle of a tiny BERT."""
    base = tiny_bert(tmp_path_factory.mktemp("bundle") / "tiny-bert", max_position_embeddings=128)
    return train_and_export(base, "tiny-rm", max_length=64, batch_size=16, max_pairs=96)


@pytest.fixture(scope="session")
def slow_bundle(tmp_path_factory) -> Path:
    """A 4-layer, 256-wide BERT (max_length 256): one ~200-token item costs ~10 ms on one thread, where the
    tiny bundle's items cost tens of microseconds. For tests that need a backlog to still be there after a
    fixed wait: the tiny model clears thousands of queued items inside it on a fast machine."""
    base = tiny_bert(tmp_path_factory.mktemp("slow-bundle") / "base", hidden_size=256, num_attention_heads=4,
                     intermediate_size=1024, num_hidden_layers=4, max_position_embeddings=512)
    return train_and_export(base, "slow-rm", max_length=256, batch_size=8, max_pairs=8)


@pytest.fixture(scope="session")
def offline(bundle):
    """(manifest, encoder, runtime) loaded in-process the way `rewardserve eval` loads them."""
    from service.bundle import open_bundle
    from service.runtime import load_runtime

    manifest, encoder = open_bundle(bundle)
    return manifest, encoder, load_runtime(bundle, manifest, provider="cpu", intra_op_threads=1)


@pytest.fixture(scope="module")
def workload(offline):
    """200 distinct (prompt, response) pairs of varied length and their offline raw scores."""
    from service.data import demo_data_path, read_pairs
    from service.evaluate import score_pairs

    pairs, _ = read_pairs(demo_data_path())
    cases = [(p.prompt, p.chosen) for p in pairs[:100]] + [(p.prompt, p.rejected) for p in pairs[:100]]
    manifest, encoder, runtime = offline
    raw = score_pairs(manifest, encoder, runtime, [c[0] for c in cases], [c[1] for c in cases])
    return cases, raw


@pytest.fixture(scope="session")
def start_server(bundle, tmp_path_factory):
    """Factory: start_server(bundle_dir=None, wait_ready=True, **settings) -> ServerProcess.

    Settings are passed as CLI flags (max_queue=8 → --max-queue 8). With wait_ready=False the caller
    gets the process as soon as it exits or answers /readyz (for tests where startup must fail)."""
    logs = tmp_path_factory.mktemp("server-logs")
    started: list[ServerProcess] = []
    env = {k: v for k, v in os.environ.items() if not k.startswith("REWARDSERVE_")}

    def start(bundle_dir: Path | None = None, wait_ready: bool = True, **settings) -> ServerProcess:
        options = {"intra_op_threads": 1, "tokenizer_threads": 1, "log_level": "warning", **settings}
        server = launch_serve(["--bundle", str(bundle_dir or bundle)], logs, options, env, wait_ready,
                              READY_TIMEOUT_S)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop(timeout=10.0)


@pytest.fixture(scope="session")
def server(start_server) -> ServerProcess:
    """One server with default settings, shared by the API tests."""
    return start_server()
