"""The LitServe contender for bench/serve_bench.py: LitServe's own dynamic batching.

LitServe collects up to `max_batch_size` requests, waiting at most `batch_timeout` seconds for the
batch to fill, in arrival order, and runs them as one batch padded to the longest item (its
`batch()` hook is where a user pads). Same bundle, tokenizer and ONNX Runtime session options as
rewardserve (service.runtime); the model runs in LitServe's inference worker process, HTTP in its
API server process (one of each).

  python bench/litserve_server.py --bundle runs/bench_bundle --port 8102 [--threads 0] \
      [--max-batch-size 16] [--batch-timeout 0.005]

POST /predict {"prompt": str, "response": str} → {"reward": float}; GET /health.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import litserve as ls  # noqa: E402


class RewardAPI(ls.LitAPI):
    def __init__(self, bundle: str, threads: int, provider: str = "cpu", **kwargs):
        super().__init__(**kwargs)
        self.bundle, self.threads, self.provider = bundle, threads, provider

    def setup(self, device):
        from service.bundle import open_bundle
        from service.runtime import load_runtime

        manifest, self.encoder = open_bundle(self.bundle)
        self.runtime = load_runtime(Path(self.bundle), manifest, provider=self.provider,
                                    intra_op_threads=self.threads)
        self.runtime.run(self.encoder.pad(self.encoder.encode(["warm-up"], ["ok"])))

    def decode_request(self, request):
        return self.encoder.encode([request["prompt"]], [request["response"]])[0]

    def batch(self, inputs):
        return self.encoder.pad(inputs)  # padded to the longest item, in arrival order

    def predict(self, x):
        return self.runtime.run(x)

    def unbatch(self, output):
        return list(output)

    def encode_response(self, output):
        return {"reward": float(output)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8102)
    ap.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0 = all cores)")
    ap.add_argument("--max-batch-size", type=int, default=16)
    ap.add_argument("--batch-timeout", type=float, default=0.005, help="seconds")
    ap.add_argument("--provider", default="cpu", choices=["cpu", "cuda"])
    args = ap.parse_args()
    api = RewardAPI(args.bundle, args.threads, args.provider, max_batch_size=args.max_batch_size,
                    batch_timeout=args.batch_timeout, api_path="/predict")
    server = ls.LitServer(api, accelerator="cuda" if args.provider == "cuda" else "cpu", devices=1,
                          workers_per_device=1, timeout=300)
    server.run(host=args.host, port=args.port, num_api_servers=1, log_level="warning",
               generate_client_file=False)


if __name__ == "__main__":
    main()
