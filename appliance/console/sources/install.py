"""The install screen's work, on the installer's own code: find bundles (USB mounts first), verify
one with per-file progress, plan its tiers on this machine (the planner `appliance hw` uses), and run
installer.steps.install.install() with the console's dialogs as its `confirm` and its events as progress.
"""

from __future__ import annotations

import glob
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.paths import Layout

USB_GLOBS = ("/media/*/*", "/media/*", "/run/media/*/*", "/mnt/*")


@dataclass(frozen=True)
class Candidate:
    path: Path
    usb: bool


def is_bundle(d: Path) -> bool:
    from installer.bundle.manifest import MANIFEST, SIGNATURE

    return (d / MANIFEST).is_file() and (d / SIGNATURE).is_file()


def _bundles_under(mount: Path) -> list[Path]:
    if is_bundle(mount):
        return [mount]
    try:
        return sorted(d for d in mount.iterdir() if d.is_dir() and is_bundle(d))
    except OSError:
        return []


def find_bundles(mounts: tuple[Path, ...] | None = None, local: tuple[Path, ...] | None = None) -> list[Candidate]:
    """Bundles on removable media first, then the working directory and ./demo/bundle."""
    if mounts is None:
        mounts = tuple(Path(p) for g in USB_GLOBS for p in sorted(glob.glob(g)))
    if local is None:
        local = (Path.cwd(), Path.cwd() / "demo")
    out: list[Candidate] = []
    for group, usb in ((mounts, True), (local, False)):
        for m in group:
            for b in _bundles_under(m):
                if all(c.path != b.resolve() for c in out):
                    out.append(Candidate(b.resolve(), usb))
    return out


def find_key_file(bundle: Path, mounts: tuple[Path, ...] = ()) -> Path | None:
    """A `model.key` beside the bundle or on another stick (the second USB stick of the delivery)."""
    places = [bundle.parent, bundle.parent / "keys", *mounts, *(Path(p) for g in USB_GLOBS for p in glob.glob(g))]
    for d in places:
        for name in ("model.key", "keys/model.key"):
            if (d / name).is_file():
                return (d / name).resolve()
    return None


@dataclass(frozen=True)
class Checked:
    manifest: Any  # installer.bundle.manifest.Manifest
    fingerprint: str
    trust: str  # how the signing key was chosen
    plan: Any  # installer.planning.planner.Plan


def _context(layout: Layout, runner: Any, opts: Any, emit: Callable[[Any], None], confirm: Callable[[str], bool], systemd: bool) -> Any:
    from installer.steps.context import Context
    from installer.system.target import Target

    return Context(layout=layout, opts=opts, runner=runner, target=Target(), emit=emit, confirm=confirm,
                   systemd_running=systemd and not opts.no_systemd)


def check_bundle(layout: Layout, bundle: Path, machine: Path | None, confirm: Callable[[str], bool],
                 on_file: Callable[[str, int, int], None]) -> Checked:
    """The install's own verify (asking through `confirm` on a first install whether the key is the
    vendor's), then every tier judged on this machine: installer/steps/prepare.py, as `appliance install`."""
    from installer.steps.context import Options
    from installer.steps.prepare import judge, verify

    v = verify(_context(layout, None, Options(bundle=bundle), lambda e: None, confirm, False), on_file)
    return Checked(v.manifest, v.signer, v.trust, judge(layout, v.manifest, machine)[1])


def run_install(layout: Layout, runner: Any, systemd: bool, bundle: Path, *, tier: str | None, key_file: Path | None,
                passphrase: str | None, fingerprint: str, machine: Path | None,
                emit: Callable[[Any], None], confirm: Callable[[str], bool]) -> Any:
    """installer.steps.install.install() as `appliance install` runs it; returns the context (its plan, notices)."""
    from installer.steps.context import Options
    from installer.steps.install import install
    from installer.steps.lifecycle import install_lock

    with tempfile.TemporaryDirectory(prefix="appliance-console-") as tmp:
        pass_file = None
        if passphrase:
            # The installer reads secrets from files; this one lives in a private temp dir for the install only.
            pass_file = Path(tmp) / "passphrase"
            fd = os.open(pass_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(passphrase)
        opts = Options(bundle=bundle, tier=tier, key_file=None if passphrase else key_file, passphrase_file=pass_file,
                       trust_fingerprint=fingerprint, no_systemd=not systemd, machine=machine)
        ctx = _context(layout, runner, opts, emit, confirm, systemd)
        with install_lock(layout):
            install(ctx)
    return ctx
