"""The adapter registry: `adapters/<id>/` directories and the `adapters/active` symlink.

Only `promote` and `rollback` move the link, each in one atomic rename; readers (the server) see
the old adapter or the new one. `history.json` remembers the order of promotions for rollback.
A registered adapter appears by renaming a complete staging directory, so a crash mid-copy leaves
only a `.partial` staging directory that the next run removes.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance import audit
from appliance.atomic import PARTIAL_SUFFIX, atomic_symlink, atomic_write_json, fsync_dir
from appliance.errors import ApplianceError
from appliance.paths import Layout

ACTIVE = "active"
HISTORY = "history.json"


class AdapterError(ApplianceError):
    """An adapter that cannot be found, read, promoted or rolled back as asked."""


@dataclass(frozen=True)
class Adapter:
    id: str
    dir: Path
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def peft_dir(self) -> Path:
        return self.dir / "peft"

    @property
    def gguf_path(self) -> Path | None:
        p = self.dir / "adapter.gguf"
        return p if p.is_file() else None

    @property
    def created_at(self) -> str:
        return str(self.metadata.get("created_at", ""))


def _valid_id(adapter_id: str) -> bool:
    return bool(adapter_id) and adapter_id not in (ACTIVE, ".", "..") and "/" not in adapter_id and not adapter_id.startswith(".")


def _load(layout: Layout, adapter_id: str) -> Adapter | None:
    d = layout.adapters / adapter_id
    if not _valid_id(adapter_id) or d.is_symlink() or not (d / "metadata.json").is_file():
        return None
    if not (d / "peft" / "adapter_model.safetensors").is_file():
        return None
    try:
        meta = json.loads((d / "metadata.json").read_text())
    except (OSError, ValueError):
        return None
    return Adapter(adapter_id, d, meta if isinstance(meta, dict) else {})


def get_adapter(layout: Layout, adapter_id: str) -> Adapter:
    a = _load(layout, adapter_id)
    if a is None:
        raise AdapterError(f"There is no complete adapter {adapter_id!r} under {layout.adapters}.",
                           "Run `appliance adapters list` to see the registered adapters.")
    return a


def list_adapters(layout: Layout) -> list[Adapter]:
    """Every complete registered adapter, oldest first."""
    if not layout.adapters.is_dir():
        return []
    found = [a for p in layout.adapters.iterdir() if p.is_dir() and (a := _load(layout, p.name))]
    return sorted(found, key=lambda a: (a.created_at, a.id))


def active_id(layout: Layout) -> str | None:
    try:
        return os.readlink(layout.adapters / ACTIVE)
    except OSError:
        return None


def active_adapter(layout: Layout) -> Adapter | None:
    """The adapter the server should apply, or None for the plain base model."""
    target = active_id(layout)
    return _load(layout, target) if target else None


def _history(layout: Layout) -> list[str]:
    try:
        value = json.loads((layout.adapters / HISTORY).read_text())
    except (OSError, ValueError):
        return []
    return [str(x) for x in value] if isinstance(value, list) else []


def promote(layout: Layout, adapter_id: str) -> Adapter:
    """Make `adapter_id` the active adapter (one atomic symlink switch)."""
    adapter = get_adapter(layout, adapter_id)
    if active_id(layout) == adapter_id:
        return adapter
    history = [h for h in _history(layout) if h != adapter_id]
    current = active_id(layout)
    if current and current not in history:
        history.append(current)
    # History first: a crash between the two writes leaves a history that names one adapter too
    # many, which rollback skips, never a link that history does not know about.
    atomic_write_json(layout.adapters / HISTORY, [*history, adapter_id])
    atomic_symlink(adapter_id, layout.adapters / ACTIVE)
    audit.append(layout, {"event": "adapter_promoted", "adapter": adapter_id, "previous": current})
    return adapter


def rollback(layout: Layout) -> Adapter | None:
    """Return to the adapter active before the current one; to the base model when there was none."""
    current = active_id(layout)
    history = [h for h in _history(layout) if h != current]
    while history and _load(layout, history[-1]) is None:
        history.pop()
    if current is None and not history:
        raise AdapterError("No adapter is active, so there is nothing to roll back.", "The server already uses the base model.")
    if history:
        atomic_write_json(layout.adapters / HISTORY, history)
        atomic_symlink(history[-1], layout.adapters / ACTIVE)
        audit.append(layout, {"event": "adapter_rolled_back", "from": current, "to": history[-1]})
        return get_adapter(layout, history[-1])
    atomic_write_json(layout.adapters / HISTORY, [])
    (layout.adapters / ACTIVE).unlink(missing_ok=True)
    fsync_dir(layout.adapters)
    audit.append(layout, {"event": "adapter_rolled_back", "from": current, "to": None})
    return None


def staging_dir(layout: Layout, adapter_id: str) -> Path:
    """A fresh directory to build an adapter in; `register` moves it into place."""
    if not _valid_id(adapter_id):
        raise AdapterError(f"{adapter_id!r} is not a valid adapter id.")
    d = layout.adapters / f".{adapter_id}{PARTIAL_SUFFIX}"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    return d


def register(layout: Layout, adapter_id: str, staged: Path, metadata: dict[str, Any]) -> Adapter:
    """Write metadata into the staged directory and rename it to `adapters/<id>` in one step."""
    dest = layout.adapters / adapter_id
    if dest.exists():
        raise AdapterError(f"An adapter {adapter_id!r} is already registered.")
    atomic_write_json(staged / "metadata.json", {**metadata, "id": adapter_id})
    os.rename(staged, dest)
    fsync_dir(layout.adapters)
    return get_adapter(layout, adapter_id)


def clean_partials(layout: Layout) -> list[Path]:
    """Remove staging directories and link temp files left by a run that was killed."""
    removed: list[Path] = []
    if layout.adapters.is_dir():
        for p in layout.adapters.iterdir():
            if p.name.endswith(PARTIAL_SUFFIX):
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p)
                else:
                    p.unlink()
                removed.append(p)
    return removed


def prune(layout: Layout, keep: int) -> list[str]:
    """Delete the oldest adapters beyond `keep`, never the active one nor the one rollback returns to."""
    current = active_id(layout)
    history = [h for h in _history(layout) if h != current]
    protected = {current, history[-1] if history else None}
    adapters = list_adapters(layout)
    removed = []
    excess = len(adapters) - max(keep, 1)
    for a in adapters:
        if excess <= 0:
            break
        if a.id in protected:
            continue
        shutil.rmtree(a.dir)
        removed.append(a.id)
        excess -= 1
    if removed:
        atomic_write_json(layout.adapters / HISTORY, [h for h in _history(layout) if h not in removed])
    return removed
