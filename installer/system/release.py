"""Releases under /opt/appliance/releases/<id>/: a venv from the bundle's wheelhouse, rendered units, release.json.

A release directory is built as `<id>.partial` and renamed into place with release.json already
inside, so a directory without `.partial` is always complete; `current` is one atomic symlink.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance.atomic import PARTIAL_SUFFIX, fsync_dir
from appliance.errors import BundleError, HardwareError, StateError
from appliance.paths import Layout
from installer.bundle.manifest import Manifest, runtime_dir
from installer.system.runner import Runner

RELEASE_JSON = "release.json"
EXTRAS = ("server", "train", "console")
# What the server imports for each backend; the llama.cpp wheel links the system's libgomp.so.1.
ENGINE_MODULES = {"llama.cpp": ("llama_cpp",), "transformers": ("torch", "transformers", "peft")}


def release_id(manifest: Manifest) -> str:
    """Version and sequence: two bundles of one version (a re-signed fix) must not share a directory."""
    return f"{manifest.version}+{manifest.sequence}"


@dataclass(frozen=True)
class ModelRef:
    id: str
    key: str  # the content address: its directory under /var/lib/appliance/models
    bytes: int


@dataclass(frozen=True)
class ReleasePlan:
    """What one release is and how it runs here: chosen by the plan step, written as release.json."""

    id: str
    name: str
    version: str
    sequence: int
    issued_at: str
    tier: str
    uses_gpu: bool
    backend: str
    model: ModelRef
    model_settings: dict[str, Any]  # the [model] section this release wants in appliance.toml
    trainer_settings: dict[str, Any]  # and the [trainer] section
    extras: tuple[str, ...] = ()  # filled by the stage step: what the release venv carries
    installed_at: str = ""
    embeddings: ModelRef | None = None  # the tier's embedding model, if it names one
    embedding_settings: dict[str, Any] = field(default_factory=dict)  # and its [embeddings] section

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id, "name": self.name, "version": self.version, "sequence": self.sequence,
            "issued_at": self.issued_at, "tier": self.tier, "uses_gpu": self.uses_gpu, "backend": self.backend,
            "model": {"id": self.model.id, "key": self.model.key, "bytes": self.model.bytes},
            "config": {"model": self.model_settings, "trainer": self.trainer_settings},
        }
        if self.embeddings is not None:
            out["embeddings"] = {"id": self.embeddings.id, "key": self.embeddings.key, "bytes": self.embeddings.bytes}
            out["config"]["embeddings"] = self.embedding_settings
        if self.installed_at:
            out.update(extras=list(self.extras), installed_at=self.installed_at)
        return out

    @classmethod
    def from_json(cls, d: dict[str, Any], where: str = RELEASE_JSON) -> ReleasePlan:
        try:
            m, config, e = d["model"], d.get("config") or {}, d.get("embeddings")
            return cls(id=str(d["id"]), name=str(d["name"]), version=str(d["version"]), sequence=int(d["sequence"]),
                       issued_at=str(d["issued_at"]), tier=str(d["tier"]), uses_gpu=bool(d.get("uses_gpu")),
                       backend=str(d.get("backend", "llama.cpp")),
                       model=ModelRef(str(m["id"]), str(m["key"]), int(m["bytes"])),
                       model_settings=dict(config.get("model") or {}), trainer_settings=dict(config.get("trainer") or {}),
                       extras=tuple(d.get("extras") or ()), installed_at=str(d.get("installed_at") or ""),
                       embeddings=ModelRef(str(e["id"]), str(e["key"]), int(e["bytes"])) if e else None,
                       embedding_settings=dict(config.get("embeddings") or {}))
        except (KeyError, TypeError, ValueError) as e:
            raise StateError(f"{where} is damaged ({type(e).__name__}: {e}).",
                             "Reinstall that release from its bundle, or remove its directory.") from None


@dataclass(frozen=True)
class Release:
    id: str
    dir: Path
    info: dict[str, Any]

    @property
    def plan(self) -> ReleasePlan:
        return ReleasePlan.from_json(self.info, str(self.dir / RELEASE_JSON))

    @property
    def sequence(self) -> int:
        return int(self.info["sequence"])

    @property
    def version(self) -> str:
        return str(self.info["version"])

    @property
    def appliance(self) -> Path:
        return self.dir / "venv/bin/appliance"

    def summary(self) -> dict[str, Any]:
        return {"id": self.id, "version": self.version, "sequence": self.sequence, "tier": self.info.get("tier"),
                "model": self.info.get("model", {}).get("id"), "installed_at": self.info.get("installed_at")}


def read_release(directory: Path) -> Release | None:
    """The release in `directory`, or None when it is not a complete release."""
    if directory.name.endswith(PARTIAL_SUFFIX) or directory.name.startswith(".") or directory.is_symlink():
        return None  # a link named like a release points into a `.partial` being staged
    try:
        info = json.loads((directory / RELEASE_JSON).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(info, dict) or info.get("id") != directory.name:
        return None
    return Release(directory.name, directory, info)


def list_releases(layout: Layout) -> list[Release]:
    """Complete releases, oldest sequence first."""
    if not layout.releases.is_dir():
        return []
    found = [r for d in layout.releases.iterdir() if d.is_dir() and not d.is_symlink() and (r := read_release(d))]
    return sorted(found, key=lambda r: (r.sequence, r.id))


def current_release(layout: Layout) -> Release | None:
    """What `current` points at; None when nothing is installed. A dangling link is an error."""
    if not layout.current.is_symlink():
        return None
    target = os.readlink(layout.current)
    rel = read_release(layout.opt / target)
    if rel is None or rel.dir.parent != layout.releases:
        raise StateError(f"{layout.current} points at {target}, which is not a complete release.",
                         "Run `appliance rollback`, or install the bundle again.")
    return rel


def current_or_none(layout: Layout) -> Release | None:
    """Like current_release, but a dangling or broken link reads as nothing installed (the steps repair it)."""
    try:
        return current_release(layout)
    except StateError:
        return None


def previous_release(layout: Layout, current: Release | None) -> Release | None:
    """The newest release older than `current` (by sequence)."""
    older = [r for r in list_releases(layout) if current is None or (r.sequence, r.id) < (current.sequence, current.id)]
    return older[-1] if older else None


def link_target(release_id_: str) -> str:
    return f"releases/{release_id_}"


def _wheel_metadata(wheel: Path) -> str:
    with zipfile.ZipFile(wheel) as z:
        name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        return z.read(name).decode()


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def carried_extras(wheel: Path, sbom_names: set[str]) -> list[str]:
    """The appliance extras whose every requirement the wheelhouse carries (pip --no-index needs them all)."""
    needs: dict[str, set[str]] = {}
    for line in _wheel_metadata(wheel).splitlines():
        m = re.match(r"Requires-Dist:\s*([A-Za-z0-9_.-]+).*extra\s*==\s*['\"]([^'\"]+)['\"]", line)
        if m:
            needs.setdefault(m[2], set()).add(_norm(m[1]))
    return [e for e in EXTRAS if e in needs and needs[e] <= sbom_names]


def own_wheel(bundle: Path, manifest: Manifest, runtime: str = "cpu") -> Path:
    own = [e["path"] for e in manifest.sbom if e["name"] == "appliance" and e["path"].startswith(runtime_dir(runtime))]
    if not own:
        raise BundleError("The bundle's wheelhouse has no appliance wheel.", "Ask the vendor for a complete bundle.")
    return bundle / own[0]


def stage_wheelhouse(bundle: Path, manifest: Manifest, dest: Path, runtime: str = "cpu") -> Path:
    """Copy the manifest's wheels of one runtime variant off the stick into `dest` (same relative paths), hashing what is
    read: pip then reads only these copies, so a stick rewritten after verification cannot swap a
    wheel in. Returns `dest`, usable as build_venv's `bundle`."""
    from installer.bundle.reader import copy_verified

    for entry in manifest.files:
        if entry.path.startswith(runtime_dir(runtime)):
            copy_verified(bundle, entry, dest / entry.path)
    return dest


