"""Install and upgrade, as named idempotent steps: verify → plan → preflight → confirm → stage → model → engine → config.

The activation steps that follow (user and directories, units, enable, switch, start, ready, record)
live in installer/activate.py; rollback reuses them. Every change to the target goes through
`ctx.target` and every command through `ctx.runner`, so a dry run is the same code with both swapped.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from appliance.atomic import PARTIAL_SUFFIX
from appliance.errors import KeyMaterialError, SignatureError, StateError, TierError, UsageError
from appliance.paths import Layout
from appliance.state import highest_sequence, load_install_state, time_floor
from installer.engine_check import step_engine
from installer.manifest import MANIFEST, Manifest, Model, canonical_json
from installer.release import RELEASE_JSON, Release, build_venv, current_or_none, fsync_tree, read_release, release_id
from installer.runner import Runner
from installer.steps import Emit, Skip, Step, run_steps
from installer.target import Target

TRUST_IN_BUNDLE = "trust/vendor.pub"
MODELS_TARGET = "/var/lib/appliance/models"  # as the service sees it on the target


@dataclass
class Options:
    bundle: Path | None = None
    upgrade: bool = False
    tier: str | None = None
    key_file: Path | None = None
    passphrase_file: Path | None = None
    trust: Path | None = None
    trust_fingerprint: str | None = None
    yes: bool = False
    no_systemd: bool = False
    machine: Path | None = None
    host: str | None = None
    port: int | None = None
    ready_timeout: float = 600.0
    python: str | None = None  # the interpreter that builds the release venv (default: this one)


@dataclass
class Context:
    layout: Layout
    opts: Options
    runner: Runner
    target: Target
    emit: Emit
    confirm: Callable[[str], bool]
    systemd_running: bool = False
    state: dict[str, Any] = field(default_factory=dict)
    manifest: Manifest | None = None
    pin: Ed25519PublicKey | None = None
    release_id: str = ""
    release_info: dict[str, Any] = field(default_factory=dict)
    previous: Release | None = None
    config: dict[str, dict[str, Any]] = field(default_factory=dict)
    machine: Any = None  # installer.machine.Machine
    tier: Any = None  # installer.tiers.Tier
    noop: bool = False
    started: bool = False
    notices: list[str] = field(default_factory=list)

    @property
    def dry_run(self) -> bool:
        return self.target.dry_run

    @property
    def uses_systemd(self) -> bool:
        return not self.opts.no_systemd


def clean_partials(layout: Layout, target: Target) -> list[str]:
    """Leftovers of an interrupted run: `.partial` files and directories, and links to them. Never used."""
    removed: list[str] = []
    for d in (layout.releases, layout.models, layout.opt, layout.etc, layout.trust_dir, layout.var, layout.systemd_units):
        if not d.is_dir():
            continue
        for p in sorted(d.iterdir()):
            if d == layout.systemd_units and not p.name.startswith(".appliance-"):
                continue  # not ours
            if p.name.endswith(PARTIAL_SUFFIX) or (p.is_symlink() and os.readlink(p).endswith(PARTIAL_SUFFIX)):
                target.remove_tree(p)
                removed.append(str(p))
    return removed


def _read_public(data: bytes, where: str) -> Ed25519PublicKey:
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    try:
        key = load_pem_public_key(data)
    except ValueError:
        raise KeyMaterialError(f"{where} is not a PEM public key.") from None
    if not isinstance(key, Ed25519PublicKey):
        raise KeyMaterialError(f"{where} is not an Ed25519 public key.")
    return key


def trusted_keys(ctx: Context) -> tuple[list[Ed25519PublicKey], str]:
    """The keys to verify with, and how they were chosen. See SECURITY.md, "The first install"."""
    from installer.bundle_dir import read_bounded
    from installer.keys import fingerprint, load_public_key, load_trusted_keys

    opts, trust_dir = ctx.opts, ctx.layout.trust_dir
    if trust_dir.is_dir() and any(trust_dir.glob("*.pub")):
        pinned = load_trusted_keys([trust_dir])
        if opts.trust is not None and fingerprint(load_public_key(opts.trust)) not in {fingerprint(k) for k in pinned}:
            raise SignatureError(f"--trust names a key that is not pinned under {trust_dir}; after the first install only pinned keys count.",
                                 "Leave out --trust, or add the vendor's new key to the trust directory yourself (key rotation, SECURITY.md).")
        return pinned, f"pinned keys in {trust_dir}"
    if opts.upgrade:
        raise StateError(f"No vendor key is pinned under {trust_dir}: nothing was installed here.", "Use `appliance install` first.")
    if opts.trust is not None:
        key, source = load_public_key(opts.trust), f"--trust {opts.trust}"
    else:
        assert opts.bundle is not None
        key, source = _read_public(read_bounded(opts.bundle / TRUST_IN_BUNDLE, 64 << 10), TRUST_IN_BUNDLE), f"{TRUST_IN_BUNDLE} of the bundle"
    fp = fingerprint(key)
    if opts.trust_fingerprint is not None:
        if opts.trust_fingerprint.strip() != fp:
            raise SignatureError(f"The vendor key ({source}) has fingerprint {fp}, not the expected {opts.trust_fingerprint}.")
    elif opts.trust is None:
        if opts.yes:
            raise UsageError("A first install with --yes needs the vendor key checked out of band.",
                             f"Pass --trust FILE (the vendor's key) or --trust-fingerprint {fp} after comparing it with the vendor's letter.")
        if not ctx.confirm(f"This bundle is signed with vendor key {fp}. Does it match the fingerprint in your vendor's letter?"):
            raise UsageError("The vendor key was not confirmed; nothing was installed.")
    ctx.pin = key
    return [key], f"{source}, fingerprint {fp}"


def step_verify(ctx: Context, progress: Callable[[str, float | None], None]) -> str:
    from installer.bundle_dir import verify_bundle
    from installer.keys import fingerprint
    from installer.trust import Policy, host_platform

    assert ctx.opts.bundle is not None
    keys, how = trusted_keys(ctx)
    ctx.state = load_install_state(ctx.layout)
    policy = Policy(now=datetime.now(timezone.utc), platform=host_platform(),
                    highest_sequence=highest_sequence(ctx.state), time_floor=time_floor(ctx.state))
    def on_file(path: str, done: int, size: int) -> None:
        if done == size and size > 64 << 20:  # name the big files as they check out; the rest is quick
            progress(f"{path} ok", None)

    manifest, signer = verify_bundle(ctx.opts.bundle, keys, policy, on_file)
    ctx.manifest = manifest
    ctx.release_id = release_id(manifest)
    if ctx.pin is not None:
        pem = ctx.pin.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
        ctx.target.mkdir(ctx.layout.trust_dir, 0o755)
        ctx.target.write(ctx.layout.trust_dir / f"vendor-{fingerprint(ctx.pin)[7:23]}.pub", pem, 0o644)
        ctx.notices.append(f"pinned vendor key {fingerprint(ctx.pin)} under {ctx.layout.trust_dir}")
    cur = current_or_none(ctx.layout)
    if cur is not None and cur.id == ctx.release_id and ctx.release_id in (ctx.state.get("releases") or {}):
        ctx.noop = True
        return f"{manifest.name} {manifest.version} sequence {manifest.sequence} is already installed and current; nothing to do"
    return f"{manifest.name} {manifest.version} sequence {manifest.sequence}: {len(manifest.files)} files verified, signed by {fingerprint(signer)} ({how})"



def _model(manifest: Manifest, model_id: str) -> Model:
    for m in manifest.models:
        if m.id == model_id:
            return m
    raise TierError(f"The bundle has no model {model_id!r}.")


def model_key(model: Model) -> str:
    """Content address of a model: its file's plaintext SHA-256, or a digest over several files."""
    if len(model.files) == 1:
        return model.files[0].plain_sha256
    return hashlib.sha256("".join(f"{f.name}:{f.plain_sha256}\n" for f in sorted(model.files, key=lambda f: f.name)).encode()).hexdigest()


