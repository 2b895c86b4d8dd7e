"""The site's key: a 32-byte key file or a passphrase through a capped KDF; it wraps per-file data keys."""

from __future__ import annotations

import base64
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from appliance.errors import DecryptError, KeyMaterialError, PolicyError
from appliance.nofollow import open_file, why

KEY_SIZE = 32
WRAP_LABEL = b"appliance-wrap-v1\x00"

# Caps applied before any KDF work, so a hostile manifest cannot make us burn minutes or RAM.
MAX_MEMORY_KIB = 1 << 20  # 1 GiB
MAX_ARGON2_ITERATIONS = 16
MAX_LANES = 16
MAX_SCRYPT_R = 32
MIN_SALT, MAX_SALT = 16, 64

# Defaults: RFC 9106's second recommended Argon2id option, and scrypt at 2^17 (128 MiB).
DEFAULT_ARGON2 = {"iterations": 3, "memory_kib": 65536, "lanes": 4}
DEFAULT_SCRYPT = {"n": 1 << 17, "r": 8, "p": 1}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def unb64(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (ValueError, TypeError):
        raise PolicyError(f"The manifest's {what} is not valid base64.") from None


@dataclass(frozen=True)
class KdfParams:
    """How the site's key is obtained; recorded in the manifest as `key_wrap`."""

    kind: str  # "key-file", "argon2id" or "scrypt"
    salt: bytes = b""
    params: tuple[tuple[str, int], ...] = ()

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind}
        if self.kind != "key-file":
            out["salt"] = b64(self.salt)
            out.update(dict(self.params))
        return out

    @classmethod
    def from_json(cls, data: Any) -> KdfParams:
        """Parse and cap-check; raise PolicyError naming the parameter that is out of bounds."""
        if not isinstance(data, dict) or data.get("kind") not in ("key-file", "argon2id", "scrypt"):
            raise PolicyError("The manifest's key_wrap is not one of key-file, argon2id or scrypt.")
        kind = data["kind"]
        if kind == "key-file":
            return cls("key-file")
        names = ("iterations", "memory_kib", "lanes") if kind == "argon2id" else ("n", "r", "p")
        if set(data) != {"kind", "salt", *names}:
            raise PolicyError(f"The manifest's {kind} parameters must be exactly salt, {', '.join(names)}.")
        values = {k: data[k] for k in names}
        if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values.values()):
            raise PolicyError(f"The manifest's {kind} parameters must be positive integers.")
        salt = unb64(data["salt"], "KDF salt") if isinstance(data["salt"], str) else b""
        if not MIN_SALT <= len(salt) <= MAX_SALT:
            raise PolicyError(f"The manifest's KDF salt must be {MIN_SALT} to {MAX_SALT} bytes.")
        _check_caps(kind, values)
        return cls(kind, salt, tuple(sorted(values.items())))


def _check_caps(kind: str, v: dict[str, int]) -> None:
    if kind == "argon2id":
        limits = {"memory_kib": MAX_MEMORY_KIB, "iterations": MAX_ARGON2_ITERATIONS, "lanes": MAX_LANES}
        for name, cap in limits.items():
            if v[name] > cap:
                raise PolicyError(f"The bundle asks Argon2id for {name}={v[name]}, above the cap of {cap}; refusing to derive the key.")
        if v["memory_kib"] < 8 * v["lanes"]:
            raise PolicyError("The bundle's Argon2id memory is below 8 KiB per lane.")
    else:
        n, r, p = v["n"], v["r"], v["p"]
        if n < 2 or n & (n - 1):
            raise PolicyError(f"The bundle's scrypt n={n} is not a power of two.")
        if r > MAX_SCRYPT_R or p > MAX_LANES:
            raise PolicyError(f"The bundle's scrypt r={r}, p={p} exceed the caps r<={MAX_SCRYPT_R}, p<={MAX_LANES}.")
        if 128 * n * r > MAX_MEMORY_KIB * 1024:
            raise PolicyError(f"The bundle's scrypt parameters need {128 * n * r >> 20} MiB, above the 1024 MiB cap; refusing to derive the key.")


def new_kdf(kind: str, overrides: dict[str, int] | None = None) -> KdfParams:
    """Fresh parameters with a random salt, for the vendor side."""
    base = dict(DEFAULT_ARGON2 if kind == "argon2id" else DEFAULT_SCRYPT)
    base.update(overrides or {})
    params = KdfParams(kind, os.urandom(16), tuple(sorted(base.items())))
    return KdfParams.from_json(params.to_json())  # same caps on both sides


