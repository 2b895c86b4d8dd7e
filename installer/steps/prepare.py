"""The two steps that change nothing: verify the bundle (signature, policy, every file) and plan
the release on this machine. `appliance install` and the console's install screen both call them."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from appliance.errors import SignatureError, StateError, TierError, UsageError
from appliance.paths import Layout
from appliance.state import load_install_state
from installer.bundle.keys import fingerprint, load_public_key, load_trusted_keys, public_key_from_pem
from installer.bundle.manifest import TRUST_FILE, Manifest, Model
from installer.bundle.reader import read_bounded, verify_bundle
from installer.bundle.trust import Policy, host_platform
from installer.hardware.machine import Machine, load_machine
from installer.hardware.probe import probe
from installer.planning.planner import Plan, plan
from installer.planning.tiers import Tier, models_of, parse_tiers
from installer.steps.context import Context, Verified
from installer.steps.framework import step
from installer.system.release import ModelRef, ReleasePlan, current_or_none, release_id

MODELS_TARGET = "/var/lib/appliance/models"  # as the service sees it on the target
Progress = Callable[[str, float | None], None]
OnFile = Callable[[str, int, int], None]


def trusted_keys(ctx: Context) -> tuple[list[Ed25519PublicKey], str, Ed25519PublicKey | None]:
    """The keys to verify with, how they were chosen, and the key to pin (first install only).
    See SECURITY.md, "The first install"."""
    opts, trust_dir = ctx.opts, ctx.layout.trust_dir
    if trust_dir.is_dir() and any(trust_dir.glob("*.pub")):
        pinned = load_trusted_keys([trust_dir])
        if opts.trust is not None and fingerprint(load_public_key(opts.trust)) not in {fingerprint(k) for k in pinned}:
            raise SignatureError(f"--trust names a key that is not pinned under {trust_dir}; after the first install only pinned keys count.",
                                 "Leave out --trust, or add the vendor's new key to the trust directory yourself (key rotation, SECURITY.md).")
        return pinned, f"pinned keys in {trust_dir}", None
    if opts.upgrade:
        raise StateError(f"No vendor key is pinned under {trust_dir}: nothing was installed here.", "Use `appliance install` first.")
    if opts.trust is not None:
        key, source = load_public_key(opts.trust), f"--trust {opts.trust}"
    else:
        assert opts.bundle is not None
        key, source = public_key_from_pem(read_bounded(opts.bundle / TRUST_FILE, 64 << 10), TRUST_FILE), f"{TRUST_FILE} of the bundle"
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
    return [key], f"{source}, fingerprint {fp}", key


def verify(ctx: Context, on_file: OnFile) -> Verified:
    """Signature, policy (platform, expiry, sequence, clock floor) and every file's hash."""
    assert ctx.opts.bundle is not None
    keys, how, pin = trusted_keys(ctx)
    state = load_install_state(ctx.layout)
    policy = Policy.from_state(state, host_platform())
    manifest, signer = verify_bundle(ctx.opts.bundle, keys, policy, on_file)
    rid = release_id(manifest)
    cur = current_or_none(ctx.layout)
    current = cur is not None and cur.id == rid and rid in (state.get("releases") or {})
    return Verified(manifest, rid, fingerprint(signer), how, pin, current)


def judge(layout: Layout, manifest: Manifest, machine_file: Path | None) -> tuple[Machine, Plan]:
    """Every tier of the bundle judged on this machine (or on a recorded one)."""
    machine = load_machine(machine_file) if machine_file else probe(layout.root)
    return machine, plan(machine, parse_tiers(manifest.tiers, models_of(manifest.models)), manifest.runtimes)


def find_model(manifest: Manifest, model_id: str) -> Model:
    for m in manifest.models:
        if m.id == model_id:
            return m
    raise TierError(f"The bundle has no model {model_id!r}.")


