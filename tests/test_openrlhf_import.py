"""OpenRLHF reward checkpoints imported as they are (`export --format transformers`).

The checkpoint is built here as OpenRLHF's train_rm saves one, without installing OpenRLHF (it pulls in
deepspeed, ray and vllm). What is reproduced, from OpenRLHF's source (github.com/OpenRLHF/OpenRLHF at
3c3be6234e0cb353e76bb8019947db9dfe99fca7):
- openrlhf/models/model.py `_get_reward_model`: a class named RewardModel, subclass of the backbone's
  PreTrainedModel, holding the backbone (AutoModel's class) under its base_model_prefix and a value head
  nn.Linear(hidden_size, 1, bias=False) under `value_head_prefix` ("score" now, "value_head" before
  Dec 2024); save_pretrained writes architectures ["RewardModel"] and no auto_map;
- its config: the base model's, plus normalize_reward (model.py `get_llm_for_sequence_regression`), mean
  and std (trainer/rm_trainer.py, after evaluation), value_head_prefix (cli/train_rm.py, since Nov 2024),
  use_cache false; bf16 weights (param_dtype default);
- its tokenizer (utils/utils.py `get_tokenizer`): the pad token is the EOS when the base tokenizer has
  none, and its reward data ends every response with " " + EOS (datasets/reward_dataset.py).
The reference is OpenRLHF's own reward computation (RewardModel.forward in eval mode), re-implemented in
`openrlhf_reward` on a left-padded batch, as its serve_rm pads: the value head on every position, the value
at the last attended token, then (r - mean) / std when normalize_reward is set.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from service.data import demo_data_path, read_pairs
from service.encoding import Templated
from tests.helpers import REPO
from tests.test_decoder_import import bpe_tokenizer

EOS = "<|endoftext|>"
TOL = 1e-4
MEAN, STD = 0.37, 2.5


def reward_model_class(backbone_cls, value_head_prefix: str, outputs: int = 1):
    """OpenRLHF's RewardModel layout: its name, its parent class, where backbone and value head live."""

    class RewardModel(backbone_cls.__base__):
        def __init__(self, config):
            super().__init__(config)
            setattr(self, self.base_model_prefix, backbone_cls(config))
            setattr(self, value_head_prefix, torch.nn.Linear(config.hidden_size, outputs, bias=False))
            self.post_init()

    return RewardModel


def openrlhf_rm(out: Path, kind: str = "qwen2", prefix: str = "score", write_prefix: bool = True,
                normalize: bool = True, hidden: int = 64, shard: str | None = "60KB", outputs: int = 1,
                seed: int = 0):
    """A bf16 OpenRLHF reward checkpoint at `out`; returns the model (its bf16 weights, in fp32) and the
    pad/EOS id."""
    import transformers as tf

    out.mkdir(parents=True, exist_ok=True)
    fast = bpe_tokenizer(out, eos_token=EOS, pad_token=None)
    fast.pad_token = fast.eos_token  # get_tokenizer: no pad token → the EOS
    fast.save_pretrained(out)
    sizes = dict(vocab_size=640, hidden_size=hidden, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=2 * hidden, num_hidden_layers=2, max_position_embeddings=512,
                 eos_token_id=fast.eos_token_id, tie_word_embeddings=False)
    config, backbone = ((tf.Qwen2Config(**sizes), tf.Qwen2Model) if kind == "qwen2"
                        else (tf.LlamaConfig(**sizes), tf.LlamaModel))
    config.normalize_reward = normalize  # train_rm leaves it False; a normalising run saves True
    config.mean, config.std = MEAN, STD
    config.use_cache = False
    if write_prefix:
        config.value_head_prefix = prefix
    cls = reward_model_class(backbone, prefix, outputs)
    torch.manual_seed(seed)
    model = cls(config)
    torch.nn.init.normal_(getattr(model, prefix).weight, std=0.5)  # a visible reward signal
    model = model.to(torch.bfloat16)
    model.save_pretrained(out, **({"max_shard_size": shard} if shard else {}))
    # the reference: the saved bf16 weights in an fp32 model (rotary frequencies computed in fp32, as
    # from_pretrained computes them: .to(bfloat16) above rounded the model's own buffers too)
    reference = cls(config)
    reference.load_state_dict(model.state_dict())
    return reference.eval(), fast.pad_token_id


