"""More architectures imported as they are (`export --format transformers`) and served by transformers.

tests/test_decoder_import.py covers Qwen2 (bf16, sharded, chat template), Llama, GPT-2, BERT and DeBERTa-v2.
Here: Mistral, Qwen3, Gemma 2, Gemma 3 and ModernBERT, each a tiny random-init `*ForSequenceClassification`
(num_labels=1) saved in bf16 with save_pretrained, as users save them, with a real tokenizer: the Qwen-style
byte-level BPE of test_decoder_import (trained on the demo set; <|endoftext|> pad) for the decoders, the
MiniLM WordPiece tokenizer for ModernBERT. The classifier weights are drawn large (std 2) so the scores spread.

Gemma 3 comes in both shapes transformers has a head for: text-only (`gemma3_text`, the 1B:
Gemma3TextForSequenceClassification) and the composite image-text model (`gemma3`, 4B and up:
Gemma3ForSequenceClassification, whose context and pad id live in config.text_config). The composite one
pads with its EOS, as TRL users often set it, so the bundle must take the text config's pad id: the
tokenizer's pad token by name would be another id, and the head would read a padding position.

The decoders with sliding windows (Mistral, Gemma 2 and 3) get windows shorter than the demo items, so
sliding-window masks meet right padding; ModernBERT's local attention likewise. Gemma's hidden size is 48:
its embedding scale √48 is not a power of two, so an embedding scaled in bf16 rounds where fp32 does not.

Reference: the model's own forward, loaded from the checkpoint in fp32 (the bf16 weights upcast exactly), on
each item alone (unpadded). The bundle's runtime scores one right-padded batch of mixed lengths on CPU.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from service.data import demo_data_path, read_pairs

# padded batch vs the model's own fp32 forward per item: max |diff| measured 1e-5 (Gemma 3; scores' std 5-14,
# ModernBERT's 0.017); a few times that
TOL = 4e-5
MIN_SPREAD = 100 * TOL  # the scores' std: far above TOL, or a check at TOL could not tell items apart
N_ITEMS = 8
WINDOW = 24  # sliding-window span, shorter than most demo items
CONTEXT = 512  # every model's max_position_embeddings: the bundle's max_length must be it (< the 4096 default)
DECODER = dict(vocab_size=640, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
               max_position_embeddings=CONTEXT, tie_word_embeddings=False)  # the BPE tokenizer has 600 tokens
GEMMA = dict(hidden_size=48, intermediate_size=96, sliding_window=WINDOW,
             layer_types=["sliding_attention", "full_attention"])

# arch -> (the class save_pretrained writes, its classification layer, decoder?)
ARCHS = {
    "mistral": ("MistralForSequenceClassification", "score", True),
    "qwen3": ("Qwen3ForSequenceClassification", "score", True),
    "gemma2": ("Gemma2ForSequenceClassification", "score", True),
    "gemma3-text": ("Gemma3TextForSequenceClassification", "score", True),
    "gemma3": ("Gemma3ForSequenceClassification", "score", True),
    "modernbert": ("ModernBertForSequenceClassification", "classifier", False),
}
EOS_PAD = {"gemma3"}  # pad token = EOS (<|im_end|>), not the tokenizer's <|endoftext|>

# The runtime computes fp32 over the bf16 weights (service/torch_runtime.py upcast_at_use). Gemma's scaled
# embedding multiplies by `embed_scale`, a non-persistent buffer made in the load dtype: loaded in bf16,
# √48 = 6.9282 becomes 6.9375 and every score moves by ~3e-3 here, unless the runtime restores the exact
# value (the module keeps it as a float, `scalar_embed_scale`). The Gemma cases fail without that.


def decoder_config(arch: str, pad_id: int):
    import transformers as tf

    common = dict(DECODER, pad_token_id=pad_id)
    if arch == "mistral":
        return tf.MistralConfig(hidden_size=64, intermediate_size=128, sliding_window=WINDOW, num_labels=1, **common)
    if arch == "qwen3":
        return tf.Qwen3Config(hidden_size=64, intermediate_size=128, num_labels=1, **common)
    if arch == "gemma2":
        return tf.Gemma2Config(num_labels=1, **GEMMA, **common)
    if arch == "gemma3-text":
        return tf.Gemma3TextConfig(num_labels=1, **GEMMA, **common)
    if arch == "gemma3":  # a one-layer SigLIP tower; the image tokens sit past the tokenizer's 600 ids
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      image_size=28, patch_size=14)
        return tf.Gemma3Config(text_config={**GEMMA, **common}, vision_config=vision, mm_tokens_per_image=4,
                               image_token_index=600, boi_token_index=601, eoi_token_index=602, num_labels=1)
    raise ValueError(arch)


def modernbert_config():
    """On the MiniLM vocabulary: [PAD] 0, [CLS] 101, [SEP] 102. Local attention every other layer."""
    import transformers as tf

    return tf.ModernBertConfig(vocab_size=30522, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=2, max_position_embeddings=CONTEXT, pad_token_id=0,
                               bos_token_id=101, eos_token_id=102, cls_token_id=101, sep_token_id=102,
                               global_attn_every_n_layers=2, local_attention=16, num_labels=1)


@pytest.fixture(scope="module")
def bpe_dirs(tmp_path_factory) -> dict[str, Path]:
    """The byte-level BPE tokenizer, trained once: as saved with <|endoftext|> as pad, and with EOS as pad."""
    from tests.test_decoder_import import bpe_tokenizer

    root = tmp_path_factory.mktemp("bpe")
    bpe_tokenizer(root / "pad")
    eos_pad = root / "eos-pad"
    shutil.copytree(root / "pad", eos_pad)
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast.from_pretrained(eos_pad)
    tok.pad_token = "<|im_end|>"
    tok.save_pretrained(eos_pad)
    return {"pad": root / "pad", "eos-pad": eos_pad}


def build_checkpoint(arch: str, out: Path, bpe_dirs: dict[str, Path]) -> tuple[Path, int]:
    """A bf16 checkpoint as save_pretrained writes it, beside its tokenizer; returns it and its pad id."""
    import transformers as tf

    from tests.helpers import copy_tokenizer

    class_name, head, decoder = ARCHS[arch]
    if decoder:
        shutil.copytree(bpe_dirs["eos-pad" if arch in EOS_PAD else "pad"], out)
        pad_id = tf.PreTrainedTokenizerFast.from_pretrained(out).pad_token_id
        config = decoder_config(arch, pad_id)
    else:
        out.mkdir(parents=True)
        copy_tokenizer(out)
        config = modernbert_config()
    torch.manual_seed(0)
    model = getattr(tf, class_name)(config)
    torch.nn.init.normal_(getattr(model, head).weight, std=2.0)  # a visible reward signal
    model.to(torch.bfloat16).save_pretrained(out)
    return out, config.get_text_config().pad_token_id


def forward_alone(model, batch: dict[str, np.ndarray], lengths: list[int]) -> np.ndarray:
    """The model's own score of each item of a right-padded batch, run alone without its padding."""
    with torch.no_grad():
        return np.array([model(**{k: torch.from_numpy(v[i:i + 1, :n]) for k, v in batch.items()}).logits[0, 0].item()
                         for i, n in enumerate(lengths)])


