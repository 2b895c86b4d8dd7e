"""A stand-in for the `pynvml` module that answers from a recorded machine file.

NVML cannot exist on a machine without an NVIDIA driver, so this is the one test double of the
probe. It keeps the real module's error classes (errors are raised the way pynvml raises them,
`NVMLError(code)` mapping to the subclass) and its function names (tests check every name
exists in the real module), and encodes refusals the way real drivers give them:

- a GPU in MIG mode whose recorded memory is null answers NotSupported to memory queries;
- `faults` makes any call fail: {"nvmlInit": "LIBRARY_NOT_FOUND"}, {"nvmlDeviceGetHandleByIndex:1":
  "NO_PERMISSION"}, {"nvmlDeviceGetMemoryInfo:0/2": "NOT_SUPPORTED"} (GPU 0, MIG instance 2).
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType, SimpleNamespace
from typing import Any

import pynvml as _real

MIB = 1 << 20
# GPUs that support MIG answer (0, 0) when it is off; the rest answer NotSupported.
MIG_CAPABLE = {"0x20B010DE", "0x20B210DE", "0x20F110DE", "0x233010DE", "0x232210DE"}
API = (
    "nvmlInit", "nvmlShutdown", "nvmlSystemGetDriverVersion", "nvmlSystemGetCudaDriverVersion", "nvmlDeviceGetCount",
    "nvmlDeviceGetHandleByIndex", "nvmlDeviceGetName", "nvmlDeviceGetPciInfo", "nvmlDeviceGetMemoryInfo",
    "nvmlDeviceGetCudaComputeCapability", "nvmlDeviceGetMigMode", "nvmlDeviceGetMaxMigDeviceCount",
    "nvmlDeviceGetMigDeviceHandleByIndex", "nvmlDeviceGetUUID", "nvmlDeviceGetUtilizationRates",
)


def _target(args: tuple[Any, ...]) -> str:
    """What a call is about, for fault keys: '1' for GPU 1 (or index 1), '0/2' for MIG instance 2 of GPU 0."""
    if not args:
        return ""
    a = args[0]
    if isinstance(a, tuple):
        return f"{a[1]}/{a[2]}" if a[0] == "mig" else str(a[1])
    return str(a)


def nvml_error(code_name: str) -> _real.NVMLError:
    return _real.NVMLError(getattr(_real, f"NVML_ERROR_{code_name}"))


class FakeNvml(ModuleType):
    def __init__(self, machine: dict[str, Any], faults: dict[str, str] | None = None) -> None:
        super().__init__("pynvml")
        self.machine, self.faults = machine, dict(faults or {})
        self.calls: list[str] = []
        self.initialised = False
        for name in dir(_real):
            if name.startswith("NVMLError") or name.startswith("NVML_"):
                setattr(self, name, getattr(_real, name))
        for name in API:
            setattr(self, name, self._wrap(name, getattr(self, "_" + name)))

    def _wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any) -> Any:
            self.calls.append(name)
            if name != "nvmlInit" and not self.initialised:
                raise nvml_error("UNINITIALIZED")
            for k in (name, f"{name}:{_target(args)}"):
                if k in self.faults:
                    raise nvml_error(self.faults[k])
            return fn(*args)

        return call

    def _gpu(self, handle: tuple[Any, ...]) -> dict[str, Any]:
        return dict(self.machine["gpus"][handle[1]])

    def _mig(self, handle: tuple[Any, ...]) -> dict[str, Any]:
        return next(d for d in self._gpu(handle)["mig_devices"] if d["index"] == handle[2])

    def _nvmlInit(self) -> None:
        if self.machine["driver_version"] is None:
            raise nvml_error("LIBRARY_NOT_FOUND")  # recorded on a machine without the NVIDIA driver
        self.initialised = True

    def _nvmlShutdown(self) -> None:
        self.initialised = False

    def _nvmlSystemGetDriverVersion(self) -> str:
        return str(self.machine["driver_version"])

    def _nvmlSystemGetCudaDriverVersion(self) -> int:
        major, minor = self.machine["cuda_driver_version"].split(".")
        return int(major) * 1000 + int(minor) * 10  # NVML's encoding: 12.4 -> 12040

    def _nvmlDeviceGetCount(self) -> int:
        return len(self.machine["gpus"])

    def _nvmlDeviceGetHandleByIndex(self, i: int) -> tuple[str, int]:
        if not 0 <= i < len(self.machine["gpus"]):
            raise nvml_error("INVALID_ARGUMENT")
        return ("gpu", i)

    def _nvmlDeviceGetName(self, h: tuple[Any, ...]) -> str:
        return str(self._mig(h)["name"] if h[0] == "mig" else self._gpu(h)["name"])

    def _nvmlDeviceGetUUID(self, h: tuple[Any, ...]) -> str:
        return str((self._mig(h) if h[0] == "mig" else self._gpu(h))["uuid"])

    def _nvmlDeviceGetPciInfo(self, h: tuple[Any, ...]) -> SimpleNamespace:
        return SimpleNamespace(pciDeviceId=int(self._gpu(h)["pci_device_id"], 16), pciSubSystemId=0)

    def _nvmlDeviceGetMemoryInfo(self, h: tuple[Any, ...]) -> SimpleNamespace:
        d = self._mig(h) if h[0] == "mig" else self._gpu(h)
        if d["memory_total_mib"] is None:
            raise nvml_error("NOT_SUPPORTED")  # what a MIG-mode parent answers
        total, free = d["memory_total_mib"] * MIB, d["memory_free_mib"] * MIB
        return SimpleNamespace(total=total, free=free, used=total - free)

    def _nvmlDeviceGetUtilizationRates(self, h: tuple[Any, ...]) -> SimpleNamespace:
        if h[0] == "mig" or self._gpu(h).get("mig_enabled"):
            raise nvml_error("NOT_SUPPORTED")  # NVML has no utilisation per MIG instance
        return SimpleNamespace(gpu=int(self._gpu(h).get("utilization_pct", 0)), memory=0)

    def _nvmlDeviceGetCudaComputeCapability(self, h: tuple[Any, ...]) -> tuple[int, int]:
        major, minor = self._gpu(h)["compute_capability"].split(".")
        return int(major), int(minor)

    def _nvmlDeviceGetMigMode(self, h: tuple[Any, ...]) -> tuple[int, int]:
        g = self._gpu(h)
        if g.get("mig_enabled"):
            return (_real.NVML_DEVICE_MIG_ENABLE, _real.NVML_DEVICE_MIG_ENABLE)
        if g["pci_device_id"] not in MIG_CAPABLE:
            raise nvml_error("NOT_SUPPORTED")
        return (_real.NVML_DEVICE_MIG_DISABLE, _real.NVML_DEVICE_MIG_DISABLE)

    def _nvmlDeviceGetMaxMigDeviceCount(self, h: tuple[Any, ...]) -> int:
        return 7 if self._gpu(h).get("mig_enabled") else 0

    def _nvmlDeviceGetMigDeviceHandleByIndex(self, h: tuple[Any, ...], j: int) -> tuple[str, int, int]:
        if not any(d["index"] == j for d in self._gpu(h).get("mig_devices", [])):
            raise nvml_error("NOT_FOUND")  # an empty slot
        return ("mig", h[1], j)
