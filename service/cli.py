"""`rewardserve` command line: train, export, verify, eval, audit (offline side) and serve, up (online side).

Imports are lazy so that `rewardserve serve`, `eval` and `audit` never import torch.

Bad input (a missing file, options that do not combine, a directory that is no checkpoint or bundle) and
a refused check (parity) end in one line on stderr, `rewardserve <command>: <message>`, with exit code 2
or 1: the user needs the message, not a traceback into the library that raised it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


class HelpWithDefaults(argparse.HelpFormatter):
    """Every option's help ends with its default. argparse.ArgumentDefaultsHelpFormatter also prints the
    meaningless defaults of on/off switches ("--no-progress (default: True)") and of options without one."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.nargs == 0 or action.default in (None, "", [], argparse.SUPPRESS) or "%(default)" in text:
            return text
        return f"{text} (default: %(default)s)"


def _train(argv: list[str]) -> None:
    from export.train import TrainConfig, train

    d = TrainConfig()
    ap = argparse.ArgumentParser(prog="rewardserve train", description="Train a Bradley-Terry reward model.",
                                 formatter_class=HelpWithDefaults)
    ap.add_argument("--data", default="", help="preference JSONL (default: the shipped demo set)")
    ap.add_argument("--dev", default=None, help="dev JSONL; default: split --data by prompt hash")
    ap.add_argument("--eval", nargs="*", default=[], help="extra JSONL sets to report accuracy on")
    ap.add_argument("--out", default=d.out, help="output directory: OUT/best (the checkpoint to export) and "
                    "OUT/last (to resume)")
    ap.add_argument("--base", default=None, help="local Hugging Face checkpoint (default: all-MiniLM-L6-v2)")
    ap.add_argument("--pooling", default=d.pooling, choices=["auto", "mean", "cls", "last", "native"],
                    help="auto: mean for encoders, last token for decoders; native: the architecture's own "
                    "*ForSequenceClassification head with one label (what TRL's RewardTrainer trains)")
    ap.add_argument("--join", default=d.join, choices=["auto", "pair", "concat"],
                    help="prompt and response as the tokenizer's pair template (auto for encoders) or one "
                    "concatenated sequence (auto for decoders)")
    ap.add_argument("--append-eos", default=None, metavar="TOKEN",
                    help="with --join concat: end every sequence with this token, e.g. [SEP] for BERT (TRL appends "
                    "its eos_token string, so a TRL-trained BERT model sees [SEP][SEP])")
    ap.add_argument("--max-length", type=int, default=d.max_length, help="tokens per (prompt, response); longer "
                    "pairs lose prompt tokens from the left first")
    ap.add_argument("--epochs", type=float, default=d.epochs, help="passes over the training pairs (fractions allowed)")
    ap.add_argument("--batch-size", type=int, default=d.batch_size, help="pairs per micro-batch")
    ap.add_argument("--grad-accum", type=int, default=d.grad_accum, help="micro-batches per optimizer step")
    ap.add_argument("--lr", type=float, default=d.lr, help="peak learning rate (AdamW)")
    ap.add_argument("--head-lr-scale", type=float, default=d.head_lr_scale,
                    help="the head's learning rate as a multiple of --lr (the head starts from random)")
    ap.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay")
    ap.add_argument("--warmup-ratio", type=float, default=d.warmup_ratio, help="share of the steps spent warming "
                    "the learning rate up")
    ap.add_argument("--schedule", default=d.schedule, choices=["cosine", "linear", "constant"],
                    help="learning-rate schedule after the warm-up")
    ap.add_argument("--clip", type=float, default=d.clip, help="max gradient norm (0: no clipping)")
    ap.add_argument("--center-rewards", type=float, default=d.center_rewards, help="weight of the penalty "
                    "mean((r_chosen + r_rejected)^2) that keeps rewards centred on 0 (TRL's "
                    "center_rewards_coefficient)")
    ap.add_argument("--no-dropout", dest="dropout", action="store_false", help="zero every dropout layer")
    ap.add_argument("--seed", type=int, default=d.seed, help="seed of the head, the shuffles and dropout")
    ap.add_argument("--strict", action="store_true", help="fail on the first malformed line")
    ap.add_argument("--max-pairs", type=int, default=None, help="use only the first N training pairs (default: all)")
    ap.add_argument("--drop-long", action="store_true", help="drop training pairs over --max-length instead of "
                    "truncating them (TRL's behaviour; default: cut the prompt from the left, keep the response end)")
    ap.add_argument("--batching", default=d.batching, choices=["length", "random"],
                    help="length: batches of similar lengths (less padding, faster on CPU); random: a plain shuffle")
    ap.add_argument("--chunk-tokens", type=int, default=d.chunk_tokens,
                    help="run each batch as length-sorted chunks of at most this many padded tokens (same "
                    "gradient, less padding); 0 = one forward per batch")
    ap.add_argument("--dev-fraction", type=float, default=d.dev_fraction, help="without --dev: share of the "
                    "prompts held out as dev pairs")
    ap.add_argument("--eval-every", type=int, default=0, help="steps between dev evaluations; 0: once per epoch")
    ap.add_argument("--save-every", type=int, default=0, help="steps between resumable checkpoints; 0: at every "
                    "evaluation")
    ap.add_argument("--resume", action="store_true", help="continue from OUT/last")
    ap.add_argument("--stop-after", type=int, default=0, help="stop resumably after N optimizer steps")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--device", default="cpu", help="torch device, e.g. cuda")
    ap.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars, neither ours "
                    "nor transformers' (loading, saving), and no transformers warnings such as its load reports; "
                    "for logs")
    ap.add_argument("--ensemble", type=int, default=0, metavar="K",
                    help="train K members into OUT/member-<i>/ with seeds seed+i (other data orders), to export as "
                    "a model repository with an ensemble.json (docs/training.md); 0: one model")
    ap.add_argument("--bootstrap", action="store_true", help="with --ensemble: each member trains on its own "
                    "resample of the training pairs, drawn with replacement")
    args = ap.parse_args(argv)
    k, bootstrap = args.ensemble, args.bootstrap
    del args.ensemble, args.bootstrap
    if bootstrap and not k:
        raise ValueError("--bootstrap needs --ensemble K")
    if k:
        from export.ensemble import train_ensemble

        train_ensemble(TrainConfig(**vars(args)), k, bootstrap=bootstrap)
        return
    train(TrainConfig(**vars(args)))


