"""The vendor's key material: the Ed25519 signing key pair and a site's model key, made and loaded."""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from appliance.atomic import atomic_write_bytes
from appliance.errors import KeyMaterialError, UsageError
from installer.bundle.keys import fingerprint
from installer.bundle.keywrap import KEY_SIZE

SIGNING_KEY = "signing.key"
SIGNING_PUB = "signing.pub"
MODEL_KEY = "model.key"


def keygen(out: Path, force: bool = False, only: str | None = None) -> dict[str, str]:
    """Write signing.key (0600), signing.pub and model.key (32 random bytes, 0600) into `out`.

    only="signing": just the key pair (a vendor rotating its signing key, the sites keep their model
    keys); only="model": just a model key (one more site, the vendor keeps its signing key).
    """
    out = Path(out)
    names = {"signing": (SIGNING_KEY, SIGNING_PUB), "model": (MODEL_KEY,), None: (SIGNING_KEY, SIGNING_PUB, MODEL_KEY)}[only]
    existing = [n for n in names if (out / n).exists()]
    if existing and not force:
        raise UsageError(f"{out} already holds {', '.join(existing)}; refusing to overwrite keys.", "Choose another --out directory.")
    out.mkdir(parents=True, exist_ok=True)
    info: dict[str, str] = {}
    if SIGNING_KEY in names:
        private = Ed25519PrivateKey.generate()
        pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        pub = private.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        atomic_write_bytes(out / SIGNING_KEY, pem, mode=0o600)
        atomic_write_bytes(out / SIGNING_PUB, pub, mode=0o644)
        info.update(signing_key=str(out / SIGNING_KEY), signing_pub=str(out / SIGNING_PUB), fingerprint=fingerprint(private.public_key()))
    if MODEL_KEY in names:
        atomic_write_bytes(out / MODEL_KEY, os.urandom(KEY_SIZE), mode=0o600)
        info["model_key"] = str(out / MODEL_KEY)
    return info


def load_signing_key(path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as e:
        raise KeyMaterialError(f"Cannot load the signing key {path}: {e}.", "Use signing.key from `appliance bundle keygen`.") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyMaterialError(f"The signing key {path} is not an Ed25519 key.")
    return key
