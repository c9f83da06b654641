"""The served model name comes from the bundle's manifest, set at export, not from the bundle directory's name
(issue 22, item 5): `make serve` wrote models/default/bundle, and every answer and /v1/models called the model
"bundle".

`rewardserve export --name my-rm` is what /v1/models, /v1/score and the compat answers (/classify, /pooling) say;
without --name, a checkpoint of `rewardserve train` is named after its base model ("<base>-rm",
"all-MiniLM-L6-v2-rm" for the default base: what `rewardserve up`, and so `make serve`, exports), an imported
one after its checkpoint directory (tests/test_export_auto.py); a bundle written before names existed is served
under its directory's name, as it was.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import pytest

from service.cli import main as rewardserve


def checkpoint_of(bundle: Path) -> Path:
    """The checkpoint conftest's session bundle was exported from (tests/helpers.py train_and_export: a tiny
    BERT at ROOT/tiny-bert trained into ROOT/run, whose best/ is exported to ROOT/tiny-rm)."""
    best = bundle.parent / "run" / "best"
    assert (best / "reward_config.json").is_file(), best
    return best


def test_a_trainer_checkpoint_is_named_after_its_base_model_not_the_bundle_directory(bundle, tmp_path, capsys):
    from export.exporter import bundle_name
    from export.model import default_base_path
    from service.bundle import read_manifest

    best = checkpoint_of(bundle)
    assert read_manifest(bundle).name == "tiny-bert-rm"  # its base is ROOT/tiny-bert; the directory is tiny-rm
    capsys.readouterr()
    rewardserve(["export", str(best), "--out", str(tmp_path / "bundle")])  # what `make serve`'s bundle is called
    out, err = capsys.readouterr()
    assert "--format" not in err, err  # a trainer checkpoint: ONNX, no announcement
    manifest = read_manifest(tmp_path / "bundle")
    assert manifest.model_format == "onnx" and manifest.name == "tiny-bert-rm"
    # the default base (what `rewardserve up` trains on) gives the name the docs promise
    config = json.loads((best / "reward_config.json").read_text())
    mine = tmp_path / "minilm-best"
    mine.mkdir()
    (mine / "reward_config.json").write_text(json.dumps({**config, "base_model": str(default_base_path())}))
    assert bundle_name(mine) == "all-MiniLM-L6-v2-rm"
    (mine / "reward_config.json").write_text(json.dumps({**config, "base_model": "Qwen/Qwen2.5-0.5B"}))
    assert bundle_name(mine) == "Qwen2.5-0.5B-rm"  # a hub id: its name, without the organisation


def test_the_name_given_at_export_is_what_models_score_and_compat_answers_say(bundle, start_server, tmp_path,
                                                                                capsys):
    from service.bundle import open_bundle

    target = tmp_path / "bundle"  # the directory's name must not leak into any answer
    rewardserve(["export", str(checkpoint_of(bundle)), "--out", str(target), "--name", "my-rm"])
    assert open_bundle(target)[0].name == "my-rm"
    server = start_server(target)  # a real `rewardserve serve` on 127.0.0.1
    models = httpx.get(server.url + "/v1/models", timeout=30).json()
    assert [m["id"] for m in models["data"]] == ["my-rm"], models
    score = httpx.post(server.url + "/v1/score", json={"prompt": "Human: Hi?\n\nAssistant:", "response": "Hello."},
                       timeout=30)
    assert score.status_code == 200 and score.json()["model"] == "my-rm", score.text
    classify = httpx.post(server.url + "/classify", json={"model": "/some/local/path", "input": "Hi? Hello."},
                          timeout=30)
    assert classify.status_code == 200 and classify.json()["model"] == "my-rm", classify.text
    pooling = httpx.post(server.url + "/pooling", json={"input": "Hi? Hello."}, timeout=30)
    assert pooling.status_code == 200 and pooling.json()["model"] == "my-rm", pooling.text


def test_a_bundle_without_a_name_is_served_under_its_directory_name(bundle, tmp_path):
    """A manifest without `name` (it is not in the checksums: manifest.json is the one file not hashed) still
    opens, named after its directory as bundles were before export set names."""
    from service.bundle import open_bundle

    old = tmp_path / "legacy-rm"
    shutil.copytree(bundle, old)
    manifest = json.loads((old / "manifest.json").read_text())
    del manifest["name"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    assert open_bundle(old)[0].name == "legacy-rm"


@pytest.mark.parametrize("name", ["", "my rm", "-rm", "x" * 129, "rm\n"])
def test_a_name_a_client_cannot_use_is_one_line_and_exit_2(name, bundle, tmp_path, capsys):
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        rewardserve(["export", str(checkpoint_of(bundle)), "--out", str(tmp_path / "b"), f"--name={name}"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("rewardserve export: --name "), err
    assert not (tmp_path / "b").exists()
