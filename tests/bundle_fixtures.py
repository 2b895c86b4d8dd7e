"""A slim signed bundle (the appliance's own wheel, a 3-chunk random model file) built once per session."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from installer.bundle.manifest import MANIFEST, SIGNATURE, canonical_json
from installer.toolchain.keygen import keygen, load_signing_key
from tests.spec_files import one_model_spec, write_spec

REPO = Path(__file__).resolve().parent.parent
CHUNK = 4096
MODEL_BYTES = 3 * CHUNK + 1000  # three full chunks and a short final one

CHEAP_KDF = {"argon2id": {"iterations": 1, "memory_kib": 1024, "lanes": 1}, "scrypt": {"n": 1024, "r": 8, "p": 1}}


@dataclass
class SlimBundle:
    dir: Path
    keys: Path
    model_plain: bytes

    @property
    def signing_key(self) -> Ed25519PrivateKey:
        return load_signing_key(self.keys / "signing.key")

    @property
    def pub(self) -> Path:
        return self.keys / "signing.pub"

    def manifest(self) -> dict[str, Any]:
        return json.loads((self.dir / MANIFEST).read_bytes())

    def resign(self, mutate: Callable[[dict[str, Any]], None], key: Ed25519PrivateKey | None = None) -> None:
        """Edit the manifest and sign it again (with the vendor's key unless another is given)."""
        data = self.manifest()
        mutate(data)
        raw = canonical_json(data)
        (self.dir / MANIFEST).write_bytes(raw)
        (self.dir / SIGNATURE).write_bytes((key or self.signing_key).sign(raw))

    def model_entry(self) -> dict[str, Any]:
        return self.manifest()["models"][0]["files"][0]


def build_slim(where: Path, passphrase: bytes | None = None, kdf: str = "argon2id", sequence: int = 1) -> SlimBundle:
    from installer.toolchain.build import build_bundle
    from installer.toolchain.spec import load_spec

    where.mkdir(parents=True, exist_ok=True)
    keys = where / "keys"
    if not (keys / "signing.key").exists():
        keygen(keys)
    plain = os.urandom(MODEL_BYTES)
    (where / "model.bin").write_bytes(plain)
    spec_path = where / "slim.toml"
    write_spec(spec_path, one_model_spec(Path("model.bin"), chunk_size=CHUNK, passphrase_kdf={"kind": kdf, **CHEAP_KDF[kdf]}))
    kwargs: dict[str, Any] = {"model_key_path": keys / "model.key"}
    if passphrase is not None:
        (where / "passphrase.txt").write_bytes(passphrase + b"\n")
        kwargs = {"passphrase_path": where / "passphrase.txt"}
    out = where / f"bundle-{sequence}"
    build_bundle(load_spec(spec_path), out, keys / "signing.key", sequence=sequence, **kwargs)
    return SlimBundle(out, keys, plain)


@pytest.fixture(scope="session")
def slim_master(tmp_path_factory: pytest.TempPathFactory) -> SlimBundle:
    return build_slim(tmp_path_factory.mktemp("slim"))


@pytest.fixture
def slim(slim_master: SlimBundle, tmp_path: Path) -> SlimBundle:
    """A private copy of the slim bundle that a test may damage."""
    copy = tmp_path / "bundle"
    shutil.copytree(slim_master.dir, copy, symlinks=True)
    return SlimBundle(copy, slim_master.keys, slim_master.model_plain)
