"""A slim installable bundle (the appliance wheel and its core dependencies, a small random model), built once per session.

Unlike tests/bundle_fixtures.py's slim bundle, its wheelhouse resolves: `pip install --no-index`
of `appliance` from it succeeds, so the installer can stage a real release venv.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from installer.bundle.keys import fingerprint, load_public_key
from installer.toolchain.keygen import keygen
from tests.spec_files import one_model_spec, write_spec

REPO = Path(__file__).resolve().parent.parent
MODEL_BYTES = 300_000

def installable_spec(model: Path, tag: object, name: str = "slim") -> dict[str, Any]:
    """A spec that installs: its wheelhouse holds the appliance and every dependency, so a release venv builds."""
    return one_model_spec(model, name=name, model_id=f"tiny-{tag}", chunk_size=65536,
                          wheelhouse={"project": REPO, "extras": [], "dependencies": True},
                          tier={"gpu_layers": 0, "threads": 1, "needs": {"ram_mib": 64, "disk_mib": 16}})


@dataclass
class InstallBundles:
    keys: Path
    b1: Path  # sequence 1
    b2: Path  # sequence 2, another model file

    @property
    def pub(self) -> Path:
        return self.keys / "signing.pub"

    @property
    def model_key(self) -> Path:
        return self.keys / "model.key"

    @property
    def fingerprint(self) -> str:
        return fingerprint(load_public_key(self.pub))


def build(where: Path, sequence: int, keys: Path) -> Path:
    from installer.toolchain.build import build_bundle
    from installer.toolchain.spec import load_spec

    model = where / f"model-{sequence}.bin"
    model.write_bytes(os.urandom(MODEL_BYTES))
    spec = where / f"slim-{sequence}.toml"
    write_spec(spec, installable_spec(model, sequence))
    out = where / f"bundle-{sequence}"
    build_bundle(load_spec(spec), out, keys / "signing.key", sequence=sequence, model_key_path=keys / "model.key")
    return out


def build_pair(where: Path) -> InstallBundles:
    where.mkdir(parents=True, exist_ok=True)
    keys = where / "keys"
    keygen(keys)
    b1 = build(where, 1, keys)
    b2 = build(where, 2, keys)
    return InstallBundles(keys, b1, b2)


@pytest.fixture(scope="session")
def install_bundles(tmp_path_factory: pytest.TempPathFactory) -> InstallBundles:
    cache = os.environ.get("APPLIANCE_TEST_BUNDLES")
    if cache and (Path(cache) / "bundle-2/manifest.sig").exists():
        return InstallBundles(Path(cache) / "keys", Path(cache) / "bundle-1", Path(cache) / "bundle-2")
    return build_pair(tmp_path_factory.mktemp("install-bundles"))


def copy_bundle(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest
