"""The portable llama-cpp-python wheel: one build that runs on every x86-64 server.

pip's default build compiles llama.cpp with `-march=native`: the wheel runs only on CPUs with every
instruction of the machine that built it, and on Intel CPUs with AMX its AMX kernels crash
(SIGILL in `ggml_backend_amx_mul_mat`, llama.cpp PR #26954, still open). This module builds the same
release from its hash-checked sdist with `GGML_NATIVE=OFF GGML_BACKEND_DL=ON GGML_CPU_ALL_VARIANTS=ON`:
one `libggml-cpu-<variant>.so` per x86-64 level in `llama_cpp/lib/`, of which
`appliance.engines.cpu_backend` loads the best one the host's CPU can run.

The variant list is cut to `VARIANTS` (build time on 2 cores), and the `sapphirerapids` variant, the
only one with AMX, is never built: an AMX CPU gets `zen4` (AVX-512 with VBMI, VNNI and BF16).

The wheel goes to a folder of its own keyed by the sdist's hash, the flags and the variants, never
through pip's shared wheel cache (keyed by the sdist alone, it hands back whatever was built first).
Standard library only: `make setup` runs it before the project's venv has anything in it.

The CUDA variant (the bundle's cuda runtime) adds `GGML_CUDA=ON` for the compute capabilities
`cuda_archs()` names: the same CPU libraries plus `libggml-cuda.so`, found by the same loader. It
links the CUDA runtime and cuBLAS of NVIDIA's pip packages (`nvidia/cu13/lib` beside torch), which
its RPATH names. Building it needs nvcc and takes long (every architecture compiles every kernel).

    python -m installer.toolchain.llama_wheel [--cache DIR] [--cuda]   # prints the wheel's path
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

VERSION = "0.3.36"
SDIST = f"llama_cpp_python-{VERSION}.tar.gz"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"

# x86-64-v1 (x64), v2 (sse42), v3 (haswell; alderlake adds AVX-VNNI without AVX-512), v4 (skylakex),
# v4 with VBMI+VNNI (icelake) and with BF16 too (zen4: also what Sapphire Rapids and later get).
VARIANTS = ("x64", "sse42", "haswell", "alderlake", "skylakex", "icelake", "zen4")
NEVER = ("sapphirerapids",)  # AMX: crashes on worker threads (see above)

CMAKE_ARGS = (
    "-DGGML_NATIVE=OFF", "-DGGML_BACKEND_DL=ON", "-DGGML_CPU_ALL_VARIANTS=ON",
    # ggml installs each variant there (relative to the wheel's root), beside libggml.so. Typed
    # STRING: a relative PATH on the command line would be made absolute against the build's cwd.
    "-DGGML_BACKEND_DIR:STRING=llama_cpp/lib", "-DCMAKE_INSTALL_RPATH=$ORIGIN",
)

# For bench/portable_vs_native.py only: llama-cpp-python's default build (-march=native), which runs
# on the building CPU alone and never ships.
NATIVE_CMAKE_ARGS = ("-DGGML_NATIVE=ON",)

# CUDA 13's nvcc builds for Turing (7.5) and newer; a tier's compute capability floor below that
# cannot get a CUDA llama.cpp from it.
CUDA_ARCHS = ("75", "80", "86", "89", "90", "100", "120")
CUDA_CMAKE_ARGS = ("-DGGML_CUDA=ON", "-DCMAKE_INSTALL_RPATH=$ORIGIN;$ORIGIN/../../nvidia/cu13/lib")

_VARIANT_LINE = re.compile(r"^\s*ggml_add_cpu_backend_variant\((\w+)[^)]*\)\s*$", re.M)
_GGML_CMAKE = "vendor/llama.cpp/ggml/src/CMakeLists.txt"


class BuildError(RuntimeError):
    pass


def cmake_args(native: bool = False, cuda_archs: tuple[str, ...] = ()) -> tuple[str, ...]:
    if native:
        return NATIVE_CMAKE_ARGS
    if not cuda_archs:
        return CMAKE_ARGS
    base = tuple(a for a in CMAKE_ARGS if not a.startswith("-DCMAKE_INSTALL_RPATH"))
    return (*base, *CUDA_CMAKE_ARGS, f"-DCMAKE_CUDA_ARCHITECTURES={';'.join(cuda_archs)}")


def cuda_archs(floor: str = "7.5") -> tuple[str, ...]:
    """The CUDA architectures from compute capability `floor` up (e.g. "8.0" -> 80, 86, 89, 90, ...)."""
    major, _, minor = floor.partition(".")
    low = int(major) * 10 + int(minor or 0)
    return tuple(a for a in CUDA_ARCHS if int(a) >= low)


def build_key(native: bool = False, cuda_archs: tuple[str, ...] = ()) -> str:
    """What the wheel depends on: the sdist, the flags, the variants and this recipe's version."""
    flags = cmake_args(native, cuda_archs)
    text = "\n".join([SDIST_SHA256, *(flags if native else (*flags, *VARIANTS)), "recipe 1"])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def default_cache() -> Path:
    base = os.environ.get("APPLIANCE_WHEEL_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "appliance", "wheels")
    return Path(base)


def keep_variants(cmake: str, keep: tuple[str, ...] = VARIANTS) -> str:
    """ggml's CMakeLists with only `keep` (VARIANTS) left in its x86 list; an upstream change that drops
    one of them (or renames the call) is an error, not a silently different build."""
    found = set(_VARIANT_LINE.findall(cmake))
    missing = [v for v in keep if v not in found]
    if missing:
        raise BuildError(f"ggml's CMakeLists.txt has no CPU variant {', '.join(missing)}; update VARIANTS for this llama.cpp.")
    return _VARIANT_LINE.sub(lambda m: m[0] if m[1] in keep else "", cmake)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch_sdist(dest: Path) -> Path:
    """The release's sdist, checked against SDIST_SHA256 (pip refuses any other bytes)."""
    req = dest / "sdist.txt"
    req.write_text(f"llama-cpp-python=={VERSION} --hash=sha256:{SDIST_SHA256}\n")
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check", "--no-deps",
                    "--no-binary", ":all:", "--require-hashes", "--no-cache-dir", "-d", str(dest), "-r", str(req)], check=True)
    sdist = dest / SDIST
    if sha256_file(sdist) != SDIST_SHA256:
        raise BuildError(f"{sdist} does not match the pinned SHA-256; delete it and retry.")
    return sdist


