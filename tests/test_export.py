"""Exporter: ONNX/TorchScript bundles, parity (and its refusal), checksums, int8 quantization, decoder and
TRL-style checkpoints."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

import export.exporter as exporter
from service.data import read_pairs
from export.exporter import ParityError, export_bundle
from export.model import load_reward_model
from export.train import train
from service.bundle import BundleError, open_bundle
from service.parity import verify_bundle
from service.runtime import load_runtime
from tests.helpers import tiny_bert, tiny_decoder, write_jsonl
from tests.test_training import quick_config, tiny_pairs, trained_minilm


def ort_scores(bundle: Path, prompts, responses) -> np.ndarray:
    manifest, encoder = open_bundle(bundle)
    runtime = load_runtime(bundle, manifest, provider="cpu")
    return runtime.run(encoder.pad(encoder.encode(prompts, responses)))


# ---------------------------------------------------------------- real base model, short CI run

@pytest.fixture(scope="module")
def minilm_run(tmp_path_factory):
    """The default base (all-MiniLM-L6-v2) fine-tuned briefly on the shipped demo set (shared with
    test_training.py within a session)."""
    return trained_minilm(tmp_path_factory)


def test_export_onnx_bundle_passes_parity_and_verify(minilm_run, tmp_path):
    bundle = export_bundle(minilm_run, tmp_path / "bundle")
    manifest, _ = open_bundle(bundle)
    assert manifest.parity.passed and manifest.parity.max_abs_diff <= 1e-4
    assert manifest.parity.batch_invariance_max_diff <= 1e-4
    assert manifest.text.truncation == "keep_response_end" and manifest.pooling == "mean"
    assert len(manifest.normalization.percentiles) == 101 and manifest.normalization.std > 0
    assert "dev" in manifest.eval and set(manifest.files) >= {"model.onnx", "tokenizer.json"}
    assert verify_bundle(bundle)
    # normalization was computed from the exported model's own scores on the reference responses
    pairs, _ = read_pairs(bundle / "reference_pairs.jsonl")
    raw = ort_scores(bundle, [p.prompt for p in pairs] * 2, [p.chosen for p in pairs] + [p.rejected for p in pairs])
    assert abs(raw.mean() - manifest.normalization.mean) < 1e-5
    assert abs(manifest.normalization.percentile(np.median(raw)) - 50) < 2


# ---------------------------------------------------------------- tiny models: fast, exact checks

@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    return tiny_bert(tmp_path_factory.mktemp("tiny_bert"))


def test_corrupted_export_is_refused(tiny_base, tmp_path, monkeypatch):
    best = train(quick_config(tmp_path, tiny_base))
    real_write = exporter.write_onnx

    def write_then_corrupt(model, example, path):
        real_write(model, example, path)
        graph = onnx.load(str(path))
        init = max(graph.graph.initializer, key=lambda t: np.prod(t.dims))
        arr = numpy_helper.to_array(init).copy()
        arr *= 1.5
        init.CopyFrom(numpy_helper.from_array(arr, init.name))
        onnx.save(graph, str(path))

    monkeypatch.setattr(exporter, "write_onnx", write_then_corrupt)
    with pytest.raises(ParityError, match="parity failed"):
        export_bundle(best, tmp_path / "bundle")
    assert not (tmp_path / "bundle").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".bundle")], "staging dir left behind"


def test_checksum_mismatch_is_detected_and_names_the_file(tiny_base, tmp_path, capsys):
    best = train(quick_config(tmp_path, tiny_base))
    bundle = export_bundle(best, tmp_path / "bundle")
    assert verify_bundle(bundle)
    with open(bundle / "tokenizer.json", "ab") as f:
        f.write(b" ")
    capsys.readouterr()
    assert not verify_bundle(bundle)
    assert "tokenizer.json: sha256 mismatch" in capsys.readouterr().out
    with pytest.raises(BundleError, match="tokenizer.json"):
        open_bundle(bundle)
    (bundle / "tokenizer.json").unlink()
    with pytest.raises(BundleError, match="tokenizer.json: missing"):
        open_bundle(bundle)


def test_torchscript_bundle_matches_pytorch(tiny_base, tmp_path):
    best = train(quick_config(tmp_path, tiny_base))
    bundle = export_bundle(best, tmp_path / "ts", fmt="torchscript")
    manifest, _ = open_bundle(bundle)
    assert manifest.model_file == "model.pt" and manifest.parity.max_abs_diff <= 1e-4
    assert verify_bundle(bundle)


def test_static_int8_scores_do_not_depend_on_batch_neighbours(tiny_base, tmp_path):
    best = train(quick_config(tmp_path, tiny_base))
    bundle = export_bundle(best, tmp_path / "int8", quantize="int8")
    manifest, _ = open_bundle(bundle)
    assert manifest.precision == "int8-static" and manifest.model_file == "model.int8.onnx"
    assert manifest.parity.batch_invariance_max_diff <= 1e-4
    assert manifest.parity.pairwise_agreement >= 0.95


def test_dynamic_int8_runs_items_alone_so_scores_do_not_depend_on_batch_neighbours(tiny_base, tmp_path):
    """Dynamic int8 scales activations per run: the runtime's hint caps runs at one item, so a score
    is the same whether the item is scored alone or with 31 others, through the same path the
    service's batcher takes."""
    from service.parity import batch_dependence
    from service.scorer import score_with_runtime
    from service.runtime import load_runtime

    best = train(quick_config(tmp_path, tiny_base))
    bundle = export_bundle(best, tmp_path / "dyn", quantize="int8-dynamic")
    manifest, encoder = open_bundle(bundle)
    assert manifest.precision == "int8-dynamic"
    assert manifest.parity.batch_invariance_max_diff <= 1e-4
    assert "alone" in manifest.parity.note
    runtime = load_runtime(bundle, manifest, provider="cpu", intra_op_threads=1)
    assert runtime.batch_hint.max_batch_size == 1
    pairs, _ = read_pairs(bundle / "reference_pairs.jsonl")
    items = encoder.encode([p.prompt for p in pairs[:32]], [p.chosen for p in pairs[:32]])
    together = score_with_runtime(runtime, encoder, items)
    alone = np.array([runtime.run(encoder.pad([it]))[0] for it in items])
    assert np.max(np.abs(together - alone)) <= 1e-6
    # …and the cap is what makes it so: one padded run of all 32 would move scores.
    assert batch_dependence(runtime, encoder, items) > 1e-4
    # `rewardserve eval` scores what the server serves: one item per run here too (it ran batches of 64).
    from service.evaluate import score_pairs

    offline = score_pairs(manifest, encoder, runtime, [p.prompt for p in pairs[:32]], [p.chosen for p in pairs[:32]])
    assert np.max(np.abs(offline - alone)) <= 1e-6