def step_plan(ctx: Context, progress: Callable[[str, float | None], None]) -> str:
    from installer.machine import load_machine
    from installer.planner import plan
    from installer.probe import probe
    from installer.tiers import models_of, parse_tiers

    m = ctx.manifest
    assert m is not None
    machine = load_machine(ctx.opts.machine) if ctx.opts.machine else probe(ctx.layout.root)
    p = plan(machine, parse_tiers(m.tiers, models_of(m.models)))
    wanted = ctx.opts.tier
    cur = current_or_none(ctx.layout)
    if wanted is None and cur is not None and cur.info.get("tier") in {t.name for t in p.tiers}:
        if p.verdict(cur.info["tier"]).verdict != "incompatible":
            wanted = cur.info["tier"]  # an upgrade keeps the tier the site runs
    tier = p.select(wanted)
    model = _model(m, tier.model)
    key = model_key(model)
    name = model.files[0].name if model.format == "gguf" and len(model.files) == 1 else ""
    settings = dict(p.model_settings(tier), path=f"{MODELS_TARGET}/{key}" + (f"/{name}" if name else ""))
    ctx.release_info = {
        "id": ctx.release_id, "name": m.name, "version": m.version, "sequence": m.sequence,
        "issued_at": m.raw["issued_at"], "tier": tier.name, "uses_gpu": tier.uses_gpu, "backend": tier.backend,
        "model": {"id": model.id, "key": key, "bytes": sum(f.plain_size for f in model.files)},
        "config": {"model": settings, "trainer": tier.trainer_settings()},
    }
    ctx.machine, ctx.tier = machine, tier
    why = "kept from the installed release" if wanted and wanted != ctx.opts.tier else ("--tier" if ctx.opts.tier else p.reason)
    return f"tier {tier.name} ({why}); model {model.id} on {tier.backend}"


