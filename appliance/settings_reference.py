"""docs/settings.md, written from the one definition of each setting of appliance.toml (the
dataclasses of appliance/config.py and appliance/trainer/settings.py), so the reference cannot
fall behind the code: `make docs` rewrites it, and a test fails when it differs."""

from __future__ import annotations

import dataclasses
import sys
from typing import Any

from appliance.config import EmbeddingsConfig, ModelConfig, ServerConfig
from appliance.trainer.settings import TrainerSettings

SECTIONS: tuple[tuple[str, type, str], ...] = (
    ("server", ServerConfig, "The API server: where it listens and how much it takes on."),
    ("model", ModelConfig, "Written by the installer from the tier it chose; an upgrade rewrites the keys "
                           "you did not change. `path` is the only key without a default."),
    ("trainer", TrainerSettings, "The nightly LoRA run and the gate that decides whether its adapter is promoted."),
    ("embeddings", EmbeddingsConfig, "Present when the tier names an embedding model (`POST /v1/embeddings`); written by the "
                                     "installer like [model]. Without it, /v1/embeddings answers 404."),
)


def _default(f: dataclasses.Field[Any]) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return "(required)"
    if value is None:
        return "(absent)"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, str):
        return f'`"{value}"`'
    if isinstance(value, tuple | list):
        return "`[" + ", ".join(f'"{x}"' if isinstance(x, str) else str(x) for x in value) + "]`"
    return f"`{value}`"


def _allowed(f: dataclasses.Field[Any]) -> str:
    m = f.metadata
    if "choices" in m:
        return ", ".join(f"`{c}`" for c in m["choices"])
    lo, hi = m.get("min"), m.get("max")
    if lo is not None and hi is not None:
        return f"{lo} to {hi}" if lo != hi else f"{lo}"
    return f"at least {lo}" if lo is not None else ""


def markdown() -> str:
    out = ["# Settings of /etc/appliance/appliance.toml", "",
           "Every key the appliance reads, its default and what it may be. A key not listed here, or a",
           "section other than these, is an error that names it (a misspelt key is never ignored).",
           "This page is written from the code (`make docs`); a test fails when the two differ.", ""]
    for name, cls, intro in SECTIONS:
        out += [f"## [{name}]", "", intro, "", "| key | default | allowed | what it is |", "|---|---|---|---|"]
        out += [f"| `{f.name}` | {_default(f)} | {_allowed(f)} | {f.metadata['help']} |" for f in dataclasses.fields(cls)]
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    sys.stdout.write(markdown())
