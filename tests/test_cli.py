"""`rewardserve` command line, run as a subprocess the way a user runs it.

Bad input and refused checks end in one line on stderr, `rewardserve <command>: <message>`, and an exit
code (2: bad input, 1: a check failed), never a traceback. `up` says what it is about to do. The serving
side never imports the offline (torch) side.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import tiny_bert, tiny_decoder, write_jsonl

REPO = Path(__file__).resolve().parents[1]


def rewardserve(*args) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("REWARDSERVE_")}
    return subprocess.run([sys.executable, "-m", "service.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=600)


def one_line_error(result: subprocess.CompletedProcess, command: str, code: int) -> str:
    """The error line, after checking the exit code, that no traceback was printed, and that the error is one
    line, the last on stderr (libraries may print progress bars and warnings before it)."""
    assert result.returncode == code, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    ours = [line for line in lines if line.startswith("rewardserve ")]
    assert len(ours) == 1 and lines[-1] == ours[0], result.stderr
    assert ours[0].startswith(f"rewardserve {command}: "), ours[0]
    return ours[0]


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    return tiny_bert(tmp_path_factory.mktemp("tiny_bert"))


@pytest.fixture(scope="module")
def trl_checkpoint(tmp_path_factory):
    """What TRL's RewardTrainer saves: a *ForSequenceClassification with one label, no reference pairs."""
    return tiny_decoder(tmp_path_factory.mktemp("trl") / "ckpt", "gpt2", classifier=True)


# ---------------------------------------------------------------- train

def test_train_bad_input_is_one_line_and_exit_2(tiny_base, tmp_path):
    """Every one of these used to end in a traceback (or a bare SystemExit message with exit code 1)."""
    out = ["--out", tmp_path / "run", "--no-progress"]
    cases = [
        (["--data", tmp_path / "missing.jsonl"], "missing.jsonl: no such file"),
        (["--base", tiny_base, "--join", "pair", "--append-eos", "[SEP]"], "--append-eos needs --join concat"),
        (["--clip", "-1"], "--clip must be >= 0"),
        (["--base", tmp_path], "--base"),
        (["--data", write_jsonl(tmp_path / "one.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}])],
         "need at least one training pair and one dev pair"),
        (["--strict", "--data", write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "p", "chosen": "a"}])],
         "bad.jsonl:1: missing field 'rejected'"),
    ]
    for args, expected in cases:
        line = one_line_error(rewardserve("train", *args, *out), "train", 2)
        assert expected in line, (args, line)


# ---------------------------------------------------------------- export and verify

def test_export_bad_input_is_one_line_and_exit_2(trl_checkpoint, tmp_path):
    cases = [
        ([tmp_path / "nowhere"], "no such directory"),
        ([tmp_path], "not a checkpoint"),
        ([trl_checkpoint, "--reference", tmp_path / "nope.jsonl"], "--reference"),
        ([trl_checkpoint, "--format", "torchscript", "--quantize", "int8"], "--quantize applies to ONNX bundles only"),
    ]
    for args, expected in cases:
        line = one_line_error(rewardserve("export", *args, "--out", tmp_path / "bundle"), "export", 2)
        assert expected in line, (args, line)
    assert not (tmp_path / "bundle").exists()


def test_export_refused_by_parity_is_one_line_and_exit_1(tmp_path):
    """A model that cannot score (NaN weights) never passes parity: a failed check, exit 1, nothing written."""
    import torch
    from transformers import GPT2ForSequenceClassification

    ckpt = tiny_decoder(tmp_path / "ckpt", "gpt2", classifier=True)
    model = GPT2ForSequenceClassification.from_pretrained(ckpt)
    with torch.no_grad():
        model.score.weight.fill_(float("nan"))
    model.save_pretrained(ckpt)
    line = one_line_error(rewardserve("export", ckpt, "--out", tmp_path / "bundle"), "export", 1)
    assert "parity failed" in line
    assert not (tmp_path / "bundle").exists()


def test_verify_of_something_that_is_not_a_bundle_is_one_line_and_exit_2(tmp_path):
    line = one_line_error(rewardserve("verify", tmp_path), "verify", 2)
    assert "no manifest.json" in line


# ---------------------------------------------------------------- imports

