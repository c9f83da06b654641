"""`rewardserve serve`: CLI flags + REWARDSERVE_* env → Settings → uvicorn (one worker) running the app.

Flags override the environment (secrets such as api_keys are environment-only).

Graceful drain, what Kubernetes needs behind a preStop sleep. On the first SIGTERM/SIGINT:
  1. at once: readyz answers 503 `draining`, new scoring requests 503 `draining` + Retry-After, and
     every answer carries `Connection: close`; the server keeps listening, so nothing is refused at the TCP
     level, and queued and in-flight requests are answered;
  2. as soon as no request is in flight and the queue is empty (for DRAIN_QUIET_S), or at the latest
     drain_timeout_s after the signal, uvicorn's shutdown starts: stop listening, close idle connections,
     run the app's shutdown; the process then exits 0;
  3. at the drain deadline, work still queued is answered 503 `draining` before the shutdown starts.
A second signal starts uvicorn's shutdown at once; a third SIGINT exits without waiting.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time
import typing

import uvicorn
from pydantic import ValidationError

from service.settings import Settings

log = logging.getLogger("rewardserve.server")

ENV_ONLY = {"api_keys"}  # secrets: a flag would show them to anyone who can run ps
DRAIN_QUIET_S = 0.5  # idle this long (no request in flight, empty queue) before the shutdown starts
DRAIN_ANSWER_S = 1.0  # at the drain deadline: time left to write the 503 answers of the abandoned queue


# What keys guard, said once for --help: Settings' api_keys_file description names only /v1/*
KEYS_GUARD = ("every /v1/* route and the compatibility routes (/get_reward, /classify, /pooling, /v1/embeddings, "
              "/predict, /rerank, /, /invocations) then need 'Authorization: Bearer <key>'")


def build_parser() -> argparse.ArgumentParser:
    """One --flag per Settings field, so the CLI can never drift from the settings object."""
    env_only = "; ".join(f"REWARDSERVE_{name.upper()}: {Settings.model_fields[name].description}"
                         for name in sorted(ENV_ONLY))
    ap = argparse.ArgumentParser(prog="rewardserve serve", description="Serve a model bundle (or a model "
                                 "repository) over HTTP. Every "
                                 "flag can also be set as REWARDSERVE_<NAME> (flags win).",
                                 epilog=f"Not a flag: {env_only}. With keys set, {KEYS_GUARD}.")
    for name, field in Settings.model_fields.items():
        if name in ENV_ONLY:
            continue
        flag = "--" + name.replace("_", "-")
        default = "required" if field.is_required() else f"default {field.default!r}"
        description = field.description or ""
        help_text = f"{description} ({default}; env REWARDSERVE_{name.upper()})".strip()
        if field.annotation is bool or set(typing.get_args(field.annotation)) == {bool, type(None)}:
            ap.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                            help=help_text)
        else:
            choices = _choices(field.annotation)
            lower = choices is not None and all(c.isalpha() for c in choices)  # --log-level INFO works too
            # no metavar with choices: argparse then shows them ({auto,cpu,cuda}) in the usage and the help
            ap.add_argument(flag, dest=name, default=argparse.SUPPRESS, help=help_text,
                            metavar=name.upper() if choices is None else None, choices=choices,
                            type=str.lower if lower else None)
    return ap


def _choices(annotation) -> list[str] | None:
    # Annotated[Literal[...], ...] or Literal[...] → the literal values as text, for --help and early errors
    while typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    if typing.get_origin(annotation) is typing.Literal:
        return [str(v) for v in typing.get_args(annotation)]
    return None


def load_settings(argv: list[str]) -> Settings:
    args = vars(build_parser().parse_args(argv))
    try:
        return Settings(**args)
    except ValidationError as exc:
        # a field's error names its flag; a rule over several fields (bundle xor repository) is its message alone
        lines = [f"  --{'-'.join(str(p) for p in e['loc']).replace('_', '-')}: {e['msg']}" if e["loc"]
                 else f"  {e['msg'].removeprefix('Value error, ')}" for e in exc.errors()]
        print("rewardserve serve: invalid settings\n" + "\n".join(lines), file=sys.stderr)
        sys.exit(2)


class DrainingServer(uvicorn.Server):
    """uvicorn.Server that drains before it stops listening (see the module docstring)."""

    def __init__(self, config: uvicorn.Config, engine):
        super().__init__(config)
        self.engine = engine
        self.signals = 0
        self._idle_since: float | None = None
        self._announced = False

    def handle_exit(self, sig, frame) -> None:
        # Runs inside a signal handler: attribute writes only (no logging, no locks, no tasks).
        self.signals += 1
        self.engine.begin_drain()
        if self.signals == 1:
            return  # on_tick decides when the shutdown starts
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True
        self.should_exit = True

    async def on_tick(self, counter: int) -> bool:
        if await super().on_tick(counter):
            return True
        return await self._drained() if self.engine.draining else False

    async def _drained(self) -> bool:
        """Every 0.1 s while draining: True once uvicorn's shutdown may start."""
        engine, now = self.engine, time.monotonic()
        if not self._announced:
            self._announced = True
            log.info("draining: refusing new work, answering %d queued items and %d requests in flight "
                     "(at most %.1f s)", engine.queue_depth, len(self.server_state.tasks),
                     engine.drain_deadline - now)
        busy = bool(self.server_state.tasks) or engine.queue_depth > 0
        self._idle_since = None if busy else (self._idle_since or now)
        remaining = engine.drain_deadline - now
        if self._idle_since is not None and now - self._idle_since >= min(DRAIN_QUIET_S, max(remaining, 0.0)):
            log.info("drained: nothing in flight; shutting down")
            self.config.timeout_graceful_shutdown = max(remaining, DRAIN_ANSWER_S)
        elif remaining <= 0:
            log.error("drain timeout: %d queued items answered 503, %d requests still in flight",
                      engine.queue_depth, len(self.server_state.tasks))
            await engine.abandon_queue()
            self.config.timeout_graceful_shutdown = DRAIN_ANSWER_S
        else:
            return False
        self.should_exit = True
        return True


def main(argv: list[str] | None = None) -> None:
    settings = load_settings(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=settings.log_level.upper() if settings.log_level != "trace" else "DEBUG",
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from service.api.http_protocol import http_protocol
    from service.app import create_app  # after logging is set up

    app = create_app(settings)
    # http: uvicorn's own protocol, except that what its parser refuses (a bad Content-Length) is a JSON 400
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                            http=http_protocol(),
                            workers=1, lifespan="on", timeout_graceful_shutdown=settings.drain_timeout_s,
                            access_log=settings.log_level in ("debug", "trace"))
    server = DrainingServer(config, app.state.engine)
    server.run()
    if not server.started:
        sys.exit(3)  # uvicorn's "startup failed" code; the reason is in the log above


if __name__ == "__main__":
    main()
