"""torch's CUDA build and its NVIDIA libraries for the bundle's platform, from the package registry,
downloaded once into a cache of their own (several GB: never in `make test`).

The lock pins the CPU build of torch (`torch==<v>+cpu`); the registry's default index serves the
CUDA build of the same version (`torch==<v>`, manylinux x86-64) and pulls in `nvidia-*`, `cuda-*`
and `triton`. pip runs `--isolated` here, so this machine's own find-links (which may carry the CPU
build under the same version) cannot stand in for it. The first download writes SHA256SUMS; every
later build checks the cached files against it.

    python -m installer.toolchain.cuda_wheels [--torch VERSION]   # fetch into the cache, print its folder
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from appliance.errors import SpecError
from installer.toolchain.llama_wheel import sha256_file

SUMS = "SHA256SUMS"
# pip takes exact platform tags: every manylinux level a wheel of the set may carry.
PLATFORMS = (*(f"manylinux_2_{i}_x86_64" for i in range(28, 4, -1)), "manylinux2014_x86_64", "manylinux2010_x86_64",
             "manylinux1_x86_64", "linux_x86_64")


@dataclass(frozen=True)
class CudaWheels:
    folder: Path
    sha256: dict[str, str]  # file name -> SHA-256, as recorded at the first download

    @property
    def wheels(self) -> list[Path]:
        return [self.folder / name for name in sorted(self.sha256)]


def python_tag() -> str:
    return f"{sys.version_info.major}{sys.version_info.minor}"


def default_cache() -> Path:
    base = os.environ.get("APPLIANCE_CUDA_WHEELS") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "appliance", "cuda-wheels")
    return Path(base)


def folder(torch_version: str, cache: Path | None = None) -> Path:
    return (cache or default_cache()) / f"torch-{torch_version}-cp{python_tag()}-manylinux_x86_64"


def platform_args() -> list[str]:
    py = python_tag()
    return [a for p in PLATFORMS for a in ("--platform", p)] + [
        "--python-version", py, "--implementation", "cp", "--abi", f"cp{py}", "--abi", "abi3", "--abi", "none"]


def cached(torch_version: str, cache: Path | None = None) -> CudaWheels | None:
    """The cached set when it is complete and every file matches its recorded SHA-256; else None."""
    d = folder(torch_version, cache)
    try:
        lines = (d / SUMS).read_text().splitlines()
    except OSError:
        return None
    sums = {}
    for line in lines:
        digest, _, name = line.partition("  ")
        if name.strip():
            sums[name.strip()] = digest
    if not sums or not all((d / n).is_file() and sha256_file(d / n) == h for n, h in sums.items()):
        return None
    return CudaWheels(d, sums)


def fetch(torch_version: str, cache: Path | None = None, log: Callable[[str], None] = lambda _m: None) -> CudaWheels:
    """The cached set, downloaded first when it is missing or damaged."""
    have = cached(torch_version, cache)
    if have is not None:
        return have
    d = folder(torch_version, cache)
    partial = d.with_name(d.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    log(f"downloading torch {torch_version} (CUDA build) and its NVIDIA libraries into {d} (several GB, once)")
    cert = ["--cert", os.environ["PIP_CERT"]] if os.environ.get("PIP_CERT") else []
    cmd = [sys.executable, "-m", "pip", "download", "--isolated", "--disable-pip-version-check", "--quiet", *cert,
           f"torch=={torch_version}", *platform_args(), "--only-binary=:all:", "-d", str(partial)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = " / ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
        raise SpecError(f"Downloading torch {torch_version}'s CUDA build failed: {tail}",
                        "Check that this machine reaches the package registry, then build again.")
    names = sorted(p.name for p in partial.glob("*.whl"))
    torch = [n for n in names if re.match(rf"torch-{re.escape(torch_version)}-", n)]
    if not torch or not any(n.startswith("nvidia_") for n in names):
        raise SpecError(f"The registry's torch {torch_version} came without its CUDA libraries ({', '.join(names[:5])}).",
                        "The registry serves a CPU build under that version; point pip at one that serves the CUDA build.")
    (partial / SUMS).write_text("".join(f"{sha256_file(partial / n)}  {n}\n" for n in names))
    shutil.rmtree(d, ignore_errors=True)
    os.replace(partial, d)
    got = cached(torch_version, cache)
    assert got is not None
    return got


def main(argv: list[str] | None = None) -> int:
    from installer.toolchain.lockfile import LOCK, pins

    ap = argparse.ArgumentParser(prog="python -m installer.toolchain.cuda_wheels", description=__doc__.split("\n\n")[0])
    ap.add_argument("--torch", help="torch version (default: the lock's, without +cpu)")
    args = ap.parse_args(argv)
    version = args.torch or pins(LOCK.read_text())["torch"][0].split("+")[0]
    try:
        got = fetch(version, log=lambda m: print(m, file=sys.stderr))
    except SpecError as e:
        print(f"error: {e.message}", file=sys.stderr)
        return 1
    size = sum(p.stat().st_size for p in got.wheels)
    print(f"{got.folder}: {len(got.wheels)} wheels, {size / 2**30:.2f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
