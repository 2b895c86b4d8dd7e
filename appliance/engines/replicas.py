"""Several copies of one model (one per GPU on multi-GPU tiers) behind the same interface as one Engine.

Each replica is a whole Engine with its own decode thread and batch; a request goes to the replica
with the least work (live + waiting), and adapter swaps go to all of them.
"""

from __future__ import annotations

from typing import Any

from appliance.engines.scheduler import Engine, QueueFull, SamplingParams, Sequence, Sink


class ReplicaSet:
    def __init__(self, engines: list[Engine]) -> None:
        if not engines:
            raise ValueError("a replica set needs at least one engine")
        self.engines = engines
        first = engines[0]
        self.model_id, self.backend_name, self.context_length = first.model_id, first.backend_name, first.context_length
        self.backend = first.backend

    @property
    def max_batch(self) -> int:
        return sum(e.max_batch for e in self.engines)

    @property
    def max_queue(self) -> int:
        return sum(e.max_queue for e in self.engines)

    @property
    def waiting(self) -> int:
        return sum(e.waiting for e in self.engines)

    @property
    def live(self) -> int:
        return sum(e.live for e in self.engines)

    @property
    def adapter_id(self) -> str | None:
        return self.engines[0].adapter_id

    @property
    def adapter_error(self) -> str | None:
        return next((e.adapter_error for e in self.engines if e.adapter_error), None)

    @property
    def started(self) -> bool:
        return all(e.started for e in self.engines)

    def start(self) -> None:
        for e in self.engines:
            if not e.started:
                e.start()

    def close(self) -> None:
        for e in self.engines:
            e.close()

    def tokenize(self, text: str) -> list[int]:
        return self.engines[0].tokenize(text)

    def render_chat(self, messages: list[dict[str, Any]]) -> str:
        return self.engines[0].render_chat(messages)

    def submit(self, prompt: list[int], params: SamplingParams, sink: Sink) -> Sequence:
        """To the least busy replica; QueueFull only when every replica's queue is full."""
        for e in sorted(self.engines, key=lambda e: e.live + e.waiting):
            try:
                return e.submit(prompt, params, sink)
            except QueueFull:
                continue
        raise QueueFull(f"{self.waiting} requests are already waiting on {len(self.engines)} replicas.")

    def swap_adapter(self, adapter: Any, wait: float | None = None) -> bool:
        results = [e.swap_adapter(adapter) for e in self.engines]
        if wait:
            import threading
            import time

            deadline = time.monotonic() + wait
            while time.monotonic() < deadline and any(e._pending_adapter for e in self.engines):
                threading.Event().wait(0.02)
            return not any(e._pending_adapter for e in self.engines)
        return all(results)