def model_key(model: Model) -> str:
    """Content address of a model: its file's plaintext SHA-256, or a digest over several files."""
    if len(model.files) == 1:
        return model.files[0].plain_sha256
    return hashlib.sha256("".join(f"{f.name}:{f.plain_sha256}\n" for f in sorted(model.files, key=lambda f: f.name)).encode()).hexdigest()


def model_ref(model: Model) -> ModelRef:
    return ModelRef(model.id, model_key(model), sum(f.plain_size for f in model.files))


def _embeddings(m: Manifest, tier: Tier, settings: dict[str, Any]) -> tuple[ModelRef | None, dict[str, Any]]:
    """The tier's embedding model and its [embeddings] section: a directory like the transformers models."""
    if tier.embeddings is None:
        return None, {}
    model = find_model(m, tier.embeddings)
    ref = model_ref(model)
    wanted = tier.embedding_settings(int(settings["threads"]))
    return ref, dict(wanted, path=f"{MODELS_TARGET}/{ref.key}", context_length=model.context_length)


def release_plan(verified: Verified, p: Plan, tier: Tier) -> ReleasePlan:
    m = verified.manifest
    model = find_model(m, tier.model)
    ref = model_ref(model)
    name = model.files[0].name if model.format == "gguf" and len(model.files) == 1 else ""
    settings = dict(p.model_settings(tier), path=f"{MODELS_TARGET}/{ref.key}" + (f"/{name}" if name else ""))
    embeddings, embedding_settings = _embeddings(m, tier, settings)
    return ReleasePlan(id=verified.release_id, name=m.name, version=m.version, sequence=m.sequence,
                       issued_at=m.raw["issued_at"], tier=tier.name, uses_gpu=tier.uses_gpu, backend=tier.backend,
                       model=ref, model_settings=settings, trainer_settings=tier.trainer_settings(),
                       embeddings=embeddings, embedding_settings=embedding_settings)


@step("verify", "check the bundle's signature, policy and every file")
def step_verify(ctx: Context, progress: Progress) -> str:
    def on_file(path: str, done: int, size: int) -> None:
        if done == size and size > 64 << 20:  # name the big files as they check out; the rest is quick
            progress(f"{path} ok", None)

    v = ctx.verified = verify(ctx, on_file)
    if v.pin is not None:
        pem = v.pin.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
        ctx.target.mkdir(ctx.layout.trust_dir, 0o755)
        ctx.target.write(ctx.layout.trust_dir / f"vendor-{fingerprint(v.pin)[7:23]}.pub", pem, 0o644)
        ctx.notices.append(f"pinned vendor key {fingerprint(v.pin)} under {ctx.layout.trust_dir}")
    m = v.manifest
    if v.current:
        return f"{m.name} {m.version} sequence {m.sequence} is already installed and current; nothing to do"
    return f"{m.name} {m.version} sequence {m.sequence}: {len(m.files)} files verified, signed by {v.signer} ({v.trust})"


@step("plan", "probe the hardware and choose a tier")
def step_plan(ctx: Context, progress: Progress) -> str:
    assert ctx.verified is not None
    machine, p = judge(ctx.layout, ctx.verified.manifest, ctx.opts.machine)
    wanted = ctx.opts.tier
    cur = current_or_none(ctx.layout)
    if wanted is None and cur is not None and cur.info.get("tier") in {t.name for t in p.tiers}:
        if p.verdict(cur.info["tier"]).verdict != "incompatible":
            wanted = cur.info["tier"]  # an upgrade keeps the tier the site runs
    tier = p.select(wanted)
    ctx.plan, ctx.machine, ctx.tier = release_plan(ctx.verified, p, tier), machine, tier
    why = "kept from the installed release" if wanted and wanted != ctx.opts.tier else ("--tier" if ctx.opts.tier else p.reason)
    return f"tier {tier.name} ({why}); model {ctx.plan.model.id} on {tier.backend}"