def derive_kek(kdf: KdfParams, passphrase: bytes) -> bytes:
    p = dict(kdf.params)
    if kdf.kind == "argon2id":
        from cryptography.hazmat.primitives.kdf.argon2 import Argon2id

        return Argon2id(
            salt=kdf.salt, length=KEY_SIZE, iterations=p["iterations"],
            lanes=p["lanes"], memory_cost=p["memory_kib"],
        ).derive(passphrase)
    if kdf.kind == "scrypt":
        from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

        return Scrypt(salt=kdf.salt, length=KEY_SIZE, n=p["n"], r=p["r"], p=p["p"]).derive(passphrase)
    raise KeyMaterialError("This bundle is opened with a key file, not a passphrase.", "Pass --key-file.")


MAX_PASSPHRASE_BYTES = 4096


def _read_secret(path: Path, cap: int, what: str, refuse_owner: int | None) -> bytes:
    """A key or passphrase file: opened without following a link or waiting on a FIFO, a regular file,
    read at most to `cap` + 1 bytes, and not owned by `refuse_owner` (the service user)."""
    try:
        fd = open_file(path)
    except OSError as e:
        raise KeyMaterialError(f"Cannot read the {what} {path}: {why(e)}.", "Name the file itself on the key stick, not a link to it.") from None
    with os.fdopen(fd, "rb") as f:
        if refuse_owner is not None and os.fstat(fd).st_uid == refuse_owner:
            raise KeyMaterialError(f"The {what} {path} is owned by the service user, who could have read or replaced it; refusing to use it.",
                                   "Keep the site's key on its own stick, or in a file owned by root, and pass that.")
        data = f.read(cap + 1)
    if len(data) > cap:
        raise KeyMaterialError(f"The {what} {path} is larger than {cap} bytes; it is not a {what}.")
    return data


def read_key_file(path: Path, refuse_owner: int | None = None) -> bytes:
    data = _read_secret(path, KEY_SIZE, "key file", refuse_owner)
    if len(data) != KEY_SIZE:
        raise KeyMaterialError(
            f"The key file {path} holds {len(data)} bytes, not the {KEY_SIZE} of a model key.",
            "Use model.key as written by `appliance bundle keygen`.",
        )
    return data


def read_passphrase_file(path: Path, refuse_owner: int | None = None) -> bytes:
    data = _read_secret(path, MAX_PASSPHRASE_BYTES, "passphrase file", refuse_owner)
    data = data[:-1] if data.endswith(b"\n") else data
    if not data:
        raise KeyMaterialError(f"The passphrase file {path} is empty.", "Write the passphrase into it, one line.")
    return data


def site_kek(kdf: KdfParams, key_file: Path | None, passphrase_file: Path | None, refuse_owner: int | None = None) -> bytes:
    """The key-encryption key for this bundle from whichever secret the administrator supplied.
    A file owned by `refuse_owner` (the service user's uid) is refused."""
    if kdf.kind == "key-file":
        if key_file is None:
            raise KeyMaterialError("This bundle's model files are opened with a key file.", "Pass --key-file PATH (model.key from the key stick).")
        return read_key_file(key_file, refuse_owner)
    if passphrase_file is None:
        raise KeyMaterialError("This bundle's model files are opened with a passphrase.", "Pass --passphrase-file PATH.")
    return derive_kek(kdf, read_passphrase_file(passphrase_file, refuse_owner))


def wrap_key(kek: bytes, data_key: bytes, context: str) -> str:
    nonce = os.urandom(12)
    return b64(nonce + AESGCM(kek).encrypt(nonce, data_key, WRAP_LABEL + context.encode()))


def unwrap_key(kek: bytes, wrapped: str, context: str) -> bytes:
    """Recover a data key; `context` (bundle name and file path) stops mixing keys across files."""
    raw = unb64(wrapped, f"wrapped key for {context}")
    try:
        key = AESGCM(kek).decrypt(raw[:12], raw[12:], WRAP_LABEL + context.encode())
    except (InvalidTag, ValueError):
        raise DecryptError(f"The supplied key does not open the data key of {context}: wrong key file or passphrase.") from None
    if len(key) != KEY_SIZE:
        raise DecryptError(f"The data key of {context} has the wrong length.")
    return key