def step_preflight(ctx: Context, progress: Callable[[str, float | None], None]) -> str:
    from installer.preflight import bundle_python, preflight, venv_estimate

    m = ctx.manifest
    assert m is not None
    staged = read_release(ctx.layout.releases / ctx.release_id) is not None
    have_model = (ctx.layout.models / ctx.release_info["model"]["key"]).is_dir()
    wheels = sum(f.size for f in m.files if f.path.startswith("wheels/"))
    problems = preflight(
        ctx.machine, ctx.tier,
        model_bytes=0 if have_model else ctx.release_info["model"]["bytes"],
        venv_bytes=0 if staged else venv_estimate(wheels), python=bundle_python(m.compatible),
        no_systemd=ctx.opts.no_systemd or ctx.layout.root != Path("/"),
    )
    if problems:
        raise TierError(f"Preflight found {len(problems)} problem(s): " + "; ".join(problems) + ".",
                        "Fix them, or choose another tier with --tier; `appliance hw` shows every tier.")
    return "RAM, disk, driver, Python and systemd are fine"


def step_confirm(ctx: Context, progress: Callable[[str, float | None], None]) -> str:
    if ctx.opts.yes:
        raise Skip("--yes given")
    if ctx.dry_run:
        raise Skip("dry run")
    i = ctx.release_info
    verb = "Upgrade to" if ctx.opts.upgrade else "Install"
    if not ctx.confirm(f"{verb} {i['name']} {i['version']} (sequence {i['sequence']}), tier {i['tier']}, into {ctx.layout.root}?"):
        raise UsageError("Cancelled; nothing was changed.")
    return "confirmed"


