"""Activation steps shared by install, upgrade and rollback: user and directories → units → enable →
switch `current` → start → wait for /health/ready → record state and audit.

If the new release does not become ready in time, `current` goes back to the previous release,
its units are restored and it is restarted; the error says so.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from appliance.errors import ApplianceError
from appliance.paths import Layout
from appliance.state import load_install_state, save_install_state, with_release
from installer.steps.configure import apply_config
from installer.steps.context import Context
from installer.steps.framework import Skip, step
from installer.system.release import RELEASE_JSON, Release, ReleasePlan, current_or_none, link_target, read_release
from installer.system.units import ENABLE, SERVER, SERVICE_USER, TIMER, UNITS, UnitSettings, load_templates, render_units

Progress = Callable[[str, float | None], None]
STATE_DIRS = (("var", 0o750), ("models", 0o700), ("adapters", 0o750), ("data", 0o750))


class NotReadyError(ApplianceError):
    default_hint = "See `journalctl -u appliance-server` for why the server did not start."


def systemd_running(root: Path) -> bool:
    """sd_booted(3) for the host, and only when installing into it (not into another --root)."""
    return root == Path("/") and Path("/run/systemd/system").is_dir()


def service_ids(root: Path, user: str = SERVICE_USER) -> tuple[int, int] | None:
    """uid and gid of the service user from the target's /etc/passwd, or None."""
    try:
        for line in (root / "etc/passwd").read_text().splitlines():
            parts = line.split(":")
            if len(parts) >= 4 and parts[0] == user:
                return int(parts[2]), int(parts[3])
    except (OSError, ValueError):
        pass
    return None


def _service_user(ctx: Context) -> tuple[tuple[int, int] | None, str]:
    """The service user's uid and gid (created when missing), and what was done."""
    root = ctx.layout.root
    ids = service_ids(root)
    if ids is not None:
        return ids, ""
    if not (root / "etc/passwd").is_file():
        ctx.notices.append(f"{root} has no /etc/passwd: the service user {SERVICE_USER!r} was not created")
        return None, "no /etc/passwd under the root, so no service user; "
    argv = ["useradd", "--system", "--user-group", "--no-create-home", "--home-dir", "/var/lib/appliance",
            "--shell", "/usr/sbin/nologin", "--comment", "appliance LLM service", SERVICE_USER]
    ctx.runner.run(argv if root == Path("/") else argv[:1] + ["--root", str(root)] + argv[1:])
    return service_ids(root), f"created system user {SERVICE_USER}; "


@step("user", "create the service user and state directories")
def step_user(ctx: Context, progress: Progress) -> str:
    """Each state directory is made or fixed on its own, through its descriptor; nothing under them is
    chowned, except the model root itself just decrypted (a 0700 tree only root could enter)."""
    layout, t = ctx.layout, ctx.target
    ids, made = _service_user(ctx) if ctx.uses_systemd else (None, "")
    for name, mode in STATE_DIRS:
        t.mkdir(getattr(layout, name), mode, ids)
    t.mkdir(layout.data / "inbox", 0o750, ids)
    t.mkdir(layout.log_dir, 0o750, ids)
    if not ctx.uses_systemd:
        return "state directories ready (no service user without systemd: the server runs as you)"
    if ids is None:
        return f"state directories ready; {made.rstrip('; ')}"
    if ctx.plan is not None:
        for ref in (ctx.planned().model, ctx.planned().embeddings):
            if ref is not None:
                t.chown_tree(layout.models / ref.key, *ids)
    # /etc/appliance: root's (the service user cannot write there), readable by the service's group
    # only; setgid so that files root adds later (api-keys.json) belong to that group too.
    t.mkdir(layout.etc, 0o2750)
    t.chown_tree(layout.etc, 0, ids[1])
    return f"{made}state directories owned by {SERVICE_USER}"


def unit_settings(ctx: Context, plan: ReleasePlan) -> UnitSettings:
    server, trainer = ctx.config.get("server", {}), ctx.config.get("trainer", {})
    tls = (str(server["tls_cert"]), str(server["tls_key"])) if server.get("tls_cert") and server.get("tls_key") else None
    model = ctx.config.get("model", {})  # the plan's devices, as appliance.toml has them now
    devices = model.get("cuda_visible_devices")
    gpus = len(model.get("gpus") or ())
    return UnitSettings(backend=plan.backend, uses_gpu=plan.uses_gpu, tls=tls,
                        host=str(server.get("host", "127.0.0.1")), schedule=str(trainer.get("schedule", "*-*-* 03:00:00")),
                        cuda_visible_devices=None if devices is None else str(devices), trainer_processes=gpus if plan.uses_gpu else 1)