def openrlhf_reward(model, prefix: str, rows: list[list[int]], pad_id: int, normalize: bool) -> np.ndarray:
    """OpenRLHF RewardModel.forward in eval mode (openrlhf/models/model.py, lines 213-238 at 3c3be62) on
    a left-padded batch: position ids from the mask, the value head on every position, the value at the
    last attended token, then (r - mean) / std where normalize_reward is set."""
    width = max(map(len, rows))
    ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    with torch.no_grad():
        last = mask.size(1) - 1 - mask.long().fliplr().argmax(dim=1, keepdim=True)
        position_ids = mask.long().cumsum(-1) - 1
        position_ids.masked_fill_(mask == 0, 1)
        hidden = getattr(model, model.base_model_prefix)(ids, attention_mask=mask,
                                                         position_ids=position_ids).last_hidden_state
        values = getattr(model, prefix)(hidden).squeeze(-1)
        reward = values.gather(dim=1, index=last).squeeze(1)
        if normalize:
            reward = (reward - MEAN) / STD
    return reward.numpy().astype(np.float64)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def ending_with_eos(encoder, pad_id: int, n: int = 10):
    """Demo pairs as OpenRLHF's reward data ends them (response + " " + EOS), where EOS is the pad token."""
    pairs, _ = read_pairs(demo_data_path())
    # templated text (its EOS is the token, as OpenRLHF tokenizes it), not content (issue 24: plain characters)
    items = encoder.encode([p.prompt for p in pairs[:n]], [Templated(p.chosen + " " + EOS) for p in pairs[:n]])
    assert all(it.ids[-1] == pad_id for it in items)
    assert len({it.n_tokens for it in items}) >= 5  # mixed lengths: the batch is really padded
    return items


def weights_unchanged(ckpt: Path, bundle: Path) -> None:
    manifest = json.loads((bundle / "manifest.json").read_text())
    shards = sorted(p.name for p in ckpt.glob("*.safetensors"))
    assert sorted(p.name for p in bundle.glob("*.safetensors")) == shards
    for name in shards + ["model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json"]:
        if (ckpt / name).is_file():
            assert sha(bundle / name) == sha(ckpt / name) == manifest["files"][name], name


