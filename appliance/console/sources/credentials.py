"""The console's own API key: /metrics, the playground and admin routes need one.

Order: $APPLIANCE_API_KEY; else the key in /etc/appliance/console.key (0600) if it is still valid;
else a new admin key made with appliance.apikeys.create (the same code as `appliance keys create`),
saved there atomically. The console runs as the administrator who may create keys anyway.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

from appliance.errors import ApplianceError
from appliance.paths import Layout

ENV = "APPLIANCE_API_KEY"
_lock = threading.Lock()


class ConsoleKeyError(ApplianceError):
    default_hint = "Run the console as the administrator (root), or set APPLIANCE_API_KEY to an admin key."


def key_path(layout: Layout) -> Path:
    return layout.etc / "console.key"


def console_key(layout: Layout) -> tuple[str | None, str | None]:
    """(key, note): note says when a key was just created. (None, None) before anything is installed."""
    from appliance import apikeys
    from appliance.atomic import atomic_write_bytes

    if os.environ.get(ENV):
        return os.environ[ENV], None
    if not layout.config_file.is_file():
        return None, None
    path = key_path(layout)
    with _lock:
        try:
            key = path.read_text().strip()
            if key and apikeys.verify(layout, key) is not None:
                return key, None
        except FileNotFoundError:
            pass
        except OSError as e:
            raise ConsoleKeyError(f"The console key {path} cannot be read: {e.strerror}.") from None
        try:
            key_id, key = apikeys.create(layout, "admin")
            atomic_write_bytes(path, (key + "\n").encode(), mode=0o600)
        except PermissionError:
            raise ConsoleKeyError(f"The console may not create its API key in {path.parent}.") from None
        return key, f"created admin API key {key_id} for the console (kept in {path}, mode 0600)"
