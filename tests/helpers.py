"""Helpers shared by the tests (fixtures live in conftest.py, which imports from here).

  * paths, ports, metrics: REPO, free_port, metric;
  * models and data built inside the tests, no downloads: tiny_bert, tiny_decoder (random-init
    checkpoints on the real all-MiniLM-L6-v2 tokenizer, so token ids are real), write_jsonl,
    train_and_export (the real trainer and exporter), copy_bundle, slow_backlog_responses;
  * servers: ServerProcess (a `rewardserve serve` subprocess, started by conftest's start_server),
    InProcessServer (`create_app(settings, runtime=...)` under a real uvicorn in a thread, where a test
    needs to see or break the runtime) and RecordingRuntime (wraps the real runtime: records the rows it
    computes, can be slowed or made to fail);
  * HTTP: fire (httpx, all requests at once), and a minimal HTTP/1.1 client on plain sockets, so that what
    is timed is the server: http_request, raw_burst, RawAnswer, parse_answer, send_headers_only,
    send_scores_and_hold, raw_request, established_connections, server_ms.
"""

from __future__ import annotations

import asyncio
import json
import re
import selectors
import shutil
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
J = {"Content-Type": "application/json"}


# ---------------------------------------------------------------- paths, ports, metrics

def metric(text: str, name: str, **labels) -> float:
    """Value of one sample in a Prometheus text exposition (0 if absent)."""
    label_text = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    pattern = re.escape(name) + (r"\{" + re.escape(label_text) + r"\}" if labels else "") + r" (\S+)"
    match = re.search(r"^" + pattern + "$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def in_ci() -> bool:
    """CI=true (any value but empty/0/false/no): the suite's one switch that turns a skip into a failure."""
    import os

    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def skip_or_fail_in_ci(message: str, module_level: bool = False) -> None:
    """Skip locally where something the test needs is missing; fail under CI, where a skip would hide that
    the test never ran (tests/test_deploy.py, test_fuzz.py and test_monitoring.py do the same for tools).
    module_level=True: called while a test module is imported (skips, or fails, the whole module)."""
    import pytest

    if in_ci():
        pytest.fail(message + " (CI is set, so this is an error, not a skip)", pytrace=False)
    pytest.skip(message, allow_module_level=module_level)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- models and data

TINY = dict(hidden_size=32, num_attention_heads=2, intermediate_size=64)


def copy_tokenizer(out: Path) -> None:
    from export.model import TOKENIZER_FILES, default_base_path

    src = default_base_path()
    for name in TOKENIZER_FILES:
        if (src / name).exists():
            shutil.copyfile(src / name, out / name)


def tiny_bert(out: Path, seed: int = 0, **sizes) -> Path:
    """sizes override the tiny defaults (hidden_size=..., num_hidden_layers=...) where a test needs a
    model whose compute is not negligible."""
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=30522, **{"num_hidden_layers": 2, "max_position_embeddings": 256, **TINY, **sizes})
    BertModel(config, add_pooling_layer=False).save_pretrained(out)
    copy_tokenizer(out)
    return out


# A chat template that starts with the BOS token, as many decoder reward models have.
BOS_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}"
                "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def with_demo_reference(ckpt: Path, n: int = 16) -> Path:
    """`ckpt` with the demo set's first n pairs as its reference_pairs.jsonl (what import scores for parity)."""
    from service.data import demo_data_path, read_pairs

    pairs, _ = read_pairs(demo_data_path())
    write_jsonl(ckpt / "reference_pairs.jsonl",
                [{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected} for p in pairs[:n]])
    return ckpt


