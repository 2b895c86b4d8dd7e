"""The machine file: what the probe saw (GPUs, driver, CPU, RAM, disk), as JSON a site can send to its vendor.

A recorded machine file stands in for the probe everywhere (`--machine FILE`), so its shape is a
contract: the keys of issue 3, plus optional `uuid` and `mig_devices` per GPU, `python_version`,
`systemd` and `notes` (what the probe could not read, in words). A value the probe could not read is null.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance.atomic import atomic_write_json
from appliance.errors import HardwareError

MIB = 1 << 20
_PCI_ID = re.compile(r"^0x[0-9A-F]{8}\Z")
_VERSION = re.compile(r"^\d+(\.\d+)*\Z")


def version_tuple(text: str) -> tuple[int, ...]:
    """'550.54.15' -> (550, 54, 15), so versions compare as numbers, not strings."""
    return tuple(int(p) for p in text.split("."))


def gib(mib: int | float) -> str:
    """A MiB count as the GiB figure people read: 8192 -> '8', 15360 -> '15', 4864 -> '4.8'."""
    value = mib / 1024
    return f"{value:.0f}" if value >= 10 or value == int(value) else f"{value:.1f}"


@dataclass(frozen=True)
class MigDevice:
    """One MIG instance of a GPU in MIG mode: CUDA sees it as a device of its own."""

    index: int
    name: str | None
    memory_total_mib: int | None
    memory_free_mib: int | None
    uuid: str | None = None  # "MIG-...": what CUDA_VISIBLE_DEVICES names it by


@dataclass(frozen=True)
class Gpu:
    index: int
    name: str | None
    pci_device_id: str | None  # "0x20B210DE": device id in the high 16 bits, vendor 0x10DE in the low
    memory_total_mib: int | None
    memory_free_mib: int | None
    compute_capability: str | None  # "8.0"
    mig_enabled: bool = False
    mig_devices: tuple[MigDevice, ...] = ()
    uuid: str | None = None  # "GPU-...": stable across reboots, unlike indices (NVML and CUDA order GPUs differently)


@dataclass(frozen=True)
class Cpu:
    model: str
    physical_cores: int
    logical_cores: int
    isa: str | None = None  # "x86-64-v4, AVX-512, no AMX" (appliance.cpu); absent from older machine files


@dataclass(frozen=True)
class Machine:
    gpus: tuple[Gpu, ...]
    driver_version: str | None
    cuda_driver_version: str | None  # the newest CUDA the driver supports, "12.4"
    cpu: Cpu
    ram_mib: int
    disk_free_mib: int
    python_version: str | None = None  # the interpreter that installs, "3.11.9"
    systemd: bool | None = None  # booted with systemd; None: not recorded
    notes: tuple[str, ...] = field(default=())

    def to_json(self) -> dict[str, Any]:
        gpus = []
        for g in self.gpus:
            entry: dict[str, Any] = {
                "index": g.index, "name": g.name, "pci_device_id": g.pci_device_id,
                "memory_total_mib": g.memory_total_mib, "memory_free_mib": g.memory_free_mib,
                "compute_capability": g.compute_capability, "mig_enabled": g.mig_enabled,
            }
            if g.uuid is not None:
                entry["uuid"] = g.uuid
            if g.mig_enabled:
                entry["mig_devices"] = [{"index": d.index, "name": d.name, "memory_total_mib": d.memory_total_mib,
                                         "memory_free_mib": d.memory_free_mib, **({"uuid": d.uuid} if d.uuid else {})}
                                        for d in g.mig_devices]
            gpus.append(entry)
        out: dict[str, Any] = {
            "gpus": gpus, "driver_version": self.driver_version, "cuda_driver_version": self.cuda_driver_version,
            "cpu": {"model": self.cpu.model, "physical_cores": self.cpu.physical_cores, "logical_cores": self.cpu.logical_cores,
                    **({"isa": self.cpu.isa} if self.cpu.isa else {})},
            "ram_mib": self.ram_mib, "disk_free_mib": self.disk_free_mib,
        }
        if self.python_version is not None:
            out["python_version"] = self.python_version
        if self.systemd is not None:
            out["systemd"] = self.systemd
        out["notes"] = list(self.notes)
        return out

    @classmethod
    def from_json(cls, data: Any, source: str = "the machine file") -> Machine:
        """Strict: a wrong type or a missing key is a HardwareError that names the key."""
        r = _Reader(source)
        r.obj(data, "top level")
        gpus = []
        for i, g in enumerate(r.get(data, "gpus", list, "top level")):
            where = f"gpus[{i}]"
            r.obj(g, where)
            mig = bool(r.get(g, "mig_enabled", bool, where, default=False))
            devices = []
            for j, d in enumerate(r.get(g, "mig_devices", list, where, default=[])):
                w = f"{where}.mig_devices[{j}]"
                r.obj(d, w)
                devices.append(MigDevice(r.count(d, "index", w), r.get(d, "name", str, w, default=None),
                                         r.count(d, "memory_total_mib", w, null=True), r.count(d, "memory_free_mib", w, null=True),
                                         r.get(d, "uuid", str, w, default=None)))
            pci = r.get(g, "pci_device_id", str, where, default=None)
            if pci is not None:
                pci = pci[:2].lower() + pci[2:].upper()
                if not _PCI_ID.match(pci):
                    raise HardwareError(f"{source} has {where}.pci_device_id {pci!r}, not a PCI id like '0x20B210DE'.")
            cc = r.version(g, "compute_capability", where)
            gpus.append(Gpu(r.count(g, "index", where), r.get(g, "name", str, where, default=None), pci,
                            r.count(g, "memory_total_mib", where, null=True), r.count(g, "memory_free_mib", where, null=True),
                            cc, mig, tuple(devices), r.get(g, "uuid", str, where, default=None)))
        cpu = r.get(data, "cpu", dict, "top level")
        notes = r.get(data, "notes", list, "top level", default=[])
        if not all(isinstance(n, str) for n in notes):
            raise HardwareError(f"{source} has notes that are not all text.")
        return cls(
            gpus=tuple(gpus),
            driver_version=r.version(data, "driver_version", "top level"),
            cuda_driver_version=r.version(data, "cuda_driver_version", "top level"),
            cpu=Cpu(r.get(cpu, "model", str, "cpu"), r.count(cpu, "physical_cores", "cpu"), r.count(cpu, "logical_cores", "cpu"),
                    r.get(cpu, "isa", str, "cpu", default=None)),
            ram_mib=r.count(data, "ram_mib", "top level"),
            disk_free_mib=r.count(data, "disk_free_mib", "top level"),
            python_version=r.version(data, "python_version", "top level"),
            systemd=r.get(data, "systemd", bool, "top level", default=None),
            notes=tuple(notes),
        )

    def summary(self) -> str:
        """One line for people: '2 x NVIDIA GeForce RTX 3090 (24 GiB, cc 8.6), driver 545.29.06 / CUDA 12.3'."""
        if not self.gpus:
            return "no NVIDIA GPU"
        kinds: dict[str, int] = {}
        for g in self.gpus:
            mem = "memory unknown" if g.memory_total_mib is None else f"{gib(g.memory_total_mib)} GiB"
            label = f"{g.name or 'unknown GPU'} ({mem}, cc {g.compute_capability or '?'}{', MIG' if g.mig_enabled else ''})"
            kinds[label] = kinds.get(label, 0) + 1
        gpus = ", ".join(f"{n} x {label}" for label, n in kinds.items())
        return f"{gpus}, driver {self.driver_version or '?'} / CUDA {self.cuda_driver_version or '?'}"


class _Reader:
    """Typed access to the parsed JSON with errors that name the file and the key."""

    _MISSING = object()

    def __init__(self, source: str) -> None:
        self.source = source

    def obj(self, value: Any, where: str) -> None:
        if not isinstance(value, dict):
            raise HardwareError(f"{self.source} has {where} that is not a JSON object.")

    def get(self, d: dict[str, Any], key: str, typ: type, where: str, default: Any = _MISSING) -> Any:
        if key not in d or (d[key] is None and default is not self._MISSING):
            if default is self._MISSING:
                raise HardwareError(f"{self.source} has no {key!r} in {where}.", "Record it again with `appliance hw --record FILE`.")
            return default
        value = d[key]
        if not isinstance(value, typ) or (typ is not bool and isinstance(value, bool)):
            raise HardwareError(f"{self.source} has {where}.{key} = {value!r}, which is not a {typ.__name__}.")
        return value

    def count(self, d: dict[str, Any], key: str, where: str, null: bool = False) -> Any:
        value = self.get(d, key, int, where, default=None) if null else self.get(d, key, int, where)
        if value is not None and value < 0:
            raise HardwareError(f"{self.source} has a negative {where}.{key}.")
        return value

    def version(self, d: dict[str, Any], key: str, where: str) -> str | None:
        value = self.get(d, key, str, where, default=None)
        if value is not None and not _VERSION.match(value):
            raise HardwareError(f"{self.source} has {where}.{key} = {value!r}, not a dotted version like '12.4'.")
        return value


def load_machine(path: Path) -> Machine:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise HardwareError(f"The machine file {path} does not exist.", "Record one with `appliance hw --record FILE`.") from None
    except (OSError, UnicodeDecodeError) as e:
        raise HardwareError(f"Cannot read the machine file {path}: {e}.") from None
    except json.JSONDecodeError as e:
        raise HardwareError(f"The machine file {path} is not valid JSON: {e.msg} at line {e.lineno}.") from None
    return Machine.from_json(data, f"The machine file {path}")


def save_machine(machine: Machine, path: Path) -> None:
    atomic_write_json(Path(path), machine.to_json())