def install_units(ctx: Context, release: Path, texts: dict[str, str]) -> tuple[int, int]:
    """Keep a copy in the release (rollback restores it) and write what changed to /etc/systemd/system."""
    written = 0
    ctx.target.mkdir(release / "units", 0o755)
    ctx.target.mkdir(ctx.layout.systemd_units, 0o755)
    for name, text in texts.items():
        for dest in (release / "units" / name, ctx.layout.systemd_units / name):
            try:
                same = dest.read_text() == text
            except OSError:
                same = False
            if not same:
                ctx.target.write(dest, text.encode(), 0o644)
                written += dest.parent == ctx.layout.systemd_units
    return written, len(texts) - written


@step("units", "render the systemd units")
def step_units(ctx: Context, progress: Progress) -> str:
    if not ctx.uses_systemd:
        raise Skip("--no-systemd")
    texts = render_units(unit_settings(ctx, ctx.planned()), load_templates())
    written, same = install_units(ctx, ctx.layout.releases / ctx.release_id, texts)
    return f"{written} unit file(s) written, {same} unchanged, in {ctx.layout.systemd_units}"


@step("enable", "enable the server and the trainer timer")
def step_enable(ctx: Context, progress: Progress) -> str:
    if not ctx.uses_systemd:
        raise Skip("--no-systemd")
    if ctx.systemd_running:
        ctx.runner.run(["systemctl", "daemon-reload"])
        ctx.runner.run(["systemctl", "enable", *ENABLE])
        return f"enabled {', '.join(ENABLE)}"
    ctx.runner.run(["systemctl", f"--root={ctx.layout.root}", "enable", *ENABLE])
    return f"enabled {', '.join(ENABLE)} offline (systemctl --root)"


@step("switch", "point /opt/appliance/current at the new release")
def step_switch(ctx: Context, progress: Progress) -> str:
    cur = current_or_none(ctx.layout)
    if cur is not None and cur.id == ctx.release_id:
        raise Skip(f"current already points at {ctx.release_id}")
    ctx.target.symlink(link_target(ctx.release_id), ctx.layout.current)
    return f"current -> releases/{ctx.release_id}" + (f" (was {cur.id})" if cur else "")


@step("command", "put `appliance` on PATH (/usr/local/bin)")
def step_command(ctx: Context, progress: Progress) -> str:
    link, target = ctx.layout.command_link, str(ctx.layout.command)
    if link.is_symlink() and os.readlink(link) == target:
        raise Skip(f"{link} already points at the current release")
    if link.exists() or link.is_symlink():
        ctx.notices.append(f"{link} exists and is not the appliance's, so it was left alone; run {target} instead")
        raise Skip(f"{link} belongs to something else")
    if not link.parent.is_dir():
        ctx.target.mkdir(link.parent, 0o755)
    ctx.target.symlink(target, link)
    return f"{link} -> {target}"


@step("start", "start the server and the timer")
def step_start(ctx: Context, progress: Progress) -> str:
    if not ctx.uses_systemd:
        app = ctx.layout.current / "venv/bin/appliance"
        ctx.notices.append(f"no systemd: start the server yourself with `{app} --root {ctx.layout.root} serve`")
        raise Skip("--no-systemd")
    if not ctx.systemd_running:
        ctx.notices.append(f"systemd is not running for {ctx.layout.root}: units are installed and enabled but not started")
        raise Skip("systemd is not running here; the units start at the next boot")
    ctx.runner.run(["systemctl", "start", TIMER])
    ctx.started = True
    # A failed start is judged by the readiness step, which rolls back with the journal's last lines.
    proc = ctx.runner.run(["systemctl", "restart", SERVER], check=False, timeout=1200)
    if proc.returncode != 0:
        return f"{SERVER} did not start (systemctl exit code {proc.returncode})"
    return f"restarted {SERVER}, started {TIMER}"


def _server(config: dict[str, Any]) -> Any:
    from appliance.config import ServerConfig, validate_section

    return validate_section(ServerConfig, "server", config.get("server", {}))


def ready_url(config: dict[str, Any]) -> str:
    """https when [server] tls_cert is set (appliance.tls: the one definition for local clients)."""
    from appliance import tls

    return f"{tls.local_url(_server(config))}/health/ready"


def wait_ready(ctx: Context, timeout: float, progress: Progress) -> None:
    """Poll /health/ready until it answers 200; give up early when systemd has given up on the unit."""
    from appliance import tls

    url, deadline, last = ready_url(ctx.config), time.monotonic() + timeout, "no answer"
    trust = tls.client_context(_server(ctx.config), ctx.layout)  # the configured certificate, nothing else
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=5, context=trust) as r:  # noqa: S310 (a URL we built)
                if r.status == 200:
                    return
                last = f"HTTP {r.status}"
        except urllib.error.HTTPError as e:
            last = f"HTTP {e.code}"
        except OSError as e:
            last = str(getattr(e, "reason", e))
        state = ctx.runner.run(["systemctl", "show", "-p", "ActiveState", "--value", SERVER], check=False).stdout.strip()
        if state == "failed":
            break
        progress(f"waiting for {url}: {last}", None)
        time.sleep(1)
    journal = ctx.runner.run(["journalctl", "-u", SERVER, "-n", "5", "--no-pager", "-o", "cat"], check=False).stdout
    tail = " / ".join(journal.strip().splitlines()[-5:])
    raise NotReadyError(f"The server of release {ctx.release_id} did not become ready within {timeout:.0f} s ({last})"
                        + (f"; its log ends: {tail}" if tail else "") + ".")


