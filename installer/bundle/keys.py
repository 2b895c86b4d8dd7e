"""The vendor's public keys as the site trusts them: loading, fingerprints. (Making keys: installer/toolchain/keygen.py.)"""

from __future__ import annotations

import hashlib
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from appliance.errors import KeyMaterialError


def fingerprint(public_key: Ed25519PublicKey) -> str:
    """SHA-256 of the raw public key, as the vendor reads it out over the phone or prints it."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "SHA256:" + hashlib.sha256(raw).hexdigest()


def public_key_from_pem(data: bytes, where: str) -> Ed25519PublicKey:
    """An Ed25519 public key from PEM bytes; `where` names them in the error."""
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as e:
        raise KeyMaterialError(f"Cannot load the trusted key {where}: {e}.", "Use signing.pub as given by the vendor.") from None
    if not isinstance(key, Ed25519PublicKey):
        raise KeyMaterialError(f"The trusted key {where} is not an Ed25519 public key.")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise KeyMaterialError(f"Cannot load the trusted key {path}: {e.strerror}.", "Use signing.pub as given by the vendor.") from None
    return public_key_from_pem(data, str(path))


def load_trusted_keys(paths: list[Path]) -> list[Ed25519PublicKey]:
    """Keys from files, or from every *.pub in a directory (the pinned /etc/appliance/trust/)."""
    files: list[Path] = []
    for p in map(Path, paths):
        files.extend(sorted(p.glob("*.pub")) if p.is_dir() else [p])
    if not files:
        raise KeyMaterialError("No trusted vendor key was given.", "Pass --trust signing.pub (the vendor's public key).")
    return [load_public_key(f) for f in files]