def build_venv(runner: Runner, bundle: Path, manifest: Manifest, venv: Path, python: str | None = None,
               backend: str | None = None, runtime: str = "cpu") -> list[str]:
    """A venv with the appliance and the extras the wheelhouse carries, from the stick only (no index)
    and from one runtime variant's folder only (wheels/<runtime>/); with the server among them, it must
    load `backend`'s engine (check_engine_loads).

    When this interpreter has pip, it installs into a venv made without one (`pip --python`): a
    release is never changed after staging, and it saves seconds. An installed release has no pip
    (upgrades run from it), so then the venv gets its own.
    """
    if runtime not in manifest.runtimes:
        raise BundleError(f"The bundle carries no {runtime} runtime (wheels/{runtime}/), which the tier runs.",
                          "Choose a tier whose runtime the bundle carries (`appliance hw --bundle DIR`), or ask the vendor for one.")
    wheel = own_wheel(bundle, manifest, runtime)
    extras = carried_extras(wheel, {_norm(e["name"]) for e in manifest.sbom if e["path"].startswith(runtime_dir(runtime))})
    spec = f"appliance[{','.join(extras)}]" if extras else "appliance"
    # --isolated: this host's pip configuration (its find-links, indexes, constraints) never adds a wheel.
    # --no-compile, then compileall on every core: pip compiles the bytecode on one (57 s against 15 + 22 s
    # on the demo's wheelhouse, the same .pyc files).
    args = ["--isolated", "install", "--quiet", "--disable-pip-version-check", "--no-index", "--find-links", str(bundle / runtime_dir(runtime)),
            "--no-cache-dir", "--no-compile", spec]
    if importlib.util.find_spec("pip") is not None:
        runner.run([python or sys.executable, "-m", "venv", "--clear", "--without-pip", str(venv)], timeout=300)
        runner.run([sys.executable, "-m", "pip", "--python", str(venv / "bin/python"), *args], timeout=1800)
    else:
        runner.run([python or sys.executable, "-m", "venv", "--clear", str(venv)], timeout=300)
        runner.run([str(venv / "bin/python"), "-m", "pip", *args], timeout=1800)
    # check=False: as under pip, a module written for a newer Python than the venv's (torch carries one)
    # stays uncompiled and is no failure.
    runner.run([str(venv / "bin/python"), "-m", "compileall", "-q", "-j", "0", str(venv / "lib")], check=False, timeout=1800)
    if backend and "server" in extras:  # a release without the server (a test bundle's bare wheelhouse) loads no engine
        check_engine_loads(runner, venv, backend)
    return extras


