"""Inference engines: one interface (`Engine`), two backends (llama.cpp for GGUF, transformers for safetensors)."""

from __future__ import annotations

from typing import Any

from appliance.config import ModelConfig
from appliance.engines.prefix_cache import DEFAULT_PREFIX_CACHE_MIB
from appliance.engines.scheduler import DEFAULT_PREFILL_CHUNK, Engine, Finished, QueueFull, SamplingParams
from appliance.errors import EngineError
from appliance.paths import Layout

__all__ = ["Engine", "Finished", "QueueFull", "SamplingParams", "load_engine"]


def load_engine(model: ModelConfig, layout: Layout, *, max_batch: int, max_queue: int, adapter: Any = None,
                devices: list[str] | None = None, prefix_cache_mib: int = DEFAULT_PREFIX_CACHE_MIB, **scheduling: Any) -> Any:
    """Load the configured model with `adapter` (an appliance.adapters.Adapter or None) applied; not started.
    `scheduling` goes to each Engine as it is: max_queue_wait_s, prefill_chunk, prefill_share ([server] settings);
    `prefix_cache_mib` ([server]) to each backend.

    With [model] replicas > 1 (transformers on multi-GPU tiers) this is a ReplicaSet: one engine
    per device, the same interface.

    Loading runs on a thread of its own that ends before this returns. Both backends compute with
    OpenMP, and libgomp keeps a team of workers for every thread that ever ran a parallel region;
    with more of those than cores it stops letting idle workers spin, and each decode step on the
    engine's thread then waited on sleeping workers (about 2.5x slower, bench/RESULTS.md). A thread
    that ends takes its team with it.
    """
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1, thread_name_prefix="engine-load") as pool:
        return pool.submit(_load, model, layout, max_batch=max_batch, max_queue=max_queue, adapter=adapter, devices=devices,
                           prefix_cache_mib=prefix_cache_mib, **scheduling).result()


def _load(model: ModelConfig, layout: Layout, *, max_batch: int, max_queue: int, adapter: Any, devices: list[str] | None,
          prefix_cache_mib: int, **scheduling: Any) -> Any:
    if model.replicas > 1 and model.backend != "transformers":
        raise EngineError(f"[model] replicas = {model.replicas} needs the transformers backend, not {model.backend}.",
                          "Set replicas = 1 for llama.cpp tiers.")
    placed: list[str | None] = [None]
    if model.backend == "transformers":
        from appliance.engines.replicas import replica_devices

        placed = list(devices) if devices else replica_devices(model)  # the plan's GPUs; refuses without CUDA
    elif model.gpu_layers != 0:
        from appliance.engines.cpu_backend import require_gpu_offload

        require_gpu_offload(model.tier, model.gpu_layers)
    if len(placed) > 1:
        from appliance.engines.replicas import ReplicaSet

        return ReplicaSet([_load_one(model, layout, max_batch=max_batch, max_queue=max_queue, adapter=adapter, device=d,
                                     prefix_cache_mib=prefix_cache_mib, **scheduling) for d in placed], placed)
    return _load_one(model, layout, max_batch=max_batch, max_queue=max_queue, adapter=adapter, device=placed[0],
                     prefix_cache_mib=prefix_cache_mib, **scheduling)


def _load_one(model: ModelConfig, layout: Layout, *, max_batch: int, max_queue: int, adapter: Any, device: str | None,
              prefix_cache_mib: int, **scheduling: Any) -> Engine:
    path = model.resolve_path(layout)
    if not path.exists():
        raise EngineError(f"The model {path} does not exist.", "Install a bundle (`appliance install`) or fix [model] path.")
    if model.backend == "llama.cpp":
        from appliance.engines.llama_cpp_engine import LlamaCppBackend

        if not path.is_file():
            raise EngineError(f"The llama.cpp backend needs a GGUF file, and {path} is not a file.")
        # Sub-batches as long as a prefill chunk: a prompt is cut the same way chunked or whole, so greedy
        # answers do not depend on how busy the engine was when it arrived (unless prefill_share makes
        # the chunks beside streaming answers shorter).
        chunk = scheduling.get("prefill_chunk", DEFAULT_PREFILL_CHUNK)
        backend: Any = LlamaCppBackend(path, context_length=model.context_length, max_batch=max_batch,
                                       threads=model.threads, gpu_layers=model.gpu_layers, ubatch=chunk if chunk > 0 else 512,
                                       prefix_cache_mib=prefix_cache_mib, flash_attn=model.flash_attn)
    elif model.backend == "transformers":
        from appliance.engines.transformers_engine import TransformersBackend

        backend = TransformersBackend(path, context_length=model.context_length, dtype=model.dtype, threads=model.threads,
                                      device=device, prefix_cache_mib=prefix_cache_mib)
    else:
        raise EngineError(f"The backend {model.backend!r} is not known.", "Use llama.cpp or transformers in [model] backend.")
    adapter_id, adapter_error = None, None
    if adapter is not None:
        # A broken adapter must not keep the API down: serve the base model and say why.
        try:
            backend.apply_adapter(adapter)
            adapter_id = adapter.id
        except EngineError as e:
            adapter_error = f"{adapter.id}: {e.message}"
    engine = Engine(backend, model_id=model.id, context_length=model.context_length, max_batch=max_batch,
                    max_queue=max_queue, adapter_id=adapter_id, backend_name=model.backend, **scheduling)
    engine.adapter_error = adapter_error
    return engine
