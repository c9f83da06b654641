"""Trainer: a short run of the real base model, and exact checks on tiny random models (seeds, resume,
truncation, batch orders, chunked forward, head learning rate, pooling, joining prompt and response).

The helpers here (tiny_pairs, quick_config, head_weights, trained_minilm) are shared with test_export.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from service.data import demo_data_path, read_pairs
from export.exporter import export_bundle
from export.model import load_reward_model
from export.train import (TrainConfig, TrainError, forward_sorted, length_grouped_batches, random_batches,
                          sorted_chunks, train)
from service.bundle import open_bundle
from service.encoding import TextEncoder
from service.parity import REFERENCE_FILE
from tests.helpers import skip_or_fail_in_ci, tiny_bert, write_jsonl

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"

def tiny_pairs(n: int = 48) -> list[dict]:
    pairs, _ = read_pairs(demo_data_path())
    return [{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected} for p in pairs[:n]]


def quick_config(tmp: Path, base: Path, **kw) -> TrainConfig:
    tmp.mkdir(parents=True, exist_ok=True)
    data = write_jsonl(tmp / "pairs.jsonl", tiny_pairs())
    defaults = dict(data=str(data), out=str(tmp / "run"), base=str(base), max_length=64, epochs=1,
                    batch_size=8, lr=1e-3, progress=False, dev_fraction=0.25, threads=2)
    return TrainConfig(**{**defaults, **kw})


# ---------------------------------------------------------------- real base model, short CI run

def trained_minilm(tmp_path_factory) -> Path:
    """The default base (all-MiniLM-L6-v2) fine-tuned briefly on the shipped demo set, once per test session:
    this file's training test and test_export.py's export test read the same checkpoint."""
    out = tmp_path_factory.getbasetemp() / "minilm"
    best = out / "run" / "best"
    if (best / REFERENCE_FILE).exists():  # the last file train() writes
        return best
    return train(TrainConfig(out=str(out / "run"), max_length=96, epochs=2, batch_size=16, lr=5e-5,
                             dev_fraction=0.2, progress=False, threads=2))


@pytest.fixture(scope="module")
def minilm_run(tmp_path_factory):
    """The default base (all-MiniLM-L6-v2) fine-tuned briefly on the shipped demo set."""
    return trained_minilm(tmp_path_factory)


def test_short_training_run_lowers_loss_and_beats_chance_on_held_out_pairs(minilm_run):
    summary = json.loads((minilm_run / "eval_results.json").read_text())
    curve = summary["loss_curve"]
    k = max(3, len(curve) // 5)
    assert np.mean(curve[-k:]) < np.mean(curve[:k]) - 0.05, "training loss did not fall"
    dev = summary["results"]["dev"]
    assert dev["pairs"] >= 30
    assert dev["accuracy"] > 0.65, dev  # held-out prompts (prompt-hash split); chance is 0.5


# ---------------------------------------------------------------- tiny models: fast, exact checks

@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    return tiny_bert(tmp_path_factory.mktemp("tiny_bert"))


def head_weights(best: Path) -> np.ndarray:
    from safetensors.numpy import load_file

    return load_file(best / "reward_head.safetensors")["head.weight"]


def test_same_seed_same_model_other_seed_other_model(tiny_base, tmp_path):
    a = train(quick_config(tmp_path / "a", tiny_base, seed=7))
    b = train(quick_config(tmp_path / "b", tiny_base, seed=7))
    c = train(quick_config(tmp_path / "c", tiny_base, seed=8))
    assert np.array_equal(head_weights(a), head_weights(b))
    assert not np.array_equal(head_weights(a), head_weights(c))


def test_resume_continues_exactly_where_it_stopped(tiny_base, tmp_path):
    straight = train(quick_config(tmp_path / "s", tiny_base, epochs=2))
    cfg = quick_config(tmp_path / "r", tiny_base, epochs=2, stop_after=3)
    stopped = train(cfg)
    assert stopped.name == "last" and json.loads((stopped / "trainer_state.json").read_text())["step"] == 3
    cfg.stop_after, cfg.resume = 0, True
    resumed = train(cfg)
    np.testing.assert_allclose(head_weights(resumed), head_weights(straight), rtol=0, atol=1e-6)


def test_truncation_cuts_prompt_from_the_left_and_keeps_the_response_end(tiny_base, tmp_path):
    _, fmt = load_reward_model(tiny_base, max_length=16)
    encoder = TextEncoder.from_dir(tiny_base, fmt)
    prompt = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda"
    [enc] = encoder.encode([prompt], ["one two three"])
    text = encoder.tokenizer.decode(enc.ids)
    assert enc.truncated and enc.n_tokens == 16
    assert text.endswith("one two three") and "lambda" in text and "alpha" not in text
    [enc] = encoder.encode(["short prompt"], [" ".join(f"w{i}" for i in range(40)) + " final words"])
    assert enc.truncated and enc.n_tokens == 16 and encoder.tokenizer.decode(enc.ids).endswith("final words")
    [enc] = encoder.encode(["short"], ["fits"])
    assert not enc.truncated


def test_drop_long_trains_only_on_pairs_that_fit_like_trl(tiny_base, tmp_path):
    """--drop-long (TRL's behaviour) drops exactly the pairs the default would truncate."""
    cut = train(quick_config(tmp_path / "cut", tiny_base, max_length=48, epochs=0.25))
    dropped = train(quick_config(tmp_path / "drop", tiny_base, max_length=48, epochs=0.25, drop_long=True))
    cut_summary = json.loads((cut / "eval_results.json").read_text())
    drop_summary = json.loads((dropped / "eval_results.json").read_text())
    n_long = cut_summary["truncated_train_pairs"]
    assert 0 < n_long < cut_summary["train_pairs"]
    assert drop_summary["train_pairs"] == cut_summary["train_pairs"] - n_long


def test_batch_orders_cover_every_pair_once_and_length_grouping_cuts_padding():
    """--batching length (default) and random (TRL's plain shuffle): each pair once per epoch, fixed by the
    seed; grouping by length pads far less than the shuffle on the same lengths."""
    rng = np.random.default_rng(0)
    lengths = [int(n) for n in rng.integers(8, 512, size=1000)]
    padded = {}
    for name, batches in {"length": length_grouped_batches(lengths, 16, seed=3),
                          "random": random_batches(len(lengths), 16, seed=3)}.items():
        assert sorted(i for b in batches for i in b) == list(range(len(lengths))), name
        assert all(len(b) <= 16 for b in batches)
        padded[name] = sum(max(lengths[i] for i in b) * len(b) for b in batches)
    assert random_batches(len(lengths), 16, seed=3) == random_batches(len(lengths), 16, seed=3)
    assert random_batches(len(lengths), 16, seed=3) != random_batches(len(lengths), 16, seed=4)
    assert padded["length"] < 0.7 * padded["random"], padded
    with pytest.raises(ValueError, match="batching"):
        train(TrainConfig(batching="sorted"))


def test_length_sorted_chunks_give_the_whole_batch_rewards_and_gradient(tiny_base):
    """forward_sorted (chunks of <= chunk_tokens padded tokens) computes the same rewards, in input order,
    and the same gradient as one forward over the whole padded batch."""
    model, fmt = load_reward_model(tiny_base, max_length=64)
    model.eval()  # dropout off: both ways compute the same function
    encoder = TextEncoder.from_dir(tiny_base, fmt)
    pairs = tiny_pairs()[:12]
    items = encoder.encode([p["prompt"] for p in pairs] * 2,
                           [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs])
    lengths = [e.n_tokens for e in items]
    assert len(set(lengths)) > 3, lengths
    chunks = sorted_chunks(lengths, 96)
    assert len(chunks) > 2 and sorted(i for c in chunks for i in c) == list(range(len(items)))
    assert all(max(lengths[i] for i in c) * len(c) <= 96 or len(c) == 1 for c in chunks)
    grads = []
    for chunk_tokens in (0, 96):
        model.zero_grad()
        rewards = forward_sorted(model, encoder, items, "cpu", chunk_tokens)
        (rewards * torch.linspace(-1, 1, len(items))).sum().backward()  # order-sensitive: a mix-up would show
        grads.append((rewards.detach().clone(), model.head.weight.grad.clone()))
    torch.testing.assert_close(grads[1][0], grads[0][0], atol=1e-5, rtol=0)
    torch.testing.assert_close(grads[1][1], grads[0][1], atol=1e-5, rtol=1e-4)


def test_head_lr_scale_moves_only_the_head_faster(tiny_base, tmp_path):
    """After one AdamW step (each update = lr x sign of the gradient) two runs that differ only in
    --head-lr-scale have the same backbone and heads that differ by (scale - 1) x lr per weight."""
    from safetensors.numpy import load_file

    lr, scale = 1e-6, 1000.0
    runs = [train(quick_config(tmp_path / str(s), tiny_base, lr=lr, head_lr_scale=s, stop_after=1, warmup_ratio=0.0,
                               schedule="constant", weight_decay=0.0)) for s in (1.0, scale)]
    backbones = [load_file(run / "model.safetensors") for run in runs]
    assert backbones[0].keys() == backbones[1].keys()
    assert all(np.array_equal(backbones[0][k], backbones[1][k]) for k in backbones[0])
    head_step_difference = np.abs(head_weights(runs[1]) - head_weights(runs[0]))
    np.testing.assert_allclose(np.median(head_step_difference), (scale - 1) * lr, rtol=0.01)
    assert np.all(head_step_difference <= (scale - 1) * lr * 1.01)


def test_clip_0_means_no_clipping(tiny_base, tmp_path):
    """--clip 0 turns gradient clipping off. It used to clip to norm 0, which zeroes every gradient, so the
    model never moved. One AdamW step with --clip 0 must move the weights exactly as one under a bound no
    gradient reaches (clip_grad_norm_ then scales by exactly 1.0); a negative bound is refused."""
    from safetensors.numpy import load_file

    one_step = dict(stop_after=1, warmup_ratio=0.0, schedule="constant", weight_decay=0.0)
    unclipped = train(quick_config(tmp_path / "unclipped", tiny_base, clip=1e9, **one_step))
    off = train(quick_config(tmp_path / "off", tiny_base, clip=0.0, **one_step))
    before, after = load_file(tiny_base / "model.safetensors"), load_file(off / "model.safetensors")
    assert sum(not np.array_equal(before[k], after[k]) for k in before) > len(before) // 2, "--clip 0: nothing learned"
    assert np.array_equal(head_weights(off), head_weights(unclipped))
    reference = load_file(unclipped / "model.safetensors")
    assert all(np.array_equal(after[k], reference[k]) for k in reference)
    with pytest.raises(ValueError, match="clip"):
        train(quick_config(tmp_path / "negative", tiny_base, clip=-1.0))


@pytest.mark.parametrize("batching", ["length", "random"])
def test_batch_order_is_built_once_per_epoch(tiny_base, tmp_path, monkeypatch, batching):
    """The epoch's batch order (a shuffle, and a sort per window, over every pair) is built once per epoch,
    not once per micro-step as it used to be; the order is unchanged (same-seed and resume tests)."""
    import export.train as trainer

    name = {"length": "length_grouped_batches", "random": "random_batches"}[batching]
    real, seeds = getattr(trainer, name), []

    def counted(*args):
        seeds.append(args[2])
        return real(*args)

    monkeypatch.setattr(trainer, name, counted)
    best = train(quick_config(tmp_path, tiny_base, epochs=2, grad_accum=2, batching=batching, seed=5))
    summary = json.loads((best / "eval_results.json").read_text())
    assert summary["steps"] >= 4 and len(summary["loss_curve"]) == 2 * summary["steps"]  # several micro-steps per epoch
    assert seeds == [5, 6]  # one order per epoch, seeded seed + epoch


def test_pooling_native_trains_the_architectures_own_head_like_trl(tiny_base, tmp_path):
    """--pooling native on a plain base: BertForSequenceClassification with one label (CLS, pooler, linear:
    the model TRL's RewardTrainer trains) is trained, saved natively, and exports with parity."""
    model, _ = load_reward_model(tiny_base, pooling="native")
    assert model.pooling == "native" and type(model.backbone).__name__ == "BertForSequenceClassification"
    assert model.backbone.config.num_labels == 1
    assert {n for n, _ in model.named_parameters() if model.is_head_parameter(n)} == {
        "backbone.classifier.weight", "backbone.classifier.bias"}
    best = train(quick_config(tmp_path, tiny_base, pooling="native", join="concat", epochs=0.5))
    assert json.loads((best / "reward_config.json").read_text())["pooling"] == "native"
    bundle = export_bundle(best, tmp_path / "native")
    manifest, _ = open_bundle(bundle)
    assert manifest.pooling == "native" and manifest.parity.max_abs_diff <= 1e-4


def test_join_concat_puts_prompt_and_response_in_one_segment_through_export(tiny_base, tmp_path):
    """--join concat on an encoder: one [CLS] … [SEP] sequence, token type 0 throughout, kept in the bundle."""
    best = train(quick_config(tmp_path, tiny_base, join="concat", epochs=0.25))
    bundle = export_bundle(best, tmp_path / "concat")
    manifest, encoder = open_bundle(bundle)
    assert manifest.text.join == "concat" and manifest.parity.max_abs_diff <= 1e-4
    [enc] = encoder.encode(["Is the sky blue?"], ["Yes."])
    assert set(enc.type_ids) == {0}
    assert encoder.tokenizer.decode(enc.ids, skip_special_tokens=False).count("[SEP]") == 1


def test_append_eos_ends_every_sequence_like_trl_and_needs_concat(tiny_base, tmp_path):
    """--append-eos [SEP] with --join concat: TRL appends its eos string before BERT's own [SEP], so its
    model sees [CLS] … [SEP] [SEP]; ours can train on exactly that, and the bundle keeps the rule."""
    best = train(quick_config(tmp_path, tiny_base, join="concat", append_eos="[SEP]", epochs=0.25))
    bundle = export_bundle(best, tmp_path / "eos")
    manifest, encoder = open_bundle(bundle)
    assert manifest.text.append_eos and manifest.parity.max_abs_diff <= 1e-4
    [enc] = encoder.encode(["Is the sky blue?"], ["Yes."])
    sep = encoder.tokenizer.token_to_id("[SEP]")
    assert enc.ids[-2:] == [sep, sep] and enc.ids.count(sep) == 2
    with pytest.raises(TrainError, match="--join concat"):
        train(quick_config(tmp_path / "pair", tiny_base, join="pair", append_eos="[SEP]"))


# ---------------------------------------------------------------- data


def test_shared_preference_files_parse_cleanly():
    if not SHARED.exists():
        skip_or_fail_in_ci(f"{SHARED} (the real preference data) is not present")
    for name in ("train", "dev_in_domain", "llmbar", "hhh_alignment", "mtbench_human_llmbar200"):
        pairs, report = read_pairs(SHARED / f"{name}.jsonl", strict=True)
        assert len(pairs) > 100 and not report.problems