def check_engine_loads(runner: Runner, venv: Path, backend: str) -> None:
    """Import the tier's engine in the new venv, so a missing system library stops the install
    before anything is switched, instead of the server failing at its first start."""
    modules = ENGINE_MODULES.get(backend, ())
    if not modules:
        return
    proc = runner.run([str(venv / "bin/python"), "-c", f"import {', '.join(modules)}"], check=False, timeout=600)
    if proc.returncode == 0:
        return
    lines = (proc.stderr or proc.stdout or "").strip().splitlines()
    detail = lines[-1] if lines else f"exit code {proc.returncode}"
    lib = re.search(r"(lib[\w.+-]+?\.so[\w.]*): cannot open shared object file", detail)
    hint = (f"Install the system package that provides {lib[1]} (on Debian and Ubuntu, libgomp1 gives libgomp.so.1) "
            "and run the install again; nothing was switched." if lib else
            "The bundle's wheels may not fit this machine; `appliance hw --bundle DIR` shows what it needs.")
    raise HardwareError(f"The {backend} engine cannot load on this machine: {detail}", hint)


def _syncfs(path: Path) -> bool:
    """syncfs(2): one call makes everything written to the filesystem holding `path` durable."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            return bool(libc.syncfs(fd) == 0)
        finally:
            os.close(fd)
    except (OSError, AttributeError):
        return False


def fsync_tree(root: Path) -> None:
    """Make every file and directory entry under `root` durable before it is renamed into use.

    A venv holds thousands of files (tens of thousands with torch); one syncfs is far cheaper than
    an fsync each, and covers the directory entries too. Without syncfs, fsync them one by one.
    """
    if _syncfs(root):
        return
    for d, _dirs, files in os.walk(root):
        for name in files:
            p = os.path.join(d, name)
            if not os.path.islink(p):
                fd = os.open(p, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        fsync_dir(Path(d))
