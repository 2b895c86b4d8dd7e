"""What is installed and shipped is what the lock names: requirements/lock.txt, the portable
llama-cpp-python recipe, and `appliance hw`'s account of the CPU."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from appliance.cpu import parse_cpuinfo
from installer.toolchain import llama_wheel, lockfile

REPO = Path(__file__).resolve().parent.parent
LOCK = (REPO / "requirements" / "lock.txt").read_text()


def test_every_locked_package_has_hashes_and_the_cpu_torch():
    pins = lockfile.pins(LOCK)
    assert len(pins) > 50
    assert all(hashes for _v, hashes in pins.values()), [n for n, (_v, h) in pins.items() if not h]
    assert pins["torch"][0].endswith("+cpu")
    assert not any(n.startswith("nvidia-cu") or n == "triton" for n in pins), "a CUDA torch's packages are in the lock"
    assert lockfile.BUILT_HERE not in pins, "llama-cpp-python is built from its pinned sdist, never taken from the lock"


def test_this_environment_runs_the_locked_versions():
    """`make setup` installed the lock as it is: every locked package, at its locked version."""
    wrong = {}
    for name, (version, _h) in lockfile.pins(LOCK).items():
        try:
            have = metadata.version(name)
        except metadata.PackageNotFoundError:
            have = None
        if have != version:
            wrong[name] = (version, have)
    assert not wrong, wrong


def test_the_installed_llama_cpp_is_the_portable_build():
    dist = metadata.distribution("llama-cpp-python")
    assert dist.version == llama_wheel.VERSION
    libs = {Path(str(f)).name for f in dist.files or [] if "llama_cpp/lib/" in str(f)}
    assert {f"libggml-cpu-{v}.so" for v in llama_wheel.VARIANTS} <= libs and "libggml-cpu.so" not in libs


_ENTRY = "foo==1.0 \\\n    --hash=sha256:{h}\n    # via bar\n"


def test_strip_takes_out_the_built_package_only_when_the_lock_saw_the_same_sdist():
    text = "# header\n" + _ENTRY.format(h="a" * 64) + "llama-cpp-python==0.3.36 \\\n    --hash=sha256:" + "b" * 64 + "\n    # via appliance\n"
    out = lockfile.strip(text, "llama-cpp-python", "b" * 64)
    assert "llama-cpp-python==" not in out and "foo==1.0" in out and "--hash=sha256:" + "a" * 64 in out
    assert lockfile.strip(out, "llama-cpp-python", "b" * 64) == out  # idempotent
    with pytest.raises(ValueError, match="not the sdist"):
        lockfile.strip(text, "llama-cpp-python", "c" * 64)
    assert lockfile.constraints(out) == "foo==1.0\n"


_CMAKE = """
    if (GGML_SYSTEM_ARCH STREQUAL "x86")
        ggml_add_cpu_backend_variant(x64)
        ggml_add_cpu_backend_variant(sse42              SSE42)
        ggml_add_cpu_backend_variant(sandybridge        SSE42 AVX)
        ggml_add_cpu_backend_variant(haswell            SSE42 AVX F16C FMA AVX2 BMI2)
        ggml_add_cpu_backend_variant(skylakex           SSE42 AVX F16C FMA AVX2 BMI2 AVX512)
        ggml_add_cpu_backend_variant(icelake            SSE42 AVX F16C FMA AVX2 BMI2 AVX512 AVX512_VBMI AVX512_VNNI)
        if (NOT MSVC)
            ggml_add_cpu_backend_variant(zen4           SSE42 AVX F16C FMA AVX2 BMI2 AVX512 AVX512_VBMI AVX512_VNNI AVX512_BF16)
        endif()
        ggml_add_cpu_backend_variant(alderlake          SSE42 AVX F16C FMA AVX2 BMI2 AVX_VNNI)
        if (NOT MSVC)
            ggml_add_cpu_backend_variant(sapphirerapids SSE42 AVX F16C FMA AVX2 BMI2 AVX512 AVX512_VBMI AVX512_VNNI AVX512_BF16 AMX_TILE AMX_INT8)
        endif()
"""


def test_the_recipe_keeps_its_variants_and_never_the_amx_one():
    out = llama_wheel.keep_variants(_CMAKE)
    kept = [line.split("(")[1].split()[0].rstrip(")") for line in out.splitlines() if "ggml_add_cpu_backend_variant(" in line]
    assert sorted(kept) == sorted(llama_wheel.VARIANTS) and "sapphirerapids" not in out and "sandybridge" not in out
    with pytest.raises(llama_wheel.BuildError, match="no CPU variant zen4"):
        llama_wheel.keep_variants(_CMAKE.replace("zen4", "zen5"))


def test_the_build_key_follows_the_flags_and_variants(monkeypatch):
    key = llama_wheel.build_key()
    assert llama_wheel.build_key(native=True) != key
    monkeypatch.setattr(llama_wheel, "VARIANTS", llama_wheel.VARIANTS[:-1])
    assert llama_wheel.build_key() != key


@pytest.mark.parametrize(("flags", "level", "avx512", "amx"), [
    ("fpu sse sse2", "x86-64-v1", False, False),
    ("cx16 lahf_lm popcnt sse4_1 sse4_2 ssse3", "x86-64-v2", False, False),
    ("cx16 lahf_lm popcnt sse4_1 sse4_2 ssse3 avx avx2 bmi1 bmi2 f16c fma abm movbe xsave", "x86-64-v3", False, False),
    ("cx16 lahf_lm popcnt sse4_1 sse4_2 ssse3 avx avx2 bmi1 bmi2 f16c fma abm movbe xsave avx512f avx512bw avx512cd "
     "avx512dq avx512vl amx_tile amx_int8 amx_bf16", "x86-64-v4", True, True),
])
def test_isa_levels(flags, level, avx512, amx):
    isa = parse_cpuinfo(f"processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: {flags}\n")
    assert (isa.level, isa.avx512, isa.amx, isa.model) == (level, avx512, amx, "Some CPU")
    assert isa.describe().startswith(f"Some CPU ({level}, ")


def test_hw_shows_the_cpu_level_and_the_variant_that_loads_here():
    out = subprocess.run([sys.executable, "-m", "appliance.cli", "hw", "--json"], capture_output=True, text=True, check=False)
    data = json.loads(out.stdout)
    here = parse_cpuinfo(Path("/proc/cpuinfo").read_text())
    assert data["machine"]["cpu"]["isa"] == here.features()
    engine = data["llama_cpp_cpu"]
    assert engine["variant"] in llama_wheel.VARIANTS and engine["scores"][engine["variant"]] == max(engine["scores"].values())
    text = subprocess.run([sys.executable, "-m", "appliance.cli", "hw"], capture_output=True, text=True, check=False).stdout
    assert f"({here.features()})" in text and f"the {engine['variant']} CPU variant loads here" in text
