"""Chunked AEAD stream for model files (AES-256-GCM per chunk, after age's STREAM and Tink).

Layout: header ‖ chunk₀ ‖ chunk₁ ‖ … ‖ chunkₙ, where
    header  = MAGIC (8) ‖ chunk_size (u32 BE) ‖ nonce_prefix (7)
    chunkᵢ  = AES-256-GCM(data_key, nonce = prefix ‖ i (u32 BE) ‖ last (1 byte), aad = header)

Every plaintext chunk is `chunk_size` bytes except the last, which holds 0..chunk_size bytes and is
the only one sealed with last = 1. So truncation at a chunk boundary, a dropped or doubled final
chunk, reordered chunks, trailing bytes and an edited header all fail authentication.
"""

from __future__ import annotations

import io
import os
import struct
from collections.abc import Callable
from typing import BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from appliance.errors import DecryptError

Readable = io.RawIOBase | io.BufferedIOBase

MAGIC = b"APLSTRM1"
HEADER = struct.Struct(">8sI7s")
HEADER_SIZE = HEADER.size
TAG_SIZE = 16
DEFAULT_CHUNK_SIZE = 1 << 20
MIN_CHUNK_SIZE = 1 << 12
MAX_CHUNK_SIZE = 1 << 24
MAX_CHUNKS = 1 << 32


def _nonce(prefix: bytes, counter: int, last: bool) -> bytes:
    if counter >= MAX_CHUNKS:
        raise DecryptError("The encrypted stream has more chunks than the format allows.")
    return prefix + counter.to_bytes(4, "big") + (b"\x01" if last else b"\x00")


def ciphertext_size(plain_size: int, chunk_size: int = DEFAULT_CHUNK_SIZE) -> int:
    """Bytes on disk for a plaintext of `plain_size` bytes."""
    n_chunks = max(1, -(-plain_size // chunk_size))
    return HEADER_SIZE + plain_size + n_chunks * TAG_SIZE


def encrypt_stream(
    src: BinaryIO, dst: BinaryIO, data_key: bytes, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> None:
    """Encrypt all of `src` into `dst`."""
    if not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
        raise ValueError(f"chunk size {chunk_size} is outside {MIN_CHUNK_SIZE}..{MAX_CHUNK_SIZE}")
    aead = AESGCM(data_key)
    prefix = os.urandom(7)
    header = HEADER.pack(MAGIC, chunk_size, prefix)
    dst.write(header)
    counter = 0
    chunk = src.read(chunk_size)
    while True:
        following = src.read(chunk_size)
        last = not following
        dst.write(aead.encrypt(_nonce(prefix, counter, last), chunk, header))
        if last:
            return
        chunk, counter = following, counter + 1


def _read_exact(src: Readable, view: memoryview, what: str) -> None:
    got = src.readinto(view)
    while got is not None and got < len(view):
        more = src.readinto(view[got:])
        if not more:
            break
        got += more
    if got != len(view):
        raise DecryptError(f"The {what} ended early: it is shorter than its declared size.")


def decrypt_stream(
    src: Readable,
    total_size: int,
    data_key: bytes,
    write: Callable[[memoryview], object],
    observe: Callable[[memoryview], object] | None = None,
    what: str = "encrypted stream",
) -> int:
    """Decrypt exactly `total_size` ciphertext bytes from `src`, passing plaintext to `write`.

    `observe` sees every ciphertext byte (for hashing in the same pass). Nothing is read past
    `total_size`; a source longer than that is an error. Returns the plaintext size. Plaintext
    handed to `write` is authenticated but the caller must not commit it until this returns.
    """
    if total_size < HEADER_SIZE + TAG_SIZE:
        raise DecryptError(f"The {what} is too short to hold a header and one chunk.")
    header = bytearray(HEADER_SIZE)
    _read_exact(src, memoryview(header), what)
    if observe:
        observe(memoryview(header))
    magic, chunk_size, prefix = HEADER.unpack(header)
    if magic != MAGIC:
        raise DecryptError(f"The {what} does not start with the appliance stream header.")
    if not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
        raise DecryptError(f"The {what} declares a chunk size of {chunk_size} bytes, outside the allowed range.")
    aead = AESGCM(data_key)
    aad = bytes(header)
    sealed = chunk_size + TAG_SIZE
    cbuf = bytearray(sealed)
    pbuf = bytearray(chunk_size)
    remaining = total_size - HEADER_SIZE
    counter = plain = 0
    while remaining > 0:
        n = min(sealed, remaining)
        if n < TAG_SIZE:
            raise DecryptError(f"The {what} ends with a fragment too short to be a chunk.")
        cview = memoryview(cbuf)[:n]
        _read_exact(src, cview, what)
        if observe:
            observe(cview)
        remaining -= n
        last = remaining == 0
        out = memoryview(pbuf)[: n - TAG_SIZE]
        try:
            aead.decrypt_into(_nonce(prefix, counter, last), cview, aad, out)
        except InvalidTag:
            raise DecryptError(
                f"The {what} failed authentication at chunk {counter}: it was altered, "
                "truncated or extended, or the key is wrong."
            ) from None
        write(out)
        plain += len(out)
        counter += 1
    if src.read(1):
        raise DecryptError(f"The {what} is longer than its declared size.")
    return plain
