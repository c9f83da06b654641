"""Decoder reward models imported as they are (`export --format transformers`) and served by transformers.

The checkpoint is what RLHF teams deploy, shrunk: a random-init bf16 Qwen2ForSequenceClassification
(num_labels=1, pad_token_id set) saved with save_pretrained in several safetensors shards, with a Qwen-style
byte-level BPE tokenizer (trained here on the demo set; <|endoftext|> pad, <|im_end|> EOS, no BOS) and
Qwen2's ChatML chat template, saved by PreTrainedTokenizerFast.save_pretrained. No side files of ours.
References are the transformers model itself, loaded from the checkpoint in fp32 (the bf16 weights upcast).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from service.data import demo_data_path, read_pairs
from tests.helpers import CHATS, REPO

CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
          "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TOL = 1e-4
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
              r"\s*[\r\n]+|\s+(?!\S)|\s+")


def bpe_tokenizer(out: Path, vocab_size: int = 600, **extra):
    """A Qwen-style byte-level BPE tokenizer trained on the demo texts, saved as transformers saves one."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    pairs, _ = read_pairs(demo_data_path())
    texts = [t for p in pairs for t in (p.prompt, p.chosen, p.rejected)]
    tok = Tokenizer(models.BPE())
    # Qwen2's own tokenizer.json: its digit-splitting regex, then byte-level (transformers 5 rebuilds a
    # Qwen2Tokenizer with exactly this, so a plain ByteLevel pre-tokenizer would disagree with it)
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **{"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
                                                            "chat_template": CHATML, **extra})
    fast.save_pretrained(out)
    return fast


def qwen_rm(out: Path, seed: int = 0, shard: str | None = "60KB", vocab_size: int = 640, pad: bool = True,
            num_labels: int = 1, tokenizer: dict | None = None, hidden: int = 64) -> Path:
    """A bf16 Qwen2ForSequenceClassification checkpoint, sharded, saved as TRL/transformers save it."""
    import transformers as tf

    out.mkdir(parents=True, exist_ok=True)
    fast = bpe_tokenizer(out, **(tokenizer or {}))
    torch.manual_seed(seed)
    config = tf.Qwen2Config(vocab_size=vocab_size, hidden_size=hidden, num_attention_heads=4, num_key_value_heads=2,
                            intermediate_size=2 * hidden, num_hidden_layers=2, max_position_embeddings=512,
                            pad_token_id=fast.pad_token_id if pad else None, num_labels=num_labels,
                            tie_word_embeddings=False)
    model = tf.Qwen2ForSequenceClassification(config)
    torch.nn.init.normal_(model.score.weight, std=0.5)
    model = model.to(torch.bfloat16)
    model.save_pretrained(out, **({"max_shard_size": shard} if shard else {}))
    return out


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return qwen_rm(tmp_path_factory.mktemp("qwen") / "qwen-rm")