def hf_reward_model(ckpt: Path):
    """(tokenizer, sequence-classification model in eval mode) of a checkpoint, as transformers loads it."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    return AutoTokenizer.from_pretrained(ckpt), AutoModelForSequenceClassification.from_pretrained(ckpt).eval()


def bos_chat_decoder(out: Path, seed: int = 0, **tokenizer_config) -> Path:
    """A tiny llama reward checkpoint (tiny_decoder) whose tokenizer adds [CLS] as BOS and whose chat template
    (BOS_TEMPLATE) writes it too: the BOS guards' case. `tokenizer_config`: more tokenizer_config.json keys."""
    from tokenizers import Tokenizer, processors

    ckpt = tiny_decoder(out, "llama", classifier=True, seed=seed)
    tok = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A", pair="[CLS] $A [CLS] $B",
                                                       special_tokens=[("[CLS]", tok.token_to_id("[CLS]"))])
    tok.save(str(ckpt / "tokenizer.json"))
    config = json.loads((ckpt / "tokenizer_config.json").read_text())
    config.update(bos_token="[CLS]", eos_token="[SEP]", chat_template=BOS_TEMPLATE,
                  tokenizer_class="PreTrainedTokenizerFast", **tokenizer_config)  # tokenizer.json as is
    (ckpt / "tokenizer_config.json").write_text(json.dumps(config))
    return ckpt


def tiny_decoder(out: Path, kind: str, classifier: bool, seed: int = 0) -> Path:
    """kind: gpt2 | llama | qwen2. classifier=True saves a *ForSequenceClassification with num_labels=1,
    exactly what TRL's RewardTrainer writes; False saves a bare backbone for our own head."""
    import torch
    import transformers as tf

    torch.manual_seed(seed)
    if kind == "gpt2":
        config = tf.GPT2Config(vocab_size=30522, n_embd=32, n_layer=2, n_head=2, n_positions=256,
                               pad_token_id=0, num_labels=1)
        cls = tf.GPT2ForSequenceClassification if classifier else tf.GPT2Model
    elif kind == "llama":
        config = tf.LlamaConfig(vocab_size=30522, num_hidden_layers=2, num_key_value_heads=1,
                                max_position_embeddings=256, pad_token_id=0, num_labels=1, **TINY)
        cls = tf.LlamaForSequenceClassification if classifier else tf.LlamaModel
    elif kind == "qwen2":
        config = tf.Qwen2Config(vocab_size=30522, num_hidden_layers=2, num_key_value_heads=1,
                                max_position_embeddings=256, pad_token_id=0, num_labels=1, **TINY)
        cls = tf.Qwen2ForSequenceClassification if classifier else tf.Qwen2Model
    else:
        raise ValueError(kind)
    model = cls(config)
    if classifier:
        torch.nn.init.normal_(model.score.weight, std=0.5)  # a visible, non-trivial reward signal
    model.save_pretrained(out)
    copy_tokenizer(out)
    return out


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def train_and_export(base: Path, name: str, **config) -> Path:
    """One epoch of the real trainer on the demo set, then the real exporter: an fp32 ONNX bundle beside base."""
    from export.exporter import export_bundle
    from export.train import TrainConfig, train
    from service.data import demo_data_path

    root = base.parent
    checkpoint = train(TrainConfig(data=str(demo_data_path()), base=str(base), out=str(root / "run"), epochs=1,
                                   threads=2, progress=False, **config))
    return export_bundle(checkpoint, root / name, fmt="onnx")


def slow_backlog_responses(n: int) -> list[str]:
    """n distinct ~210-token responses for slow_bundle: under its max_length, since a truncated response
    keeps its tail, and equal tails would be one cached item instead of n model runs."""
    return [f"candidate {i}: " + "a long and careful answer " * 40 + f"(number {i})" for i in range(n)]


def copy_bundle(bundle: Path, tmp_path: Path) -> Path:
    target = tmp_path / "bundle"
    shutil.copytree(bundle, target)
    return target


# ---------------------------------------------------------------- servers

