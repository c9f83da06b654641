"""Hugging Face *ForSequenceClassification checkpoint → `model_format: "transformers"` bundle, as it is.

The reward models RLHF teams deploy (TRL RewardTrainer output, Skywork-Reward-V2, Qwen2.5 RMs: 0.5-8 B
decoders in bf16) are not converted: their safetensors shards, index and config.json are copied byte for
byte (dtype kept), with the tokenizer files (tokenizer.json, tokenizer_config.json with the chat template
and special tokens). No fp32 copy is written. The bundle is served by service/torch_runtime.py.

Checks, each refused with one line naming the problem and what to do (typed ExportErrors, so
`rewardserve export` exits 2): custom code (auto_map, or a model_type transformers does not know: never
trust_remote_code), no classification head, several labels, weights not in safetensors, no fast tokenizer,
no pad token (decoders), a tokenizer vocabulary larger than the model's.

OpenRLHF reward checkpoints (what its train_rm saves: architectures ["RewardModel"], its own class built
around a transformers backbone, the backbone's weights under its base_model_prefix and a bias-free
[1, hidden] value head under `value_head_prefix`, "score" now and "value_head" before Dec 2024, with
normalize_reward/mean/std in config.json) are imported too: the shards are still copied as they are, and
only config.json is rewritten so that transformers loads them as its own <Base>ForSequenceClassification
(architectures, one label, value_head_prefix where the head is not `score`; the runtime maps it). Their
reward is read at each row's last attended token (manifest pooling "last_attended"), as OpenRLHF reads it,
not at the rightmost non-pad token, which differs when the pad token is the EOS that ends the input. The
weights are checked against that class from the safetensors headers alone: every tensor present, with its
shape, the value head [1, hidden].

Reference scores: the first `reference_pairs` pairs (default 16) of --reference (default: the
checkpoint's reference_pairs.jsonl, else the packaged demo set) whose chosen and rejected responses both fit
in `reference_tokens` (256) tokens, scored by the model's own forward one item at a time (unpadded), in
fp32 on CPU (the bf16 weights upcast exactly) or on a GPU in the checkpoint's dtype (`device="cuda"`,
recorded as reference_precision). They calibrate the normalization, gate the import (the same items in
padded batches must score alike), and are what the server's startup check compares against whenever it
runs the bundle at another precision (bf16 on a GPU vs fp32 reference, fp32 on CPU vs bf16 reference).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
from pathlib import Path

import numpy as np

from export.exporter import ExportError, ParityError, bundle_name, normalization, provenance, reference_path, staged
from export.model import is_openrlhf
from service.bundle import Manifest, ParityReport, write_manifest
from service.data import read_pairs
from service.encoding import TextEncoder, load_tokenizer
from service.parity import FP32_PARITY_THRESHOLD, PARITY_FILE, REFERENCE_FILE, reduced_precision_tolerance

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
WEIGHT_INDEX = "model.safetensors.index.json"
DTYPE_PRECISION = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
DEFAULT_MAX_LENGTH = 4096  # served max_length when the model's context is longer (--max-length to change)
# OpenRLHF (openrlhf/models/model.py, _get_reward_model): the class it saves, the config keys it writes, and
# the value head's names (value_head_prefix: "score" since Dec 2024, "value_head" before)
OPENRLHF_HEADS = ("score", "value_head")


class UnsupportedCheckpoint(ExportError):
    """Not a single-label sequence-classification checkpoint transformers can load without remote code."""


class TokenizerProblem(ExportError):
    """No fast tokenizer, no pad token, or a vocabulary larger than the model's."""


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ExportError(f"{path}: unreadable ({exc})") from None


def _token_text(value) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