def _export(argv: list[str]) -> None:
    from export.exporter import checked_name, choose_format, export_bundle

    ap = argparse.ArgumentParser(prog="rewardserve export", formatter_class=HelpWithDefaults,
                                 description="Export a checkpoint to a model bundle: ONNX (default) or TorchScript, "
                                 "calibrated and parity-checked; or, with --format transformers, import a "
                                 "*ForSequenceClassification reward model (TRL, Skywork, OpenRLHF) as it is. Without "
                                 "--format, a checkpoint `rewardserve train` did not write is imported.")
    ap.add_argument("checkpoint", help="a checkpoint directory, or a training output directory (its best/ is exported)")
    ap.add_argument("--out", required=True, help="the bundle directory to write (replaced whole if it exists)")
    ap.add_argument("--format", default=None, choices=["onnx", "torchscript", "transformers"],
                    help="onnx: served by ONNX Runtime; torchscript: a traced model served by torch; transformers: "
                    "a *ForSequenceClassification checkpoint's own safetensors shards, copied as they are (bf16/fp16 "
                    "kept), served by transformers (docs/decoders.md). Default: chosen, said in one line on stderr: "
                    "onnx for a checkpoint of `rewardserve train` (and with --quantize), transformers for any other "
                    "*ForSequenceClassification or OpenRLHF reward model checkpoint")
    ap.add_argument("--name", default=None, help="the served model name (/v1/models id, the `model` of every "
                    "answer); default: the base model's short name + \"-rm\" for a checkpoint of `rewardserve "
                    "train` (e.g. all-MiniLM-L6-v2-rm), else the checkpoint directory's name")
    ap.add_argument("--quantize", default=None, choices=["int8", "int8-dynamic"], help="onnx only: int8 weights "
                    "with static (calibrated) or dynamic activation scales (default: fp32)")
    ap.add_argument("--max-length", type=int, default=None, help="override the checkpoint's max length")
    ap.add_argument("--reference", default=None, help="JSONL pairs for calibration and parity (default: the "
                    "checkpoint's reference_pairs.jsonl, else the packaged demo set)")
    ap.add_argument("--calibrate-temperature", default=None, action=argparse.BooleanOptionalAction,
                    help="onnx/torchscript: fit one temperature T on the reference pairs (σ((r_a - r_b) / T) is "
                    "/v1/compare's probability), store it with the ECE before/after per set in the manifest "
                    "(default: on when the reference pairs are dev pairs: the checkpoint's own or --reference)")
    ap.add_argument("--reference-pairs", type=int, default=16, help="transformers: reference pairs scored at "
                    "import (the first that fit --reference-tokens)")
    ap.add_argument("--reference-tokens", type=int, default=256, help="transformers: longest reference item")
    ap.add_argument("--reference-device", default="cpu", choices=["cpu", "cuda"], help="transformers: where the "
                    "reference scores are computed (cpu: fp32; cuda: the checkpoint's dtype)")
    ap.add_argument("--normalize-reward", default=None, action=argparse.BooleanOptionalAction,
                    help="transformers, OpenRLHF reward models: serve (r - mean) / std with the mean and std of "
                    "its config.json, as OpenRLHF's --reward.normalize_enable does (default: as its config says)")
    ap.add_argument("--aggregate", default=None, choices=["mean", "min", "uwo"],
                    help="an ensemble training directory (`train --ensemble K`): the ensemble.json aggregate "
                    "(default: mean, docs/benchmarks.md)")
    ap.add_argument("--lambda", dest="lam", type=float, default=1.0,
                    help="an ensemble training directory: uwo's lambda (mean - lambda * variance of the z-scores)")
    args = ap.parse_args(argv)
    if args.name is not None:
        checked_name(args.name)  # before any work
    from export.ensemble import DEFAULT_AGGREGATE, export_ensemble, is_ensemble_training_dir

    if is_ensemble_training_dir(Path(args.checkpoint)):  # OUT of train --ensemble: --out is a repository
        if args.format == "transformers":
            raise ValueError("an ensemble training directory exports to onnx or torchscript bundles")
        export_ensemble(Path(args.checkpoint), Path(args.out), name=args.name,
                        aggregate=args.aggregate or DEFAULT_AGGREGATE, lam=args.lam, fmt=args.format or "onnx",
                        quantize=args.quantize, max_length=args.max_length, reference=args.reference,
                        calibrate_temperature=args.calibrate_temperature)
        return
    if args.aggregate is not None:
        raise ValueError("--aggregate applies to an ensemble training directory (rewardserve train --ensemble K)")
    fmt = choose_format(Path(args.checkpoint), args.format, args.quantize)
    if fmt == "transformers":
        from export.importer import import_checkpoint

        if args.quantize:
            raise ValueError("--quantize applies to ONNX bundles only")
        import_checkpoint(Path(args.checkpoint), Path(args.out), reference=args.reference,
                          reference_pairs=args.reference_pairs, reference_tokens=args.reference_tokens,
                          max_length=args.max_length, device=args.reference_device,
                          normalize_reward=args.normalize_reward, name=args.name)
        return
    export_bundle(Path(args.checkpoint), Path(args.out), fmt=fmt, quantize=args.quantize,
                  max_length=args.max_length, reference=args.reference, name=args.name,
                  calibrate_temperature=args.calibrate_temperature)


