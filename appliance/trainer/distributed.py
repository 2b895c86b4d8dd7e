"""Where the trainer computes: one process, or one per GPU under torchrun (data parallel), and in which
precision; and the free-memory check before it touches a GPU.

Data parallel: every rank loads the same base and the same LoRA initialisation (one seed), takes its
share of each optimizer step's examples, and the LoRA gradients are summed across ranks before the
step (each rank divides its loss by the whole step's label count, so the sum is exactly the gradient
one process would compute). NCCL on GPUs, gloo on CPUs. Rank 0 alone evaluates, registers and writes.

Precision: fp32 on the CPU; on a GPU the frozen base in bf16 with bf16 autocast, or fp16 with a
gradient scaler where the GPU has no bf16 (before Ampere). The LoRA weights stay fp32.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from appliance.errors import ApplianceError


class DeviceError(ApplianceError):
    """The GPUs the tier trains on are missing or too full: training does not start."""

    default_hint = "Train when the server is idle on a card of its own, or stop the server for the nightly window."


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    device: str = "cpu"

    @property
    def main(self) -> bool:
        return self.rank == 0

    def shard(self, items: Sequence[Any]) -> list[Any]:
        """This rank's share of one step's examples."""
        return list(items[self.rank :: self.size])

    def sum_grads(self, params: list[Any]) -> None:
        """Sum the gradients of `params` over every rank (one flat all-reduce: LoRA gradients are small)."""
        if self.size == 1:
            return
        import torch
        import torch.distributed as dist

        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        at = 0
        for p, g in zip(params, grads, strict=True):
            p.grad = flat[at : at + g.numel()].view_as(g).to(g.dtype)
            at += g.numel()

    def sum_floats(self, *values: float) -> list[float]:
        if self.size == 1:
            return list(values)
        import torch
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return [float(x) for x in t.tolist()]

    def barrier(self) -> None:
        if self.size > 1:
            import torch.distributed as dist

            dist.barrier()


def from_env(gpus: Sequence[int] = ()) -> World:
    """This process's place: torchrun's RANK, WORLD_SIZE and LOCAL_RANK (one process without them).
    `gpus` are the GPUs [model] planned; a tier with GPUs where torch sees no CUDA is refused, never run on the CPU."""
    import torch

    size, rank, local = (int(os.environ.get(k, d)) for k, d in (("WORLD_SIZE", "1"), ("RANK", "0"), ("LOCAL_RANK", "0")))
    cuda = torch.cuda.is_available()
    if gpus and not cuda:
        raise DeviceError(f"The tier trains on GPU {', '.join(map(str, gpus))}, but torch {torch.__version__} sees no CUDA "
                            "device on this host, so training does not start (it never falls back to the CPU).",
                            "Check the driver with `nvidia-smi` and the GPUs with `appliance hw`.")
    device = f"cuda:{local}" if cuda and gpus else "cpu"
    if device != "cpu":
        torch.cuda.set_device(local)
    if size > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("nccl" if device != "cpu" else "gloo", rank=rank, world_size=size)
    return World(rank, size, device)


@dataclass(frozen=True)
class Precision:
    weights: str  # dtype of the frozen base: float32 | bfloat16 | float16
    autocast: str | None  # autocast dtype, None for none
    scaler: bool  # fp16 gradients need a scaler

    @contextlib.contextmanager
    def compute(self, device: str) -> Iterator[None]:
        if self.autocast is None:
            yield
            return
        import torch

        with torch.autocast(device.split(":")[0], dtype=getattr(torch, self.autocast)):
            yield


FP32 = Precision("float32", None, False)


def precision_for(device: str) -> Precision:
    """bf16 where the GPU has it, fp16 with a scaler where not; fp32 on the CPU."""
    if device == "cpu":
        return FP32
    import torch

    if torch.cuda.is_bf16_supported():
        return Precision("bfloat16", "bfloat16", False)
    return Precision("float16", "float16", True)


def check_gpu_memory(gpus: Sequence[int], need_mib: int, nvml: Any = None) -> None:
    """Refuse to start when a planned GPU has less than `need_mib` free (the server's replica holds the rest)."""
    from appliance.gpu_metrics import read_gpus

    for g in read_gpus(gpus, nvml):
        free = g.free_mib
        if free is not None and free < need_mib:
            total = (g.memory_total_bytes or 0) / 2**30
            raise DeviceError(f"GPU {g.index} has {free / 1024:.1f} GiB free of {total:.1f} GiB (the server's replica and other "
                                 f"processes hold the rest), and training needs about {need_mib / 1024:.1f} GiB, so it does not start.")


def weights_mib(model_dir: Any, dtype: str) -> int:
    """The base's weights in `dtype`, counted from the safetensors headers (no tensor is read)."""
    import json
    import math
    import struct
    from pathlib import Path

    params = 0
    for f in Path(model_dir).glob("*.safetensors"):
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        params += sum(math.prod(t["shape"]) for k, t in header.items() if k != "__metadata__")
    return params * (4 if dtype == "float32" else 2) >> 20


def needed_gpu_mib(model_dir: Any, dtype: str) -> int:
    """What one training process holds on its GPU: the weights, a quarter more for LoRA, its Adam state and
    activations (gradient checkpointing keeps them small), and 1 GiB of CUDA context and workspace."""
    return int(weights_mib(model_dir, dtype) * 1.25) + 1024
