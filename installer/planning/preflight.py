"""Preflight: can this machine take this tier of this bundle? Pure over the machine file, like the planner.

Each problem is one sentence with the numbers; an empty list means go.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from installer.hardware.machine import MIB, Machine, gib, version_tuple
from installer.planning.planner import check_machine
from installer.planning.tiers import Tier

# Installed wheels take about three times their compressed size (torch's CPU wheel: ~190 MB -> ~700 MB).
VENV_EXPANSION = 3
DISK_MARGIN = 1.1  # room for the temp files of atomic writes and logs


def venv_estimate(wheel_bytes: int) -> int:
    """Bytes the venv will take once the wheelhouse is installed, plus the copy of the wheelhouse it is built from."""
    return wheel_bytes * (VENV_EXPANSION + 1)


def bundle_python(compatible: str) -> str | None:
    """'linux-x86_64-cp311' -> '3.11': the interpreter the bundle's wheels are built for."""
    m = re.search(r"-cp(\d)(\d+)$", compatible)
    return f"{m[1]}.{m[2]}" if m else None


def preflight(
    machine: Machine, tier: Tier, *, model_bytes: int, venv_bytes: int = 0,
    python: str | None = None, no_systemd: bool = False, extra: Iterable[str] = (),
) -> list[str]:
    """Problems that stop an install of `tier`: RAM, disk, driver vs the CUDA floor, Python, systemd.

    model_bytes: the decrypted model files; venv_bytes: the venv (see venv_estimate);
    python: the bundle's Python ("3.11", see bundle_python); extra: problems the caller found itself.
    """
    problems = [p for p in check_machine(machine, tier) if "disk" not in p]
    disk_need = int((model_bytes + venv_bytes) * DISK_MARGIN) // MIB
    if machine.disk_free_mib < disk_need:
        problems.append(f"needs {gib(disk_need)} GiB free disk for the decrypted model ({gib(model_bytes // MIB)} GiB) "
                        f"and the venv ({gib(venv_bytes // MIB)} GiB), the install root has {gib(machine.disk_free_mib)} GiB free")
    if machine.disk_free_mib < tier.needs.disk_mib:
        problems.append(f"needs {gib(tier.needs.disk_mib)} GiB free disk for tier {tier.name}, the install root has {gib(machine.disk_free_mib)} GiB free")
    if tier.uses_gpu and not machine.gpus:
        problems.append(f"tier {tier.name} needs {tier.needs.gpu_count} GPU(s), the machine has none")
    if python and machine.python_version:
        have = ".".join(machine.python_version.split(".")[:2])
        if version_tuple(have) != version_tuple(python):
            problems.append(f"the bundle's wheels are built for Python {python}, this machine installs with Python {machine.python_version}")
    if machine.systemd is False and not no_systemd:
        problems.append("this machine is not running systemd, which runs the appliance's services (install with --no-systemd to run them yourself)")
    return problems + list(extra)
