"""Checkpoint → model bundle (ONNX or TorchScript), calibrated and parity-checked.

Steps: load the checkpoint in PyTorch, write the model file(s) into a staging directory, score the
reference pairs with both PyTorch and the exported runtime, refuse the bundle if they disagree,
compute the normalization statistics from the exported runtime's own scores, write the manifest
with every file's sha256, and only then move the staging directory into place.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import secrets
import shutil
import sys
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from service.data import demo_data_path, read_pairs
from export.model import REWARD_CONFIG, TOKENIZER_FILES, is_openrlhf, load_reward_model, model_name
from export.train import EVAL_FILE, score_encoded
from service.audit import audit_figures, export_calibration
from service.bundle import Manifest, Normalization, write_manifest
from service.encoding import TextEncoder
from service.parity import PARITY_FILE, REFERENCE_FILE, batch_dependence, batch_invariance, parity_report
from service.scorer import score_with_runtime
from service.runtime import load_runtime


PRECISION = {None: "fp32", "int8": "int8-static", "int8-dynamic": "int8-dynamic"}


class ExportError(ValueError):
    """The input cannot be exported as given (no checkpoint there, no reference pairs, an option that does not
    apply); the message names what to change. `rewardserve export` prints it as one line."""


class ParityError(RuntimeError):
    """The exported model does not score like the PyTorch model: the bundle is refused, nothing is written."""


class _Exportable(torch.nn.Module):
    """Positional inputs in the bundle's input order; output `reward` of shape [batch]."""

    def __init__(self, model, input_names: list[str]):
        super().__init__()
        self.model, self.input_names = model, input_names

    def forward(self, *inputs):
        return self.model(**dict(zip(self.input_names, inputs)))


@contextmanager
def tracing_warnings_checked_by_parity():
    """Silences the tracer's generic warnings, which the parity check that follows every export answers.

    Tracing a transformers model warns, whatever the model, that a tensor turned into a Python bool or int
    "might cause the trace to be incorrect" (TracerWarning: a mask or length check taken as a constant), and
    the ONNX exporter that advanced indexing "will produce incorrect results" if indices are negative. Both
    are about inputs the example did not cover. The exporter does not trust the trace on that example
    alone: it scores every reference pair (chosen and rejected, their own lengths) with PyTorch and with the
    exported file, checks that a score does not depend on its batch neighbours, and refuses the bundle
    (ParityError, nothing written) when they disagree. Printed next to "parity ... passed", the warnings
    read as a failed check; only these two kinds are silenced, every other warning still shows."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=r".*the exported graph will produce incorrect results",
                                category=UserWarning)
        yield


def write_onnx(model, example: dict[str, torch.Tensor], path: Path) -> None:
    names = list(example)
    axes = {n: {0: "batch", 1: "sequence"} for n in names} | {"reward": {0: "batch"}}
    with tracing_warnings_checked_by_parity():
        torch.onnx.export(_Exportable(model, names).eval(), tuple(example.values()), str(path), dynamo=False,
                          opset_version=17, input_names=names, output_names=["reward"], dynamic_axes=axes,
                          do_constant_folding=True)


def write_torchscript(model, example: dict[str, torch.Tensor], path: Path) -> None:
    with torch.no_grad(), tracing_warnings_checked_by_parity():
        traced = torch.jit.trace(_Exportable(model, list(example)).eval(), tuple(example.values()),
                                 check_trace=False, strict=False)
        torch.jit.freeze(traced.eval()).save(str(path))


def calibration_reader(encoder: TextEncoder, prompts: list[str], responses: list[str]):
    """The calibration texts, padded in batches of 8, as ONNX Runtime's quantizer reads them."""
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self):
            items = encoder.encode(prompts, responses)
            self.batches = iter([encoder.pad(items[i:i + 8]) for i in range(0, len(items), 8)])

        def get_next(self):
            return next(self.batches, None)

    return Reader()


