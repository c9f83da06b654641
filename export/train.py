"""Bradley-Terry reward-model trainer. Read it top to bottom: data → model → loop → checkpoints.

loss = -log σ(r_chosen − r_rejected − margin) + centering · mean((r_chosen + r_rejected)²)

Checkpoints (safetensors + JSON, no pickle):
  OUT/best/   the model with the best dev accuracy, plus tokenizer, reference pairs and eval results
  OUT/last/   the latest state with optimizer/scheduler/RNG state, for --resume
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from service.data import PreferencePair, demo_data_path, read_pairs, split_by_prompt
from export.model import default_base_path, load_reward_model, save_checkpoint
from service.encoding import Encoded, TextEncoder
from service.evaluate import longer_wins_baseline
from service.parity import REFERENCE_FILE
from service.scorer import DEFAULT_RUN_ITEMS, score_sorted, sorted_runs

EVAL_FILE = "eval_results.json"
MAX_REFERENCE_PAIRS = 512


class TrainError(ValueError):
    """The run cannot start as configured (no data left, options that do not combine, no model at --base);
    the message names what to change. `rewardserve train` prints it as one line."""


@dataclass
class TrainConfig:
    data: str = ""
    out: str = "runs/default"
    dev: str | None = None
    eval: list[str] = field(default_factory=list)
    base: str | None = None
    pooling: str = "auto"
    join: str = "auto"  # auto: the pair template for encoders, concatenation for decoders | pair | concat
    append_eos: str | None = None  # concat only: end every sequence with this token (TRL appends its EOS string)
    max_length: int = 256
    epochs: float = 2.0
    batch_size: int = 16  # pairs per optimizer step (before accumulation)
    grad_accum: int = 1
    lr: float = 5e-5
    head_lr_scale: float = 1.0  # the head's learning rate = lr x this (a new head starts from random)
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    schedule: str = "cosine"  # cosine | linear | constant
    clip: float = 1.0  # max gradient norm; 0 = no clipping
    center_rewards: float = 0.01  # TRL's center_rewards_coefficient
    dropout: bool = True  # False zeroes every dropout layer (TRL's disable_dropout)
    seed: int = 0
    strict: bool = False
    max_pairs: int | None = None
    drop_long: bool = False  # drop pairs over max_length instead of truncating them (what TRL does)
    chunk_tokens: int = 0  # each batch runs as length-sorted chunks of this many padded tokens; 0 = whole
    batching: str = "length"  # length: similar lengths per batch (less padding) | random: plain shuffle (TRL)
    dev_fraction: float = 0.1
    eval_every: int = 0  # steps; 0 = once per epoch
    save_every: int = 0  # steps between resumable checkpoints; 0 = per eval
    resume: bool = False
    stop_after: int = 0  # stop (resumably) after this many optimizer steps; 0 = run to the end
    threads: int | None = None
    device: str = "cpu"
    progress: bool = True


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def length_grouped_batches(lengths: list[int], batch_size: int, seed: int) -> list[list[int]]:
    """Shuffle, then sort within windows of 50 batches so each batch holds similar lengths.

    Padding to the longest in a batch is where CPU time goes; grouping cuts it without giving up
    randomness (batch order is shuffled again)."""
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    window = batch_size * 50
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start:start + window], key=lambda i: lengths[i])
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def random_batches(n: int, batch_size: int, seed: int) -> list[list[int]]:
    """A plain shuffle cut into batches (what TRL / the HF Trainer do by default)."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]


def epoch_batches(cfg: TrainConfig, lengths: list[int], epoch: int) -> list[list[int]]:
    """One epoch's batches in `cfg.batching` order, fixed by seed + epoch (so --resume replays them exactly)."""
    if cfg.batching == "length":
        return length_grouped_batches(lengths, cfg.batch_size, cfg.seed + epoch)
    return random_batches(len(lengths), cfg.batch_size, cfg.seed + epoch)


def sorted_chunks(lengths: list[int], chunk_tokens: int) -> list[list[int]]:
    """Indices in ascending length, cut into chunks of at most `chunk_tokens` padded tokens (at least one
    item each, no limit on the item count); `chunk_tokens` <= 0: one chunk. The same cut as offline
    scoring (service.scorer.sorted_runs)."""
    return sorted_runs(lengths, max_items=max(1, len(lengths)), max_tokens=chunk_tokens if chunk_tokens > 0 else None)


