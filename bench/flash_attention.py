"""llama.cpp's flash attention against its plain attention on this CPU ([model] flash_attn on / off).

    .venv/bin/python bench/flash_attention.py [--threads 2] [--cases 1x50,1x1500,8x100,8x1500] [--rounds 12]

One process, one context per setting, as the engine makes them (one KV stream per sequence, 2,048
cells each). Each case `SxC` fills S sequences with C-token prompts (timed: the prefill), then times
decode steps of one token for each of the S sequences, alternating the two contexts round by round
(8 steps a round, the cells rolled back after) so that both see the same machine. Prints the median
and best ms per step and prefill ms per prompt for each setting, and the ratio off / on; the last
line is `decode_off_over_on 1x50=<r> ...` (below 1: off is faster).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.serve_contenders import smollm2_gguf  # noqa: E402

SLOT = 2048
STEPS = 8


def context(L: Any, model: Any, seqs: int, threads: int, setting: str) -> Any:
    from appliance.engines.llama_cpp_engine import flash_attn_type

    cp = L.llama_context_default_params()
    cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_seq_max = SLOT * seqs, SLOT + seqs, 512, seqs
    cp.n_threads = cp.n_threads_batch = threads
    cp.kv_unified = False
    cp.flash_attn_type = flash_attn_type(L, setting)
    return L.llama_init_from_model(model, cp)


def decode(L: Any, ctx: Any, batch: Any, rows: list[tuple[int, int, int]]) -> None:
    """One llama_decode of (token, position, sequence) rows, the logits of each row asked for."""
    for i, (tok, pos, seq) in enumerate(rows):
        batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = tok, pos, 1, True
        batch.seq_id[i][0] = seq
    batch.n_tokens = len(rows)
    if L.llama_decode(ctx, batch) != 0:
        raise RuntimeError("llama_decode failed")


def case(L: Any, model: Any, seqs: int, length: int, threads: int, rounds: int) -> dict[str, dict[str, float]]:
    prompt = [(i * 7919) % 40000 + 100 for i in range(length)]  # fixed, varied tokens
    batch = L.llama_batch_init(SLOT + seqs, 0, 1)
    out: dict[str, dict[str, Any]] = {}
    try:
        for setting in ("on", "off"):
            ctx = context(L, model, seqs, threads, setting)
            t0 = time.perf_counter()
            for s in range(seqs):
                decode(L, ctx, batch, [(t, i, s) for i, t in enumerate(prompt)])
            out[setting] = {"ctx": ctx, "prefill_ms": (time.perf_counter() - t0) * 1000 / seqs, "steps": []}
        for _ in range(rounds):
            for setting in ("on", "off"):
                ctx = out[setting]["ctx"]
                t0 = time.perf_counter()
                for k in range(STEPS):
                    decode(L, ctx, batch, [(200 + k, length + k, s) for s in range(seqs)])
                out[setting]["steps"].append((time.perf_counter() - t0) * 1000 / STEPS)
                mem = L.llama_get_memory(ctx)
                for s in range(seqs):
                    L.llama_memory_seq_rm(mem, s, length, -1)
    finally:
        L.llama_batch_free(batch)
        for v in out.values():
            L.llama_free(v["ctx"])
    return {k: {"median": statistics.median(v["steps"]), "best": min(v["steps"]), "prefill_ms": v["prefill_ms"]}
            for k, v in out.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cases", default="1x50,1x400,1x1500,8x100,8x1500", help="SEQUENCESxCONTEXT, comma-separated")
    ap.add_argument("--rounds", type=int, default=12)
    args = ap.parse_args(argv)
    from appliance.engines import cpu_backend

    variant = cpu_backend.load()
    import llama_cpp as L
    from llama_cpp import _logger

    _logger.set_verbose(False)
    L.llama_backend_init()
    model = L.llama_model_load_from_file(str(smollm2_gguf()).encode(), L.llama_model_default_params())
    print(f"SmolLM2-135M-Instruct Q4_1, CPU variant {variant}, {args.threads} threads, {args.rounds} rounds of {STEPS} steps")
    print(f"{'case':>8} {'setting':>7} {'step ms median':>15} {'best':>6} {'prefill ms/prompt':>18}")
    ratios = []
    for spec in args.cases.split(","):
        seqs, length = (int(x) for x in spec.lower().split("x"))
        r = case(L, model, seqs, length, args.threads, args.rounds)
        for setting in ("on", "off"):
            v = r[setting]
            print(f"{spec:>8} {setting:>7} {v['median']:>15.2f} {v['best']:>6.2f} {v['prefill_ms']:>18.0f}", flush=True)
        ratios.append(f"{spec}={r['off']['median'] / r['on']['median']:.2f}")
        print(f"{'':>8} off/on  decode {r['off']['median'] / r['on']['median']:.2f}  prefill "
              f"{r['off']['prefill_ms'] / r['on']['prefill_ms']:.2f}", flush=True)
    L.llama_model_free(model)
    print("decode_off_over_on " + " ".join(ratios))
    return 0


if __name__ == "__main__":
    sys.exit(main())
