"""`rewardserve export CKPT --out B` without --format chooses: ONNX for a checkpoint `rewardserve train` wrote,
the transformers import for any other reward model checkpoint (said in one line on stderr), and an explicit
--format onnx that cannot work ends in one line naming --format transformers, exit code 2 (issue 22, item 3).

The checkpoints are the families of tests/test_decoder_archs.py (bf16 Mistral, Qwen3, Gemma 2, Gemma 3 text
and composite, ModernBERT), of tests/test_decoder_import.py (bf16 sharded Qwen2 with a chat template, Llama,
GPT-2, BERT, DeBERTa-v2) and an OpenRLHF RewardModel (tests/test_openrlhf_import.py), built with their
builders: tiny random-init models saved with save_pretrained, real tokenizers. The old CLI sent every one of
them to the legacy ONNX exporter (the bf16 Qwen2 died in it with "RuntimeError: ScalarType ComplexDouble is an
unexpected tensor scalar type"; the OpenRLHF one got a new, untrained head).

Each is exported through the real CLI entry point (service.cli.main, in-process: a subprocess per family
would spend most of the test importing torch) and then served: the bf16 Qwen2 of the issue over real HTTP
(uvicorn on 127.0.0.1, /v1/score against transformers' own forward of the checkpoint), every other family
through the bundle's runtime, one right-padded batch against the import's reference (the model's own
forward per item, unpadded, parity_reference.json).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from service.cli import main as rewardserve
from tests.helpers import REPO, InProcessServer, copy_tokenizer, tiny_decoder
from tests.test_decoder_archs import ARCHS, bpe_dirs, build_checkpoint  # noqa: F401 (bpe_dirs: a fixture)
from tests.test_decoder_import import qwen_rm
from tests.test_openrlhf_import import openrlhf_rm

TOL = 4e-5  # padded batch vs each item alone, fp32 (tests/test_decoder_archs.py measured 1e-5)
# the fp32 BERT and DeBERTa-v2 score in a narrow band (std 4e-3, 1.2e-3): their own test's tolerance, 1e-5
FAMILY_TOL = {"bert": 1e-5, "deberta-v2": 1e-5}
FAMILIES = [*ARCHS, "qwen2", "llama", "gpt2", "bert", "deberta-v2", "openrlhf"]
CLASS = {**{arch: cls for arch, (cls, _, _) in ARCHS.items()}, "qwen2": "Qwen2ForSequenceClassification",
         "llama": "LlamaForSequenceClassification", "gpt2": "GPT2ForSequenceClassification",
         "bert": "BertForSequenceClassification", "deberta-v2": "DebertaV2ForSequenceClassification",
         "openrlhf": "RewardModel"}


def foreign_checkpoint(family: str, out: Path, bpe: dict[str, Path]) -> Path:
    """The family's checkpoint at `out`, as its own test builds it."""
    import transformers as tf

    if family in ARCHS:
        return build_checkpoint(family, out, bpe)[0]
    if family == "qwen2":
        return qwen_rm(out)  # bf16, sharded, chat template: the issue's TRL checkpoint
    if family in ("llama", "gpt2"):
        return tiny_decoder(out, family, classifier=True)
    if family == "openrlhf":
        openrlhf_rm(out, shard=None)
        return out
    torch.manual_seed(0)  # BERT, DeBERTa-v2 as tests/test_decoder_import.py builds them
    sizes = dict(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                 max_position_embeddings=256, num_labels=1)
    if family == "bert":
        model = tf.BertForSequenceClassification(tf.BertConfig(**sizes))
    else:
        model = tf.DebertaV2ForSequenceClassification(tf.DebertaV2Config(**sizes, type_vocab_size=0))
    torch.nn.init.normal_(model.classifier.weight, std=2.0)
    model.save_pretrained(out)
    copy_tokenizer(out)
    return out


def few_pairs(tmp_path: Path) -> Path:
    """4 demo pairs as --reference: the PyTorch scoring that precedes an ONNX export stays short."""
    from service.data import demo_data_path

    few = tmp_path / "few.jsonl"
    few.write_text("".join(demo_data_path().read_text().splitlines(keepends=True)[:4]))
    return few


def export_without_format(ckpt: Path, out: Path, capsys) -> str:
    """`rewardserve export CKPT --out OUT` (no --format) through the CLI's entry point; returns its stderr."""
    capsys.readouterr()
    rewardserve(["export", str(ckpt), "--out", str(out), "--reference-pairs", "4"])
    return capsys.readouterr().err