@pytest.fixture(scope="module")
def current(tmp_path_factory):
    """OpenRLHF today: a Qwen2 backbone, value head `score`, value_head_prefix and normalize_reward saved."""
    ckpt = tmp_path_factory.mktemp("openrlhf") / "rm"
    model, pad_id = openrlhf_rm(ckpt)
    out = tmp_path_factory.mktemp("openrlhf-bundle") / "rm"
    r = subprocess.run([sys.executable, "-m", "service.cli", "export", str(ckpt), "--out", str(out),
                        "--format", "transformers", "--reference-pairs", "6"], cwd=REPO, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "OpenRLHF reward model" in r.stdout and "last attended token" in r.stdout
    return ckpt, out, model, pad_id


def test_an_openrlhf_checkpoint_is_imported_with_its_weights_as_they_are(current):
    ckpt, bundle, _, _ = current
    assert len(list(ckpt.glob("*.safetensors"))) >= 2  # sharded, as an 8 B checkpoint is
    weights_unchanged(ckpt, bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["model_format"] == "transformers" and manifest["precision"] == "bf16"
    assert manifest["pooling"] == "last_attended" and manifest["parity"]["passed"]
    original = json.loads((ckpt / "config.json").read_text())
    assert original["architectures"] == ["RewardModel"] and "auto_map" not in original
    config = json.loads((bundle / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForSequenceClassification"]
    assert config["num_labels"] == 1 and config["id2label"] == {"0": "LABEL_0"}
    assert (config["normalize_reward"], config["mean"], config["std"]) == (True, MEAN, STD)
    changed = {k for k in set(config) | set(original) if config.get(k) != original.get(k)}
    assert changed == {"architectures", "num_labels", "id2label", "label2id"}
    assert original.get("pad_token_id") is None  # the pad token comes from the tokenizer: its EOS
    assert json.loads((ckpt / "tokenizer_config.json").read_text())["pad_token"] == EOS
    assert manifest["text"]["pad_token_id"] == original["eos_token_id"]


def test_the_runtime_reads_the_last_attended_token_and_normalises_like_openrlhf(current):
    """Inputs end with EOS == pad: OpenRLHF reads that EOS; transformers' own head (rightmost non-pad token)
    reads the token before it. The served scores must be OpenRLHF's."""
    import transformers as tf

    from service.bundle import open_bundle
    from service.runtime import load_runtime

    _, bundle, model, pad_id = current
    manifest, encoder = open_bundle(bundle)
    runtime = load_runtime(bundle, manifest, provider="cpu")
    items = ending_with_eos(encoder, pad_id)
    batch = encoder.pad(items)  # right-padded with the pad id, which is the EOS
    got = runtime.run(batch)
    want = openrlhf_reward(model, "score", [it.ids for it in items], pad_id, normalize=True)
    assert np.std(want) > 1e-2
    np.testing.assert_allclose(got, want, atol=TOL, rtol=0)

    native = tf.AutoModelForSequenceClassification.from_pretrained(bundle, dtype=torch.float32).eval()
    native.config.pad_token_id = pad_id
    with torch.no_grad():
        rightmost = native(**{k: torch.from_numpy(v) for k, v in batch.items()}).logits[:, 0].numpy()
    rightmost = (rightmost - MEAN) / STD
    assert np.min(np.abs(rightmost - want)) > 1e-3  # every item: another token, another reward


def test_the_older_value_head_prefix_imports_and_scores_like_openrlhf(tmp_path):
    """Before Dec 2024 the head was `value_head` and (before Nov 2024) config.json did not name it; a
    Llama backbone; normalize_reward False (what train_rm saves): raw rewards, mean/std kept unused."""
    from export.importer import import_checkpoint
    from service.bundle import open_bundle
    from service.runtime import load_runtime

    ckpt = tmp_path / "ckpt"
    model, pad_id = openrlhf_rm(ckpt, kind="llama", prefix="value_head", write_prefix=False, normalize=False)
    assert "value_head_prefix" not in json.loads((ckpt / "config.json").read_text())
    bundle = import_checkpoint(ckpt, tmp_path / "bundle", reference_pairs=4)
    weights_unchanged(ckpt, bundle)
    config = json.loads((bundle / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"]
    assert config["value_head_prefix"] == "value_head" and config["normalize_reward"] is False
    manifest, encoder = open_bundle(bundle)
    assert manifest.pooling == "last_attended"
    runtime = load_runtime(bundle, manifest, provider="cpu")
    items = ending_with_eos(encoder, pad_id)
    got = runtime.run(encoder.pad(items))
    want = openrlhf_reward(model, "value_head", [it.ids for it in items], pad_id, normalize=False)
    assert np.std(want) > 1e-2
    np.testing.assert_allclose(got, want, atol=TOL, rtol=0)


def _edit_config(ckpt: Path, **changes) -> None:
    config = json.loads((ckpt / "config.json").read_text())
    config.update(changes)
    (ckpt / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("case", ["no_head", "head_shape", "named_head_absent", "backbone_tensor", "critic",
                                  "no_class", "remote_code"])
def test_a_broken_openrlhf_checkpoint_is_refused_with_one_line(case, tmp_path):
    from export.importer import UnsupportedCheckpoint, check_checkpoint

    ckpt = tmp_path / "ckpt"
    small = dict(hidden=32, shard=None)
    if case == "no_head":  # the head under a name OpenRLHF never used, and config.json naming none
        openrlhf_rm(ckpt, prefix="v_head", write_prefix=False, **small)
        expect = ["without its value head", "score.weight or value_head.weight"]
    elif case == "head_shape":
        openrlhf_rm(ckpt, outputs=2, **small)
        expect = ["score.weight has shape [2, 32]", "[1, 32]"]
    elif case == "named_head_absent":  # config.json says value_head, the weights say score
        openrlhf_rm(ckpt, **small)
        _edit_config(ckpt, value_head_prefix="value_head")
        expect = ["no value_head.weight"]
    elif case == "backbone_tensor":  # transformers would initialise it at random
        from safetensors.torch import load_file, save_file

        openrlhf_rm(ckpt, **small)
        weights = load_file(ckpt / "model.safetensors")
        del weights["model.layers.1.mlp.down_proj.weight"]
        save_file(weights, ckpt / "model.safetensors", metadata={"format": "pt"})
        expect = ["1 missing", "model.layers.1.mlp.down_proj.weight"]
    elif case == "critic":
        openrlhf_rm(ckpt, **small)
        _edit_config(ckpt, architectures=["CriticModel"])
        expect = ["critic", "not a reward model"]
    elif case == "no_class":  # a model_type transformers has no sequence-classification class for
        openrlhf_rm(ckpt, **small)
        _edit_config(ckpt, model_type="cohere")
        expect = ["'cohere'", "no *ForSequenceClassification"]
    else:  # custom code stays refused, whoever saved it
        openrlhf_rm(ckpt, **small)
        _edit_config(ckpt, auto_map={"AutoModel": "modeling_acme.AcmeModel"})
        expect = ["remote code", "never runs"]
    with pytest.raises(UnsupportedCheckpoint) as info:
        check_checkpoint(ckpt)
    line = str(info.value)
    assert "\n" not in line and all(e in line for e in expect), line


def test_the_cli_refuses_a_mis_shaped_value_head_with_one_line_and_writes_nothing(tmp_path):
    ckpt = tmp_path / "ckpt"
    openrlhf_rm(ckpt, outputs=2, hidden=32, shard=None)
    out = tmp_path / "bundle"
    r = subprocess.run([sys.executable, "-m", "service.cli", "export", str(ckpt), "--out", str(out),
                        "--format", "transformers"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rewardserve export: ") and "value head" in lines[0], r.stderr
    assert not out.exists()


def test_normalize_reward_at_import_serves_what_openrlhf_serves_with_normalize_enable(tmp_path):
    """train_rm saves normalize_reward: false next to mean/std; OpenRLHF normalises when loaded with
    --reward.normalize_enable. `export --normalize-reward` gives the same, and a non-OpenRLHF checkpoint
    refuses the flag with one line."""
    from service.bundle import open_bundle
    from service.runtime import load_runtime

    ckpt = tmp_path / "ckpt"
    model, pad_id = openrlhf_rm(ckpt, normalize=False, shard=None)
    out = tmp_path / "bundle"
    r = subprocess.run([sys.executable, "-m", "service.cli", "export", str(ckpt), "--out", str(out), "--format",
                        "transformers", "--reference-pairs", "4", "--normalize-reward"], cwd=REPO,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert f"normalised by mean {MEAN} and std {STD}" in r.stdout
    assert json.loads((out / "config.json").read_text())["normalize_reward"] is True
    manifest, encoder = open_bundle(out)
    items = ending_with_eos(encoder, pad_id)
    got = load_runtime(out, manifest, provider="cpu").run(encoder.pad(items))
    want = openrlhf_reward(model, "score", [it.ids for it in items], pad_id, normalize=True)
    np.testing.assert_allclose(got, want, atol=TOL, rtol=0)

    from tests.helpers import tiny_decoder

    plain = tiny_decoder(tmp_path / "plain", "llama", classifier=True)
    r = subprocess.run([sys.executable, "-m", "service.cli", "export", str(plain), "--out", str(tmp_path / "b2"),
                        "--format", "transformers", "--normalize-reward"], cwd=REPO, capture_output=True, text=True,
                       timeout=120)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "OpenRLHF" in lines[0], r.stderr
    assert not (tmp_path / "b2").exists()
