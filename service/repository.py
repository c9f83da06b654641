"""The model repository's layout: which models, versions and ensembles a directory declares (issue 26).

Pure parsing: `scan(root)` reads folder names and the small JSON files (config.json, ensemble.json) and
checks that each version folder holds a manifest.json; it loads no model and verifies no checksum (the
registry does that when it loads a version, so a slow or broken bundle never stalls a rescan). The layout
is Triton's:

    DIR/<model>/<version>/manifest.json …   a bundle; versions are positive integers (1, 2, …), no "v2",
                                            no "01"; the highest valid one is served unless config.json
                                            splits traffic
    DIR/<model>/config.json                 optional: {"traffic": {"1": 0.9, "2": 0.1}, "shadow": "2"}
    DIR/<name>/ensemble.json                an ensemble of models of the same repository

Bad input never raises: each problem is one line, on the entry it concerns, so one bad entry never takes
the other models down. Where a problem lands:

  * `Layout.errors[name]`: an entry that is neither a model nor an ensemble (a folder with no version
    folder and no ensemble.json; a bundle put directly under DIR instead of DIR/<name>/1/; a folder with
    both ensemble.json and version folders: which one was meant cannot be guessed).
  * `VersionEntry.error`: a version folder whose name is not a positive integer, or with no manifest.json.
  * `ModelEntry.error`: config.json problems (malformed JSON, unknown keys, traffic naming unknown or
    broken versions or not summing to 1 within 1e-6, shadow naming an unknown version). The registry
    should not start serving a model whose config is bad (without its split, all traffic would go to the
    version the operator meant to canary); on a rescan it may keep what it already serves.
  * `EnsembleSpec.error`: ensemble.json problems (malformed JSON, no members, a member that is not a
    servable model of this repository, an unknown aggregate, weights naming non-members or missing one,
    gate fields missing, a negative lambda), or a config.json beside it (traffic and shadow are for models).

Files at the model level other than config.json and ensemble.json (a README, notes) are ignored, as are
entries whose name starts with "." (a `.staging` copy in progress) and plain files directly under DIR.

Ensemble members may use different tokenizers (a MiniLM and a decoder): nothing here or in the ensemble
compares tokenizers, because each member tokenizes the text itself and only the members' scores (z units)
are combined (service/ensemble.py).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

MANIFEST = "manifest.json"  # service.bundle.MANIFEST (not imported: this module reads folder names only)
CONFIG = "config.json"
ENSEMBLE = "ensemble.json"
AGGREGATES = ("mean", "min", "uwo", "weighted", "gate")
TRAFFIC_TOLERANCE = 1e-6


@dataclass
class VersionEntry:
    version: str
    path: Path
    error: str | None = None  # e.g. "not a bundle: no manifest.json"


@dataclass
class ModelEntry:
    name: str
    versions: dict[str, VersionEntry]
    traffic: dict[str, float] | None = None  # version -> share of requests, summing to 1
    shadow: str | None = None                 # a version scored on every request, never returned
    error: str | None = None                  # config.json problems (one line)

    def valid_versions(self) -> list[str]:
        """Versions whose folder looks like a bundle, in numeric order."""
        return sorted((v for v, e in self.versions.items() if e.error is None), key=int)

    def latest(self) -> str | None:
        """The highest valid version (what is served when there is no traffic split), or None."""
        valid = self.valid_versions()
        return valid[-1] if valid else None


@dataclass
class EnsembleSpec:
    name: str
    members: list[str]
    aggregate: str
    lam: float = 1.0                          # ensemble.json "lambda": uwo = mean − lam·variance
    weights: dict[str, float] | None = None   # "weighted": member -> weight
    gate: str | None = None                   # "gate": the member whose z decides ...
    below: float | None = None                # ... when it is below this threshold ...
    otherwise: str | None = None              # ... else this member's z (ensemble.json "else")
    error: str | None = None


@dataclass
class Layout:
    root: Path
    models: dict[str, ModelEntry] = field(default_factory=dict)
    ensembles: dict[str, EnsembleSpec] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)  # entry name -> why it is not served


class _Bad(ValueError):
    """One line about one entry (caught within this module, never raised to the caller)."""


def scan(root: Path) -> Layout:
    """The repository at `root` as a Layout (see the module docstring). A missing or unreadable root is
    reported as errors["."], not raised, so a poll loop survives a directory being replaced."""
    root = Path(root)
    layout = Layout(root=root)
    try:
        entries = sorted(p for p in root.iterdir() if not p.name.startswith("."))
    except OSError as exc:
        layout.errors["."] = f"repository {root} cannot be read: {exc.strerror or exc}"
        return layout
    ensemble_files: dict[str, Path] = {}
    for entry in entries:
        if not entry.is_dir():
            continue
        name = entry.name
        if (entry / MANIFEST).is_file():
            layout.errors[name] = (f"{name}: a bundle directly under the repository; a model's bundles go in "
                                   f"numbered version folders ({name}/1/{MANIFEST})")
            continue
        version_dirs = [p for p in entry.iterdir() if p.is_dir() and not p.name.startswith(".")]
        has_ensemble = (entry / ENSEMBLE).is_file()
        if has_ensemble and version_dirs:
            layout.errors[name] = (f"{name}: has both {ENSEMBLE} and version folders "
                                   f"({', '.join(sorted(p.name for p in version_dirs))}); keep one")
        elif has_ensemble:
            ensemble_files[name] = entry / ENSEMBLE
        elif version_dirs:
            layout.models[name] = _model(name, entry, version_dirs)
        else:
            layout.errors[name] = (f"{name}: not a model (no version folder such as {name}/1/ with a "
                                   f"{MANIFEST}) and not an ensemble (no {ENSEMBLE})")
    for name, path in ensemble_files.items():  # after the models: members are checked against them
        layout.ensembles[name] = _ensemble(name, path, layout)
    return layout


def single_bundle(bundle: Path, name: str) -> Layout:
    """`serve --bundle B` as a one-model layout: model `name`, version "1" (no traffic, no shadow)."""
    bundle = Path(bundle)
    error = None if (bundle / MANIFEST).is_file() else f"not a bundle: no {MANIFEST} in {bundle}"
    model = ModelEntry(name=name, versions={"1": VersionEntry("1", bundle, error)})
    return Layout(root=bundle.parent, models={name: model})


# ---- models

def _version(path: Path) -> VersionEntry:
    name = path.name
    if not (name.isascii() and name.isdigit() and int(name) > 0 and str(int(name)) == name):
        return VersionEntry(name, path, f"version folder '{name}' is not a positive integer (1, 2, 3, ...)")
    if not (path / MANIFEST).is_file():
        return VersionEntry(name, path, f"not a bundle: no {MANIFEST} in {path}")
    return VersionEntry(name, path)


def _model(name: str, folder: Path, version_dirs: list[Path]) -> ModelEntry:
    versions = {e.version: e for e in sorted((_version(p) for p in version_dirs), key=lambda e: e.version)}
    model = ModelEntry(name=name, versions=versions)
    if not (folder / CONFIG).is_file():
        return model
    try:
        config = _read_object(folder / CONFIG, f"{name}/{CONFIG}")
        _no_unknown_keys(config, {"traffic", "shadow"}, f"{name}/{CONFIG}")
        traffic = _traffic(config.get("traffic"), model) if "traffic" in config else None
        shadow = _shadow(config.get("shadow"), model, traffic) if "shadow" in config else None
    except _Bad as exc:
        model.error = str(exc)
        return model
    model.traffic, model.shadow = traffic, shadow
    return model


def _servable(model: ModelEntry, version: str, what: str) -> None:
    entry = model.versions.get(version)
    if entry is None:
        known = ", ".join(sorted(model.versions, key=lambda v: (not v.isdigit(), int(v) if v.isdigit() else 0, v)))
        raise _Bad(f"{model.name}/{CONFIG}: {what} names version '{version}', which does not exist "
                   f"(versions: {known or 'none'})")
    if entry.error is not None:
        raise _Bad(f"{model.name}/{CONFIG}: {what} names version '{version}', which cannot be served: {entry.error}")


def _traffic(value, model: ModelEntry) -> dict[str, float]:
    where = f"{model.name}/{CONFIG}: traffic"
    if not isinstance(value, dict) or not value:
        raise _Bad(f'{where} must be a non-empty object of version -> share, e.g. {{"1": 0.9, "2": 0.1}}')
    shares: dict[str, float] = {}
    for version, share in value.items():
        _servable(model, version, "traffic")
        if isinstance(share, bool) or not isinstance(share, (int, float)) or not math.isfinite(share) or share < 0:
            raise _Bad(f"{where}.{version} must be a number >= 0, got {json.dumps(share)}")
        shares[version] = float(share)
    total = sum(shares.values())
    if abs(total - 1.0) > TRAFFIC_TOLERANCE:
        raise _Bad(f"{where} shares must sum to 1, they sum to {total:g}")
    return shares


def _shadow(value, model: ModelEntry, traffic: dict[str, float] | None) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise _Bad(f"{model.name}/{CONFIG}: shadow must be a version name such as \"2\", got {json.dumps(value)}")
    _servable(model, value, "shadow")
    if traffic is None and value == model.latest():
        raise _Bad(f"{model.name}/{CONFIG}: shadow names version '{value}', the served version itself "
                   "(the highest); shadow another version")
    return value


# ---- ensembles

def _ensemble(name: str, path: Path, layout: Layout) -> EnsembleSpec:
    where = f"{name}/{ENSEMBLE}"
    members: list[str] = []
    aggregate = ""
    try:
        spec = _read_object(path, where)
        declared = spec.get("members")
        members = [m for m in declared if isinstance(m, str)] if isinstance(declared, list) else []
        if (path.parent / CONFIG).is_file():  # silently ignoring it would hide that no split happens
            raise _Bad(f"{name}/{CONFIG}: traffic and shadow apply to models, not to an ensemble (its members' "
                       "own config.json split their traffic)")
        _no_unknown_keys(spec, {"members", "aggregate", "lambda", "weights", "gate", "below", "else"}, where)
        members = _members(spec.get("members"), layout, where)
        if spec.get("aggregate") not in AGGREGATES:
            raise _Bad(f"{where}: aggregate must be one of {', '.join(AGGREGATES)}, "
                       f"got {json.dumps(spec.get('aggregate'))}")
        aggregate = spec["aggregate"]
        lam = _number(spec.get("lambda", 1.0), f"{where}: lambda")
        if lam < 0:
            raise _Bad(f"{where}: lambda must be >= 0 (uwo subtracts lambda x variance), got {lam:g}")
        result = EnsembleSpec(name=name, members=members, aggregate=aggregate, lam=lam)
        _only_for(spec, ("weights",), "weighted", aggregate, where)
        _only_for(spec, ("gate", "below", "else"), "gate", aggregate, where)
        if aggregate == "weighted":
            result.weights = _weights(spec.get("weights"), members, where)
        if aggregate == "gate":
            result.gate, result.below, result.otherwise = _gate(spec, members, where)
        return result
    except _Bad as exc:  # what could be read stays (for /v1/models), the error says why it is not served
        return EnsembleSpec(name=name, members=members, aggregate=aggregate, error=str(exc))


def _members(value, layout: Layout, where: str) -> list[str]:
    if not isinstance(value, list) or not value:
        raise _Bad(f'{where}: members must be a non-empty list of model names, e.g. ["a", "b", "c"]')
    for member in value:
        if not isinstance(member, str) or not member:
            raise _Bad(f"{where}: members must be model names (strings), got {json.dumps(member)}")
    duplicates = sorted({m for m in value if value.count(m) > 1})
    if duplicates:
        raise _Bad(f"{where}: member {', '.join(duplicates)} listed twice")
    for member in value:
        if member in layout.models:
            model = layout.models[member]
            if model.latest() is None:
                raise _Bad(f"{where}: member '{member}' has no servable version")
            continue
        if (layout.root / member / ENSEMBLE).is_file():
            raise _Bad(f"{where}: member '{member}' is an ensemble; members must be models")
        served = ", ".join(sorted(layout.models)) or "none"
        raise _Bad(f"{where}: member '{member}' is not a model of this repository (models: {served})")
    return list(value)


def _only_for(spec: dict, keys: tuple[str, ...], aggregate: str, given: str, where: str) -> None:
    extra = [k for k in keys if k in spec]
    if extra and given != aggregate:
        raise _Bad(f"{where}: {', '.join(extra)} only apply to aggregate \"{aggregate}\" (this one is \"{given}\")")


def _weights(value, members: list[str], where: str) -> dict[str, float]:
    if not isinstance(value, dict) or not value:
        raise _Bad(f'{where}: aggregate "weighted" needs weights, an object of member -> weight')
    strangers = sorted(set(value) - set(members))
    if strangers:
        raise _Bad(f"{where}: weights name {', '.join(strangers)}, not members ({', '.join(members)})")
    missing = [m for m in members if m not in value]
    if missing:
        raise _Bad(f"{where}: weights give no weight to member {', '.join(missing)}")
    weights = {m: _number(value[m], f"{where}: weights.{m}") for m in members}
    if any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
        raise _Bad(f"{where}: weights must be >= 0 with a positive sum, got {json.dumps(value)}")
    return weights


def _gate(spec: dict, members: list[str], where: str) -> tuple[str, float, str]:
    missing = [k for k in ("gate", "below", "else") if k not in spec]
    if missing:
        raise _Bad(f'{where}: aggregate "gate" needs gate, below and else (missing: {", ".join(missing)}), e.g. '
                   '{"gate": "safety", "below": -1.0, "else": "helpful"}')
    gate, otherwise = spec["gate"], spec["else"]
    for key, member in (("gate", gate), ("else", otherwise)):
        if member not in members:
            raise _Bad(f"{where}: {key} must name a member ({', '.join(members)}), got {json.dumps(member)}")
    if gate == otherwise:
        raise _Bad(f"{where}: gate and else name the same member '{gate}'")
    return gate, _number(spec["below"], f"{where}: below"), otherwise


# ---- JSON helpers

def _read_object(path: Path, where: str) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise _Bad(f"{where}: cannot be read: {exc}") from None
    except json.JSONDecodeError as exc:
        raise _Bad(f"{where}: not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    if not isinstance(value, dict):
        raise _Bad(f"{where}: must be a JSON object")
    return value


def _no_unknown_keys(value: dict, known: set[str], where: str) -> None:
    unknown = sorted(set(value) - known)
    if unknown:  # a typo ("trafic") would otherwise be silently ignored
        raise _Bad(f"{where}: unknown key {', '.join(map(json.dumps, unknown))} (known: {', '.join(sorted(known))})")


def _number(value, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _Bad(f"{where} must be a finite number, got {json.dumps(value)}")
    return float(value)
