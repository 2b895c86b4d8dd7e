"""The bundle's wheelhouse: the appliance's own wheel and every dependency, as requirements/lock.txt
pins them (each wheel checked against the lock's hashes), with llama-cpp-python as the project's
portable build (installer.toolchain.llama_wheel); the SBOM is installer.toolchain.sbom's."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from appliance.errors import SpecError
from installer.toolchain import llama_wheel
from installer.toolchain.llama_wheel import sha256_file
from installer.toolchain.lockfile import BUILT_HERE, constraints, normalize
from installer.toolchain.lockfile import pins as pins_of
from installer.toolchain.sbom import WHEEL_NAME
from installer.toolchain.spec import Wheelhouse


def _pip(*args: str) -> None:
    cmd = [sys.executable, "-m", "pip", "--disable-pip-version-check", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise SpecError(f"pip failed while building the wheelhouse: {' / '.join(tail)}", "Fix the environment that builds the bundle and retry.")


def _check_locked(out: Path, lock: dict[str, tuple[str, frozenset[str]]], llama: Path) -> None:
    """Every wheel pip fetched is the one the lock names, byte for byte; llama-cpp-python is the portable build."""
    for wheel in sorted(out.glob("*.whl")):
        m = WHEEL_NAME.match(wheel.name)
        name = normalize(m["name"]) if m else wheel.name
        if name == "appliance":
            continue
        if name == BUILT_HERE:
            if sha256_file(wheel) != sha256_file(llama):
                raise SpecError(f"The wheelhouse's {wheel.name} is not the portable build {llama}.",
                                "Remove the wheel folder and build the bundle again.")
            continue
        version, hashes = lock.get(name, ("", frozenset()))
        if not m or m["version"] != version or sha256_file(wheel) not in hashes:
            raise SpecError(f"The wheelhouse's {wheel.name} is not what requirements/lock.txt pins"
                            + (f" ({name}=={version})." if version else " (the lock has no such package)."),
                            "Run `make lock` in the project (or pin the package in pyproject.toml) and build again.")


# Never packed into the appliance's wheel: build trees, caches and local artifacts of the source tree.
_NOT_SOURCE = shutil.ignore_patterns(".git", ".venv", "build", "dist", "demo", "*.egg-info", "__pycache__", ".*_cache", ".whl", ".gl")


def build_wheelhouse(wh: Wheelhouse, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="appliance-src-") as tmp:
        # A clean copy: setuptools reuses ./build/lib, where a deleted module would linger and ship.
        src = Path(tmp) / "src"
        shutil.copytree(wh.project, src, ignore=_NOT_SOURCE)
        _pip("wheel", "--no-deps", "--no-build-isolation", "--quiet", "--wheel-dir", str(out), str(src))
    if not wh.dependencies:
        return
    own = sorted(out.glob("appliance-*.whl"))
    if not own:
        raise SpecError("Building the appliance's own wheel produced no appliance-*.whl.")
    extras = f"[{','.join(wh.extras)}]" if wh.extras else ""
    lock_file = wh.project / "requirements" / "lock.txt"
    if not lock_file.is_file():
        raise SpecError(f"The project {wh.project} has no requirements/lock.txt to resolve the wheelhouse from.",
                        "Run `make lock` in the project.")
    lock_text = lock_file.read_text()
    try:
        llama = llama_wheel.build(llama_wheel.default_cache())
    except (llama_wheel.BuildError, subprocess.CalledProcessError) as e:
        raise SpecError(f"Building the portable llama-cpp-python wheel failed: {e}",
                        "Run `python -m installer.toolchain.llama_wheel` in the project to see the whole build log.") from None
    with tempfile.NamedTemporaryFile("w", suffix=".txt") as pins:
        pins.write(constraints(lock_text))
        pins.flush()
        # The lock's versions, and llama-cpp-python only as the portable wheel (never its sdist).
        _pip("wheel", "--quiet", "--wheel-dir", str(out), "--constraint", pins.name, "--find-links", str(llama.parent),
             "--only-binary", BUILT_HERE, f"{own[-1]}{extras}")
    _check_locked(out, pins_of(lock_text), llama)
