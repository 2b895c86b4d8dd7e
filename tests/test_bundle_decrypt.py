"""The chunked AEAD stream, key wrapping and one-pass decrypt of model files."""

from __future__ import annotations

import io
import os
from datetime import datetime, timezone
from pathlib import Path

import pytest

from appliance.errors import BundleError, DecryptError, KeyMaterialError, PolicyError
from installer.bundle import keywrap
from installer.bundle.keys import load_trusted_keys
from installer.bundle.reader import decrypt_model_file, load_manifest
from installer.bundle.stream import HEADER_SIZE, TAG_SIZE, ciphertext_size, decrypt_stream, encrypt_stream
from installer.bundle.trust import Policy, host_platform
from tests.bundle_fixtures import CHUNK, SlimBundle, build_slim

KEY = bytes(range(32))


def seal(plain: bytes, chunk: int = CHUNK) -> bytes:
    out = io.BytesIO()
    encrypt_stream(io.BytesIO(plain), out, KEY, chunk)
    return out.getvalue()


def open_(ct: bytes, key: bytes = KEY) -> bytes:
    out = bytearray()
    decrypt_stream(io.BytesIO(ct), len(ct), key, out.extend)
    return bytes(out)


def chunks(ct: bytes, chunk: int = CHUNK) -> tuple[bytes, list[bytes]]:
    body = ct[HEADER_SIZE:]
    step = chunk + TAG_SIZE
    return ct[:HEADER_SIZE], [body[i : i + step] for i in range(0, len(body), step)]


PLAIN = os.urandom(3 * CHUNK + 123)


@pytest.mark.parametrize("size", [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK])
def test_round_trip(size: int) -> None:
    plain = os.urandom(size)
    ct = seal(plain)
    assert len(ct) == ciphertext_size(size, CHUNK)
    assert open_(ct) == plain


def test_dropped_final_chunk() -> None:
    header, parts = chunks(seal(PLAIN))
    with pytest.raises(DecryptError, match="failed authentication at chunk 2"):
        open_(header + b"".join(parts[:-1]))


def test_two_final_chunks() -> None:
    header, parts = chunks(seal(PLAIN))
    with pytest.raises(DecryptError, match="failed authentication"):
        open_(header + b"".join(parts) + parts[-1])


def test_reordered_chunks() -> None:
    header, parts = chunks(seal(PLAIN))
    parts[0], parts[1] = parts[1], parts[0]
    with pytest.raises(DecryptError, match="failed authentication at chunk 0"):
        open_(header + b"".join(parts))


def test_trailing_garbage() -> None:
    with pytest.raises(DecryptError, match="failed authentication"):
        open_(seal(PLAIN) + b"garbage")


def test_truncated_at_chunk_boundary_with_full_chunks() -> None:
    plain = os.urandom(3 * CHUNK)  # the last chunk is full, so cutting it leaves only full chunks
    header, parts = chunks(seal(plain))
    with pytest.raises(DecryptError, match="failed authentication"):
        open_(header + b"".join(parts[:2]))


def test_edited_header() -> None:
    ct = bytearray(seal(PLAIN))
    ct[HEADER_SIZE - 1] ^= 1  # last byte of the nonce prefix
    with pytest.raises(DecryptError, match="failed authentication at chunk 0"):
        open_(bytes(ct))


def test_edited_header_chunk_size() -> None:
    ct = bytearray(seal(PLAIN))
    ct[8:12] = (2 * CHUNK).to_bytes(4, "big")
    with pytest.raises(DecryptError):
        open_(bytes(ct))


def test_wrong_data_key() -> None:
    with pytest.raises(DecryptError, match="failed authentication"):
        open_(seal(PLAIN), key=bytes(32))


def test_source_shorter_than_declared() -> None:
    ct = seal(PLAIN)
    with pytest.raises(DecryptError, match="shorter than its declared size"):
        decrypt_stream(io.BytesIO(ct[:-5]), len(ct), KEY, lambda _b: None)


def test_source_longer_than_declared_is_not_read_past() -> None:
    ct = seal(PLAIN)
    src = io.BytesIO(ct + b"x" * 100)
    with pytest.raises(DecryptError, match="longer than its declared size"):
        decrypt_stream(src, len(ct), KEY, lambda _b: None)
    assert src.tell() == len(ct) + 1  # one byte past the end to detect it, no more


def _manifest(slim: SlimBundle):
    policy = Policy(now=datetime.now(timezone.utc), platform=host_platform())
    return load_manifest(slim.dir, load_trusted_keys([slim.pub]), policy)[0]


def _data_key(slim: SlimBundle, kek: bytes) -> bytes:
    m = _manifest(slim)
    mf = m.models[0].files[0]
    return keywrap.unwrap_key(kek, mf.wrapped_key, f"{m.name}:{mf.path}")


def test_decrypt_model_file_writes_plaintext(slim: SlimBundle, tmp_path: Path) -> None:
    m = _manifest(slim)
    mf = m.models[0].files[0]
    key = _data_key(slim, (slim.keys / "model.key").read_bytes())
    dest = tmp_path / "models" / "model.gguf"
    seen: list[int] = []
    decrypt_model_file(slim.dir, m, mf, key, dest, progress=lambda _p, done, _t: seen.append(done))
    assert dest.read_bytes() == slim.model_plain
    assert oct(dest.stat().st_mode & 0o777) == "0o600"
    assert seen[-1] == m.file(mf.path).size