def _verify(argv: list[str]) -> None:
    from service.parity import verify_bundle

    ap = argparse.ArgumentParser(prog="rewardserve verify", description="Re-check checksums and parity.")
    ap.add_argument("bundle")
    ap.add_argument("--checksums-only", action="store_true", help="skip the parity re-run")
    args = ap.parse_args(argv)
    sys.exit(0 if verify_bundle(Path(args.bundle), parity=not args.checksums_only) else 1)


def _eval(argv: list[str]) -> None:
    from service.evaluate import main as eval_main

    eval_main(argv)


def _audit(argv: list[str]) -> None:
    from service.audit import main as audit_main

    audit_main(argv)


def _serve(argv: list[str]) -> None:
    from service.server import main as serve_main

    serve_main(argv)


def _up(argv: list[str]) -> None:
    from service.up import main as up_main

    if "-h" in argv or "--help" in argv:
        _up_help(up_main)
        return
    up_main(argv)


def _up_help(up_main) -> None:
    """`up --help`: up's own options, then every `serve` option, which up passes on to serve unchanged (up's
    parser takes its own and leaves the rest, so its help alone lists none of them)."""
    from service.server import build_parser

    try:
        up_main(["--help"])  # argparse prints the help and exits
    except SystemExit:
        pass
    serve_help = build_parser().format_help()
    options = serve_help[serve_help.index("options:"):].split("\n", 2)[2]  # without usage and -h
    print("\nserve options (passed on to rewardserve serve, e.g. rewardserve up --port 9000 --max-queue 512; "
          "up sets --bundle to WORKDIR/bundle):")
    print(options.rstrip())
    sys.exit(0)


