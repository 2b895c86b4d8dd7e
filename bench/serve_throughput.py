"""Serving speed: the appliance's server against llama.cpp's own C++ server, measured from the stream.

    .venv/bin/python bench/serve_throughput.py [--workloads short,shared-prefix,multi-turn] [--concurrency 1,8,16]
        [--max-tokens 48] [--rate R] [--rounds N] [--long-prompt] [--overload] [--contenders ours,llama-server[,peer]]
    .venv/bin/python bench/serve_throughput.py --engine transformers     # ours only, each concurrency against 1 client

Contenders (bench/serve_contenders.py): ours, `appliance serve` on the llama.cpp engine with `max_batch`
= the clients; llama-server, built once from the llama.cpp vendored in the pinned llama-cpp-python sdist
with the portable wheel's CPU flags (bench/llama_server_build.py; cached), `-np` = the clients; the same
GGUF (SmolLM2-135M-Instruct Q4_1), the same threads (2), greedy, the same requests. Each concurrency
starts each server afresh, then runs every workload (bench/serve_workloads.py) on it.

Every request streams; the client times each content chunk (bench/serve_metrics.py: TTFT, TPOT, ITL
as `vllm bench serve` defines them) and prints output tok/s and their p50/p90/p99 per contender,
workload and concurrency, then ours / llama-server per workload and concurrency; the ratios' last
line is `ratio_vs_llama_server short@1=<x> ...`. With `--rate`, conversations arrive as a Poisson
process of that many per second instead of all at once (each client still runs one at a time).
`--long-prompt` and `--overload` add the stress cases of bench/serve_cases.py.
With `--rounds N` the whole measurement runs N times, the contenders' order reversed every other
round, and each ratio is the median of the rounds' (each round's in brackets): on a shared 2-core
machine one run's ratio moves by about 0.2 from run to run.

The default run (3 workloads x 3 concurrencies x 2 servers) takes about 6-8 minutes on 2 cores,
plus one build of llama-server (about 10 minutes) the first time.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from math import ceil
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import llama_server_build, serve_cases, serve_client, serve_report  # noqa: E402
from bench.serve_contenders import Contender, llama_server, ours, peer, peer_missing, smollm2_gguf  # noqa: E402
from bench.serve_metrics import summarize  # noqa: E402
from bench.serve_report import Row  # noqa: E402
from bench.serve_workloads import WORKLOADS, Conversation, multi_turn  # noqa: E402


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip() and t.strip() != "none"]


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--engine", choices=("llama.cpp", "transformers"), default="llama.cpp")
    ap.add_argument("--model", type=Path, help="GGUF file (llama.cpp) or safetensors directory (transformers)")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads for every contender (default 2)")
    ap.add_argument("--max-tokens", type=int, default=48, help="answer length asked for (default 48)")
    ap.add_argument("--workloads", default=None,
                    help=f"any of {', '.join(WORKLOADS)}, or none (default all; transformers: short)")
    ap.add_argument("--concurrency", default=None, help="clients at once, comma-separated (default 1,8,16; transformers: 1,8)")
    ap.add_argument("--contenders", default="ours,llama-server", help="ours, llama-server, peer (default ours,llama-server)")
    ap.add_argument("--per-client", type=int, default=2, help="single-turn requests per client (default 2)")
    ap.add_argument("--min-requests", type=int, default=8, help="requests per run at least (default 8)")
    ap.add_argument("--turns", type=int, default=3, help="turns per multi-turn conversation (default 3)")
    ap.add_argument("--rate", type=float, default=None, help="Poisson arrivals: conversations per second (default: all at once)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the arrival times")
    ap.add_argument("--context", type=int, default=2048, help="tokens per sequence (per slot) for every contender")
    ap.add_argument("--long-prompt", action="store_true", help="also run 7 live streams + one 2,000-token prompt")
    ap.add_argument("--overload", action="store_true", help="also send 25x the queue's capacity at once to ours")
    ap.add_argument("--overload-queue", type=int, default=8, help="ours' max_queue in the overload case (default 8)")
    ap.add_argument("--overload-factor", type=int, default=25, help="requests at once, as a multiple of the capacity")
    ap.add_argument("--ours-config", default="", help="extra [server] lines for ours, ';'-separated (e.g. 'max_queue_wait_s = 5'); "
                    "'model.KEY = V' lines go to [model] (e.g. 'model.flash_attn = \"on\"')")
    ap.add_argument("--llama-server", type=Path, default=None, help="a llama-server binary to use instead of building one")
    ap.add_argument("--rounds", type=int, default=1,
                    help="repeat the whole measurement, the contenders' order reversed every other round; "
                         "the ratios are the rounds' medians (default 1)")
    ap.add_argument("--json", type=Path, default=None, help="also write every figure to this file")
    args = ap.parse_args(argv)
    llama = args.engine == "llama.cpp"
    args.workloads = args.workloads or ("short,shared-prefix,multi-turn" if llama else "short")
    args.concurrency = args.concurrency or ("1,8,16" if llama else "1,8")
    unknown = set(_csv(args.workloads)) - set(WORKLOADS)
    if unknown:
        ap.error(f"unknown workload {', '.join(sorted(unknown))}: choose from {', '.join(WORKLOADS)}")
    return args


def conversations(workload: str, clients: int, args: argparse.Namespace) -> list[Conversation]:
    if workload == "multi-turn":
        return multi_turn(max(ceil(args.min_requests / args.turns), clients), args.turns)
    return WORKLOADS[workload](max(args.min_requests, args.per_client * clients))


def contenders(args: argparse.Namespace, model: Path, tmp: Path) -> list[Contender]:
    wanted, out = _csv(args.contenders), []
    unknown = set(wanted) - {"ours", "llama-server", "peer"}
    if unknown:
        sys.exit(f"unknown contender {', '.join(sorted(unknown))}: choose from ours, llama-server, peer")
    if "llama-server" in wanted:
        binary = args.llama_server or llama_server_build.ensure()
        out.append(llama_server(binary, model, args.threads, tmp))
    if "peer" in wanted:
        why = peer_missing()
        print(f"llama_cpp.server could not run: {why}" if why else "llama_cpp.server: one sequence at a time", flush=True)
        if not why:
            out.append(peer(model, args.threads, tmp))
    if "ours" in wanted:
        out.append(ours(model, "llama.cpp", args.threads, tmp, server_extra=args.ours_config))
    return out


def measure(args: argparse.Namespace, servers: list[Contender]) -> list[Row]:
    rows: list[Row] = []
    workloads = _csv(args.workloads)
    for rnd in range(args.rounds):
        if args.rounds > 1:
            print(f"round {rnd + 1} of {args.rounds}", flush=True)
        for clients in (int(c) for c in _csv(args.concurrency)):
            for server in (servers if rnd % 2 == 0 else servers[::-1]):
                with server.start(clients, args.context) as target:
                    for workload in workloads:
                        t = time.monotonic()
                        records, seconds = serve_client.run(target, conversations(workload, clients, args), clients,
                                                            args.max_tokens, args.rate, args.seed)
                        rows.append(Row(server.name, workload, clients, summarize(records, seconds), rnd))
                        print(f"  {serve_report.line(rows[-1])}   ({time.monotonic() - t:.0f} s)", flush=True)
    return rows


def transformers_model(args: argparse.Namespace) -> Path:
    """The safetensors model: --model, or the tests' cache (SmolLM2's GGUF dequantized once by the trainer's code)."""
    model: Path = args.model or REPO / "build/test-models/smollm2-135m-safetensors"
    if args.model is None and not (model / "config.json").is_file():
        from appliance.trainer.base_model import dequantize_gguf

        print(f"converting the GGUF to safetensors once, into {model}", flush=True)
        partial = model.with_name(model.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        dequantize_gguf(smollm2_gguf(), partial)
        partial.rename(model)
    if not (model / "config.json").is_file():
        sys.exit(f"{model} is not a safetensors model directory; pass --model DIR")
    return model.resolve()


def stress(args: argparse.Namespace, servers: list[Contender], model: Path, tmp: Path) -> dict[str, object]:
    out: dict[str, object] = {}
    if args.long_prompt:
        print("long prompt among live streams (7 streams of 64 tokens; one prompt of about 2,000 tokens at a quarter of their answers):", flush=True)
        results = [serve_cases.long_prompt_case(s) for s in servers]
        for r in results:
            print("  " + r.line(), flush=True)
        out["long_prompt"] = results
    if args.overload:
        queue = args.overload_queue
        flood = ours(model, "llama.cpp", args.threads, tmp, max_queue=queue, server_extra=args.ours_config, name="ours-overload")
        result = serve_cases.overload_case(flood, max_queue=queue, factor=args.overload_factor)
        print("\n".join(result.lines()), flush=True)
        out["overload"] = result
    return out


def commit() -> str:
    def git(*a: str) -> str:
        return subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True).stdout.strip()
    return f"{git('rev-parse', '--short', 'HEAD')}{' (work tree modified)' if git('status', '--porcelain', '--untracked-files=no') else ''}"


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the servers started are stopped on the way out
    tmp = Path(tempfile.mkdtemp(prefix="serve-bench-"))
    print(f"engine={args.engine} threads={args.threads} max_tokens={args.max_tokens} greedy rate={args.rate or 'all at once'}; "
          f"commit {commit()}; cpu count {os.cpu_count()}, load average at start {os.getloadavg()[0]:.2f}; logs in {tmp}",
          flush=True)
    if args.engine == "transformers":
        servers = [ours(transformers_model(args), "transformers", args.threads, tmp, server_extra=args.ours_config)]
    else:
        model = (args.model or smollm2_gguf()).resolve()
        servers = contenders(args, model, tmp)
    started = time.monotonic()
    rows = measure(args, servers)
    print(serve_report.table(rows))
    if args.engine == "transformers":
        for w in _csv(args.workloads):
            one = next((r for r in rows if r.workload == w and r.clients == 1), None)
            for r in (r for r in rows if r.workload == w and one and r.clients > 1):
                print(f"ours {w} at {r.clients} clients / at 1 client: {r.summary.rate / one.summary.rate:.2f}")
        extra: dict[str, object] = {}
    else:
        print("\n".join(serve_report.ratio_lines(rows, "ours", "llama-server")))
        extra = stress(args, servers, model, tmp)
    print(f"load average at the end {os.getloadavg()[0]:.2f}; {time.monotonic() - started:.0f} s in all", flush=True)
    if args.json:
        serve_report.save(args.json, rows, {"args": vars(args), "commit": commit(), **extra})
    return 0


if __name__ == "__main__":
    sys.exit(main())
