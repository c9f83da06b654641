"""A/B of `/v1/score` throughput between two source trees serving the same bundle (docs/benchmarks.md §11:
the no-regression check of the default encoder bundle): both servers up side by side, closed-loop cells at
concurrency 16 from bench/loadgen.py (needs aiohttp), the idle server SIGSTOPped during the other's cell,
the order alternating per round; writes the per-round items/s and the ratio new / base.

    git worktree add /tmp/base d524497
    python bench/ab_score.py BUNDLE /tmp/base ROUNDS SECONDS OUT.json   # from the repository root
"""
import json, os, signal, statistics, sys
from pathlib import Path
sys.path.insert(0, os.getcwd()); sys.path.append("/tmp/abdeps")
from bench.gpu_check import Server, free_port
from bench.loadgen import run_closed_loop
from bench.workload import build_workloads

bundle, base, rounds, secs = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
items = build_workloads(bundle, Path("../shared/data"), 0, 8, 6000, 2)["workloads"]["mixed"]
bodies = [json.dumps({"prompt": i["prompt"], "response": i["response"]}).encode() for i in items]
lengths = [i["n_tokens"] for i in items]
servers = {}
for name, tree in (("base", base), ("new", Path.cwd())):
    port = free_port()
    servers[name] = Server(name, ["env", "-C", str(tree), sys.executable, "-m", "service.cli", "serve", "--bundle",
                                  str(bundle), "--port", str(port), "--log-level", "warning"], port,
                           Path(f"/tmp/ab-{name}.log"))
    servers[name].wait_ready(300)
cursor, cells = {"base": 0, "new": 0}, {"base": [], "new": []}
try:
    for s in servers.values():  # warm-up, untimed, on items the cells never reach
        run_closed_loop(s.url + "/v1/score", bodies, lengths, 5000, 16, 3.0, 0.0, 10 ** 9, 120)
    for r in range(rounds):
        for name in (("base", "new") if r % 2 == 0 else ("new", "base")):
            other = servers["new" if name == "base" else "base"]
            os.kill(other.proc.pid, signal.SIGSTOP)
            cell = run_closed_loop(servers[name].url + "/v1/score", bodies, lengths, cursor[name], 16, secs, 1.0,
                                   10 ** 9, 120)
            os.kill(other.proc.pid, signal.SIGCONT)
            cursor[name] += cell["requests"]
            cells[name].append(cell)
finally:
    for s in servers.values():
        os.kill(s.proc.pid, signal.SIGCONT); s.stop()
ratios = [n["items_per_s"] / b["items_per_s"] for b, n in zip(cells["base"], cells["new"])]
out = {k: [c["items_per_s"] for c in v] for k, v in cells.items()}
out["ratio"] = {"per_round": ratios, "median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}
Path(sys.argv[5]).write_text(json.dumps(out, indent=2))
