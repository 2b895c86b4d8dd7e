"""The config step: merge what a release wants into appliance.toml, keeping what the administrator
changed. Install runs it for the new release; rollback and a failed upgrade for the old one."""

from __future__ import annotations

import json
import re
from collections.abc import Callable

from installer.steps.context import Context
from installer.steps.framework import Skip, step
from installer.system import config_file as cf
from installer.system.release import ReleasePlan


def apply_config(ctx: Context, plan: ReleasePlan) -> str:
    layout = ctx.layout
    server: dict[str, object] = {}
    if ctx.opts.host is not None:
        server["host"] = ctx.opts.host
    if ctx.opts.port is not None:
        server["port"] = ctx.opts.port
    desired = cf.desired_values(plan.model_settings, plan.trainer_settings, server)
    if plan.embedding_settings:
        desired["embeddings"] = dict(plan.embedding_settings)
    try:
        existing: str | None = layout.config_file.read_text()
    except FileNotFoundError:
        existing = None
    base = cf.load_base(layout)
    kept_text = _without_embeddings(existing, base) if existing is not None and not plan.embedding_settings else existing
    merged = cf.merge(kept_text, base, desired, str(layout.config_file))
    ctx.config = cf.parse(merged.text, str(layout.config_file))
    kept = f"; kept your values for {', '.join(merged.kept)}" if merged.kept else ""
    if merged.text == existing and cf.load_base(layout) == merged.installed:
        raise Skip(f"{layout.config_file} is up to date{kept}")
    if not layout.etc.is_dir():  # the user step later gives it to the service's group
        ctx.target.mkdir(layout.etc, 0o755)
    ctx.target.write(layout.config_file, merged.text.encode(), 0o644)
    ctx.target.write(cf.base_path(layout), (json.dumps(merged.installed, indent=2, sort_keys=True) + "\n").encode(), 0o644)
    return f"wrote {layout.config_file}{kept}"


def _without_embeddings(text: str, base: cf.Values) -> str:
    """`text` less an [embeddings] section the installer wrote for a release that had one, when the
    release now configured has none (upgrade, rollback): left in place it would name a model this
    release did not bring. A path the administrator set stays, with everything else in the file."""
    ours = base.get("embeddings", {}).get("path")
    if ours is None or cf.parse(text, "appliance.toml").get("embeddings", {}).get("path") != ours:
        return text
    out, skipping = [], False
    for line in text.splitlines(keepends=True):
        header = re.match(r"^\s*\[([A-Za-z0-9_.-]+)\]\s*(#.*)?$", line)
        if header:
            skipping = header[1] == "embeddings"
        if not skipping:
            out.append(line)
    return "".join(out).rstrip("\n") + "\n"


@step("config", "write /etc/appliance/appliance.toml")
def step_config(ctx: Context, progress: Callable[[str, float | None], None]) -> str:
    plan = ctx.planned()
    if not plan.model_settings:
        raise Skip("the release records no configuration")
    return apply_config(ctx, plan)
