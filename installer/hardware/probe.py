"""The hardware probe: GPUs through NVML (`pynvml` from nvidia-ml-py), CPU, RAM and disk through psutil.

No NVML library, no driver or no GPU is the CPU case, not an error. A query NVML refuses
(no permission, not supported on a MIG-mode GPU) leaves that value null and adds a note that
says what happened and what to do, so the answer is still usable.
"""

from __future__ import annotations

import platform
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import psutil

from appliance.cpu import this_cpu
from installer.hardware.machine import MIB, Cpu, Gpu, Machine, MigDevice


def _error_name(e: Exception) -> str:
    """'NVMLError_NoPermission' -> 'no permission'; NVML's own text for the rest."""
    name = type(e).__name__.removeprefix("NVMLError_")
    if name and name != "NVMLError":
        return "".join(" " + c.lower() if c.isupper() else c for c in name).strip()
    return str(e)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class _Nvml:
    """Ask NVML; a refused query becomes None plus a note, never an exception."""

    def __init__(self, nvml: ModuleType, notes: list[str]) -> None:
        self.nvml, self.notes = nvml, notes

    def ask(self, what: str, fn: str, *args: Any, absent: str | None = None) -> Any:
        """`absent` names an NVMLError subclass that means "no such thing" rather than a failure."""
        try:
            return getattr(self.nvml, fn)(*args)
        except self.nvml.NVMLError as e:
            if absent and isinstance(e, getattr(self.nvml, absent)):
                return None
            hint = ""
            if isinstance(e, getattr(self.nvml, "NVMLError_NoPermission", ())):
                hint = " (run `appliance hw` as root, or as a member of the group that owns /dev/nvidia*)"
            self.notes.append(f"NVML could not report {what}: {_error_name(e)}{hint}.")
            return None


def _memory(q: _Nvml, handle: Any, what: str) -> tuple[int | None, int | None]:
    info = q.ask(f"the memory of {what}", "nvmlDeviceGetMemoryInfo", handle)
    if info is None:
        return None, None
    return int(info.total) // MIB, int(info.free) // MIB


def _mig_devices(q: _Nvml, handle: Any, index: int) -> tuple[MigDevice, ...]:
    count = q.ask(f"the MIG instances of GPU {index}", "nvmlDeviceGetMaxMigDeviceCount", handle) or 0
    devices = []
    for j in range(count):
        # NotFound is an empty slot: no instance was created there.
        mig = q.ask(f"MIG instance {j} of GPU {index}", "nvmlDeviceGetMigDeviceHandleByIndex", handle, j, absent="NVMLError_NotFound")
        if mig is None:
            continue
        name = q.ask(f"the name of MIG instance {j} of GPU {index}", "nvmlDeviceGetName", mig)
        uuid = q.ask(f"the UUID of MIG instance {j} of GPU {index}", "nvmlDeviceGetUUID", mig)
        total, free = _memory(q, mig, f"MIG instance {j} of GPU {index}")
        devices.append(MigDevice(j, None if name is None else _text(name), total, free, None if uuid is None else _text(uuid)))
    return tuple(devices)


def _gpu(q: _Nvml, index: int) -> Gpu:
    handle = q.ask(f"GPU {index}", "nvmlDeviceGetHandleByIndex", index)
    if handle is None:
        return Gpu(index, None, None, None, None, None)
    name = q.ask(f"the name of GPU {index}", "nvmlDeviceGetName", handle)
    pci = q.ask(f"the PCI id of GPU {index}", "nvmlDeviceGetPciInfo", handle)
    uuid = q.ask(f"the UUID of GPU {index}", "nvmlDeviceGetUUID", handle)
    cc = q.ask(f"the compute capability of GPU {index}", "nvmlDeviceGetCudaComputeCapability", handle)
    # GPUs without MIG support answer NotSupported: that is "MIG off", not worth a note.
    mig_mode = q.ask(f"the MIG mode of GPU {index}", "nvmlDeviceGetMigMode", handle, absent="NVMLError_NotSupported")
    mig = bool(mig_mode and mig_mode[0] == q.nvml.NVML_DEVICE_MIG_ENABLE)
    total, free = _memory(q, handle, f"GPU {index}")
    devices: tuple[MigDevice, ...] = ()
    if mig:
        devices = _mig_devices(q, handle, index)
        q.notes.append(f"GPU {index} is in MIG mode with {len(devices)} instance(s); the appliance runs on one instance of it.")
    return Gpu(
        index=index,
        name=None if name is None else _text(name),
        pci_device_id=None if pci is None else f"0x{int(pci.pciDeviceId) & 0xFFFFFFFF:08X}",
        memory_total_mib=total, memory_free_mib=free,
        compute_capability=None if cc is None else f"{cc[0]}.{cc[1]}",
        mig_enabled=mig, mig_devices=devices, uuid=None if uuid is None else _text(uuid),
    )