@dataclass
class ServerProcess:
    url: str
    proc: subprocess.Popen
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM (graceful drain), then SIGKILL if it does not exit in time; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def finish_planted_bundle(out: Path, encoder, text, reference: Path) -> Path:
    """Make `out` (a tokenizer and a planted model.onnx already in it) a servable bundle: its normalization
    computed from the `reference` pairs' scores by the real runtime, as the exporter calibrates, and a
    manifest (parity trivially passed: the ONNX graph is the model)."""
    from service.bundle import Manifest, Normalization, ParityReport, write_manifest
    from service.data import read_pairs
    from service.runtime import load_runtime
    from service.scorer import score_with_runtime

    pairs, _ = read_pairs(reference)
    names = ["input_ids", "attention_mask"] + (["token_type_ids"] if text.uses_token_type_ids else [])
    stub = Manifest.model_construct(model_format="onnx", model_file="model.onnx", precision="fp32",
                                    input_names=names)
    runtime = load_runtime(out, stub, provider="cpu", intra_op_threads=1)
    items = encoder.encode([p.prompt for p in pairs] * 2, [p.chosen for p in pairs] + [p.rejected for p in pairs])
    raw = score_with_runtime(runtime, encoder, items)
    std = float(raw.std())
    norm = Normalization(mean=float(raw.mean()), std=std if std > 1e-12 else 1.0,
                         percentiles=[float(x) for x in np.percentile(raw, np.arange(101))], n=len(raw),
                         reference=reference.name)
    manifest = Manifest(name=out.name, created_at="2026-01-01T00:00:00+00:00", model_format="onnx",
                        model_file="model.onnx", input_names=stub.input_names, text=text, pooling="synthetic",
                        normalization=norm, parity=ParityReport(reference_pairs=len(pairs), max_abs_diff=0.0,
                                                                threshold=1e-4, passed=True))
    write_manifest(out, manifest)
    return out


def launch_serve(source: list[str], logs: Path, settings: dict, env: dict, wait_ready: bool = True,
                 timeout: float = 90.0) -> ServerProcess:
    """`rewardserve serve <source> --port P` on a free 127.0.0.1 port, settings as CLI flags (max_queue=8 →
    --max-queue 8; a bool → --flag / --no-flag), output in logs/server-P.log; waits until /readyz answers
    200. With wait_ready=False the caller gets the process as soon as it exits or is ready (tests where
    startup must fail)."""
    import sys

    import pytest

    port = free_port()
    argv = [sys.executable, "-m", "service.cli", "serve", *source, "--host", "127.0.0.1", "--port", str(port)]
    for key, value in settings.items():
        flag = key.replace("_", "-")
        argv += [f"--{flag}" if value else f"--no-{flag}"] if isinstance(value, bool) else [f"--{flag}", str(value)]
    log = logs / f"server-{port}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=env)
    server = ServerProcess(f"http://127.0.0.1:{port}", proc, log)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            if wait_ready:
                pytest.fail(f"server exited with {proc.returncode}:\n{server.output()}")
            return server
        try:
            if httpx.get(server.url + "/readyz", timeout=2.0).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    server.stop()
    pytest.fail(f"server not ready after {timeout} s:\n{server.output()}")