def forward_sorted(model, encoder: TextEncoder, items: list[Encoded], device: str, chunk_tokens: int) -> torch.Tensor:
    """Rewards for `items` (input order), run as length-sorted chunks of at most `chunk_tokens` padded tokens.

    The loss is a mean over pairs and nothing in the model mixes rows, so splitting a batch changes no
    gradient; it only stops short sequences being padded to the batch's longest. A random batch (TRL's
    order) keeps its composition and loses most of its padding (docs/benchmarks.md 1d)."""
    if chunk_tokens <= 0:
        return model(**to_tensors(encoder, items, device))
    chunks = sorted_chunks([e.n_tokens for e in items], chunk_tokens)
    out = torch.cat([model(**to_tensors(encoder, [items[i] for i in chunk], device)) for chunk in chunks])
    order = torch.tensor([i for chunk in chunks for i in chunk])
    inverse = torch.empty(len(items), dtype=torch.long)
    inverse[order] = torch.arange(len(items))
    return out[inverse.to(out.device)]


def encode_pairs(encoder: TextEncoder, pairs: list[PreferencePair]) -> tuple[list[Encoded], list[Encoded]]:
    """(chosen, rejected) encodings, each with its pair's prompt."""
    prompts = [p.prompt for p in pairs]
    return (encoder.encode(prompts, [p.chosen for p in pairs]),
            encoder.encode(prompts, [p.rejected for p in pairs]))


def pairs_that_fit(chosen: list[Encoded], rejected: list[Encoded]) -> list[int]:
    """Indices of the pairs neither side of which was truncated (what --drop-long keeps, as TRL does)."""
    return [i for i, (c, r) in enumerate(zip(chosen, rejected)) if not (c.truncated or r.truncated)]


def to_tensors(encoder: TextEncoder, items: list[Encoded], device: str) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v).to(device) for k, v in encoder.pad(items).items()}


@torch.no_grad()
def score_encoded(model, encoder: TextEncoder, items: list[Encoded], device: str,
                  batch_size: int = DEFAULT_RUN_ITEMS) -> np.ndarray:
    """PyTorch scores (float64, input order) of `items`, run in length-sorted runs of `batch_size` by the one
    offline scorer (service/scorer.py) that evaluation and parity also use."""
    model.eval()
    return score_sorted(items, lambda batch: model(**to_tensors(encoder, batch, device)).double().cpu().numpy(),
                        batch_size)


def evaluate(model, encoder: TextEncoder, pairs: list[PreferencePair], device: str) -> dict:
    chosen, rejected = encode_pairs(encoder, pairs)
    scores = score_encoded(model, encoder, chosen + rejected, device)
    diff = scores[: len(pairs)] - scores[len(pairs):]
    return {
        "pairs": len(pairs),
        "accuracy": float(np.mean(diff > 0)),  # ties count as wrong
        "mean_margin": float(np.mean(diff)),
        "loss": float(np.mean(np.logaddexp(0.0, -diff))),
        "length_baseline": length_baseline(pairs),
    }


# Accuracy of "the longer response wins": the one definition (characters, a tie no win) in
# service/evaluate.py, so training, `rewardserve eval` and the audit report one number for one data set.
length_baseline = longer_wins_baseline


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    return 1.0


def save_train_state(out: Path, optimizer, state: dict) -> None:
    """Optimizer moments and RNG as safetensors, counters as JSON: resumable without pickle."""
    tensors = {"rng.torch": torch.get_rng_state()}
    for i, group in enumerate(optimizer.param_groups):
        for j, p in enumerate(group["params"]):
            st = optimizer.state.get(p)
            if st:
                for k, v in st.items():
                    tensors[f"opt.{i}.{j}.{k}"] = (v if torch.is_tensor(v) else torch.tensor(v)).detach().cpu().contiguous()
    save_file(tensors, out / "optimizer.safetensors")
    (out / "trainer_state.json").write_text(json.dumps(state, indent=2))


def load_train_state(out: Path, optimizer, device: str) -> dict:
    tensors = load_file(out / "optimizer.safetensors")
    torch.set_rng_state(tensors.pop("rng.torch"))
    for i, group in enumerate(optimizer.param_groups):
        for j, p in enumerate(group["params"]):
            keys = [k for k in tensors if k.startswith(f"opt.{i}.{j}.")]
            if keys:
                optimizer.state[p] = {k.rsplit(".", 1)[1]: tensors[k].to(device) for k in keys}
    return json.loads((out / "trainer_state.json").read_text())


