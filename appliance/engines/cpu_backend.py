"""llama.cpp's CPU code, chosen for this host: load the best `libggml-cpu-<variant>.so` the CPU can run.

The project's llama-cpp-python wheel (installer/toolchain/llama_wheel.py) carries one CPU library per x86-64
level instead of one built for the build machine. llama-cpp-python never loads them itself, so
before the first model load `load()` calls ggml's own loader (`ggml_backend_load_all_from_path`,
exported by libggml.so) on the package's `lib/` folder only: ggml asks each library for its score
(0 when this CPU lacks an instruction it was built for) and registers the best. The Sapphire Rapids
variant (AMX) is never built: its kernels crash on worker threads (llama.cpp PR #26954), so an AMX
CPU loads `zen4` (AVX-512 with VBMI, VNNI and BF16).

A wheel with a single `libggml-cpu.so` (another build of llama-cpp-python) needs nothing loaded.
The same loader registers `libggml-cuda.so` when the wheel carries it (the bundle's cuda runtime):
a tier that puts layers on a GPU starts only when llama.cpp then offers GPU offload.
"""

from __future__ import annotations

import ctypes
import re
import threading
from pathlib import Path

from appliance.errors import EngineError

_VARIANT = re.compile(r"libggml-cpu-(\w+)\.so$")
_lock = threading.Lock()
_loaded: str | None = None


def package_lib() -> Path:
    """llama_cpp/lib of the installed package, found without importing llama_cpp (its import loads libllama)."""
    import importlib.util

    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        raise EngineError("The llama_cpp package is not installed in this environment.",
                          "Install the bundle's wheelhouse (`appliance install`) or run `make setup` in a checkout.")
    return Path(next(iter(spec.submodule_search_locations))) / "lib"


def variants(lib: Path) -> list[str]:
    """The CPU variants a lib folder carries ('x64', 'haswell', 'zen4', ...); empty for a single-CPU build."""
    return sorted(m[1] for p in lib.glob("libggml-cpu-*.so") if (m := _VARIANT.search(p.name)))


def loaded_variant() -> str | None:
    """The CPU variant this process has mapped, read from /proc/self/maps: what really runs."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    found = {m[1] for line in maps.splitlines() if (m := _VARIANT.search(line.strip()))}
    return ",".join(sorted(found)) or None


def load(lib: Path | None = None) -> str | None:
    """Register the best CPU variant for this host, once per process; returns its name (None when the
    wheel has a single CPU library). Must run before llama_backend_init, which otherwise looks for
    backends in the executable's folder and the working directory."""
    global _loaded
    with _lock:
        if _loaded is not None:
            return _loaded
        lib = lib or package_lib()
        if not variants(lib):
            return None
        ggml = ctypes.CDLL(str(lib / "libggml.so"), mode=ctypes.RTLD_GLOBAL)
        ggml.ggml_backend_load_all_from_path.argtypes = [ctypes.c_char_p]
        ggml.ggml_backend_load_all_from_path.restype = None
        ggml.ggml_backend_load_all_from_path(str(lib).encode())
        chosen = loaded_variant()
        if chosen is None:
            from appliance.cpu import this_cpu

            raise EngineError(f"None of llama.cpp's CPU variants in {lib} ({', '.join(variants(lib))}) runs on this CPU, "
                              f"{this_cpu().describe()}.", "Ask the vendor for a bundle built for this CPU.")
        _loaded = chosen
        return chosen


def require_gpu_offload(tier: str, gpu_layers: int) -> None:
    """A tier with `gpu_layers` != 0 starts only where this llama.cpp can offload to a GPU: never on the CPU instead."""
    lib = package_lib()
    load(lib)
    import llama_cpp

    if llama_cpp.llama_supports_gpu_offload():
        return
    layers = "every layer" if gpu_layers < 0 else f"{gpu_layers} layers"
    why = ("this llama.cpp build has no GPU backend (it is the CPU-only build)" if not (lib / "libggml-cuda.so").is_file()
           else "llama.cpp's CUDA backend finds no GPU on this host")
    raise EngineError(f"The tier {tier} puts {layers} of the model on a GPU, but {why}, so the server will not start "
                      "(it never falls back to the CPU).",
                      "Install the bundle's cuda runtime on a host whose GPU `nvidia-smi` shows, or the cpu tier "
                      "(`appliance install DIR --tier cpu`).")


def scores(lib: Path) -> dict[str, int]:
    """Each variant's score on this CPU, from its own `ggml_backend_score` (0: it cannot run here), as
    ggml's loader computes it; for `appliance hw --bundle`, on a lib folder unpacked from a wheel."""
    ctypes.CDLL(str(lib / "libggml-base.so"), mode=ctypes.RTLD_GLOBAL)
    out = {}
    for name in variants(lib):
        so = ctypes.CDLL(str(lib / f"libggml-cpu-{name}.so"))
        so.ggml_backend_score.restype = ctypes.c_int
        out[name] = int(so.ggml_backend_score())
    return out


def choose(lib: Path, python: str | None = None) -> tuple[str | None, dict[str, int]]:
    """The variant ggml would load from `lib` on this CPU, and every score, asked of the libraries
    themselves in a child process (a library that cannot load here must not take the caller down)."""
    import json
    import subprocess
    import sys

    if not variants(lib):
        return None, {}
    proc = subprocess.run([python or sys.executable, "-m", "appliance.engines.cpu_backend", str(lib)],
                          capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise EngineError(f"Scoring llama.cpp's CPU variants in {lib} failed (exit code {proc.returncode}).")
    got: dict[str, int] = json.loads(proc.stdout)
    best = max(got, key=lambda k: got[k]) if got and max(got.values()) > 0 else None
    return best, got


if __name__ == "__main__":
    import json
    import sys

    print(json.dumps(scores(Path(sys.argv[1]))))