class RecordingRuntime:
    """Wraps the real runtime through the `Runtime` interface: records every row it is asked to compute
    (token ids without padding), and can sleep per run or fail runs that hold a poison token."""

    def __init__(self, inner, delay_s: float = 0.0, poison_id: int | None = None):
        self.inner, self.delay_s, self.poison_id = inner, delay_s, poison_id
        self.name, self.provider = inner.name, inner.provider
        self.runs: list[tuple[float, list[tuple[int, ...]], bool]] = []  # (start, rows, failed)
        self.lock = threading.Lock()

    def run(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        start = time.monotonic()
        rows = [tuple(int(t) for t, m in zip(ids, mask) if m)
                for ids, mask in zip(inputs["input_ids"], inputs["attention_mask"])]
        failed = self.poison_id is not None and any(self.poison_id in row for row in rows)
        with self.lock:
            self.runs.append((start, rows, failed))
        if self.delay_s:
            time.sleep(self.delay_s)
        if failed:
            raise RuntimeError("injected fault: poison token in this batch")
        return self.inner.run(inputs)

    def describe(self) -> dict:
        return {**self.inner.describe(), "wrapped_by": "RecordingRuntime"}

    def __getattr__(self, name):  # anything else the service asks a runtime (e.g. batch hints): the real one's
        return getattr(self.inner, name)

    def computed_rows(self) -> list[tuple[int, ...]]:
        with self.lock:
            return [row for _, rows, _ in self.runs for row in rows]


class InProcessServer:
    """create_app(settings, runtime=...) served by a real uvicorn on 127.0.0.1, in a thread."""

    def __init__(self, bundle: Path, wrap=None, **settings):
        import uvicorn

        from service.app import create_app
        from service.bundle import read_manifest
        from service.runtime import load_runtime
        from service.settings import Settings

        options = {"intra_op_threads": 1, "tokenizer_threads": 1, "log_level": "warning", **settings}
        s = Settings(bundle=bundle, **options)
        runtime = load_runtime(bundle, read_manifest(bundle), provider=s.provider, intra_op_threads=s.intra_op_threads,
                               fp16=s.fp16, io_binding=s.ort_io_binding)
        self.runtime = wrap(runtime) if wrap else runtime
        self.app = create_app(s, runtime=self.runtime)
        self.service = self.app.state.engine
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=port, log_level="warning",
                                                    lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, name="uvicorn-test", daemon=True)

    def __enter__(self) -> InProcessServer:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert self.thread.is_alive(), "in-process server failed to start (see the log)"
            assert time.monotonic() < deadline, "in-process server not started after 60 s"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        assert not self.thread.is_alive(), "in-process server did not stop"

    def encode(self, prompt: str, response: str) -> tuple[int, ...]:
        """The token ids the runtime sees for this pair (what RecordingRuntime records)."""
        return tuple(self.service.registry.scorer(None).encoder.encode([prompt], [response])[0].ids)


# ---------------------------------------------------------------- HTTP

