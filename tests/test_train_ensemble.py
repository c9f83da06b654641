"""`rewardserve train --ensemble K` and `rewardserve export` of its output as a model repository (issue 26,
point 4), run as subprocesses the way a user runs them, on a tiny random-initialised BERT (real tokenizer,
real trainer, real exporter with its parity check, real `rewardserve verify`).

The measurement of real ensembles (MiniLM members on ../shared/data) is bench/ensemble_eval.py, not a test.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from export.ensemble import ENSEMBLE_FILE, TRAINING_FILE
from export.train import TrainConfig
from service.data import read_pairs
from service.parity import PARITY_FILE
from service.repository import scan
from tests.helpers import tiny_bert
from tests.test_cli import one_line_error, rewardserve

SMALL = ["--max-pairs", "16", "--max-length", "64", "--epochs", "1", "--batch-size", "8", "--threads", "2",
         "--no-progress"]


@pytest.fixture(scope="module")
def ensemble_run(tmp_path_factory):
    """K=2 members of a tiny BERT on 16 demo pairs: OUT with member-0/ and member-1/."""
    root = tmp_path_factory.mktemp("ensemble")
    base = tiny_bert(root / "base")
    out = root / "run"
    result = rewardserve("train", "--ensemble", 2, "--seed", 5, "--base", base, "--out", out, *SMALL)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def head_and_backbone(member: Path) -> dict:
    return load_file(str(member / "best" / "model.safetensors"))


def test_members_are_normal_training_dirs_with_seeds_seed_plus_i(ensemble_run):
    info = json.loads((ensemble_run / TRAINING_FILE).read_text())
    assert info["members"] == 2 and info["seeds"] == [5, 6] and info["bootstrap"] is False
    weights = []
    for i, seed in enumerate((5, 6)):
        member = ensemble_run / f"member-{i}"
        assert (member / "best" / "config.json").is_file() and (member / "last").is_dir()
        config = json.loads((member / "best" / "reward_config.json").read_text())["trainer_config"]
        assert config["seed"] == seed and config["out"] == str(member)
        weights.append(head_and_backbone(member))
    # different seeds: different heads at the start and a different data order, so different weights
    assert any(not (weights[0][k] == weights[1][k]).all() for k in weights[0])


def test_export_writes_a_repository_whose_members_verify(ensemble_run, tmp_path):
    repo = tmp_path / "repo"
    result = rewardserve("export", ensemble_run, "--out", repo, "--name", "helpful")
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in repo.iterdir()) == ["helpful", "helpful-0", "helpful-1"]
    spec = json.loads((repo / "helpful" / ENSEMBLE_FILE).read_text())
    assert spec == {"members": ["helpful-0", "helpful-1"], "aggregate": "mean", "lambda": 1.0}
    assert [p.name for p in (repo / "helpful").iterdir()] == [ENSEMBLE_FILE]  # no version folder beside it
    for i in range(2):
        versions = [p.name for p in (repo / f"helpful-{i}").iterdir()]
        assert versions == ["1"]
        manifest = json.loads((repo / f"helpful-{i}" / "1" / "manifest.json").read_text())
        assert manifest["name"] == f"helpful-{i}" and manifest["model_format"] == "onnx"
        verified = rewardserve("verify", repo / f"helpful-{i}" / "1")
        assert verified.returncode == 0, verified.stdout + verified.stderr
    layout = scan(repo)  # the repository parser the server uses reads it as two models and one ensemble
    assert not layout.errors and sorted(layout.models) == ["helpful-0", "helpful-1"]
    assert layout.ensembles["helpful"].error is None and layout.ensembles["helpful"].members == ["helpful-0",
                                                                                                 "helpful-1"]
    assert all(m.latest() == "1" and m.error is None for m in layout.models.values())
    # the two bundles serve two different models: their reference scores differ
    scores = [json.loads((repo / f"helpful-{i}" / "1" / PARITY_FILE).read_text())["exported_scores"]
              for i in range(2)]
    assert scores[0] != scores[1]

    # exporting again (a retrained ensemble) adds version 2 of each member and leaves version 1 as it was
    before = (repo / "helpful-0" / "1" / "manifest.json").read_bytes()
    again = rewardserve("export", ensemble_run, "--out", repo, "--name", "helpful", "--aggregate", "uwo",
                        "--lambda", "0.5")
    assert again.returncode == 0, again.stderr[-3000:]
    assert sorted(p.name for p in (repo / "helpful-0").iterdir()) == ["1", "2"]
    assert (repo / "helpful-0" / "1" / "manifest.json").read_bytes() == before
    spec = json.loads((repo / "helpful" / ENSEMBLE_FILE).read_text())
    assert spec == {"members": ["helpful-0", "helpful-1"], "aggregate": "uwo", "lambda": 0.5}


def test_bootstrap_gives_each_member_its_own_resample_and_one_dev_set(tmp_path):
    from export.ensemble import train_ensemble

    base = tiny_bert(tmp_path / "base")
    cfg = TrainConfig(out=str(tmp_path / "run"), base=str(base), max_pairs=24, max_length=64, epochs=1,
                      batch_size=8, threads=2, progress=False, seed=3)
    train_ensemble(cfg, 2, bootstrap=True)
    dev, _ = read_pairs(tmp_path / "run" / "dev.jsonl")
    samples = [read_pairs(tmp_path / "run" / f"member-{i}" / "bootstrap_train.jsonl")[0] for i in range(2)]
    assert all(len(s) == 24 for s in samples)
    assert samples[0] != samples[1]
    assert all(len(set(s)) < len(s) for s in samples)  # drawn with replacement: 24 draws of 24 repeat some
    assert not {p.prompt for s in samples for p in s} & {p.prompt for p in dev}  # dev prompts never trained on
    for i in range(2):
        config = json.loads((tmp_path / "run" / f"member-{i}" / "best" / "reward_config.json").read_text())
        assert config["trainer_config"]["dev"] == str(tmp_path / "run" / "dev.jsonl")
        assert config["trainer_config"]["data"].endswith(f"member-{i}/bootstrap_train.jsonl")


def test_ensemble_bad_input_is_one_line_and_exit_2(ensemble_run, tmp_path):
    cases = [
        (["train", "--bootstrap", "--out", tmp_path / "a"], "--bootstrap needs --ensemble K"),
        (["train", "--ensemble", "1", "--out", tmp_path / "b"], "--ensemble must be at least 2"),
        (["export", ensemble_run / "member-0", "--out", tmp_path / "c", "--aggregate", "min"],
         "--aggregate applies to an ensemble training directory"),
        (["export", ensemble_run, "--out", tmp_path / "d", "--lambda", "-1"], "--lambda must be >= 0"),
    ]
    for args, expected in cases:
        line = one_line_error(rewardserve(*args), args[0], 2)
        assert expected in line, (args, line)
    assert not (tmp_path / "c").exists() and not (tmp_path / "d").exists()