def quiet_transformers() -> None:
    """What --no-progress also turns off: transformers' own progress bars ("Loading weights", "Writing model
    shards", drawn with its tqdm, not ours) and its warnings, such as the load report that lists the base
    model's weights our reward head does not use. Both go to stderr and bury our one-line progress in logs;
    transformers' errors still show."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def train(cfg: TrainConfig) -> Path:
    if not cfg.progress:
        quiet_transformers()
    if cfg.batching not in ("length", "random"):
        raise TrainError(f"batching must be 'length' or 'random', not {cfg.batching!r}")
    if cfg.clip < 0:
        raise TrainError(f"--clip must be >= 0 (0: no clipping), not {cfg.clip}")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)
    device = cfg.device

    # ---- data
    data_path = cfg.data or str(demo_data_path())
    pairs, report = read_pairs(data_path, strict=cfg.strict)
    print(report.summary())
    for line_no, reason in report.problems[:20]:
        print(f"  skipped {data_path}:{line_no}: {reason}")
    if cfg.dev:
        dev_pairs, dev_report = read_pairs(cfg.dev, strict=cfg.strict)
        print(dev_report.summary())
    else:
        pairs, dev_pairs = split_by_prompt(pairs, cfg.dev_fraction)
        print(f"split by prompt hash: {len(pairs)} train / {len(dev_pairs)} dev")
    if cfg.max_pairs:
        pairs = pairs[: cfg.max_pairs]
    if not pairs or not dev_pairs:
        raise TrainError(f"need at least one training pair and one dev pair ({len(pairs)} train, {len(dev_pairs)} dev)")

    # ---- model and encodings
    resume_dir = out / "last"
    base = Path(cfg.base) if cfg.base else default_base_path()
    source = resume_dir if cfg.resume and (resume_dir / "trainer_state.json").exists() else base
    if source == base and not (base / "config.json").is_file():
        raise TrainError(f"--base {base}: not a Hugging Face model directory (no config.json)")
    model, fmt = load_reward_model(source, pooling=cfg.pooling, max_length=cfg.max_length)
    if cfg.join != "auto" and source == base:
        fmt = fmt.model_copy(update={"join": cfg.join})
    if cfg.append_eos and source == base:
        if fmt.join != "concat":
            raise TrainError("--append-eos needs --join concat (the pair template ends with its own separator)")
        fmt = fmt.model_copy(update={"append_eos": True, "eos_token": cfg.append_eos})
    model.to(device)
    if not cfg.dropout:
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
    encoder = TextEncoder.from_dir(source, fmt)
    chosen, rejected = encode_pairs(encoder, pairs)
    margins = torch.tensor([p.margin for p in pairs], dtype=torch.float32)
    n_truncated = sum(c.truncated or r.truncated for c, r in zip(chosen, rejected))
    print(f"model: {base} pooling={model.pooling} join={fmt.join} max_length={fmt.max_length}; "
          f"{n_truncated}/{len(pairs)} training pairs " + ("over max_length, dropped" if cfg.drop_long else
                                                         "truncated (prompt cut from the left, response end kept)"))
    if cfg.drop_long:
        keep = pairs_that_fit(chosen, rejected)
        pairs, chosen, rejected = [pairs[i] for i in keep], [chosen[i] for i in keep], [rejected[i] for i in keep]
        margins = margins[keep]
        if not pairs:
            raise TrainError("--drop-long: every training pair is longer than max_length")

    # ---- optimizer and schedule
    groups = []  # (backbone | head) x (matrices: decayed | biases and norms: not), each with its lr scale
    for is_head, lr_scale in ((False, 1.0), (True, cfg.head_lr_scale)):
        for decayed in (True, False):
            params = [p for n, p in model.named_parameters()
                      if model.is_head_parameter(n) == is_head and (p.ndim >= 2) == decayed]
            if params:
                groups.append({"params": params, "weight_decay": cfg.weight_decay if decayed else 0.0,
                               "lr_scale": lr_scale})
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr)
    steps_per_epoch = max(1, math.ceil(len(pairs) / cfg.batch_size) // cfg.grad_accum)
    total_steps = max(1, int(steps_per_epoch * cfg.epochs))
    warmup = int(total_steps * cfg.warmup_ratio)
    state = {"step": 0, "micro_step": 0, "best_accuracy": -1.0, "history": []}
    if source == resume_dir:
        state = load_train_state(resume_dir, optimizer, device)
        print(f"resumed from {resume_dir} at step {state['step']}")

    def checkpoint(directory: Path, with_optimizer: bool) -> None:
        save_checkpoint(model, fmt, directory, base if source == base else source,
                        extra={"base_model": str(base), "trainer_config": asdict(cfg)})
        if with_optimizer:
            save_train_state(directory, optimizer, state)

    def run_eval() -> dict:
        metrics = evaluate(model, encoder, dev_pairs, device)
        metrics["step"] = state["step"]
        state["history"].append(metrics)
        print(f"step {state['step']}: dev accuracy {metrics['accuracy']:.4f} margin {metrics['mean_margin']:.3f} "
              f"loss {metrics['loss']:.4f} (longer-wins {metrics['length_baseline']:.3f})")
        if metrics["accuracy"] > state["best_accuracy"]:
            state["best_accuracy"] = metrics["accuracy"]
            checkpoint(out / "best", with_optimizer=False)
        checkpoint(resume_dir, with_optimizer=True)
        return metrics

    # ---- loop: micro-batches in a per-epoch order fixed by the seed, so resume replays exactly
    lengths = [max(c.n_tokens, r.n_tokens) for c, r in zip(chosen, rejected)]
    total_micro = total_steps * cfg.grad_accum
    started = time.time()
    bar = tqdm(total=total_steps, initial=state["step"], disable=not cfg.progress, dynamic_ncols=True)
    recent_loss, recent_acc = state.setdefault("loss_curve", []), []
    model.train()
    batches, batches_epoch = [], None
    while state["micro_step"] < total_micro:
        epoch, offset = divmod(state["micro_step"], steps_per_epoch * cfg.grad_accum)
        if epoch != batches_epoch:  # once per epoch, not per micro-step: it shuffles (and sorts) every pair
            batches = epoch_batches(cfg, lengths, epoch)[: steps_per_epoch * cfg.grad_accum]
            batches_epoch = epoch
        idx = batches[offset]
        rewards = forward_sorted(model, encoder, [chosen[i] for i in idx] + [rejected[i] for i in idx], device,
                                 cfg.chunk_tokens)
        r_c, r_r = rewards[: len(idx)], rewards[len(idx):]
        loss = -F.logsigmoid(r_c - r_r - margins[idx].to(device)).mean()
        if cfg.center_rewards:
            loss = loss + cfg.center_rewards * ((r_c + r_r) ** 2).mean()
        (loss / cfg.grad_accum).backward()
        recent_loss.append(loss.item())
        recent_acc.append((r_c > r_r).float().mean().item())
        state["micro_step"] += 1
        if state["micro_step"] % cfg.grad_accum:
            continue
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * group["lr_scale"] * lr_factor(state["step"], total_steps, warmup, cfg.schedule)
        if cfg.clip != 0:  # 0 = no clipping (a max norm of 0 would zero every gradient)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state["step"] += 1
        bar.update(1)
        bar.set_postfix(loss=f"{np.mean(recent_loss[-50:]):.4f}", acc=f"{np.mean(recent_acc[-50:]):.3f}",
                        lr=f"{optimizer.param_groups[0]['lr']:.2e}")
        end_of_epoch = state["step"] % steps_per_epoch == 0
        if (cfg.eval_every and state["step"] % cfg.eval_every == 0) or end_of_epoch or state["step"] == total_steps:
            run_eval()
            model.train()
        elif cfg.save_every and state["step"] % cfg.save_every == 0:
            checkpoint(resume_dir, with_optimizer=True)
        if cfg.stop_after and state["step"] >= cfg.stop_after and state["step"] < total_steps:
            checkpoint(resume_dir, with_optimizer=True)
            print(f"stopped after step {state['step']}; continue with --resume")
            return resume_dir
    bar.close()
    train_seconds = time.time() - started
    if not state["history"] or state["history"][-1]["step"] != state["step"]:
        run_eval()

    # ---- final: evaluate the best checkpoint on every set, store reference pairs for calibration
    best = out / "best"
    model, fmt = load_reward_model(best)
    model.to(device)
    results = {"dev": {"path": cfg.dev or f"{data_path} (prompt-hash split)", **evaluate(model, encoder, dev_pairs, device)}}
    for path in cfg.eval:
        eval_pairs, _ = read_pairs(path)
        results[Path(path).stem] = {"path": path, **evaluate(model, encoder, eval_pairs, device)}
    for name, m in results.items():
        print(f"{name:>32}: accuracy {m['accuracy']:.4f}  longer-wins {m['length_baseline']:.4f}  ({m['pairs']} pairs)")
    summary = {"results": results, "train_seconds": round(train_seconds, 1), "steps": state["step"],
               "loss_curve": [round(x, 5) for x in state["loss_curve"]],
               "train_pairs": len(pairs), "truncated_train_pairs": n_truncated, "history": state["history"],
               "data": data_path}
    (best / EVAL_FILE).write_text(json.dumps(summary, indent=2))
    rng = random.Random(cfg.seed)
    reference = rng.sample(dev_pairs, min(MAX_REFERENCE_PAIRS, len(dev_pairs)))
    with open(best / REFERENCE_FILE, "w", encoding="utf-8") as f:
        for p in reference:
            f.write(json.dumps(asdict(p), ensure_ascii=False) + "\n")
    print(f"best checkpoint: {best} (training took {train_seconds:.0f} s)")
    return best