def restore(ctx: Context, previous: Release) -> None:
    """Put the previous release back: its units, its `current`, a restart."""
    units = {n: (previous.dir / "units" / n).read_text() for n in UNITS if (previous.dir / "units" / n).is_file()}
    if units:
        install_units(ctx, previous.dir, units)
        ctx.runner.run(["systemctl", "daemon-reload"])
    if previous.plan.model_settings:
        try:
            apply_config(ctx, previous.plan)
        except Skip:
            pass
    ctx.target.symlink(link_target(previous.id), ctx.layout.current)
    ctx.runner.run(["systemctl", "restart", SERVER], check=False, timeout=1200)


@step("ready", "wait until /health/ready answers")
def step_ready(ctx: Context, progress: Progress) -> str:
    if not ctx.started:
        raise Skip("nothing was started")
    try:
        wait_ready(ctx, ctx.opts.ready_timeout, progress)
    except NotReadyError as e:
        prev = ctx.previous
        if prev is None or prev.id == ctx.release_id:
            ctx.runner.run(["systemctl", "stop", SERVER], check=False)
            raise NotReadyError(e.message + " There is no previous release to go back to; the server is stopped.") from None
        restore(ctx, prev)
        audit(ctx.layout, {"event": "rollback", "from": ctx.release_id, "to": prev.id, "reason": "not ready"}, ctx)
        raise NotReadyError(e.message + f" Switched back to release {prev.id} and restarted it.") from None
    return f"{ready_url(ctx.config)} answers"


def audit(layout: Layout, record: dict[str, Any], ctx: Any) -> None:
    """An audit line (appliance.audit hands a file it creates to the log directory's owner, the service user)."""
    if ctx.target.dry_run:
        ctx.target.call(f"audit {json.dumps(record, sort_keys=True)}", lambda: None)
        return
    from appliance import audit as audit_log

    audit_log.append(layout, {"actor": "installer", **record})  # a file root creates there goes to the directory's owner


@contextlib.contextmanager
def audited(ctx: Context, verb: str) -> Iterator[None]:
    """An audit line when `verb` fails (one that completes writes its own in its record step)."""
    try:
        yield
    except BaseException as e:
        if not ctx.target.dry_run and ctx.layout.log_dir.is_dir():
            reason = e.message if isinstance(e, ApplianceError) else type(e).__name__
            bundle = getattr(ctx.opts, "bundle", None)
            with contextlib.suppress(Exception):  # the failure itself is what the administrator must see
                audit(ctx.layout, {"event": verb, "outcome": "failed", "reason": reason, "bundle": str(bundle) if bundle else None}, ctx)
        raise


def record(ctx: Context, action: str) -> None:
    plan = ctx.planned()
    issued = datetime.fromisoformat(plan.issued_at.replace("Z", "+00:00"))
    now = datetime.now(timezone.utc)
    audit(ctx.layout, {"event": action, "outcome": "done", "release": ctx.release_id, "version": plan.version,
                       "sequence": plan.sequence, "tier": plan.tier, "model": plan.model.id}, ctx)
    state = with_release(load_install_state(ctx.layout), release=ctx.release_id, sequence=plan.sequence, issued_at=issued,
                         action=action, at=now, info={"version": plan.version, "tier": plan.tier})
    if ctx.target.dry_run:
        ctx.target.call(f"write {ctx.layout.state_file} (highest_sequence {state['highest_sequence']})", lambda: None)
        return
    save_install_state(ctx.layout, state)
    rel = read_release(ctx.layout.releases / ctx.release_id)
    if rel is not None and (rel.plan.tier, rel.plan.model_settings, rel.plan.trainer_settings) != (plan.tier, plan.model_settings, plan.trainer_settings):
        # the same release re-installed with another tier: keep release.json telling the truth for rollback
        kept = replace(plan, extras=rel.plan.extras, installed_at=rel.plan.installed_at)
        ctx.target.write(rel.dir / RELEASE_JSON, (json.dumps(kept.to_json(), indent=2, sort_keys=True) + "\n").encode())


@step("record", "record state.json and an audit entry")
def step_record(ctx: Context, progress: Progress) -> str:
    action = "upgrade" if ctx.previous is not None and ctx.previous.id != ctx.release_id else "install"
    record(ctx, action)
    return f"state.json and the audit log record {action} of {ctx.release_id}"



ACTIVATE_STEPS = (step_user, step_units, step_enable, step_switch, step_command, step_start, step_ready, step_record)
REFRESH_STEPS = tuple(s for s in ACTIVATE_STEPS if s.name in ("units", "enable"))
