"""Per-GPU memory and utilisation through NVML (the `pynvml` module of nvidia-ml-py), for /metrics and
the trainer's free-memory check.

NVML numbers GPUs by PCI bus (its indices are [model] gpus, whatever CUDA_VISIBLE_DEVICES says). A GPU
in MIG mode answers memory per MIG instance only and no utilisation; a host without the NVIDIA driver
has no NVML: both are normal answers here (an empty list, a missing figure), never a crash.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

MIB = 1 << 20


@dataclass(frozen=True)
class GpuReading:
    index: int
    uuid: str
    name: str
    memory_used_bytes: int | None
    memory_total_bytes: int | None
    utilization_pct: float | None  # None where NVML has none (MIG mode)

    @property
    def free_mib(self) -> int | None:
        if self.memory_total_bytes is None or self.memory_used_bytes is None:
            return None
        return (self.memory_total_bytes - self.memory_used_bytes) // MIB


def _nvml() -> Any:
    try:
        import pynvml
    except ImportError:
        return None
    return pynvml


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _memory(nvml: Any, handle: Any) -> tuple[int | None, int | None]:
    """(used, total) in bytes; of the MIG instances together when the GPU itself answers NotSupported."""
    try:
        mem = nvml.nvmlDeviceGetMemoryInfo(handle)
        return int(mem.used), int(mem.total)
    except nvml.NVMLError:
        pass
    used = total = 0
    try:
        for j in range(nvml.nvmlDeviceGetMaxMigDeviceCount(handle)):
            try:
                mem = nvml.nvmlDeviceGetMemoryInfo(nvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, j))
            except nvml.NVMLError:
                continue
            used, total = used + int(mem.used), total + int(mem.total)
    except nvml.NVMLError:
        return None, None
    return (used, total) if total else (None, None)


def _reading(nvml: Any, i: int) -> GpuReading:
    h = nvml.nvmlDeviceGetHandleByIndex(i)
    used, total = _memory(nvml, h)
    try:
        util: float | None = float(nvml.nvmlDeviceGetUtilizationRates(h).gpu)
    except nvml.NVMLError:
        util = None
    try:
        uuid = _text(nvml.nvmlDeviceGetUUID(h))
    except nvml.NVMLError:
        uuid = ""
    try:
        name = _text(nvml.nvmlDeviceGetName(h))
    except nvml.NVMLError:
        name = ""
    return GpuReading(i, uuid, name, used, total, util)


def read_gpus(indices: Iterable[int] | None = None, nvml: Any = None) -> list[GpuReading]:
    """The GPUs `indices` names (NVML indices; None: every GPU), as NVML sees them now; [] without NVML."""
    nvml = nvml or _nvml()
    if nvml is None:
        return []
    try:
        nvml.nvmlInit()
    except nvml.NVMLError:
        return []
    try:
        wanted = list(range(nvml.nvmlDeviceGetCount())) if indices is None else list(indices)
        out = []
        for i in wanted:
            try:
                out.append(_reading(nvml, i))
            except nvml.NVMLError:
                continue  # a GPU that fell off the bus (or that we may not read) is left out, not fatal
        return out
    finally:
        try:
            nvml.nvmlShutdown()
        except nvml.NVMLError:
            pass


class GpuCollector:
    """A prometheus_client collector: per-GPU memory used/total and utilisation, read at each scrape."""

    def __init__(self, indices: Iterable[int] | None, nvml: Any = None) -> None:
        self.indices = None if indices is None else tuple(indices)
        self.nvml = nvml

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        labels = ["gpu", "uuid", "name"]
        used = GaugeMetricFamily("appliance_gpu_memory_used_bytes", "GPU memory in use (every process), per GPU", labels=labels)
        total = GaugeMetricFamily("appliance_gpu_memory_total_bytes", "GPU memory in total, per GPU", labels=labels)
        util = GaugeMetricFamily("appliance_gpu_utilization_percent", "share of the last sample period a kernel ran, per GPU",
                                 labels=labels)
        for g in read_gpus(self.indices, self.nvml):
            key = [str(g.index), g.uuid, g.name]
            if g.memory_used_bytes is not None and g.memory_total_bytes is not None:
                used.add_metric(key, g.memory_used_bytes)
                total.add_metric(key, g.memory_total_bytes)
            if g.utilization_pct is not None:
                util.add_metric(key, g.utilization_pct)
        yield from (used, total, util)
