"""Rollback, uninstall and status of an installed appliance, and the lock that keeps two installs apart."""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from appliance.errors import ApplianceError, StateError, UsageError
from appliance.nofollow import open_file, why
from appliance.paths import Layout
from appliance.state import highest_sequence, installer_dir, load_install_state
from installer.steps.activate import (
    audit,
    audited,
    record,
    service_ids,
    step_enable,
    step_ready,
    step_start,
    step_switch,
    step_units,
)
from installer.steps.configure import step_config
from installer.steps.context import Context
from installer.steps.framework import Skip, Step, run_steps, step
from installer.steps.install import clean_partials
from installer.system.release import Release, current_release, list_releases, previous_release
from installer.system.units import ENABLE, SERVER, SERVICE_USER, TIMER, TRAINER, UNITS


class LockedError(ApplianceError):
    default_hint = "Wait for it to finish (see its terminal), then run the command again."


@contextlib.contextmanager
def install_lock(layout: Layout) -> Iterator[None]:
    """An exclusive, non-blocking flock on a file in root's own directory (Layout.install_lock), so no
    other user can hold it to block installs; the kernel drops it when the holder dies, even by SIGKILL."""
    path = layout.install_lock
    installer_dir(layout)
    try:
        fd = open_file(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise StateError(f"The install lock {path} cannot be opened: {why(e)}.", "Move it aside and run the command again.") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            written = os.pread(fd, 32, 0).decode(errors="replace").strip()
            holder = written if written.isdigit() else "unknown"  # print only a pid, whatever the file holds
            raise LockedError(f"Another install, upgrade, rollback or uninstall is running under {layout.root} (pid {holder}).") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


@step("record", "record state.json and an audit entry")
def _record_rollback(ctx: Context, progress: Any) -> str:
    record(ctx, "rollback")
    return f"rolled back to {ctx.release_id}"


def rollback(ctx: Context, to: str | None = None) -> str:
    """Make the previous release (or `to`) current again; returns its id."""
    with audited(ctx, "rollback"):
        return _rollback(ctx, to)


def _rollback(ctx: Context, to: str | None) -> str:
    cur = current_release(ctx.layout)
    if to is not None:
        target = next((r for r in list_releases(ctx.layout) if r.id == to), None)
        if target is None:
            raise UsageError(f"There is no installed release {to!r}.", "`appliance status` lists the installed releases.")
    else:
        target = previous_release(ctx.layout, cur)
    if target is None:
        raise UsageError("There is no earlier release to roll back to.", "`appliance status` lists the installed releases.")
    if cur is not None and target.id == cur.id:
        raise UsageError(f"Release {target.id} is already current.")
    clean_partials(ctx.layout, ctx.target)
    ctx.previous, ctx.plan = cur, target.plan
    steps = (  # the activation steps, told what they restore
        replace(step_config, description="restore the release's model settings in appliance.toml"),
        replace(step_units, description="restore the release's systemd units"),
        step_enable,
        replace(step_switch, description=f"point /opt/appliance/current at {target.id}"),
        replace(step_start, description="restart the server"),
        step_ready,
        _record_rollback,
    )
    if not ctx.config:
        from installer.system.config_file import read_config
        ctx.config = read_config(ctx.layout)
    run_steps(steps, ctx, ctx.emit)
    return target.id


def uninstall(ctx: Context, purge: bool) -> None:
    """Stop and remove the units and the releases; with `purge`, the data, keys, logs and install state too."""
    with audited(ctx, "uninstall"):
        _uninstall(ctx, purge)


def _uninstall(ctx: Context, purge: bool) -> None:
    layout, t, r = ctx.layout, ctx.target, ctx.runner

    def stop(c: Context, p: Any) -> str:
        present = [u for u in UNITS if (layout.systemd_units / u).exists()]
        if not present:
            raise Skip("no appliance units are installed")
        if c.systemd_running:
            r.run(["systemctl", "disable", "--now", *ENABLE], check=False)
            r.run(["systemctl", "stop", TRAINER], check=False)
        else:
            r.run(["systemctl", f"--root={layout.root}", "disable", *ENABLE], check=False)
        for u in present:
            t.remove_tree(layout.systemd_units / u)
        if c.systemd_running:
            r.run(["systemctl", "daemon-reload"], check=False)
        return f"stopped, disabled and removed {', '.join(present)}"

    def remove_code(c: Context, p: Any) -> str:
        if not layout.opt.exists():
            raise Skip(f"{layout.opt} is not there")
        t.remove_tree(layout.current)  # first, so no half-removed release is ever current
        t.remove_tree(layout.opt)
        link = layout.command_link
        if link.is_symlink() and os.readlink(link) == str(layout.command):
            t.remove_tree(link)
        return f"removed {layout.opt}"

    def remove_data(c: Context, p: Any) -> str:
        if not purge:
            audit(layout, {"event": "uninstall", "outcome": "done", "purge": False}, c) if layout.log_dir.is_dir() else None
            raise Skip(f"kept {layout.etc}, {layout.var}, {layout.log_dir} and {layout.installer_state} (use --purge to delete them)")
        for d in (layout.etc, layout.var, layout.log_dir):
            t.remove_tree(d)
        for p in sorted(layout.installer_state.glob("*")):  # not the directory: the lock held now is in it
            if p != layout.install_lock:
                t.remove_tree(p)
        if service_ids(layout.root) is not None and c.uses_systemd:
            argv = ["userdel", SERVICE_USER]
            r.run(argv if layout.root == Path("/") else ["userdel", "--root", str(layout.root), SERVICE_USER], check=False)
        return f"deleted configuration, keys, models, adapters, data, logs and install state under {layout.root}"

    run_steps((Step("units", "stop and remove the systemd units", stop),
               Step("code", "remove the releases", remove_code),
               Step("data", "remove data and keys (--purge only)", remove_data)), ctx, ctx.emit)


def _unit_state(layout: Layout, runner: Any, running: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for u in UNITS:
        installed = (layout.systemd_units / u).exists()
        entry: dict[str, Any] = {"installed": installed}
        wants = "timers.target.wants" if u.endswith(".timer") else "multi-user.target.wants"
        entry["enabled"] = (layout.systemd_units / wants / u).is_symlink() if u in ENABLE else None
        if running and installed:
            entry["active"] = runner.run(["systemctl", "is-active", u], check=False).stdout.strip() or "unknown"
            if u == TIMER:
                entry["next"] = runner.run(["systemctl", "show", "-p", "NextElapseUSecRealtime", "--value", u], check=False).stdout.strip()
        out[u] = entry
    return out


def status(layout: Layout, runner: Any, running: bool) -> dict[str, Any]:
    """What is installed: current release, all releases, tier, model, units, last install. Reads only."""
    from installer.system.config_file import read_config

    state = load_install_state(layout)
    problem = None
    try:
        cur: Release | None = current_release(layout)
    except StateError as e:
        cur, problem = None, e.message
    config = read_config(layout)
    model = config.get("model", {})
    return {
        "root": str(layout.root),
        "current": None if cur is None else {**cur.summary(), "path": str(cur.dir)},
        "releases": [{**r.summary(), "current": cur is not None and r.id == cur.id} for r in list_releases(layout)],
        "tier": model.get("tier"), "model": {"id": model.get("id"), "path": model.get("path"), "backend": model.get("backend")} if model else None,
        "units": _unit_state(layout, runner, running),
        "highest_sequence": highest_sequence(state),
        "last_install": state.get("last_install"),
        "problem": problem,
    }


def format_status(s: dict[str, Any]) -> str:
    lines = [f"root        {s['root']}"]
    cur = s["current"]
    lines.append(f"current     {cur['id']}  (version {cur['version']}, sequence {cur['sequence']}, tier {cur['tier']})" if cur else "current     none")
    if s.get("problem"):
        lines.append(f"problem     {s['problem']}")
    for r in s["releases"]:
        lines.append(f"release     {'*' if r['current'] else ' '} {r['id']:<16} sequence {r['sequence']:<4} tier {r['tier']}  installed {r['installed_at']}")
    if s["model"]:
        lines.append(f"model       {s['model']['id']} ({s['model']['backend']})  {s['model']['path']}")
    for name, u in s["units"].items():
        bits = ["installed" if u["installed"] else "not installed"]
        if u.get("enabled") is not None:
            bits.append("enabled" if u["enabled"] else "disabled")
        if "active" in u:
            bits.append(u["active"])
        if u.get("next"):
            bits.append(f"next {u['next']}")
        lines.append(f"unit        {name:<28} {', '.join(bits)}")
    last = s["last_install"]
    lines.append(f"last        {last['action']} of {last['release']} at {last['at']}" if last else "last        none")
    return "\n".join(lines)


__all__ = ["install_lock", "rollback", "uninstall", "status", "format_status", "SERVER", "TIMER"]
