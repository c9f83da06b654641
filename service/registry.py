"""The model registry: which model name → which loaded versions, and which one a request gets (issue 26).

The registry holds the routing table: model (or ensemble) name → `Route` (the versions it serves, their
canary traffic split, the shadow version). A Route is immutable; a swap builds a whole new table and
assigns it in one statement, so a request sees either the old routes or the new ones, never a mixture.

Hot swap (`reload`): rescan the repository (service/repository.scan); a version that is new (or whose
bundle files changed: `fingerprint`) is loaded and verified beside the serving one (ServedModel.start:
checksums, parity, the precision check, warm-up) before the table is swapped. One that fails is reported
(`describe`: state failed, with the reason) and never served: its model keeps its old route. A request
holds a lease on the version it was routed to (taken in the same event-loop step as the routing, so no
swap can come between), and a version out of the table is stopped only after its leases reach 0, so a
request admitted by a version finishes on it. Ensembles lease their members too, and are rebuilt when a
member's version changes. Each ServedModel has its own score and prefix caches keyed by its manifest, so
no answer comes from an old version's cache.

Canary: `config.json {"traffic": {"1": 0.9, "2": 0.1}}` routes each request to a version drawn at random
with those weights. Shadow: `{"shadow": "2"}` scores every request on version 2 too, after the answer is
computed, in a background task that never delays or fails the answer; the disagreement goes to metrics
(rewardserve_shadow_*) and, for large ones, a rate-limited log line.

A request without `model`: the default model (settings.default_model), or the only name served; with
several and no default it is refused (422 naming the field "model") rather than guessed.
"""

from __future__ import annotations

import asyncio
import logging
import random
from pathlib import Path
from typing import Sequence

from service.admission import Draining
from service.bundle import read_manifest
from service.metrics import Metrics
from service.model_table import (Loaded, ModelRequired, Route, UnknownModel, fingerprint, label, one_line, reachable,
                                 version_states)
from service.repository import EnsembleSpec, Layout, ModelEntry, scan, single_bundle
from service.runtime import Runtime
from service.served_model import ServedModel
from service.settings import Settings
from service.shadow import Shadowing

log = logging.getLogger("rewardserve.registry")

__all__ = ["ModelRequired", "Registry", "UnknownModel"]  # the errors a request for a name can get, re-exported


