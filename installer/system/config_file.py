"""/etc/appliance/appliance.toml: written by the installer, edited by people; user edits survive upgrades.

A three-way merge, as dpkg does for conffiles: the installer remembers what it last wrote (a JSON
file beside the config). A key whose value still equals that is the installer's to change; a key
the administrator changed or added is kept. Changes are made line by line, so comments stay.
"""

from __future__ import annotations

import json
import re
import tomllib
from dataclasses import asdict, dataclass
from typing import Any

from appliance.config import ServerConfig
from appliance.errors import StateError
from appliance.paths import Layout
from appliance.trainer.settings import TrainerSettings

Values = dict[str, dict[str, Any]]
BASE_NAME = ".appliance.toml.installed.json"

# What the installer writes, with the defaults the readers declare (appliance.config, appliance.trainer.settings).
SERVER_DEFAULTS: dict[str, Any] = asdict(ServerConfig())
TRAINER_DEFAULTS: dict[str, Any] = {k: v for k, v in asdict(TrainerSettings()).items() if k in (
    "schedule", "min_new_examples", "learning_rate", "epochs", "patience", "gate_margin", "keep_adapters",
    "lora_rank", "lora_alpha", "lora_targets", "batch_size")}
HEADER = """# The appliance's configuration, written by `appliance install`.
# Edit freely: on upgrade the installer changes only the values it wrote itself and you left alone.
# Restart the server after an edit: systemctl restart appliance-server.
"""


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a TOML basic string is a JSON string for what we write
    if isinstance(v, list | tuple):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def render(values: Values) -> str:
    out = [HEADER]
    for section, keys in values.items():
        out.append(f"\n[{section}]\n")
        out.extend(f"{k} = {toml_value(v)}\n" for k, v in keys.items())
    return "".join(out)


def parse(text: str, where: str) -> Values:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise StateError(f"{where} is not valid TOML: {e}.", "Fix the file (or move it aside) and run the command again.") from None
    return {k: v for k, v in data.items() if isinstance(v, dict)}


_SECTION = re.compile(r"^\s*\[([A-Za-z0-9_.-]+)\]\s*(#.*)?$")


def _set_line(lines: list[str], section: str, key: str, value: Any) -> None:
    """Replace `key = ...` inside [section], or add it at the end of the section (or a new section)."""
    current, start, end = None, None, len(lines)
    key_re = re.compile(rf"^\s*{re.escape(key)}\s*=")
    for i, line in enumerate(lines):
        m = _SECTION.match(line)
        if m:
            if current == section:
                end = i
                break
            current = m[1]
            if current == section:
                start = i
            continue
        if current == section and key_re.match(line):
            lines[i] = f"{key} = {toml_value(value)}\n"
            return
    new = f"{key} = {toml_value(value)}\n"
    if start is None:
        if lines and not lines[-1].endswith("\n"):
            lines[-1] += "\n"
        lines.extend([f"\n[{section}]\n", new])
        return
    insert = end
    while insert > start + 1 and not lines[insert - 1].strip():
        insert -= 1
    lines.insert(insert, new)


@dataclass(frozen=True)
class Merge:
    text: str
    installed: Values  # what the installer now considers its own values
    kept: list[str]  # "section.key" values the administrator changed and the installer left alone


def merge(existing_text: str | None, base: Values, desired: Values, where: str = "appliance.toml") -> Merge:
    """Pure: the new file text given the file on disk, what the installer last wrote, and what it wants now."""
    if existing_text is None:
        return Merge(render(desired), desired, [])
    user = parse(existing_text, where)
    lines = existing_text.splitlines(keepends=True)
    kept: list[str] = []
    for section, keys in desired.items():
        for key, value in keys.items():
            have = user.get(section, {})
            if key in have:
                if key not in base.get(section, {}) or have[key] != base[section][key]:
                    if have[key] != value:
                        kept.append(f"{section}.{key}")
                    continue
                if have[key] == value:
                    continue
            _set_line(lines, section, key, value)
    text = "".join(lines)
    parse(text, where)  # never write a file we cannot read back
    return Merge(text, desired, kept)


def base_path(layout: Layout) -> Any:
    return layout.etc / BASE_NAME


def load_base(layout: Layout) -> Values:
    try:
        data = json.loads(base_path(layout).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def desired_values(model: dict[str, Any], trainer: dict[str, Any], server: dict[str, Any]) -> Values:
    return {"server": {**SERVER_DEFAULTS, **server}, "model": dict(model), "trainer": {**TRAINER_DEFAULTS, **trainer}}


def read_config(layout: Layout) -> Values:
    """The config as it is on disk ({} when absent)."""
    try:
        return parse(layout.config_file.read_text(), str(layout.config_file))
    except FileNotFoundError:
        return {}
