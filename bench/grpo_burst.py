"""GRPO burst: RLHF trainers' per-sample reward requests with prefix sharing on vs off (issue 21, docs/benchmarks.md).

What trainers send (issue 21): one request per sample, each the whole chat-templated prompt + response;
half in OpenRLHF's shape (`POST /get_reward {"query": [text]}`) and half in verl's (`POST /classify
{"model", "input": text, "activation": false}`). A GRPO group is n samples of one prompt, so n requests
whose token ids start with the same (long) prompt.

Model: a random-init bf16 Qwen2-shaped Qwen2ForSequenceClassification (size "grpo": ≈ 15 M parameters;
"tiny" for --smoke) with a byte-level BPE tokenizer trained on the demo set in seconds and Qwen's ChatML
template (bench/gpu_check.py build_checkpoint), imported with `rewardserve export --format transformers`.

Workload per scenario: `prompts` groups × n samples; a prompt is a system turn plus a user turn of
prompt_tokens (uniform in the range) cut from the demo texts, tagged at its start so no two groups share
more than the template's first tokens; responses of response_tokens (uniform). Every scenario gets new
prompts, so no server profits from an earlier one. Two arrival orders:
  * burst: every sample at once, groups interleaved at random;
  * round_robin: `in_flight` (16) requests in flight, samples taken round-robin over the groups, and a
    sample never sent while another of its group is in flight: a group's samples never share a batch,
    only the prefix cache can help.
Two servers side by side (CPU): sharing on (`--prompt-reuse-min-tokens`, default 64) and off (0), both with
the score cache off and a long request deadline; each scenario is sent to both, one after the other, in
alternating order from round to round. On a GPU (`device="cuda"`) one server at a time (two would compete
for memory): all rounds with sharing on, then all with it off. A request refused 503/429 is retried after
its Retry-After (as OpenRLHF's client retries); a sample without a reward after 20 tries is "lost".

Printed and written as JSON: per scenario the wall time and samples/s of each server, the throughput ratio
(on / off) per round, its median and spread per order, rewards lost, the max |reward difference| between
the servers (raw rewards, the same samples) and the prefix-sharing counters of the "on" server.

  python bench/grpo_burst.py [--rounds 3] [--prompts 24] [--n 8] [--out docs/bench_grpo_burst.json]
  python bench/grpo_burst.py --smoke --out /tmp/grpo.json      (tiny model, seconds; the test suite runs it)

`run_scenario(bundle, device, ...)` is the same benchmark for a bundle built elsewhere (bench/gpu_check.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.gpu_check import SIZES, Server, build_checkpoint, free_port, log  # noqa: E402

# ≈ 15 M parameters (the low end of the issue's 15-100 M): a ~700-token prompt still costs real time on 2 CPU
# cores, and a round of 192 unshared samples in each order fits in a few minutes there.
SIZES.setdefault("grpo", dict(hidden_size=384, num_hidden_layers=8, num_attention_heads=6, num_key_value_heads=2,
                              intermediate_size=1152, vocab_size=4000, tie_word_embeddings=False))
SYSTEM = "You are a careful assistant. Answer the user's question accurately and completely."
ORDERS = ("burst", "round_robin")
METRICS = ("rewardserve_prefix_tokens_computed_total", "rewardserve_prefix_tokens_reused_total",
           "rewardserve_prefix_cache_hits_total", "rewardserve_prefix_cache_misses_total",
           "rewardserve_prompt_reuse_tokens_total", "rewardserve_batch_size_count")
MAX_TRIES = 20


# ---------------------------------------------------------------- model and texts

def build_bundle(work: Path, size: str, device: str, max_length: int) -> Path:
    """Checkpoint (bench/gpu_check.py build_checkpoint) → transformers bundle; reused if already there."""
    ckpt, bundle = work / f"ckpt-{size}", work / f"bundle-{size}"
    if not (bundle / "manifest.json").is_file():
        build_checkpoint(ckpt, size, "cpu")
        subprocess.run([sys.executable, "-m", "service.cli", "export", str(ckpt), "--out", str(bundle), "--format",
                        "transformers", "--max-length", str(max_length), "--reference-pairs", "8"],
                       cwd=REPO, check=True)
    return bundle


def parameters(bundle: Path) -> int:
    from safetensors import safe_open

    total = 0
    for path in bundle.glob("*.safetensors"):
        with safe_open(str(path), "np") as f:
            total += sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    return total


def workloads(bundle: Path, scenarios: int, prompts: int, n: int, prompt_tokens: tuple[int, int],
              response_tokens: tuple[int, int], seed: int = 0) -> list[list[dict]]:
    """Per scenario, `prompts` × n samples {group, k, text}: the whole chat-templated conversation (system,
    user, assistant), as trainers send it."""
    from service.bundle import open_bundle
    from service.chat import ChatFormat
    from service.data import demo_data_path, read_pairs

    manifest, encoder = open_bundle(bundle)
    chat = ChatFormat.from_bundle(bundle, manifest.text, encoder)
    tok = encoder.tokenizer
    pairs, _ = read_pairs(demo_data_path())
    corpus = tok.encode(" ".join(t for p in pairs for t in (p.prompt, p.chosen, p.rejected)),
                        add_special_tokens=False).ids
    rng = random.Random(seed)

    def cut(k: int) -> str:
        at = rng.randrange(0, len(corpus) - k)
        return tok.decode(corpus[at: at + k])

    out = []
    for s in range(scenarios):
        samples = []
        for g in range(prompts):
            user = f"[scenario {s} prompt {g}] " + cut(rng.randint(*prompt_tokens))
            for k in range(n):
                messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user},
                            {"role": "assistant", "content": cut(rng.randint(*response_tokens))}]
                samples.append({"group": g, "k": k, "text": chat.render(messages)})
        out.append(samples)
    return out


# ---------------------------------------------------------------- sending

def _body(sample: dict, model: str) -> tuple[str, dict]:
    """Even samples in OpenRLHF's /get_reward shape, odd ones in verl's /classify shape."""
    if sample["k"] % 2 == 0:
        return "/get_reward", {"query": [sample["text"]]}
    return "/classify", {"model": model, "input": sample["text"], "activation": False}


def _raw(path: str, answer: dict) -> float:
    if path == "/get_reward":
        return float(answer["extra_logs"]["raw_reward"][0])
    return float(answer["data"][-1]["probs"][-1])


async def send(url: str, samples: list[dict], order: str, model: str, in_flight: int, seed: int) -> dict:
    """Send every sample (one request each) in `order`; wall time, raw rewards by sample, lost, retries."""
    import httpx

    if order == "burst":
        queue = list(samples)
        random.Random(seed).shuffle(queue)
        workers = len(queue)
    else:  # round-robin over the groups: sample k of every group, then k + 1
        queue = sorted(samples, key=lambda x: (x["k"], x["group"]))
        workers = in_flight
    busy = {g: asyncio.Lock() for g in {x["group"] for x in samples}}
    rewards: dict[tuple[int, int], float] = {}
    lost, retries = 0, 0
    pending = iter(queue)
    limits = httpx.Limits(max_connections=workers, max_keepalive_connections=workers)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=1800) as client:
        async def one(sample: dict) -> None:
            nonlocal lost, retries
            path, body = _body(sample, model)
            for _ in range(MAX_TRIES):
                try:
                    r = await client.post(path, json=body)
                except httpx.HTTPError:
                    await asyncio.sleep(1.0)
                    retries += 1
                    continue
                if r.status_code == 200:
                    value = _raw(path, r.json())
                    if math.isfinite(value):
                        rewards[(sample["group"], sample["k"])] = value
                        return
                    break
                if r.status_code not in (429, 503):
                    break
                retries += 1
                await asyncio.sleep(min(float(r.headers.get("retry-after") or 1), 5.0))
            lost += 1

        async def worker() -> None:
            for sample in pending:
                if order == "burst":
                    await one(sample)
                    continue
                async with busy[sample["group"]]:  # a group's samples never in flight together
                    await one(sample)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(workers)))
        wall = time.perf_counter() - t0
    return {"wall_s": wall, "samples_per_s": len(samples) / wall, "lost": lost, "retries": retries,
            "rewards": rewards}


def counters(url: str) -> dict[str, float]:
    import httpx

    text = httpx.get(url + "/metrics", timeout=30).text
    values = {name: 0.0 for name in METRICS}
    for line in text.splitlines():  # summed over label sets (the counters carry a model label)
        name = line.split("{")[0].split(" ")[0]
        if name in values:
            values[name] += float(line.split()[-1])
    return values


# ---------------------------------------------------------------- the scenario

def start_server(name: str, bundle: Path, device: str, threads: int, reuse_min: int, work: Path) -> Server:
    port = free_port()
    argv = [sys.executable, "-m", "service.cli", "serve", "--bundle", str(bundle), "--host", "127.0.0.1",
            "--port", str(port), "--provider", device, "--cache-size", "0", "--request-timeout-s", "1800",
            "--prompt-reuse-min-tokens", str(reuse_min), "--log-level", "warning"]
    if threads:
        argv += ["--intra-op-threads", str(threads)]
    server = Server(name, argv, port, work / f"grpo-{name}.log")
    server.wait_ready(900)
    return server


def pairwise_order(on: list[dict], off: list[dict]) -> tuple[int, int]:
    """Within each group (what GRPO compares), how many sample pairs the sharing-on rewards order as the
    sharing-off ones do, of all pairs with both rewards: the exactness target in bf16, where rounding differs
    between the shared and the unshared computation. A tie on one side and not the other counts as different."""
    same = pairs = 0
    for a, b in zip(on, off):
        keys = sorted(k for k in a["rewards"] if k in b["rewards"])
        for i, x in enumerate(keys):
            for y in keys[i + 1:]:
                if x[0] != y[0]:
                    continue
                pairs += 1
                sign = lambda r: (r[x] > r[y]) - (r[x] < r[y])  # noqa: E731
                same += sign(a["rewards"]) == sign(b["rewards"])
    return same, pairs


def run_scenario(bundle: Path, device: str = "cpu", *, prompts: int = 24, n: int = 8,
                 prompt_tokens: tuple[int, int] = (384, 1024), response_tokens: tuple[int, int] = (32, 256),
                 rounds: int = 3, in_flight: int = 16, threads: int = 0, reuse_min: int = 64,
                 workdir: Path | None = None, seed: int = 0) -> dict:
    """The GRPO burst benchmark on `bundle` served on `device` ("cpu" or "cuda"); returns the report."""
    import httpx

    work = Path(workdir or tempfile.mkdtemp(prefix="grpo-burst-"))
    work.mkdir(parents=True, exist_ok=True)
    loads = workloads(bundle, rounds * len(ORDERS), prompts, n, prompt_tokens, response_tokens, seed)
    modes = {"on": reuse_min, "off": 0}
    cells: dict[str, dict[str, list[dict]]] = {o: {m: [] for m in modes} for o in ORDERS}
    shared: dict[str, list[dict]] = {o: [] for o in ORDERS}  # prefix counters of the "on" server per scenario
    side_by_side = device == "cpu"
    servers: dict[str, Server] = {}
    info: dict = {}

    def run_one(mode: str, server: Server, r: int, o: int, order: str) -> None:
        before = counters(server.url)
        result = asyncio.run(send(server.url, loads[r * len(ORDERS) + o], order, info["model"], in_flight,
                                  seed + r))
        after = counters(server.url)
        cells[order][mode].append(result)
        if mode == "on":
            shared[order].append({k: after[k] - before[k] for k in METRICS})
        log(f"round {r} {order:11s} sharing {mode:3s}: {result['wall_s']:7.2f} s, "
            f"{result['samples_per_s']:6.2f} samples/s, lost {result['lost']}, retries {result['retries']}")

    def warm(server: Server) -> None:
        sample = workloads(bundle, 1, 1, 2, (32, 48), (8, 16), seed + 999)[0]
        for x in sample:
            path, body = _body(x, info["model"])
            httpx.post(server.url + path, json=body, timeout=600).raise_for_status()

    try:
        if side_by_side:
            for mode, minimum in modes.items():
                servers[mode] = start_server(mode, bundle, device, threads, minimum, work)
            info["model"] = httpx.get(servers["on"].url + "/v1/models").json()["data"][0]["id"]
            info["runtime"] = httpx.get(servers["on"].url + "/v1/models").json()["data"][0]["runtime"]
            for server in servers.values():
                warm(server)
            for r in range(rounds):
                for o, order in enumerate(ORDERS):
                    sequence = list(modes) if (r + o) % 2 == 0 else list(modes)[::-1]
                    for mode in sequence:
                        run_one(mode, servers[mode], r, o, order)
        else:
            for mode, minimum in modes.items():
                server = servers[mode] = start_server(mode, bundle, device, threads, minimum, work)
                info["model"] = httpx.get(server.url + "/v1/models").json()["data"][0]["id"]
                info["runtime"] = httpx.get(server.url + "/v1/models").json()["data"][0]["runtime"]
                warm(server)
                for r in range(rounds):
                    for o, order in enumerate(ORDERS):
                        run_one(mode, server, r, o, order)
                server.stop()
                del servers[mode]
    finally:
        for server in servers.values():
            server.stop()

    report: dict = {"device": device, "runtime": info.get("runtime"), "parameters": parameters(bundle),
                    "workload": {"prompts": prompts, "samples_per_prompt": n, "prompt_tokens": list(prompt_tokens),
                                 "response_tokens": list(response_tokens), "rounds": rounds,
                                 "round_robin_in_flight": in_flight, "prompt_reuse_min_tokens_on": reuse_min,
                                 "requests": {"get_reward": "even samples", "classify": "odd samples"},
                                 "side_by_side": side_by_side},
                    "orders": {}}
    for order in ORDERS:
        on, off = cells[order]["on"], cells[order]["off"]
        ratios = [a["samples_per_s"] / b["samples_per_s"] for a, b in zip(on, off)]
        diffs = [abs(a["rewards"][key] - b["rewards"][key]) for a, b in zip(on, off)
                 for key in a["rewards"] if key in b["rewards"]]
        same, pairs = pairwise_order(on, off)
        report["orders"][order] = {
            "samples_per_s": {"on": [c["samples_per_s"] for c in on], "off": [c["samples_per_s"] for c in off]},
            "wall_s": {"on": [c["wall_s"] for c in on], "off": [c["wall_s"] for c in off]},
            "ratio_per_round": ratios, "ratio_median": statistics.median(ratios),
            "ratio_min": min(ratios), "ratio_max": max(ratios),
            "rewards_lost": {"on": sum(c["lost"] for c in on), "off": sum(c["lost"] for c in off)},
            "retries": {"on": sum(c["retries"] for c in on), "off": sum(c["retries"] for c in off)},
            "rewards_compared": len(diffs), "max_reward_diff": max(diffs) if diffs else None,
            "pairwise_order_same": same, "pairwise_order_pairs": pairs,
            "sharing_counters_on": {k: sum(c[k] for c in shared[order]) for k in METRICS},
        }
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny model, 4 prompts x 4 samples, 1 round (CI)")
    ap.add_argument("--size", default="grpo", help="bench/gpu_check.py SIZES key (default grpo, ≈15 M)")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=24)
    ap.add_argument("--n", type=int, default=8, help="samples per prompt (GRPO group size)")
    ap.add_argument("--prompt-tokens", default="384,1024")
    ap.add_argument("--response-tokens", default="32,256")
    ap.add_argument("--in-flight", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2, help="torch threads of each server (0: the runtime's default)")
    ap.add_argument("--workdir")
    ap.add_argument("--out", default="docs/bench_grpo_burst.json")
    args = ap.parse_args()
    prompt_tokens = tuple(int(x) for x in args.prompt_tokens.split(","))
    response_tokens = tuple(int(x) for x in args.response_tokens.split(","))
    reuse_min = 64
    if args.smoke:
        args.size, args.rounds, args.prompts, args.n, args.in_flight = "tiny", 1, 4, 4, 3
        prompt_tokens, response_tokens, reuse_min = (64, 96), (8, 16), 16
    work = Path(args.workdir or tempfile.mkdtemp(prefix="grpo-burst-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    bundle = build_bundle(work, args.size, args.device, prompt_tokens[1] + response_tokens[1] + 64)
    report = run_scenario(bundle, args.device, prompts=args.prompts, n=args.n, prompt_tokens=prompt_tokens,
                          response_tokens=response_tokens, rounds=args.rounds, in_flight=args.in_flight,
                          threads=args.threads, reuse_min=reuse_min, workdir=work)
    report["size"] = args.size
    report["machine"] = {"cpus": os.cpu_count(), "threads_per_server": args.threads,
                         "python": sys.version.split()[0], "load_average": os.getloadavg()}
    report["command"] = " ".join(["python", "bench/grpo_burst.py"] + sys.argv[1:])
    report["total_s"] = time.perf_counter() - t0
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"{args.size} decoder ({report['parameters'] / 1e6:.1f} M parameters), {args.prompts} prompts x {args.n} "
          f"samples, prompts {prompt_tokens[0]}-{prompt_tokens[1]} tokens, responses {response_tokens[0]}-"
          f"{response_tokens[1]}, {args.rounds} rounds, {args.device}")
    for order, o in report["orders"].items():
        print(f"{order:11s}: sharing on/off throughput {o['ratio_median']:.2f}x (rounds {o['ratio_min']:.2f}-"
              f"{o['ratio_max']:.2f}x); lost on {o['rewards_lost']['on']} off {o['rewards_lost']['off']}; max reward "
              f"diff {o['max_reward_diff']:.2e} over {o['rewards_compared']}; prefix tokens reused "
              f"{o['sharing_counters_on']['rewardserve_prefix_tokens_reused_total']:.0f}")
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