COMMANDS = {"train": _train, "export": _export, "verify": _verify, "eval": _eval, "audit": _audit, "serve": _serve,
            "up": _up}
ONE_LINE_ERRORS = {"train", "export", "verify", "eval", "audit", "up"}  # serve reports its own startup errors


def exit_code(exc: BaseException) -> int | None:
    """1: a check refused the result (parity); 2: bad input (typed errors of the offline side are ValueErrors,
    as are malformed data lines and invalid settings); None: a bug, let its traceback show."""
    from service.bundle import BundleError

    exporter = sys.modules.get("export.exporter")  # loaded if it raised: no torch import just to check
    if exporter is not None and isinstance(exc, exporter.ParityError):
        return 1
    if isinstance(exc, (BundleError, FileNotFoundError, ValueError)):
        return 2
    return None


def one_line(exc: BaseException) -> str:
    if isinstance(exc, FileNotFoundError) and exc.filename:
        return f"{exc.filename}: no such file or directory"
    return " ".join(str(exc).split()) or type(exc).__name__


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print("usage: rewardserve {" + ",".join(COMMANDS) + "} ...\n"
              "  train   train a Bradley-Terry reward model from preference JSONL\n"
              "  export  write an ONNX/TorchScript model bundle from a checkpoint, or import a\n"
              "          *ForSequenceClassification reward model as it is (--format transformers,\n"
              "          chosen by itself for a checkpoint `rewardserve train` did not write)\n"
              "  verify  re-check a bundle's checksums and parity\n"
              "  eval    accuracy of a bundle on preference JSONL files (ONNX Runtime)\n"
              "  audit   length sensitivity and calibration of a bundle (audit.json, audit.png)\n"
              "  serve   serve a bundle (--bundle) or a model repository (--repository) over HTTP\n"
              "  up      train a default model if none exists, export it and serve it", file=sys.stderr)
        sys.exit(0 if argv and argv[0] in ("-h", "--help") else 2)
    command = argv[0]
    try:
        COMMANDS[command](argv[1:])
    except Exception as exc:
        code = exit_code(exc) if command in ONE_LINE_ERRORS else None
        if code is None:
            raise
        print(f"rewardserve {command}: {one_line(exc)}", file=sys.stderr)
        sys.exit(code)


if __name__ == "__main__":
    main()
