"""The engine answers on whatever x86-64 CPU the site has: one llama.cpp build with a CPU library per
ISA level, the best one loaded at start, and a self-test that reports a death by signal in one
sentence. Older CPUs are emulated with qemu-user (`qemu-x86_64 -cpu MODEL`, installed by .ci/run)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from appliance.cpu import parse_cpuinfo
from appliance.engines import cpu_backend, selftest
from appliance.errors import EngineError
from installer.steps.engine import step_engine
from installer.steps.install import INSTALL_STEPS
from installer.toolchain import llama_wheel
from tests.demo_fixtures import DemoBundle

_HASWELL = {"sse4_2", "avx", "f16c", "fma", "avx2", "bmi2"}
_SKYLAKEX = _HASWELL | {"avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw"}
# The /proc/cpuinfo flags each variant is built for (ggml/src/CMakeLists.txt): independent of ggml's scoring.
VARIANT_NEEDS = {
    "x64": set(), "sse42": {"sse4_2"}, "haswell": _HASWELL, "alderlake": _HASWELL | {"avx_vnni"},
    "skylakex": _SKYLAKEX, "icelake": _SKYLAKEX | {"avx512vbmi", "avx512_vnni"},
    "zen4": _SKYLAKEX | {"avx512vbmi", "avx512_vnni", "avx512_bf16"},
}
EMULATED = [("Nehalem", "sse42"), ("Haswell-v4", "haswell")]  # x86-64-v2 and v3 without AVX-512


@pytest.fixture(scope="module")
def model_settings(smollm2_gguf):
    return {"path": str(smollm2_gguf), "backend": "llama.cpp", "threads": 1, "context_length": 256}


def _qemu() -> str:
    found = shutil.which("qemu-x86_64")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("qemu-x86_64 is missing: .ci/run installs Debian's qemu-user")
        pytest.skip("qemu-x86_64 is not installed (apt-get install qemu-user)")
    return found


def _stages(stdout: str) -> dict[str, dict]:
    return {r["stage"]: r for r in map(json.loads, filter(None, stdout.splitlines())) if isinstance(r, dict) and "stage" in r}


def test_the_wheel_carries_every_variant_and_no_native_or_amx_library():
    lib = cpu_backend.package_lib()
    assert cpu_backend.variants(lib) == sorted(llama_wheel.VARIANTS)
    assert not (lib / "libggml-cpu.so").exists(), "a single CPU library is a native build"
    assert not list(lib.glob("libggml-cpu-sapphirerapids*")), "the AMX variant crashes on worker threads"


def test_natively_the_best_variant_this_cpu_can_run_answers(model_settings):
    result = selftest.run(sys.executable, Path("/"), model_settings)
    flags = set(next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")).split(":")[1].split())
    assert result.variant in VARIANT_NEEDS and VARIANT_NEEDS[result.variant] <= flags, (result.variant, flags)
    # ggml's own scores, read in a child process: the variant that ran is the best one this CPU can run.
    probe = subprocess.run([sys.executable, "-c", "import json; from appliance.engines import cpu_backend as c; "
                            "print(json.dumps(c.scores(c.package_lib())))"], capture_output=True, text=True, check=True)
    scores = json.loads(probe.stdout)
    assert result.variant == max(scores, key=scores.get), scores
    assert all(VARIANT_NEEDS[v] <= flags for v, s in scores.items() if s > 0), scores
    assert result.prompt_tokens >= selftest.MIN_PROMPT_TOKENS and result.tokens > 0 and result.text.strip()
    print(result.summary())


@pytest.mark.parametrize(("cpu", "variant"), EMULATED, ids=[c for c, _ in EMULATED])
def test_an_older_cpu_loads_the_variant_it_can_run_and_answers(cpu, variant, model_settings):
    native, _ = cpu_backend.choose(cpu_backend.package_lib())  # in a child: nothing loads into this process
    if native == variant:
        # Emulating its AVX2 code took over 240 s on such a host (an AMD EPYC without AVX-512), where
        # the test above already decodes with this variant on the real CPU.
        pytest.skip(f"this CPU runs the {variant} variant itself: "
                    "test_natively_the_best_variant_this_cpu_can_run_answers decodes with it on real hardware")
    qemu = _qemu()
    proc = subprocess.run([qemu, "-cpu", cpu, sys.executable, "-m", "appliance.engines.selftest_decode", "--root", "/",
                           "--model", json.dumps(model_settings)], capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
    stages = _stages(proc.stdout)
    assert stages["variant"]["variant"] == variant
    done = stages["done"]
    assert done["prompt_tokens"] >= selftest.MIN_PROMPT_TOKENS and done["tokens"] > 0 and done["text"].strip(), done
    print(f"{cpu}: {variant}, {done['text']!r} in {done['seconds']:.1f} s")


# A native AVX-512 build, forced on an emulated Haswell: the zen4 library is registered directly, past
# ggml's scoring, as a wheel built with -march=native on an AVX-512 machine would link it.
_FORCE_NATIVE = """
import ctypes, importlib.util, pathlib
lib = pathlib.Path(next(iter(importlib.util.find_spec("llama_cpp").submodule_search_locations))) / "lib"
ctypes.CDLL(str(lib / "libggml-base.so"), mode=ctypes.RTLD_GLOBAL)
ggml = ctypes.CDLL(str(lib / "libggml.so"), mode=ctypes.RTLD_GLOBAL)
cpu = ctypes.CDLL(str(lib / "libggml-cpu-zen4.so"))
cpu.ggml_backend_init.restype = ctypes.c_void_p
ggml.ggml_backend_register.argtypes = [ctypes.c_void_p]
ggml.ggml_backend_register(cpu.ggml_backend_init())
"""


def _native_build_on_haswell(venv: Path, qemu: str) -> Path:
    """A release venv whose python runs under qemu's Haswell with a native AVX-512 CPU library."""
    site = venv / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    site.mkdir(parents=True)
    (venv / "bin").mkdir()
    shutil.copy(Path(sys.prefix) / "pyvenv.cfg", venv / "pyvenv.cfg")
    real = venv / "bin" / "python3-real"
    real.symlink_to(os.path.realpath(sys.executable))
    project_site = next(Path(sys.prefix).glob("lib/python3*/site-packages"))
    (site / "00-project.pth").write_text(f"import site; site.addsitedir({str(project_site)!r})\n")
    (site / "force_native.py").write_text(_FORCE_NATIVE)
    (site / "zz-force-native.pth").write_text("import force_native\n")
    python = venv / "bin" / "python"
    python.write_text(f'#!/bin/sh\nexec {qemu} -cpu Haswell-v4 "{real}" "$@"\n')
    python.chmod(0o755)
    return python


