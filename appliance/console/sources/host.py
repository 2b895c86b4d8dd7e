"""CPU and RAM through psutil, and per GPU utilisation, memory and temperature through NVML.

No NVML library (a CPU machine, a container) is a normal case: the sample simply has no GPUs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class GpuSample:
    index: int
    name: str
    util_pct: float | None
    mem_used_mib: float | None
    mem_total_mib: float | None
    temp_c: float | None


@dataclass(frozen=True)
class HostSample:
    cpu_pct: float
    ram_used_mib: float
    ram_total_mib: float
    gpus: tuple[GpuSample, ...] = ()
    note: str = ""

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> HostSample:
        return cls(d["cpu_pct"], d["ram_used_mib"], d["ram_total_mib"],
                   tuple(GpuSample(**g) for g in d.get("gpus", [])), d.get("note", ""))


@dataclass
class HostSampler:
    """Keeps NVML initialised between samples: nvmlInit costs far more than a query."""

    _nvml: Any = None
    _handles: list[Any] = field(default_factory=list)
    _note: str = ""
    _tried: bool = False

    def _init_nvml(self) -> None:
        self._tried = True
        try:
            import pynvml

            pynvml.nvmlInit()
            self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
            self._nvml = pynvml
        except Exception as e:  # ImportError, NVMLError_LibraryNotFound, NoPermission ...: all mean "no GPU figures"
            self._note = f"no GPU figures: NVML unavailable ({type(e).__name__})"

    def _gpu(self, i: int, h: Any) -> GpuSample:
        n = self._nvml

        def ask(fn: str, *args: Any) -> Any:
            try:
                return getattr(n, fn)(h, *args)
            except Exception:
                return None

        name = ask("nvmlDeviceGetName")
        util, mem = ask("nvmlDeviceGetUtilizationRates"), ask("nvmlDeviceGetMemoryInfo")
        temp = ask("nvmlDeviceGetTemperature", getattr(n, "NVML_TEMPERATURE_GPU", 0))
        return GpuSample(i, name.decode() if isinstance(name, bytes) else str(name or f"GPU {i}"),
                         None if util is None else float(util.gpu),
                         None if mem is None else mem.used / 2**20, None if mem is None else mem.total / 2**20,
                         None if temp is None else float(temp))

    def sample(self) -> HostSample:
        import psutil

        if not self._tried:
            self._init_nvml()
        vm = psutil.virtual_memory()
        gpus = tuple(self._gpu(i, h) for i, h in enumerate(self._handles)) if self._nvml else ()
        return HostSample(psutil.cpu_percent(interval=None), (vm.total - vm.available) / 2**20, vm.total / 2**20, gpus, self._note)