@pytest.fixture(scope="module")
def qwen_bundle(ckpt, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("qwen-bundle") / "qwen-rm"
    r = subprocess.run([sys.executable, "-m", "service.cli", "export", str(ckpt), "--out", str(out),
                        "--format", "transformers", "--reference-pairs", "8"], cwd=REPO, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return out


@pytest.fixture(scope="module")
def hf(ckpt):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(ckpt, dtype=torch.float32).eval()
    return AutoTokenizer.from_pretrained(ckpt), model


def hf_reward(model, ids: list[int]) -> float:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0, 0].item()


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_import_copies_the_bf16_shards_as_they_are(ckpt, qwen_bundle):
    shards = sorted(p.name for p in ckpt.glob("*.safetensors"))
    assert len(shards) >= 2 and (ckpt / "model.safetensors.index.json").is_file()
    manifest = json.loads((qwen_bundle / "manifest.json").read_text())
    assert manifest["model_format"] == "transformers" and manifest["precision"] == "bf16"
    assert manifest["model_file"] == "model.safetensors.index.json" and manifest["pooling"] == "native"
    for name in shards + ["model.safetensors.index.json", "config.json", "tokenizer.json", "tokenizer_config.json"]:
        assert sha(qwen_bundle / name) == sha(ckpt / name) == manifest["files"][name], name
    weights = sum(p.stat().st_size for p in qwen_bundle.glob("*.safetensors"))
    assert weights == sum((ckpt / s).stat().st_size for s in shards)  # no fp32 copy anywhere
    assert sorted(p.name for p in qwen_bundle.glob("*.safetensors")) == shards
    assert manifest["text"]["chat_template"] == CHATML and manifest["text"]["join"] == "concat"
    assert manifest["text"]["pad_token_id"] == json.loads((ckpt / "config.json").read_text())["pad_token_id"]
    assert manifest["parity"]["passed"] and manifest["parity"]["reference_pairs"] == 8
    assert json.loads((qwen_bundle / "parity_reference.json").read_text())["reference_precision"] == "fp32"
    from service.parity import verify_bundle

    assert verify_bundle(qwen_bundle)  # `rewardserve verify`: checksums, then the fp32 run vs the recorded scores


def test_right_padded_batches_score_like_each_item_alone(qwen_bundle, hf):
    """TextEncoder.pad right-pads with the model's pad id; the HF head pools the last non-pad token."""
    from service.bundle import open_bundle
    from service.runtime import load_runtime

    manifest, encoder = open_bundle(qwen_bundle)
    runtime = load_runtime(qwen_bundle, manifest, provider="cpu")
    assert runtime.precision == "fp32" and runtime.describe()["attention"] == "sdpa"
    pairs, _ = read_pairs(demo_data_path())
    items = encoder.encode([p.prompt for p in pairs[:12]], [p.chosen for p in pairs[:12]])
    lengths = {it.n_tokens for it in items}
    assert len(lengths) >= 6  # really mixed lengths, so the batch is really padded
    batched = runtime.run(encoder.pad(items))
    alone = np.array([runtime.run(encoder.pad([it]))[0] for it in items])
    np.testing.assert_allclose(batched, alone, atol=1e-5, rtol=0)
    _, model = hf
    expected = np.array([hf_reward(model, it.ids) for it in items])
    assert np.std(expected) > 1e-3
    np.testing.assert_allclose(batched, expected, atol=TOL, rtol=0)


@pytest.fixture(scope="module")
def served(qwen_bundle, start_server):
    return start_server(bundle_dir=qwen_bundle)


def post(server, path, body):
    r = httpx.post(server.url + path, json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def test_served_scores_equal_the_transformers_forward_and_models_tells_the_truth(served, qwen_bundle, hf):
    from service.bundle import open_bundle

    _, encoder = open_bundle(qwen_bundle)
    tokenizer, model = hf
    pairs, _ = read_pairs(demo_data_path())
    got, want = [], []
    for p in pairs[20:26]:
        body = post(served, "/v1/score", {"prompt": p.prompt, "response": p.rejected})
        ids = encoder.encode([p.prompt], [p.rejected])[0].ids
        got.append(body["raw"])
        want.append(hf_reward(model, ids))
    assert np.std(want) > 1e-3
    np.testing.assert_allclose(got, want, atol=TOL, rtol=0)
    info = httpx.get(served.url + "/v1/models").json()["data"][0]
    assert info["model_format"] == "transformers" and info["precision"] == "bf16"
    rt = info["runtime"]
    assert (rt["runtime"], rt["precision"], rt["dtype"], rt["device"], rt["attention"]) == \
        ("transformers", "fp32", "float32", "cpu", "sdpa")
    check = info["precision_check"]  # a bf16 bundle served in fp32 is checked against the recorded scores
    assert check["precision"] == "fp32" and check["reference_pairs"] == 8 and check["max_abs_diff"] <= TOL
    assert info["chat_template"] is True


def test_messages_score_equals_the_transformers_forward_of_apply_chat_template(served, hf):
    tokenizer, model = hf
    expected = []
    for messages in CHATS:
        out = tokenizer.apply_chat_template(messages, tokenize=True)
        ids = list(out["input_ids"] if hasattr(out, "keys") else out)
        body = post(served, "/v1/score", {"messages": messages})
        reference = hf_reward(model, ids)
        expected.append(reference)
        assert abs(body["raw"] - reference) <= TOL, (body, reference)
        assert body["n_tokens"] == len(ids)
    assert max(expected) - min(expected) > 1e-3


# ---------------------------------------------------------------- refusals: one line, exit 2

def _config(ckpt: Path, **changes) -> None:
    config = json.loads((ckpt / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (ckpt / "config.json").write_text(json.dumps(config))


def _refused(ckpt: Path, tmp_path: Path) -> str:
    out = tmp_path / "refused-bundle"
    r = subprocess.run([sys.executable, "-m", "service.cli", "export", str(ckpt), "--out", str(out),
                        "--format", "transformers"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rewardserve export: "), r.stderr
    assert not out.exists()
    return lines[0]


@pytest.mark.parametrize("case", ["labels", "no_head", "remote_code", "no_pad", "vocab"])
def test_bad_checkpoints_are_refused_with_one_line(case, tmp_path):
    small = dict(shard=None, hidden=32)
    if case == "vocab":  # the tokenizer knows more tokens than the model embeds
        ckpt = qwen_rm(tmp_path / "ckpt", vocab_size=400, **small)
        expect = ["vocab_size is 400", "own tokenizer"]
    elif case == "no_pad":
        ckpt = qwen_rm(tmp_path / "ckpt", pad=False, tokenizer={"pad_token": None}, **small)
        expect = ["no pad token", "pad_token_id"]
    else:
        ckpt = qwen_rm(tmp_path / "ckpt", num_labels=2 if case == "labels" else 1, **small)
        if case == "no_head":
            _config(ckpt, architectures=["Qwen2ForCausalLM"])
            expect = ["no classification head", "ForSequenceClassification"]
        elif case == "remote_code":
            _config(ckpt, model_type="acme_rm", architectures=["AcmeRewardModel"],
                    auto_map={"AutoModelForSequenceClassification": "modeling_acme.AcmeRewardModel"})
            expect = ["remote code", "never runs"]
        else:
            expect = ["2 labels", "num_labels=1"]
    line = _refused(ckpt, tmp_path)
    assert all(e in line for e in expect), line


def test_gpu_check_smoke_runs_end_to_end(tmp_path):
    out = tmp_path / "gpu_check.json"
    r = subprocess.run([sys.executable, "bench/gpu_check.py", "--smoke", "--out", str(out)], cwd=REPO,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    report = json.loads(out.read_text())
    model = report["models"][0]
    assert model["runtime"]["runtime"] == "transformers" and model["ceiling"]["items_per_s"] > 0
    for c in (1, 8):
        assert model["rewardserve"][str(c)]["items_per_s"] > 0 and model["naive"][str(c)]["items_per_s"] > 0
    assert model["max_abs_diff_vs_naive"] <= 1e-3
    # the GRPO phase (issue 21's scenario) ran on the same bundle: nothing lost, every group ordered the same,
    # and the sharing server really reused prefix tokens
    assert all(phase["ok"] for phase in model["phases"].values()), model["phases"]
    for cell in model["grpo"]["orders"].values():
        assert cell["rewards_lost"] == {"on": 0, "off": 0}
        assert cell["pairwise_order_pairs"] > 0 and cell["pairwise_order_same"] == cell["pairwise_order_pairs"]
        assert cell["sharing_counters_on"]["rewardserve_prefix_tokens_reused_total"] > 0, cell


def test_memory_bench_runs_end_to_end_and_finds_the_served_scores_equal_to_transformers(tmp_path):
    """bench/decoder_memory.py on a tiny checkpoint: it measures the import and the server and compares
    /v1/score with the fp32 transformers forward (the ≈0.5 B numbers are in docs/benchmarks.md)."""
    out = tmp_path / "memory.json"
    r = subprocess.run([sys.executable, "bench/decoder_memory.py", "--size", "tiny", "--items", "4", "--threads", "1",
                        "--workdir", str(tmp_path / "work"), "--out", str(out)], cwd=REPO, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["parity"]["passed"] and report["parity"]["items"] == 4
    assert report["import"]["peak_rss_bytes"] > report["checkpoint_bytes"] > 0
    assert report["serve"]["runtime"]["weights_dtype"] == "bfloat16"  # served fp32 without an fp32 copy
    assert report["serve"]["runtime"]["dtype"] == "float32"


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert", "deberta-v2"])
def test_other_architectures_import_and_score_like_their_own_forward(kind, tmp_path):
    """Decoders (last non-pad token) and encoders (their own pooler/CLS head, token_type_ids where used),
    fp32 checkpoints on the MiniLM WordPiece tokenizer; batched runtime scores vs the model's forward alone."""
    import transformers as tf

    from export.importer import import_checkpoint
    from service.bundle import open_bundle
    from service.runtime import load_runtime
    from tests.helpers import copy_tokenizer, tiny_decoder

    ckpt = tmp_path / "ckpt"
    if kind in ("llama", "gpt2"):
        tiny_decoder(ckpt, kind, classifier=True)
    else:
        torch.manual_seed(0)
        sizes = dict(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=256, num_labels=1)
        if kind == "bert":
            model = tf.BertForSequenceClassification(tf.BertConfig(**sizes))
        else:
            model = tf.DebertaV2ForSequenceClassification(tf.DebertaV2Config(**sizes, type_vocab_size=0))
        torch.nn.init.normal_(model.classifier.weight, std=2.0)  # a visible reward signal
        model.save_pretrained(ckpt)
        copy_tokenizer(ckpt)
    bundle = import_checkpoint(ckpt, tmp_path / "bundle", reference_pairs=4)
    manifest, encoder = open_bundle(bundle)
    assert manifest.text.join == ("pair" if kind in ("bert", "deberta-v2") else "concat")
    runtime = load_runtime(bundle, manifest, provider="cpu")
    assert runtime.reuses_prefix == (kind in ("llama", "gpt2"))  # best-of-N prompt reuse: causal decoders only
    pairs, _ = read_pairs(demo_data_path())
    items = encoder.encode([p.prompt for p in pairs[:8]], [p.chosen for p in pairs[:8]])
    got = runtime.run(encoder.pad(items))
    model = tf.AutoModelForSequenceClassification.from_pretrained(ckpt).eval()
    with torch.no_grad():
        want = [model(**{k: torch.tensor([v[i, :it.n_tokens]]) for k, v in encoder.pad(items).items()}
                      ).logits[0, 0].item() for i, it in enumerate(items)]
    assert np.std(want) > 1e-4
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_a_bf16_bundle_served_in_fp32_that_disagrees_with_its_recorded_scores_does_not_start(qwen_bundle, start_server,
                                                                                           tmp_path):
    """The startup check is what stands between a precision change and clients: recorded scores that the fp32
    run does not reproduce (here: moved by 0.01, checksums rewritten so only the check can catch it) stop it."""
    import shutil

    from service.bundle import read_manifest, write_manifest
    from service.parity import threshold_key

    assert threshold_key("fp32", "fp32") == "fp32" and threshold_key("bf16", "fp32") == "bf16"
    assert threshold_key("fp32", "bf16") == "fp32-of-bf16" and threshold_key("int8-static", "fp32") == "int8-static"
    bundle = tmp_path / "moved"
    shutil.copytree(qwen_bundle, bundle)
    parity = json.loads((bundle / "parity_reference.json").read_text())
    parity["torch_scores"] = [s + 0.01 for s in parity["torch_scores"]]
    (bundle / "parity_reference.json").write_text(json.dumps(parity))
    write_manifest(bundle, read_manifest(bundle))
    server = start_server(bundle_dir=bundle, wait_ready=False)
    assert server.proc.wait(60) != 0
    assert "fp32 disagrees with the bundle's recorded scores" in server.output()


def test_gpu_token_budget_follows_free_memory_and_its_clamps():
    """The CUDA batch hint's token budget (docs/decoders.md): 0.5 · free / (bytes · (4h + 3i + heads · L))."""
    from transformers import Qwen2Config

    from service.torch_runtime import GPU_TOKEN_BUDGET_CAP, gpu_token_budget

    qwen7b = Qwen2Config(hidden_size=3584, intermediate_size=18944, num_attention_heads=28)
    per_token = 2 * (4 * 3584 + 3 * 18944 + 28 * 2112)
    assert gpu_token_budget(8 * 2**30, qwen7b, 2, 2112) == int(0.5 * 8 * 2**30 // per_token)  # 16,478
    assert gpu_token_budget(4 * 2**30, qwen7b, 2, 2112) < gpu_token_budget(8 * 2**30, qwen7b, 2, 2112)
    assert gpu_token_budget(120 * 2**30, qwen7b, 2, 2112) == GPU_TOKEN_BUDGET_CAP
    assert gpu_token_budget(2**20, qwen7b, 2, 2112) == 2112  # one longest item always fits a run