@pytest.mark.parametrize("arch", list(ARCHS))
def test_bf16_checkpoint_imports_and_padded_batches_score_like_its_own_fp32_forward(arch, bpe_dirs, tmp_path):
    import transformers as tf

    from export.importer import import_checkpoint
    from service.bundle import open_bundle
    from service.runtime import load_runtime

    class_name, _, decoder = ARCHS[arch]
    ckpt, pad_id = build_checkpoint(arch, tmp_path / "ckpt", bpe_dirs)
    assert pad_id == (2 if arch in EOS_PAD else 0)
    bundle = import_checkpoint(ckpt, tmp_path / "bundle", reference_pairs=4)
    manifest, encoder = open_bundle(bundle)
    assert manifest.model_format == "transformers" and manifest.precision == "bf16" and manifest.parity.passed
    assert manifest.input_names == ["input_ids", "attention_mask"]  # no token types in any of these
    assert manifest.text.join == ("concat" if decoder else "pair")
    assert manifest.text.pad_token_id == pad_id and manifest.text.max_length == CONTEXT
    runtime = load_runtime(bundle, manifest, provider="cpu")
    assert runtime.precision == "fp32" and runtime.describe()["architecture"] == class_name

    pairs, _ = read_pairs(demo_data_path())
    items = encoder.encode([p.prompt for p in pairs[:N_ITEMS]], [p.chosen for p in pairs[:N_ITEMS]])
    lengths = [it.n_tokens for it in items]
    assert len(set(lengths)) >= N_ITEMS // 2 and sorted(lengths)[1] > WINDOW  # really padded, past the window
    batch = encoder.pad(items)
    got = runtime.run(batch)

    model = tf.AutoModelForSequenceClassification.from_pretrained(ckpt, dtype=torch.float32).eval()
    assert type(model).__name__ == class_name and next(model.parameters()).dtype == torch.float32
    want = forward_alone(model, batch, lengths)
    assert np.std(want) >= MIN_SPREAD, want
    scale = getattr(runtime.model.get_input_embeddings(), "embed_scale", None)
    assert scale is None or scale.dtype == torch.float32  # Gemma: the exact √hidden, not its bf16 rounding
    np.testing.assert_allclose(got, want, atol=TOL, rtol=0)
