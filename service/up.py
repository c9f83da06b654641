"""`rewardserve up`: the one-command main job — train a default model if none exists, export, serve.

Training and export import torch; they run in the same process only when a bundle is missing, and
the service itself then loads the bundle like any other (ONNX Runtime, no torch on the hot path).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def plan(bundle: Path, retrain: bool, data: str) -> tuple[bool, str]:
    """(train and export first?, the line that says what `up` is about to do)."""
    source = data or "shipped demo set"
    if not (bundle / "manifest.json").exists():
        return True, f"no bundle at {bundle}: training a default model (data: {source})"
    if retrain:
        return True, f"retraining: replacing the bundle at {bundle} (data: {source})"
    return False, f"using existing bundle {bundle} (pass --retrain to rebuild it)"


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="rewardserve up", description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="models/default", help="where the checkpoint and bundle live")
    ap.add_argument("--data", default="", help="preference JSONL to train on (default: the shipped demo set)")
    ap.add_argument("--epochs", type=float, default=2.0)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--retrain", action="store_true", help="train and export again even if a bundle exists")
    ap.add_argument("--name", default=None, help="the served model name, set when the bundle is exported "
                    "(default: the base model's short name + \"-rm\", all-MiniLM-L6-v2-rm for the default base)")
    args, serve_args = ap.parse_known_args(argv)

    workdir = Path(args.workdir)
    bundle = workdir / "bundle"
    build, message = plan(bundle, args.retrain, args.data)
    print(message)
    if build:
        from export.exporter import export_bundle
        from export.train import TrainConfig, train

        best = train(TrainConfig(data=args.data, out=str(workdir / "train"), epochs=args.epochs,
                                 max_length=args.max_length))
        export_bundle(best, bundle, name=args.name)  # named after its base model, not "bundle" (the directory)

    from service.server import main as serve_main

    serve_main(["--bundle", str(bundle), *serve_args])