def build(cache: Path, jobs: int | None = None, native: bool = False, cuda_archs: tuple[str, ...] = ()) -> Path:
    """The portable wheel (with `cuda_archs`, its CUDA variant; for benchmarks, the native one), built
    once per key; returns its path."""
    kind = "native-" if native else "cuda-" if cuda_archs else ""
    out = cache / f"llama-cpp-python-{VERSION}-{kind}{build_key(native, cuda_archs)}"
    done = out / "SHA256SUMS"
    if done.is_file():
        name, digest = _read_sums(done)
        wheel = out / name
        if wheel.is_file() and sha256_file(wheel) == digest:
            return wheel
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="llama-wheel-") as tmp:
        work = Path(tmp)
        sdist = fetch_sdist(work)
        with tarfile.open(sdist) as tf:
            tf.extractall(work, filter="data")
        src = work / SDIST.removesuffix(".tar.gz")
        cmake = src / _GGML_CMAKE
        if not native:
            cmake.write_text(keep_variants(cmake.read_text()))
        env = {k: v for k, v in os.environ.items() if k != "SOURCE_DATE_EPOCH"}  # it turns ggml's SIMD off
        env["CMAKE_ARGS"] = " ".join(cmake_args(native, cuda_archs))
        env["CMAKE_BUILD_PARALLEL_LEVEL"] = str(jobs or os.cpu_count() or 2)
        wheels = work / "wheels"
        subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--disable-pip-version-check", "--no-deps",
                        "--no-cache-dir", "-w", str(wheels), str(src)], env=env, check=True)
        built = sorted(wheels.glob("llama_cpp_python-*.whl"))
        if len(built) != 1:
            raise BuildError(f"the build left {len(built)} wheels in {wheels}, expected one.")
        try:
            if not native:
                check_wheel(built[0], cuda=bool(cuda_archs))
        except BuildError:
            shutil.copyfile(built[0], out / f"rejected-{built[0].name}")  # kept for a look
            raise
        wheel = out / built[0].name
        tmp_wheel = wheel.with_suffix(".partial")
        shutil.copyfile(built[0], tmp_wheel)
        os.replace(tmp_wheel, wheel)
    tmp_sums = done.with_suffix(".partial")
    tmp_sums.write_text(f"{sha256_file(wheel)}  {wheel.name}\n")
    os.replace(tmp_sums, done)
    return wheel


def _read_sums(path: Path) -> tuple[str, str]:
    digest, name = path.read_text().split()
    return name, digest


def check_wheel(wheel: Path, cuda: bool = False) -> None:
    """The wheel carries every variant and no AMX one, and no single (native) CPU library; the CUDA
    build also its CUDA library."""
    import zipfile

    names = {Path(n).name for n in zipfile.ZipFile(wheel).namelist() if "/lib/" in n}
    have = {n.removeprefix("libggml-cpu-").removesuffix(".so") for n in names if n.startswith("libggml-cpu-")}
    if have != set(VARIANTS):
        raise BuildError(f"{wheel.name} carries CPU variants {sorted(have)}, expected {sorted(VARIANTS)}.")
    if "libggml-cpu.so" in names or any(v in have for v in NEVER):
        raise BuildError(f"{wheel.name} carries a native or AMX CPU library; it would not run everywhere.")
    if cuda != ("libggml-cuda.so" in names):
        raise BuildError(f"{wheel.name} {'lacks' if cuda else 'carries'} libggml-cuda.so.")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m installer.toolchain.llama_wheel", description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", type=Path, default=None, help="where built wheels are kept (default: %(default)s)")
    ap.add_argument("--key", action="store_true", help="print the build key and exit")
    ap.add_argument("--native", action="store_true", help="build the -march=native wheel instead (benchmarks only; never ships)")
    ap.add_argument("--cuda", nargs="?", const="7.5", metavar="CC",
                    help="build the CUDA variant for compute capability CC (default 7.5) and newer")
    args = ap.parse_args(argv)
    archs = cuda_archs(args.cuda) if args.cuda else ()
    if args.key:
        print(build_key(args.native, archs))
        return 0
    try:
        print(build(args.cache or default_cache(), native=args.native, cuda_archs=archs))
    except (BuildError, subprocess.CalledProcessError) as e:
        print(f"error: building the portable llama-cpp-python wheel failed: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
