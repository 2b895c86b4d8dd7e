"""Vendor side: spec → wheelhouse + encrypted model files + signed manifest, built aside and renamed into place."""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, BinaryIO

from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from appliance.atomic import fsync_dir
from appliance.errors import UsageError
from installer.bundle import keywrap
from installer.bundle.keys import fingerprint
from installer.bundle.manifest import (
    BOOTSTRAP,
    FORMAT_VERSION,
    MANIFEST,
    SIGNATURE,
    TRUST_FILE,
    WHEELS,
    canonical_json,
    format_time,
)
from installer.bundle.stream import encrypt_stream
from installer.bundle.trust import host_platform
from installer.toolchain.convert import CONVERT_DIR, model_sources
from installer.toolchain.keygen import load_signing_key
from installer.toolchain.llama_wheel import sha256_file
from installer.toolchain.sbom import cyclonedx
from installer.toolchain.spec import Spec, SpecModel
from installer.toolchain.wheelhouse import build_wheelhouse, parse_runtimes

BOOTSTRAP_SH = """#!/bin/sh
# First-install entry for the appliance bundle {name} {version} (sequence {sequence}).
# Before running it, compare `sha256sum bootstrap.sh` with the value your vendor gave you out of
# band, and the vendor key fingerprint below with the one in the vendor's letter (SECURITY.md).
#   vendor key: {fingerprint}
# It makes a virtual environment from this stick's wheels only, then opens the console.
set -eu
BUNDLE=$(CDPATH= cd -- "$(dirname -- "$0")" && pwd)
VENV=${{APPLIANCE_BOOTSTRAP_VENV:-/var/tmp/appliance-bootstrap}}
"${{PYTHON:-python3}}" -m venv --clear "$VENV"
"$VENV/bin/pip" install --quiet --no-index --find-links "$BUNDLE/wheels/{runtime}" "{requirement}"
if [ "$#" -gt 0 ]; then exec "$VENV/bin/appliance" "$@"; fi
exec "$VENV/bin/appliance" console
"""


class _HashingWriter:
    """Counts and hashes what passes through, so each plaintext is read once."""

    def __init__(self, src: BinaryIO) -> None:
        self.src, self.h, self.size = src, hashlib.sha256(), 0

    def read(self, n: int) -> bytes:
        data = self.src.read(n)
        self.h.update(data)
        self.size += len(data)
        return data


