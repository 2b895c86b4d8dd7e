"""The demo bundle (bundles/demo.toml: full wheelhouse, both model variants), built once per test session."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.bundle_fixtures import REPO


@dataclass(frozen=True)
class DemoBundle:
    dir: Path
    keys: Path


@pytest.fixture(scope="session")
def demo_bundle(tmp_path_factory: pytest.TempPathFactory) -> DemoBundle:
    from installer.toolchain.build import build_bundle
    from installer.toolchain.keygen import keygen
    from installer.toolchain.spec import load_spec

    where = tmp_path_factory.mktemp("demo-bundle")
    keygen(where / "keys")
    build_bundle(load_spec(REPO / "bundles/demo.toml"), where / "bundle", where / "keys/signing.key",
                 model_key_path=where / "keys/model.key")
    return DemoBundle(where / "bundle", where / "keys")
