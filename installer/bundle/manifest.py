"""Bundle manifest v1: canonical JSON, strict parsing into typed values. Pure: no I/O."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from appliance.config import BACKEND_FORMATS
from appliance.errors import BundleError
from installer.bundle.keywrap import KdfParams

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
BOOTSTRAP = "bootstrap.sh"
TRUST_FILE = "trust/vendor.pub"  # the signing key, for a first install to compare with the vendor's letter
WHEELS = "wheels/"  # the wheelhouse: one folder per runtime variant, wheels/<runtime>/
RUNTIMES = ("cpu", "cuda")  # cpu: CPU torch, portable llama.cpp; cuda: CUDA torch and its NVIDIA libraries, CUDA llama.cpp


def runtime_dir(runtime: str) -> str:
    """The wheelhouse folder of one runtime variant, as a bundle path prefix."""
    return f"{WHEELS}{runtime}/"
MAX_MANIFEST_BYTES = 4 << 20
_COMPONENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,199}\Z")
_SHA256 = re.compile(r"^[0-9a-f]{64}\Z")
BACKENDS = BACKEND_FORMATS


def canonical_json(value: Any) -> bytes:
    """The one byte form of a manifest: sorted keys, no spaces, UTF-8."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def check_relpath(path: Any, where: str = "manifest") -> str:
    """A bundle path: relative, forward slashes, plain names only (no `..`, no absolute, no hidden)."""
    if not isinstance(path, str) or not path or len(path) > 1024:
        raise BundleError(f"The {where} lists a path that is empty or not text: {path!r}.")
    parts = path.split("/")
    if path.startswith("/") or any(p in ("", ".", "..") or not _COMPONENT.match(p) for p in parts):
        raise BundleError(f"The {where} lists an unsafe path {path!r}: only relative paths of plain names are allowed.")
    return path


def parse_time(value: Any, name: str) -> datetime:
    if not isinstance(value, str):
        raise BundleError(f"The manifest's {name} is not a timestamp string.")
    try:
        t = datetime.fromisoformat(value)
    except ValueError:
        raise BundleError(f"The manifest's {name} {value!r} is not an ISO 8601 timestamp.") from None
    if t.tzinfo is None:
        raise BundleError(f"The manifest's {name} {value!r} has no time zone.")
    return t.astimezone(timezone.utc)