def test_verify_reads_the_reference_pairs_in_any_input_format(tiny_base, tmp_path):
    """--reference may be in any supported format; verify and the fp16 startup check read it back with read_pairs."""
    best = train(quick_config(tmp_path, tiny_base))
    implicit = write_jsonl(tmp_path / "implicit.jsonl", [
        {"chosen": f"\n\nHuman: q{i}?\n\nAssistant: a good answer {i}",
         "rejected": f"\n\nHuman: q{i}?\n\nAssistant: no"} for i in range(12)])
    bundle = export_bundle(best, tmp_path / "b", reference=str(implicit))
    assert verify_bundle(bundle)
    pairs, _ = read_pairs(bundle / "reference_pairs.jsonl", strict=True)
    assert len(pairs) == 12 and pairs[0].prompt.endswith("Assistant:")


def test_export_of_a_training_output_directory_exports_its_best_checkpoint(tiny_base, tmp_path, capsys):
    """`rewardserve export OUT` on what `rewardserve train --out OUT` wrote (best/ and last/, no config.json)
    used to die inside transformers; it exports OUT/best and says so in one line."""
    best = train(quick_config(tmp_path, tiny_base))
    run = best.parent
    assert (run / "last").is_dir() and not (run / "config.json").exists()
    capsys.readouterr()
    bundle = export_bundle(run, tmp_path / "bundle")
    said = [line for line in capsys.readouterr().out.splitlines() if str(best) in line]
    assert len(said) == 1 and "best" in said[0], said
    manifest, _ = open_bundle(bundle)
    assert manifest.parity.passed and "dev" in manifest.eval  # best/'s evaluation results
    assert (bundle / "reference_pairs.jsonl").read_bytes() == (best / "reference_pairs.jsonl").read_bytes()


def test_checkpoint_without_reference_pairs_uses_the_reference_flag_or_the_demo_set(tmp_path, capsys):
    """A checkpoint trained elsewhere (TRL's RewardTrainer writes no reference_pairs.jsonl) used to fail with
    FileNotFoundError. It calibrates and checks parity on --reference when given, else on the packaged demo
    set (saying so in one line), so it needs no extra file; a --reference that does not exist is named."""
    from service.data import demo_data_path

    ckpt = tiny_decoder(tmp_path / "ckpt", "gpt2", classifier=True)
    capsys.readouterr()
    bundle = export_bundle(ckpt, tmp_path / "fallback")
    said = [line for line in capsys.readouterr().out.splitlines() if "demo" in line]
    assert len(said) == 1 and "reference_pairs.jsonl" in said[0] and "--reference" in said[0], said
    manifest, _ = open_bundle(bundle)
    demo, _ = read_pairs(demo_data_path())
    assert manifest.parity.passed and manifest.parity.reference_pairs == len(demo)
    assert (bundle / "reference_pairs.jsonl").read_bytes() == demo_data_path().read_bytes()
    own = write_jsonl(tmp_path / "own.jsonl", tiny_pairs(16))
    bundle = export_bundle(ckpt, tmp_path / "own", reference=str(own))
    assert open_bundle(bundle)[0].parity.reference_pairs == 16 and "demo" not in capsys.readouterr().out
    from export.exporter import ExportError

    with pytest.raises(ExportError, match="--reference .*nope.jsonl"):
        export_bundle(ckpt, tmp_path / "missing", reference=str(tmp_path / "nope.jsonl"))
    assert not (tmp_path / "missing").exists()


