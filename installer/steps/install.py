"""Install and upgrade, as named idempotent steps: verify → plan → preflight → confirm → stage → model → engine → config.

The activation steps that follow (user and directories, units, enable, switch, start, ready, record)
live in installer/steps/activate.py; rollback reuses them. Every change to the target goes through
`ctx.target` and every command through `ctx.runner`, so a dry run is the same code with both swapped.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

from appliance.atomic import PARTIAL_SUFFIX
from appliance.errors import StateError, TierError, UsageError
from appliance.nofollow import open_dir, open_file
from appliance.paths import Layout
from installer.bundle.keywrap import site_kek, unwrap_key
from installer.bundle.manifest import MANIFEST, Model, canonical_json, runtime_dir
from installer.bundle.reader import decrypt_model_file
from installer.planning.preflight import bundle_python, preflight, venv_estimate
from installer.steps.activate import ACTIVATE_STEPS, REFRESH_STEPS, audited, service_ids
from installer.steps.configure import step_config
from installer.steps.context import Context
from installer.steps.engine import step_engine
from installer.steps.framework import Skip, run_steps, step
from installer.steps.prepare import find_model, step_plan, step_verify
from installer.system.config_file import read_config
from installer.system.release import (
    RELEASE_JSON,
    ModelRef,
    build_venv,
    current_or_none,
    fsync_tree,
    read_release,
    stage_wheelhouse,
)
from installer.system.target import Target

Progress = Callable[[str, float | None], None]


def clean_partials(layout: Layout, target: Target) -> list[str]:
    """Leftovers of an interrupted run: `.partial` files and directories, and links to them. Never used."""
    removed: list[str] = []
    for d in (layout.releases, layout.models, layout.opt, layout.etc, layout.trust_dir, layout.var, layout.installer_state, layout.systemd_units):
        if not d.is_dir():
            continue
        for p in sorted(d.iterdir()):
            if d == layout.systemd_units and not p.name.startswith(".appliance-"):
                continue  # not ours
            if p.name.endswith(PARTIAL_SUFFIX) or (p.is_symlink() and os.readlink(p).endswith(PARTIAL_SUFFIX)):
                target.remove_tree(p)
                removed.append(str(p))
    return removed


@step("preflight", "check RAM, disk, driver, Python and systemd for that tier")
def step_preflight(ctx: Context, progress: Progress) -> str:
    m, plan = ctx.manifest, ctx.planned()
    assert ctx.machine is not None and ctx.tier is not None
    staged = read_release(ctx.layout.releases / ctx.release_id) is not None
    model_bytes = sum(r.bytes for r in (plan.model, plan.embeddings) if r is not None and not (ctx.layout.models / r.key).is_dir())
    wheels = sum(f.size for f in m.files if f.path.startswith(runtime_dir(ctx.tier.runtime)))
    problems = preflight(
        ctx.machine, ctx.tier,
        model_bytes=model_bytes,
        venv_bytes=0 if staged else venv_estimate(wheels), python=bundle_python(m.compatible),
        no_systemd=ctx.opts.no_systemd or ctx.layout.root != Path("/"),
    )
    if problems:
        raise TierError(f"Preflight found {len(problems)} problem(s): " + "; ".join(problems) + ".",
                        "Fix them, or choose another tier with --tier; `appliance hw` shows every tier.")
    return "RAM, disk, driver, Python and systemd are fine"


@step("confirm", "ask before changing anything")
def step_confirm(ctx: Context, progress: Progress) -> str:
    if ctx.opts.yes:
        raise Skip("--yes given")
    if ctx.dry_run:
        raise Skip("dry run")
    i = ctx.planned()
    verb = "Upgrade to" if ctx.opts.upgrade else "Install"
    if not ctx.confirm(f"{verb} {i.name} {i.version} (sequence {i.sequence}), tier {i.tier}, into {ctx.layout.root}?"):
        raise UsageError("Cancelled; nothing was changed.")
    return "confirmed"


@step("stage", "build the release venv from the bundle's wheelhouse")
def step_stage(ctx: Context, progress: Progress) -> str:
    """Build the venv in `<id>.partial`, reached through a link named `<id>` so scripts get their final path."""
    layout, t = ctx.layout, ctx.target
    final = layout.releases / ctx.release_id
    if read_release(final) is not None:
        raise Skip(f"release {ctx.release_id} is already staged")
    partial = layout.releases / f"{ctx.release_id}{PARTIAL_SUFFIX}"
    t.mkdir(layout.opt, 0o755)
    t.mkdir(layout.releases, 0o755)
    t.remove_tree(final)  # a link left by an interrupted run (complete releases were skipped above)
    t.remove_tree(partial)
    t.mkdir(partial, 0o755)
    t.symlink(partial.name, final)
    assert ctx.opts.bundle is not None
    stage = partial / "wheelhouse"
    progress("copying the wheelhouse off the bundle (each wheel hashed again), building the venv from it, loading its engine", None)
    assert ctx.tier is not None
    runtime = ctx.tier.runtime
    staged = t.call(f"copy the {runtime} wheelhouse into {stage}", stage_wheelhouse, ctx.opts.bundle, ctx.manifest, stage, runtime)
    extras = build_venv(ctx.runner, staged or ctx.opts.bundle, ctx.manifest, final / "venv", ctx.opts.python,
                        backend=ctx.planned().backend, runtime=runtime)
    t.remove_tree(stage)
    ctx.plan = replace(ctx.planned(), extras=tuple(extras), installed_at=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    t.write(partial / RELEASE_JSON, (json.dumps(ctx.plan.to_json(), indent=2, sort_keys=True) + "\n").encode(), 0o644)
    t.write(partial / MANIFEST, canonical_json(ctx.manifest.raw), 0o644)  # the signed bytes: `hw`, support bundles
    t.call(f"fsync {partial}", fsync_tree, partial)
    t.remove_tree(final)
    t.rename(partial, final)
    return f"release {ctx.release_id} staged: appliance" + (f"[{','.join(extras)}]" if extras else "") + " and its dependencies"


def _verified(dir_fd: int, model: Model) -> bool:
    """Every file of `model` is in the directory `dir_fd`, a regular file of its size and plaintext SHA-256."""
    for f in model.files:
        try:
            fd = open_file(f.name, dir_fd=dir_fd)
        except OSError:
            return False
        with os.fdopen(fd, "rb") as fh:
            if os.fstat(fd).st_size != f.plain_size:
                return False
            h = hashlib.sha256()
            while chunk := fh.read(1 << 20):
                h.update(chunk)
        if h.hexdigest() != f.plain_sha256:
            return False
    return True


def _present(directory: Path, model: Model) -> bool:
    try:
        fd = open_dir(directory)
    except (FileNotFoundError, NotADirectoryError):
        return False
    try:
        return _verified(fd, model)
    finally:
        os.close(fd)


def _decrypt_all(ctx: Context, model: Model, partial: Path, progress: Progress) -> None:
    """Decrypt into `partial`, a directory only root can enter, through its descriptor: the service user,
    who owns the models directory, can neither write there nor redirect a write with a link."""
    m = ctx.manifest
    assert ctx.opts.bundle is not None
    ids = service_ids(ctx.layout.root)
    kek = site_kek(m.key_wrap, ctx.opts.key_file, ctx.opts.passphrase_file, refuse_owner=ids[0] if ids else None)
    keys = {f.path: unwrap_key(kek, f.wrapped_key, f"{m.name}:{f.path}") for f in model.files}
    if ctx.dry_run:
        ctx.target.call(f"decrypt {', '.join(keys)} into {partial}", lambda: None)
        return
    with ctx.target.private_dir(partial) as dir_fd:
        for f in model.files:
            decrypt_model_file(ctx.opts.bundle, m, f, keys[f.path], Path(f.name),
                               lambda path, done, size: progress(f"decrypting {path}", done / size if size else 1.0), dir_fd=dir_fd)
        if not _verified(dir_fd, model):
            raise StateError(f"The decrypted model {model.id} does not match its plaintext SHA-256 in the manifest.",
                             "The bundle was built from a different file than it declares; ask the vendor for a new bundle.")


def _place(ctx: Context, ref: ModelRef, progress: Progress) -> str | None:
    """Decrypt one model into models/<key>/; None when it is there already, verified."""
    model = find_model(ctx.manifest, ref.id)
    final = ctx.layout.models / ref.key
    if _present(final, model):
        return None
    partial = final.with_name(final.name + PARTIAL_SUFFIX)
    ctx.target.mkdir(ctx.layout.models, 0o700)
    ctx.target.remove_tree(partial)
    _decrypt_all(ctx, model, partial, progress)
    ctx.target.remove_tree(final)  # present but damaged
    ctx.target.rename(partial, final)  # root's until the user step hands it to the service user
    return f"{model.id} decrypted into {final} ({sum(f.plain_size for f in model.files) / 2**20:.1f} MiB)"


@step("model", "decrypt the tier's model files (and its embedding model's)")
def step_model(ctx: Context, progress: Progress) -> str:
    refs = [r for r in (ctx.planned().model, ctx.planned().embeddings) if r is not None]
    done = [said for ref in refs if (said := _place(ctx, ref, progress)) is not None]
    if not done:
        raise Skip(f"{' and '.join(r.id for r in refs)} present in {ctx.layout.models} and verified")
    return "; ".join(done)


PREPARE_STEPS = (step_verify,)
INSTALL_STEPS = (step_plan, step_preflight, step_confirm, step_stage, step_model, step_engine, step_config)


def install(ctx: Context) -> None:
    """The whole install or upgrade. Raises an ApplianceError on the first failure, after its event
    (and its audit line)."""
    with audited(ctx, "upgrade" if ctx.opts.upgrade else "install"):
        _install(ctx)


def _install(ctx: Context) -> None:
    if ctx.opts.upgrade and current_or_none(ctx.layout) is None:
        raise UsageError(f"Nothing is installed under {ctx.layout.root} to upgrade.", "Use `appliance install DIR`.")
    removed = clean_partials(ctx.layout, ctx.target)
    if removed:
        ctx.notices.append(f"removed {len(removed)} leftover(s) of an interrupted run: {', '.join(removed)}")
    ctx.previous = current_or_none(ctx.layout)
    run_steps(PREPARE_STEPS, ctx, ctx.emit)
    assert ctx.verified is not None
    if ctx.verified.current:
        # Nothing to install, but the units follow appliance.toml (e.g. an edited trainer schedule).
        assert ctx.previous is not None
        ctx.plan, ctx.config = ctx.previous.plan, read_config(ctx.layout)
        run_steps(REFRESH_STEPS, ctx, ctx.emit)
        return
    run_steps(INSTALL_STEPS + ACTIVATE_STEPS, ctx, ctx.emit)