def test_the_install_stops_before_the_switch_when_the_engine_dies_on_this_cpu(tmp_path, model_settings):
    from appliance.paths import Layout

    qemu = _qemu()
    names = [s.name for s in INSTALL_STEPS]
    assert names.index("engine") < names.index("config"), "the test decode must come before the release is used"
    layout = Layout.at(tmp_path / "root")
    release = layout.releases / "r1"
    _native_build_on_haswell(release / "venv", qemu)
    (release / "release.json").write_text(json.dumps({"id": "r1", "sequence": 1, "extras": ["server"]}))
    model = layout.models / "k" / "model.gguf"  # as step_model leaves it, under the install root
    model.parent.mkdir(parents=True)
    model.symlink_to(model_settings["path"])
    settings = dict(model_settings, path="/" + str(model.relative_to(layout.root)))

    class Ctx:
        dry_run = False
        release_id = "r1"

        def planned(self):
            return SimpleNamespace(model_settings=settings, embeddings=None)

    Ctx.layout = layout

    with pytest.raises(EngineError) as e:
        step_engine(Ctx(), lambda _text, _frac: None)
    msg = e.value.message
    assert "died with SIGILL" in msg and "on this CPU" in msg, msg
    assert parse_cpuinfo(Path("/proc/cpuinfo").read_text()).level in msg, msg
    assert "portable llama.cpp runtime" in e.value.hint and "Nothing was switched" in e.value.hint
    assert not layout.current.exists()


def test_an_engine_that_cannot_answer_stops_with_what_failed(tmp_path, model_settings):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)  # a damaged model: the engine loads no weights from it
    with pytest.raises(EngineError) as e:
        selftest.run(sys.executable, Path("/"), dict(model_settings, path=str(bad)))
    assert "failed a test prompt on this CPU" in e.value.message and "could not load the model" in e.value.message
    assert "Nothing was switched" in e.value.hint


def test_the_bundle_carries_the_portable_wheel_and_hw_names_the_variant_it_loads_here(demo_bundle: DemoBundle, tmp_path,
                                                                                      model_settings):
    shipped = list((demo_bundle.dir / "wheels" / "cpu").glob("llama_cpp_python-*.whl"))
    built = llama_wheel.build(llama_wheel.default_cache())
    assert len(shipped) == 1 and llama_wheel.sha256_file(shipped[0]) == llama_wheel.sha256_file(built)
    hw = [sys.executable, "-m", "appliance.cli", "hw", "--root", str(tmp_path), "--bundle", str(demo_bundle.dir), "--json"]
    verified = json.loads(subprocess.run([*hw, "--trust", str(demo_bundle.keys / "signing.pub")],
                                         capture_output=True, text=True, check=False).stdout)["llama_cpp_cpu"]
    native = selftest.run(sys.executable, Path("/"), model_settings)
    assert verified["variant"] == native.variant and verified["source"].startswith("the bundle's wheels/cpu/llama_cpp_python-"), verified
    unchecked = json.loads(subprocess.run(hw, capture_output=True, text=True, check=False).stdout)["llama_cpp_cpu"]
    assert unchecked["variant"] is None and "signature was not checked" in unchecked["why"], unchecked