# ---------------------------------------------------------------- decoder and TRL-style checkpoints

@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_decoder_backbone_trains_with_last_token_pooling_and_exports(kind, tmp_path):
    base = tiny_decoder(tmp_path / "base", kind, classifier=False)
    best = train(quick_config(tmp_path, base))
    model, fmt = load_reward_model(best)
    assert model.pooling == "last" and fmt.join == "concat"
    bundle = export_bundle(best, tmp_path / "bundle")
    manifest, _ = open_bundle(bundle)
    assert manifest.parity.max_abs_diff <= 1e-4
    assert manifest.parity.batch_invariance_max_diff <= 1e-4  # right padding never leaks into the reward


@pytest.mark.parametrize("kind", ["gpt2", "llama", "qwen2"])
def test_trl_style_checkpoint_exports_and_matches_the_transformers_model(kind, tmp_path):
    """TRL's RewardTrainer saves AutoModelForSequenceClassification(num_labels=1) with save_pretrained."""
    from transformers import AutoModelForSequenceClassification

    ckpt = tiny_decoder(tmp_path / "ckpt", kind, classifier=True)
    write_jsonl(ckpt / "reference_pairs.jsonl", tiny_pairs(16))
    bundle = export_bundle(ckpt, tmp_path / "bundle")
    manifest, encoder = open_bundle(bundle)
    assert manifest.pooling == "native"
    pairs = tiny_pairs(12)
    prompts, responses = [p["prompt"] for p in pairs], [p["chosen"] for p in pairs]
    got = ort_scores(bundle, prompts, responses)
    hf = AutoModelForSequenceClassification.from_pretrained(ckpt).eval()
    with torch.no_grad():
        expected = np.array([hf(input_ids=torch.tensor([e.ids])).logits[0, 0].item()
                             for e in encoder.encode(prompts, responses)])
    assert np.std(expected) > 1e-3  # the check below is not vacuous
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


# ---------------------------------------------------------------- what the bundle tells clients

def test_manifest_names_the_base_model_not_its_path_on_the_build_machine(tiny_base, tmp_path):
    """GET /v1/models shows manifest.base_model and normalization.reference. They used to be absolute paths
    on the machine that built the bundle (the base model's directory, the checkpoint's reference file);
    now a name: a local model's directory name, a hub id as it is."""
    best = train(quick_config(tmp_path, tiny_base))
    assert json.loads((best / "reward_config.json").read_text())["base_model"] == str(tiny_base)  # the path
    manifest, _ = open_bundle(export_bundle(best, tmp_path / "bundle"))
    assert manifest.base_model == tiny_base.name
    for shown in (manifest.base_model, manifest.normalization.reference):
        assert shown and not Path(shown).is_absolute() and "/" not in shown, shown
        assert str(tmp_path) not in shown and str(tiny_base.parent) not in shown, shown
    from export.model import default_base_path, model_name

    assert model_name(default_base_path()) == "all-MiniLM-L6-v2"  # not its package folder's name ("model")
    assert model_name("sentence-transformers/all-MiniLM-L6-v2") == "sentence-transformers/all-MiniLM-L6-v2"
    assert model_name("Qwen2.5-0.5B") == "Qwen2.5-0.5B"
    assert model_name("/srv/models/team/my-rm/") == "my-rm" and model_name("./my-rm") == "my-rm"


# ---------------------------------------------------------------- file permissions

def _modes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root.parent)): p.stat().st_mode & 0o777 for p in [root, *root.rglob("*")]}


@pytest.mark.parametrize("umask, dir_mode, file_mode", [(0o022, 0o755, 0o644), (0o027, 0o750, 0o640)])
def test_bundle_gets_the_permissions_the_umask_gives(tiny_base, tmp_path, umask, dir_mode, file_mode):
    """The serving image runs as uid 10001 and reads a bind-mounted bundle: a bundle exported by root must be
    readable by others under the usual umask 022. The staging directory used to come from tempfile.mkdtemp
    (always 0700), and the rename kept that mode, so the bundle directory was owner-only whatever the umask."""
    best = train(quick_config(tmp_path, tiny_base))
    old = os.umask(umask)
    try:
        bundle = export_bundle(best, tmp_path / "bundle")
    finally:
        os.umask(old)
    modes = _modes(bundle)
    assert len(modes) > 5, modes  # the directory and its files
    expected = {name: dir_mode if (tmp_path / name).is_dir() else file_mode for name in modes}
    assert modes == expected
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".bundle")], "staging dir left behind"