async def fire(url: str, cases, timeout: float = 60.0, headers=None) -> list:
    """All requests at once, each on its own connection; returns responses or the exception raised."""
    limits = httpx.Limits(max_connections=len(cases), max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as client:
        async def one(prompt, response):
            try:
                return await client.post("/v1/score", json={"prompt": prompt, "response": response}, headers=headers)
            except httpx.HTTPError as exc:
                return exc

        return await asyncio.gather(*(one(p, r) for p, r in cases))


def server_ms(response: httpx.Response) -> float:
    """Time the server spent on the request, from its `Server-Timing: app;dur=<ms>` header."""
    match = re.fullmatch(r"app;dur=([0-9.]+)", response.headers["server-timing"])
    assert match, response.headers["server-timing"]
    return float(match.group(1))


@dataclass
class RawAnswer:
    status: int
    headers: dict[str, str]
    body: bytes
    seconds: float  # from the request's first byte sent to the answer's last byte received

    def json(self):
        return json.loads(self.body)


def http_request(url: str, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None) -> bytes:
    host = url.removeprefix("http://")
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}", f"Content-Length: {len(body)}",
             *(f"{k}: {v}" for k, v in (headers or {}).items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def send_scores_and_hold(url: str, pairs: list[tuple[str, str]]) -> list[socket.socket]:
    """POST /v1/score for each (prompt, response) on its own socket and return the open sockets unread,
    so a test can hang up on them (close) at the moment it chooses."""
    host, port = url.removeprefix("http://").split(":")
    socks = []
    for prompt, response in pairs:
        sock = socket.create_connection((host, int(port)), timeout=10)
        sock.sendall(http_request(url, "POST", "/v1/score",
                                  json.dumps({"prompt": prompt, "response": response}).encode(), J))
        socks.append(sock)
    return socks


def raw_burst(url: str, requests: list[bytes], timeout: float) -> list[RawAnswer | str]:
    """Send every request at once, each on its own pre-opened connection, and time each answer.

    A minimal HTTP/1.1 client on plain sockets, so that what is timed is the server, not a client library:
    connections are opened first, then all requests are written back to back, then answers are read
    as they come. Returns an answer, or a string saying why there was none, per request."""
    host, port = url.removeprefix("http://").split(":")
    socks = [socket.create_connection((host, int(port)), timeout=timeout) for _ in requests]
    selector = selectors.DefaultSelector()
    buffers, started, results = {}, {}, [None] * len(requests)
    for i, (sock, data) in enumerate(zip(socks, requests)):
        started[i] = time.perf_counter()
        sock.sendall(data)
        sock.setblocking(False)
        buffers[i] = b""
        selector.register(sock, selectors.EVENT_READ, i)
    deadline = time.monotonic() + timeout
    open_count = len(socks)
    while open_count and time.monotonic() < deadline:
        for key, _ in selector.select(timeout=0.05):
            i, sock = key.data, key.fileobj
            try:
                chunk = sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError as exc:
                chunk, results[i] = b"", f"connection error: {exc!r}"
            buffers[i] += chunk
            answer = parse_answer(buffers[i])
            if answer is not None:
                status, headers, body = answer
                results[i] = RawAnswer(status, headers, body, time.perf_counter() - started[i])
            if answer is not None or not chunk:
                if results[i] is None:
                    results[i] = f"connection closed without a complete answer ({len(buffers[i])} bytes)"
                selector.unregister(sock)
                sock.close()
                open_count -= 1
    for i, sock in enumerate(socks):
        if results[i] is None:
            results[i] = f"no answer within {timeout} s"
            sock.close()
    return results


def parse_answer(data: bytes):
    """(status, lower-cased headers, body) of one complete HTTP/1.1 answer in data, or None while incomplete."""
    head, sep, rest = data.partition(b"\r\n\r\n")
    if not sep:
        return None
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", 0))
    if len(rest) < length:
        return None
    return int(status_line.split()[1]), headers, rest[:length]


def established_connections(pid: int, port: int) -> int:
    """Established TCP connections of process pid on its local port."""
    import psutil

    return sum(1 for c in psutil.Process(pid).net_connections(kind="tcp")
               if c.status == psutil.CONN_ESTABLISHED and c.laddr.port == port)


def send_headers_only(url: str, path: str, length: int) -> tuple[float, tuple | None]:
    """POST with Content-Length but no body; (seconds to the answer, parsed answer or None if none came)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=3) as sock:
        t0 = time.monotonic()
        sock.sendall(http_request(url, "POST", path, b"", J).replace(b"Content-Length: 0",
                                                                     f"Content-Length: {length}".encode()))
        data = b""
        try:
            while parse_answer(data) is None:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
        except socket.timeout:
            pass
        return time.monotonic() - t0, parse_answer(data)


def raw_request(url: str, path: str, body: dict) -> socket.socket:
    """Send one complete HTTP request on a plain socket and leave the connection open (no reading)."""
    host, port = url.removeprefix("http://").split(":")
    data = json.dumps(body).encode()
    sock = socket.create_connection((host, int(port)), timeout=10)
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


# Chats for the chat-template tests: one turn, several turns with a system message, a plain request.
CHATS = [
    [{"role": "user", "content": "How do I fix a squeaky door hinge?"},
     {"role": "assistant", "content": "Put a drop of oil on the hinge pin and swing the door a few times."}],
    [{"role": "system", "content": "You are terse."},
     {"role": "user", "content": "What is 534 minus 424?"},
     {"role": "assistant", "content": "110."},
     {"role": "user", "content": "And plus 10?"},
     {"role": "assistant", "content": "120, since 110 + 10 = 120."}],
    [{"role": "user", "content": "Say something nice."},
     {"role": "assistant", "content": "You asked kindly, and that is a good start to any day."}],
]


def v1_scores(url: str, pairs: list[tuple[str, str]]) -> list[dict]:
    """/v1/score bodies for (prompt, response) pairs, one request each (the reference the compat routes
    are checked against)."""
    import httpx

    out = []
    for prompt, response in pairs:
        r = httpx.post(url + "/v1/score", json={"prompt": prompt, "response": response}, timeout=30)
        assert r.status_code == 200, r.text
        out.append(r.json())
    return out
