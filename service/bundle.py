"""The model bundle: a directory with model file(s), tokenizer, and `manifest.json` describing it all.

This module reads and checks bundles without torch, so the service (and `rewardserve verify
--checksums-only`) can use it on a torch-free image. The exporter writes bundles with `write_manifest`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, Field

from service.encoding import TextEncoder, TextFormat

FORMAT_VERSION = 1
MANIFEST = "manifest.json"


class BundleError(RuntimeError):
    """A bundle that must not be served: missing, unreadable or tampered files (named in the message)."""


class Normalization(BaseModel):
    """Raw-score statistics of the reference set, so a score can be returned as a z-score and percentile."""

    mean: float
    std: float
    percentiles: list[float] = Field(description="raw score at percentile 0, 1, ..., 100")
    n: int = Field(description="number of reference responses scored")
    reference: str = Field(default="", description="where the reference responses came from")

    def z_score(self, raw: np.ndarray | float) -> np.ndarray | float:
        return (raw - self.mean) / self.std

    def percentile(self, raw: np.ndarray | float) -> np.ndarray | float:
        """Percentile rank (0..100) of a raw score within the reference distribution."""
        return np.interp(raw, self.percentiles, np.arange(len(self.percentiles), dtype=np.float64))


class ParityReport(BaseModel):
    reference_pairs: int
    max_abs_diff: float = Field(description="exported model vs PyTorch, over every reference response")
    threshold: float
    passed: bool
    pairwise_agreement: float | None = Field(default=None, description="quantized only: share of pairs whose "
                                             "preferred side matches the fp32 model")
    batch_invariance_max_diff: float | None = Field(default=None, description="max |score alone - score in a "
                                                    "batch of 32|; 0 means a score never depends on its neighbours")
    note: str = ""


class Calibration(BaseModel):
    """Preference-probability calibration at export (service/calibration.py): the temperature T that
    divides every margin before σ (fitted on the dev pairs; 1.0 when not fitted) and the ECE of σ(m) and of
    σ(m / T) on every evaluation set the exporter had, plus those sets' audit rows (service/audit.py
    set_row). /v1/compare reads `temperature`; a manifest without this field means T = 1."""

    temperature: float = Field(default=1.0, gt=0, description="divides r_a - r_b before the logistic function")
    fitted: bool = Field(default=False, description="T was fitted on `fitted_on` (export --calibrate-temperature)")
    fitted_on: str = Field(default="", description="the set T was fitted on (the dev pairs)")
    bins: int = 10
    ece_definition: str = ""
    ece_before: dict[str, float | None] = Field(default_factory=dict, description="set -> ECE of sigma(m)")
    ece_after: dict[str, float | None] = Field(default_factory=dict, description="set -> ECE of sigma(m / T)")
    sets: list[dict] = Field(default_factory=list, description="one audit row per set (n, accuracy and its 95 % "
                             "Wilson interval, longer-wins baseline, ECE, length correlation)")


class Manifest(BaseModel):
    format_version: int = FORMAT_VERSION
    name: str = Field(default="", description="the served model name: /v1/models' id and the `model` of every "
                      "answer; set at export (--name; export.exporter.bundle_name). A bundle without one is "
                      "served under its directory's name (read_manifest)")
    created_at: str
    model_format: Literal["onnx", "torchscript", "transformers"]
    model_file: str
    precision: Literal["fp32", "bf16", "fp16", "int8-static", "int8-dynamic"] = "fp32"
    input_names: list[str]
    output_name: str = "reward"
    text: TextFormat
    pooling: str
    normalization: Normalization
    eval: dict[str, dict] = Field(default_factory=dict, description="accuracy per evaluation set at training time")
    base_model: str = ""
    data: str = ""
    trainer_config: dict = Field(default_factory=dict)
    parity: ParityReport
    files: dict[str, str] = Field(default_factory=dict, description="sha256 of every other file in the bundle")
    audit: dict | None = Field(default=None, description="reward-hacking audit of the reference set at export "
                               "(service/audit.py)")
    calibration: Calibration | None = Field(default=None, description="temperature and ECE per set at export")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(bundle: Path, manifest: Manifest) -> None:
    """Hash every file (except the manifest itself) into `files`, then write manifest.json."""
    manifest.files = {p.relative_to(bundle).as_posix(): sha256_file(p)
                      for p in sorted(bundle.rglob("*")) if p.is_file() and p.name != MANIFEST}
    (bundle / MANIFEST).write_text(manifest.model_dump_json(indent=2))


def read_manifest(bundle: Path) -> Manifest:
    path = Path(bundle) / MANIFEST
    if not path.is_file():
        raise BundleError(f"{path}: no manifest.json (is this a model bundle?)")
    try:
        manifest = Manifest.model_validate(json.loads(path.read_text()))
    except (ValueError, json.JSONDecodeError) as exc:
        raise BundleError(f"{path}: invalid manifest: {exc}") from None
    if manifest.format_version != FORMAT_VERSION:
        raise BundleError(f"{path}: bundle format {manifest.format_version}, this build reads {FORMAT_VERSION}")
    if not manifest.name.strip():  # written before export set a name: the directory's name, as then
        manifest.name = Path(bundle).resolve().name
    return manifest


def checksum_problems(bundle: Path, manifest: Manifest) -> list[str]:
    """Every file whose sha256 differs from the manifest, is missing, or is not listed (one line each)."""
    bundle = Path(bundle)
    problems = []
    for name, expected in manifest.files.items():
        path = bundle / name
        if not path.is_file():
            problems.append(f"{name}: missing")
        elif sha256_file(path) != expected:
            problems.append(f"{name}: sha256 mismatch (file changed since export)")
    for path in sorted(bundle.rglob("*")):
        rel = path.relative_to(bundle).as_posix()
        if path.is_file() and path.name != MANIFEST and rel not in manifest.files:
            problems.append(f"{rel}: not listed in manifest")
    for needed in (manifest.model_file, "tokenizer.json"):
        if needed not in manifest.files:
            problems.append(f"{needed}: required by the manifest but not checksummed")
    return problems


def open_bundle(bundle: str | Path) -> tuple[Manifest, TextEncoder]:
    """Read and verify a bundle; raise BundleError naming the first bad file. Nothing is loaded unverified."""
    bundle = Path(bundle)
    manifest = read_manifest(bundle)
    problems = checksum_problems(bundle, manifest)
    if problems:
        raise BundleError(f"bundle {bundle} failed verification: " + "; ".join(problems))
    return manifest, TextEncoder.from_dir(bundle, manifest.text)
