"""GPU figures in one run: single-stream against 16 concurrent streams on the transformers engine, and
the time per LoRA training step (bf16, gradient checkpointing on and off).

Decode: the server's engine (appliance.engines, the plan's placement: [model] gpus = (0,)) on
SmolLM2-135M, greedy, `--tokens` answer tokens each with end-of-sequence ignored, so every stream
decodes the same count; one stream alone, then 16 submitted together (one batch). Compass goal:
16 streams >= 8x one. Training: the appliance's loop (appliance.trainer.train) on the demo data,
`--steps` optimizer steps of `--batch` examples of at most `--max-length` tokens after one warm-up step.

    python3 bench/gpu.py [--tokens 128] [--streams 16] [--steps 10] [--json FILE]

Last line: `ratio=<16-stream tok/s / 1-stream tok/s> step_s=<seconds per training step>`.
Without CUDA it refuses in one sentence.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _streams(engine: Any, n: int, tokens: int) -> float:
    """Answer tokens per second of `n` streams submitted together."""
    from appliance.engines.scheduler import Finished, SamplingParams

    done = [threading.Event() for _ in range(n)]
    counts = [0] * n
    prompt = engine.tokenize(engine.render_chat([{"role": "user", "content": "Write a long story about a lighthouse."}]))

    def sink_for(i: int) -> Any:
        def sink(ev: Any) -> None:
            if isinstance(ev, Finished):
                counts[i] = ev.completion_tokens
                done[i].set()
        return sink

    t0 = time.perf_counter()
    for i in range(n):
        engine.submit(prompt, SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True), sink_for(i))
    for d in done:
        if not d.wait(600):
            raise SystemExit("a stream did not finish within 10 minutes")
    return sum(counts) / (time.perf_counter() - t0)


def decode(model: Path, dtype: str, streams: int, tokens: int) -> dict[str, float]:
    from appliance.config import ModelConfig
    from appliance.engines import load_engine
    from appliance.paths import Layout

    cfg = ModelConfig(path=str(model), backend="transformers", tier="gpu", dtype=dtype, gpus=(0,), context_length=2048)
    engine = load_engine(cfg, Layout.at(Path("/")), max_batch=streams, max_queue=streams)
    engine.start()
    try:
        _streams(engine, 1, 16)  # warm-up: CUDA kernels, the shared prefix's cache
        one = _streams(engine, 1, tokens)
        many = _streams(engine, streams, tokens)
    finally:
        engine.close()
    return {"one_stream_tok_s": one, f"{streams}_streams_tok_s": many, "ratio": many / one}


def train_steps(model: Path, steps: int, batch: int, max_length: int, checkpointing: bool) -> dict[str, float]:
    import torch

    from appliance.trainer.data import check_record
    from appliance.trainer.distributed import from_env, precision_for
    from appliance.trainer.modeling import load_base, new_lora
    from appliance.trainer.settings import BaseModelRef, TrainerSettings
    from appliance.trainer.train import encode, train_lora

    world = from_env((0,))
    precision = precision_for(world.device)
    base = load_base(BaseModelRef("smollm2", "transformers", model, (0,)), REPO / ".gpu" / "cache", world, precision)
    settings = TrainerSettings(batch_size=batch, max_length=max_length, gradient_checkpointing=checkpointing, epochs=1000, patience=1000,
                               lora_targets=["q_proj", "k_proj", "v_proj", "o_proj"], lora_rank=16, lora_alpha=32)
    lines = [json.loads(x) for x in (REPO / "bundles/demo-data/train.jsonl").read_text().splitlines() if x.strip()]
    data = [e for e in (encode(base.tokenizer, check_record(x), max_length) for x in lines) if e is not None]
    lora = new_lora(base.model, settings)
    quiet = dict(log=lambda _m: None, world=world, precision=precision)
    train_lora(lora, data, [], settings, base.pad_id, max_steps=1, **quiet)  # type: ignore[arg-type]  # warm-up
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    r = train_lora(lora, data, [], settings, base.pad_id, max_steps=steps, **quiet)  # type: ignore[arg-type]
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    return {"step_s": seconds / r.steps, "tok_s": r.trained_tokens / seconds, "peak_mib": torch.cuda.max_memory_allocated() / 2**20,
            "precision": precision.weights}  # type: ignore[dict-item]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--streams", type=int, default=16)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    import torch

    if not torch.cuda.is_available():
        print(f"bench/gpu.py needs a CUDA GPU, and torch {torch.__version__} sees none on this host.", file=sys.stderr)
        return 2
    from tests.gpu_model import model_dir

    model, real = model_dir()
    device = torch.cuda.get_device_name(0)
    dtype = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    print(f"device: {device}; model: SmolLM2-135M ({'real' if real else 'random'} weights, {dtype}); torch {torch.__version__}")
    d = decode(model, dtype, args.streams, args.tokens)
    print(f"| streams | tok/s |\n|---|---|\n| 1 | {d['one_stream_tok_s']:.1f} |\n| {args.streams} | {d[f'{args.streams}_streams_tok_s']:.1f} |")
    figures: dict[str, Any] = {"device": device, "real_weights": real, "dtype": dtype, "decode": d, "train": {}}
    print("| training step | s/step | tok/s | peak MiB |\n|---|---|---|---|")
    for ckpt in (False, True):
        t = figures["train"]["checkpointing" if ckpt else "plain"] = train_steps(model, args.steps, args.batch, args.max_length, ckpt)
        print(f"| batch {args.batch} x {args.max_length}, checkpointing {'on' if ckpt else 'off'} | {t['step_s']:.3f} | "
              f"{t['tok_s']:.0f} | {t['peak_mib']:.0f} |")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    print(f"ratio={d['ratio']:.2f} step_s={figures['train']['checkpointing']['step_s']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
