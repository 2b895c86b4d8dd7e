"""What this CPU can run: its model and x86-64 ISA level, read from /proc/cpuinfo (pure parsing).

The levels are those of the x86-64 psABI (x86-64-v2: SSE4.2 and POPCNT; v3: AVX2, FMA, BMI2;
v4: AVX-512 F/BW/CD/DQ/VL). The engine's error messages and `appliance hw` use one description.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# Linux /proc/cpuinfo flag names for each level (lzcnt shows as abm).
_LEVELS = (
    ("x86-64-v2", {"cx16", "lahf_lm", "popcnt", "sse4_1", "sse4_2", "ssse3"}),
    ("x86-64-v3", {"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"}),
    ("x86-64-v4", {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}),
)
_AMX = {"amx_tile", "amx_int8"}


@dataclass(frozen=True)
class CpuIsa:
    model: str
    level: str  # "x86-64-v1" .. "x86-64-v4", or the machine's architecture when not x86-64
    avx512: bool
    amx: bool

    def features(self) -> str:
        """'x86-64-v4, AVX-512, no AMX'."""
        return ", ".join([self.level, "AVX-512" if self.avx512 else "no AVX-512", "AMX" if self.amx else "no AMX"])

    def describe(self) -> str:
        """'AMD EPYC 9454 (x86-64-v4, AVX-512, no AMX)'."""
        return f"{self.model} ({self.features()})"

    def to_json(self) -> dict[str, object]:
        return {"model": self.model, "level": self.level, "avx512": self.avx512, "amx": self.amx}


def parse_cpuinfo(text: str) -> CpuIsa:
    """The first processor's model name and flags."""
    model, flags = "unknown CPU", set[str]()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and model == "unknown CPU":
            model = value.strip() or model
        elif key == "flags" and not flags:
            flags = set(value.split())
    if not flags:
        return CpuIsa(model, "unknown level", False, False)
    level = "x86-64-v1"
    for name, needs in _LEVELS:
        if not needs <= flags:
            break
        level = name
    return CpuIsa(model, level, "avx512f" in flags, _AMX <= flags)


def this_cpu(cpuinfo: Path = Path("/proc/cpuinfo")) -> CpuIsa:
    try:
        return parse_cpuinfo(cpuinfo.read_text())
    except OSError:
        return CpuIsa("unknown CPU", "unknown level", False, False)
