"""Several copies of one model (one per GPU on multi-GPU tiers) behind the same interface as one Engine.

Each replica is a whole Engine with its own decode thread and batch, pinned to one device; a request
goes to the replica with the least work (live + waiting), and adapter swaps go to all of them.

Where they run is the plan's: [model] gpus are the GPUs the installer chose and CUDA_VISIBLE_DEVICES
names exactly those (their UUIDs), so CUDA numbers them 0..n-1 in the plan's order. A tier with GPUs
on a host where torch sees no CUDA device refuses to start: it never falls back to the CPU.
"""

from __future__ import annotations

from typing import Any

from appliance.config import ModelConfig
from appliance.engines.scheduler import Engine, QueueFull, SamplingParams, Sequence, Sink
from appliance.errors import EngineError


def require_cuda(model: ModelConfig) -> int:
    """How many CUDA devices torch sees; a GPU tier on a host where it sees none is refused."""
    import torch

    if torch.cuda.is_available():
        return int(torch.cuda.device_count())
    build = f"torch {torch.__version__}" + (" (a CPU-only build)" if torch.version.cuda is None else "")
    raise EngineError(f"The tier {model.tier} runs on GPU {', '.join(map(str, model.gpus)) or 'devices'}, but {build} sees no CUDA "
                      "device on this host, so the server will not start (it never falls back to the CPU).",
                      "Check the driver with `nvidia-smi` and the GPUs with `appliance hw`, or install the bundle's cpu tier "
                      "(`appliance install DIR --tier cpu`).")


def replica_devices(model: ModelConfig) -> list[str | None]:
    """The device each transformers replica is pinned to: CUDA's ordinals of the planned GPUs, replicas
    dealt round the GPUs; [None] (the CPU) for a tier without GPUs."""
    if not model.gpus:
        if model.replicas > 1:  # replicas without a plan's GPUs: every GPU CUDA sees
            import torch

            found = torch.cuda.device_count() if torch.cuda.is_available() else 0
            if found < model.replicas:
                raise EngineError(f"[model] replicas = {model.replicas} needs {model.replicas} GPUs, and {found} are visible.",
                                  "Lower replicas in appliance.toml, or check the GPUs with `appliance hw`.")
            return [f"cuda:{i}" for i in range(model.replicas)]
        return [None]
    found = require_cuda(model)
    if found < len(model.gpus):
        raise EngineError(f"The tier {model.tier} was planned for {len(model.gpus)} GPUs (NVML {', '.join(map(str, model.gpus))}), "
                          f"and CUDA sees {found} (CUDA_VISIBLE_DEVICES={model.cuda_visible_devices!r}).",
                          "Run `appliance hw` to see the GPUs now, and reinstall (`appliance install DIR`) to plan again.")
    return [f"cuda:{i % len(model.gpus)}" for i in range(max(model.replicas, 1))]


class ReplicaSet:
    def __init__(self, engines: list[Engine], devices: list[str | None] | None = None) -> None:
        if not engines:
            raise ValueError("a replica set needs at least one engine")
        self.engines = engines
        self.devices = devices or [None] * len(engines)  # each replica's device, for /metrics and tests
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
        """To the least busy replica; QueueFull only when every replica refuses, with the soonest Retry-After of theirs."""
        refusals: list[QueueFull] = []
        for e in sorted(self.engines, key=lambda e: e.live + e.waiting):
            try:
                return e.submit(prompt, params, sink)
            except QueueFull as refused:
                refusals.append(refused)
        soonest = min(refusals, key=lambda r: r.retry_after if r.retry_after is not None else float("inf"))
        raise QueueFull(f"Each of the {len(self.engines)} replicas refused: {soonest.message}", soonest.retry_after, soonest.code)

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
