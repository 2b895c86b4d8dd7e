"""Tier planning: machine + tier table -> every tier runnable / low-memory / incompatible, with reasons in
numbers, and the choice (the first runnable tier in the bundle's order of preference). Pure: no I/O.

- incompatible: the hardware or driver cannot run the tier (too few GPUs, compute capability,
  CUDA/driver floor, PCI id not allowed, too little memory in total, RAM, disk).
- low-memory: the GPUs would do, but not enough of their memory is free now (another process holds it).
GPUs are matched on memory, count, compute capability and PCI ids, never on marketing names.
A GPU in MIG mode offers its largest MIG instance: that is the device CUDA gives one process.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from appliance.errors import TierError
from installer.hardware.machine import Gpu, Machine, gib, version_tuple
from installer.planning.tiers import Tier

RUNNABLE, LOW_MEMORY, INCOMPATIBLE = "runnable", "low-memory", "incompatible"
VERDICTS = (RUNNABLE, LOW_MEMORY, INCOMPATIBLE)


@dataclass(frozen=True)
class TierVerdict:
    name: str
    verdict: str  # one of VERDICTS
    reasons: tuple[str, ...]  # in numbers; for a runnable tier, what it will use
    gpus: tuple[int, ...] = ()  # NVML indices of the GPUs it would run on
    devices: tuple[str, ...] = ()  # the same as CUDA_VISIBLE_DEVICES entries: UUIDs (MIG instances too)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "verdict": self.verdict, "reasons": list(self.reasons), "gpus": list(self.gpus),
                "devices": list(self.devices)}


@dataclass(frozen=True)
class Plan:
    machine: Machine
    tiers: tuple[Tier, ...]
    verdicts: tuple[TierVerdict, ...]
    chosen: Tier | None
    reason: str  # why this tier, or why none

    def verdict(self, name: str) -> TierVerdict:
        for v in self.verdicts:
            if v.name == name:
                return v
        raise KeyError(name)

    def select(self, override: str | None = None) -> Tier:
        """The tier to install: the choice, or `override` (`--tier`) unless it is incompatible."""
        if override is None:
            if self.chosen is None:
                raise TierError(self.reason, "Free GPU memory, or use a machine that meets a tier's needs; `appliance hw` lists them.")
            return self.chosen
        tier = next((t for t in self.tiers if t.name == override), None)
        if tier is None:
            raise TierError(f"The bundle has no tier {override!r}.", f"Its tiers are: {', '.join(t.name for t in self.tiers)}.")
        v = self.verdict(override)
        if v.verdict == INCOMPATIBLE:
            hint = f"Leave out --tier to install {self.chosen.name!r}, the tier that fits." if self.chosen else "`appliance hw` shows what each tier needs."
            raise TierError(f"The tier {override!r} cannot run on this machine: {'; '.join(v.reasons)}.", hint)
        return tier

    def model_settings(self, tier: Tier | None = None) -> dict[str, Any]:
        """appliance.toml [model] keys for `tier` (default: the choice) on this machine."""
        tier = tier or self.select()
        v = self.verdict(tier.name)
        return tier.model_settings(self.machine.cpu.physical_cores, v.gpus, v.devices)

    def to_json(self) -> dict[str, Any]:
        return {"chosen": self.chosen.name if self.chosen else None, "reason": self.reason,
                "tiers": [dict(v.to_json(), model=t.model, backend=t.backend, description=t.description)
                          for v, t in zip(self.verdicts, self.tiers, strict=True)],
                "machine": self.machine.to_json()}


@dataclass(frozen=True)
class _Device:
    """What CUDA would see for one GPU: the GPU itself, or its largest MIG instance."""

    gpu: Gpu
    label: str
    total_mib: int | None
    free_mib: int | None
    cuda_id: str  # for CUDA_VISIBLE_DEVICES: a UUID where known; NVML's index only with CUDA_DEVICE_ORDER=PCI_BUS_ID


def _device(g: Gpu) -> _Device:
    if not g.mig_enabled:
        return _Device(g, f"GPU {g.index}", g.memory_total_mib, g.memory_free_mib, g.uuid or str(g.index))
    known = [d for d in g.mig_devices if d.memory_total_mib is not None and d.memory_free_mib is not None]
    if not known:
        return _Device(g, f"GPU {g.index} (MIG mode)", None, None, g.uuid or str(g.index))
    best = max(known, key=lambda d: (d.memory_free_mib or 0, d.memory_total_mib or 0))
    return _Device(g, f"GPU {g.index} MIG instance {best.index}", best.memory_total_mib, best.memory_free_mib,
                   best.uuid or g.uuid or str(g.index))


def _check_device(d: _Device, tier: Tier) -> tuple[list[str], list[str]]:
    """(hard, soft) reasons why this device cannot serve `tier` now."""
    n, g = tier.needs, d.gpu
    hard: list[str] = []
    if n.pci_device_ids and g.pci_device_id not in n.pci_device_ids:
        hard.append(f"{d.label} has PCI id {g.pci_device_id or 'unknown'}, not one of {', '.join(n.pci_device_ids)} that this tier allows")
    if n.compute_capability:
        if g.compute_capability is None:
            hard.append(f"needs compute capability {n.compute_capability}, {d.label}'s could not be read")
        elif version_tuple(g.compute_capability) < version_tuple(n.compute_capability):
            hard.append(f"needs compute capability {n.compute_capability}, {d.label} has {g.compute_capability}")
    if n.gpu_memory_mib:
        if d.total_mib is None or d.free_mib is None:
            why = "NVML reported no memory for its MIG instances" if g.mig_enabled else "its memory could not be read"
            hard.append(f"needs {gib(n.gpu_memory_mib)} GiB per GPU, {d.label}: {why}")
        elif d.total_mib < n.gpu_memory_mib:
            hard.append(f"needs {gib(n.gpu_memory_mib)} GiB per GPU, {d.label} has {gib(d.total_mib)} GiB in total")
        elif d.free_mib < n.gpu_memory_mib and not hard:
            return [], [f"needs {gib(n.gpu_memory_mib)} GiB free per GPU, {d.label} has {gib(d.free_mib)} GiB free "
                        f"of {gib(d.total_mib)} GiB (other processes hold the rest)"]
    return hard, []


def check_machine(m: Machine, tier: Tier) -> list[str]:
    """Reasons from the machine as a whole: driver/CUDA floor, RAM, disk."""
    n = tier.needs
    out = []
    if tier.uses_gpu and m.gpus:
        if n.cuda:
            if m.cuda_driver_version is None:
                out.append(f"needs a driver that supports CUDA {n.cuda}, the driver's CUDA version could not be read")
            elif version_tuple(m.cuda_driver_version) < version_tuple(n.cuda):
                out.append(f"needs a driver that supports CUDA {n.cuda}, driver {m.driver_version or '?'} supports CUDA {m.cuda_driver_version}")
        if n.driver and not out:  # a CUDA shortfall already names the driver
            if m.driver_version is None:
                out.append(f"needs driver {n.driver} or newer, the driver version could not be read")
            elif version_tuple(m.driver_version) < version_tuple(n.driver):
                out.append(f"needs driver {n.driver} or newer, the machine has {m.driver_version}")
    if m.ram_mib < n.ram_mib:
        out.append(f"needs {gib(n.ram_mib)} GiB RAM, the machine has {gib(m.ram_mib)} GiB")
    if m.disk_free_mib < n.disk_mib:
        out.append(f"needs {gib(n.disk_mib)} GiB free disk, the install root has {gib(m.disk_free_mib)} GiB free")
    return out


def _what_gpus(tier: Tier) -> str:
    n = tier.needs
    parts = [f"{gib(n.gpu_memory_mib)} GiB free"] if n.gpu_memory_mib else []
    if n.compute_capability:
        parts.append(f"compute capability {n.compute_capability}")
    return f"{n.gpu_count} GPU{'s' if n.gpu_count > 1 else ''}" + (f" with {' and '.join(parts)}" if parts else "")


def judge(machine: Machine, tier: Tier, runtimes: frozenset[str] | None = None) -> TierVerdict:
    """One tier against one machine; `runtimes`: the bundle's runtime variants (None: not known, e.g. a spec)."""
    hard = check_machine(machine, tier)
    if runtimes is not None and tier.runtime not in runtimes:
        carried = ", ".join(sorted(runtimes)) or "none"
        hard.insert(0, f"runs the {tier.runtime} runtime, and the bundle carries no wheels/{tier.runtime}/ (its runtimes: {carried})")
    if not tier.uses_gpu:
        if hard:
            return TierVerdict(tier.name, INCOMPATIBLE, tuple(hard))
        threads = machine.cpu.physical_cores if tier.threads == "physical-cores" else tier.threads
        return TierVerdict(tier.name, RUNNABLE, (f"needs no GPU and {gib(tier.needs.ram_mib)} GiB RAM, the machine has "
                                                 f"{gib(machine.ram_mib)} GiB; {tier.backend} on {threads} threads",))
    ready, busy, device_hard, soft = [], [], [], []
    for g in machine.gpus:
        d = _device(g)
        h, s = _check_device(d, tier)
        if h:
            device_hard.extend(h)
        elif s:
            busy.append(d)
            soft.extend(s)
        else:
            ready.append(d)
    need = tier.needs.gpu_count
    if len(ready) + len(busy) < need:
        q, total = len(ready) + len(busy), len(machine.gpus)
        have = "none" if not total else str(total) if q == total else f"{total}, {q} of which qualif{'ies' if q == 1 else 'y'}"
        hard.insert(0, f"needs {_what_gpus(tier)}, the machine has {have}")
        hard.extend(device_hard)
    if hard:
        return TierVerdict(tier.name, INCOMPATIBLE, tuple(hard))
    if len(ready) < need:
        return TierVerdict(tier.name, LOW_MEMORY, tuple(soft[: need - len(ready)]))
    used = ready[: tier.gpus_wanted(len(ready))]
    free = ", ".join(f"{d.label} ({gib(d.free_mib or 0)} GiB free)" for d in used)
    replicas = len(used) // tier.tensor_parallel if tier.replicas == "per-gpu" else int(tier.replicas)
    layout = f"{replicas} replica{'s' if replicas > 1 else ''}" + (f" of {tier.tensor_parallel} GPUs each" if tier.tensor_parallel > 1 else "")
    return TierVerdict(tier.name, RUNNABLE, (f"needs {_what_gpus(tier)}; uses {free}: {layout}",),
                       tuple(d.gpu.index for d in used), tuple(d.cuda_id for d in used))


def plan(machine: Machine, tiers: list[Tier] | tuple[Tier, ...], runtimes: frozenset[str] | None = None) -> Plan:
    """Judge every tier; choose the first runnable one in the bundle's order of preference."""
    verdicts = tuple(judge(machine, t, runtimes) for t in tiers)
    chosen = next((t for t, v in zip(tiers, verdicts, strict=True) if v.verdict == RUNNABLE), None)
    if chosen is not None:
        before = [v.name for v in verdicts[: list(tiers).index(chosen)]]
        reason = f"{chosen.name} is the most preferred tier that is runnable" + (f" ({', '.join(before)} {'is' if len(before) == 1 else 'are'} out)" if before else "")
    else:
        waiting = [v.name for v in verdicts if v.verdict == LOW_MEMORY]
        reason = "The bundle has no tiers, so nothing can be installed." if not tiers else "No tier of this bundle is runnable on this machine" + (
            f"; {', '.join(waiting)} would run once GPU memory is freed" if waiting else "") + "."
    return Plan(machine, tuple(tiers), verdicts, chosen, reason)
