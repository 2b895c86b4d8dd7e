"""The bundle's wheelhouse: the appliance's own wheel and every dependency, pinned, plus its SBOM."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from appliance.errors import SpecError
from installer.spec import Wheelhouse

_WHEEL_NAME = re.compile(r"^(?P<name>[^-]+)-(?P<version>[^-]+)(-\d[^-]*)?-(?P<tags>[^-]+-[^-]+-[^-]+)\.whl$")


def _pip(*args: str) -> None:
    cmd = [sys.executable, "-m", "pip", "--disable-pip-version-check", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise SpecError(f"pip failed while building the wheelhouse: {' / '.join(tail)}", "Fix the environment that builds the bundle and retry.")


def environment_pins() -> str:
    """The versions installed where the bundle is built, so the wheelhouse is what was tested."""
    proc = subprocess.run([sys.executable, "-m", "pip", "freeze", "--exclude-editable"], capture_output=True, text=True, check=True)
    return "".join(line + "\n" for line in proc.stdout.splitlines() if "==" in line and not line.startswith("appliance=="))


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
    with tempfile.NamedTemporaryFile("w", suffix=".txt") as pins:
        pins.write(environment_pins())
        pins.flush()
        _pip("wheel", "--quiet", "--wheel-dir", str(out), "--constraint", pins.name, f"{own[-1]}{extras}")


def sbom(digests: dict[str, str], prefix: str = "wheels/") -> list[dict[str, Any]]:
    """One entry per wheel in the bundle's file digests: name, version, platform tags, path, SHA-256."""
    entries = []
    for path in sorted(p for p in digests if p.startswith(prefix) and p.endswith(".whl")):
        m = _WHEEL_NAME.match(path[len(prefix):])
        if not m:
            raise SpecError(f"{path} is not a valid wheel file name.")
        entries.append({"name": m["name"].replace("_", "-").lower(), "version": m["version"], "tags": m["tags"],
                        "path": path, "sha256": digests[path]})
    return entries
