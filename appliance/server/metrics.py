"""Prometheus metrics, in a registry per app (no module globals, so tests can build many apps)."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class _ReusedPrefixTokens:
    """appliance_prefix_reused_tokens_total, read from the engine (or each replica) when scraped."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    def collect(self) -> Any:
        from prometheus_client.core import CounterMetricFamily

        engines = getattr(self.engine, "engines", [self.engine])
        yield CounterMetricFamily("appliance_prefix_reused_tokens", "prompt tokens taken from cached prefixes instead of being prefilled",
                                  value=sum(getattr(e, "prefix_reused_tokens", 0) for e in engines))


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("appliance_requests", "HTTP requests by route and status", ["route", "status"], registry=r)
        self.latency = Histogram("appliance_request_latency_seconds", "time from request to last byte", ["route"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("appliance_time_to_first_token_seconds", "time from request to first answer text",
                              buckets=TTFT_BUCKETS, registry=r)
        self.rejected = Counter("appliance_rejected_requests", "requests refused before any work (unauthenticated, unknown path, rate_limited), by reason",
                                ["reason"], registry=r)
        self.overloaded = Counter("appliance_overload_refusals", "generation requests the engine refused with 429, by reason: "
                                  "queue_full (max_queue waiting) or queue_wait (expected wait over max_queue_wait_s)",
                                  ["reason"], registry=r)
        for reason in ("queue_full", "queue_wait"):
            self.overloaded.labels(reason)  # both series from the start, at 0
        self.tokens_in = Counter("appliance_prompt_tokens", "prompt tokens accepted", registry=r)
        self.tokens_out = Counter("appliance_completion_tokens", "answer tokens generated", registry=r)
        self.queue_depth = Gauge("appliance_queue_depth", "requests waiting for a slot", registry=r)
        self.active = Gauge("appliance_active_sequences", "sequences being decoded", registry=r)
        self.adapter = Gauge("appliance_adapter_info", "the LoRA adapter in use (1 for the current one)", ["adapter"], registry=r)
        self._adapter_shown: str | None = None
        # /v1/embeddings (its requests and latency are in the two per-route series above)
        self.embed_batches = Counter("appliance_embedding_batches", "batches the embedding model ran; concurrent requests share one",
                                     registry=r)
        self.embed_inputs = Counter("appliance_embedding_inputs", "inputs embedded", registry=r)
        self.embed_tokens = Counter("appliance_embedding_tokens", "tokens of the inputs embedded", registry=r)
        self.embed_batch_inputs = Histogram("appliance_embedding_batch_inputs", "inputs per embedding batch",
                                            buckets=BATCH_BUCKETS, registry=r)
        self.embed_queue = Gauge("appliance_embedding_queue_depth", "inputs waiting for an embedding batch", registry=r)

    def bind_engine(self, engine: Any) -> None:
        """Read queue depth, live sequences and reused prompt tokens from the engine when scraped."""
        self.queue_depth.set_function(lambda: engine.waiting)
        self.active.set_function(lambda: engine.live)
        self.registry.register(_ReusedPrefixTokens(engine))  # type: ignore[arg-type]

    def bind_embedder(self, embedder: Any) -> None:
        self.embed_queue.set_function(lambda: embedder.waiting)

    def embedded(self, inputs: int, tokens: int) -> None:
        """One embedding batch ran (called on the embedder's thread; prometheus_client is thread-safe)."""
        self.embed_batches.inc()
        self.embed_inputs.inc(inputs)
        self.embed_tokens.inc(tokens)
        self.embed_batch_inputs.observe(inputs)

    def bind_gpus(self, indices: tuple[int, ...], nvml: Any = None) -> None:
        """Per-GPU memory used/total and utilisation through NVML, read at each scrape (appliance.gpu_metrics)."""
        from appliance.gpu_metrics import GpuCollector

        self.registry.register(GpuCollector(indices, nvml))  # type: ignore[arg-type]

    def show_adapter(self, adapter_id: str | None) -> None:
        label = adapter_id or "base"
        if label != self._adapter_shown:
            if self._adapter_shown is not None:
                self.adapter.remove(self._adapter_shown)
            self.adapter.labels(label).set(1)
            self._adapter_shown = label

    def render(self) -> bytes:
        return generate_latest(self.registry)
