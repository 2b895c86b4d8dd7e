"""Bundle specs (TOML, documented in bundles/README.md): parsed into typed values with clear errors."""

from __future__ import annotations

import importlib.util
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.errors import SpecError, TierError
from installer.bundle.manifest import BACKENDS, check_relpath
from installer.bundle.stream import DEFAULT_CHUNK_SIZE, MAX_CHUNK_SIZE, MIN_CHUNK_SIZE


@dataclass(frozen=True)
class SpecModelFile:
    name: str
    source: Path


@dataclass(frozen=True)
class SpecModel:
    id: str
    backend: str
    format: str
    context_length: int
    files: tuple[SpecModelFile, ...]
    convert_from: Path | None = None  # a GGUF to convert into this (safetensors) model at build time
    convert_dtype: str = "bfloat16"


@dataclass(frozen=True)
class Wheelhouse:
    project: Path
    extras: tuple[str, ...]
    dependencies: bool


@dataclass(frozen=True)
class Spec:
    path: Path
    name: str
    version: str
    valid_days: int
    compatible: str  # "host" means the platform of the machine that builds
    chunk_size: int
    wheelhouse: Wheelhouse
    passphrase_kdf: dict[str, Any]
    models: tuple[SpecModel, ...]
    tiers: tuple[dict[str, Any], ...]


def resolve_source(text: str, base: Path) -> Path:
    """`pkg:MODULE/relative/path` finds a file inside an installed Python package; else a path."""
    if text.startswith("pkg:"):
        module, _, rel = text[4:].partition("/")
        found = importlib.util.find_spec(module)
        if found is None or not found.submodule_search_locations:
            raise SpecError(f"The spec names the Python package {module!r}, which is not installed.", "Run `make setup`, which installs the demo model package.")
        return Path(next(iter(found.submodule_search_locations))) / rel
    p = Path(text)
    return p if p.is_absolute() else base / p


def _req(table: dict[str, Any], key: str, typ: type, where: str) -> Any:
    if key not in table:
        raise SpecError(f"The spec's {where} has no {key!r}.")
    if not isinstance(table[key], typ) or (typ is int and isinstance(table[key], bool)):
        raise SpecError(f"The spec's {where}.{key} must be a {typ.__name__}.")
    return table[key]


def _model(m: Any, where: str, base: Path) -> SpecModel:
    backend = _req(m, "backend", str, where)
    fmt = _req(m, "format", str, where)
    if BACKENDS.get(backend) != fmt:
        raise SpecError(f"The spec's {where} pairs backend {backend!r} with format {fmt!r}; use one of {BACKENDS}.")
    files = []
    convert_from = None
    if "convert_from" in m:  # the files come from converting a GGUF (installer/toolchain/convert.py)
        convert_from = resolve_source(_req(m, "convert_from", str, where), base)
        if fmt != "safetensors" or "files" in m or not convert_from.is_file() or m.get("convert_dtype", "bfloat16") not in ("bfloat16", "float16", "float32"):
            raise SpecError(f"The spec's {where}.convert_from needs format safetensors, no files list, an existing GGUF ({convert_from}) "
                            "and a convert_dtype of bfloat16, float16 or float32.")
    for j, f in enumerate([] if convert_from else _req(m, "files", list, where)):
        name = _req(f, "name", str, f"{where}.files[{j}]")
        check_relpath(name, "spec")
        src = resolve_source(_req(f, "source", str, f"{where}.files[{j}]"), base)
        if not src.is_file():
            raise SpecError(f"The spec's {where} file {name!r} comes from {src}, which does not exist.")
        files.append(SpecModelFile(name, src))
    model_id = _req(m, "id", str, where)
    check_relpath(model_id, "spec")
    return SpecModel(model_id, backend, fmt, _req(m, "context_length", int, where), tuple(files),
                     convert_from, str(m.get("convert_dtype", "bfloat16")))


def load_spec(path: Path) -> Spec:
    path = Path(path).resolve()
    try:
        data = tomllib.loads(path.read_text())
    except OSError as e:
        raise SpecError(f"Cannot read the bundle spec {path}: {e.strerror}.") from None
    except tomllib.TOMLDecodeError as e:
        raise SpecError(f"The bundle spec {path} is not valid TOML: {e}.") from None
    base = path.parent

    wh = data.get("wheelhouse", {})
    wheelhouse = Wheelhouse(
        project=(base / wh.get("project", "..")).resolve(),
        extras=tuple(wh.get("extras", [])),
        dependencies=bool(wh.get("dependencies", True)),
    )
    if not (wheelhouse.project / "pyproject.toml").is_file():
        raise SpecError(f"The spec's wheelhouse.project {wheelhouse.project} holds no pyproject.toml.")

    models = [_model(m, f"models[{i}]", base) for i, m in enumerate(_req(data, "models", list, "top level"))]

    chunk = data.get("chunk_size", DEFAULT_CHUNK_SIZE)
    if not isinstance(chunk, int) or not MIN_CHUNK_SIZE <= chunk <= MAX_CHUNK_SIZE:
        raise SpecError(f"The spec's chunk_size must be an integer from {MIN_CHUNK_SIZE} to {MAX_CHUNK_SIZE}.")
    valid_days = data.get("valid_days", 365)
    if not isinstance(valid_days, int) or valid_days < 1:
        raise SpecError("The spec's valid_days must be a positive integer.")
    kdf = dict(data.get("passphrase_kdf", {"kind": "argon2id"}))
    if kdf.get("kind") not in ("argon2id", "scrypt"):
        raise SpecError("The spec's passphrase_kdf.kind must be argon2id or scrypt.")
    name = _req(data, "name", str, "top level")
    version = str(_req(data, "version", str, "top level"))
    for part in (name, version):  # the site makes a directory of them; refuse here what it would refuse
        if "/" in part:
            raise SpecError(f"The spec's name and version must be plain names, not {part!r}.")
        check_relpath(part, "spec")
    return Spec(
        path=path, name=name, version=version,
        valid_days=valid_days, compatible=str(data.get("compatible", "host")), chunk_size=chunk,
        wheelhouse=wheelhouse, passphrase_kdf=kdf, models=tuple(models),
        tiers=_tiers(data.get("tiers", []), models),
    )


def _tiers(tiers: Any, models: list[SpecModel]) -> tuple[dict[str, Any], ...]:
    """Check the tier table now, so a bad tier fails the build, not the install."""
    from installer.planning.tiers import models_of, parse_tiers

    if not isinstance(tiers, list):
        raise SpecError("The spec's tiers must be an array of tables ([[tiers]]).")
    try:
        parse_tiers(tiers, models_of(models))
    except TierError as e:
        raise SpecError(e.message, e.hint or None) from None
    return tuple(tiers)
