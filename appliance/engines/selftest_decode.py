"""The self-test's child: load the engine as the server would and decode a real chat prompt, printing
one JSON line per stage (`cpu`, `variant`, then `done`). appliance/engines/selftest.py runs it.

    python -m appliance.engines.selftest_decode --root R --model JSON
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from appliance.config import model_config, use_devices
from appliance.cpu import this_cpu
from appliance.engines import load_engine
from appliance.engines.scheduler import SamplingParams, generate
from appliance.errors import EngineError
from appliance.paths import Layout

PROMPT = [{"role": "user", "content": "Name the capital of France in one word."}]
ANSWER_TOKENS = 8


def _emit(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


def child(root: Path, model: dict[str, Any]) -> None:
    _emit(stage="cpu", cpu=this_cpu().describe())
    cfg = model_config(model)
    use_devices(cfg)  # the GPUs the server will use, before CUDA starts
    if cfg.backend == "llama.cpp":
        from appliance.engines import cpu_backend

        _emit(stage="variant", variant=cpu_backend.load())
    t0 = time.monotonic()
    engine = load_engine(cfg, Layout.at(root), max_batch=1, max_queue=1)
    try:
        engine.start()
        prompt = engine.tokenize(engine.render_chat(PROMPT))
        done = generate(engine, prompt, SamplingParams(max_tokens=ANSWER_TOKENS, temperature=0), timeout=300)
    finally:
        engine.close()
    _emit(stage="done", prompt_tokens=len(prompt), tokens=done.completion_tokens, text=done.text,
          reason=done.reason, error=done.error, seconds=time.monotonic() - t0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m appliance.engines.selftest_decode")
    ap.add_argument("--root", type=Path, default=Path("/"))
    ap.add_argument("--model", required=True, help="the [model] settings as JSON")
    args = ap.parse_args(argv)
    try:
        child(args.root, json.loads(args.model))
    except EngineError as e:
        print(f"{e.message} {e.hint or ''}".strip(), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
