"""The naive baseline for bench/serve_bench.py: FastAPI, one model run per request.

This is how OpenRLHF's `serve_rm` serves a reward model: an `async def` handler that tokenizes the
request's texts and calls the model synchronously, on the event loop, padded to the longest text of
that one request. Nothing is shared between requests, so concurrent requests simply wait their turn.
Same bundle, tokenizer and ONNX Runtime session options as rewardserve (service.runtime), so the
comparison is about serving, not about the model.

  python bench/naive_server.py --bundle runs/bench_bundle --port 8101 [--threads 0]

POST /score {"prompt": str, "response": str} → {"reward": float}; GET /health → {"status": "ok"}.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import uvicorn  # noqa: E402
from fastapi import FastAPI, Request  # noqa: E402

from service.bundle import open_bundle  # noqa: E402
from service.runtime import load_runtime  # noqa: E402


def create_app(bundle: str, threads: int, provider: str = "cpu") -> FastAPI:
    manifest, encoder = open_bundle(bundle)
    runtime = load_runtime(Path(bundle), manifest, provider=provider, intra_op_threads=threads)
    runtime.run(encoder.pad(encoder.encode(["warm-up"], ["ok"])))
    app = FastAPI()

    @app.post("/score")
    async def score(request: Request):
        data = await request.json()
        encoded = encoder.encode([data["prompt"]], [data["response"]])
        reward = runtime.run(encoder.pad(encoded))  # blocks the event loop, as serve_rm does
        return {"reward": float(reward[0])}

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    return app


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8101)
    ap.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0 = all cores)")
    ap.add_argument("--provider", default="cpu", choices=["cpu", "cuda"])
    args = ap.parse_args()
    uvicorn.run(create_app(args.bundle, args.threads, args.provider), host=args.host, port=args.port,
                log_level="warning", access_log=False, workers=1)


if __name__ == "__main__":
    main()