def announced(err: str, ckpt: Path, cls: str) -> None:
    """Exactly one line of stderr says the checkpoint is imported, naming its class and --format transformers."""
    lines = [line for line in err.splitlines() if "--format" in line]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"{ckpt}: a {cls} checkpoint") and "--format transformers" in lines[0], lines[0]


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "qwen2"])
def test_export_without_format_imports_the_checkpoint_and_its_runtime_scores_like_its_own_forward(
        family, bpe_dirs, tmp_path, capsys):
    from service.bundle import open_bundle
    from service.data import read_pairs
    from service.runtime import load_runtime

    ckpt = foreign_checkpoint(family, tmp_path / f"{family}-rm", bpe_dirs)
    err = export_without_format(ckpt, tmp_path / "bundle", capsys)
    announced(err, ckpt, CLASS[family])
    assert "Traceback" not in err

    manifest, encoder = open_bundle(tmp_path / "bundle")  # checksums verified
    assert manifest.model_format == "transformers" and manifest.parity.passed
    assert manifest.name == f"{family}-rm"  # the checkpoint directory's name (item 5), not "bundle"
    pairs, _ = read_pairs(tmp_path / "bundle" / "reference_pairs.jsonl")
    assert len(pairs) == 4
    items = encoder.encode([p.prompt for p in pairs] * 2, [p.chosen for p in pairs] + [p.rejected for p in pairs])
    assert len({it.n_tokens for it in items}) > 1  # the batch below is really padded
    got = load_runtime(tmp_path / "bundle", manifest, provider="cpu").run(encoder.pad(items))
    want = np.array(json.loads((tmp_path / "bundle" / "parity_reference.json").read_text())["torch_scores"])
    tol = FAMILY_TOL.get(family, TOL)
    assert np.std(want) >= 100 * tol, want  # far above the tolerance: a check at it tells items apart
    np.testing.assert_allclose(got, want, atol=tol, rtol=0)


def test_the_issues_bf16_qwen2_exports_without_format_and_is_served_over_http(tmp_path, capsys):
    """The issue's case: a bf16 Qwen2ForSequenceClassification saved by TRL, `export` with no --format."""
    from transformers import AutoModelForSequenceClassification

    ckpt = qwen_rm(tmp_path / "qwen2-rm")
    err = export_without_format(ckpt, tmp_path / "bundle", capsys)
    announced(err, ckpt, "Qwen2ForSequenceClassification")
    model = AutoModelForSequenceClassification.from_pretrained(ckpt, dtype=torch.float32).eval()
    cases = [("Human: What is the capital of France?\n\nAssistant:", " Paris."),
             ("Human: Name a prime number.\n\nAssistant:", " Seven is a prime number, and so is eleven.")]
    with InProcessServer(tmp_path / "bundle") as server:
        info = httpx.get(server.url + "/v1/models", timeout=30).json()["data"][0]
        assert info["model_format"] == "transformers" and info["id"] == "qwen2-rm"
        for prompt, response in cases:
            r = httpx.post(server.url + "/v1/score", json={"prompt": prompt, "response": response}, timeout=60)
            assert r.status_code == 200, r.text
            ids = server.encode(prompt, response)
            with torch.no_grad():
                want = model(input_ids=torch.tensor([ids])).logits[0, 0].item()
            assert abs(r.json()["raw"] - want) <= TOL, (r.json(), want)


def test_format_onnx_on_a_bf16_decoder_is_one_line_naming_format_transformers_and_exit_2(tmp_path):
    """The old CLI printed the legacy ONNX exporter's traceback (RuntimeError: ScalarType ComplexDouble ...)."""
    ckpt = qwen_rm(tmp_path / "ckpt")
    r = subprocess.run([sys.executable, "-m", "service.cli", "export", str(ckpt), "--out", str(tmp_path / "bundle"),
                        "--format", "onnx", "--reference", str(few_pairs(tmp_path))], cwd=REPO, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    lines = r.stderr.strip().splitlines()
    ours = [line for line in lines if line.startswith("rewardserve ")]
    assert len(ours) == 1 and lines[-1] == ours[0], r.stderr  # libraries' warnings may come before it
    assert ours[0].startswith("rewardserve export: ") and "--format transformers" in ours[0], ours[0]
    assert not (tmp_path / "bundle").exists()


def test_format_onnx_on_an_openrlhf_checkpoint_is_refused_instead_of_given_a_new_head(tmp_path, capsys):
    """The old CLI exported it: AutoModel loaded the backbone and the exporter put a random head on it, exit 0."""
    ckpt = tmp_path / "ckpt"
    openrlhf_rm(ckpt, shard=None, hidden=32)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        rewardserve(["export", str(ckpt), "--out", str(tmp_path / "bundle"), "--format", "onnx"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("rewardserve export: ") and "--format transformers" in err[-1], err
    assert "OpenRLHF" in err[-1] and not (tmp_path / "bundle").exists()


@pytest.mark.parametrize("family", list(ARCHS))
def test_format_onnx_on_each_family_converts_it_or_says_format_transformers_in_one_line(family, bpe_dirs, tmp_path,
                                                                                         capsys):
    """No traceback on any of them: the legacy ONNX exporter either converts the checkpoint (a bundle whose
    parity passed) or fails, and the failure is one line naming --format transformers, exit 2 (the old CLI
    raised ComplexDouble from torch.onnx for the rotary bf16 decoders, an ONNX Runtime NOT_IMPLEMENTED for
    Gemma 2, an AttributeError for the composite Gemma 3)."""
    from service.bundle import open_bundle

    ckpt = foreign_checkpoint(family, tmp_path / "ckpt", bpe_dirs)
    capsys.readouterr()
    try:
        rewardserve(["export", str(ckpt), "--out", str(tmp_path / "bundle"), "--format", "onnx", "--reference",
                     str(few_pairs(tmp_path))])
    except SystemExit as exit_:
        assert exit_.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("rewardserve export: ") and "--format transformers" in err[-1], err
        assert not (tmp_path / "bundle").exists()
        return
    manifest, _ = open_bundle(tmp_path / "bundle")
    assert manifest.model_format == "onnx" and manifest.parity.passed
