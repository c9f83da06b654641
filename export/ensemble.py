"""Training an ensemble of reward models and exporting it as a model repository (issue 26, point 4).

`rewardserve train --ensemble K --out OUT` trains K members, OUT/member-0 … OUT/member-<K-1>, each a normal
training output directory (best/, last/) written by `export.train.train` unchanged. Members differ by seed
(seed + i), which fixes the head's initialisation, dropout and the data order; with `--bootstrap` each member
also trains on its own resample of the training pairs (drawn with replacement, as many as there are), the
classic way to make members disagree where the data is thin. The dev set is the same for every member (the
prompt-hash split is made once, before resampling), so the members' dev accuracies compare.

OUT/ensemble_training.json records K, the seeds and whether bootstrap was used; it is also how `rewardserve
export` recognises an ensemble training directory.

`rewardserve export OUT --out REPO` on such a directory writes a model repository (contracts: issue 26):
REPO/<name>-<i>/<version>/ is member i exported by the normal exporter (calibrated, parity-checked), and
REPO/<name>/ensemble.json names the members and the aggregate. The version is 1 in a new repository and the
next free integer where the member already has versions, so exporting a retrained ensemble into a served
repository is a hot swap, never an overwrite of a version that may be serving.

This is a wrapper around the single-model trainer and exporter on purpose: they stay the one definition of
how a model is trained and exported, and an ensemble is nothing but K of them plus one small JSON file.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, replace
from pathlib import Path

from service.data import read_pairs, split_by_prompt

MEMBER_PREFIX = "member-"
TRAINING_FILE = "ensemble_training.json"
ENSEMBLE_FILE = "ensemble.json"
AGGREGATES = ("mean", "min", "uwo")
DEFAULT_AGGREGATE = "mean"  # docs/benchmarks.md, "Ensembles": what the measurement recommends


def member_dir(out: Path, i: int) -> Path:
    return Path(out) / f"{MEMBER_PREFIX}{i}"


def is_ensemble_training_dir(path: Path) -> bool:
    return (Path(path) / TRAINING_FILE).is_file()


def member_dirs(out: Path) -> list[Path]:
    """The members of an ensemble training directory, in order; ValueError (one line) when one is missing or
    unfinished, so an export never writes a repository with a hole in it."""
    out = Path(out)
    info = json.loads((out / TRAINING_FILE).read_text())
    dirs = [member_dir(out, i) for i in range(int(info["members"]))]
    for d in dirs:
        if not (d / "best" / "config.json").is_file():
            raise ValueError(f"{d}: ensemble member has no best/ checkpoint (training unfinished? rerun "
                             "`rewardserve train --ensemble ... --resume`)")
    return dirs


def _bootstrap_files(cfg, k: int, out: Path) -> tuple[str, list[Path]]:
    """Split train/dev once (as the trainer would), then write one resample of the training pairs per member.
    Returns the dev file every member evaluates on and the members' training files."""
    from export.train import TrainError
    from service.data import demo_data_path

    data_path = cfg.data or str(demo_data_path())
    pairs, _ = read_pairs(data_path, strict=cfg.strict)
    if cfg.dev:
        dev_path = cfg.dev
    else:
        pairs, dev_pairs = split_by_prompt(pairs, cfg.dev_fraction)
        dev_path = str(out / "dev.jsonl")
        _write_pairs(Path(dev_path), dev_pairs)
    if cfg.max_pairs:
        pairs = pairs[: cfg.max_pairs]
    if not pairs:
        raise TrainError("--bootstrap: no training pairs to resample")
    files = []
    for i in range(k):
        rng = random.Random(cfg.seed + i)
        sample = [pairs[rng.randrange(len(pairs))] for _ in range(len(pairs))]
        path = member_dir(out, i) / "bootstrap_train.jsonl"
        _write_pairs(path, sample)
        files.append(path)
    return dev_path, files