def step_stage(ctx: Context, progress: Callable[[str, float | None], None]) -> str:
    """Build the venv in `<id>.partial`, reached through a link named `<id>` so scripts get their final path."""
    from installer.release import stage_wheelhouse
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
    assert ctx.opts.bundle is not None and ctx.manifest is not None
    stage = partial / "wheelhouse"
    progress("copying the wheelhouse off the bundle (each wheel hashed again), building the venv from it, loading its engine", None)
    staged = t.call(f"copy the wheelhouse into {stage}", stage_wheelhouse, ctx.opts.bundle, ctx.manifest, stage)
    extras = build_venv(ctx.runner, staged or ctx.opts.bundle, ctx.manifest, final / "venv", ctx.opts.python,
                        backend=ctx.release_info["backend"])
    t.remove_tree(stage)
    info = dict(ctx.release_info, extras=extras, installed_at=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    t.write(partial / RELEASE_JSON, (json.dumps(info, indent=2, sort_keys=True) + "\n").encode(), 0o644)
    t.write(partial / MANIFEST, canonical_json(ctx.manifest.raw), 0o644)  # the signed bytes: `hw`, support bundles
    t.call(f"fsync {partial}", fsync_tree, partial)
    t.remove_tree(final)
    t.rename(partial, final)
    return f"release {ctx.release_id} staged: appliance" + (f"[{','.join(extras)}]" if extras else "") + " and its dependencies"


def _verified(directory: Path, model: Model) -> bool:
    for f in model.files:
        p = directory / f.name
        if not p.is_file() or p.stat().st_size != f.plain_size:
            return False
        h = hashlib.sha256()
        with p.open("rb") as fh:
            while chunk := fh.read(1 << 20):
                h.update(chunk)
        if h.hexdigest() != f.plain_sha256:
            return False
    return True


def _decrypt_all(ctx: Context, model: Model, partial: Path, progress: Callable[[str, float | None], None]) -> None:
    from installer.bundle_dir import decrypt_model_file
    from installer.keywrap import site_kek, unwrap_key

    m = ctx.manifest
    assert m is not None and ctx.opts.bundle is not None
    kek = site_kek(m.key_wrap, ctx.opts.key_file, ctx.opts.passphrase_file)
    keys = {f.path: unwrap_key(kek, f.wrapped_key, f"{m.name}:{f.path}") for f in model.files}
    if ctx.dry_run:
        ctx.target.call(f"decrypt {', '.join(keys)} into {partial}", lambda: None)
        return
    for f in model.files:
        decrypt_model_file(ctx.opts.bundle, m, f, keys[f.path], partial / f.name,
                           lambda path, done, size: progress(f"decrypting {path}", done / size if size else 1.0))
    if not _verified(partial, model):
        raise StateError(f"The decrypted model {model.id} does not match its plaintext SHA-256 in the manifest.",
                         "The bundle was built from a different file than it declares; ask the vendor for a new bundle.")


def step_model(ctx: Context, progress: Callable[[str, float | None], None]) -> str:
    assert ctx.manifest is not None
    model = _model(ctx.manifest, ctx.release_info["model"]["id"])
    final = ctx.layout.models / ctx.release_info["model"]["key"]
    if final.is_dir() and _verified(final, model):
        raise Skip(f"{model.id} is present in {final} and verified")
    partial = final.with_name(final.name + PARTIAL_SUFFIX)
    ctx.target.mkdir(ctx.layout.models, 0o700)
    ctx.target.remove_tree(partial)
    ctx.target.mkdir(partial, 0o700)
    _decrypt_all(ctx, model, partial, progress)
    ctx.target.call(f"fsync {partial}", fsync_tree, partial)
    ctx.target.remove_tree(final)  # present but damaged
    ctx.target.rename(partial, final)
    return f"{model.id} decrypted into {final} ({sum(f.plain_size for f in model.files) / 2**20:.1f} MiB)"


def apply_config(ctx: Context, model: dict[str, Any], trainer: dict[str, Any]) -> str:
    """Merge what this release wants into appliance.toml, keeping what the administrator changed."""
    from installer import config_file as cf

    layout = ctx.layout
    server: dict[str, Any] = {}
    if ctx.opts.host is not None:
        server["host"] = ctx.opts.host
    if ctx.opts.port is not None:
        server["port"] = ctx.opts.port
    desired = cf.desired_values(model, trainer, server)
    try:
        existing: str | None = layout.config_file.read_text()
    except FileNotFoundError:
        existing = None
    merged = cf.merge(existing, cf.load_base(layout), desired, str(layout.config_file))
    ctx.config = cf.parse(merged.text, str(layout.config_file))
    kept = f"; kept your values for {', '.join(merged.kept)}" if merged.kept else ""
    if merged.text == existing and cf.load_base(layout) == merged.installed:
        raise Skip(f"{layout.config_file} is up to date{kept}")
    if not layout.etc.is_dir():  # the user step later gives it to the service's group
        ctx.target.mkdir(layout.etc, 0o755)
    ctx.target.write(layout.config_file, merged.text.encode(), 0o644)
    ctx.target.write(cf.base_path(layout), (json.dumps(merged.installed, indent=2, sort_keys=True) + "\n").encode(), 0o644)
    return f"wrote {layout.config_file}{kept}"


def step_config(ctx: Context, progress: Callable[[str, float | None], None]) -> str:
    c = ctx.release_info["config"]
    return apply_config(ctx, c["model"], c["trainer"])


PREPARE_STEPS = (
    Step("verify", "check the bundle's signature, policy and every file", step_verify),
)
INSTALL_STEPS = (
    Step("plan", "probe the hardware and choose a tier", step_plan),
    Step("preflight", "check RAM, disk, driver, Python and systemd for that tier", step_preflight),
    Step("confirm", "ask before changing anything", step_confirm),
    Step("stage", "build the release venv from the bundle's wheelhouse", step_stage),
    Step("model", "decrypt the tier's model files", step_model),
    Step("engine", "decode a test prompt with the new release's engine on this CPU", step_engine),
    Step("config", "write /etc/appliance/appliance.toml", step_config),
)


def install(ctx: Context) -> None:
    """The whole install or upgrade. Raises an ApplianceError on the first failure, after its event."""
    from installer.activate import ACTIVATE_STEPS

    if ctx.opts.upgrade and current_or_none(ctx.layout) is None:
        raise UsageError(f"Nothing is installed under {ctx.layout.root} to upgrade.", "Use `appliance install DIR`.")
    removed = clean_partials(ctx.layout, ctx.target)
    if removed:
        ctx.notices.append(f"removed {len(removed)} leftover(s) of an interrupted run: {', '.join(removed)}")
    ctx.previous = current_or_none(ctx.layout)
    run_steps(PREPARE_STEPS, ctx, ctx.emit)
    if ctx.noop:
        # Nothing to install, but the units follow appliance.toml (e.g. an edited trainer schedule).
        from installer.activate import REFRESH_STEPS
        from installer.config_file import read_config

        cur = current_or_none(ctx.layout)
        assert cur is not None
        ctx.release_info, ctx.config = dict(cur.info), read_config(ctx.layout)
        run_steps(REFRESH_STEPS, ctx, ctx.emit)
        return
    run_steps(INSTALL_STEPS + ACTIVATE_STEPS, ctx, ctx.emit)