def test_decrypt_of_tampered_model_leaves_nothing(slim: SlimBundle, tmp_path: Path) -> None:
    m = _manifest(slim)
    mf = m.models[0].files[0]
    key = _data_key(slim, (slim.keys / "model.key").read_bytes())
    path = slim.dir / mf.path
    data = bytearray(path.read_bytes())
    data[-3] ^= 1  # in the final chunk's tag: every chunk before it decrypts fine
    path.write_bytes(bytes(data))
    dest_dir = tmp_path / "models"
    with pytest.raises(DecryptError, match=mf.path):
        decrypt_model_file(slim.dir, m, mf, key, dest_dir / "model.gguf")
    assert list(dest_dir.iterdir()) == []


def test_decrypt_checks_ciphertext_hash_even_when_chunks_authenticate(slim: SlimBundle, tmp_path: Path) -> None:
    """A ciphertext re-encrypted with the same data key still has to match the signed SHA-256."""
    m = _manifest(slim)
    mf = m.models[0].files[0]
    key = _data_key(slim, (slim.keys / "model.key").read_bytes())
    out = io.BytesIO()
    encrypt_stream(io.BytesIO(slim.model_plain), out, key, CHUNK)  # same key, new nonce prefix
    (slim.dir / mf.path).write_bytes(out.getvalue())
    with pytest.raises(BundleError, match="SHA-256"):
        decrypt_model_file(slim.dir, m, mf, key, tmp_path / "model.gguf")
    assert not (tmp_path / "model.gguf").exists()


def test_wrong_key_file(slim: SlimBundle) -> None:
    with pytest.raises(DecryptError, match="does not open the data key of slim:models/tiny/model.gguf.enc"):
        _data_key(slim, os.urandom(32))


def test_key_file_of_wrong_length(tmp_path: Path) -> None:
    bad = tmp_path / "model.key"
    bad.write_bytes(b"short")
    with pytest.raises(KeyMaterialError, match="holds 5 bytes"):
        keywrap.read_key_file(bad)


def test_wrapped_key_bound_to_its_file(slim: SlimBundle) -> None:
    m = _manifest(slim)
    mf = m.models[0].files[0]
    kek = (slim.keys / "model.key").read_bytes()
    with pytest.raises(DecryptError):
        keywrap.unwrap_key(kek, mf.wrapped_key, f"{m.name}:models/other/model.gguf.enc")


@pytest.fixture(scope="module", params=["argon2id", "scrypt"])
def pass_bundle(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> SlimBundle:
    return build_slim(tmp_path_factory.mktemp(f"pass-{request.param}"), passphrase=b"correct horse", kdf=request.param)


def test_passphrase_opens_bundle(pass_bundle: SlimBundle, tmp_path: Path) -> None:
    m = _manifest(pass_bundle)
    assert m.key_wrap.kind in ("argon2id", "scrypt")
    kek = keywrap.site_kek(m.key_wrap, None, pass_bundle.dir.parent / "passphrase.txt")
    mf = m.models[0].files[0]
    key = keywrap.unwrap_key(kek, mf.wrapped_key, f"{m.name}:{mf.path}")
    decrypt_model_file(pass_bundle.dir, m, mf, key, tmp_path / "model.gguf")
    assert (tmp_path / "model.gguf").read_bytes() == pass_bundle.model_plain


def test_wrong_passphrase(pass_bundle: SlimBundle, tmp_path: Path) -> None:
    m = _manifest(pass_bundle)
    wrong = tmp_path / "wrong.txt"
    wrong.write_text("incorrect horse\n")
    kek = keywrap.site_kek(m.key_wrap, None, wrong)
    mf = m.models[0].files[0]
    with pytest.raises(DecryptError, match="wrong key file or passphrase"):
        keywrap.unwrap_key(kek, mf.wrapped_key, f"{m.name}:{mf.path}")


def test_passphrase_bundle_asks_for_passphrase_not_key_file(pass_bundle: SlimBundle) -> None:
    m = _manifest(pass_bundle)
    with pytest.raises(KeyMaterialError, match="passphrase"):
        keywrap.site_kek(m.key_wrap, pass_bundle.keys / "model.key", None)


@pytest.mark.parametrize(
    "params, needle",
    [
        ({"kind": "argon2id", "iterations": 3, "memory_kib": 1 << 24, "lanes": 4}, "memory_kib=16777216, above the cap"),
        ({"kind": "argon2id", "iterations": 10_000, "memory_kib": 65536, "lanes": 4}, "iterations=10000, above the cap"),
        ({"kind": "scrypt", "n": 1 << 24, "r": 8, "p": 1}, "above the 1024 MiB cap"),
        ({"kind": "scrypt", "n": 1 << 14, "r": 8, "p": 1000}, "exceed the caps"),
    ],
)
def test_kdf_parameters_above_cap_refused_before_deriving(params: dict, needle: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import cryptography.hazmat.primitives.kdf.argon2 as argon2
    import cryptography.hazmat.primitives.kdf.scrypt as scrypt

    def boom(*_a: object, **_k: object) -> None:
        raise AssertionError("the KDF ran")

    monkeypatch.setattr(argon2, "Argon2id", boom)
    monkeypatch.setattr(scrypt, "Scrypt", boom)
    with pytest.raises(PolicyError, match=needle):
        keywrap.KdfParams.from_json({**params, "salt": keywrap.b64(os.urandom(16))})


def test_kdf_caps_checked_when_manifest_is_parsed(pass_bundle: SlimBundle) -> None:
    def mutate(m: dict) -> None:
        m["key_wrap"]["memory_kib" if m["key_wrap"]["kind"] == "argon2id" else "n"] = 1 << 30

    original = (pass_bundle.dir / "manifest.json").read_bytes(), (pass_bundle.dir / "manifest.sig").read_bytes()
    try:
        pass_bundle.resign(mutate)
        with pytest.raises(PolicyError, match="cap"):
            _manifest(pass_bundle)
    finally:
        (pass_bundle.dir / "manifest.json").write_bytes(original[0])
        (pass_bundle.dir / "manifest.sig").write_bytes(original[1])