def test_service_never_imports_the_offline_side_except_lazily_from_the_cli():
    """service/ is the torch-free serving side: no module imports export/ at import time; cli.py and up.py
    dispatch the offline commands from inside functions. Importing them loads neither torch nor export."""
    for path in sorted((REPO / "service").rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        lazy_ok = path.name in ("cli.py", "up.py")
        functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
        inside = {id(n) for f in functions for n in ast.walk(f)}
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(n == "export" or n.startswith("export.") for n in names):
                assert lazy_ok and id(node) in inside, f"{path.relative_to(REPO)}:{node.lineno} imports export"
    probe = ("import sys, service.cli, service.up; "
             "print(sorted(m for m in sys.modules if m == 'torch' or m == 'export' or m.startswith('export.')))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stdout + result.stderr


# ---------------------------------------------------------------- up

def test_up_says_what_it_is_about_to_do(tmp_path):
    """`up --retrain` with a bundle in place used to announce "no bundle at …"."""
    from service.up import plan

    bundle = tmp_path / "bundle"
    assert plan(bundle, retrain=False, data="") == (
        True, f"no bundle at {bundle}: training a default model (data: shipped demo set)")
    assert plan(bundle, retrain=True, data="") == plan(bundle, retrain=False, data="")
    bundle.mkdir()
    (bundle / "manifest.json").write_text("{}")
    assert plan(bundle, retrain=False, data="") == (False, f"using existing bundle {bundle} (pass --retrain to rebuild it)")
    build, message = plan(bundle, retrain=True, data="mine.jsonl")
    assert build and "no bundle" not in message
    assert message == f"retraining: replacing the bundle at {bundle} (data: mine.jsonl)"


# ---------------------------------------------------------------- help and quiet output

def help_text(*command) -> str:
    result = rewardserve(*command, "--help")
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr
    return result.stdout


def test_help_says_what_each_command_takes():
    """Each of these was missing from --help (issue 23, point 14)."""
    listing = rewardserve("--help")
    assert listing.returncode == 0 and "--format transformers" in listing.stderr, listing.stderr
    export = help_text("export")
    assert "{onnx,torchscript,transformers}" in export and "--format transformers" in export
    # up passes unknown options on to serve: its help lists them
    up = help_text("up")
    assert "--retrain" in up and "serve options" in up
    for serve_option in ("--port", "--max-queue", "--provider {auto,cpu,cuda}", "--api-keys-file"):
        assert serve_option in up, serve_option
    train = " ".join(help_text("train").split())
    for default in ("--out OUT output directory", "(default: runs/default)", "(default: 256)", "(default: 2.0)",
                    "(default: 16)", "(default: 5e-05)"):
        assert default in train, default
    assert "(default: True)" not in train and "(default: False)" not in train  # on/off switches show none
    serve = " ".join(help_text("serve").split())
    assert "--provider {auto,cpu,cuda}" in serve and "--log-level {critical,error,warning,info,debug,trace}" in serve
    assert "REWARDSERVE_API_KEYS:" in serve  # the environment-only keys, not just REWARDSERVE_API_KEYS_FILE
    for guarded in ("/v1/*", "/get_reward", "/classify", "/predict", "/rerank", "/invocations"):
        assert guarded in serve, guarded


def test_train_no_progress_and_export_print_no_bars_or_tracer_warnings(tiny_base, tmp_path):
    """`train --no-progress` used to print transformers' "Loading weights" and "Writing model shards" bars;
    `export` printed TracerWarnings ("might cause the trace to be incorrect") next to its passed parity."""
    data = write_jsonl(tmp_path / "pairs.jsonl", [
        {"prompt": f"Human: question {i}?\n\nAssistant:", "chosen": f"A helpful answer number {i}.",
         "rejected": "No."} for i in range(24)])
    run = tmp_path / "run"
    result = rewardserve("train", "--data", data, "--base", tiny_base, "--out", run, "--epochs", 1, "--batch-size", 8,
                         "--max-length", 32, "--threads", 1, "--dev-fraction", 0.25, "--no-progress")
    assert result.returncode == 0, result.stderr
    assert "best checkpoint" in result.stdout
    for bar in ("it/s", "%|", "Loading weights", "Writing model shards", "LOAD REPORT"):
        assert bar not in result.stderr, result.stderr
    result = rewardserve("export", run, "--out", tmp_path / "bundle")
    assert result.returncode == 0, result.stderr
    assert "bundle written" in result.stdout and "parity max abs diff" in result.stdout
    for warning in ("TracerWarning", "incorrect", "Warning"):
        assert warning not in result.stderr, result.stderr