def check_checkpoint(ckpt: Path, normalize_reward: bool | None = None) -> tuple[dict, dict, dict | None]:
    """(config.json, tokenizer_config.json, the bundle's config.json for an OpenRLHF checkpoint else None) of a
    checkpoint that can be imported; UnsupportedCheckpoint or TokenizerProblem naming the first problem
    otherwise. Reads files and safetensors headers only: no weight is loaded. `normalize_reward`: an OpenRLHF
    checkpoint's setting instead of its config.json's (None: keep it)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES

    config = _read_json(ckpt / "config.json")
    model_type = config.get("model_type")
    archs = config.get("architectures") or []
    if config.get("auto_map") or model_type not in CONFIG_MAPPING_NAMES:
        raise UnsupportedCheckpoint(
            f"{ckpt}: custom architecture (model_type {model_type!r}, architectures {archs}"
            + (", auto_map in config.json" if config.get("auto_map") else "") + ") needs remote code, which "
            "rewardserve never runs; convert it to a built-in transformers architecture "
            "(e.g. LlamaForSequenceClassification) first")
    openrlhf = is_openrlhf(config)
    if openrlhf and "CriticModel" in archs:
        raise UnsupportedCheckpoint(
            f"{ckpt}: an OpenRLHF critic (architectures {archs}): its value head scores every token of a PPO "
            "rollout, it is not a reward model; import the reward model (train_rm's RewardModel) instead")
    if openrlhf and model_type not in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES:
        raise UnsupportedCheckpoint(
            f"{ckpt}: OpenRLHF reward model on model_type {model_type!r}, for which transformers has no "
            "*ForSequenceClassification class to carry its value head; rewardserve cannot serve it")
    if not openrlhf and (not any(a.endswith("ForSequenceClassification") for a in archs)
                         or model_type not in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES):
        raise UnsupportedCheckpoint(
            f"{ckpt}: no classification head (architectures {archs}); import a *ForSequenceClassification "
            "reward model with num_labels=1 (what TRL's RewardTrainer saves), an OpenRLHF reward model, or "
            "train one with `rewardserve train --base CKPT --pooling native`")
    labels = config.get("num_labels") or len(config.get("id2label") or {}) or 2  # transformers' default: 2
    if labels != 1 and not openrlhf:  # OpenRLHF's value head has one output by construction (checked below)
        raise UnsupportedCheckpoint(
            f"{ckpt}: the classification head has {labels} labels; rewardserve serves single-score reward "
            "models (num_labels=1)")
    if not (ckpt / "model.safetensors").is_file() and not (ckpt / WEIGHT_INDEX).is_file():
        found = sorted(p.name for p in ckpt.glob("*.bin")) or ["no weights"]
        raise UnsupportedCheckpoint(
            f"{ckpt}: no safetensors weights ({', '.join(found[:3])}); save the model with "
            "save_pretrained(safe_serialization=True): pickled weights are never loaded")
    if normalize_reward is not None and not openrlhf:
        raise UnsupportedCheckpoint(f"{ckpt}: --normalize-reward applies to OpenRLHF reward models (their "
                                    "config.json holds the mean and std to normalise by); this is not one")
    bundle_config = openrlhf_config(ckpt, config, normalize_reward) if openrlhf else None
    if not (ckpt / "tokenizer.json").is_file():
        raise TokenizerProblem(f"{ckpt}: no tokenizer.json; save the fast tokenizer beside the model "
                               "(AutoTokenizer.from_pretrained(...).save_pretrained(CKPT))")
    tok_config = _read_json(ckpt / "tokenizer_config.json") if (ckpt / "tokenizer_config.json").is_file() else {}
    tokenizer = load_tokenizer(ckpt / "tokenizer.json")
    text = config.get("text_config") or config
    model_vocab = text.get("vocab_size") or config.get("vocab_size")
    tok_vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    if model_vocab and tok_vocab > model_vocab:
        raise TokenizerProblem(
            f"{ckpt}: the tokenizer has {tok_vocab} tokens but the model's vocab_size is {model_vocab}; ids "
            "past the embedding table would crash or score garbage: pair the model with its own tokenizer")
    pad_id = text.get("pad_token_id", config.get("pad_token_id"))
    if pad_id is None:
        pad_text = _token_text(tok_config.get("pad_token"))
        pad_id = tokenizer.token_to_id(pad_text) if pad_text else None
        if pad_id is None:
            raise TokenizerProblem(
                f"{ckpt}: no pad token (pad_token_id is missing in config.json and the tokenizer has no "
                "pad_token); the reward head finds the last token by it: set config.pad_token_id to the id "
                "the model was trained with (TRL: tokenizer.pad_token_id, often the EOS id)")
        config["pad_token_id"] = pad_id
    if isinstance(pad_id, list) or not 0 <= int(pad_id) < (model_vocab or 1 << 62):
        raise TokenizerProblem(f"{ckpt}: pad_token_id {pad_id} is outside the model's vocabulary")
    return config, tok_config, bundle_config


def tensor_shapes(ckpt: Path) -> dict[str, list[int]]:
    """Every tensor's shape, from the safetensors headers (8-byte length, then JSON): nothing is loaded."""
    shapes = {}
    for name in weight_files(ckpt):
        if name == WEIGHT_INDEX:
            continue
        with open(ckpt / name, "rb") as f:
            try:
                header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
            except (ValueError, MemoryError):
                raise UnsupportedCheckpoint(f"{ckpt / name}: not a safetensors file (unreadable header)") from None
        shapes.update({k: list(v["shape"]) for k, v in header.items() if k != "__metadata__"})
    return shapes


