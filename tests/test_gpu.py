"""Tests that need a CUDA GPU (`pytest -m gpu`; bench/gpu_session.sh runs them on a device machine).
Each skips without one. Self-contained (no conftest fixtures): a device machine has torch, transformers
and peft but not the server's packages.

NVML probe, the transformers engine in bf16 and fp16 with batching and a LoRA swap, one replica per
GPU, a bf16 training step with gradient checkpointing, llama.cpp with every layer on the GPU.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.gpu


def _cuda() -> int:
    try:
        import torch
    except ImportError:
        return 0
    return int(torch.cuda.device_count()) if torch.cuda.is_available() else 0


needs_cuda = pytest.mark.skipif(_cuda() == 0, reason="needs a CUDA GPU (torch sees none here)")


@pytest.fixture(scope="module")
def model() -> Path:
    from tests.gpu_model import model_dir

    return model_dir()[0]


def _engine(model: Path, dtype: str, gpus: tuple[int, ...] = (0,), replicas: int = 1, adapter: Any = None, max_batch: int = 8) -> Any:
    from appliance.config import ModelConfig
    from appliance.engines import load_engine
    from appliance.paths import Layout

    cfg = ModelConfig(path=str(model), backend="transformers", tier="gpu", dtype=dtype, gpus=gpus, replicas=replicas,
                      context_length=1024)
    engine = load_engine(cfg, Layout.at(Path("/")), max_batch=max_batch, max_queue=64, adapter=adapter)
    engine.start()
    return engine


def _generate_together(engine: Any, questions: list[str], max_tokens: int = 16, **params: Any) -> list[Any]:
    from appliance.engines.scheduler import Finished, SamplingParams

    done: list[threading.Event] = []
    finals: list[list[Any]] = []
    for q in questions:
        ev, got = threading.Event(), []

        def sink(e: Any, ev: threading.Event = ev, got: list[Any] = got) -> None:
            got.append(e)
            if isinstance(e, Finished):
                ev.set()

        engine.submit(engine.tokenize(engine.render_chat([{"role": "user", "content": q}])),
                      SamplingParams(max_tokens=max_tokens, temperature=0.0, **params), sink)
        done.append(ev)
        finals.append(got)
    assert all(ev.wait(120) for ev in done), "generation did not finish"
    return [got[-1] for got in finals]


@needs_cuda
def test_nvml_probe_on_a_real_gpu() -> None:
    import torch

    from appliance.gpu_metrics import read_gpus
    from installer.hardware.probe import probe

    machine = probe(Path("/"))
    assert machine.gpus and machine.driver_version and machine.cuda_driver_version
    g = machine.gpus[0]
    assert g.compute_capability == ".".join(map(str, torch.cuda.get_device_capability(0))) or g.mig_enabled
    assert g.uuid and g.uuid.startswith(("GPU-", "MIG-")) and (g.memory_total_mib or 0) > 1024
    free, total = torch.cuda.mem_get_info(0)
    reading = read_gpus([g.index])[0]
    assert reading.memory_total_bytes is not None and abs(reading.memory_total_bytes - total) <= 0.02 * total
    assert reading.utilization_pct is not None or g.mig_enabled


@needs_cuda
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_transformers_engine_batches_and_swaps_a_lora_on_the_gpu(model: Path, dtype: str, tmp_path: Path) -> None:
    import torch

    from appliance.adapters import Adapter
    from tests.gpu_model import random_lora

    if dtype == "bfloat16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    engine = _engine(model, dtype)
    try:
        backend = engine.backend
        assert str(backend.device).startswith("cuda") and backend.base.dtype == getattr(torch, dtype)
        questions = [f"Count to {i}." for i in range(8)]
        before = _generate_together(engine, questions[:2])
        together = _generate_together(engine, questions, ignore_eos=True)  # eight sequences in one batch
        assert [f.completion_tokens for f in together] == [16] * 8 and all(f.reason == "length" for f in together)
        random_lora(model, tmp_path / "lora")
        assert engine.swap_adapter(Adapter("random", tmp_path / "lora"), wait=60)
        swapped = _generate_together(engine, questions[:2])
        assert engine.adapter_id == "random" and [f.text for f in swapped] != [f.text for f in before]
        # The base model beside the adapter (same batch shape as before, so the same kernels and answers).
        base_again = _generate_together(engine, questions[:2], use_adapter=False)
        assert [f.text for f in base_again] == [f.text for f in before]
    finally:
        engine.close()


@needs_cuda
def test_one_replica_per_gpu(model: Path) -> None:
    import torch

    n = _cuda()
    engine = _engine(model, "bfloat16" if torch.cuda.is_bf16_supported() else "float16", gpus=tuple(range(n)), replicas=n)
    try:
        engines = getattr(engine, "engines", [engine])
        assert [str(e.backend.device) for e in engines] == [f"cuda:{i}" for i in range(n)]
        assert all(next(e.backend.base.parameters()).device == torch.device(f"cuda:{i}") for i, e in enumerate(engines))
        assert all(f.completion_tokens > 0 for f in _generate_together(engine, [f"Say {i}." for i in range(2 * n)]))
    finally:
        engine.close()


@needs_cuda
def test_a_bf16_training_step_with_gradient_checkpointing(model: Path) -> None:
    import json

    import torch

    from appliance.trainer.data import check_record
    from appliance.trainer.distributed import from_env, precision_for
    from appliance.trainer.modeling import load_base, new_lora
    from appliance.trainer.settings import BaseModelRef, TrainerSettings
    from appliance.trainer.train import encode, train_lora

    world = from_env((0,))
    precision = precision_for(world.device)
    assert world.device == "cuda:0" and precision.weights in ("bfloat16", "float16")
    base = load_base(BaseModelRef("smollm2", "transformers", model, (0,)), model.parent / "cache", world, precision)
    settings = TrainerSettings(batch_size=8, max_length=256, gradient_checkpointing=True, epochs=1)
    lines = (Path(__file__).resolve().parent.parent / "bundles/demo-data/train.jsonl").read_text().splitlines()
    data = [e for e in (encode(base.tokenizer, check_record(json.loads(x)), 256) for x in lines if x.strip()) if e is not None]
    lora = new_lora(base.model, settings)
    assert base.model.is_gradient_checkpointing and next(base.model.parameters()).dtype == getattr(torch, precision.weights)
    assert all(p.dtype == torch.float32 for p in lora.parameters() if p.requires_grad)  # LoRA weights stay fp32
    torch.cuda.reset_peak_memory_stats()
    r = train_lora(lora, data[:16], data[16:24], settings, base.pad_id, log=print, max_steps=2, world=world, precision=precision)
    assert r.steps == 2 and all(h["val_loss"] == h["val_loss"] for h in r.history)  # finite, not NaN
    print(f"peak GPU memory of a bf16 step with checkpointing: {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")


@needs_cuda
def test_llama_cpp_puts_every_layer_on_the_gpu(tmp_path: Path) -> None:
    try:
        from appliance.engines import cpu_backend

        cpu_backend.load()
        import llama_cpp
    except Exception as e:  # no llama-cpp-python here, or not the project's build
        pytest.skip(f"llama-cpp-python is not importable here: {e}")
    if not llama_cpp.llama_supports_gpu_offload():
        pytest.skip("this llama-cpp-python is the CPU-only build (no CUDA llama.cpp wheel at hand)")
    import os

    gguf = os.environ.get("APPLIANCE_GPU_GGUF")
    if not gguf:
        pytest.skip("no GGUF model here (APPLIANCE_GPU_GGUF)")
    from appliance.config import ModelConfig
    from appliance.engines import load_engine
    from appliance.paths import Layout

    cfg = ModelConfig(path=gguf, backend="llama.cpp", tier="gpu-small", gpu_layers=-1, context_length=1024)
    engine = load_engine(cfg, Layout.at(Path("/")), max_batch=4, max_queue=8)
    engine.start()
    try:
        assert all(f.completion_tokens > 0 for f in _generate_together(engine, ["Hello.", "Count to three."]))
    finally:
        engine.close()