def format_time(t: datetime) -> str:
    return t.astimezone(timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


@dataclass(frozen=True)
class FileEntry:
    path: str
    size: int
    sha256: str


@dataclass(frozen=True)
class ModelFile:
    path: str  # the encrypted file inside the bundle
    name: str  # the file name once decrypted
    plain_size: int
    plain_sha256: str
    wrapped_key: str


@dataclass(frozen=True)
class Model:
    id: str
    backend: str
    format: str
    context_length: int
    files: tuple[ModelFile, ...]


def sbom_entries(doc: Any) -> tuple[dict[str, Any], ...]:
    """The wheels the SBOM lists, as {name, version, tags, path, sha256}: from the CycloneDX document
    (installer.toolchain.sbom), or from the plain list that bundles made before it carry."""
    if isinstance(doc, list):
        return tuple(doc)
    if not isinstance(doc, dict) or doc.get("bomFormat") != "CycloneDX" or not isinstance(doc.get("components", []), list):
        raise BundleError("The manifest's sbom is neither a CycloneDX document nor a list of wheels.")
    out = []
    for c in doc.get("components", []):
        props = {p.get("name"): p.get("value") for p in c.get("properties", []) if isinstance(p, dict)}
        sha = [h.get("content") for h in c.get("hashes", []) if isinstance(h, dict) and h.get("alg") == "SHA-256"]
        if not (isinstance(c.get("name"), str) and isinstance(props.get("appliance:path"), str) and sha):
            raise BundleError(f"The manifest's SBOM component {c.get('name')!r} has no name, appliance:path or SHA-256.")
        out.append({"name": c["name"], "version": c.get("version", ""), "tags": props.get("appliance:tags", ""),
                    "path": props["appliance:path"], "sha256": sha[0]})
    return tuple(out)


@dataclass(frozen=True)
class Manifest:
    name: str
    version: str
    sequence: int
    issued_at: datetime
    expires_at: datetime
    compatible: str
    key_wrap: KdfParams
    files: tuple[FileEntry, ...]
    models: tuple[Model, ...]
    tiers: tuple[dict[str, Any], ...]
    sbom: tuple[dict[str, Any], ...]
    raw: dict[str, Any] = field(repr=False, compare=False, default_factory=dict)

    def file(self, path: str) -> FileEntry:
        for f in self.files:
            if f.path == path:
                return f
        raise KeyError(path)

    @property
    def runtimes(self) -> frozenset[str]:
        """The runtime variants whose wheelhouse folder the bundle carries."""
        return frozenset(r for r in RUNTIMES if any(f.path.startswith(runtime_dir(r)) for f in self.files))

    @property
    def model_paths(self) -> set[str]:
        return {mf.path for m in self.models for mf in m.files}


def _get(d: Any, key: str, typ: type | tuple[type, ...], where: str) -> Any:
    if not isinstance(d, dict):
        raise BundleError(f"The manifest's {where} is not an object.")
    if key not in d:
        raise BundleError(f"The manifest's {where} has no {key!r}.")
    value = d[key]
    if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
        raise BundleError(f"The manifest's {where}.{key} has the wrong type.")
    return value


def _size(d: dict[str, Any], key: str, where: str) -> int:
    v = _get(d, key, int, where)
    if v < 0:
        raise BundleError(f"The manifest's {where}.{key} is negative.")
    return int(v)


def _digest(d: dict[str, Any], key: str, where: str) -> str:
    v = _get(d, key, str, where)
    if not _SHA256.match(v):
        raise BundleError(f"The manifest's {where}.{key} is not a lowercase SHA-256 hex digest.")
    return str(v)


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    if len(keys) != len(set(keys)):
        raise BundleError("The manifest repeats a key in one object.")
    return dict(pairs)


def _files(data: dict[str, Any]) -> list[FileEntry]:
    files = []
    seen: set[str] = set()
    for i, f in enumerate(_get(data, "files", list, "top level")):
        where = f"files[{i}]"
        if not isinstance(f, dict):
            raise BundleError(f"The manifest's {where} is not an object.")
        path = check_relpath(_get(f, "path", str, where))
        if path in (MANIFEST, SIGNATURE) or path in seen:
            raise BundleError(f"The manifest lists {path!r} twice or lists a reserved name.")
        seen.add(path)
        files.append(FileEntry(path, _size(f, "size", where), _digest(f, "sha256", where)))
    for p in seen:  # "a" and "a/b" cannot both be files
        if any(q.startswith(p + "/") for q in seen):
            raise BundleError(f"The manifest lists {p!r} both as a file and as a directory.")
    return files


def _models(data: dict[str, Any], seen: set[str]) -> list[Model]:
    models = []
    for i, m in enumerate(_get(data, "models", list, "top level")):
        where = f"models[{i}]"
        backend = _get(m, "backend", str, where)
        fmt = _get(m, "format", str, where)
        if BACKENDS.get(backend) != fmt:
            raise BundleError(f"The manifest's {where} pairs backend {backend!r} with format {fmt!r}; allowed: {BACKENDS}.")
        mfiles = []
        for j, mf in enumerate(_get(m, "files", list, where)):
            w = f"{where}.files[{j}]"
            path = check_relpath(_get(mf, "path", str, w))
            if path not in seen:
                raise BundleError(f"The manifest's {w} names {path!r}, which is not in the file list.")
            mfiles.append(ModelFile(path, check_relpath(_get(mf, "name", str, w)), _size(mf, "plain_size", w),
                                    _digest(mf, "plain_sha256", w), _get(mf, "wrapped_key", str, w)))
        models.append(Model(_get(m, "id", str, where), backend, fmt, _size(m, "context_length", where), tuple(mfiles)))
    return models


def _plain(data: dict[str, Any], key: str) -> str:
    """A top-level name that becomes part of a path on the site (the release directory is
    `<version>+<sequence>`): one plain component, never `..`, a slash or a newline."""
    value = _get(data, key, str, "top level")
    if not _COMPONENT.match(value):
        raise BundleError(f"The manifest's {key} {value!r} is not a plain name (letters, digits, '.', '_', '+', '-').",
                          "The bundle is malformed; ask the vendor for a new one.")
    return value


def parse_manifest(raw: bytes) -> Manifest:
    """Parse signed manifest bytes; they must be canonical JSON of the v1 schema."""
    try:
        data = json.loads(raw.decode("utf-8"), object_pairs_hook=_reject_duplicate_keys)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"The manifest is not valid UTF-8 JSON: {e}.") from None
    if not isinstance(data, dict):
        raise BundleError("The manifest is not a JSON object.")
    if canonical_json(data) != raw:
        raise BundleError("The manifest is not in canonical form (sorted keys, no whitespace).")
    if data.get("format") != FORMAT_VERSION:
        raise BundleError(f"The manifest format {data.get('format')!r} is not supported; this appliance reads format {FORMAT_VERSION}.")

    files = _files(data)
    seen = {f.path for f in files}
    models = _models(data, seen)
    sequence = _get(data, "sequence", int, "top level")
    if sequence < 1:
        raise BundleError("The manifest's sequence must be 1 or more.")
    return Manifest(
        name=_plain(data, "name"),
        version=_plain(data, "version"),
        sequence=sequence,
        issued_at=parse_time(data.get("issued_at"), "issued_at"),
        expires_at=parse_time(data.get("expires_at"), "expires_at"),
        compatible=_get(data, "compatible", str, "top level"),
        key_wrap=KdfParams.from_json(data.get("key_wrap")),
        files=tuple(files),
        models=tuple(models),
        tiers=tuple(_get(data, "tiers", list, "top level")),
        sbom=sbom_entries(data.get("sbom")),
        raw=data,
    )
