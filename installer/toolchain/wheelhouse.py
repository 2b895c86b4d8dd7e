"""The bundle's wheelhouse: one folder per runtime variant (wheels/cpu/, wheels/cuda/), each holding
the appliance's own wheel and every dependency, so that pip installs a release from one folder alone.

- cpu: every dependency as requirements/lock.txt pins it (each wheel checked against the lock's
  hashes; the lock's torch is the CPU build), llama-cpp-python as the project's portable build
  (installer.toolchain.llama_wheel).
- cuda: the same wheels, but torch's CUDA build of the locked version and its NVIDIA libraries from
  the package registry (installer.toolchain.cuda_wheels, cached, each file's SHA-256 recorded at its
  first download), and llama-cpp-python built with GGML_CUDA=ON where a CUDA toolkit is at hand.

The SBOM is installer.toolchain.sbom's.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from appliance.errors import SpecError
from installer.bundle.manifest import RUNTIMES
from installer.toolchain import cuda_wheels, llama_wheel
from installer.toolchain.llama_wheel import sha256_file
from installer.toolchain.lockfile import BUILT_HERE, constraints, normalize
from installer.toolchain.lockfile import pins as pins_of
from installer.toolchain.sbom import WHEEL_NAME
from installer.toolchain.spec import Wheelhouse

Log = Callable[[str], None]


def _pip(*args: str) -> None:
    cmd = [sys.executable, "-m", "pip", "--disable-pip-version-check", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise SpecError(f"pip failed while building the wheelhouse: {' / '.join(tail)}", "Fix the environment that builds the bundle and retry.")


def wheel_name(wheel: Path) -> str:
    m = WHEEL_NAME.match(wheel.name)
    return normalize(m["name"]) if m else wheel.name


def _check_locked(out: Path, lock: dict[str, tuple[str, frozenset[str]]], llama: Path | None,
                  recorded: dict[str, str] | None = None) -> None:
    """Every wheel is the one the lock names, byte for byte (or, in the cuda variant, one whose SHA-256
    the CUDA cache recorded); llama-cpp-python is the project's own build."""
    for wheel in sorted(out.glob("*.whl")):
        m = WHEEL_NAME.match(wheel.name)
        name = wheel_name(wheel)
        if name == "appliance":
            continue
        digest = sha256_file(wheel)
        if name == BUILT_HERE:
            if llama is None or digest != sha256_file(llama):
                raise SpecError(f"The wheelhouse's {wheel.name} is not the project's build {llama}.",
                                "Remove the wheel folder and build the bundle again.")
            continue
        if recorded is not None and recorded.get(wheel.name) == digest:
            continue
        version, hashes = lock.get(name, ("", frozenset()))
        if not m or m["version"] != version or digest not in hashes:
            raise SpecError(f"The wheelhouse's {wheel.name} is not what requirements/lock.txt pins"
                            + (f" ({name}=={version})." if version else " (the lock has no such package)."),
                            "Run `make lock` in the project (or pin the package in pyproject.toml) and build again.")


# Never packed into the appliance's wheel: build trees, caches and local artifacts of the source tree.
_NOT_SOURCE = shutil.ignore_patterns(".git", ".venv", "build", "dist", "demo", "*.egg-info", "__pycache__", ".*_cache", ".whl", ".gl")


def parse_runtimes(text: str | Iterable[str]) -> tuple[str, ...]:
    """`cpu`, `cuda` or `cpu,cuda` (as `--runtime` takes it) as a tuple in the bundle's order."""
    asked = [r.strip() for r in (text.split(",") if isinstance(text, str) else text) if r.strip()]
    unknown = [r for r in asked if r not in RUNTIMES]
    if unknown or not asked:
        raise SpecError(f"The runtime {', '.join(unknown) or '(none)'} is not one the bundle format knows.",
                        f"Use --runtime with {' or '.join(RUNTIMES)}, or both separated by a comma.")
    return tuple(r for r in RUNTIMES if r in asked)


def build_wheelhouse(wh: Wheelhouse, out: Path, runtimes: Iterable[str] = ("cpu",), log: Log = lambda _m: None,
                     cuda_floor: str = "7.5", cuda_llama: bool = True) -> dict[str, int]:
    """Each runtime variant into out/<runtime>/; returns each variant's size in bytes. `cuda_floor`: the
    lowest compute capability the bundle's GPU tiers allow (the CUDA llama.cpp is built from it up)."""
    wanted = parse_runtimes(runtimes)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="appliance-wheels-") as tmp:
        cpu = out / "cpu" if "cpu" in wanted else Path(tmp) / "cpu"
        lock_text = _build_cpu(wh, cpu)
        if "cuda" in wanted:
            _build_cuda(wh, cpu, out / "cuda", lock_text, log, (cuda_floor, cuda_llama))
    sizes = {r: sum(p.stat().st_size for p in (out / r).glob("*.whl")) for r in wanted}
    for r, size in sizes.items():
        log(f"wheels/{r}: {len(list((out / r).glob('*.whl')))} wheels, {size / 2**30:.2f} GiB")
    return sizes


def _own_wheel(wh: Wheelhouse, out: Path) -> Path:
    with tempfile.TemporaryDirectory(prefix="appliance-src-") as tmp:
        # A clean copy: setuptools reuses ./build/lib, where a deleted module would linger and ship.
        src = Path(tmp) / "src"
        shutil.copytree(wh.project, src, ignore=_NOT_SOURCE)
        _pip("wheel", "--no-deps", "--no-build-isolation", "--quiet", "--wheel-dir", str(out), str(src))
    own = sorted(out.glob("appliance-*.whl"))
    if not own:
        raise SpecError("Building the appliance's own wheel produced no appliance-*.whl.")
    return own[-1]