def openrlhf_config(ckpt: Path, config: dict, normalize_reward: bool | None = None) -> dict:
    """The bundle's config.json for an OpenRLHF reward checkpoint: transformers' own sequence-classification
    class for its model_type, one label, and `value_head_prefix` where the head is not saved as `score`;
    every other key kept (normalize_reward, mean, std among them). Refused, one line, unless the weights hold
    exactly what that class needs (from the headers), the value head a bias-free [1, hidden] tensor."""
    import math

    import torch
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES

    shapes = tensor_shapes(ckpt)
    prefix = config.get("value_head_prefix") or next((p for p in OPENRLHF_HEADS if f"{p}.weight" in shapes), None)
    if prefix is None or f"{prefix}.weight" not in shapes:
        named = (f"{prefix}.weight (config.json's value_head_prefix)" if prefix
                 else " or ".join(f"{p}.weight" for p in OPENRLHF_HEADS))
        raise UnsupportedCheckpoint(f"{ckpt}: OpenRLHF reward model without its value head: the weights hold no "
                                    f"{named}; save the whole model (value head included) in safetensors")
    cls_name = MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES[config["model_type"]]
    hf_config = transformers.AutoConfig.from_pretrained(ckpt, local_files_only=True, trust_remote_code=False,
                                                        num_labels=1)
    with torch.device("meta"):  # the class's parameter names and shapes, no memory
        model = getattr(transformers, cls_name)(hf_config)
    head = getattr(model, "score", None)
    if not isinstance(head, torch.nn.Linear) or head.bias is not None:
        raise UnsupportedCheckpoint(f"{ckpt}: transformers' {cls_name} has no bias-free `score` layer to carry "
                                    "OpenRLHF's value head (its head pools another way); rewardserve cannot serve it")
    expected = {k: list(v.shape) for k, v in model.state_dict().items()}
    if shapes[f"{prefix}.weight"] != expected["score.weight"] or f"{prefix}.bias" in shapes:
        raise UnsupportedCheckpoint(
            f"{ckpt}: the value head {prefix}.weight has shape {shapes[f'{prefix}.weight']}"
            + (f" and a bias {prefix}.bias" if f"{prefix}.bias" in shapes else "") + f", OpenRLHF's is "
            f"{expected['score.weight']} without bias (hidden_size {expected['score.weight'][1]}, one reward)")
    got = {("score." + k[len(prefix) + 1:] if k.startswith(prefix + ".") else k): v for k, v in shapes.items()}
    missing = sorted(k for k in expected if k not in got)
    wrong = sorted(k for k in expected if k in got and got[k] != expected[k])
    if missing or wrong:
        first = missing[0] if missing else f"{wrong[0]} {got[wrong[0]]} (expected {expected[wrong[0]]})"
        raise UnsupportedCheckpoint(
            f"{ckpt}: the weights do not fit {cls_name}: {len(missing)} missing, {len(wrong)} of another shape, "
            f"first {first}; transformers would initialise them at random, so the import stops")
    normalize = bool(config.get("normalize_reward")) if normalize_reward is None else normalize_reward
    if normalize:
        stats = [config.get(k, d) for k, d in (("mean", 0.0), ("std", 1.0))]
        if not all(isinstance(x, (int, float)) and math.isfinite(x) for x in stats) or stats[1] <= 0:
            raise UnsupportedCheckpoint(f"{ckpt}: normalize_reward is set but mean/std in config.json are "
                                        f"{stats}; a positive finite std and a finite mean are needed")
    bundle = dict(config, architectures=[cls_name], num_labels=1, id2label={"0": "LABEL_0"},
                  label2id={"LABEL_0": 0})
    if normalize_reward is not None:  # OpenRLHF decides it at load (--reward.normalize_enable), not in the file
        bundle["normalize_reward"] = normalize_reward
    if prefix != "score":
        bundle["value_head_prefix"] = prefix
    return bundle