class Registry:
    """Built empty by the engine, filled by `start` (the app's lifespan), rebuilt by `reload`."""

    def __init__(self, settings: Settings, metrics: Metrics, runtime: Runtime | None = None):
        """`runtime`: a custom runtime for the one model of a --bundle (not with a repository)."""
        self.settings, self.metrics, self.runtime = settings, metrics, runtime
        self.repository: Path | None = getattr(settings, "repository", None)
        if runtime is not None and self.repository is not None:
            raise ValueError("a custom runtime serves one --bundle, not a model repository")
        self.routes: dict[str, Route] = {}  # the table: replaced whole, never edited
        self.layout: Layout | None = None
        self._loading: set[tuple[str, str]] = set()
        self._failed: dict[tuple[str, str], tuple[str, str]] = {}  # (name, version) → (fingerprint, why)
        self._errors: dict[str, str] = {}  # name → why nothing of it is served (config, ensemble, layout)
        self._draining: list[tuple[str, str, Loaded]] = []
        self._reload_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task] = set()  # shadow scoring, retiring versions, the poll loop
        self.shadowing = Shadowing(metrics, settings.request_timeout_s)
        self._rng = random.Random()
        self.closing = False
        self.started = False

    # ---- lifecycle

    async def start(self) -> None:
        """Load every model and ensemble. A --bundle that fails stops the start (as before the repository);
        in a repository one bad entry is only reported, but a start with nothing to serve, or without the
        named default_model, is refused."""
        summary = await self._apply(await self._scan())
        if self.repository is None and not self.routes:
            raise next(iter(summary["errors"].values()), None) or RuntimeError("the bundle could not be loaded")
        default = getattr(self.settings, "default_model", None)
        if not self.routes:
            raise RuntimeError(f"no model of the repository {self.repository} can be served: "
                               + "; ".join(f"{k}: {v}" for k, v in summary["failed"].items()))
        if default is not None and default not in self.routes:
            why = summary["failed"].get(default) or "not in the repository"
            raise RuntimeError(f"default_model '{default}' cannot be served ({why}); models: "
                               f"{', '.join(sorted(self.routes))}")
        poll = float(getattr(self.settings, "repository_poll_s", 0) or 0)
        if poll > 0 and self.repository is not None:
            self._spawn(self._poll(poll))
        self.started = True

    async def reload(self) -> dict:
        """Rescan and swap: what was loaded, failed, unloaded and left unchanged (POST /admin/reload)."""
        if self.runtime is not None:
            raise RuntimeError("reload is not available with a custom runtime (create_app(runtime=...))")
        if self.closing:
            raise Draining("server is shutting down")
        async with self._reload_lock:
            summary = await self._apply(await self._scan())
        summary.pop("errors", None)
        return summary

    async def _poll(self, every_s: float) -> None:
        """repository_poll_s > 0: rescan every that many seconds; a failing rescan is logged, never fatal."""
        while not self.closing:
            await asyncio.sleep(every_s)
            try:
                summary = await self.reload()
                if summary["loaded"] or summary["unloaded"]:
                    log.info("repository poll: %s", summary)
            except Exception as exc:  # noqa: BLE001 - the loop must survive anything a rescan meets
                log.error("repository poll failed: %s", one_line(exc))

    async def _scan(self) -> Layout:
        loop = asyncio.get_running_loop()
        if self.repository is not None:
            return await loop.run_in_executor(None, scan, self.repository)
        bundle = Path(self.settings.bundle)
        name = (await loop.run_in_executor(None, read_manifest, bundle)).name
        return single_bundle(bundle, name)

    def begin_drain(self) -> None:
        """Refuse new work from now on (signal-handler safe: attribute writes only)."""
        self.closing = True
        for model in self.served_models():
            model.begin_drain()

    async def abandon_queue(self) -> None:
        await asyncio.gather(*(m.abandon_queue() for m in self.served_models()))

    async def stop(self, timeout: float) -> None:
        """Answer what is queued on every loaded version within `timeout` s, then free them."""
        self.begin_drain()
        for task in list(self._tasks):  # the poll loop, shadow scoring and retiring versions
            task.cancel()
        await asyncio.gather(*(m.stop(timeout) for m in self.served_models()), return_exceptions=True)

    # ---- loading and swapping

    async def _apply(self, layout: Layout) -> dict:
        """Load what `layout` asks for that is not loaded, then swap the table in one assignment and retire
        what left it. A model whose new versions fail keeps its old route."""
        old, new = self.routes, {}
        errors: dict[str, Exception] = {}
        why = dict(layout.errors)  # name → one line; /v1/models keeps the previous reasons until the swap
        for name, entry in sorted(layout.models.items()):
            try:
                new[name] = await self._model_route(entry, old.get(name))
            except Exception as exc:  # noqa: BLE001 - one bad entry never takes the others down
                errors[name] = exc
                why[name] = one_line(exc)
                if name in old and not old[name].ensemble:
                    new[name] = old[name]  # the old version keeps serving
        for name, spec in sorted(layout.ensembles.items()):
            try:
                new[name] = await self._ensemble_route(spec, new, old.get(name), why)
            except Exception as exc:  # noqa: BLE001
                errors[name] = exc
                why[name] = one_line(exc)
                if name in old and old[name].ensemble:
                    new[name] = old[name]  # its members stay loaded while it holds them
        self.routes, self.layout, self._errors = new, layout, why  # the swap: one statement, no await
        before, after = reachable(old), reachable(new)
        retired = [x for key, x in before.items() if key not in after]
        for loaded in retired:
            self._spawn(self._retire(loaded))
        return {"models": {n: r.versions[r.primary].scorer.version for n, r in sorted(new.items())},
                "loaded": sorted(label(x) for key, x in after.items() if key not in before),
                "unloaded": sorted(label(x) for x in retired),
                "failed": {n: why[n] for n in sorted(why)}, "errors": errors}

    async def _model_route(self, entry: ModelEntry, old: Route | None) -> Route:
        """The route `entry` asks for, every version it needs loaded and verified, or an exception saying
        why not (then nothing new of it is kept)."""
        if entry.error:
            raise ValueError(entry.error)
        latest = entry.latest()
        traffic = dict(entry.traffic) if entry.traffic else None
        wanted = sorted(set(traffic or ([latest] if latest else [])) | ({entry.shadow} if entry.shadow else set()),
                        key=int)  # scan() checked that traffic and shadow name valid (integer) versions
        if not wanted:
            why = "; ".join(e.error for e in entry.versions.values() if e.error) or "no version folder"
            raise ValueError(f"{entry.name}: no servable version ({why})")
        reuse = {v: x for v, x in (old.versions.items() if old else ())}
        if old and old.shadow_loaded:
            reuse[old.shadow] = old.shadow_loaded
        loop = asyncio.get_running_loop()
        got: dict[str, Loaded] = {}
        try:
            for version in wanted:
                path = entry.versions[version].path
                fp = await loop.run_in_executor(None, fingerprint, path)
                if version in reuse and reuse[version].fingerprint == fp:
                    got[version] = reuse[version]
                else:
                    got[version] = await self._load(entry.name, version, path, fp)
        except BaseException:
            for version, loaded in got.items():  # started for this route only: stop them again
                if reuse.get(version) is not loaded:
                    await loaded.scorer.stop(0)
            raise
        served = {v: got[v] for v in (traffic or [latest])}
        shadow = entry.shadow if entry.shadow and not (entry.shadow in served and len(served) == 1) else None
        return Route(entry.name, served, traffic, shadow, got[shadow] if shadow else None)

    async def _load(self, name: str, version: str, path: Path, fp: str) -> Loaded:
        """Start (load + verify + warm up) one version; a failure is remembered by fingerprint, so the poll
        loop does not reload a broken bundle until its files change."""
        failed = self._failed.get((name, version))
        if failed is not None and failed[0] == fp:
            raise RuntimeError(f"{name} version {version}: {failed[1]}")
        model = ServedModel(name, version, path, self.settings, self.metrics,
                            runtime=self.runtime if not self.started else None)
        self._loading.add((name, version))
        try:
            await model.start()
        except Exception as exc:  # noqa: BLE001 - reported, never served
            reason = one_line(exc)
            self._failed[(name, version)] = (fp, reason)
            self.metrics.model_loads.labels(name, "failed").inc()
            log.error("model %s version %s failed verification and is not served: %s", name, version, reason)
            await model.stop(0)
            if self.repository is None:
                raise  # --bundle: the start fails with the bundle's own error, as before the repository
            raise RuntimeError(f"{name} version {version}: {reason}") from None
        finally:
            self._loading.discard((name, version))
        self._failed.pop((name, version), None)
        self.metrics.model_loads.labels(name, "loaded").inc()
        return Loaded(model, fp)

    async def _ensemble_route(self, spec: EnsembleSpec, routes: dict[str, Route], old: Route | None,
                              why: dict[str, str]) -> Route:
        """An ensemble over its members' primary versions; rebuilt (and its reference p99 recomputed) only
        when a member's version changed."""
        from service.ensemble import EnsembleModel  # the ensemble needs nothing of the registry

        if spec.error:
            raise ValueError(spec.error)
        missing = [m for m in spec.members if m not in routes or routes[m].ensemble]
        if missing:
            raise ValueError(f"{spec.name}: member {', '.join(missing)} is not served "
                             f"({'; '.join(why.get(m, 'not a model') for m in missing)})")
        members = {m: routes[m].versions[routes[m].primary] for m in spec.members}
        fp = repr(spec) + "".join(f"|{m}:{x.serial}" for m, x in members.items())
        if old is not None and old.versions[old.primary].fingerprint == fp:
            return old
        ensemble = EnsembleModel(spec, {m: x.scorer for m, x in members.items()}, self.metrics)
        self._loading.add((spec.name, ""))
        try:
            await ensemble.start()
        finally:
            self._loading.discard((spec.name, ""))
        return Route(spec.name, {"1": Loaded(ensemble, fp, tuple(members.values()))}, ensemble=True)

    async def _retire(self, loaded: Loaded) -> None:
        """Out of the table: wait for the requests holding it (bounded by the longest request deadline),
        then stop a model version (an ensemble has nothing of its own to stop)."""
        name, version = loaded.scorer.name, loaded.scorer.version
        entry = (name, version, loaded)
        self._draining.append(entry)
        try:
            try:
                await asyncio.wait_for(loaded.idle.wait(), self.settings.request_timeout_s + 1.0)
            except asyncio.TimeoutError:
                log.warning("%s version %s still held by %d requests after the longest deadline; stopping it",
                            name, version, loaded.leases)
            if isinstance(loaded.scorer, ServedModel):
                await loaded.scorer.stop(self.settings.drain_timeout_s)
                log.info("unloaded model %s version %s", name, version)
        finally:
            self._draining.remove(entry)

    def _spawn(self, work) -> asyncio.Task:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # ---- serving

    def resolve(self, model: str | None) -> str:
        """The name a request is served under: `model`, else the default model, else the only one."""
        routes = self.routes
        if model is None:
            model = getattr(self.settings, "default_model", None)
            if model is None:
                if len(routes) == 1:
                    return next(iter(routes))
                raise ModelRequired(f"model: this server serves several models ({', '.join(sorted(routes))}) "
                                    "and has no default_model; name one in 'model'")
        if model not in routes:
            why = self._errors.get(model)
            raise UnknownModel(f"model '{model}' is not served{f' ({why})' if why else ''}; models: "
                               f"{', '.join(sorted(routes)) or 'none'}")
        return model

    def scorer(self, model: str | None):
        """What a request for `model` would be scored by now (the primary version of its route)."""
        route = self.routes[self.resolve(model)]
        return route.versions[route.primary].scorer

    def _pick(self, route: Route) -> Loaded:
        if route.traffic is None or len(route.versions) == 1:
            return route.versions[route.primary]
        versions = list(route.traffic)
        [version] = self._rng.choices(versions, weights=[route.traffic[v] for v in versions])
        return route.versions[version]

    async def score(self, model: str | None, call, items: Sequence, shared_prompt: bool = False,
                    whole: bool = False) -> list:
        """Route (canary), lease, score; then, in the background, the shadow version."""
        if self.closing:
            raise Draining("server is shutting down")
        route = self.routes[self.resolve(model)]
        loaded = self._pick(route)
        loaded.acquire()  # no await between the routing and the lease: a swap cannot retire it in between
        shadow = self.shadowing.take(route.name, route.shadow_loaded, loaded)
        self.metrics.routed.labels(route.name, getattr(loaded.scorer, "version", "")).inc()
        try:
            results = await loaded.scorer.score(call, items, shared_prompt, whole)
        except BaseException:
            if shadow is not None:
                self.shadowing.give_back(shadow)
            raise
        finally:
            loaded.release()
        if shadow is not None:
            self._spawn(self.shadowing.run(route.name, loaded.scorer.version, shadow, call, items, shared_prompt,
                                           results))
        return results

    # ---- process-wide state (readiness, the queue, /v1/models)

    def served_models(self) -> list[ServedModel]:
        """Every loaded model version, serving or draining, once each."""
        loaded = list(reachable(self.routes).values()) + [x for _, _, x in self._draining]
        seen = {id(x.scorer): x.scorer for x in loaded if isinstance(x.scorer, ServedModel)}
        return list(seen.values())

    @property
    def ready(self) -> bool:
        return self.started and not self.closing and bool(self.routes)

    @property
    def draining(self) -> bool:
        return self.closing

    @property
    def fatal(self) -> str | None:
        """A device error one model's batcher saw: on one device it is every model's (restart the process)."""
        return next((f"{m.name}@{m.version}: {m.fatal}" for m in self.served_models() if m.fatal), None)

    @property
    def queue_depth(self) -> int:
        return sum(m.queue_depth for m in self.served_models())

    def describe(self) -> list:
        """/v1/models: every model and ensemble with its versions and their state, traffic split and shadow;
        a name with nothing loaded is listed with its state and why (service.protocol.ModelStatus)."""
        from service.protocol import ModelStatus

        layout = self.layout
        names = sorted(set(self.routes) | set(self._errors) | set(layout.models if layout else ())
                       | set(layout.ensembles if layout else ()))
        out = []
        for name in names:
            route = self.routes.get(name)
            versions = version_states(name, self.layout.models.get(name) if self.layout else None, route,
                                      self._failed, [(n, v) for n, v, _ in self._draining], self._loading)
            if route is None:
                loading = any(n == name for n, _ in self._loading)
                out.append(ModelStatus(id=name, state="loading" if loading else "failed",
                                       reason=self._errors.get(name), versions=versions or None))
                continue
            info = route.versions[route.primary].scorer.info()
            update = dict(state="ready", reason=self._errors.get(name), versions=versions or None,
                          traffic=route.traffic, shadow=route.shadow)
            out.append(info.model_copy(update={k: v for k, v in update.items() if k in type(info).model_fields}))
        return out