def _fsync_tree(root: Path) -> None:
    for d, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(d, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(Path(d))


def _site_kek(spec: Spec, model_key_path: Path | None, passphrase_path: Path | None) -> tuple[keywrap.KdfParams, bytes]:
    """The key that wraps every file key: the site's model key, or one derived from a passphrase."""
    if model_key_path is not None:
        return keywrap.KdfParams("key-file"), keywrap.read_key_file(model_key_path)
    assert passphrase_path is not None
    overrides = {k: v for k, v in spec.passphrase_kdf.items() if k != "kind"}
    kdf = keywrap.new_kdf(spec.passphrase_kdf["kind"], overrides)
    return kdf, keywrap.derive_kek(kdf, keywrap.read_passphrase_file(passphrase_path))


def _encrypt_model(spec: Spec, m: SpecModel, work: Path, kek: bytes, log: Callable[[str], None]) -> dict[str, Any]:
    """Each file of one model under its own random key, wrapped by `kek`; the manifest's models[] entry."""
    files = []
    for f in model_sources(m, work / CONVERT_DIR, log):
        rel = f"models/{m.id}/{f.name}.enc"
        log(f"encrypting {f.name} -> {rel}")
        data_key = os.urandom(keywrap.KEY_SIZE)
        (work / rel).parent.mkdir(parents=True, exist_ok=True)
        with f.source.open("rb") as src, (work / rel).open("wb") as dst:
            reader = _HashingWriter(src)
            encrypt_stream(reader, dst, data_key, spec.chunk_size)  # type: ignore[arg-type]
        files.append({"path": rel, "name": f.name, "plain_size": reader.size, "plain_sha256": reader.h.hexdigest(),
                      "wrapped_key": keywrap.wrap_key(kek, data_key, f"{spec.name}:{rel}")})
    return {"id": m.id, "backend": m.backend, "format": m.format, "context_length": m.context_length, "files": files}


def cuda_floor(spec: Spec) -> str:
    """The lowest compute capability the spec's GPU tiers on llama.cpp allow (what a CUDA llama.cpp is built for)."""
    from installer.hardware.machine import version_tuple
    from installer.planning.tiers import models_of, parse_tiers

    floors = [t.needs.compute_capability or "7.5" for t in parse_tiers(spec.tiers, models_of(spec.models))
              if t.uses_gpu and t.backend == "llama.cpp"]
    low = min(floors, key=version_tuple, default="7.5")
    return low if version_tuple(low) >= (7, 5) else "7.5"  # CUDA 13's nvcc starts at Turing


def _check_cuda_floor(spec: Spec, wheels: Path, log: Callable[[str], None]) -> None:
    """Say so when a GPU tier admits drivers older than the CUDA the cuda runtime's torch was built for."""
    from installer.hardware.machine import version_tuple
    from installer.planning.tiers import models_of, parse_tiers

    runtime = sorted(wheels.glob("nvidia_cuda_runtime*-*.whl"))
    if not runtime:
        return
    built = ".".join(runtime[0].name.split("-")[1].split(".")[:2])
    for t in parse_tiers(spec.tiers, models_of(spec.models)):
        if t.runtime == "cuda" and version_tuple(t.needs.cuda or "0") < version_tuple(built):
            log(f"warning: tier {t.name} admits drivers for CUDA {t.needs.cuda or 'any'}, but the cuda runtime's torch needs "
                f"CUDA {built}: raise its needs.cuda (and needs.driver) to match")


def _wheels(spec: Spec, work: Path, runtimes: tuple[str, ...], cuda_llama: bool, log: Callable[[str], None]) -> None:
    log("building the wheelhouse")
    build_wheelhouse(spec.wheelhouse, work / WHEELS.rstrip("/"), runtimes, log, cuda_floor(spec), cuda_llama)
    _check_cuda_floor(spec, work / WHEELS / "cuda", log)


def build_bundle(
    spec: Spec, out: Path, signing_key_path: Path, sequence: int = 1,
    model_key_path: Path | None = None, passphrase_path: Path | None = None,
    now: datetime | None = None, log: Callable[[str], None] = lambda _m: None,
    runtimes: tuple[str, ...] = ("cpu",), cuda_llama: bool = True,
) -> dict[str, Any]:
    """Build the bundle into `out` (which must not exist yet); return the manifest as a dict.
    `runtimes`: the wheelhouse's runtime variants (installer.toolchain.wheelhouse)."""
    if (model_key_path is None) == (passphrase_path is None):
        raise UsageError("Give exactly one of --model-key or --passphrase-file.")
    if sequence < 1:
        raise UsageError("--sequence must be 1 or more.")
    out = Path(out).resolve()
    if out.exists() and any(out.iterdir()):
        raise UsageError(f"{out} already exists and is not empty.", "Choose a new --out directory.")
    runtimes = parse_runtimes(runtimes)  # in the bundle's order: cpu first
    signing_key = load_signing_key(signing_key_path)
    kdf, kek = _site_kek(spec, model_key_path, passphrase_path)
    work = out.with_name(out.name + ".partial")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        _wheels(spec, work, runtimes, cuda_llama, log)
        models = [_encrypt_model(spec, m, work, kek, log) for m in spec.models]
        shutil.rmtree(work / CONVERT_DIR, ignore_errors=True)  # plaintext conversions never reach the bundle

        version = spec.version
        public = signing_key.public_key()
        extras = ",".join(spec.wheelhouse.extras)  # install what the wheelhouse holds, no more
        requirement = f"appliance[{extras}]" if extras else "appliance"
        (work / BOOTSTRAP).write_text(BOOTSTRAP_SH.format(name=spec.name, version=version, sequence=sequence, runtime=runtimes[0],
                                                          fingerprint=fingerprint(public), requirement=requirement))
        (work / BOOTSTRAP).chmod(0o755)
        (work / TRUST_FILE).parent.mkdir(parents=True, exist_ok=True)
        (work / TRUST_FILE).write_bytes(public.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo))

        log("hashing every file")
        digests = {p.relative_to(work).as_posix(): sha256_file(p) for p in sorted(work.rglob("*")) if p.is_file()}
        entries = [{"path": rel, "size": (work / rel).stat().st_size, "sha256": d} for rel, d in digests.items()]

        issued = (now or datetime.now(timezone.utc)).replace(microsecond=0)
        manifest = {
            "format": FORMAT_VERSION, "name": spec.name, "version": version, "sequence": sequence,
            "issued_at": format_time(issued), "expires_at": format_time(issued + timedelta(days=spec.valid_days)),
            "compatible": host_platform() if spec.compatible == "host" else spec.compatible,
            "key_wrap": kdf.to_json(), "files": entries, "models": models,
            "tiers": list(spec.tiers), "sbom": cyclonedx(work, digests),
        }
        raw = canonical_json(manifest)
        (work / MANIFEST).write_bytes(raw)
        (work / SIGNATURE).write_bytes(signing_key.sign(raw))
        _fsync_tree(work)
        if out.exists():
            out.rmdir()
        os.replace(work, out)
        fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return manifest
