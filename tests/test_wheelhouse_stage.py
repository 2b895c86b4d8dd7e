"""pip builds a release from a copy of the wheelhouse taken off the stick and hashed as it is read,
never from the stick itself: a wheel swapped after verification is refused, not installed."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

from appliance.errors import BundleError
from installer.bundle.manifest import MANIFEST, parse_manifest
from installer.system.release import stage_wheelhouse
from tests.install_fixtures import InstallBundles


def test_wheels_are_copied_off_the_stick_and_hashed_again(install_bundles: InstallBundles, tmp_path: Path) -> None:
    stick = tmp_path / "stick"
    shutil.copytree(install_bundles.b1, stick)
    manifest = parse_manifest((stick / MANIFEST).read_bytes())
    wheels = [e for e in manifest.files if e.path.startswith("wheels/")]
    assert wheels
    staged = stage_wheelhouse(stick, manifest, tmp_path / "stage")
    assert all(hashlib.sha256((staged / e.path).read_bytes()).hexdigest() == e.sha256 for e in wheels)
    assert sorted(p.relative_to(staged).as_posix() for p in staged.rglob("*.whl")) == sorted(e.path for e in wheels)

    # The stick is rewritten after verification: one byte of the last wheel changes.
    victim = stick / wheels[-1].path
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 1
    victim.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=f"{wheels[-1].path} does not match its SHA-256"):
        stage_wheelhouse(stick, manifest, tmp_path / "again")
    left = [p.name for p in (tmp_path / "again").rglob("*") if p.is_file()]
    assert Path(wheels[-1].path).name not in left and not [n for n in left if n.endswith(".partial")]