def probe_gpus(nvml: ModuleType | None = None) -> tuple[tuple[Gpu, ...], str | None, str | None, list[str]]:
    """GPUs, driver version, CUDA version the driver supports, and notes; no NVML gives no GPUs."""
    notes: list[str] = []
    if nvml is None:
        try:
            import pynvml
        except ImportError:
            return (), None, None, ["The nvidia-ml-py package is not installed, so no GPU can be seen; planning for CPU only."]
        nvml = pynvml
    try:
        nvml.nvmlInit()
    except nvml.NVMLError_LibraryNotFound:
        return (), None, None, ["No NVIDIA driver library (libnvidia-ml.so) is installed: no GPU; planning for CPU only."]
    except nvml.NVMLError_DriverNotLoaded:
        return (), None, None, ["The NVIDIA driver library is installed but the kernel driver is not loaded: no GPU usable; planning for CPU only."]
    except nvml.NVMLError as e:
        hint = " (run `appliance hw` as root to see the GPUs)" if isinstance(e, nvml.NVMLError_NoPermission) else ""
        return (), None, None, [f"NVML did not start: {_error_name(e)}{hint}; planning for CPU only."]
    try:
        q = _Nvml(nvml, notes)
        driver = q.ask("the driver version", "nvmlSystemGetDriverVersion")
        cuda = q.ask("the CUDA version of the driver", "nvmlSystemGetCudaDriverVersion")
        count = q.ask("the number of GPUs", "nvmlDeviceGetCount") or 0
        gpus = tuple(_gpu(q, i) for i in range(count))
    finally:
        try:
            nvml.nvmlShutdown()
        except nvml.NVMLError:
            pass
    if not gpus:
        notes.append("The NVIDIA driver is loaded but reports no GPU; planning for CPU only.")
    cuda_text = None if cuda is None else f"{int(cuda) // 1000}.{int(cuda) % 1000 // 10}"  # 12040 -> "12.4"
    return gpus, None if driver is None else _text(driver), cuda_text, notes


def _cpu(physical: int, logical: int) -> Cpu:
    isa = this_cpu()
    model = isa.model if isa.model != "unknown CPU" else (platform.processor() or platform.machine() or "unknown")
    return Cpu(model, physical, logical, isa.features())


def _existing(path: Path) -> Path:
    """The install root may not exist yet: measure the disk of its nearest existing ancestor."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def probe(root: Path = Path("/"), nvml: ModuleType | None = None) -> Machine:
    """The machine as it is now; `nvml` replaces the pynvml module (tests pass a recorded one)."""
    gpus, driver, cuda, notes = probe_gpus(nvml)
    logical = psutil.cpu_count(logical=True) or 1
    physical = psutil.cpu_count(logical=False) or logical
    return Machine(
        gpus=gpus, driver_version=driver, cuda_driver_version=cuda,
        cpu=_cpu(physical, logical),
        ram_mib=psutil.virtual_memory().total // MIB,
        disk_free_mib=psutil.disk_usage(str(_existing(root))).free // MIB,
        python_version=".".join(str(p) for p in sys.version_info[:3]),
        systemd=Path("/run/systemd/system").is_dir(),  # sd_booted(3): how systemd itself tells
        notes=tuple(notes),
    )
