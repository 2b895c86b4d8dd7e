"""A tiny scripted model behind the real scheduler, for the API tests of auth, shapes and limits.

Only the model is scripted: `appliance.engines.scheduler.Engine` (batching, queueing, stop strings,
cancellation, adapter swaps between batches) and everything above it are the real code. Tokens are
characters; every answer is REPLY, one character a step, then the end token; a prompt is prefilled
`chunk` characters a step, as the scheduler plans (chunked prefill). What the real engines
do with a prompt is tested once per engine (tests/test_engine_*.py, tests/test_server_openai.py).
"""

from __future__ import annotations

from typing import Any

from appliance.config import Config
from appliance.engines.scheduler import Engine, Sequence

REPLY = "Hello from the scripted model."
END = 0


class ScriptedBackend:
    def __init__(self) -> None:
        self.adapter: Any = None
        self.steps: list[tuple[int, int]] = []  # (admitted, live) of each step
        self.answered: list[list[Sequence]] = []  # the sequences that got a token, per step

    def tokenize(self, text: str) -> list[int]:
        return [ord(c) for c in text if ord(c) != END]

    def render_chat(self, messages: list[dict[str, Any]]) -> str:
        return "".join(f"<{m['role']}>{m.get('content') or ''}\n" for m in messages) + "<assistant>"

    def claim(self, seq: Sequence, free: list[int]) -> int:
        return free[-1]

    def step(self, admit: list[Sequence], live: list[Sequence]) -> list[int | None]:
        self.steps.append((len(admit), len(live)))
        for s in admit:
            s.prefilled = min(len(s.prompt), s.prefilled + s.chunk)
        out: list[int | None] = []
        for s in [*live, *admit]:
            i = len(s.generated)
            if s.prefilled < len(s.prompt):
                out.append(None)
            else:
                out.append(ord(REPLY[i % len(REPLY)]) if i < len(REPLY) or s.params.ignore_eos else END)
        self.answered.append([s for s, t in zip([*live, *admit], out, strict=True) if t is not None])
        return out

    def release(self, seq: Sequence) -> None:
        pass

    def detokenize(self, tokens: list[int]) -> str:
        return "".join(chr(t) for t in tokens)

    def is_end(self, token: int) -> bool:
        return token == END

    def apply_adapter(self, adapter: Any) -> None:
        """Refuses what llama.cpp refuses first: an adapter.gguf that is not a GGUF file."""
        if adapter is not None and (adapter.gguf_path is None or adapter.gguf_path.read_bytes()[:4] != b"GGUF"):
            raise ValueError(f"{adapter.dir / 'adapter.gguf'} is not a GGUF LoRA adapter")
        self.adapter = adapter

    def prefill_budget(self) -> int:
        return 4096

    def close(self) -> None:
        pass


def scripted_engine(config: Config) -> Engine:
    """An engine with the limits of `config`, as appliance.engines.load_engine would build it."""
    return Engine(ScriptedBackend(), model_id=config.model.id, context_length=config.model.context_length,
                  max_batch=config.server.max_batch, max_queue=config.server.max_queue, backend_name="scripted")