def matmuls_kept_fp32(model_path: Path) -> list[str]:
    """The MatMuls int8 leaves in fp32 (measured on the MiniLM reward model, docs/benchmarks.md section 3:
    quantizing all of them flips 11-13 % of dev pairs against fp32, max |Δ score| 1.1-1.2, static or
    dynamic). The error comes from three places: attention's activation × activation MatMuls (Q·Kᵀ,
    P·V: no weight, both sides quantized per tensor), the FFN output projections (their input, the
    GELU output, carries the model's activation outliers, so one per-tensor scale leaves the rest a
    few levels), and the reward head (its input quantization error lands directly in the score). The
    remaining weight MatMuls (Q/K/V/attention-output and FFN-input projections) are int8."""
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False).graph
    weights = {i.name for i in graph.initializer} | {o for n in graph.node if n.op_type == "Constant"
                                                      for o in n.output}
    matmuls = [n for n in graph.node if n.op_type in ("MatMul", "Gemm")]
    keep = [n.name for n in matmuls
            if not any(i in weights for i in n.input[:2])  # activation × activation
            or ("/output/dense" in n.name and "/attention/" not in n.name)]  # FFN output
    if matmuls:
        keep.append(matmuls[-1].name)  # the reward head
    return keep


def quantize_int8_static(fp32_path: Path, out_path: Path, encoder: TextEncoder, prompts: list[str],
                         responses: list[str]) -> None:
    """Static int8: activation scales are fixed from calibration texts, so a score never depends on
    the other items in its batch. Per-channel int8 weights; MinMax calibration with a moving average,
    so one extreme calibration batch does not set a range; `matmuls_kept_fp32` stay fp32."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        quantize_static(str(prepared), str(out_path), calibration_reader(encoder, prompts, responses),
                        quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"],
                        nodes_to_exclude=matmuls_kept_fp32(prepared),
                        extra_options={"ActivationSymmetric": False, "WeightSymmetric": True,
                                       "CalibMovingAverage": True})


def quantize_int8_dynamic(fp32_path: Path, out_path: Path) -> None:
    """Dynamic int8: activation scales computed per run (the runtime runs such a model one item per
    run, see service.runtime.hint_for); the same MatMuls as static int8 stay fp32 (all-MatMul dynamic
    int8 agreed with fp32 on 0.889 of dev pairs, with these kept 0.964)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(fp32_path), str(out_path), weight_type=QuantType.QInt8,
                     op_types_to_quantize=["MatMul", "Gemm"], nodes_to_exclude=matmuls_kept_fp32(fp32_path))


def resolve_checkpoint(path: Path, announce: bool = True) -> Path:
    """The checkpoint directory to export. A training output directory (`rewardserve train --out OUT`
    writes OUT/best and OUT/last, no model of its own) stands for its best checkpoint."""
    path = Path(path)
    if (path / "config.json").is_file():
        return path
    if (path / "best" / "config.json").is_file():
        if announce:
            print(f"{path} is a training output directory: exporting its best checkpoint {path / 'best'}")
        return path / "best"
    if not path.is_dir():
        raise ExportError(f"checkpoint {path}: no such directory")
    raise ExportError(f"{path}: not a checkpoint (no config.json) and no best/ checkpoint in it")