def checkpoint_precision(config: dict, ckpt: Path) -> str:
    dtype = config.get("dtype") or config.get("torch_dtype")
    if dtype is None:  # read one tensor header of the first shard
        first = json.loads((ckpt / WEIGHT_INDEX).read_text())["weight_map"] if (ckpt / WEIGHT_INDEX).is_file() else None
        path = ckpt / (next(iter(first.values())) if first else "model.safetensors")
        with open(path, "rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        dtype = next(v["dtype"] for k, v in header.items() if k != "__metadata__")
        dtype = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}.get(dtype, dtype)
    if dtype not in DTYPE_PRECISION:
        raise UnsupportedCheckpoint(f"{ckpt}: weights in {dtype}; import bf16, fp16 or fp32 checkpoints")
    return DTYPE_PRECISION[dtype]


def weight_files(ckpt: Path) -> list[str]:
    if (ckpt / WEIGHT_INDEX).is_file():
        shards = sorted(set(json.loads((ckpt / WEIGHT_INDEX).read_text())["weight_map"].values()))
        missing = [s for s in shards if not (ckpt / s).is_file()]
        if missing:
            raise ExportError(f"{ckpt}: shards listed in {WEIGHT_INDEX} are missing: {', '.join(missing[:3])}")
        return [WEIGHT_INDEX, *shards]
    return ["model.safetensors"]


def short_pairs(pairs, encoder: TextEncoder, n: int, tokens: int):
    """The first n pairs whose two responses both encode within `tokens` tokens (few, short: the
    reference is computed on CPU); if fewer fit, the shortest ones."""
    lengths = []
    for p in pairs:
        a, b = encoder.encode([p.prompt, p.prompt], [p.chosen, p.rejected])
        lengths.append(max(a.n_tokens, b.n_tokens))
    fitting = [p for p, k in zip(pairs, lengths) if k <= tokens][:n]
    if len(fitting) >= min(n, 2):
        return fitting
    return [pairs[i] for i in sorted(sorted(range(len(pairs)), key=lengths.__getitem__)[:n])]