def _write_pairs(path: Path, pairs) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for p in pairs:
            f.write(json.dumps(asdict(p), ensure_ascii=False) + "\n")


def train_ensemble(cfg, k: int, bootstrap: bool = False) -> list[Path]:
    """Train K members of `cfg` (a TrainConfig) into cfg.out/member-<i>/ with seed cfg.seed + i. With
    cfg.resume, a member whose training finished is kept and an unfinished one resumes."""
    from export.train import TrainError, train

    if k < 2:
        raise TrainError(f"--ensemble must be at least 2 (members), not {k}")
    if cfg.stop_after:
        raise TrainError("--stop-after does not combine with --ensemble (use --resume to continue an ensemble)")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    seeds = [cfg.seed + i for i in range(k)]
    (out / TRAINING_FILE).write_text(json.dumps({"members": k, "seeds": seeds, "bootstrap": bootstrap,
                                                 "data": cfg.data, "dev": cfg.dev}, indent=2))
    dev, files = _bootstrap_files(cfg, k, out) if bootstrap else (cfg.dev, [None] * k)
    bests = []
    for i, seed in enumerate(seeds):
        target = member_dir(out, i)
        if cfg.resume and (target / "best" / "eval_results.json").is_file():
            print(f"member {i}: finished earlier, kept ({target / 'best'})")
            bests.append(target / "best")
            continue
        member = replace(cfg, out=str(target), seed=seed, dev=dev)
        if files[i] is not None:  # the resample replaces the data; max_pairs was applied before resampling
            member = replace(member, data=str(files[i]), max_pairs=None)
        print(f"member {i}/{k}: seed {seed}" + (f", bootstrap sample {files[i]}" if files[i] else ""))
        bests.append(train(member))
    print(f"ensemble of {k} trained in {out}; export it with `rewardserve export {out} --out REPO`")
    return bests


def next_version(model_dir: Path) -> str:
    """1 for a new model; else one above the highest integer version folder (never overwrite a version)."""
    versions = [int(p.name) for p in Path(model_dir).glob("*") if p.is_dir() and p.name.isdigit()]
    return str(max(versions, default=0) + 1)


def export_ensemble(train_dir: Path, repo: Path, name: str | None = None, aggregate: str = DEFAULT_AGGREGATE,
                    lam: float = 1.0, fmt: str = "onnx", quantize: str | None = None,
                    max_length: int | None = None, reference: str | None = None, **options) -> Path:
    """Export every member of an ensemble training directory into the repository REPO and write
    REPO/<name>/ensemble.json. Returns the ensemble.json path. `options`: any further export_bundle keyword
    (e.g. calibrate_temperature), the same for every member."""
    from export.exporter import ExportError, bundle_name, checked_name, export_bundle

    if aggregate not in AGGREGATES:
        raise ExportError(f"--aggregate must be one of {', '.join(AGGREGATES)}, not {aggregate!r}")
    if lam < 0:
        raise ExportError(f"--lambda must be >= 0, not {lam}")
    members = member_dirs(train_dir)
    name = checked_name(name) if name is not None else bundle_name(members[0] / "best")
    repo = Path(repo)
    if (repo / name).is_dir() and any(p.name.isdigit() for p in (repo / name).iterdir()):
        raise ExportError(f"{repo / name}: a model of that name exists in the repository; pick another --name")
    names = []
    for i, d in enumerate(members):
        member_name = checked_name(f"{name}-{i}")
        version = next_version(repo / member_name)
        export_bundle(d, repo / member_name / version, fmt=fmt, quantize=quantize, max_length=max_length,
                      reference=reference, name=member_name, **options)
        names.append(member_name)
    spec = {"members": names, "aggregate": aggregate, "lambda": lam}
    path = repo / name / ENSEMBLE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(spec, indent=2) + "\n")
    print(f"ensemble written: {path} ({len(names)} members, aggregate {aggregate})")
    return path
