"""The registry's routing table: what is loaded (`Loaded`, with its request leases) and how one model name
is served (`Route`), plus the errors a request for a name can get. Kept apart from service/registry.py
(which loads, swaps and routes) so each stays one concept; nothing here loads or scores.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from service.bundle import MANIFEST

_serials = itertools.count(1)


class UnknownModel(LookupError):
    """A request named a model that is not served (404 model_not_found, field "model")."""

    status, type, field = 404, "model_not_found", "model"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class ModelRequired(UnknownModel):
    """A request without `model` on a server with several models and no default_model (422)."""

    status, type = 422, "validation_error"


@dataclass(eq=False)
class Loaded:
    """One started scorer (a model version or an ensemble) and the requests holding it (its leases)."""

    scorer: Any  # ServedModel or service.ensemble.EnsembleModel
    fingerprint: str
    members: tuple["Loaded", ...] = ()  # an ensemble's members: leased with it
    leases: int = 0
    serial: int = field(default_factory=lambda: next(_serials))
    idle: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.idle.set()

    def acquire(self) -> None:
        self.leases += 1
        self.idle.clear()
        for member in self.members:
            member.acquire()

    def release(self) -> None:
        self.leases -= 1
        if self.leases == 0:
            self.idle.set()
        for member in self.members:
            member.release()


@dataclass(frozen=True)
class Route:
    """How requests for one name are served: replaced whole on a swap, never changed in place."""

    name: str
    versions: dict[str, Loaded]  # version → scorer, every version that takes requests
    traffic: dict[str, float] | None = None  # canary split (None: the one version)
    shadow: str | None = None
    shadow_loaded: Loaded | None = None
    ensemble: bool = False

    @property
    def primary(self) -> str:
        """The version that takes most requests (ties: the highest): what /v1/models and ensembles use."""
        shares = self.traffic or {v: 1.0 for v in self.versions}
        return max(shares, key=lambda v: (shares[v], version_order(v)))

    def loaded(self) -> list[Loaded]:
        return list(self.versions.values()) + ([self.shadow_loaded] if self.shadow_loaded else [])


def version_order(version: str) -> tuple:
    return (0, int(version), "") if version.isdigit() else (1, 0, version)


def reachable(routes: dict[str, Route]) -> dict[int, Loaded]:
    """Every Loaded the table holds, an ensemble's members included (by identity)."""
    out: dict[int, Loaded] = {}
    stack = [x for route in routes.values() for x in route.loaded()]
    while stack:
        loaded = stack.pop()
        if id(loaded) not in out:
            out[id(loaded)] = loaded
            stack.extend(loaded.members)
    return out


def label(loaded: Loaded) -> str:
    return f"{loaded.scorer.name}@{loaded.scorer.version}"


def one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 500 else text[:497] + "..."


def fingerprint(bundle: Path) -> str:
    """What identifies a bundle's content without hashing its weights: the manifest's bytes (it holds every
    other file's sha256) and each file's size and mtime, so a re-exported or re-copied bundle is new."""
    digest = hashlib.sha256()
    for path in sorted(Path(bundle).rglob("*")):
        if path.is_file():
            st = path.stat()
            digest.update(f"{path.relative_to(bundle)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    manifest = Path(bundle) / MANIFEST
    if manifest.is_file():
        digest.update(manifest.read_bytes())
    return digest.hexdigest()


def version_states(name: str, entry, route: Route | None, failed: dict, draining: list, loading: set) -> list:
    """/v1/models' versions of one model: every version folder of the repository with its state (available:
    a valid bundle not loaded; failed: why), overlaid with what is loading, draining and serving now."""
    from service.protocol import VersionInfo

    if route is not None and route.ensemble:
        return []
    states: dict[str, VersionInfo] = {}
    for version, found in (entry.versions.items() if entry is not None else ()):
        why = found.error or (failed[(name, version)][1] if (name, version) in failed else None)
        states[version] = VersionInfo(version=version, state="failed" if why else "available", reason=why)
    for state, held in (("draining", draining), ("loading", loading)):
        for version in (v for n, v in held if n == name):
            states[version] = VersionInfo(version=version, state=state)
    if route is not None:
        for version in route.versions:
            states[version] = VersionInfo(version=version, state="ready",
                                          traffic=route.traffic.get(version) if route.traffic else 1.0)
        if route.shadow:  # (a version may also take a traffic share: requests routed to it are not shadowed)
            share = route.traffic.get(route.shadow) if route.traffic else None
            states[route.shadow] = VersionInfo(version=route.shadow, state="ready", traffic=share, shadow=True)
    return [states[v] for v in sorted(states, key=version_order)]