def import_checkpoint(checkpoint: Path, out: Path, reference: str | None = None, reference_pairs: int = 16,
                      reference_tokens: int = 256, max_length: int | None = None, device: str = "cpu",
                      normalize_reward: bool | None = None, link: bool = False, name: str | None = None) -> Path:
    """`link`: hard-link the weight files into the bundle instead of copying them, where the two lie on one
    filesystem (else copied). The bundle's checksums then also pin the checkpoint's files, which must not
    change; bench/gpu_check.py uses it for a checkpoint it deletes right after, to write 15 GB once, not twice.
    `name`: the served model name (export.exporter.bundle_name; default: the checkpoint directory's name)."""
    from export.model import text_format_for
    from service.runtime import load_runtime

    ckpt, out = Path(checkpoint), Path(out)
    if not (ckpt / "config.json").is_file():
        raise ExportError(f"{ckpt}: not a checkpoint (no config.json)" if ckpt.is_dir() else f"{ckpt}: no such directory")
    if reference_pairs < 2:
        raise ExportError("--reference-pairs must be at least 2 (the pairs calibrate the scores)")
    served_name = bundle_name(ckpt, name)  # before the file loops below reuse `name`
    config, _, openrlhf = check_checkpoint(ckpt, normalize_reward)
    pooling = "native" if openrlhf is None else "last_attended"  # OpenRLHF reads its last attended token
    precision = checkpoint_precision(config, ckpt)
    ref_path = reference_path(ckpt, reference)
    all_pairs, _ = read_pairs(ref_path)
    if not all_pairs:
        raise ExportError(f"{ref_path}: no reference pairs to calibrate and check parity with")
    hf_config = _hf_config(ckpt, config)
    limit = max_length or DEFAULT_MAX_LENGTH
    text = text_format_for(hf_config, ckpt, limit)
    text = text.model_copy(update={"pad_token_id": int(config["pad_token_id"] if config.get("pad_token_id")
                                                       is not None else text.pad_token_id)})
    encoder = TextEncoder.from_dir(ckpt, text)
    pairs = short_pairs(all_pairs, encoder, reference_pairs, reference_tokens)

    out.parent.mkdir(parents=True, exist_ok=True)
    with staged(out) as stage:
        files = weight_files(ckpt)
        for name in ["config.json", *files, *TOKENIZER_FILES]:
            if (ckpt / name).is_file():
                _place(ckpt / name, stage / name, link and name in files)
        if openrlhf is not None:
            (stage / "config.json").write_text(json.dumps(openrlhf, indent=2) + "\n")
            print(f"{ckpt}: OpenRLHF reward model ({config.get('architectures')}); served as "
                  f"{openrlhf['architectures'][0]} (value head {openrlhf.get('value_head_prefix', 'score')}), read "
                  "at the last attended token" + (f", normalised by mean {config.get('mean', 0.0)} and std "
                  f"{config.get('std', 1.0)}" if openrlhf.get("normalize_reward") else ", not normalised "
                  "(normalize_reward is off; --normalize-reward to serve (r - mean) / std)"))
        if config.get("pad_token_id") is not None and _read_json(ckpt / "config.json").get("pad_token_id") is None:
            print(f"{ckpt}: config.json has no pad_token_id; using the tokenizer's pad token "
                  f"(id {config['pad_token_id']}), recorded in the manifest")
        ref_lines = [json.dumps({"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected}) for p in pairs]
        (stage / REFERENCE_FILE).write_text("\n".join(ref_lines) + "\n")
        input_names = ["input_ids", "attention_mask"] + (["token_type_ids"] if text.uses_token_type_ids else [])
        stub = _Stub(files[0], input_names, precision, text, pooling)
        runtime = load_runtime(stage, stub, provider=device)
        items = encoder.encode([p.prompt for p in pairs] * 2, [p.chosen for p in pairs] + [p.rejected for p in pairs])
        # the model's own forward on each item alone (no padding) is the reference
        alone = np.array([runtime.run(encoder.pad([it]))[0] for it in items], dtype=np.float64)
        mixed = items[: min(len(items), 8)]
        batched = runtime.run(encoder.pad(mixed))  # right-padded, mixed lengths: must score alike
        diff = float(np.max(np.abs(batched - alone[: len(mixed)])))
        # bf16/fp16 (a GPU reference): other batch shapes take other kernels, so allow their rounding
        threshold = (FP32_PARITY_THRESHOLD if runtime.precision == "fp32" else reduced_precision_tolerance(alone))
        parity = ParityReport(reference_pairs=len(pairs), max_abs_diff=diff, threshold=threshold,
                              passed=bool(np.isfinite(alone).all() and diff <= threshold),
                              batch_invariance_max_diff=diff,
                              note=f"transformers bundle: the checkpoint itself, run {runtime.precision} on "
                              f"{runtime.describe()['device']}; reference = its own forward per item, unpadded; "
                              "max_abs_diff = the same items in one right-padded batch")
        if not parity.passed:
            raise ParityError(f"import refused: parity failed, padded batches do not score like single items "
                              f"({parity.model_dump_json()})")
        (stage / PARITY_FILE).write_text(json.dumps({"torch_scores": alone.tolist(), "exported_scores": alone.tolist(),
                                                     "reference_precision": runtime.precision}))
        manifest = Manifest(
            name=served_name, created_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            model_format="transformers", model_file=files[0], precision=precision, input_names=input_names,
            text=text, pooling=pooling, normalization=normalization(alone, ref_path.name), parity=parity,
            **provenance(ckpt))
        write_manifest(stage, manifest)
    print(f"bundle written: {out} (transformers, {precision}, {len(files) - (files[0] == WEIGHT_INDEX)} weight "
          f"file(s) {'hard-linked where possible' if link else 'copied'} as they are); reference: {len(pairs)} pairs "
          f"scored {runtime.precision} on "
          f"{runtime.describe()['device']}, padded-batch max abs diff {diff:.2e}")
    return out


def _place(src: Path, dst: Path, link: bool) -> None:
    if link:
        try:
            os.link(src, dst)
            return
        except OSError:  # another filesystem, or links not allowed: copy
            pass
    shutil.copyfile(src, dst)


def _hf_config(ckpt: Path, config: dict):
    from transformers import AutoConfig

    hf = AutoConfig.from_pretrained(ckpt, local_files_only=True, trust_remote_code=False)
    if getattr(hf, "pad_token_id", None) is None:
        hf.pad_token_id = config.get("pad_token_id")
    return hf


class _Stub:
    """The manifest fields load_runtime reads, before the manifest exists."""

    def __init__(self, model_file: str, input_names: list[str], precision: str, text, pooling: str):
        self.model_format, self.model_file, self.input_names = "transformers", model_file, input_names
        self.precision, self.text, self.pooling = precision, text, pooling