def _lock_text(wh: Wheelhouse) -> str:
    lock_file = wh.project / "requirements" / "lock.txt"
    if not lock_file.is_file():
        raise SpecError(f"The project {wh.project} has no requirements/lock.txt to resolve the wheelhouse from.",
                        "Run `make lock` in the project.")
    return lock_file.read_text()


def _portable_llama() -> Path:
    try:
        return llama_wheel.build(llama_wheel.default_cache())
    except (llama_wheel.BuildError, subprocess.CalledProcessError) as e:
        raise SpecError(f"Building the portable llama-cpp-python wheel failed: {e}",
                        "Run `python -m installer.toolchain.llama_wheel` in the project to see the whole build log.") from None


def _build_cpu(wh: Wheelhouse, out: Path) -> str:
    """The cpu variant into `out`; returns the lock's text ('' for a wheelhouse without dependencies)."""
    out.mkdir(parents=True, exist_ok=True)
    own = _own_wheel(wh, out)
    if not wh.dependencies:
        return ""
    extras = f"[{','.join(wh.extras)}]" if wh.extras else ""
    lock_text = _lock_text(wh)
    llama = _portable_llama()
    with tempfile.NamedTemporaryFile("w", suffix=".txt") as pins:
        pins.write(constraints(lock_text))
        pins.flush()
        # The lock's versions, and llama-cpp-python only as the portable wheel (never its sdist).
        _pip("wheel", "--quiet", "--wheel-dir", str(out), "--constraint", pins.name, "--find-links", str(llama.parent),
             "--only-binary", BUILT_HERE, f"{own}{extras}")
    _check_locked(out, pins_of(lock_text), llama)
    return lock_text


def _build_cuda(wh: Wheelhouse, cpu: Path, out: Path, lock_text: str, log: Log, llama_how: tuple[str, bool]) -> None:
    """The cuda variant: the cpu variant's wheels with torch, its NVIDIA libraries and llama.cpp swapped
    for their CUDA builds."""
    out.mkdir(parents=True, exist_ok=True)
    if not wh.dependencies:  # a test bundle's bare wheelhouse: the appliance's wheel alone
        for w in cpu.glob("appliance-*.whl"):
            shutil.copy2(w, out / w.name)
        return
    lock = pins_of(lock_text)
    names = {wheel_name(w) for w in cpu.glob("*.whl")}
    recorded: dict[str, str] = {}
    for w in cpu.glob("*.whl"):
        if wheel_name(w) not in {"torch", BUILT_HERE}:
            shutil.copy2(w, out / w.name)
    if "torch" in names:  # the extras carry torch: its CUDA build and what that needs beyond the cpu variant
        fetched = cuda_wheels.fetch(lock["torch"][0].split("+")[0], log=log)
        recorded = fetched.sha256
        have = {wheel_name(w) for w in out.glob("*.whl")}
        for w in fetched.wheels:
            if wheel_name(w) not in have:
                shutil.copy2(w, out / w.name)
    llama = _cuda_llama(log, *llama_how) if BUILT_HERE in names else None
    if llama is not None:
        shutil.copy2(llama, out / llama.name)
    _check_locked(out, lock, llama, recorded)
    _check_installable(out, wh.extras)


def _cuda_llama(log: Log, floor: str, build: bool = True) -> Path:
    """llama-cpp-python built with GGML_CUDA=ON when nvcc is on the PATH; else the portable build, said
    out loud: llama.cpp GPU tiers of this bundle then refuse to start (they never run on the CPU)."""
    toolkit = Path(os.environ.get("CUDA_HOME") or "/usr/local/cuda")
    missing = "nvcc on the PATH" if shutil.which("nvcc") is None else (
        f"cuBLAS in the CUDA toolkit {toolkit} (ggml's CUDA backend links it)" if not (toolkit / "include/cublas_v2.h").is_file() else None)
    if missing or not build:
        log(f"{'no ' + missing if missing else 'asked not to build llama.cpp with CUDA'}: the cuda runtime carries the "
            "portable (CPU-only) llama.cpp, and its llama.cpp GPU tiers will refuse to start")
        return _portable_llama()
    try:
        archs = llama_wheel.cuda_archs(floor)
        log(f"building llama-cpp-python with CUDA for compute capabilities {', '.join(archs)} (long; cached afterwards)")
        return llama_wheel.build(llama_wheel.default_cache(), cuda_archs=archs)
    except (llama_wheel.BuildError, subprocess.CalledProcessError) as e:
        raise SpecError(f"Building llama-cpp-python with CUDA failed: {e}",
                        "Run `python -m installer.toolchain.llama_wheel --cuda` in the project to see the whole build log.") from None


def _check_installable(out: Path, extras: Iterable[str]) -> None:
    """pip resolves the appliance with its extras from this folder alone (for this host: the bundle's
    platform is the building machine's)."""
    own = sorted(out.glob("appliance-*.whl"))
    spec = f"appliance[{','.join(extras)}]" if extras else "appliance"
    with tempfile.TemporaryDirectory(prefix="appliance-resolve-") as tmp:
        args: list[Any] = ["--isolated", "install", "--dry-run", "--quiet", "--no-index", "--find-links", str(out), "--target", tmp,
                           "--ignore-installed", "--only-binary=:all:", spec]
        try:
            _pip(*args)
        except SpecError as e:
            raise SpecError(f"The cuda wheelhouse cannot be installed from itself ({own[-1].name if own else 'no appliance wheel'}): "
                            f"{e.message}", "Delete the CUDA wheel cache (installer.toolchain.cuda_wheels) and build again.") from None
