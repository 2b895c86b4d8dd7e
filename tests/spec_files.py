"""The one way the tests and benchmarks write a bundle spec: a small spec of one GGUF model, as the
vendor would write it (bundles/README.md), changed by keyword where a test needs more."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str | Path):
        return json.dumps(str(v))  # a TOML basic string
    if isinstance(v, list):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(f"no TOML for {v!r}")


def _is_tables(v: Any) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(x, dict) for x in v)


def _table(name: str, d: dict[str, Any], out: list[str]) -> None:
    out += [f"{k} = {_value(v)}" for k, v in d.items() if not _is_tables(v)]
    for k, v in d.items():
        if _is_tables(v):
            for item in v:
                out.append(f"\n[[{name}.{k}]]" if name else f"\n[[{k}]]")
                _table(f"{name}.{k}" if name else k, item, out)


def toml(spec: dict[str, Any]) -> str:
    """`spec` as TOML: its dict values are [tables], lists of dicts [[arrays of tables]], nested the same way."""
    out: list[str] = [f"{k} = {_value(v)}" for k, v in spec.items() if not isinstance(v, dict) and not _is_tables(v)]
    for k, v in spec.items():
        if isinstance(v, dict):
            out.append(f"\n[{k}]")
            _table(k, v, out)
    _table("", {k: v for k, v in spec.items() if _is_tables(v)}, out)
    return "\n".join(out) + "\n"


def one_model_spec(source: Path, *, name: str = "slim", model_id: str = "tiny", context_length: int = 512,
                   tier: dict[str, Any] | None = None,
                   models: list[dict[str, Any]] | None = None, tiers: list[dict[str, Any]] | None = None,
                   **top: Any) -> dict[str, Any]:
    """A spec of one llama.cpp model file and one CPU tier; `top` adds or replaces top-level keys and tables."""
    spec: dict[str, Any] = {"name": name, "version": "1.0.0", "valid_days": 30,
                            "wheelhouse": {"project": REPO, "dependencies": False}}
    spec.update(top)
    spec["models"] = [{"id": model_id, "backend": "llama.cpp", "format": "gguf", "context_length": context_length,
                       "files": [{"name": "model.gguf", "source": source}]}] + (models or [])
    spec["tiers"] = tiers if tiers is not None else [{"name": "cpu", "model": model_id, **(tier or {})}]
    return spec


def write_spec(path: Path, spec: dict[str, Any]) -> Path:
    path.write_text(toml(spec))
    return path
