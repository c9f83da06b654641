"""`rewardserve serve`: CLI flags + REWARDSERVE_* env → Settings → uvicorn (one worker) running the app.

Flags override the environment. On SIGTERM/SIGINT the app is marked draining first (readyz turns 503,
new requests get 503 + Retry-After), then uvicorn stops listening, waits up to drain_timeout_s for
in-flight requests (the batcher keeps answering queued work), and runs the app's shutdown.
"""

from __future__ import annotations

import argparse
import logging
import sys
import typing

import uvicorn
from pydantic import ValidationError

from service.settings import Settings


def build_parser() -> argparse.ArgumentParser:
    """One --flag per Settings field, so the CLI can never drift from the settings object."""
    ap = argparse.ArgumentParser(prog="rewardserve serve", description="Serve a model bundle over HTTP. Every "
                                 "flag can also be set as REWARDSERVE_<NAME> (flags win).")
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        default = "required" if field.is_required() else f"default {field.default!r}"
        help_text = f"{field.description or ''} ({default}; env REWARDSERVE_{name.upper()})".strip()
        if field.annotation is bool:
            ap.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                            help=help_text)
        else:
            choices = _choices(field.annotation)
            lower = choices is not None and all(c.isalpha() for c in choices)  # --log-level INFO works too
            ap.add_argument(flag, dest=name, default=argparse.SUPPRESS, help=help_text, metavar=name.upper(),
                            choices=choices, type=str.lower if lower else None)
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
        lines = [f"  --{'-'.join(str(p) for p in e['loc']).replace('_', '-')}: {e['msg']}" for e in exc.errors()]
        print("rewardserve serve: invalid settings\n" + "\n".join(lines), file=sys.stderr)
        sys.exit(2)


class DrainingServer(uvicorn.Server):
    """uvicorn.Server that flips the app to draining the moment a stop signal arrives."""

    def __init__(self, config: uvicorn.Config, service):
        super().__init__(config)
        self.service = service

    def handle_exit(self, sig, frame) -> None:
        self.service.draining = True  # a plain attribute write: safe inside a signal handler
        super().handle_exit(sig, frame)


def main(argv: list[str] | None = None) -> None:
    settings = load_settings(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=settings.log_level.upper() if settings.log_level != "trace" else "DEBUG",
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from service.app import create_app  # after logging is set up

    app = create_app(settings)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                            workers=1, lifespan="on", timeout_graceful_shutdown=settings.drain_timeout_s,
                            access_log=settings.log_level in ("debug", "trace"))
    server = DrainingServer(config, app.state.service)
    server.run()
    if not server.started:
        sys.exit(3)  # uvicorn's "startup failed" code; the reason is in the log above


if __name__ == "__main__":
    main()