def foreign_class(checkpoint: Path) -> str | None:
    """The model class a checkpoint that `rewardserve train` did not write says it is, when that is a reward
    model: a `*ForSequenceClassification` (TRL's RewardTrainer, Skywork, any Hugging Face reward model) or
    OpenRLHF's `RewardModel`. None for our trainer's checkpoints (reward_config.json beside the weights)
    and for a bare backbone (which only the ONNX/TorchScript path can take: it gets a new head)."""
    if (checkpoint / REWARD_CONFIG).is_file() or not (checkpoint / "config.json").is_file():
        return None
    try:
        config = json.loads((checkpoint / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ExportError(f"{checkpoint / 'config.json'}: unreadable ({exc})") from None
    archs = [a for a in config.get("architectures") or [] if isinstance(a, str)]
    heads = [a for a in archs if a.endswith("ForSequenceClassification")]
    if heads:
        return heads[0]
    if is_openrlhf(config):
        return archs[0] if archs else "OpenRLHF reward model"
    return None


def choose_format(checkpoint: Path, fmt: str | None, quantize: str | None = None) -> str:
    """`rewardserve export` without --format: a checkpoint our trainer wrote becomes ONNX (as always); any
    other reward model checkpoint is imported as it is (`transformers`): the legacy ONNX exporter cannot
    trace most of them (a bf16 Qwen2 dies in it with "ScalarType ComplexDouble is an unexpected tensor
    scalar type") and an OpenRLHF one would get a new, untrained head. The choice is said in one line on
    stderr. --quantize without --format asks for ONNX (it applies to nothing else). An explicit --format is
    kept; export_bundle refuses, in one line naming --format transformers, an ONNX/TorchScript export
    that cannot work on a foreign checkpoint."""
    if fmt is not None:
        return fmt
    if quantize:
        return "onnx"
    ckpt = resolve_checkpoint(Path(checkpoint), announce=False)
    cls = foreign_class(ckpt)
    if cls is None:
        return "onnx"
    print(f"{ckpt}: a {cls} checkpoint not written by `rewardserve train`: importing it as it is "
          "(--format transformers; --format onnx to convert it instead)", file=sys.stderr)
    return "transformers"


NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@+/-]{0,127}")


def checked_name(name: str) -> str:
    """--name as given, if a client can use it as a model id (no spaces, no control characters)."""
    if not NAME_PATTERN.fullmatch(name):
        raise ExportError(f"--name {name!r}: 1-128 characters among letters, digits and ._:@+/-, starting with a "
                          "letter or digit")
    return name


def bundle_name(checkpoint: Path, name: str | None = None) -> str:
    """The served model name (manifest `name`: /v1/models' id, the `model` field of every answer): --name
    when given; else, for our trainer's checkpoints, the base model's short name + "-rm"
    ("all-MiniLM-L6-v2-rm"), since the checkpoint directory is a generic "best"; else (an imported or
    other checkpoint) the checkpoint directory's name, which is what users name their model after.
    Never the bundle directory's name: `make serve` writes models/default/bundle, and "bundle" tells a
    client nothing."""
    if name is not None:
        return checked_name(name)
    checkpoint = Path(checkpoint)
    if (checkpoint / REWARD_CONFIG).is_file():
        base = json.loads((checkpoint / REWARD_CONFIG).read_text()).get("base_model")
        if base:  # a hub id's name without its organisation: "org/name" -> "name-rm"
            return f"{model_name(base).rsplit('/', 1)[-1]}-rm"
    return checkpoint.resolve().name or "model"


def reference_path(checkpoint: Path, reference: str | None) -> Path:
    """The pairs that calibrate the bundle and gate its parity: --reference if given, else the checkpoint's
    own (our trainer saves held-out dev pairs there), else the packaged demo set, so a checkpoint trained
    elsewhere (TRL writes none) exports without an extra file."""
    if reference:
        if not Path(reference).is_file():
            raise ExportError(f"--reference {reference}: no such file")
        return Path(reference)
    if (checkpoint / REFERENCE_FILE).is_file():
        return checkpoint / REFERENCE_FILE
    demo = demo_data_path()
    print(f"{checkpoint} has no {REFERENCE_FILE}: calibrating and checking parity on the packaged demo set "
          f"({demo.name}); pass --reference FILE for pairs from the model's own domain")
    return demo


@contextmanager
def staged(out: Path):
    """A staging directory beside `out`, moved into place whole once the block has written the bundle (so
    `out` never holds a half-written bundle), and removed if the block fails.

    The directory is made with mkdir (mode 0o777 less the umask), not tempfile.mkdtemp: mkdtemp makes it
    0700 whatever the umask, and the rename keeps that mode, so a bundle exported by root could not be
    read by the serving image's uid 10001 through a bind mount. Made this way the bundle gets the
    permissions every other directory the user creates gets (0755 under the usual umask 022); the files
    in it are created with open() and get 0644 the same way."""
    stage = _fresh_dir(out.parent, prefix=f".{out.name}.")
    try:
        yield stage
        if out.exists():
            shutil.rmtree(out)
        stage.rename(out)
    finally:
        if stage.exists():
            shutil.rmtree(stage)


def _fresh_dir(parent: Path, prefix: str) -> Path:
    """A new, empty directory under `parent` with a unique name, created with the umask's permissions."""
    for _ in range(100):
        path = parent / f"{prefix}{secrets.token_hex(6)}"
        try:
            path.mkdir(mode=0o777)
            return path
        except FileExistsError:
            continue
    raise FileExistsError(f"{parent}: no free staging directory name starting with {prefix}")


def export_bundle(checkpoint: Path, out: Path, fmt: str = "onnx", quantize: str | None = None,
                  max_length: int | None = None, reference: str | None = None, name: str | None = None,
                  calibrate_temperature: bool | None = None) -> Path:
    """`name`: the served model name (bundle_name: default the base model's short name + "-rm" for our
    trainer's checkpoints, the checkpoint directory's name otherwise). `calibrate_temperature`: fit the
    preference temperature on the reference pairs (None: when they are dev pairs, see fits_temperature)."""
    checkpoint, out = resolve_checkpoint(Path(checkpoint)), Path(out)
    if fmt == "transformers":  # the checkpoint as it is: export/importer.py (a module of its own, no cycle)
        raise ExportError("transformers bundles are imported, not exported: use export.importer.import_checkpoint "
                          "(rewardserve export CKPT --format transformers)")
    if quantize and fmt != "onnx":
        raise ExportError("--quantize applies to ONNX bundles only")
    served_name = bundle_name(checkpoint, name)
    foreign = foreign_class(checkpoint)
    if foreign is not None and not foreign.endswith("ForSequenceClassification"):
        raise ExportError(f"{checkpoint}: an OpenRLHF {foreign} checkpoint: --format {fmt} would put a new, untrained "
                          "head on its backbone; import it as it is with --format transformers")
    ref_path = reference_path(checkpoint, reference)
    pairs, _ = read_pairs(ref_path)
    if not pairs:
        raise ExportError(f"{ref_path}: no reference pairs to calibrate and check parity with")
    with _foreign_cannot_convert(checkpoint, foreign, fmt):
        model, text = load_reward_model(checkpoint)
    model.eval()
    if max_length:
        text = text.model_copy(update={"max_length": max_length})
    encoder = TextEncoder.from_dir(checkpoint, text)
    prompts = [p.prompt for p in pairs] * 2
    responses = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    items = encoder.encode(prompts, responses)
    with _foreign_cannot_convert(checkpoint, foreign, fmt):
        torch_scores = score_encoded(model, encoder, items, "cpu")

    out.parent.mkdir(parents=True, exist_ok=True)
    with staged(out) as stage:
        example = {k: torch.from_numpy(v) for k, v in encoder.pad(items[:2]).items()}
        input_names = list(example)
        with _foreign_cannot_convert(checkpoint, foreign, fmt):
            model_file = _write_model(model, example, stage, fmt, quantize, encoder, prompts, responses)
            runtime = load_runtime(stage, _ManifestStub(fmt, model_file, input_names, PRECISION[quantize]),
                                   provider="cpu")
            exported = score_with_runtime(runtime, encoder, items)
        for name in TOKENIZER_FILES:
            if (checkpoint / name).exists():
                shutil.copyfile(checkpoint / name, stage / name)
        shutil.copyfile(ref_path, stage / REFERENCE_FILE)

        precision = PRECISION[quantize]
        parity = parity_report(torch_scores, exported, len(pairs), precision)
        parity.batch_invariance_max_diff = batch_invariance(runtime, encoder, items)
        if precision == "int8-dynamic":
            parity.note = (f"dynamic int8: activation scales are computed per model run, so the runtime runs "
                           f"every item alone (batch hint max_batch_size 1) and a score never depends on "
                           f"other items; in one padded run of 32 items the scores would move by up to "
                           f"{batch_dependence(runtime, encoder, items):.3g}")
        if not parity.passed:
            hint = "; --format transformers imports it as it is" if foreign else ""
            raise ParityError(f"export refused: parity failed ({parity.model_dump_json()}){hint}")
        (stage / PARITY_FILE).write_text(json.dumps({"torch_scores": torch_scores.tolist(),
                                                     "exported_scores": exported.tolist()}))
        calibration = export_calibration(runtime, encoder, (dev_name(ref_path), pairs, exported), eval_sets(checkpoint),
                                         fit=fits_temperature(calibrate_temperature, ref_path, len(pairs)))
        manifest = Manifest(
            name=served_name,
            created_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            model_format=fmt,
            model_file=model_file,
            precision=precision,
            input_names=input_names,
            text=text,
            pooling=model.pooling,
            normalization=(norm := normalization(exported, ref_path.name)),  # a name: the file is in the bundle
            audit=audit_figures(runtime, encoder, pairs, norm, scores=exported,  # figures only, no picture
                                temperature=calibration.temperature),
            calibration=calibration,
            parity=parity,
            **provenance(checkpoint),
        )
        write_manifest(stage, manifest)
    print(f"bundle written: {out} ({fmt}, {manifest.precision}); parity max abs diff "
          f"{parity.max_abs_diff:.2e}" + (f", pairwise agreement {parity.pairwise_agreement:.4f}"
                                          if parity.pairwise_agreement is not None else ""))
    dev = calibration.sets[0]
    print(f"preference temperature {calibration.temperature:.3f} ("
          + (f"fitted on {calibration.fitted_on}" if calibration.fitted else "not fitted") + f"); ECE on "
          + ", ".join(f"{r['set']} {r['ece']:.3f} -> {r['ece_at_temperature']:.3f}" for r in calibration.sets)
          + (" (accuracy below 0.5 on the dev pairs: a temperature cannot fix rankings)"
             if dev["accuracy"] is not None and dev["accuracy"] < 0.5 else ""))
    return out


EVAL_SET_MAX_PAIRS = 1000  # per evaluation set scored at export for the calibration rows (bounded export time)


MIN_TEMPERATURE_PAIRS = 100  # dev pairs below which the default does not fit a temperature


def fits_temperature(requested: bool | None, ref_path: Path, n_pairs: int) -> bool:
    """--calibrate-temperature: as asked; by default on when the reference pairs are dev pairs (the
    checkpoint's held-out reference_pairs.jsonl, or --reference) and there are at least
    MIN_TEMPERATURE_PAIRS of them; off for the packaged demo-set fallback, which may be the model's own
    training data (a temperature fitted there says nothing). Why the minimum: the default model's 30 dev
    pairs fitted T = 0.68, which raised ECE on all four shared sets (docs/benchmarks.md, calibration)."""
    if requested is not None:
        if requested and ref_path == demo_data_path():
            print("--calibrate-temperature on the packaged demo set: fitted on pairs that may be training data")
        elif requested and n_pairs < MIN_TEMPERATURE_PAIRS:
            print(f"--calibrate-temperature on {n_pairs} pairs: a temperature fitted on so few is noisy")
        return requested
    if ref_path != demo_data_path() and n_pairs < MIN_TEMPERATURE_PAIRS:
        print(f"no preference temperature fitted: {n_pairs} dev pairs, fewer than {MIN_TEMPERATURE_PAIRS} "
              "(--calibrate-temperature fits one anyway)")
        return False
    return ref_path != demo_data_path()


def dev_name(ref_path: Path) -> str:
    """The reference set's name in the calibration rows: "dev" for the trainer's held-out sample, "reference"
    for the packaged demo-set fallback (the manifest's normalization.reference names the file), else the
    --reference file's name."""
    if ref_path.name == REFERENCE_FILE:
        return "dev"
    return "reference" if ref_path == demo_data_path() else ref_path.stem


def eval_sets(checkpoint: Path) -> dict[str, list]:
    """The evaluation sets the trainer reported on (eval_results.json, `train --eval`) that are still
    readable here, by name, at most EVAL_SET_MAX_PAIRS pairs each: the manifest's calibration rows show
    the fitted temperature on them too (the dev set itself is the reference pairs)."""
    path = checkpoint / EVAL_FILE
    results = json.loads(path.read_text()).get("results", {}) if path.is_file() else {}
    out = {}
    for name, r in results.items():
        if name != "dev" and Path(str(r.get("path", ""))).is_file():
            pairs, _ = read_pairs(r["path"])
            if pairs:
                out[name] = pairs[:EVAL_SET_MAX_PAIRS]
    return out


def _write_model(model, example: dict[str, torch.Tensor], stage: Path, fmt: str, quantize: str | None,
                 encoder: TextEncoder, prompts: list[str], responses: list[str]) -> str:
    """Write the model file into the staging directory; returns its name."""
    if fmt == "torchscript":
        write_torchscript(model, example, stage / "model.pt")
        return "model.pt"
    write_onnx(model, example, stage / "model.onnx")
    if not quantize:
        return "model.onnx"
    fp32 = stage / "model.onnx"
    if quantize == "int8":
        quantize_int8_static(fp32, stage / "model.int8.onnx", encoder, prompts, responses)
    else:
        quantize_int8_dynamic(fp32, stage / "model.int8.onnx")
    fp32.unlink()
    return "model.int8.onnx"


@contextmanager
def _foreign_cannot_convert(checkpoint: Path, foreign: str | None, fmt: str):
    """A reward model checkpoint our trainer did not write (`foreign`: its class) that fails to load, trace,
    export or run as ONNX/TorchScript: the conversion cannot work on it, and what does is the import, so
    the error becomes one line naming --format transformers (ExportError, exit 2) instead of a traceback
    from deep inside torch.onnx (a bf16 Qwen2: "ScalarType ComplexDouble is an unexpected tensor scalar
    type"). On our own checkpoints the same failure is a bug of ours and keeps its traceback."""
    try:
        yield
    except (ExportError, ParityError):
        raise
    except Exception as exc:
        if foreign is None:
            raise
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise ExportError(f"{checkpoint}: --format {fmt} cannot convert this {foreign} checkpoint "
                          f"({type(exc).__name__}: {first}); import it as it is with --format transformers") from None


class _ManifestStub:
    """The manifest fields load_runtime reads, before the real manifest exists."""

    def __init__(self, model_format: str, model_file: str, input_names: list[str], precision: str):
        self.model_format, self.model_file, self.input_names = model_format, model_file, input_names
        self.precision = precision


def normalization(raw: np.ndarray, source: str) -> Normalization:
    std = float(np.std(raw))
    return Normalization(mean=float(np.mean(raw)), std=std if std > 1e-12 else 1.0,
                         percentiles=[float(x) for x in np.percentile(raw, np.arange(101))], n=len(raw),
                         reference=source)


def provenance(checkpoint: Path) -> dict:
    config = json.loads((checkpoint / "reward_config.json").read_text()) if (checkpoint / "reward_config.json").exists() else {}
    evals = json.loads((checkpoint / EVAL_FILE).read_text()) if (checkpoint / EVAL_FILE).exists() else {}
    trainer = config.get("trainer_config", {})
    return {
        "base_model": model_name(config.get("base_model") or checkpoint),
        "data": trainer.get("data", "") or evals.get("data", ""),
        "trainer_config": trainer,
        "eval": {name: {k: r[k] for k in ("accuracy", "length_baseline", "pairs", "mean_margin") if k in r}
                 for name, r in evals.get("results", {}).items()},
    }
